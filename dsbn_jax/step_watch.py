"""The train loop's watch on the devices: the finite check and the log window's metric sums.

The jitted step updates it (``sharding.jit_train_step(..., watch=True)``, ``train_step.watch_step``)
in the same computation, so the loop reads nothing back per step. The host reads it only where
the loop reads or waits anyway: at a log row (the window's means, then a new window), an
evaluation, a checkpoint, a stop. It names the first non-finite step exactly however many steps
ago it was, and a row's losses and accuracies are means over every step since the previous row
(the schedule's values, ``train_step.SCHEDULE_METRICS``, are those of the row's step). The open
window travels in the checkpoint's meta (``to_meta``), so a resumed run logs what the
uninterrupted one does.
"""

import jax
import numpy as np

from dsbn_jax import sharding
from dsbn_jax import train_step as train_step_lib
from dsbn_jax.errors import UserError

META_KEY = "log_window"


class NonFiniteLossError(UserError):
  """The loss became NaN/Inf; the run stops and the last good checkpoint is kept."""


class StepWatch:
  """``value``: the watch on the devices (replicated), passed to and returned by the step."""

  def __init__(self, mesh, meta: dict | None = None):
    """``meta``: a resumed run's checkpoint meta (its open log window, if it saved one)."""
    self.mesh, self.names = mesh, None
    saved = (meta or {}).get(META_KEY)
    self._saved_names = saved["names"] if saved else None
    # The watch a resumed run starts from: the saved window's sums and step count.
    self._start = train_step_lib.empty_watch(
      _slots(saved["sum"]) if saved else None, saved["count"] if saved else 0
    )
    self.value = sharding.replicate(self._start, mesh)

  def update(self, value, metrics: dict) -> None:
    """The step's returned watch; ``metrics`` (its pytree structure only) names the slots."""
    self.value = value
    if self.names is None:
      self.names = sorted(metrics)
      if self._saved_names not in (None, self.names):  # saved by another version of the code
        self._drop_saved_window()

  def _drop_saved_window(self) -> None:
    """The window without the steps before the resume (their metrics were other ones): its first
    row then averages the steps since the resume."""
    watched = jax.device_get(self.value)
    watched["sum"] = watched["sum"] - self._start["sum"]
    watched["count"] = watched["count"] - self._start["count"]
    self.value = sharding.replicate(watched, self.mesh)

  def read(self, ckpt, metrics: dict | None = None):
    """The watch (and ``metrics``, if given, in the same transfer) read to the host, after the
    finite check (``NonFiniteLossError`` when a step was not finite)."""
    watched, host = jax.device_get((self.value, metrics))
    _check_finite(watched, self.names, ckpt)
    return watched, host

  def check(self, ckpt) -> None:
    self.read(ckpt)

  def log_row(self, ckpt, metrics: dict) -> dict:
    """The row of this step: every metric's mean over the window, the schedule's at this step
    (``metrics``: the step's own); then a new window starts."""
    watched, host = self.read(ckpt, metrics)
    count = int(watched["count"])
    row = {
      k: host[k] if k in train_step_lib.SCHEDULE_METRICS else watched["sum"][i] / count
      for i, k in enumerate(self.names)
    }
    fresh = train_step_lib.empty_watch()
    fresh["step"], fresh["bad"] = watched["step"], watched["bad"]
    self.value = sharding.replicate(fresh, self.mesh)
    return {k: np.float32(v) for k, v in row.items()}

  def to_meta(self, meta: dict, ckpt) -> None:
    """The open window into ``meta`` (saved with the checkpoint), after the finite check."""
    watched, _ = self.read(ckpt)
    meta.pop(META_KEY, None)
    if self.names is not None:
      meta[META_KEY] = {
        "names": self.names,
        "count": int(watched["count"]),
        "sum": [float(v) for v in watched["sum"][: len(self.names)]],
      }


def _slots(values) -> np.ndarray:
  out = np.zeros(train_step_lib.WATCH_SLOTS, np.float32)
  out[: len(values)] = np.asarray(values, np.float32)
  return out


def _check_finite(watched: dict, names, ckpt) -> None:
  """A ``NonFiniteLossError`` when ``watched`` (the watch, on the host) holds a non-finite step."""
  if not watched["step"]:
    return
  bad = sorted(k for k, b in zip(names, watched["bad"]) if b)
  ckpt.wait()  # the last good checkpoint may still be being written (async): finish it first
  last = ckpt.latest_step()
  kept = (
    f"the last good checkpoint (step {last}) is kept"
    if last is not None
    else "no checkpoint had been written yet"
  )
  raise NonFiniteLossError(
    f"non-finite {', '.join(bad)} at step {int(watched['step'])}; the run stopped and "
    f"{kept}: lower optim.lr0 or check the data"
  )
