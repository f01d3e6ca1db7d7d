"""The train loop never waits for the device between its reads: the finite-check stays on the
devices and is read only at logs, evaluations, checkpoints and stops, yet names the first
non-finite step exactly; batches are staged on the devices two steps ahead (train.py
``_FiniteWatch``, ``_train_loop``; sharding.py ``prefetch_to_global``)."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from dsbn_jax import sharding, train
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


def test_finite_watch_names_the_first_non_finite_step_and_its_metrics():
  mesh = sharding.make_mesh()
  watch = train._FiniteWatch(mesh)
  rep = sharding.replicated(mesh)
  nan = np.float32(np.nan)
  for step, (loss, adv) in enumerate([(1.0, 2.0), (1.0, 2.0), (1.0, nan), (nan, nan), (1.0, 2.0)]):
    metrics = {k: jax.device_put(np.float32(v), rep) for k, v in (("loss", loss), ("adv", adv))}
    watch.update(metrics, jax.device_put(np.int32(step + 1), rep))
    if step == 1:
      watch.check(_Ckpt())  # all finite so far
  with pytest.raises(train.NonFiniteLossError) as e:
    watch.check(_Ckpt())
  assert str(e.value) == (
    "non-finite adv at step 3; the run stopped and the last good checkpoint (step 2) is kept: "
    "lower optim.lr0 or check the data"
  )


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
