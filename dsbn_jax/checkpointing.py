"""Orbax checkpoints of the train state plus a small JSON of loop metadata, with auto-resume.

One ``CheckpointManager`` per workdir (``<workdir>/checkpoints``), items ``state`` (the train state
pytree, saved sharded/replicated as it lives on the devices) and ``meta`` (JSON: step, best/last
accuracy, evaluation history; the input position is a function of the step). Saving is
asynchronous; ``close()`` waits for it. Typed PRNG keys are stored as their raw ``key_data`` and
re-wrapped on restore.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _unwrap_keys(tree):
  return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract(x):
  """Restore target for one leaf: shape, dtype and (where known) sharding."""
  if _is_key(x):
    x = jax.random.key_data(x)
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def read_state_arrays(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """``(step, state)`` of a workdir's checkpoint as host numpy arrays, no model or sharding needed.

  For inspection, prediction and tests; ``step=None`` reads the latest.
  """
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  # Read onto one local device whatever topology wrote it (e.g. 2 processes x 2 devices).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  meta = mngr.item_metadata(step)["state"]
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  mngr.close()
  return step, jax.tree_util.tree_map(np.asarray, restored["state"])


class Checkpointer:
  """Save every ``every_steps`` and at the end, keep ``max_to_keep``, restore the latest."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(_unwrap_keys(state)),
                              meta=ocp.args.JsonSave(meta))
    self._mngr.save(step, args=args, force=True)

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the structure, dtypes and shardings of ``like`` (concrete or abstract)."""
    abstract = jax.tree_util.tree_map(_abstract, like)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state = jax.tree_util.tree_map(
        lambda ref, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
        if _is_key(ref) else x, like, out["state"])
    return state, out["meta"]

  def wait(self) -> None:
    """Blocks until the pending async save (if any) is on disk."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._mngr.close()
