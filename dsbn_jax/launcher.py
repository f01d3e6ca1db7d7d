"""The launcher: how many processes a run has, which one this is, and which local devices it drives.

A run is started one of these ways, decided from the environment alone (``plan``, a pure function,
unit-tested in tests/launcher_test.py) and acted on once per process, before anything touches a
device (``start``, called by ``dsbn_jax.main`` and ``dsbn_jax.sweep``):

- **explicit**: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or
  the count and rank a launcher below gives) -- ``jax.distributed.initialize`` with them;
- **Open MPI** (``mpirun``): ``OMPI_MCA_orte_hnp_uri`` (Open MPI 4 and earlier) -- JAX's own
  detection (``jax/_src/clusters/ompi_cluster.py``): the coordinator is the ``mpirun`` host, its
  port derived from the job id;
- **SLURM** (``srun``): ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``,
  ``SLURM_PROCID``, ``SLURM_LOCALID`` -- JAX's own detection (``slurm_cluster.py``): the coordinator
  is the step's first node, its port derived from the job id;
- **Cloud TPU** (``gcloud compute tpus tpu-vm ssh --worker=all``): a Cloud TPU VM (JAX's
  ``running_in_cloud_tpu_vm``) -- JAX's own detection (``cloud_tpu_cluster.py``: the VM's metadata
  on GCE, ``TPU_WORKER_HOSTNAMES`` on GKE);
- otherwise one process on every local device.

The order is JAX's (``jax/_src/clusters/__init__.py``): ``mpirun`` inside a SLURM allocation is an
Open MPI launch. A launch with one process does not initialise anything.

JAX's one choice we override is the local devices: under ``srun`` and ``mpirun`` it gives each
process the one GPU of its local rank, so one task per node would leave 7 of 8 GPUs idle. Here a
process drives every GPU it sees when it is alone on its node (or when the launcher already gave
each task its own GPUs: ``srun --gpus-per-task``), one GPU per process when there are as many
processes on the node as GPUs, an equal block otherwise (``local_device_ids``); a split that would
leave GPUs idle or share one is an error. ``JAX_LOCAL_DEVICE_IDS`` (JAX's own variable) chooses by
hand.

A launch that leaves processes believing they are alone while the environment says there are
several (``mpirun`` of Open MPI 5, MPICH's ``PMI_SIZE``, ``JAX_NUM_PROCESSES`` without a
coordinator) is a one-line error; a SLURM allocation entered without ``srun`` is a ``warning:``.
On CPU the processes' collectives use gloo (set whenever this initialises).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import NamedTuple

from dsbn_jax.errors import UserError

# The variables JAX's cluster detection reads (jax/_src/clusters/): SlurmCluster.is_env_present
# needs all of these, OmpiCluster.is_env_present the URI mpirun (Open MPI <= 4) sets.
SLURM_VARS = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)
OMPI_URI = "OMPI_MCA_orte_hnp_uri"
# GkeTpuCluster's list of the slice's workers.
GKE_TPU_HOSTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")

# Launchers' variables, which a test's subprocess must not inherit from the machine that runs the
# suite (tests/suite_env.py drops them).
CLUSTER_ENV_PREFIXES = (
  "SLURM_",
  "SLURMD_",
  "OMPI_",
  "PMIX_",
  "PMI_",
  "PALS_",
  "TPU_",
  "MEGASCALE_",
)

_DOCS = "README, Multi-device and multi-host"


@dataclasses.dataclass(frozen=True)
class Plan:
  """What ``start`` does for this process: ``plan``'s answer."""

  launcher: str  # "single", "explicit", "ompi", "slurm" or "tpu"
  how: str  # in words: "srun (SLURM job 42)", "mpirun (Open MPI)", ...
  initialize: bool  # whether jax.distributed.initialize runs
  num_processes: int | None = 1  # None: JAX finds out (Cloud TPU)
  process_id: int | None = 0
  tasks_on_node: int | None = None  # processes on this node, when the launcher says
  gpus: int = 0  # GPUs this process sees
  local_device_ids: tuple[int, ...] | None = None  # None: JAX's choice (all; CPU and TPU)
  coordinator_address: str | None = None  # explicit only (the others: JAX derives it)
  warnings: tuple[str, ...] = ()

  def initialize_kwargs(self) -> dict:
    """The arguments of ``jax.distributed.initialize``."""
    kwargs = {}
    if self.launcher == "explicit":
      kwargs.update(
        coordinator_address=self.coordinator_address,
        num_processes=self.num_processes,
        process_id=self.process_id,
      )
    elif self.launcher in ("slurm", "ompi"):
      # JAX's detection of the same launcher gives the coordinator address and the process id.
      kwargs.update(cluster_detection_method=self.launcher, num_processes=self.num_processes)
    if self.launcher != "tpu":  # JAX never restricts a TPU VM's devices
      kwargs["local_device_ids"] = (
        None if self.local_device_ids is None else list(self.local_device_ids)
      )
    return kwargs

  def describe(self) -> str:
    """The start-up line of a multi-process launch (process 0 prints it)."""
    n = "?" if self.num_processes is None else self.num_processes
    node = "" if self.tasks_on_node is None else f" ({self.tasks_on_node} on this node)"
    return f"launch: {self.how}, {n} processes{node}, this process's devices: {self._devices()}"

  def _devices(self) -> str:
    ids = self.local_device_ids
    if ids is None or not self.gpus:
      return "all it sees"
    if len(ids) == self.gpus:
      return f"all {self.gpus} GPUs it sees"
    span = f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"
    return f"GPU{'s' if len(ids) > 1 else ''} {span} of the {self.gpus} it sees"


def _int(env: Mapping[str, str], name: str) -> int | None:
  """``env[name]`` as an int (None when unset); a one-line error when it is not a number."""
  value = env.get(name)
  if value is None or value.strip() == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{name}={value!r} is not a whole number: set it to one, or unset it") from None


def _tasks_per_node(spec: str | None, node: int | None) -> int | None:
  """SLURM's ``2(x3),1`` (tasks on each node of the step, in order) at node index ``node``; None
  when it cannot be told."""
  if not spec:
    return None
  counts = []
  for part in spec.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if m is None:
      return None
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  if len(set(counts)) == 1:
    return counts[0]
  if node is not None and 0 <= node < len(counts):
    return counts[node]
  return None


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
  node = _int(env, "SLURM_NODEID")
  for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if (n := _tasks_per_node(env.get(name), node)) is not None:
      return n
  if _int(env, "SLURM_STEP_NUM_NODES") == 1:
    return _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
  return _int(env, "SLURM_NTASKS_PER_NODE")


class _Cluster(NamedTuple):
  """What a launcher's variables say of this process."""

  kind: str  # "ompi" and "slurm": JAX detects them; "ompi5" and "pmi": it does not
  how: str  # in words, for messages
  count: int | None  # processes in all
  rank: int | None  # this one's
  local_rank: int | None  # its index among the processes of its node
  tasks_on_node: int | None  # processes on its node


def _cluster(env: Mapping[str, str]) -> _Cluster | None:
  """The launcher that started this process, in JAX's order (Open MPI before SLURM: ``mpirun``
  inside a SLURM allocation runs its processes under SLURM's variables, which then describe
  ``mpirun``'s daemons, not them), or None."""
  if "OMPI_COMM_WORLD_SIZE" in env or OMPI_URI in env:
    return _Cluster(
      "ompi" if OMPI_URI in env else "ompi5",
      "mpirun (Open MPI)",
      _int(env, "OMPI_COMM_WORLD_SIZE"),
      _int(env, "OMPI_COMM_WORLD_RANK"),
      _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
      _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
    )
  pmi = None
  if "PMI_SIZE" in env:  # MPICH / Intel MPI (hydra), Cray PALS; also srun --mpi=pmi2
    local = _int(env, "MPI_LOCALRANKID")
    pmi = _Cluster(
      "pmi",
      "an MPI launcher (PMI)",
      _int(env, "PMI_SIZE"),
      _int(env, "PMI_RANK"),
      local if local is not None else _int(env, "PALS_LOCAL_RANKID"),
      _int(env, "MPI_LOCALNRANKS"),
    )
  if all(v in env for v in SLURM_VARS):
    slurm = _Cluster(
      "slurm",
      f"srun (SLURM job {env['SLURM_JOB_ID']})",
      _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS"),
      _int(env, "SLURM_PROCID"),
      _int(env, "SLURM_LOCALID"),
      _slurm_tasks_on_node(env),
    )
    # srun's own PMI agrees with it; another MPI's launcher inside the allocation does not.
    if pmi is None or (pmi.count, pmi.rank) == (slurm.count, slurm.rank):
      return slurm
  return pmi


def local_device_ids(
  env: Mapping[str, str], gpus: int, tasks_on_node: int | None, local_rank: int | None
) -> tuple[tuple[int, ...] | None, tuple[str, ...]]:
  """``(ids, warnings)``: the GPUs (numbered as this process sees them) this process drives, given
  the ``gpus`` it sees and the ``tasks_on_node`` processes that share its node (``local_rank`` its
  index among them); None leaves JAX's choice (no GPU: CPU devices ignore the ids, TPUs are never
  restricted; or ``JAX_LOCAL_DEVICE_IDS``, which JAX reads itself).

  Every GPU a process sees when it is alone on its node or when the launcher gave each task its
  own (``srun --gpus-per-task``, or fewer GPUs visible than tasks on the node with
  ``CUDA_VISIBLE_DEVICES`` set); one per process when there are as many processes as GPUs; an
  equal block when they divide. A split that leaves GPUs idle or makes processes share one is a
  one-line error."""
  if gpus <= 0 or env.get("JAX_LOCAL_DEVICE_IDS"):
    return None, ()
  every = tuple(range(gpus))
  if "SLURM_GPUS_PER_TASK" in env and "SLURM_JOB_ID" in env:
    return every, ()  # srun --gpus-per-task: CUDA_VISIBLE_DEVICES holds this task's own GPUs
  if tasks_on_node is None or local_rank is None or not 0 <= local_rank < tasks_on_node:
    return every, (
      f"the launcher does not say how many processes share this node: this process drives all "
      f"{gpus} GPUs it sees; if several share the node, choose each one's GPUs with "
      "JAX_LOCAL_DEVICE_IDS",
    )
  if tasks_on_node == 1:
    return every, ()
  if gpus < tasks_on_node:
    if env.get("CUDA_VISIBLE_DEVICES"):  # the launcher gave each task its own GPUs
      return every, ()
    raise UserError(
      f"{tasks_on_node} processes on this node share its {gpus} GPU{'s' if gpus > 1 else ''}: "
      f"start at most {gpus} per node (one per GPU), or 1 per node to drive them all ({_DOCS})"
    )
  if gpus % tasks_on_node:
    raise UserError(
      f"{tasks_on_node} processes on this node cannot share its {gpus} GPUs evenly "
      f"({gpus % tasks_on_node} would sit idle): start 1 process per node (it drives every GPU) "
      f"or one per GPU ({gpus}), or choose each one's GPUs with JAX_LOCAL_DEVICE_IDS ({_DOCS})"
    )
  k = gpus // tasks_on_node
  return tuple(range(local_rank * k, (local_rank + 1) * k)), ()


def plan(env: Mapping[str, str], gpus: int = 0, cloud_tpu_vm: bool = False) -> Plan:
  """How this process starts, from its environment ``env``, the number of ``gpus`` it sees and
  whether it runs on a Cloud TPU VM (JAX's ``running_in_cloud_tpu_vm``). Pure: no JAX call, no
  network. A launch that cannot work is a ``UserError``."""
  c = _cluster(env)
  coordinator = env.get("JAX_COORDINATOR_ADDRESS")
  explicit_n = _int(env, "JAX_NUM_PROCESSES")
  explicit_id = _int(env, "JAX_PROCESS_ID")

  if coordinator:
    n = explicit_n if explicit_n is not None else c and c.count
    pid = explicit_id if explicit_id is not None else c and c.rank
    if n is None or pid is None:
      missing = "JAX_NUM_PROCESSES" if n is None else "JAX_PROCESS_ID"
      raise UserError(
        f"JAX_COORDINATOR_ADDRESS={coordinator} is set but not {missing}, and no launcher "
        f"(srun, mpirun) says it: set JAX_NUM_PROCESSES and JAX_PROCESS_ID in every process"
      )
    if not 0 <= pid < n:
      raise UserError(
        f"process id {pid} (JAX_PROCESS_ID) is not between 0 and {n - 1} (JAX_NUM_PROCESSES={n})"
      )
    ids, warn = local_device_ids(env, gpus, c.tasks_on_node, c.local_rank) if c else (None, ())
    how = f"JAX_COORDINATOR_ADDRESS={coordinator}"
    return Plan("explicit", how, True, n, pid, c and c.tasks_on_node, gpus, ids, coordinator, warn)

  if explicit_n is not None and explicit_n > 1:
    raise UserError(
      f"JAX_NUM_PROCESSES={explicit_n} but JAX_COORDINATOR_ADDRESS is not set, so each process "
      "would train alone: set JAX_COORDINATOR_ADDRESS=<host of process 0>:<free port> in every "
      f"process ({_DOCS})"
    )

  if c is not None and c.kind in ("ompi", "slurm"):  # JAX detects these by itself
    if c.count is None or c.rank is None or not 0 <= c.rank < c.count:
      raise UserError(f"{c.how} says this is process {c.rank} of {c.count}, which cannot be")
    if c.count == 1:
      return Plan("single", c.how, False, 1, 0, c.tasks_on_node, gpus)
    ids, warn = local_device_ids(env, gpus, c.tasks_on_node, c.local_rank)
    return Plan(c.kind, c.how, True, c.count, c.rank, c.tasks_on_node, gpus, ids, None, warn)

  if c is not None and c.count is not None and c.count > 1:  # JAX would not find the others
    if c.kind == "ompi5":
      raise UserError(
        f"this process is 1 of {c.count} started by Open MPI's mpirun (OMPI_COMM_WORLD_SIZE="
        f"{c.count}) without {OMPI_URI} (Open MPI 5 and later), from which JAX finds the "
        "coordinator: give every process one, e.g. mpirun -x JAX_COORDINATOR_ADDRESS=<first "
        f"host>:<free port> ... ({_DOCS})"
      )
    raise UserError(
      f"this process is 1 of {c.count} started by {c.how} (PMI_SIZE={c.count}), which JAX does "
      "not detect: give every process JAX_COORDINATOR_ADDRESS=<first host>:<free port> (the "
      f"count and rank are then read from PMI_SIZE and PMI_RANK) ({_DOCS})"
    )

  if cloud_tpu_vm:
    hosts = next((env[v] for v in GKE_TPU_HOSTS if v in env), None)
    if hosts is not None:  # GKE: the slice's workers are in the environment
      n = len([h for h in hosts.split(",") if h.strip()]) * (_int(env, "MEGASCALE_NUM_SLICES") or 1)
      if n > 1:
        return Plan("tpu", "Cloud TPU (GKE)", True, n, None)
    elif "TPU_SKIP_MDS_QUERY" not in env:  # GCE: the VM's metadata says how many (JAX reads it)
      return Plan("tpu", "Cloud TPU VM", True, None, None)

  warnings = ()
  slurm_tasks = _int(env, "SLURM_NTASKS")
  if "SLURM_JOB_ID" in env and slurm_tasks is not None and slurm_tasks > 1:
    warnings = (
      f"this runs as 1 process, but inside SLURM job {env['SLURM_JOB_ID']} of {slurm_tasks} "
      f"tasks (SLURM_NTASKS={slurm_tasks}) without srun: the job's other tasks stay idle; start "
      f"it with srun to use them all ({_DOCS})",
    )
  return Plan("single", "one process", False, 1, 0, gpus=gpus, warnings=warnings)


def require_single_process(env: Mapping[str, str] | None = None, what: str = "predict") -> None:
  """A one-line error when the environment says this process is one of several (srun, mpirun,
  an MPI's PMI, ``JAX_NUM_PROCESSES``): ``what`` runs as one process, and several would each do
  the whole job and write the same files."""
  env = os.environ if env is None else env
  c = _cluster(env)
  n, how = (c.count, c.how) if c is not None else (None, None)
  explicit_n = _int(env, "JAX_NUM_PROCESSES")
  if explicit_n is not None:
    n, how = explicit_n, "JAX_NUM_PROCESSES"
  if n is not None and n > 1:
    raise UserError(
      f"{what} runs as a single process, but this one was started as 1 of {n} by {how}: start "
      "it once (srun -n 1, or without mpirun)"
    )


def _cuda_plugin_installed() -> bool:
  """Whether JAX has a GPU plugin to load (jax-cuda12/13-pjrt: ``jax_plugins.xla_cuda*``)."""
  import pkgutil  # pylint: disable=g-import-not-at-top

  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return any(m.name.startswith("xla_cuda") for m in pkgutil.iter_modules(jax_plugins.__path__))


def visible_gpu_count(
  env: Mapping[str, str] | None = None,
  platforms: str | None = None,
  plugin: bool | None = None,
  proc_dir: str = "/proc/driver/nvidia/gpus",
) -> int:
  """The NVIDIA GPUs JAX would see in this process, counted without starting JAX's backend (which
  ``jax.distributed.initialize`` must precede): 0 when ``platforms`` (``jax_platforms``) leaves
  the GPU out or no CUDA plugin is installed; else the entries of ``CUDA_VISIBLE_DEVICES`` (up
  to the first negative one, as CUDA reads it) when it is set; else the driver's GPUs."""
  env = os.environ if env is None else env
  if platforms and not {p.strip() for p in platforms.split(",")} & {"cuda", "gpu"}:
    return 0
  if not (_cuda_plugin_installed() if plugin is None else plugin):
    return 0
  visible = env.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    n = 0
    for entry in visible.split(","):
      if not entry.strip() or entry.strip().startswith("-"):
        break
      n += 1
    return n
  try:
    return len(os.listdir(proc_dir))
  except OSError:
    pass
  try:
    return sum(bool(re.fullmatch(r"nvidia\d+", d)) for d in os.listdir("/dev"))
  except OSError:
    return 0


def _on_cloud_tpu_vm() -> bool:
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top

    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except Exception:  # pylint: disable=broad-except  (a JAX without it: not a TPU VM we know)
    return False


def _failed(p: Plan, e: BaseException) -> str:
  first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
  n = "the" if p.num_processes is None else f"the {p.num_processes}"
  hint = {
    "tpu": "start it on every worker (gcloud ... ssh --worker=all)",
    "slurm": "start it in every task (srun); if another step of this job on the node holds the "
    "port, set JAX_COORDINATOR_PORT",
    "ompi": "start it in every rank (mpirun); if another job holds the port, set "
    "JAX_COORDINATOR_PORT",
  }.get(p.launcher, "start it in every process, with the same JAX_COORDINATOR_ADDRESS")
  return f"{p.how}: {n} processes could not meet ({first[:300]}); {hint} ({_DOCS})"


def start(env: Mapping[str, str] | None = None) -> Plan:
  """Starts this process as ``plan`` says: ``jax.distributed.initialize`` for a multi-process
  launch (gloo collectives on CPU), nothing for one process. Process 0 prints the launch's
  ``warning:`` lines and, with several processes, one ``launch:`` line. Call it once, before
  anything touches a JAX device. Returns the plan (``initialize`` False when JAX was already
  initialised)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.distributed.is_initialized():
    return Plan("explicit", "already initialised", False, jax.process_count(), jax.process_index())
  env = os.environ if env is None else env
  platforms = jax.config.jax_platforms or env.get("JAX_PLATFORMS")
  p = plan(env, visible_gpu_count(env, platforms), _on_cloud_tpu_vm())
  if p.initialize:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # no effect on GPU/TPU
    try:
      jax.distributed.initialize(**p.initialize_kwargs())
    except (RuntimeError, ValueError) as e:
      raise UserError(_failed(p, e)) from e
    if p.process_id is None:  # Cloud TPU: JAX found out
      p = dataclasses.replace(p, num_processes=jax.process_count(), process_id=jax.process_index())
  if p.process_id == 0:
    for w in p.warnings:
      print(f"warning: {w}", flush=True)
    if p.initialize:
      print(p.describe(), flush=True)
  return p
