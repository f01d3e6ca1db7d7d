"""Regressions for what the full-scale Office rehearsal (benchmarks/office_scale.py) found, at
small size: the archive's extracted copy, TFDS's progress bars in a log, silent long evaluations,
and the generator the rehearsal relies on."""

import io
import os
import tarfile

import numpy as np
import PIL.Image
import pytest

from benchmarks import office_scale
from dsbn_jax import config_defaults, evaluation
from dsbn_jax.datasets import catalog, office
from dsbn_jax.errors import UserError
from tests import data_fixtures as fx


def _office31_archive(tmp_path):
  tree = tmp_path / 'tree'
  entries = fx.make_domain_tree(
    str(tree),
    ('amazon', 'dslr', 'webcam'),
    ('back_pack', 'bike'),
    subdir='images',
    per_class=(1, 2),
  )
  manual = tmp_path / 'manual'
  manual.mkdir()
  with tarfile.open(manual / office_scale.OFFICE31_TAR, 'w:gz') as tar:
    for domain in ('amazon', 'dslr', 'webcam'):
      tar.add(tree / domain, arcname=domain)
  return manual, entries


def test_a_build_from_an_archive_keeps_no_extracted_copy_and_no_progress_flood(tmp_path, capsys):
  manual, entries = _office31_archive(tmp_path)
  data = config_defaults.get_data_config('office31')
  data.manual_dir, data.data_dir = str(manual), str(tmp_path / 'tfds')
  builder = catalog.get_builder(data, 'amazon')
  assert sum(s.num_examples for s in builder.info.splits.values()) == len(entries)
  extracted = tmp_path / 'tfds' / 'downloads' / 'extracted'
  # The records hold every image: TFDS's extracted copy of the archive (3.3 GB for Office-Home)
  # is gone once the build succeeded.
  assert not extracted.exists() or not os.listdir(extracted)
  err = capsys.readouterr().err
  # stderr is not a terminal here: no per-member progress lines, one line saying what happens.
  assert 'Extraction completed' not in err and 'Generating' not in err
  assert f'preparing the office31 dataset in {builder.data_dir}' in err


def test_a_failed_build_keeps_the_extracted_copy_for_the_next_attempt(tmp_path):
  manual, entries = _office31_archive(tmp_path)
  data = config_defaults.get_data_config('office31')
  data.manual_dir, data.data_dir = str(manual), str(tmp_path / 'tfds')
  # A class folder that Office-31 does not have: the build stops after extracting.
  with tarfile.open(manual / office_scale.OFFICE31_TAR, 'r:gz') as tar:
    members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
  with tarfile.open(manual / office_scale.OFFICE31_TAR, 'w:gz') as tar:
    for m, content in members:
      tar.addfile(m, io.BytesIO(content) if content is not None else None)
    bad = tarfile.TarInfo('dslr/images/not_a_class/x.jpg')
    jpeg = fx.encode(fx.random_image(0, (8, 8)), 'RGB', 'JPEG')
    bad.size = len(jpeg)
    tar.addfile(bad, io.BytesIO(jpeg))
  with pytest.raises(UserError, match='not_a_class'):
    catalog.get_builder(data, 'amazon')
  assert os.listdir(tmp_path / 'tfds' / 'downloads' / 'extracted')


class _FakeEval:
  """An eval set of `n` batches of 2 images (labels 0, 1), predicted right."""

  def __init__(self, n):
    self.n, self.num_examples = n, 2 * n

  def __len__(self):
    return self.n

  def __iter__(self):
    for _ in range(self.n):
      yield {
        'label': np.array([0, 1]),
        'pred': np.array([0, 1]),
        'mask': np.array([True, True]),
        'probs': np.eye(2, dtype=np.float32),
        'features': np.zeros((2, 3), np.float32),
      }


def test_a_long_evaluation_reports_its_progress(monkeypatch):
  clock = iter(range(0, 10_000, 20))  # every evaluated batch takes 20 s
  monkeypatch.setattr(evaluation.time, 'perf_counter', lambda: next(clock))
  monkeypatch.setattr(evaluation.sharding, 'to_global', lambda batch, mesh: batch)
  said = []
  result = evaluation.evaluate(
    lambda state, batch: batch, None, _FakeEval(12), None, 2, said.append
  )
  assert result['accuracy'] == 100.0 and result['num_images'] == 24
  # silent during the first minute, then about every 30 s (here every other batch), never after
  # the last batch
  assert said and all(line.startswith('evaluating: batch ') for line in said)
  assert 'batch 4/12' in said[0] and 'ETA' in said[0] and len(said) == 4
  quiet = []
  evaluation.evaluate(lambda state, batch: batch, None, _FakeEval(2), None, 2, quiet.append)
  assert not quiet


def test_the_generator_keeps_every_class_and_the_published_counts():
  full = list(office_scale.office_home_jobs(1.0))
  for split, folder in office_scale.OFFICE_HOME_FOLDERS.items():
    assert sum(f'/{folder}/' in j[0] for j in full) == office.OFFICE_HOME_COUNTS[split]
  assert any('/Real World/' in j[0] for j in full)
  scaled = list(office_scale.office_home_jobs(0.02))
  for folder in office_scale.OFFICE_HOME_FOLDERS.values():
    classes = {j[0].split('/')[2] for j in scaled if f'/{folder}/' in j[0]}
    assert classes == set(office.OFFICE_HOME_CLASSES)
  modes = {(j[5], j[6]) for j in full}
  assert {('CMYK', 'JPEG'), ('L', 'JPEG'), ('RGBA', 'PNG'), ('P', 'PNG')} <= modes
  assert len(list(office_scale.office31_jobs())) == sum(office.OFFICE31_COUNTS.values())


def test_generated_images_decode_at_their_size_and_are_not_constant():
  job = next(j for j in office_scale.office_home_jobs(1.0) if j[5] == 'CMYK')
  for _, k, seed, w, h, mode, fmt in (job, (None, 3, 7, 120, 40, 'RGB', 'JPEG')):
    data = office_scale.render(k, seed, w, h, mode, fmt)
    assert data == office_scale.render(k, seed, w, h, mode, fmt)  # deterministic
    with PIL.Image.open(io.BytesIO(data)) as img:
      assert img.size == (w, h) and img.mode == mode and img.format == fmt
      assert np.asarray(img.convert('RGB')).std() > 5
