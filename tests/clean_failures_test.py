"""Clean failures: an unwritable workdir, a full disk, truncated metrics.jsonl / results.json.

Each fault gives one ``error: ...`` line on stderr and exit status 2 through ``cli.run_cli`` (what
``dsbn_jax.main``, ``dsbn_jax.sweep`` and ``dsbn_jax.predict`` wrap their work in), never a
traceback; or, where a crash leaves the damage, the run recovers with a ``warning:`` line.
Everything runs in-process on configs/smoke.py; one smoke workdir goes through a chain of faults
(disk full in its first checkpoint, then in metrics.jsonl, then in results.json; a truncated
metrics line and a truncated results.json on the way) and finishes. The real-checkpoint case
(orbax on a full tmpfs) was checked by hand, not here: it needs a small filesystem.
"""

import errno
import io
import json
import os
import shutil
import stat

import jax
import pytest

from dsbn_jax import checkpointing, cli, reporting, run_control, sharding, sweep, train
from dsbn_jax.errors import UserError
from tests.silent_answers_test import _smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _cli(capsys, fn, *args) -> tuple[int, str, str]:
  """``cli.run_cli(fn, *args)``: (exit status, the error line, all of stderr)."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    cli.run_cli(fn, *args)
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert "Traceback" not in err, err
  assert [l for l in lines if l.startswith("error:")] == lines[-1:], err  # one line, the last
  return exit_.value.code, lines[-1], err


def _lock_is_free(workdir) -> bool:
  lock = run_control.WorkdirLock(str(workdir))
  try:
    lock.acquire()
  except UserError:
    return False
  lock.release()
  return True


# ---------------------------------------------------------------------------------------------
# 1. A workdir that is a file, or cannot be written: refused before data preparation
# ---------------------------------------------------------------------------------------------


def test_workdir_that_is_a_file_or_under_a_file_is_refused_before_data_preparation(
  tmp_path, capsys
):
  data_dir = tmp_path / "tfds"  # never created: the refusal comes before any data preparation
  afile = tmp_path / "a_file"
  afile.write_text("mine")
  for workdir, expected in [
    (afile, f"--workdir={afile} is a file, not a folder"),
    (afile / "run", (f"--workdir={afile}/run cannot be created: {afile} is a file, not a folder")),
  ]:
    rc, line, _ = _cli(capsys, train.train_and_evaluate, _smoke_config(data_dir), str(workdir))
    assert rc == 2 and line.startswith(f"error: {expected}; choose a new --workdir"), line
  assert afile.read_text() == "mine" and not data_dir.exists()
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


def _chmod_stops_writes(folder) -> bool:
  """Whether a folder without write permission refuses this process: not for root (euid 0 with
  CAP_DAC_OVERRIDE writes anywhere), whom the simulated cases below stand for."""
  probe = folder / "chmod_probe"
  probe.mkdir()
  probe.chmod(stat.S_IRUSR | stat.S_IXUSR)
  try:
    (probe / "x").write_text("")
  except PermissionError:
    return True
  finally:
    probe.chmod(0o700)
    shutil.rmtree(probe)
  return False


def test_workdir_without_write_permission_is_refused_before_anything_is_written(tmp_path, capsys):
  if not _chmod_stops_writes(tmp_path):
    pytest.skip(
      f"euid {os.geteuid()} writes through chmod 0500 (root): the simulated cases of "
      "test_read_only_workdir_or_parent_... and test_unwritable_..._simulated cover it"
    )
  data_dir = tmp_path / "tfds"
  locked = tmp_path / "locked"
  locked.mkdir()
  (locked / "run").mkdir()
  locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
  (locked / "run").chmod(stat.S_IRUSR | stat.S_IXUSR)
  try:
    for workdir, where in [
      (locked / "run", ""),
      (locked / "new" / "run", f" (it would be created in {locked})"),
    ]:
      rc, line, _ = _cli(capsys, train.train_and_evaluate, _smoke_config(data_dir), str(workdir))
      assert rc == 2 and line.startswith(
        f"error: --workdir={workdir} is not writable{where}: Permission denied"
      ), line
    assert sorted(os.listdir(locked)) == ["run"] and os.listdir(locked / "run") == []
  finally:
    (locked / "run").chmod(0o700)
    locked.chmod(0o700)
  assert not data_dir.exists()


def test_read_only_workdir_or_parent_is_refused_before_anything_is_written(
  tmp_path, capsys, monkeypatch
):
  """A read-only filesystem (what ``os.access`` does not see, and what stops root too), simulated
  at the probe file; for a new workdir the probe is in its parent. A full disk at the probe is
  ``disk full``."""
  data_dir = tmp_path / "tfds"
  probed = []

  def read_only(folder):
    probed.append(folder)
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(folder, "probe"))

  monkeypatch.setattr(run_control, "_write_probe", read_only)
  existing = tmp_path / "existing"
  existing.mkdir()
  for workdir, where in [
    (existing, ""),
    (tmp_path / "new" / "run", f" (it would be created in {tmp_path})"),
  ]:
    rc, line, _ = _cli(capsys, train.train_and_evaluate, _smoke_config(data_dir), str(workdir))
    assert rc == 2 and line == (
      f"error: --workdir={workdir} is not writable{where}: Read-only file system; choose a "
      "writable --workdir or change the folder's permissions (nothing was written)"
    ), line
  assert probed == [str(existing), str(tmp_path)]
  # the sweep checks its root (and every run folder) the same way, before any run starts
  args = (["digits->digits_m"], ["source_only"], [0])
  rc, line, _ = _cli(capsys, sweep.run_sweep, _smoke_config(data_dir), str(tmp_path / "sw"), *args)
  assert rc == 2 and line.startswith(f"error: sweep --workdir={tmp_path}/sw is not writable"), line
  monkeypatch.setattr(run_control, "_write_probe", lambda folder: (_ for _ in ()).throw(ENOSPC))
  rc, line, _ = _cli(capsys, train.train_and_evaluate, _smoke_config(data_dir), str(existing))
  assert rc == 2 and line.startswith(f"error: disk full (No space left on device) in {existing}")
  assert sorted(os.listdir(tmp_path)) == ["existing"] and os.listdir(existing) == []


def test_unwritable_workdir_or_parent_is_refused_simulated(
  tmp_path, capsys, monkeypatch, digits_data_dir
):
  """What ``os.access`` answers for a folder without write permission, for any user (root too)."""
  real_access = os.access
  monkeypatch.setattr(
    os,
    "access",
    lambda path, mode, *a, **k: (
      False
      if str(path).startswith(str(tmp_path)) and mode & os.W_OK
      else real_access(path, mode, *a, **k)
    ),
  )
  existing = tmp_path / "existing"
  existing.mkdir()
  for workdir, where in [
    (existing, ""),
    (tmp_path / "new" / "run", f" (it would be created in {tmp_path})"),
  ]:
    rc, line, _ = _cli(
      capsys, train.train_and_evaluate, _smoke_config(digits_data_dir), str(workdir)
    )
    assert rc == 2 and line == (
      f"error: --workdir={workdir} is not writable{where}: Permission denied; choose a "
      "writable --workdir or change the folder's permissions (nothing was written)"
    ), line
  assert os.listdir(tmp_path) == ["existing"] and os.listdir(existing) == []


def test_the_probe_file_leaves_nothing_and_is_no_foreign_file(tmp_path):
  run_control.check_writable(str(tmp_path))
  assert os.listdir(tmp_path) == []
  (tmp_path / f"{run_control.PROBE_PREFIX}abc").write_text("")  # another run's, for an instant
  assert train.foreign_entries(str(tmp_path)) == []


# ---------------------------------------------------------------------------------------------
# 2. A full disk: one line starting "disk full", the file, and the step the run resumes from;
# 3. a truncated metrics.jsonl last line / results.json: recovered on the next run
# ---------------------------------------------------------------------------------------------


class _HalfWriteThenFull(io.TextIOBase):
  """A metrics.jsonl file on a disk that fills up: half the row is written, then ENOSPC (a write
  that names no file, as a real one)."""

  def __init__(self, f):
    self.f = f

  def write(self, s):
    self.f.write(s[: len(s) // 2])
    self.f.flush()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def close(self):
    self.f.close()


def test_disk_full_mid_run_is_one_line_and_the_run_resumes_to_the_end(
  tmp_path, capsys, monkeypatch, digits_data_dir
):
  """One workdir through: disk full in its first checkpoint (step 3), in metrics.jsonl at step 5
  (leaving half a row), in results.json; then a truncated results.json; then it finishes. On one
  of the suite's 8 emulated devices: the five starts compile far less."""
  make_mesh = sharding.make_mesh
  monkeypatch.setattr(sharding, "make_mesh", lambda: make_mesh(jax.devices()[:1]))
  config, workdir = _smoke_config(digits_data_dir), tmp_path / "run"
  metrics, results = workdir / "metrics.jsonl", workdir / "results.json"
  resume = "free some space, then run the same command to resume from checkpoint step"

  real_save = checkpointing.Checkpointer.save

  def full_at_3(self, step, state, meta):
    if step == 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # names no file
    return real_save(self, step, state, meta)

  with monkeypatch.context() as m:
    m.setattr(checkpointing.Checkpointer, "save", full_at_3)
    rc, line, err = _cli(capsys, train.train_and_evaluate, config, str(workdir))
  assert rc == 2 and line == (
    f"error: disk full (No space left on device) while writing {workdir / 'checkpoints' / '3'}; "
    "free some space, then run the same command again (no checkpoint was written: it starts "
    "from step 0)"
  ), line
  assert checkpointing.saved_steps(str(workdir)) == [] and _lock_is_free(workdir)

  real_write = reporting.MetricWriter.write

  def fill_at_5(self, step, scalars):
    if step == 5:
      self._jsonl = _HalfWriteThenFull(self._jsonl)
    return real_write(self, step, scalars)

  with monkeypatch.context() as m:
    m.setattr(reporting.MetricWriter, "write", fill_at_5)
    rc, line, _ = _cli(capsys, train.train_and_evaluate, config, str(workdir))
  assert rc == 2 and line == (
    f"error: disk full (No space left on device) while writing {metrics}; {resume} 3"
  ), line
  assert checkpointing.saved_steps(str(workdir)) == [3] and _lock_is_free(workdir)
  last = metrics.read_text().splitlines()[-1]
  with pytest.raises(ValueError):
    json.loads(last)  # half a row, as a crash or a full disk leaves it

  real_open = open

  def full_results(path, *args, **kwargs):
    f = real_open(path, *args, **kwargs)
    if str(path).endswith("results.json.tmp"):
      f.write = lambda s: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return f

  with monkeypatch.context() as m:
    m.setattr(reporting, "open", full_results, raising=False)
    rc, line, err = _cli(capsys, train.train_and_evaluate, config, str(workdir))
  assert f"warning: {metrics} line 6 is truncated (" in err and "dropped" in err, err
  assert rc == 2 and line == (
    f"error: disk full (No space left on device) while writing {results}; {resume} 6"
  ), line
  assert not results.exists() and not (workdir / "results.json.tmp").exists()
  steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]  # every line parses
  assert steps == [1, 2, 3, 3, 4, 5, 6, 6]  # train rows and the evaluations at 3 and 6

  results.write_text('{"method": "alda_dsbn", "source": "dig')  # truncated: a crash of a copy
  out = train.train_and_evaluate(config, str(workdir))  # re-evaluates step 6, writes it anew
  assert json.loads(results.read_text())["last_accuracy"] == out["last_accuracy"]
  rows = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [3, 6]

  # a line damaged in the middle (not a crash's doing) is refused, naming the file and line,
  # when the run opens it again (resume_step) -- here without starting a run (compilations)
  lines = metrics.read_text().splitlines(keepends=True)
  metrics.write_text("".join(lines[:1] + ['{"step": 2, "train/lo\n'] + lines[2:]))
  rc, line, _ = _cli(capsys, reporting.MetricWriter, str(workdir), True, 6, True)
  assert rc == 2 and line.startswith(f"error: {metrics} line 2 is damaged ("), line


def test_a_run_that_fails_while_starting_releases_its_workdir_lock(
  tmp_path, monkeypatch, digits_data_dir
):
  """Once the lock is taken, a failure before training (here building the model) gives it back:
  a sweep or a test in the same process can start that workdir again."""
  from dsbn_jax.models import heads  # pylint: disable=g-import-not-at-top

  def full(config):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(heads, "create_model", full)
  workdir = tmp_path / "run"
  with pytest.raises(UserError) as failed:
    train.train_and_evaluate(_smoke_config(digits_data_dir), str(workdir))
  assert str(failed.value) == (
    f"disk full (No space left on device) while writing in {workdir}; free some space, then run "
    "the same command again (no checkpoint was written: it starts from step 0)"
  )
  # released by the run, not by the garbage collector (its traceback, alive, still holds it); the
  # workdir it created and left empty is gone (config.json comes once every check has read the data)
  assert not workdir.exists()
  workdir.mkdir()  # a folder the run did not create is left, with the lock file
  with pytest.raises(UserError):
    train.train_and_evaluate(_smoke_config(digits_data_dir), str(workdir))
  assert os.listdir(workdir) == [".lock"] and _lock_is_free(workdir)


def test_disk_full_writing_config_json_names_it_and_leaves_no_tmp(
  tmp_path, capsys, monkeypatch, digits_data_dir
):
  real_open = open

  def full_config(path, *args, **kwargs):
    f = real_open(path, *args, **kwargs)
    if str(path).endswith("config.json.tmp"):
      f.write = lambda s: (_ for _ in ()).throw(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    return f

  monkeypatch.setattr(reporting, "open", full_config, raising=False)
  workdir = tmp_path / "run"
  rc, line, _ = _cli(capsys, train.train_and_evaluate, _smoke_config(digits_data_dir), str(workdir))
  assert rc == 2 and line == (
    f"error: disk full (Disk quota exceeded) while writing "
    f"{workdir / 'config.json'}; free some space, then run the same "
    "command again (no checkpoint was written: it starts from step 0)"
  )
  assert not workdir.exists()  # nothing was left in the folder this start created: it is gone


def test_read_jsonl_drops_only_a_truncated_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  good = "".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (1, 2))
  for tail in ['{"step": 3, "train/lo', "\0" * 40]:  # half a row; NUL bytes after a power loss
    path.write_text(good + tail)
    warned = []
    rows = reporting.read_jsonl(str(path), truncated_ok=True, warn=warned.append)
    assert [r["step"] for r in rows] == [1, 2] and len(warned) == 1
    assert warned[0].startswith(f"warning: {path} line 3 is truncated"), warned
    with pytest.raises(UserError, match=f"{path} line 3 is damaged"):
      reporting.plot_curves(str(path), str(tmp_path / "c.png"))  # after a run: nothing to drop
  path.write_text(good + '{"train/loss": 1.0}\n')
  with pytest.raises(UserError, match=r"line 3 is damaged \(not a JSON object with an integer"):
    reporting.read_jsonl(str(path), truncated_ok=True)


def test_disk_full_in_any_entry_point_is_one_line(tmp_path, capsys, monkeypatch):
  """``run_cli`` answers a full disk raised anywhere (here the sweep summary), and a library error
  that only says so in its text (orbax/tensorstore, TensorFlow), or a full quota."""
  _fake_run(tmp_path, "m", "a->b", 0)
  real_open = open

  def full_md(path, *args, **kwargs):
    if str(path).endswith("results.md.tmp"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(reporting, "open", full_md, raising=False)
  rc, line, _ = _cli(capsys, sweep.write_summary, str(tmp_path), ["a->b"], ["m"], [0])
  assert rc == 2 and line == (
    f"error: disk full (No space left on device) while writing "
    f"{tmp_path / 'results.md'}; free some space, then run the same "
    "command again"
  ), line
  assert not (tmp_path / "results.md.tmp").exists()

  def orbax_like():
    try:
      raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    except OSError as e:
      raise ValueError("Error writing \"x\": [OS error 122: Disk quota exceeded]") from e

  rc, line, _ = _cli(capsys, orbax_like)
  assert rc == 2 and line.startswith("error: disk full (Disk quota exceeded); free some space")
  tensorflow_like = RuntimeError("UNKNOWN: tensorboard/events.out: No space left on device")
  assert cli.disk_full_message(tensorflow_like).startswith("disk full (No space left on device)")
  assert cli.disk_full_message(RuntimeError("other")) is None
  with pytest.raises(RuntimeError):  # anything else is not swallowed
    cli.run_cli(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def _fake_run(root, method, task, seed, text=None):
  workdir = sweep.run_dir(str(root), method, task, seed)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    f.write(
      text
      if text is not None
      else json.dumps({"seed": seed, "best_accuracy": 61.0, "last_accuracy": 60.0})
    )
  return workdir


def test_truncated_results_json_is_named_in_the_summary_and_rerun_by_the_sweep(
  tmp_path, capsys, monkeypatch, digits_data_dir
):
  root = tmp_path / "sweep"
  for text, why in [
    ('{"seed": 0, "best_accuracy": 6', "Expecting"),  # truncated
    ('{"seed": 0}', "no number 'best_accuracy'"),
    ("[1]", "not a JSON object"),
  ]:
    workdir = _fake_run(root, "source_only", "digits->digits_m", 0, text)
    path = os.path.join(workdir, "results.json")
    rc, line, _ = _cli(
      capsys, sweep.write_summary, str(root), ["digits->digits_m"], ["source_only"], [0]
    )
    assert rc == 2 and line.startswith(f"error: {path} is damaged ({why}"), line
    assert line.endswith(
      "delete it and run the sweep again: that run then evaluates its last "
      "checkpoint again and writes it anew"
    ), line
    shutil.rmtree(root)

  # run_sweep: the run with a damaged results.json is not finished; it is run (resumed) again
  workdir = _fake_run(root, "source_only", "digits->digits_m", 0, '{"seed": 0, "best_acc')
  config = _smoke_config(digits_data_dir)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.method = "source_only"
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(train._jsonable(cfg), f)  # a run of this config (guard_workdir lets it resume)
  ran = []

  def fake_train(cfg, wd):
    ran.append(wd)
    with open(os.path.join(wd, "results.json"), "w", encoding="utf-8") as f:
      json.dump({"seed": cfg.seed, "best_accuracy": 50.0, "last_accuracy": 40.0}, f)

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  capsys.readouterr()
  out = sweep.run_sweep(config, str(root), ["digits->digits_m"], ["source_only"], [0])
  err = capsys.readouterr().err
  assert ran == [workdir] and "| source_only | 40.0 | 40.0 |" in out["markdown"]
  assert f"warning: {workdir}/results.json is damaged (" in err, err
  assert (
    "the run is resumed from its checkpoint to write it again" in err and "Traceback" not in err
  )
