"""Command-line inputs that used to give a wrong answer, hang, or a traceback (issue 21): duplicate
sweep runs, special files under ``predict --images`` or at ``--out``, a missing or broken
``--config``, a ``--out`` that cannot be written, a checkpoint pruned by its live run while
``predict`` reads it, and ``~`` in path flags.

In-process (tests/cli_driver.py); the work behind a refusal (training, the checkpoint, the model)
is replaced by stand-ins that fail the test if they are reached. A test that opens a named pipe
would block forever on the old code: ``unblocker`` opens its other end after a few seconds, so
such a test fails instead of hanging.
"""

import contextlib
import csv
import errno
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import threading
import time

import numpy as np
import pytest

from dsbn_jax import checkpointing, predict, run_control, sweep, train
from dsbn_jax.cli import run_cli
from dsbn_jax.errors import UserError
from tests import cli_driver
from tests import data_fixtures as fx

CONFIGS = os.path.dirname(cli_driver.SMOKE)


def _config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _one_error_line(result_or_err) -> str:
  err = getattr(result_or_err, "stderr", result_or_err)
  assert err.count("\n") == 1 and err.startswith("error: "), err[-3000:]
  assert "Traceback" not in err, err
  return err.strip()


def _no_work(*args, **kwargs):
  raise AssertionError("work started before the bad input was refused")


@contextlib.contextmanager
def unblocker(fifo, after: float = 3.0):
  """Within: if something opens the named pipe ``fifo`` to read (and blocks, waiting for a
  writer), its write end is opened and closed after ``after`` seconds, so the reader gets
  end-of-file and the test goes on; the yielded dict's ``fired`` says whether that happened."""
  state = {"fired": False}
  done = threading.Event()

  def run():
    deadline = time.monotonic() + after
    while not done.wait(0.05):
      if time.monotonic() < deadline:
        continue
      try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads
      except OSError:
        continue
      state["fired"] = True
      os.close(fd)

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  try:
    yield state
  finally:
    done.set()
    thread.join()


@pytest.fixture
def fake_run(monkeypatch):
  """predict.load_run replaced: the digits data config and a numpy model (no checkpoint)."""
  config = type("Config", (), {"data": fx.get_data_config("digits")})()

  def model(batch):
    n = len(batch["image"])
    return {"probs": np.tile([0.6, 0.3, 0.1], (n, 1))}

  monkeypatch.setattr(
    predict,
    "load_run",
    lambda workdir, checkpoint: (config, ["a", "b", "c"], lambda bs: map(model, bs)),
  )


def _csv_paths(path) -> list[str]:
  with open(path, newline="", encoding="utf-8") as f:
    return [row["path"] for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------
# 5. A sweep listing a run twice (seeds, methods, tasks; tasks by canonical domains)
# ---------------------------------------------------------------------------------------------


def test_sweep_refuses_duplicate_seeds_methods_or_tasks_before_anything_is_written(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(train, "train_and_evaluate", _no_work)
  root = tmp_path / "sweep"
  result = cli_driver.run(
    "sweep",
    [
      "sweep",
      f"--config={cli_driver.SMOKE}",
      f"--workdir={root}",
      "--methods=source_only",
      "--seeds=0,0",
    ],
  )
  assert result.returncode == 2, result.stderr[-3000:]
  line = _one_error_line(result)
  assert "seed 0 twice (--seeds or config.sweep.seeds)" in line, line
  assert not root.exists()
  smoke = _config("smoke")
  cases = [
    (
      ["digits->digits_m"],
      ["alda_dsbn", "source_only", "alda_dsbn"],
      [1, 2],
      "method alda_dsbn twice",
    ),
    (
      ["digits->digits_m", "DIGITS->Digits_M"],
      ["alda_dsbn"],
      [0],
      "task 'digits->digits_m' = 'DIGITS->Digits_M'",
    ),
    (["digits->digits_m"], ["alda_dsbn"], [3, 3, 3], "seed 3 3 times"),
  ]
  for tasks, methods, seeds, expected in cases:
    with pytest.raises(UserError) as e:
      sweep.run_sweep(smoke, str(root), tasks, methods, seeds)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not root.exists()
  # office31: 'A->W' is 'amazon->webcam' (abbreviations), refused before its data is looked for
  with pytest.raises(UserError, match=r"task 'A->W' = 'amazon->webcam' twice \(--tasks or"):
    sweep.run_sweep(_config("office31"), str(root), ["A->W", "amazon->webcam"], ["alda_dsbn"], [0])
  assert not root.exists()


# ---------------------------------------------------------------------------------------------
# 7. predict reads regular files only, the image names training reads, hidden ones skipped
# ---------------------------------------------------------------------------------------------


def test_predict_never_blocks_on_a_named_pipe_among_the_images(tmp_path, fake_run, capsys):
  images = tmp_path / "images"
  fx.write_image(str(images / "a.png"), fx.random_image(0, (32, 32)))
  os.mkfifo(images / "b.png")
  out = tmp_path / "p.csv"
  with unblocker(images / "b.png") as state:
    n = predict.predict_folder("unused", str(images), str(out))
  assert not state["fired"], "predict opened the named pipe b.png and waited for a writer"
  assert n == 1 and _csv_paths(out) == ["a.png"]
  assert f"warning: skipped {images / 'b.png'}: a named pipe" in capsys.readouterr().err
  # one put there after the listing is refused when it is read, without blocking either
  os.remove(images / "b.png")
  os.mkfifo(images / "c.png")
  with unblocker(images / "c.png") as state, pytest.raises(OSError, match="a named pipe"):
    predict.read_image(str(images / "c.png"))
  assert not state["fired"]


def test_predict_refuses_a_named_pipe_as_out_or_in_the_workdir_without_blocking(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(predict, "load_run", _no_work)
  images = tmp_path / "images"
  fx.write_image(str(images / "a.png"), fx.random_image(0, (32, 32)))
  out = tmp_path / "p.csv"
  os.mkfifo(out)
  with unblocker(out) as state, pytest.raises(UserError) as e:
    predict.predict_folder("unused", str(images), str(out))
  assert not state["fired"], "predict opened the named pipe --out and waited for a writer"
  assert str(e.value).startswith(f"--out={out} exists and is a named pipe, not a file")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "classes.json").write_text('["a"]')
  os.mkfifo(workdir / "config.json")
  with unblocker(workdir / "config.json") as state, pytest.raises(UserError) as e:
    predict.read_run_checkpoint(str(workdir))
  assert not state["fired"]
  assert str(e.value).startswith(f"{workdir / 'config.json'} is a named pipe, not the file")


def test_predict_lists_the_image_names_training_reads_and_skips_hidden_files_and_folders(
  tmp_path, monkeypatch
):
  from dsbn_jax.datasets import decode  # pylint: disable=g-import-not-at-top

  root = tmp_path / ".hidden_parent" / "images"  # --images itself may be anywhere
  visible = [f"x{suffix}" for suffix in decode.IMAGE_SUFFIXES] + ["UPPER.PNG", "sub/y.jpg"]
  hidden = [".x.png", "._x.jpg", ".cache/z.png", "__MACOSX/x.png", "sub/__MACOSX/._y.jpg"]
  hidden += ["sub/.git/w.png", "Thumbs.db", "notes.txt", "x.tif"]
  for name in visible + hidden:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(b"any")
  names = lambda: sorted(os.path.relpath(p, root) for p in predict.list_images(str(root)))  # noqa: E731
  assert names() == sorted(visible)
  monkeypatch.setattr(decode, "IMAGE_SUFFIXES", (".jpg",))  # the one list training reads too
  assert names() == ["sub/y.jpg", "x.jpg"]


# ---------------------------------------------------------------------------------------------
# 11. --config: a missing or unreadable file is one line; an error in it is Python's, alone
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["main", "sweep"])
def test_a_missing_config_file_is_one_line_in_every_entry_point(entry, tmp_path):
  for config, expected in [
    (tmp_path / "nope.py", "no such file"),
    (tmp_path, "is a folder, not a config file"),
  ]:
    result = cli_driver.run(entry, [entry, f"--config={config}", f"--workdir={tmp_path / 'w'}"])
    assert result.returncode == 2, result.stderr[-3000:]
    line = _one_error_line(result)
    assert line.startswith(f"error: --config={config}") and expected in line, line
  assert not (tmp_path / "w").exists()


def test_an_unreadable_config_or_a_named_pipe_is_one_line(tmp_path, monkeypatch):
  config = tmp_path / "locked.py"
  config.write_text(open(cli_driver.SMOKE).read())
  real = importlib.machinery.SourceFileLoader.get_data

  def get_data(self, path):  # what a file without read permission gives (root reads anything)
    if os.path.abspath(path) == str(config):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return real(self, path)

  monkeypatch.setattr(importlib.machinery.SourceFileLoader, "get_data", get_data)
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  result = cli_driver.run("main", ["main", f"--config={config}"])
  assert result.returncode == 2, result.stderr[-3000:]
  assert _one_error_line(result) == (
    f"error: --config={config} cannot be read (Permission denied); check the file and its "
    "permissions"
  )
  monkeypatch.undo()
  pipe = tmp_path / "pipe.py"
  os.mkfifo(pipe)
  with unblocker(pipe) as state:
    result = cli_driver.run("main", ["main", f"--config={pipe}"])
  assert not state["fired"], "the named pipe given as --config was opened and waited on"
  assert result.returncode == 2 and "is not a regular file" in _one_error_line(result)


@pytest.mark.parametrize(
  "case,source,expected",
  [
    ("syntax", "# a config\ndef get_config(:\n  pass\n", "SyntaxError: invalid syntax"),
    ("name", "def get_config():\n  return nope\n", "NameError: name 'nope' is not defined"),
    (
      "value",
      "def get_config():\n  return int('x')\n",  # ml_collections re-raises a ValueError
      "ValueError: invalid literal for int() with base 10: 'x'",
    ),
  ],
)
def test_an_error_in_the_config_file_is_pythons_report_without_our_frames(
  case, source, expected, tmp_path, monkeypatch
):
  config = tmp_path / f"{case}.py"
  config.write_text(source)
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  result = cli_driver.run("main", ["main", f"--config={config}"])
  assert result.returncode == 2, result.stderr[-3000:]
  err = result.stderr
  assert err.startswith(f"error: --config={config} failed; the error in it:\n"), err
  assert f'File "{config}", line 2' in err and err.rstrip().endswith(expected), err
  for ours in ("absl", "ml_collections", "dsbn_jax", "importlib", "frozen"):
    assert ours not in err.split("\n", 1)[1], err


def test_a_config_without_get_config_or_returning_none_is_one_line(tmp_path, monkeypatch):
  for source, expected in [
    ("x = 1\n", "defines no get_config()"),
    ("def get_config():\n  pass\n", "get_config() returned NoneType, not a"),
  ]:
    config = tmp_path / "c.py"
    config.write_text(source)
    monkeypatch.delitem(sys.modules, "config_config", raising=False)
    result = cli_driver.run("main", ["main", f"--config={config}"])
    assert result.returncode == 2 and expected in _one_error_line(result), result.stderr


# ---------------------------------------------------------------------------------------------
# 12. predict --out that cannot be written: refused before any image is classified
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["under_a_file", "empty", "read_only", "proc", "trailing_slash"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(
  case, tmp_path, monkeypatch, capsys
):
  for name in ("load_run", "list_images", "read_image"):
    monkeypatch.setattr(predict, name, _no_work)
  afile = tmp_path / "somefile.txt"
  afile.write_text("mine")
  out, expected = {
    "under_a_file": (
      f"{afile}/p.csv",
      f"--out={afile}/p.csv cannot be created: {afile} is a file, not a folder; choose a new --out",
    ),
    "empty": ("", "--out= is empty; give the CSV file to write"),
    "read_only": (
      str(tmp_path / "ro" / "p.csv"),
      f"--out={tmp_path}/ro/p.csv is not writable (it would be created in {tmp_path}): "
      "Read-only file system; choose a writable --out",
    ),
    "proc": ("/proc/p.csv", "--out=/proc/p.csv is not writable (it would be created in /proc)"),
    "trailing_slash": (f"{tmp_path}/new/", f"--out={tmp_path}/new/ is a folder"),
  }[case]
  if case == "read_only":  # a read-only filesystem (what stops root too), at the probe file
    monkeypatch.setattr(
      run_control,
      "_write_probe",
      lambda folder: (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS))),
    )
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(SystemExit) as e:
    run_cli(predict.predict_folder, "unused", str(tmp_path / "images"), out)
  assert e.value.code == 2
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith(f"error: {expected}"), line
  assert sorted(os.listdir(tmp_path)) == before and afile.read_text() == "mine"


def test_predict_command_with_an_empty_out_is_one_line(tmp_path, monkeypatch):
  for name in ("load_run", "list_images", "read_image"):
    monkeypatch.setattr(predict, name, _no_work)
  result = cli_driver.run(
    "predict", ["predict", f"--workdir={tmp_path}", f"--images={tmp_path}", "--out="]
  )
  assert result.returncode == 2 and "--out= is empty" in _one_error_line(result), result.stderr


# ---------------------------------------------------------------------------------------------
# 14. predict beside a live run: a checkpoint its run pruned while it was read is not damaged
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_pruned_by_its_run_while_read_is_not_damage(
  smoke_run, tmp_path, monkeypatch, capsys
):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_run[0], workdir)
  ckpts = workdir / checkpointing.ROLLING_DIR
  *_, old, new = checkpointing.saved_steps(str(workdir))
  for step in checkpointing.saved_steps(str(workdir))[:-2]:
    shutil.rmtree(ckpts / str(step))
  shutil.move(ckpts / str(new), tmp_path / "saved_later")  # not written yet when predict lists
  real_restore = checkpointing.ocp.CheckpointManager.restore
  reads = []

  def restore(self, step, *args, **kwargs):
    reads.append(step)
    if len(reads) == 1:  # the live run saves a newer step and prunes this one (keep_checkpoints=1)
      shutil.move(tmp_path / "saved_later", ckpts / str(new))
      shutil.rmtree(ckpts / str(step))
    return real_restore(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "restore", restore)
  capsys.readouterr()
  _, _, step, _, _ = predict.read_run_checkpoint(str(workdir))
  assert (step, reads) == (new, [old, new])
  assert "damaged" not in capsys.readouterr().err
  # a checkpoint that fails while its folder is still there is damaged: no retry, as before
  reads.clear()

  def damaged(self, step, *args, **kwargs):
    reads.append(step)
    raise ValueError("bytes flipped")

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "restore", damaged)
  with pytest.raises(
    UserError, match=rf"checkpoint .*/{new} is damaged \(ValueError: bytes flipped\)"
  ):
    predict.read_run_checkpoint(str(workdir))
  assert reads == [new]  # read once (the only step left), then the one-line error


# ---------------------------------------------------------------------------------------------
# 15. ~ in every path flag is the home folder
# ---------------------------------------------------------------------------------------------


def test_tilde_in_path_flags_is_the_home_folder(tmp_path, monkeypatch):
  home = tmp_path / "home"
  home.mkdir()
  shutil.copy(cli_driver.SMOKE, home / "smoke.py")
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(tmp_path)
  seen = {}

  def record(name):
    def fn(*args):
      seen[name] = args
      raise UserError("stop here")

    return fn

  monkeypatch.setattr(train, "train_and_evaluate", record("main"))
  monkeypatch.setattr(sweep, "run_sweep", record("sweep"))
  monkeypatch.setattr(predict, "predict_folder", record("predict"))
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  result = cli_driver.run("main", ["main", "--config=~/smoke.py", "--workdir=~/run"])
  assert result.stderr.strip() == "error: stop here", result.stderr[-3000:]
  config, workdir = seen["main"]
  assert workdir == str(home / "run") and config.total_steps == 6
  result = cli_driver.run("sweep", ["sweep", "--config", "~/smoke.py", "--workdir", "~/sw"])
  assert result.stderr.strip() == "error: stop here", result.stderr[-3000:]
  assert seen["sweep"][1] == str(home / "sw")
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text("--out=~/p.csv\n")
  result = cli_driver.run(
    "predict",
    ["predict", "--workdir=~/run", "--images=~/images", f"--flagfile={flagfile}"],
  )
  assert result.stderr.strip() == "error: stop here", result.stderr[-3000:]
  assert seen["predict"][:3] == (str(home / "run"), str(home / "images"), str(home / "p.csv"))
  assert not (tmp_path / "~").exists()
