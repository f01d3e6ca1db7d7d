"""No silent wrong answers from the data: a prepared custom dataset that is not the tree as it is
now (changed, or another tree with the same folder name), symbolic-link loops in a tree, a
truncated dataset archive, and the advice given for an unreadable image.

Everything is in-process on tiny generated trees (a few images of a few pixels).
"""

import os
import re
import shutil
import tarfile
import zipfile

import pytest
import tensorflow_datasets as tfds

from dsbn_jax import cli
from dsbn_jax.datasets import catalog, folder
from dsbn_jax.errors import UserError
from tests import data_fixtures as fx

_REBUILD = 'was prepared from a different or changed tree'


def _custom(tree, data_dir, source='s', target='t'):
  data = fx.get_data_config('custom')
  data.manual_dir, data.data_dir = str(tree), str(data_dir)
  data.source, data.target = source, target
  return data


def _prepared(data_dir, name='imgs'):
  return data_dir / 'domain_folder' / name / '1.0.0'


def _labels(info):
  """{file_name: class name} of every target example, by the dataset's own class names."""
  ds = info.target.builder.as_dataset(
    split=info.target.eval_split, decoders={'image': tfds.decode.SkipDecoding()}
  )
  return {ex['file_name'].decode(): info.class_names[int(ex['label'])] for ex in tfds.as_numpy(ds)}


def _expected(entries, domain='t'):
  return {e.rel: e.class_name for e in entries if e.domain == domain}


def _rebuild_warnings(caplog):
  return [r.getMessage() for r in caplog.records if _REBUILD in r.getMessage()]


def _mtimes(path):
  return {n: os.stat(path / n).st_mtime_ns for n in sorted(os.listdir(path))}


# ---------------------------------------------------------------------------------------------
# 1. A prepared custom dataset is the tree as it is now, or it is rebuilt (with one warning line)
# ---------------------------------------------------------------------------------------------


def test_adding_a_class_folder_rebuilds_and_shows_the_new_class(tmp_path, caplog):
  tree = tmp_path / 'imgs'
  entries = fx.make_domain_tree(str(tree), ('s', 't'), ('aa',), per_class=(2,))
  data = _custom(tree, tmp_path / 'tfds')
  before = catalog.get_data_info(data)
  assert before.class_names == ('aa',) and before.source.num_train == 2
  entries += fx.make_domain_tree(str(tree), ('s', 't'), ('b',), per_class=(3,), seed=1)
  with caplog.at_level('WARNING'):
    info = catalog.get_data_info(data)
  assert _rebuild_warnings(caplog) == [
    f'custom dataset imgs {_REBUILD} (classes +b; images 4 -> 10); rebuilding '
    f'{_prepared(tmp_path / "tfds")}'
  ]
  assert info.class_names == ('aa', 'b')
  assert (info.source.num_train, info.target.num_eval) == (5, 5)
  assert _labels(info) == _expected(entries)  # every b image is b, not aa


def test_two_trees_with_the_same_folder_name_each_read_their_own(tmp_path, caplog):
  v1 = fx.make_domain_tree(str(tmp_path / 'v1' / 'imgs'), ('s', 't'), ('aa',), per_class=(2,))
  v2 = fx.make_domain_tree(
    str(tmp_path / 'v2' / 'imgs'), ('s', 't'), ('b', 'c'), per_class=(1,), seed=1
  )
  for version, entries, classes in (
    ('v1', v1, ('aa',)),
    ('v2', v2, ('b', 'c')),
    ('v1', v1, ('aa',)),
  ):
    caplog.clear()
    with caplog.at_level('WARNING'):
      info = catalog.get_data_info(_custom(tmp_path / version / 'imgs', tmp_path / 'tfds'))
    assert info.class_names == classes, version
    assert info.target.num_eval == len(_expected(entries)), version
    assert _labels(info) == _expected(entries), version
  other = 'v2' if version == 'v1' else 'v1'
  [warning] = _rebuild_warnings(caplog)  # the switch back to v1 is said, in one line
  assert (
    f'(prepared from {tmp_path / other / "imgs"}, now {tmp_path / version / "imgs"}; '
    'trees with the same folder name share one prepared copy: set data.custom_name to keep '
    'one per tree)'
  ) in warning


def test_an_unchanged_tree_is_not_rebuilt_but_an_edited_image_is(tmp_path, caplog):
  tree = tmp_path / 'imgs'
  entries = fx.make_domain_tree(str(tree), ('s', 't'), ('aa', 'b'), per_class=(1, 2))
  data = _custom(tree, tmp_path / 'tfds')
  catalog.get_data_info(data)
  prepared = _prepared(tmp_path / 'tfds')
  assert folder.SOURCE_FILE in os.listdir(prepared)
  stamps = _mtimes(prepared)
  with caplog.at_level('WARNING'):
    for _ in range(2):
      assert catalog.get_data_info(data).class_names == ('aa', 'b')
      assert catalog.valid_domains(data) == ('s', 't')
  assert _mtimes(prepared) == stamps and not _rebuild_warnings(caplog)  # not rewritten
  victim = next(e.path for e in entries if e.domain == 't')
  st = os.stat(victim)
  os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same name, same size
  with caplog.at_level('WARNING'):
    catalog.get_data_info(data)
  [warning] = _rebuild_warnings(caplog)
  assert '(image files changed (renamed, replaced or edited)); rebuilding' in warning


def test_a_prepared_dataset_without_a_record_of_its_tree_is_rebuilt(tmp_path, caplog):
  """Prepared by an older version (no SOURCE_FILE): it may be any tree, so it is rebuilt once."""
  tree = tmp_path / 'imgs'
  fx.make_domain_tree(str(tree), ('s', 't'), ('aa',), per_class=(1,))
  data = _custom(tree, tmp_path / 'tfds')
  catalog.get_data_info(data)
  os.remove(_prepared(tmp_path / 'tfds') / folder.SOURCE_FILE)
  with caplog.at_level('WARNING'):
    catalog.get_data_info(data)
    catalog.get_data_info(data)
  [warning] = _rebuild_warnings(caplog)
  assert '(no record of the tree it was prepared from); rebuilding' in warning
  assert folder.SOURCE_FILE in os.listdir(_prepared(tmp_path / 'tfds'))


def test_the_stored_label_names_are_the_folders_at_build_time(tmp_path):
  tree = tmp_path / 'imgs'
  entries = fx.make_domain_tree(str(tree), ('s', 't'), ('aa', 'b'), per_class=(1, 2))
  data = _custom(tree, tmp_path / 'tfds')
  info = catalog.get_data_info(data)
  stored = (_prepared(tmp_path / 'tfds') / 'label.labels.txt').read_text().split()
  folders = sorted(n for n in os.listdir(tree / 's') if not folder.is_hidden(n))
  assert stored == folders == list(info.class_names) == ['aa', 'b']
  # The tree changes; a builder of the prepared copy (not rebuilt: prepare=False) still names its
  # records by its own metadata, never by the folders as they are now.
  fx.make_domain_tree(str(tree), ('s', 't'), ('a0',), per_class=(1,), seed=2)  # sorts first
  builder = catalog.get_builder(data, 't', prepare=False)
  assert builder.is_prepared() and builder.info.features['label'].names == ['aa', 'b']
  assert builder.source_change() == 'classes +a0; images 6 -> 8'
  # The tree gone: the prepared copy is used as it is, with its own names.
  shutil.rmtree(tree)
  info = catalog.get_data_info(data)
  assert info.class_names == ('aa', 'b') and _labels(info) == _expected(entries)


# ---------------------------------------------------------------------------------------------
# 2. Symbolic-link loops and broken links in a tree
# ---------------------------------------------------------------------------------------------

_LINKS = {  # case: (link, target, expected one-line error; None: skipped with a warning)
  'folder_to_itself': (
    's/x',
    'x',
    r'{tree}/s/x is a symbolic link that loops \(Too many levels '
    r'of symbolic links\); remove the link$',
  ),
  'class_to_its_parent': (
    's/bb',
    '..',
    r'{tree}/s/bb is a symbolic link to {tree}, a folder '
    r'that holds it \(a loop\); remove the link',
  ),
  'image_to_itself': (
    's/aa/me.jpg',
    'me.jpg',
    r'image {tree}/s/aa/me.jpg is a broken symbolic '
    r'link \(to me.jpg: Too many levels of symbolic links\); fix or delete',
  ),
  'dangling_image': (
    's/aa/gone.jpg',
    'nowhere.jpg',
    r'image {tree}/s/aa/gone.jpg is a broken '
    r'symbolic link \(to nowhere.jpg: No such file or directory\); fix or '
    r'delete the link and run again$',
  ),
  'folder_in_a_class_to_its_parent': ('s/aa/loop', '..', None),
}


@pytest.mark.parametrize('case', sorted(_LINKS))
def test_a_symlink_loop_or_broken_link_is_one_line(tmp_path, caplog, capsys, case):
  link, target, error = _LINKS[case]
  tree = tmp_path / 'imgs'
  fx.make_domain_tree(str(tree), ('s', 't'), ('aa',), per_class=(2,))
  os.symlink(target, tree / link)
  data = _custom(tree, tmp_path / 'tfds')
  if error is None:  # a folder inside a class folder is no image: skipped, never followed
    with caplog.at_level('WARNING'):
      assert catalog.get_data_info(data).source.num_train == 2
    assert f"{tree}/s: skipped 1 non-image entries (e.g. ['aa/loop'])" in caplog.text
    return
  with pytest.raises(UserError, match='^' + error.format(tree=re.escape(str(tree)))) as e:
    catalog.get_data_info(data)
  assert '\n' not in str(e.value)
  assert not _prepared(tmp_path / 'tfds').exists()
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:  # what the CLI does with it
    cli.run_cli(catalog.get_data_info, data)
  err = capsys.readouterr().err  # (TFDS's progress bars write there too)
  assert exit_.value.code == 2 and 'Traceback' not in err
  assert [l for l in err.splitlines() if l.startswith('error:')] == [f'error: {e.value}']


def test_a_symlink_loop_in_the_manual_dir_is_one_line(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  os.symlink('.', manual / 'again')  # find_root would look into manual/again/again/...
  data = fx.get_data_config('office31')
  data.manual_dir, data.data_dir = str(manual), str(tmp_path / 'tfds')
  with pytest.raises(
    UserError,
    match=rf'^{re.escape(str(manual))}/again is a symbolic link to '
    rf'{re.escape(str(manual))}, a folder that holds it \(a loop\)',
  ):
    catalog.resolve_domain(data, 'amazon')


# ---------------------------------------------------------------------------------------------
# 3. A truncated dataset archive
# ---------------------------------------------------------------------------------------------


def _archive(tmp_path, dataset, kind):
  """A tiny tree of `dataset` packed as the downloaded archive, cut to half its bytes."""
  top, domains, classes, subdir = {
    'office31': ('domain_adaptation_images', ('amazon', 'dslr', 'webcam'), ('bike',), 'images'),
    'office_home': ('OfficeHomeDataset_10072016', fx.OFFICE_HOME_DOMAINS, ('Drill',), ''),
  }[dataset]
  tree = tmp_path / 'tree'
  fx.make_domain_tree(str(tree / top), domains, classes, subdir=subdir, per_class=(2,))
  manual = tmp_path / 'manual'
  manual.mkdir()
  path = manual / f'{top}.{kind}'
  if kind == 'zip':
    with zipfile.ZipFile(path, 'w') as z:
      for d, _, files in os.walk(tree):
        for f in files:
          z.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), tree))
  else:
    with tarfile.open(path, 'w:gz') as tar:
      tar.add(tree / top, arcname=top)
  shutil.rmtree(tree)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  config = fx.get_data_config(dataset)
  config.manual_dir, config.data_dir = str(manual), str(tmp_path / 'tfds')
  return config, path


@pytest.mark.parametrize('dataset,kind', [('office31', 'tar.gz'), ('office_home', 'zip')])
def test_a_truncated_archive_is_one_line_and_leaves_nothing_behind(tmp_path, capsys, dataset, kind):
  data, archive = _archive(tmp_path, dataset, kind)
  reason = {
    'zip': 'BadZipFile: File is not a zip file',
    'tar.gz': 'EOFError: Compressed file ended before the end-of-stream marker was reached',
  }
  with pytest.raises(UserError) as e:
    catalog.resolve_domain(data, data.source)
  assert str(e.value) == (
    f'cannot extract the archive {archive}: it is damaged or incomplete '
    f'({reason[kind]}); download it again, replace it and run again'
  )
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:  # a second attempt, through the CLI's handler
    cli.run_cli(catalog.resolve_domain, data, data.source)
  err = capsys.readouterr().err  # (TFDS's progress bars write there too)
  assert exit_.value.code == 2 and 'Traceback' not in err
  assert [l for l in err.splitlines() if l.startswith('error:')] == [f'error: {e.value}']
  left = [
    os.path.relpath(os.path.join(d, n), data.data_dir)
    for d, dirs, files in os.walk(data.data_dir)
    for n in dirs + files
  ]
  assert not [p for p in left if 'incomplete' in p], left
  assert os.listdir(os.path.join(data.data_dir, 'downloads', 'extracted')) == []
  assert not any(os.path.isfile(os.path.join(data.data_dir, p)) for p in left), left


# ---------------------------------------------------------------------------------------------
# 4. The advice for an unreadable image fits where it comes from
# ---------------------------------------------------------------------------------------------

_ARCHIVE_ADVICE = (
  'replace it with the file from the original archive (or delete it) and build the dataset again'
)
_CUSTOM_ADVICE = 'fix or delete the file and run again'


def test_an_unreadable_image_names_the_file_with_the_advice_of_its_dataset(tmp_path):
  path = tmp_path / 'bad.jpg'
  path.write_bytes(b'not an image at all')
  for custom, advice in ((False, _ARCHIVE_ADVICE), (True, _CUSTOM_ADVICE)):
    with pytest.raises(UserError) as e:
      folder.read_image_bytes(str(path), custom=custom)
    assert str(e.value) == (
      f'cannot read image {path} (UnidentifiedImageError: cannot identify image file); {advice}'
    )
  # Through the builders: the custom tree's advice never mentions an archive.
  tree = tmp_path / 'imgs'
  fx.make_domain_tree(str(tree), ('s', 't'), ('aa',), per_class=(1,))
  shutil.copy(path, tree / 't' / 'aa' / 'bad.jpg')
  with pytest.raises(
    UserError,
    match=rf'^cannot read image {re.escape(str(tree))}/t/aa/bad.jpg '
    rf'\(UnidentifiedImageError: cannot identify image file\); '
    rf'{_CUSTOM_ADVICE}$',
  ):
    catalog.get_data_info(_custom(tree, tmp_path / 'tfds'))
  manual = tmp_path / 'manual'
  fx.make_domain_tree(str(manual), fx.OFFICE_HOME_DOMAINS, ('Drill',), per_class=(1,))
  shutil.copy(path, manual / 'Art' / 'Drill' / 'bad.jpg')
  data = fx.get_data_config('office_home')
  data.manual_dir, data.data_dir = str(manual), str(tmp_path / 'tfds_oh')
  with pytest.raises(
    UserError,
    match=rf'^cannot read image {re.escape(str(manual))}/Art/Drill/'
    rf'bad.jpg \(.*\); {re.escape(_ARCHIVE_ADVICE)}$',
  ) as e:
    catalog.resolve_domain(data, 'Art')
  assert 'BytesIO' not in str(e.value)
