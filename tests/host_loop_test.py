"""The train loop never waits for the device between its reads: the finite-check stays on the
devices and is read only at logs, evaluations, checkpoints and stops, yet names the first
non-finite step exactly; batches are staged on the devices two steps ahead (train.py
step_watch.py, ``_train_loop``; sharding.py ``prefetch_to_global``)."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from dsbn_jax import sharding, step_watch, train, train_step
from tests import cli_driver

# 8 steps, a row every 4, one checkpoint at 4, an evaluation and a checkpoint at the end.
CADENCE = (
  "--config.total_steps=8",
  "--config.log_every_steps=4",
  "--config.eval_every_steps=8",
  "--config.checkpoint_every_steps=4",
)


def test_prefetch_to_global_stages_two_batches_ahead_in_order():
  mesh = sharding.make_mesh()
  read = []

  def host_batches():
    for i in range(5):
      read.append(i)
      yield {"x": np.full((8, 2), i, np.float32)}

  batches = sharding.prefetch_to_global(host_batches(), mesh)
  first = next(batches)
  assert read == [0, 1]  # the next batch is already on its way to the devices
  assert first["x"].sharding == sharding.data_sharding(mesh) and first["x"].shape == (8, 2)
  second = next(batches)
  assert read == [0, 1, 2]
  got = [first, second, *batches]
  assert [float(b["x"][0, 0]) for b in got] == [0.0, 1.0, 2.0, 3.0, 4.0]


class _Ckpt:
  def wait(self):
    pass

  def latest_step(self):
    return 2


def _watched_steps(mesh, watch, values, first_step=1):
  """Each ``(loss, adv)`` of ``values`` as one step's metrics through ``train_step.watch_step``
  (jitted, as the fused step runs it), with ``train/lr`` = the step number, from ``first_step``."""
  rep = sharding.replicated(mesh)
  fn = jax.jit(train_step.watch_step, out_shardings=rep)
  for step, (loss, adv) in enumerate(values, first_step):
    metrics = {
      k: jax.device_put(np.float32(v), rep)
      for k, v in (("train/loss", loss), ("train/adv", adv), ("train/lr", step))
    }
    watch.update(fn(watch.value, metrics, jax.device_put(np.int32(step), rep)), metrics)
  return metrics


def test_step_watch_names_the_first_non_finite_step_and_its_metrics():
  mesh = sharding.make_mesh()
  watch = step_watch.StepWatch(mesh)
  nan = np.float32(np.nan)
  _watched_steps(mesh, watch, [(1.0, 2.0), (1.0, 2.0)])
  watch.check(_Ckpt())  # all finite so far
  _watched_steps(mesh, watch, [(1.0, nan), (nan, nan), (1.0, 2.0)], first_step=3)
  with pytest.raises(train.NonFiniteLossError) as e:
    watch.check(_Ckpt())
  assert str(e.value) == (
    "non-finite train/adv at step 3; the run stopped and the last good checkpoint (step 2) is "
    "kept: lower optim.lr0 or check the data"
  )


def test_a_row_holds_the_means_since_the_last_row_and_the_schedule_at_its_step():
  mesh = sharding.make_mesh()
  watch = step_watch.StepWatch(mesh)
  last = _watched_steps(mesh, watch, [(1.0, 2.0), (2.0, 4.0), (6.0, 3.0)])
  assert watch.log_row(_Ckpt(), last) == {"train/adv": 3.0, "train/loss": 3.0, "train/lr": 3.0}
  last = _watched_steps(mesh, watch, [(0.5, 1.0)], first_step=4)  # a new window
  assert watch.log_row(_Ckpt(), last) == {"train/adv": 1.0, "train/loss": 0.5, "train/lr": 4.0}
  # The open window travels in the meta: a watch made from it continues it.
  _watched_steps(mesh, watch, [(1.0, 1.0), (2.0, 2.0)], first_step=5)
  meta = {}
  watch.to_meta(meta, _Ckpt())
  assert meta["log_window"] == {
    "names": ["train/adv", "train/loss", "train/lr"],
    "count": 2,
    "sum": [3.0, 3.0, 11.0],
  }
  resumed = step_watch.StepWatch(mesh, meta)
  last = _watched_steps(mesh, resumed, [(6.0, 3.0)], first_step=7)
  assert resumed.log_row(_Ckpt(), last) == {"train/adv": 2.0, "train/loss": 3.0, "train/lr": 7.0}


def _reads_by_step(monkeypatch) -> list:
  """Installs spies on ``jax.device_get`` and ``jax.block_until_ready``: the loop step (``done``
  of ``train._train_loop``) of each call made under the loop on this thread."""
  seen = []

  def spy(fn):
    def wrapped(*args, **kwargs):
      frame = sys._getframe(1)
      while frame is not None:
        if frame.f_code is train._train_loop.__code__:
          seen.append(frame.f_locals.get("done"))
          break
        frame = frame.f_back
      return fn(*args, **kwargs)

    return wrapped

  monkeypatch.setattr(jax, "device_get", spy(jax.device_get))
  monkeypatch.setattr(jax, "block_until_ready", spy(jax.block_until_ready))
  return seen


def test_the_loop_reads_the_devices_only_at_logs_evaluations_and_checkpoints(
  tmp_path, digits_data_dir, monkeypatch
):
  seen = _reads_by_step(monkeypatch)
  result = cli_driver.run_main(tmp_path / "run", digits_data_dir, *CADENCE)
  assert result.returncode == 0, result.stderr[-3000:]
  # 1: the first step's end starts the img/s clock (Progress.tick); 4: a row and a checkpoint;
  # 8: a row, the evaluation and the last checkpoint. Steps 2, 3, 5, 6, 7 are never waited for.
  assert set(seen) == {1, 4, 8}, seen
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [4, 8, 8]  # train rows at 4 and 8, the evaluation's at 8


def test_a_nan_between_two_rows_is_named_at_its_step_and_no_later_checkpoint_is_written(
  tmp_path, digits_data_dir
):
  """NaN pixels in step 6's batch (loop index 5), between the rows of steps 4 and 8: the run
  stops at the row of step 8, naming step 6; checkpoint 4 stays the only one."""
  workdir = tmp_path / "run"
  result = cli_driver.run_main(
    workdir, digits_data_dir, *CADENCE, env={"DSBN_JAX_NAN_AT_STEP": "5"}
  )
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite train/") and " at step 6;" in last, last
  assert "the last good checkpoint (step 4) is kept" in last
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
  assert not (workdir / "results.json").exists()


def _rows(workdir) -> list:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  timing = ("train/images_per_s", "eval/seconds")
  return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_rows_average_their_window_and_a_resume_inside_a_window_logs_the_same_rows(
  tmp_path, digits_data_dir
):
  """Rows every 3 steps, checkpoints every 4: a run resumed from checkpoint 4 (inside the window
  of steps 4-6) logs the rows of the uninterrupted run, whose losses are the means of the steps'
  own (the run logging every step)."""
  cadence = ("--config.total_steps=8", "--config.eval_every_steps=8")
  every = cli_driver.run_main(tmp_path / "every", digits_data_dir, *cadence)
  assert every.returncode == 0, every.stderr[-3000:]
  windowed = ("--config.log_every_steps=3", "--config.checkpoint_every_steps=4", *cadence)
  full = tmp_path / "full"
  result = cli_driver.run_main(full, digits_data_dir, *windowed)
  assert result.returncode == 0, result.stderr[-3000:]
  per_step = {r["step"]: r for r in _rows(tmp_path / "every") if "train/loss" in r}
  train_rows = [r for r in _rows(full) if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [3, 6, 8]
  for row, window in zip(train_rows, ([1, 2, 3], [4, 5, 6], [7, 8])):
    for key in ("train/loss", "train/source_acc", "train/adv"):
      mean = np.mean([per_step[s][key] for s in window], dtype=np.float64)
      np.testing.assert_allclose(row[key], mean, rtol=1e-6, err_msg=f"{key} {window}")
    assert row["train/lr"] == per_step[row["step"]]["train/lr"]  # the schedule at the row's step

  resumed = tmp_path / "resumed"  # as a crash after checkpoint 4 leaves it
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / "checkpoints" / "8")
  os.remove(resumed / "results.json")
  result = cli_driver.run_main(resumed, digits_data_dir, *windowed)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "at step 4" in result.stdout
  assert _rows(resumed) == _rows(full)


def test_a_window_saved_with_other_metrics_is_dropped_and_the_row_averages_the_new_steps():
  """A checkpoint whose window holds other metric names (written by another version of the code):
  the first row after the resume averages the steps since the resume alone."""
  mesh = sharding.make_mesh()
  meta = {"log_window": {"names": ["train/ce", "train/loss"], "count": 3, "sum": [9.0, 30.0]}}
  watch = step_watch.StepWatch(mesh, meta)
  last = _watched_steps(mesh, watch, [(1.0, 2.0), (3.0, 6.0)], first_step=4)
  assert watch.log_row(_Ckpt(), last) == {"train/adv": 4.0, "train/loss": 2.0, "train/lr": 5.0}
