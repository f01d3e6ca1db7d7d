"""Devices: the mesh, shardings, global batches, the sharded state and the jitted train step.

Data parallelism is plain ``jax.jit`` over a 1-axis mesh ``('data',)`` spanning every device of
every process: batches are sharded along their leading axis, the train state is replicated, and
XLA inserts the gradient all-reduce. BatchNorm then normalises with *global*-batch statistics
(the means in ``DomainSpecificBatchNorm`` are over the whole sharded batch): synchronised BN, so N
devices compute what one device holding the whole batch computes, up to float reduction order.
The eval step is jitted the same way, beside it in ``evaluation.jit_eval_step``.
"""

import collections
import functools
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsbn_jax import train_step as train_step_lib
from dsbn_jax.errors import UserError

DATA_AXIS = "data"


def maybe_initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize`` when running multi-process; returns whether it did.

  Multi-process is requested by the environment variable ``JAX_COORDINATOR_ADDRESS``, with
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (which JAX detects by itself on Cloud TPU pods,
  SLURM, Open MPI, ...). A plain single-process run calls nothing. Must run before anything
  touches a JAX device.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator_address is None:
    return False
  env_int = lambda name: int(os.environ[name]) if name in os.environ else None  # noqa: E731
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=env_int("JAX_NUM_PROCESSES"),
    process_id=env_int("JAX_PROCESS_ID"),
  )
  return True


def make_mesh(devices=None) -> Mesh:
  """1-axis mesh ``('data',)`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise UserError("no JAX devices available to build the ('data',) mesh")
  # Auto axis type: classic jit sharding propagation (jax.make_mesh now defaults to Explicit).
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def platform(mesh: Mesh) -> str:
  """'cpu', 'gpu' or 'tpu': what the mesh's devices are."""
  return mesh.devices.flat[0].platform


def describe(mesh: Mesh, config, workdir: str) -> str:
  """The one start-up line of a run: where it computes, how, and with which global batch."""
  kinds = collections.Counter(d.device_kind for d in mesh.devices.flat)
  devices = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
  n_proc = jax.process_count()
  axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
  b = config.batch_size
  return (
    f"dsbn_jax: platform {platform(mesh)}, {devices}, {n_proc} process"
    f"{'es' if n_proc > 1 else ''}, mesh {axes}, compute {config.model.dtype}, matmul "
    f"precision {config.model.matmul_precision}, batch {b} + {b} (source + target, global),"
    f" workdir {workdir}"
  )


def slow_on_cpu(mesh: Mesh, config) -> bool:
  """A ResNet-50 run on CPU devices: days per run, worth a warning."""
  return platform(mesh) == "cpu" and config.model.backbone == "resnet50"


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (state, rng, metrics)."""
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Host values (identical on every process: keys, pretrained weights) -> replicated arrays.

  With several processes, host numpy or single-device arrays cannot enter a computation that
  spans other hosts' devices; replicated global arrays can. Each process supplies the full value.
  """
  sharding = replicated(mesh)

  def put(x):
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, tree)


def from_process_0(values: dict) -> dict:
  """Process 0's ``{name: float | None}`` on every process, bit for bit (float64 travels as int32
  pairs; ``None``, a validator that could not score, as NaN, so the values must not be NaN).

  For host-side numbers that decide collective actions, such as which evaluation a validator
  picks (its checkpoint save is collective): each process computes them from the same replicated
  outputs, but a BLAS with another thread count may round them differently.
  """
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  names = list(values)
  sent = [np.nan if values[k] is None else values[k] for k in names]
  bits = np.array(sent, np.float64).view(np.int32)
  bits = np.asarray(multihost_utils.broadcast_one_to_all(bits), np.int32)
  got = (None if np.isnan(v) else float(v) for v in bits.view(np.float64))
  return dict(zip(names, got))


def every_process(ok: bool) -> bool:
  """True only if ``ok`` on every process (all processes call it, in the same order)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def check_batch_sizes(config, mesh: Mesh) -> None:
  """Fails fast (before a run writes anything) when a global batch does not split over the mesh."""
  n = mesh.devices.size
  for field, size in (
    ("batch_size", config.batch_size),
    ("data.eval_batch_size", config.data.eval_batch_size),
  ):
    if size % n:
      raise UserError(
        f"config.{field}={size} cannot be split over {n} devices: make it a "
        "multiple of the device count"
      )


def to_global(batch, mesh: Mesh):
  """This process's part of a batch (a pytree of host arrays) -> global arrays sharded on 'data'.

  Each process passes only its own rows (global batch = rows per process x process count); the
  rows of one process must split evenly over its local devices.
  """
  sharding = data_sharding(mesh)
  n_local = len(mesh.local_devices)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % n_local:
      raise UserError(
        f"a batch array of shape {x.shape} cannot be split over {n_local} local "
        "devices: make the per-process batch size a multiple of the device count"
      )
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, batch)


def create_sharded_state(
  mesh: Mesh, rng: jax.Array, config, model, image_shape, pretrained: dict | None = None
) -> train_step_lib.TrainState:
  """``train_step.create_train_state`` run under jit with a replicated output sharding."""
  init = functools.partial(
    train_step_lib.create_train_state, config=config, model=model, image_shape=tuple(image_shape)
  )
  rng, pretrained = replicate((rng, pretrained), mesh)
  return jax.jit(init, out_shardings=replicated(mesh))(rng, pretrained=pretrained)


def jit_train_step(mesh: Mesh, cfg, step_fn=train_step_lib.train_step):
  """``step(state, global_batch, rng) -> (state, metrics)``, compiled once, state donated.

  ``global_batch`` from ``to_global``; ``rng`` a fixed base key, best ``replicate``-d once (the
  step folds in its step number). ``step_fn`` is for tests (e.g. counting traces).
  """
  rep = replicated(mesh)
  return jax.jit(
    functools.partial(step_fn, cfg=cfg),
    in_shardings=(rep, data_sharding(mesh), rep),
    out_shardings=(rep, rep),
    donate_argnums=0,
  )
