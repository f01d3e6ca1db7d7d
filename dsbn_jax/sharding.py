"""Devices: the mesh, shardings, global batches, the sharded state and the jitted train step.

Data parallelism is plain ``jax.jit`` over a 1-axis mesh ``('data',)`` spanning every device of
every process: batches are sharded along their leading axis, the train state is replicated, and
XLA inserts the gradient all-reduce. BatchNorm then normalises with *global*-batch statistics
(the means in ``DomainSpecificBatchNorm`` are over the whole sharded batch): synchronised BN, so N
devices compute what one device holding the whole batch computes, up to float reduction order.
The eval step is jitted the same way, beside it in ``evaluation.jit_eval_step``.

Any global batch runs on any device count: ``input_pipeline`` pads each domain's global batch to
the next multiple of the device count (``padded_batch_size``) with rows whose 'mask' is False, and
the train step leaves them out of every loss, BN statistic, metric and gradient
(``train_step.padding_mask``); eval batches are filled with real images up to that multiple.
"""

import collections
import functools
import itertools

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsbn_jax import device_augment
from dsbn_jax import train_step as train_step_lib
from dsbn_jax.errors import UserError

DATA_AXIS = "data"


def maybe_initialize_distributed() -> bool:
  """Starts this process as its launcher says (``dsbn_jax.launcher.start``: srun, mpirun, Cloud
  TPU, ``JAX_COORDINATOR_ADDRESS``, or one process); returns whether JAX runs distributed. Must
  run before anything touches a JAX device."""
  from dsbn_jax import launcher  # pylint: disable=g-import-not-at-top

  launcher.start()
  return jax.distributed.is_initialized()


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


def padded_batch_size(batch_size: int, num_devices: int) -> int:
  """The rows a global batch of ``batch_size`` takes on ``num_devices`` devices: the next multiple
  of the device count (``input_pipeline.batch_layout``; the extra rows are masked padding)."""
  return -(-batch_size // num_devices) * num_devices


def describe(mesh: Mesh, config, workdir: str) -> str:
  """The one start-up line of a run: where it computes, how, and with which global batch (and
  its padding, when the device count does not divide it)."""
  kinds = collections.Counter(d.device_kind for d in mesh.devices.flat)
  devices = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
  n_proc = jax.process_count()
  axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
  n, b, e = mesh.devices.size, config.batch_size, config.data.eval_batch_size
  padded, eval_rows = padded_batch_size(b, n), padded_batch_size(e, n)
  batch = f"batch {b} + {b} (source + target, global"
  if padded != b:
    batch += f"; padded to {padded} per domain over {n} devices, {padded - b} masked rows"
  batch += ")"
  if eval_rows != e:
    batch += f", eval batch {eval_rows} (data.eval_batch_size {e} rounded up to {n} devices)"
  return (
    f"dsbn_jax: platform {platform(mesh)}, {devices}, {n_proc} process"
    f"{'es' if n_proc > 1 else ''}, mesh {axes}, compute {config.model.dtype}, matmul "
    f"precision {config.model.matmul_precision}, {batch}, workdir {workdir}"
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


def check_batch_sizes(config, mesh: Mesh) -> None:  # pylint: disable=unused-argument
  """Fails fast (before a run writes anything) when the mesh cannot hold the global batches.

  Any batch size fits any device count (padded: ``padded_batch_size``); what the layout needs is
  as many of the mesh's devices on every process, each process feeding an equal share of rows.
  """
  per_process = collections.Counter(d.process_index for d in mesh.devices.flat)
  if len(set(per_process.values())) > 1:
    raise UserError(
      f"the mesh's devices are spread unevenly over the processes ({dict(per_process)} "
      "devices per process): give every process as many devices"
    )


def to_global(batch, mesh: Mesh):
  """This process's part of a batch (a pytree of host arrays) -> global arrays sharded on 'data'.

  Each process passes only its own rows (global batch = rows per process x process count); the
  rows of one process must split evenly over its local devices.
  """
  sharding = data_sharding(mesh)
  n_local = len(mesh.local_devices)

  def check(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % n_local:
      raise UserError(
        f"a batch array of shape {x.shape} cannot be split over {n_local} local "
        "devices: make the per-process batch size a multiple of the device count"
      )
    return x

  batch = jax.tree.map(check, batch)
  if jax.process_count() == 1:  # the process's rows are the global batch: one transfer call
    return jax.device_put(batch, sharding)
  put = functools.partial(jax.make_array_from_process_local_data, sharding)
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


def jit_train_step(
  mesh: Mesh,
  cfg,
  step_fn=train_step_lib.train_step,
  train_input: str = "host",
  watch: bool = False,
):
  """``step(state, global_batch, rng) -> (state, metrics)``, compiled once, state donated.

  ``global_batch`` from ``to_global``; ``rng`` a fixed base key, best ``replicate``-d once (the
  step folds in its step number). ``step_fn`` is for tests (e.g. counting traces).
  ``train_input`` 'device' or 'resident' (``device_augment.resolve_train_input``): the batch holds
  uint8 rows (or cache row numbers) with their draws, augmented inside the step
  (``device_augment.train_batch``); 'resident' adds a last argument, the domains' resized caches
  (``replicate``-d: every device gathers its own rows).
  ``watch``: the train loop's form, ``step(state, watch, global_batch, rng) -> (state, watch,
  metrics)``, the on-device watch (``train_step.watch_step``: finite check, log-window sums)
  updated in the same computation (one dispatch per step), both donated.
  """
  rep, data = replicated(mesh), data_sharding(mesh)
  step = functools.partial(step_fn, cfg=cfg)
  if train_input != "host":
    plain = step

    def step(state, batch, rng, images=None):
      return plain(state, device_augment.train_batch(batch, cfg.data, images), rng)

  shardings = (rep, data, rep) + ((rep,) if train_input == "resident" else ())
  if not watch:
    return jax.jit(step, in_shardings=shardings, out_shardings=(rep, rep), donate_argnums=0)

  def watched_step(state, watched, batch, rng, *images):
    state, metrics = step(state, batch, rng, *images)
    return state, train_step_lib.watch_step(watched, metrics, state.step), metrics

  return jax.jit(
    watched_step,
    in_shardings=(rep, rep, *shardings[1:]),
    out_shardings=(rep, rep, rep),
    donate_argnums=(0, 1),
  )


def prefetch_to_global(batches, mesh: Mesh, size: int = 2):
  """``to_global`` of each host batch of ``batches``, ``size`` of them staged on the devices ahead
  of the consumer: while a step runs on one batch, the next one's host-to-device copy is already
  under way (``to_global`` only enqueues it), so no step waits for its input's transfer and the
  loop never blocks on one. ``batches`` is read ``size`` batches ahead of the consumer."""
  batches = iter(batches)
  queue = collections.deque()

  def stage(n: int) -> None:
    for batch in itertools.islice(batches, n):
      queue.append(to_global(batch, mesh))

  stage(size)
  while queue:
    yield queue.popleft()
    stage(1)
