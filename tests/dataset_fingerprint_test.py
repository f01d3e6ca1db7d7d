"""No silent wrong answers from the data: a prepared custom dataset is the tree's content as it is
now (changed -- even with sizes and modification times kept -- or another tree with the same
folder name get their own copy), class names that a prepared dataset cannot store, symbolic-link
loops in a tree, a truncated dataset archive, and the advice given for an unreadable image.

Everything is in-process on tiny generated trees (a few images of a few pixels).
"""

import os
import re
import shutil
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from dsbn_jax import cli
from dsbn_jax.datasets import catalog, folder
from dsbn_jax.errors import UserError
from tests import data_fixtures as fx

_CHANGED = 'changed since it was prepared'


def _custom(tree, data_dir, source='s', target='t'):
  data = fx.get_data_config('custom')
  data.manual_dir, data.data_dir = str(tree), str(data_dir)
  data.source, data.target = source, target
  return data


def _copies(data_dir):
  """{config name: version folder} of every prepared custom copy in ``data_dir``."""
  base = data_dir / 'domain_folder'
  names = sorted(os.listdir(base)) if base.is_dir() else []
  return {
    n: base / n / '1.0.0' for n in names if (base / n / '1.0.0' / 'dataset_info.json').exists()
  }


def _labels(info):
  """{file_name: class name} of every target example, by the dataset's own class names."""
  ds = info.target.builder.as_dataset(
    split=info.target.eval_split, decoders={'image': tfds.decode.SkipDecoding()}
  )
  return {ex['file_name'].decode(): info.class_names[int(ex['label'])] for ex in tfds.as_numpy(ds)}


def _expected(entries, domain='t'):
  return {e.rel: e.class_name for e in entries if e.domain == domain}


def _change_warnings(caplog):
  return [r.getMessage() for r in caplog.records if _CHANGED in r.getMessage()]


def _mtimes(path):
  return {n: os.stat(path / n).st_mtime_ns for n in sorted(os.listdir(path))}


# ---------------------------------------------------------------------------------------------
# 1. A prepared custom dataset is the tree's content as it is now: one copy per content
# ---------------------------------------------------------------------------------------------


def test_adding_a_class_folder_prepares_a_new_copy_and_shows_the_new_class(tmp_path, caplog):
  tree = tmp_path / 'imgs'
  entries = fx.make_domain_tree(str(tree), ('s', 't'), ('aa',), per_class=(2,))
  data = _custom(tree, tmp_path / 'tfds')
  before = catalog.get_data_info(data)
  assert before.class_names == ('aa',) and before.source.num_train == 2
  [old] = _copies(tmp_path / 'tfds')
  assert old == f'imgs_{before.digest[:12]}'
  entries += fx.make_domain_tree(str(tree), ('s', 't'), ('b',), per_class=(3,), seed=1)
  with caplog.at_level('WARNING'):
    info = catalog.get_data_info(data)
  assert info.digest != before.digest
  [new] = _copies(tmp_path / 'tfds')  # the old copy, read by no process, was deleted
  assert _change_warnings(caplog) == [
    f'custom dataset {tree} {_CHANGED} (classes +b; images 4 -> 10); preparing the new content '
    f'in {_copies(tmp_path / "tfds")[new]} (the old copy is deleted once no run reads it)'
  ]
  assert info.class_names == ('aa', 'b')
  assert (info.source.num_train, info.target.num_eval) == (5, 5)
  assert _labels(info) == _expected(entries)  # every b image is b, not aa


def test_two_trees_with_the_same_folder_name_each_read_their_own(tmp_path, caplog):
  v1 = fx.make_domain_tree(str(tmp_path / 'v1' / 'imgs'), ('s', 't'), ('aa',), per_class=(2,))
  v2 = fx.make_domain_tree(
    str(tmp_path / 'v2' / 'imgs'), ('s', 't'), ('b', 'c'), per_class=(1,), seed=1
  )
  stamps = {}
  with caplog.at_level('WARNING'):
    for version, entries, classes in (
      ('v1', v1, ('aa',)),
      ('v2', v2, ('b', 'c')),
      ('v1', v1, ('aa',)),
      ('v2', v2, ('b', 'c')),
    ):
      info = catalog.get_data_info(_custom(tmp_path / version / 'imgs', tmp_path / 'tfds'))
      assert info.class_names == classes, version
      assert _labels(info) == _expected(entries), version
      copy = _copies(tmp_path / 'tfds')[f'imgs_{info.digest[:12]}']
      assert stamps.setdefault(version, _mtimes(copy)) == _mtimes(copy)  # reused, not rebuilt
  assert len(_copies(tmp_path / 'tfds')) == 2 and not _change_warnings(caplog)


def _same_size_images(tree, n):
  """``n`` uncompressed 16x16 BMPs per class of ``s`` and ``t`` (classes ``aa`` and ``b``): every
  file has the same size, so two of them can swap contents with their sizes and mtimes kept."""
  rng = np.random.default_rng(0)
  entries = []
  for d in ('s', 't'):
    for k, c in enumerate(('aa', 'b')):
      for i in range(n):
        path = tree / d / c / f'{i}.bmp'
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(rng.normal(60 + 120 * k, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(path, format='BMP')
        entries.append(fx.Entry(d, c, f'{c}/{i}.bmp', str(path), 'RGB'))
  return entries


def test_touch_rebuilds_nothing_and_contents_swapped_with_size_and_mtime_kept_are_seen(
  tmp_path, caplog
):
  """Issue 21 item 4: ``cp -p``-style swaps (same sizes, same modification times) of image pairs
  between classes are a new content; ``touch`` on an unchanged image is not."""
  tree = tmp_path / 'imgs'
  entries = _same_size_images(tree, 4)
  data = _custom(tree, tmp_path / 'tfds')
  first = catalog.get_data_info(data)
  [copy] = _copies(tmp_path / 'tfds').values()
  stamps = _mtimes(copy)
  for e in entries[:2]:
    os.utime(e.path)  # touch: a new mtime, the same bytes
  with caplog.at_level('WARNING'):
    assert catalog.get_data_info(data).digest == first.digest
  assert _mtimes(copy) == stamps and not _change_warnings(caplog)  # nothing prepared again
  for i in range(4):  # t/aa/i.bmp <-> t/b/i.bmp, each keeping its size and modification time
    a, b = tree / 't' / 'aa' / f'{i}.bmp', tree / 't' / 'b' / f'{i}.bmp'
    st_a, st_b = os.stat(a), os.stat(b)
    assert st_a.st_size == st_b.st_size
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    os.utime(a, ns=(st_a.st_atime_ns, st_a.st_mtime_ns))
    os.utime(b, ns=(st_b.st_atime_ns, st_b.st_mtime_ns))
  with caplog.at_level('WARNING'):
    info = catalog.get_data_info(data)
  assert info.digest != first.digest
  assert [
    '(image files changed (renamed, moved to another class, replaced or edited))' in w
    for w in _change_warnings(caplog)
  ] == [True]
  ds = info.target.builder.as_dataset(split='t')
  by_brightness = {
    ex['file_name'].decode(): ('aa', 'b')[int(ex['image'].mean() > 120)] for ex in tfds.as_numpy(ds)
  }
  # The records hold the new bytes: each swapped file now shows the other class's image (a stale
  # copy would still hold its old one), under its folder's label.
  assert _labels(info) == {k: k.split('/')[0] for k in by_brightness}
  assert by_brightness == {k: ('b' if k.startswith('aa') else 'aa') for k in by_brightness}


def test_an_old_copy_named_after_the_folder_is_not_read_and_is_deleted(tmp_path):
  """A copy prepared by an earlier version (named after the folder alone, recording file stats)
  may be any content: never read; deleted once the tree's copy is prepared."""
  tree = tmp_path / 'imgs'
  entries = fx.make_domain_tree(str(tree), ('s', 't'), ('aa', 'b'), per_class=(1, 2))
  data = _custom(tree, tmp_path / 'tfds')
  catalog.get_data_info(data)
  [(name, copy)] = _copies(tmp_path / 'tfds').items()
  os.rename(copy.parent, copy.parent.parent / 'imgs')  # the earlier name
  (copy.parent.parent / 'imgs' / '1.0.0' / 'label.labels.txt').write_text('b\naa\n')  # stale
  info = catalog.get_data_info(data)
  assert list(_copies(tmp_path / 'tfds')) == [name]
  assert info.class_names == ('aa', 'b') and _labels(info) == _expected(entries)


def test_the_stored_label_names_are_the_folders_at_build_time(tmp_path):
  tree = tmp_path / 'imgs'
  entries = fx.make_domain_tree(str(tree), ('s', 't'), ('aa', 'b'), per_class=(1, 2))
  data = _custom(tree, tmp_path / 'tfds')
  info = catalog.get_data_info(data)
  [copy] = _copies(tmp_path / 'tfds').values()
  stored = (copy / 'label.labels.txt').read_text().split()
  folders = sorted(n for n in os.listdir(tree / 's') if not folder.is_hidden(n))
  assert stored == folders == list(info.class_names) == ['aa', 'b']
  # The tree changes: a builder of it now is another, unprepared copy with the new classes.
  fx.make_domain_tree(str(tree), ('s', 't'), ('a0',), per_class=(1,), seed=2)  # sorts first
  builder = catalog.get_builder(data, 't', prepare=False)
  assert not builder.is_prepared() and builder.info.features['label'].names == ['a0', 'aa', 'b']
  # The tree gone: its prepared copy is used as it is, with its own names.
  shutil.rmtree(tree)
  info = catalog.get_data_info(data)
  assert info.class_names == ('aa', 'b') and _labels(info) == _expected(entries)


def test_class_folders_differing_only_by_surrounding_spaces_are_refused_before_preparing(
  tmp_path, capsys
):
  """Issue 21 item 10: ``cat`` and ``cat `` prepared, then every later run failed (TFDS strips the
  stored names: two classes named ``cat``)."""
  tree = tmp_path / 'imgs'
  fx.make_domain_tree(str(tree), ('s', 't'), ('cat', 'cat ', 'dog'), per_class=(1,))
  data = _custom(tree, tmp_path / 'tfds')
  message = (
    f"class folder(s) ['cat '] in {tree}/s begin or end with white space or hold a line break; "
    'a prepared dataset stores class names without them (the name would change, or clash with '
    'another folder); rename it and run again'
  )
  for _ in range(2):
    with pytest.raises(UserError) as e:
      catalog.get_data_info(data)
    assert str(e.value) == message
  assert not (tmp_path / 'tfds' / 'domain_folder').exists()  # nothing prepared
  with pytest.raises(UserError, match=r"^invalid config.data.source='s'|^class folder"):
    from dsbn_jax import config_check  # pylint: disable=g-import-not-at-top

    config = fx.get_config('custom')
    config.data = data
    config_check.validate(config)
  os.rename(tree / 's' / 'cat ', tree / 's' / 'kitten')
  os.rename(tree / 't' / 'cat ', tree / 't' / 'kitten')
  assert catalog.get_data_info(data).class_names == ('cat', 'dog', 'kitten')


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
  assert not _copies(tmp_path / 'tfds')
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
  files = [p for p in left if os.path.isfile(os.path.join(data.data_dir, p))]
  assert [os.path.dirname(p) for p in files] == ['.dsbn_jax/locks'], left  # only the lock file


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
