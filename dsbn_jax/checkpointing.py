"""Orbax checkpoints of the train state plus a small JSON of loop metadata, with auto-resume.

One ``CheckpointManager`` per workdir (``<workdir>/checkpoints``), items ``state`` (the train state
pytree, saved sharded/replicated as it lives on the devices) and ``meta`` (JSON: step, best/last
accuracy, evaluation history; the input position is a function of the step). Saving is
asynchronous; ``close()`` waits for it. The state holds no PRNG key (the step's base key is
derived from ``config.seed`` and the step number: ``train_step.train_step``).

The best-evaluated state lives apart, in ``<workdir>/checkpoints_best/<step>`` (one kept, the same
two items): the rolling ``max_to_keep`` never prunes it and resume never reads it. It is selected
with the target labels (the papers' protocol), and is what ``predict --checkpoint=best`` loads.

A restored state is verified (every leaf of the expected shape and dtype, every float finite). A
checkpoint that fails (bytes flipped, a truncated file, an empty step folder) is reported in one
``warning: checkpoint <dir>/<step> is damaged (<why>); falling back to step <k>`` line and the next
older one is tried; none good is a ``DamagedCheckpointError`` (one line). Training moves the
damaged folders to ``<workdir>/checkpoints_damaged/`` (kept, never deleted) so that it can write
those steps again; reading for inspection or prediction changes nothing.
"""

import gc
import logging
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dsbn_jax import cli, sharding
from dsbn_jax.errors import UserError


def _abstract(x):
  """Restore target for one leaf: shape, dtype and (where known) sharding."""
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


ROLLING_DIR = "checkpoints"  # the rolling checkpoints, resumed from
BEST_DIR = "checkpoints_best"  # the best-evaluated state, beside the rolling ones
# The evaluation the label-free validator config.select_with picks (no target labels used).
SELECTED_DIR = "checkpoints_selected"
DAMAGED_DIR = "checkpoints_damaged"  # where training moves the damaged checkpoints it skipped


class DamagedCheckpointError(UserError):
  """No checkpoint of a directory restores to a valid state (the callers add what to do)."""


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree) -> dict:
  """``'params/backbone/fc/kernel' -> leaf`` of a pytree (dicts and dataclasses alike)."""
  return {
    "/".join(_key_name(k) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def _all_finite(leaves: list) -> list[bool]:
  """Per leaf: every value finite (host arrays on the host; device arrays in one jitted check)."""
  if all(isinstance(x, np.ndarray) for x in leaves):
    return [bool(np.isfinite(x).all()) for x in leaves]
  flags = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))(leaves)
  return [bool(v) for v in np.asarray(flags.addressable_data(0))]


_GOLDEN = 2654435761  # Knuth's multiplicative hash constant: position weights of the checksum


def _np_checksum(x: np.ndarray) -> int:
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint32).ravel()
  elif x.dtype.itemsize in (1, 2):
    words = x.view(f"uint{8 * x.dtype.itemsize}").astype(np.uint32).ravel()
  else:  # 4 bytes (float32, int32, uint32) or 8 (two words each)
    words = x.view(np.uint32).ravel()
  weights = np.arange(words.size, dtype=np.uint32) * np.uint32(_GOLDEN) + np.uint32(1)
  return int(np.sum(words * weights, dtype=np.uint32))


def _jnp_checksum(x: jax.Array) -> jax.Array:
  """The same sum as ``_np_checksum``, on the device (uint32 arithmetic wraps alike)."""
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize in (1, 2):
    words = jax.lax.bitcast_convert_type(x, f"uint{8 * x.dtype.itemsize}").astype(jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  words = words.ravel()
  weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(_GOLDEN) + jnp.uint32(1)
  return jnp.sum(words * weights, dtype=jnp.uint32)


_device_checksums = jax.jit(lambda leaves: jnp.stack([_jnp_checksum(x) for x in leaves]))


def checksums(state) -> dict[str, int]:
  """``path -> uint32`` position-weighted sum of each leaf's bits (saved in the meta item): a
  flipped byte that still decodes to finite numbers is caught on restore."""
  flat = _flat(state)
  if not flat:
    return {}
  leaves = list(flat.values())
  if all(isinstance(x, np.ndarray) for x in leaves):
    sums = [_np_checksum(x) for x in leaves]
  else:
    sums = np.asarray(_device_checksums(leaves).addressable_data(0)).tolist()
  return {path: int(v) for path, v in zip(flat, sums)}


def check_state(state, like=None, sums: dict | None = None) -> str | None:
  """Why ``state`` is not a usable restored state, or None.

  Checks every float leaf is finite; given ``like`` (concrete or abstract arrays, possibly a
  subset of the state's leaves), that each of its leaves is in ``state`` with its shape and dtype;
  given ``sums`` (``checksums`` at save time), that every leaf still has its checksum.
  """
  flat = _flat(state)
  for path, ref in (_flat(like) if like is not None else {}).items():
    got = flat.get(path)
    if got is None:
      return f"{path} is missing"
    if tuple(np.shape(got)) != tuple(np.shape(ref)) or got.dtype != ref.dtype:
      return (
        f"{path} is {got.dtype}{list(np.shape(got))}, expected {ref.dtype}{list(np.shape(ref))}"
      )
  floats = [(p, x) for p, x in flat.items() if jnp.issubdtype(x.dtype, jnp.inexact)]
  bad = [
    p for (p, _), ok in zip(floats, _all_finite([x for _, x in floats]) if floats else []) if not ok
  ]
  if bad:
    more = f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""
    return f"non-finite values in {bad[0]}{more}"
  if sums:
    now = checksums(state)
    bad = [p for p, v in now.items() if p in sums and sums[p] != v]
    if bad:
      more = f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""
      return f"checksum mismatch in {bad[0]}{more}"
  return None


class _QuietOrbaxReads(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's sibling reads of a damaged
  checkpoint (a page of traceback each; the first failure is reported in one line instead)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (
      record.getMessage().startswith("Task exception was never retrieved")
      and "async_deserialize" in record.getMessage()
    )


def _quiet_unraisable(previous):
  """``sys.unraisablehook`` minus the echoes of a failed orbax read: its sibling reads' errors
  and their callbacks into the closed event loop (dozens of tracebacks, printed whenever
  collected)."""

  def hook(unraisable):
    text = str(unraisable.exc_value)
    if not (
      text.startswith("Encountered error while reading array index")
      or (isinstance(unraisable.exc_value, RuntimeError) and text == "Event loop is closed")
    ):
      previous(unraisable)

  hook.quiet_orbax_reads = True
  return hook


class _QuietFullDisk(logging.Filter):
  """Drops orbax's own reports of a save that failed on a full disk, in the message or in the
  exception logged (absl: "_SignalingThread.run() raised an exception: ... No space left on
  device", "Save Finalize thread (save_finalize) failed.", each with a page of traceback; asyncio:
  the same for its sibling writes): the error the save raises in the main thread says it in one
  line (``cli.disk_full_message``)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (
      any(t in record.getMessage() for t in cli.DISK_FULL_TEXTS)
      or (exc is not None and cli.disk_full(exc) is not None)
    )


def _quiet_save_echoes() -> None:
  """Before any save: keep a failed async save's background echoes off stderr (a full disk, its
  writes' callbacks into the closed event loop); the failure is raised to the caller."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _QuietFullDisk) for f in logger.filters):
      logger.addFilter(_QuietFullDisk())
  if not getattr(sys.unraisablehook, "quiet_orbax_reads", False):
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def _quiet_failed_reads() -> None:
  """After a failed restore: keep its background echoes off stderr (the reason is in one line)."""
  logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _QuietOrbaxReads) for f in logger.filters):
    logger.addFilter(_QuietOrbaxReads())
  if not getattr(sys.unraisablehook, "quiet_orbax_reads", False):
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  gc.collect()  # most echoes come when the failed tasks are collected: now, with the filters on


def _why(e: Exception) -> str:
  """A restore exception in a few words: its root cause (tensorstore's messages run to pages)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  text = text if len(text) <= 120 else text[:117] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def restore_newest_good(
  directory: str, steps, restore: Callable[[int], tuple[Any, dict]], like=None
) -> tuple[int, Any, dict, list[tuple[int, str]]]:
  """``(step, state, meta, damaged)``: the newest of ``steps`` whose ``restore(step)`` gives a
  valid state (``check_state``), and the ``(step, why)`` of the newer ones that did not.

  Raises ``DamagedCheckpointError`` if none is good (``steps`` must not be empty).
  """
  damaged = []
  for step in sorted(steps, reverse=True):
    try:
      state, meta = restore(step)
      if not isinstance(meta, dict):
        raise ValueError("its meta item is not a JSON object")
      meta = dict(meta)
      why = check_state(state, like, meta.pop("checksums", None))  # None: saved before them
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore: any type)
      why = _why(e)
      _quiet_failed_reads()
    if sharding.every_process(why is None):  # every process found its copy good
      return step, state, meta, damaged
    damaged.append((step, why or "damaged on another process"))
  (step, why), n = damaged[0], len(damaged)
  more = (
    "; there is no older one"
    if n == 1
    else "; so is the older one"
    if n == 2
    else f"; so are the {n - 1} older ones"
  )
  raise DamagedCheckpointError(
    f"checkpoint {os.path.join(directory, str(step))} is damaged ({why}){more}"
  )


def fallback_lines(directory: str, damaged, step: int) -> list[str]:
  """The warning lines for the damaged checkpoints skipped on the way to ``step``."""
  olders = [s for s, _ in damaged[1:]] + [step]
  return [
    f"warning: checkpoint {os.path.join(directory, str(s))} is damaged ({why}); falling back "
    f"to step {older}"
    for (s, why), older in zip(damaged, olders)
  ]


_PRUNED_RETRIES = 5  # reads of the newest step after one was deleted by its run while read


def read_checkpoint(
  workdir: str, step: int | None = None, *, folder: str = ROLLING_DIR, like=None
) -> tuple[int, dict, dict]:
  """``(step, state, meta)`` of a workdir's checkpoint, state as host numpy arrays.

  No model or sharding needed (inspection, prediction, tests). ``step=None`` reads the newest good
  checkpoint: a damaged newer one is skipped with a ``warning: ...`` line on stderr; a given
  ``step`` must be good. ``folder``: the rolling checkpoints, or one kept apart (``BEST_DIR``: the
  best-evaluated state; ``SELECTED_DIR``: the validator's pick). ``like`` (a subset of the state's
  leaves, e.g. ``{"params": ...}``) is checked for shapes and dtypes; every float is checked
  finite. Changes nothing on disk; ``DamagedCheckpointError`` when no checkpoint is good.
  """
  directory = os.path.abspath(os.path.join(workdir, folder))
  if not os.path.isdir(directory):  # read-only: orbax would not create it, but fail obscurely
    raise FileNotFoundError(f"no checkpoint in {directory}")
  mngr = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
  )
  steps = mngr.all_steps() if step is None else [step]
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  # Read onto one local device whatever topology wrote it (e.g. 2 processes x 2 devices).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def restore(s):
    meta = mngr.item_metadata(s)["state"]
    target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta
    )
    out = mngr.restore(
      s,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
    return jax.tree_util.tree_map(np.asarray, out["state"]), out["meta"]

  try:
    for tries_left in range(_PRUNED_RETRIES, -1, -1):
      try:
        found = restore_newest_good(directory, steps, restore, like)
        break
      except DamagedCheckpointError:
        # A step folder gone since it was listed was deleted by its run (``keep_checkpoints``
        # pruning it, a new best or selected state replacing it), not damaged: read the newest
        # step there now. Damaged is a checkpoint whose folder is still there.
        gone = [s for s in steps if not os.path.isdir(os.path.join(directory, str(s)))]
        if not gone:
          raise
        mngr.reload()
        steps = mngr.all_steps() if step is None else []
        if not tries_left or not steps:
          raise UserError(
            f"checkpoint {os.path.join(directory, str(gone[0]))} was deleted by its run while "
            "it was read (a run still training there replaces its checkpoints); run the "
            "command again"
          ) from None
  finally:
    mngr.close()
  step, state, meta, damaged = found
  for line in fallback_lines(directory, damaged, step):
    print(line, file=sys.stderr, flush=True)
  return step, state, meta


def saved_steps(workdir: str) -> list[int]:
  """The steps of ``<workdir>/checkpoints`` that orbax finished writing, sorted (a save in progress
  or interrupted, by a crash or a full disk, lives in a ``<step>.orbax-checkpoint-tmp-*`` folder
  until it is complete). Reads the folder only: for messages after a failure."""
  directory = os.path.join(workdir, ROLLING_DIR)
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def read_state_arrays(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """``(step, state)`` of ``read_checkpoint`` (the rolling checkpoints)."""
  step, state, _ = read_checkpoint(workdir, step)
  return step, state


class Checkpointer:
  """Save every ``every_steps`` and at the end, keep ``max_to_keep``, restore the latest; and
  keep states apart, one per folder (``save_apart``): the best-evaluated one (``BEST_DIR``) and the
  validator's pick (``SELECTED_DIR``)."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, ROLLING_DIR))
    self._workdir = workdir
    self._async = async_save
    self._mngr = ocp.CheckpointManager(
      self.directory, options=self._options(ROLLING_DIR, max_to_keep), item_names=("state", "meta")
    )
    self._apart = {}  # folder -> manager, opened by its first apart_step/save_apart (collective)
    self._closed = False
    _quiet_save_echoes()

  def _options(self, folder: str, max_to_keep: int) -> ocp.CheckpointManagerOptions:
    # Each manager's multi-process barriers carry its folder's name: orbax names them after the
    # step alone otherwise, so two managers saving one step at once (the best and the selected
    # state at the same evaluation) would meet at one barrier name and time out.
    return ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=self._async,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=folder),
    )

  def _apart_manager(self, folder: str) -> ocp.CheckpointManager:
    if folder not in self._apart:
      self._apart[folder] = ocp.CheckpointManager(
        os.path.abspath(os.path.join(self._workdir, folder)),
        options=self._options(folder, 1),
        item_names=("state", "meta"),
      )
    return self._apart[folder]

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    # The states kept apart that ``meta`` names are on disk before this checkpoint starts: a run
    # resumed from it never lacks (or half-has) the best or selected state its meta records.
    for mngr in self._apart.values():
      mngr.wait_until_finished()
    self._mngr.save(step, args=_save_args(state, meta), force=True)

  def apart_step(self, folder: str) -> int | None:
    """The step of the state kept apart in ``folder`` on disk (None: none yet)."""
    return self._apart_manager(folder).latest_step()

  def save_apart(self, folder: str, step: int, state: Any, meta: dict) -> None:
    """Makes ``step`` the state kept apart in ``folder`` (``BEST_DIR``, ``SELECTED_DIR``),
    replacing the previous one (asynchronously).

    Every process calls it at the same evaluations (their result is replicated), as orbax saves
    are collective. A state there at ``step`` or later was written by an attempt that crashed
    before its next regular checkpoint (this run resumed behind it and re-evaluates those steps):
    it is deleted first, so the folder always follows the resumed run's own evaluations.
    """
    mngr = self._apart_manager(folder)
    mngr.wait_until_finished()
    for old in mngr.all_steps():
      if old >= step:
        mngr.delete(old)
    mngr.save(step, args=_save_args(state, meta), force=True)

  def restore_latest(self, like: Any, say: Callable[[str], None]) -> tuple[int, Any, dict] | None:
    """``(step, state, meta)`` of the newest good checkpoint (``restore``), None if there is none.

    Damaged newer ones are moved to ``<workdir>/checkpoints_damaged/<step>`` (by process 0; kept
    for inspection, so that this run can write those steps again) and named in one ``say`` line
    each. ``DamagedCheckpointError`` if every checkpoint is damaged (then nothing is moved).
    """
    steps = self._mngr.all_steps()
    if not steps:
      return None
    step, state, meta, damaged = restore_newest_good(
      self.directory, steps, lambda s: self.restore(s, like), like=like
    )
    if damaged:
      aside = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
      moved = {}
      for s, _ in damaged:
        dest = os.path.join(aside, str(s))
        n = 1
        while os.path.exists(dest):  # an earlier fallback moved this step already: keep both
          n += 1
          dest = os.path.join(aside, f"{s}-{n}")
        moved[s] = dest
        if jax.process_index() == 0:
          os.makedirs(aside, exist_ok=True)
          os.replace(os.path.join(self.directory, str(s)), dest)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices("checkpointing: damaged checkpoints moved")
      self._mngr.reload()
      for (s, _), line in zip(damaged, fallback_lines(self.directory, damaged, step)):
        say(f"{line} (moved to {moved[s]})")
    return step, state, meta

  def restore(self, step: int, like: Any) -> tuple[Any, dict]:
    """Restores ``step`` into the structure, dtypes and shardings of ``like`` (concrete or abstract)."""
    abstract = jax.tree_util.tree_map(_abstract, like)
    out = self._mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    return out["state"], out["meta"]

  def wait(self) -> None:
    """Blocks until the pending async saves (if any, the states kept apart included) are on disk."""
    self._mngr.wait_until_finished()
    for mngr in self._apart.values():
      mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending saves and closes (once; a second call does nothing)."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self._mngr.close()
      for mngr in self._apart.values():
        mngr.close()


def _save_args(state: Any, meta: dict) -> ocp.args.Composite:
  meta = dict(meta, checksums=checksums(state))  # verified by every restore (check_state)
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
