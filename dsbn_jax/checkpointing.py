"""Orbax checkpoints of the train state plus a small JSON of loop metadata, with auto-resume.

One ``CheckpointManager`` per workdir (``<workdir>/checkpoints``), items ``state`` (the train state
pytree, saved sharded/replicated as it lives on the devices) and ``meta`` (JSON: step, best/last
accuracy, evaluation history; the input position is a function of the step). Saving is
asynchronous; ``close()`` waits for it. Typed PRNG keys are stored as their raw ``key_data`` and
re-wrapped on restore.

The best-evaluated state lives apart, in ``<workdir>/checkpoints_best/<step>`` (one kept, the same
two items): the rolling ``max_to_keep`` never prunes it and resume never reads it. It is selected
with the target labels (the papers' protocol), and is what ``predict --checkpoint=best`` loads.
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


BEST_DIR = "checkpoints_best"  # the best-evaluated state, beside the rolling "checkpoints"


def read_checkpoint(workdir: str, step: int | None = None, *, best: bool = False
                    ) -> tuple[int, dict, dict]:
  """``(step, state, meta)`` of a workdir's checkpoint, state as host numpy arrays.

  No model or sharding needed (inspection, prediction, tests). ``step=None`` reads the latest;
  ``best=True`` reads the best-evaluated checkpoint instead of the rolling ones.
  """
  directory = os.path.abspath(os.path.join(workdir, BEST_DIR if best else "checkpoints"))
  if not os.path.isdir(directory):  # read-only: orbax would not create it, but fail obscurely
    raise FileNotFoundError(f"no checkpoint in {directory}")
  mngr = ocp.CheckpointManager(directory,
                               options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  # Read onto one local device whatever topology wrote it (e.g. 2 processes x 2 devices).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  meta = mngr.item_metadata(step)["state"]
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                        meta=ocp.args.JsonRestore()))
  mngr.close()
  return step, jax.tree_util.tree_map(np.asarray, restored["state"]), restored["meta"]


def read_state_arrays(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """``(step, state)`` of ``read_checkpoint`` (the rolling checkpoints)."""
  step, state, _ = read_checkpoint(workdir, step)
  return step, state


class Checkpointer:
  """Save every ``every_steps`` and at the end, keep ``max_to_keep``, restore the latest; and
  keep the best-evaluated state apart (``save_best``)."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.best_directory = os.path.abspath(os.path.join(workdir, BEST_DIR))
    self._async = async_save
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta"))
    self._best_mngr = None  # opened by the first best_step/save_best (collective, as saves are)

  def _best(self) -> ocp.CheckpointManager:
    if self._best_mngr is None:
      options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=self._async)
      self._best_mngr = ocp.CheckpointManager(self.best_directory, options=options,
                                              item_names=("state", "meta"))
    return self._best_mngr

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    # The best checkpoint named by ``meta`` is on disk before this checkpoint starts: a run
    # resumed from it never lacks (or half-has) the best state its meta records.
    if self._best_mngr is not None:
      self._best_mngr.wait_until_finished()
    self._mngr.save(step, args=_save_args(state, meta), force=True)

  def best_step(self) -> int | None:
    """The step of the best checkpoint on disk (None: none yet)."""
    return self._best().latest_step()

  def save_best(self, step: int, state: Any, meta: dict) -> None:
    """Makes ``step`` the best checkpoint, replacing the previous one (asynchronously).

    Every process calls it at the same evaluations (their result is replicated), as orbax saves
    are collective. A best checkpoint at ``step`` or later was written by an attempt that crashed
    before its next regular checkpoint (this run resumed behind it and re-evaluates those steps):
    it is deleted first, so the best checkpoint always follows the resumed run's own evaluations.
    """
    mngr = self._best()
    mngr.wait_until_finished()
    for old in mngr.all_steps():
      if old >= step:
        mngr.delete(old)
    mngr.save(step, args=_save_args(state, meta), force=True)

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
    """Blocks until the pending async saves (if any, best checkpoint included) are on disk."""
    self._mngr.wait_until_finished()
    if self._best_mngr is not None:
      self._best_mngr.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._mngr.close()
    if self._best_mngr is not None:
      self._best_mngr.close()


def _save_args(state: Any, meta: dict) -> ocp.args.Composite:
  return ocp.args.Composite(state=ocp.args.StandardSave(_unwrap_keys(state)),
                            meta=ocp.args.JsonSave(meta))
