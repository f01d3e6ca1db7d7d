"""Prepared data under concurrency and changed trees, and the checks that read the data (issue 21).

- A live reader's prepared copy never changes or disappears while another process prepares the
  tree's new content, or another tree of the same folder name (real processes, several rounds).
- Processes preparing one dataset at once: one prepares, the others wait and reuse it (real
  processes, several rounds); two runs in one workdir: the one-line lock refusal, before any data
  is prepared.
- A workdir never resumes on another tree, or on its tree changed; a moved tree still resumes.
- Checks that need the data (split sizes, held-out counts) refuse before the workdir is written,
  and a workdir whose run saved no checkpoint accepts the corrected configuration.
- A full disk while preparing names the data folder, not the workdir.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from dsbn_jax import run_control
from dsbn_jax.datasets import catalog, folder
from tests import cli_driver, suite_env
from tests import data_fixtures as fx


def _data(tree, data_dir):
  data = fx.get_data_config('custom')
  data.manual_dir, data.data_dir, data.source, data.target = str(tree), str(data_dir), 's', 't'
  return data


def _copies(data_dir):
  base = os.path.join(data_dir, 'domain_folder')
  names = sorted(os.listdir(base)) if os.path.isdir(base) else []
  return [n for n in names if os.path.exists(os.path.join(base, n, '1.0.0', 'dataset_info.json'))]


def _tree(path, classes=('a', 'b', 'c'), per_class=3, seed=0):
  return fx.make_domain_tree(str(path), ('s', 't'), classes, per_class=(per_class,), seed=seed)


def _python(script: str, *args) -> subprocess.Popen:
  """A real process running ``script`` (this repository importable, one CPU device)."""
  return subprocess.Popen(
    [sys.executable, '-c', textwrap.dedent(script), *map(str, args)],
    cwd=suite_env.ROOT,
    env=suite_env.subprocess_env(1),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for(path, proc, timeout=120.0):
  t0 = time.monotonic()
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f'process ended ({proc.returncode}): {proc.communicate()[1][-3000:]}')
    assert time.monotonic() - t0 < timeout, f'no {path}'
    time.sleep(0.05)


# A process that reads its prepared copies as a run does (its evaluations iterate the records
# again each time), with the copies held by prepared.reading() as train_and_evaluate holds them.
_READER = """
  import contextlib, json, os, sys, time
  import tensorflow_datasets as tfds
  from dsbn_jax.datasets import catalog
  from tests import data_fixtures as fx
  try:
    from dsbn_jax.datasets import prepared
    held = prepared.reading()
  except ImportError:  # before issue 21
    held = contextlib.nullcontext()
  trees, data_dir, ready, rounds = sys.argv[1].split(','), sys.argv[2], sys.argv[3], int(sys.argv[4])

  def labels(info):
    ds = info.target.builder.as_dataset(
      split=info.target.eval_split, decoders={'image': tfds.decode.SkipDecoding()})
    return sorted((ex['file_name'].decode(), info.class_names[int(ex['label'])])
                  for ex in tfds.as_numpy(ds))

  with held:
    infos = []
    for tree in trees:
      data = fx.get_data_config('custom')
      data.manual_dir, data.data_dir, data.source, data.target = tree, data_dir, 's', 't'
      infos.append(catalog.get_data_info(data))
    first = [labels(i) for i in infos]
    open(ready, 'w').close()
    for r in range(rounds):
      while not os.path.exists(f'{ready}.go{r}'):
        time.sleep(0.02)
      try:
        same = [labels(i) for i in infos] == first
      except Exception as e:  # the records deleted under it
        same = repr(e)
      with open(f'{ready}.done{r}', 'w') as f:
        json.dump(same, f)
"""


def test_a_live_readers_copy_never_changes_while_other_contents_are_prepared(tmp_path):
  """Issue 21 item 1. Before: run B on ``v2/imgs`` rebuilt the copy run A on ``v1/imgs`` read (one
  copy per folder name), and A's later evaluations read v2's records (100 % -> 33.33 %, exit 0).
  Now each content has its own copy; the reader's copies are never deleted while it reads (each
  round prepares another content of its tree and tries to delete the outdated copies)."""
  data_dir = tmp_path / 'tfds'
  v1, v2 = tmp_path / 'v1' / 'imgs', tmp_path / 'v2' / 'imgs'
  _tree(v1)
  _tree(v2, classes=('x', 'y', 'z'), seed=1)
  rounds = 4
  ready = tmp_path / 'ready'
  reader = _python(_READER, str(v1), data_dir, ready, rounds)
  finished = False
  try:
    _wait_for(ready, reader)
    for r in range(rounds):
      if r == 0:  # the case: another tree with the same folder name
        assert catalog.get_data_info(_data(v2, data_dir)).class_names == ('x', 'y', 'z')
      else:  # the reader's own tree changes: a new image in a class, each round
        fx.write_image(str(v1 / 't' / 'b' / f'new{r}.png'), fx.random_image(100 + r, (16, 16)))
        assert catalog.get_data_info(_data(v1, data_dir)).target.num_eval == 9 + r
      (tmp_path / f'ready.go{r}').touch()
      _wait_for(tmp_path / f'ready.done{r}', reader)
      assert json.loads((tmp_path / f'ready.done{r}').read_text()) is True, r
    finished = True
  finally:
    if not finished:
      reader.kill()  # a failed round: never leave it waiting for the next one
    out, err = reader.communicate(timeout=120)
  assert reader.returncode == 0, err[-3000:]
  # v1's first copy outlived the newer contents of its tree while read (each intermediate one,
  # read by no process, was deleted once outdated); unread now, the next start deletes it.
  assert len(_copies(data_dir)) == 3
  catalog.get_data_info(_data(v1, data_dir))
  assert len(_copies(data_dir)) == 2


# Processes that prepare the same fresh data_dir at the same moment, round after round.
_PREPARER = """
  import json, os, sys, time
  from dsbn_jax.datasets import catalog
  from tests import data_fixtures as fx
  tree, root, me, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
  open(os.path.join(root, f'ready{me}'), 'w').close()
  for r in range(rounds):
    while not os.path.exists(os.path.join(root, f'go{r}')):
      time.sleep(0.005)
    kind = 'digits' if r == 0 else 'custom'
    data = fx.get_data_config(kind)
    data.data_dir = os.path.join(root, f'tfds{r}')
    if kind == 'custom':
      data.manual_dir, data.source, data.target = tree, 's', 't'
    info = catalog.get_data_info(data)
    print('RESULT', json.dumps([r, info.class_names, info.source.num_train, info.target.num_eval]))
"""


def test_processes_preparing_one_dataset_at_once_prepare_it_once(tmp_path):
  """Issue 21 item 8. Before: two seeds started together on a fresh machine both prepared, and one
  died with TFDS's ``FileExistsError`` traceback. Three processes start each round's preparation
  at once (round 0: the embedded Digits; then a custom tree): all exit 0 with the same dataset,
  and each round's dataset is prepared by one of them."""
  tree = tmp_path / 'imgs'
  _tree(tree)
  rounds, n = 4, 3
  procs = [_python(_PREPARER, tree, tmp_path, i, rounds) for i in range(n)]
  try:
    for i, p in enumerate(procs):
      _wait_for(tmp_path / f'ready{i}', p)
    for r in range(rounds):
      (tmp_path / f'go{r}').touch()
    results = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  seen = set()
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0 and 'Traceback' not in err, err[-3000:]
    rows = [json.loads(l[len('RESULT ') :]) for l in out.splitlines() if l.startswith('RESULT ')]
    assert [row[0] for row in rows] == list(range(rounds))
    seen.add(json.dumps(rows))
  assert len(seen) == 1  # the same classes and sizes in every process
  for r in range(rounds):
    prepared_lines = [
      l
      for _, err in results
      for l in err.splitlines()
      if l.startswith('preparing the ') and f'tfds{r}/' in l
    ]
    assert len(prepared_lines) == (2 if r == 0 else 1), (r, prepared_lines)  # digits: 2 builders


def test_a_second_run_in_a_live_workdir_is_refused_before_any_data_is_prepared(tmp_path):
  """Issue 21 item 8: the workdir lock is taken before data preparation."""
  tree, data_dir, workdir = tmp_path / 'imgs', tmp_path / 'tfds', tmp_path / 'run'
  _tree(tree)
  workdir.mkdir()
  holder = run_control.WorkdirLock(str(workdir))
  holder.acquire()  # a live run (another open file: flock refuses this process too)
  try:
    result = cli_driver.run_main(workdir, data_dir, *_custom_flags(tree))
  finally:
    holder.release()
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'is in use by a running run' in result.stderr
  assert not _copies(data_dir)  # nothing prepared
  assert sorted(os.listdir(workdir)) == ['.lock']


def _custom_flags(tree, *more):
  return (
    '--config.data.dataset=custom',
    f'--config.data.manual_dir={tree}',
    '--config.data.source=s',
    '--config.data.target=t',
    *more,
  )


def _files(root):
  return {
    os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read()
    for d, _, files in os.walk(root)
    for f in files
  }


@pytest.fixture(scope='module')
def custom_run(tmp_path_factory):
  """A finished smoke run on a custom tree (3 classes, 9 images per domain): (tree, data_dir,
  workdir, results)."""
  root = tmp_path_factory.mktemp('custom_run')
  tree, data_dir, workdir = root / 'imgs', root / 'tfds', root / 'run'
  _tree(tree)
  result = cli_driver.run_main(workdir, data_dir, *_custom_flags(tree))
  assert result.returncode == 0, result.stderr[-3000:]
  return tree, data_dir, workdir, json.loads((workdir / 'results.json').read_text())


@pytest.mark.parametrize('case', ['other_images', 'other_classes', 'images_added'])
def test_a_workdir_never_resumes_on_other_images(custom_run, tmp_path, case):
  """Issue 21 items 2 and 3. Before: a stopped workdir re-run with another tree of the same class
  count resumed (classes.json rewritten a,b,c -> x,y,z, evals mixing both datasets); a finished run
  re-run after images were added to the target wrote best_accuracy 55.56 at step 4 beside an
  evals entry of 47.62 at step 4, exit 0. Now: one line, nothing changed."""
  tree, data_dir, finished, _ = custom_run
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  before = _files(workdir)
  other = tmp_path / 'imgs'
  if case == 'images_added':
    shutil.copytree(tree, other)
    fx.write_image(str(other / 't' / 'a' / 'new.png'), fx.random_image(99, (16, 16)))
  else:
    _tree(other, classes=('a', 'b', 'c') if case == 'other_images' else ('x', 'y', 'z'), seed=5)
  result = cli_driver.run_main(workdir, data_dir, *_custom_flags(other))
  assert result.returncode == 2, result.stderr[-3000:]
  [line] = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert (
    f'error: workdir {workdir} holds a run trained on other images: the custom tree {other}'
    in (line)
  )
  assert 'choose a new --workdir (nothing was changed in this one)' in line
  # Every file keeps its bytes but the lock's holder line (the lock is taken before the data is
  # read: the tree's digest is known only then).
  assert _files(workdir).keys() == before.keys()
  assert {k: v for k, v in _files(workdir).items() if k != '.lock'} == {
    k: v for k, v in before.items() if k != '.lock'
  }


def test_a_moved_tree_resumes_its_workdir(custom_run, tmp_path):
  """The tree's identity is its content, not its path: a moved, identical tree resumes."""
  tree, data_dir, finished, results = custom_run
  workdir, moved = tmp_path / 'run', tmp_path / 'elsewhere' / 'pictures'
  shutil.copytree(finished, workdir)
  shutil.copytree(tree, moved)
  result = cli_driver.run_main(workdir, data_dir, *_custom_flags(moved))
  assert result.returncode == 0, result.stderr[-3000:]
  again = json.loads((workdir / 'results.json').read_text())
  assert [e['accuracy'] for e in again['evals']] == [e['accuracy'] for e in results['evals']]
  assert (
    json.loads((workdir / 'config.json').read_text())['data']['dataset_digest']
    == (json.loads((finished / 'config.json').read_text())['data']['dataset_digest'])
  )


@pytest.mark.parametrize(
  'flag,message',
  [
    ('--config.data.source_val_fraction=1e-9', 'holds out none of the 632 training images'),
    ('--config.data.source_val_fraction=0.999', 'fewer than one batch (8)'),
    ('--config.batch_size=700', 'has 632 training images per stream, fewer than one batch (700)'),
  ],
)
def test_checks_that_read_the_data_refuse_before_the_workdir_is_written(
  digits_data_dir, tmp_path, flag, message
):
  """Issue 21 item 6. Before: these failed after config.json and classes.json were written, and
  the corrected command was then refused as "another configuration"."""
  workdir = tmp_path / 'run'
  result = cli_driver.run_main(workdir, digits_data_dir, flag, '--config.total_steps=2')
  assert result.returncode == 2, result.stderr[-3000:]
  [line] = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert message in line and 'Traceback' not in result.stderr
  assert not workdir.exists()  # nothing of the run written (the folder its lock made is gone)
  result = cli_driver.run_main(workdir, digits_data_dir, '--config.total_steps=2')
  assert result.returncode == 0, result.stderr[-3000:]


def test_a_workdir_whose_run_saved_no_checkpoint_accepts_another_configuration(
  digits_data_dir, tmp_path
):
  """A run that stopped before its first checkpoint (here: a NaN loss at step 1) left only its
  config.json and logs: the corrected command (another optim.lr0) starts anew there, saying so."""
  workdir = tmp_path / 'run'
  result = cli_driver.run_main(
    workdir, digits_data_dir, '--config.total_steps=2', env={'DSBN_JAX_NAN_AT_STEP': 0}
  )
  assert result.returncode == 2 and 'no checkpoint had been written yet' in result.stderr
  result = cli_driver.run_main(
    workdir, digits_data_dir, '--config.total_steps=2', '--config.optim.lr0=0.005'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (
    f'workdir {workdir} holds a run of another configuration (optim.lr0: 0.01 -> 0.005) that saved '
    'no checkpoint: it starts anew with this one'
  ) in result.stdout
  assert json.loads((workdir / 'config.json').read_text())['optim']['lr0'] == 0.005
  # With a checkpoint, another configuration is refused as before.
  result = cli_driver.run_main(
    workdir, digits_data_dir, '--config.total_steps=2', '--config.optim.lr0=0.01'
  )
  assert result.returncode == 2 and 'holds a run of another configuration' in result.stderr


def test_a_full_disk_while_preparing_names_the_data_folder(tmp_path, monkeypatch):
  """Issue 21 item 13. Before: "disk full ... while writing in <workdir>", a folder that did not
  exist yet."""
  tree, data_dir, workdir = tmp_path / 'imgs', tmp_path / 'tfds', tmp_path / 'run'
  _tree(tree)

  def full(*args, **kwargs):  # the first image read while preparing: the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(folder, 'read_image_bytes', full)
  result = cli_driver.run_main(workdir, data_dir, *_custom_flags(tree))
  assert result.returncode == 2, result.stderr[-3000:]
  [line] = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert line == (
    f'error: disk full (No space left on device) while writing in {data_dir}; free some space, '
    'then run the same command again (the dataset is prepared from the start)'
  )
  assert not _copies(data_dir)
