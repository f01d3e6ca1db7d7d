"""TFDS builders on generated trees: counts, labels, names, bytes, bad input, Digits/Digits-M."""

import io
import os
import re
import shutil
import tarfile

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dsbn_jax import datasets, input_pipeline
from dsbn_jax.datasets import catalog, digits, office
from dsbn_jax.errors import UserError
from tests import data_fixtures as fx

_CONVERTED_MODES = ('CMYK', 'I;16')  # stored as PNG of PIL .convert('RGB'); all others as is


def _build(name, data_dir, manual_dir=None, **kwargs):
  builder = tfds.builder(name, data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
  )
  return builder


def _examples(builder, split):
  """{file_name: (label, stored bytes)} of a split."""
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  return {ex['file_name'].decode(): (int(ex['label']), ex['image']) for ex in tfds.as_numpy(ds)}


@pytest.fixture(scope='module')
def office_home(tmp_path_factory):
  """office_home built from a generated tree, the way the issue's public surface says."""
  tmp = tmp_path_factory.mktemp('office_home')
  entries = fx.make_domain_tree(
    str(tmp / 'manual' / 'OfficeHomeDataset_10072016'),
    fx.OFFICE_HOME_DOMAINS,
    fx.OFFICE_HOME_SUBSET,
  )
  return _build('office_home', tmp / 'tfds', tmp / 'manual'), entries


def test_importing_registers_the_builders():
  assert datasets.OfficeHome.name == 'office_home'
  for name in ('office31', 'office_home', 'digits', 'digits_m', 'domain_folder'):
    assert name in tfds.list_builders(), name


def test_office_home_counts_labels_and_class_names(office_home):
  builder, entries = office_home
  names = builder.info.features['label'].names
  assert len(names) == 65 and names == sorted(names)  # 65: the published class count
  assert len(office.OFFICE31_CLASSES) == 31
  assert set(builder.info.splits) == {'Art', 'Clipart', 'Product', 'Real_World'}
  for split, folder_name in office.OfficeHome.DOMAINS.items():
    expected = {e.rel: e for e in entries if e.domain == folder_name}
    assert builder.info.splits[split].num_examples == len(expected)
    got = _examples(builder, split)
    assert sorted(got) == sorted(expected)  # hidden files, Thumbs.db, AppleDouble files ignored
    for rel, (label, _) in got.items():
      assert names[label] == expected[rel].class_name


def test_real_world_folder_with_space_is_split_real_world(office_home):
  builder, entries = office_home
  ds = builder.as_dataset(split='Real_World')  # the public surface, decoded by TFDS
  n = sum(1 for _ in ds)
  assert n == sum(e.domain == 'Real World' for e in entries) > 0


def test_stored_bytes_are_original_and_decode_to_pil_rgb(office_home):
  builder, entries = office_home
  for split, folder_name in office.OfficeHome.DOMAINS.items():
    got = _examples(builder, split)
    for e in (e for e in entries if e.domain == folder_name):
      stored = got[e.rel][1]
      with open(e.path, 'rb') as f:
        original = f.read()
      assert (stored == original) == (e.mode not in _CONVERTED_MODES), (e.rel, e.mode)
      reference = np.asarray(PIL.Image.open(e.path).convert('RGB'))  # the reference's loader
      decoded = input_pipeline.decode_image(tf.constant(stored)).numpy()
      np.testing.assert_array_equal(decoded, reference, err_msg=f'{e.rel} ({e.mode})')


def test_tf_decodes_cmyk_jpeg_close_to_pil_but_we_store_pil_rgb(tmp_path):
  """Documents TF's CMYK path (works in this TF, within rounding); the builders don't rely on it."""
  path = str(tmp_path / 'cmyk.jpg')
  with open(path, 'wb') as f:
    f.write(fx.encode(fx.random_image(3, (40, 30)), 'CMYK', 'JPEG'))
  reference = np.asarray(PIL.Image.open(path).convert('RGB')).astype(int)
  with open(path, 'rb') as f:
    tf_rgb = tf.io.decode_image(f.read(), channels=3).numpy().astype(int)
  assert np.abs(tf_rgb - reference).max() <= 3
  stored, converted = datasets.folder.read_image_bytes(path)
  assert converted
  np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(stored))), reference)


def test_office31_from_original_archive_warns_about_counts(tmp_path, caplog):
  tree = tmp_path / 'tree'
  entries = fx.make_domain_tree(
    str(tree / 'domain_adaptation_images'),
    ('amazon', 'dslr', 'webcam'),
    ('back_pack', 'bike', 'trash_can'),
    subdir='images',
    per_class=(1, 2),
  )
  manual = tmp_path / 'manual'
  manual.mkdir()
  with tarfile.open(manual / 'domain_adaptation_images.tar.gz', 'w:gz') as tar:
    tar.add(tree / 'domain_adaptation_images', arcname='domain_adaptation_images')
  shutil.rmtree(tree)  # only the archive is left, as downloaded
  with caplog.at_level('WARNING'):
    builder = _build('office31', tmp_path / 'tfds', manual)
  for split in ('amazon', 'dslr', 'webcam'):
    n = sum(e.domain == split for e in entries)
    assert builder.info.splits[split].num_examples == n
    published = office.OFFICE31_COUNTS[split]
    assert f'office31/{split}: found {n} images' in caplog.text
    assert f'has {published}' in caplog.text
  labels = {builder.info.features['label'].names[l] for l, _ in _examples(builder, 'dslr').values()}
  assert labels == {'back_pack', 'bike', 'trash_can'}


def _minimal_office_home(root, **kwargs):
  return fx.make_domain_tree(
    str(root), fx.OFFICE_HOME_DOMAINS, ('Drill',), per_class=(1,), **kwargs
  )


def test_truncated_jpeg_fails_naming_the_file(tmp_path):
  entries = _minimal_office_home(tmp_path / 'manual')
  victim = next(e for e in entries if e.rel.endswith('.jpg') and e.mode == 'RGB')
  with open(victim.path, 'rb') as f:
    data = f.read()
  with open(victim.path, 'wb') as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(UserError, match=re.escape(victim.path)):
    _build('office_home', tmp_path / 'tfds', tmp_path / 'manual')


@pytest.mark.parametrize('state', ['missing', 'empty'])
def test_missing_or_empty_manual_dir_gives_the_instructions(tmp_path, state):
  manual = tmp_path / 'manual'
  if state == 'empty':
    manual.mkdir()
  with pytest.raises(UserError) as err:
    _build('office_home', tmp_path / 'tfds', manual)
  message = str(err.value)
  assert '\n' not in message and str(manual) in message
  assert 'OfficeHomeDataset_10072016.zip' in message and 'data.manual_dir' in message


def test_unrecognised_manual_dir_and_unknown_class_are_user_errors(tmp_path):
  (tmp_path / 'manual' / 'something').mkdir(parents=True)
  with pytest.raises(UserError, match='Real World'):
    _build('office_home', tmp_path / 'tfds', tmp_path / 'manual')
  _minimal_office_home(tmp_path / 'manual2')
  os.makedirs(tmp_path / 'manual2' / 'Art' / 'Dinosaur')
  with pytest.raises(UserError, match='Dinosaur'):
    _build('office_home', tmp_path / 'tfds2', tmp_path / 'manual2')


def test_domain_names_resolve_and_unknown_ones_list_the_valid_ones():
  data = fx.get_data_config('office_home')
  for alias in ('Real World', 'real_world', 'Rw', 'RW'):
    assert catalog.canonical_domain(data, alias) == 'Real_World'
  with pytest.raises(UserError, match=re.escape(str(['Art', 'Clipart', 'Product', 'Real_World']))):
    catalog.canonical_domain(data, 'Sketch')
  assert catalog.canonical_domain(fx.get_data_config('office31'), 'A') == 'amazon'


def test_custom_folder_dataset_is_config_driven(tmp_path):
  root = tmp_path / 'my_data'
  day = fx.make_domain_tree(str(root), ('day time',), ('cat', 'dog'))
  night = fx.make_domain_tree(str(root), ('night',), ('cat', 'owl'), seed=1)
  data = fx.get_data_config('custom')
  data.manual_dir, data.data_dir = str(root), str(tmp_path / 'tfds')
  data.source, data.target = 'day time', 'NIGHT'
  info = catalog.get_data_info(data)
  assert info.class_names == ('cat', 'dog', 'owl') and info.num_classes == 3
  assert (info.source.name, info.target.name) == ('day_time', 'night')
  assert (info.source.num_train, info.target.num_eval) == (len(day), len(night))
  got = _examples(info.target.builder, 'night')
  assert {info.class_names[l] for l, _ in got.values()} == {'cat', 'owl'}
  with pytest.raises(UserError, match='day_time'):
    catalog.canonical_domain(data, 'dusk')
  shutil.rmtree(root)  # a prepared custom dataset no longer needs its tree
  assert catalog.get_data_info(data).class_names == ('cat', 'dog', 'owl')


def _digits_examples(data_dir, name, seed=0):
  config = None if seed == 0 else digits.DigitsConfig(name=f'seed{seed}', seed=seed)
  builder = _build(name, data_dir, config=config)
  return {s: _examples(builder, s) for s in ('train', 'test')}


def test_digits_build_deterministically_with_disjoint_splits(tmp_path, digits_data_dir):
  """The session's prepared Digits-M (conftest) and a new build agree byte for byte."""
  first = _digits_examples(digits_data_dir, 'digits_m')
  again = _digits_examples(tmp_path / 'b', 'digits_m')
  for split in ('train', 'test'):
    assert first[split].keys() == again[split].keys()
    assert all(first[split][k] == again[split][k] for k in first[split])  # same seed, same bytes
  source = _digits_examples(digits_data_dir, 'digits')
  parts = digits.partition(0)
  index_sets = {}
  for name, examples in (('digits', source), ('digits_m', first)):
    for split, ex in examples.items():
      index_sets[f'{name}/{split}'] = {int(k.split('/')[1]) for k in ex}
      np.testing.assert_array_equal(sorted(index_sets[f'{name}/{split}']), parts[f'{name}/{split}'])
  all_indices = [i for s in index_sets.values() for i in s]
  assert len(all_indices) == len(set(all_indices)) == 1797  # disjoint, and every digit used once
  for split, size in re.findall(r'^\s+(digits\S*/\w+)\s+(\d+)\s', digits.__doc__, re.M):
    assert len(parts[split]) == int(size), split  # the docstring table is right
  image = np.asarray(PIL.Image.open(io.BytesIO(first['test'][next(iter(first['test']))][1])))
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_digits_seed_changes_partition_and_patches():
  a, b = digits.partition(0), digits.partition(1)
  assert any(not np.array_equal(a[k], b[k]) for k in a)
  assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in b.items()}
  gray, _ = digits.digit_images(a['digits_m/test'][:8])
  np.testing.assert_array_equal(
    digits.blend_with_photos(gray, 0), digits.blend_with_photos(gray, 0)
  )
  assert not np.array_equal(digits.blend_with_photos(gray, 0), digits.blend_with_photos(gray, 1))
  blended = digits.blend_with_photos(gray, 0).astype(int)
  assert blended.std(axis=-1).mean() > 1  # coloured, not gray


def test_eval_split_train_evaluates_on_the_adapted_images_and_is_checked(digits_data_dir):
  """data.eval_split='train' (hyper-parameter search without the test split) and a bad name."""
  data = fx.get_data_config('digits')
  data.data_dir = digits_data_dir
  protocol = catalog.resolve_domain(data, 'digits_m')
  assert (protocol.train_split, protocol.eval_split) == ('train', 'test')
  data.eval_split = 'train'
  search = catalog.resolve_domain(data, 'digits_m')
  assert search.eval_split == 'train' and search.num_eval == protocol.num_train
  data.eval_split = 'validation'
  with pytest.raises(UserError, match=r"data.eval_split='validation' is not a split of 'digits_m'"):
    catalog.resolve_domain(data, 'digits_m')
