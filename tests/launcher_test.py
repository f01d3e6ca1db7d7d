"""The launcher (dsbn_jax/launcher.py): which launch each environment is, what JAX is asked, which
local GPUs each process drives, and the errors and warnings of launches that cannot work, all
decided from the environment alone (no process is started here; the real 2-process runs under
SLURM's and Open MPI's variables are in tests/train_test.py). Where JAX detects the launcher
itself, its own cluster code (jax/_src/clusters/) is asked the same environment and must agree."""

import contextlib
import os
import re

import pytest

from dsbn_jax import launcher
from dsbn_jax.errors import UserError
from tests import cli_driver, suite_env

# srun -N 1 -n 2 (what SLURM sets that JAX and the launcher read), task 1 of 2.
SRUN_2 = {
  "SLURM_JOB_ID": "4242",
  "SLURM_STEP_NODELIST": "localhost",
  "SLURM_NTASKS": "2",
  "SLURM_STEP_NUM_TASKS": "2",
  "SLURM_PROCID": "1",
  "SLURM_LOCALID": "1",
  "SLURM_NODEID": "0",
  "SLURM_STEP_NUM_NODES": "1",
  "SLURM_STEP_TASKS_PER_NODE": "2",
}
# mpirun -np 2 of Open MPI 4 on one host, rank 1 of 2.
MPIRUN_2 = {
  "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1,10.0.0.1:34911",
  "OMPI_COMM_WORLD_SIZE": "2",
  "OMPI_COMM_WORLD_RANK": "1",
  "OMPI_COMM_WORLD_LOCAL_RANK": "1",
  "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}


def _srun(tasks_per_node: int, nodes: int = 1, rank: int = 0, **extra) -> dict:
  """srun -N nodes --ntasks-per-node=tasks_per_node: the variables of global task ``rank``."""
  env = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": f"node[001-{nodes:03d}]" if nodes > 1 else "node001",
    "SLURM_NTASKS": str(tasks_per_node * nodes),
    "SLURM_STEP_NUM_TASKS": str(tasks_per_node * nodes),
    "SLURM_PROCID": str(rank),
    "SLURM_LOCALID": str(rank % tasks_per_node),
    "SLURM_NODEID": str(rank // tasks_per_node),
    "SLURM_STEP_NUM_NODES": str(nodes),
    "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})"
    if nodes > 1
    else f"{tasks_per_node}",
  }
  env.update(extra)
  return env


def _mpirun(local_size: int, nodes: int = 1, rank: int = 0) -> dict:
  return {
    "OMPI_MCA_orte_hnp_uri": "4096.0;tcp://10.0.0.1:5000",
    "OMPI_COMM_WORLD_SIZE": str(local_size * nodes),
    "OMPI_COMM_WORLD_RANK": str(rank),
    "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % local_size),
    "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
  }


@contextlib.contextmanager
def _as_environ(monkeypatch, env: dict):
  """Within: the process environment is ``env`` as far as launchers go (what JAX's cluster
  classes read), every other launcher variable removed."""
  with monkeypatch.context() as m:
    for k in list(os.environ):
      if k.startswith(("JAX_", *launcher.CLUSTER_ENV_PREFIXES)):
        m.delenv(k)
    for k, v in env.items():
      m.setenv(k, v)
    yield


def _jax_detects(monkeypatch, env: dict):
  """The cluster class JAX's ``initialize()`` without arguments would pick for ``env`` (None)."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top

  with _as_environ(monkeypatch, env):
    return next(
      (
        c
        for c in clusters.ClusterEnv._cluster_types
        if not c.opt_in_only_method and c.is_env_present()
      ),
      None,
    )


# ---------------------------------------------------------------------------------------------
# Which launch, and what JAX is asked
# ---------------------------------------------------------------------------------------------


def test_no_launcher_is_one_process_that_initialises_nothing():
  for gpus in (0, 8):
    p = launcher.plan({"PATH": "/bin"}, gpus)
    assert (p.launcher, p.initialize, p.num_processes, p.process_id) == ("single", False, 1, 0)
    assert p.local_device_ids is None and p.warnings == ()


def test_explicit_jax_variables_initialise_as_before():
  """JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID: the same call as before the
  launcher existed (no local device choice without a launcher that says who shares the node)."""
  env = {
    "JAX_COORDINATOR_ADDRESS": "host0:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "2",
  }
  p = launcher.plan(env, gpus=8)
  assert (p.launcher, p.initialize, p.process_id) == ("explicit", True, 2)
  assert p.initialize_kwargs() == {
    "coordinator_address": "host0:1234",
    "num_processes": 4,
    "process_id": 2,
    "local_device_ids": None,
  }
  single = launcher.plan({**env, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"})
  assert single.initialize  # as before: a 1-process job is initialised when asked for


def test_explicit_coordinator_takes_count_and_rank_from_a_launcher_jax_does_not_read():
  """Open MPI 5 (no OMPI_MCA_orte_hnp_uri) and MPICH/Intel MPI (PMI_*): JAX cannot find the
  coordinator, the user gives it; the count and the rank come from the launcher."""
  ompi5 = {k: v for k, v in MPIRUN_2.items() if k != launcher.OMPI_URI}
  for env, n, rank in ((ompi5, 2, 1), ({"PMI_SIZE": "4", "PMI_RANK": "3"}, 4, 3)):
    p = launcher.plan({**env, "JAX_COORDINATOR_ADDRESS": "h:9"})
    assert p.launcher == "explicit"
    assert p.initialize_kwargs() == {
      "coordinator_address": "h:9",
      "num_processes": n,
      "process_id": rank,
      "local_device_ids": None,
    }


@pytest.mark.parametrize(
  "env, expected",
  [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "is set but not JAX_NUM_PROCESSES"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "is set but not JAX_PROCESS_ID"),
    (
      {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
      "process id 2 (JAX_PROCESS_ID) is not between 0 and 1",
    ),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not a whole number"),
    (
      {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
      "JAX_NUM_PROCESSES=2 but JAX_COORDINATOR_ADDRESS is not set, so each process would train "
      "alone",
    ),
    (
      {k: v for k, v in MPIRUN_2.items() if k != launcher.OMPI_URI},
      "1 of 2 started by Open MPI's mpirun (OMPI_COMM_WORLD_SIZE=2) without "
      "OMPI_MCA_orte_hnp_uri (Open MPI 5 and later)",
    ),
    (
      {"PMI_SIZE": "4", "PMI_RANK": "0"},
      "1 of 4 started by an MPI launcher (PMI) (PMI_SIZE=4), which JAX does not detect",
    ),
    (  # MPICH's mpiexec inside a SLURM allocation: SLURM's variables describe its proxy
      {**_srun(1, nodes=2), "PMI_SIZE": "8", "PMI_RANK": "5"},
      "1 of 8 started by an MPI launcher (PMI)",
    ),
    (  # Open MPI 5's mpirun inside a SLURM allocation: likewise
      {**_srun(1, nodes=2), "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"},
      "1 of 8 started by Open MPI's mpirun",
    ),
  ],
)
def test_launches_whose_processes_cannot_meet_are_one_line_errors(env, expected):
  with pytest.raises(UserError) as e:
    launcher.plan(env)
  assert expected in str(e.value) and "\n" not in str(e.value)


def test_srun_is_detected_as_jax_detects_it(monkeypatch):
  """Two tasks started by srun on one node, SLURM's variables only: JAX's own SLURM detection
  finds the coordinator (the step's first node, a port from the job id) and the process id; the
  launcher asks it by name, with the count and the local devices."""
  p = launcher.plan(SRUN_2)
  assert (p.launcher, p.initialize, p.num_processes, p.process_id) == ("slurm", True, 2, 1)
  assert p.tasks_on_node == 2 and p.how == "srun (SLURM job 4242)"
  assert p.initialize_kwargs() == {
    "cluster_detection_method": "slurm",
    "num_processes": 2,
    "local_device_ids": None,
  }
  cluster = _jax_detects(monkeypatch, SRUN_2)
  assert cluster is not None and cluster.name == "slurm"
  with _as_environ(monkeypatch, SRUN_2):
    assert cluster.get_process_count() == 2 and cluster.get_process_id() == 1
    port = 4242 % 2**12 + 65535 - 2**12 + 1
    assert cluster.get_coordinator_address(None, None) == f"localhost:{port}"
  many = _srun(4, nodes=3, rank=9)
  with _as_environ(monkeypatch, many):
    assert cluster.get_coordinator_address(None, None).startswith("node001:")
  assert launcher.plan(many).process_id == 9 and launcher.plan(many).tasks_on_node == 4


def test_srun_of_one_task_initialises_nothing():
  p = launcher.plan(_srun(1), gpus=8)
  assert (p.launcher, p.initialize, p.warnings) == ("single", False, ())


def test_mpirun_is_detected_as_jax_detects_it(monkeypatch):
  p = launcher.plan(MPIRUN_2)
  assert (p.launcher, p.initialize, p.num_processes, p.process_id) == ("ompi", True, 2, 1)
  assert p.initialize_kwargs() == {
    "cluster_detection_method": "ompi",
    "num_processes": 2,
    "local_device_ids": None,
  }
  cluster = _jax_detects(monkeypatch, MPIRUN_2)
  assert cluster is not None and cluster.name == "ompi"
  with _as_environ(monkeypatch, MPIRUN_2):
    assert cluster.get_process_count() == 2 and cluster.get_process_id() == 1
    assert cluster.get_coordinator_address(None, None).startswith("127.0.0.1:")
  assert launcher.plan({**MPIRUN_2, "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}) == (
    launcher.Plan("single", "mpirun (Open MPI)", False, 1, 0, 2, 0)
  )


def test_mpirun_inside_a_slurm_allocation_is_open_mpi_as_for_jax(monkeypatch):
  """mpirun starts its daemons with srun, so its processes also carry SLURM's variables (of the
  daemons: one task per node). JAX checks Open MPI first; so does the launcher."""
  env = {**_srun(1, nodes=2), **_mpirun(4, nodes=2, rank=6)}
  p = launcher.plan(env, gpus=4)
  assert (p.launcher, p.num_processes, p.process_id, p.local_device_ids) == ("ompi", 8, 6, (2,))
  assert _jax_detects(monkeypatch, env).name == "ompi"


def test_slurm_allocation_entered_without_srun_warns_and_runs_alone(monkeypatch):
  """salloc's shell (or sbatch's script) starts python itself: one process, and a warning that
  the job's other tasks stay idle. JAX does not detect SLURM there either."""
  env = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_NODELIST": "n[1-4]"}
  p = launcher.plan(env)
  assert (p.launcher, p.initialize) == ("single", False)
  assert p.warnings == (
    "this runs as 1 process, but inside SLURM job 5 of 4 tasks (SLURM_NTASKS=4) without srun: "
    "the job's other tasks stay idle; start it with srun to use them all (README, Multi-device "
    "and multi-host)",
  )
  assert _jax_detects(monkeypatch, env) is None
  ssh = {"SLURM_JOB_ID": "5"}  # ssh into a node of one's job: nothing says there are several
  assert launcher.plan(ssh).warnings == () and _jax_detects(monkeypatch, ssh) is None


@pytest.mark.parametrize(
  "env, vm, expected",
  [
    ({}, True, ("tpu", True, None)),  # a GCE TPU VM: its metadata says how many (JAX reads it)
    ({"TPU_SKIP_MDS_QUERY": "1"}, True, ("single", False, 1)),  # JAX skips the metadata too
    ({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, True, ("tpu", True, 4)),  # GKE, 4 hosts
    ({"TPU_WORKER_HOSTNAMES": "a"}, True, ("single", False, 1)),  # GKE, one host
    ({"TPU_WORKER_HOSTNAMES": "a", "MEGASCALE_NUM_SLICES": "2"}, True, ("tpu", True, 2)),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, False, ("single", False, 1)),  # not a TPU VM
  ],
)
def test_cloud_tpu_is_left_to_jax_detection(env, vm, expected):
  """On a Cloud TPU VM (JAX's running_in_cloud_tpu_vm) JAX's own TPU detection is used:
  initialize() without arguments, and never a local device choice."""
  p = launcher.plan(env, cloud_tpu_vm=vm)
  assert (p.launcher, p.initialize, p.num_processes) == expected
  if p.launcher == "tpu":
    assert p.initialize_kwargs() == {}


# ---------------------------------------------------------------------------------------------
# Local devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "env, gpus, expected",
  [
    (_srun(1, nodes=2, rank=1), 8, (0, 1, 2, 3, 4, 5, 6, 7)),  # 1 task per node: every GPU
    (_srun(8, nodes=2, rank=11), 8, (3,)),  # 1 task per GPU: its own (SLURM_LOCALID 3)
    (_srun(2, nodes=1, rank=1), 8, (4, 5, 6, 7)),  # 2 tasks on 8 GPUs: halves
    (_srun(4, rank=2, SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES="2"), 1, (0,)),
    (_srun(2, rank=1, SLURM_GPUS_PER_TASK="2", CUDA_VISIBLE_DEVICES="2,3"), 2, (0, 1)),
    (_srun(4, rank=3, CUDA_VISIBLE_DEVICES="3"), 1, (0,)),  # srun --gpu-bind: its own GPU
    (_srun(4, rank=1, JAX_LOCAL_DEVICE_IDS="1"), 4, None),  # the user's choice, read by JAX
    (_srun(8, rank=3), 0, None),  # CPU (or TPU): nothing to choose
    ({**_srun(2, nodes=2, rank=2), "SLURM_STEP_TASKS_PER_NODE": "2,1"}, 4, (0, 1, 2, 3)),
    (_mpirun(1, nodes=2, rank=1), 4, (0, 1, 2, 3)),
    (_mpirun(4, nodes=2, rank=6), 4, (2,)),
  ],
)
def test_each_process_drives_the_gpus_of_its_share_of_the_node(env, gpus, expected):
  p = launcher.plan(env, gpus)
  assert p.local_device_ids == expected and p.warnings == ()
  ids = p.initialize_kwargs()["local_device_ids"]
  assert ids == (None if expected is None else list(expected))


def test_jax_alone_would_give_one_task_per_node_a_single_gpu(monkeypatch):
  """Why the launcher chooses: JAX's SLURM detection restricts each process to the GPU of its
  local rank, GPU 0 for one task per node, 7 of 8 idle."""
  env = _srun(1, nodes=2, rank=1)
  with _as_environ(monkeypatch, env):
    assert _jax_detects(monkeypatch, env).get_local_process_id() == 0
  assert launcher.plan(env, 8).describe() == (
    "launch: srun (SLURM job 77), 2 processes (1 on this node), this process's devices: all 8 "
    "GPUs it sees"
  )
  assert launcher.plan(_srun(2, rank=1), 8).describe().endswith("GPUs 4-7 of the 8 it sees")
  assert (
    launcher.plan(SRUN_2)
    .describe()
    .endswith("(2 on this node), this process's devices: all it sees")
  )


@pytest.mark.parametrize(
  "env, gpus, expected",
  [
    (
      _srun(3, rank=0),
      8,
      "3 processes on this node cannot share its 8 GPUs evenly (2 would sit idle)",
    ),
    (_srun(4, rank=0), 2, "4 processes on this node share its 2 GPUs: start at most 2 per node"),
    (_mpirun(3), 4, "3 processes on this node cannot share its 4 GPUs evenly (1 would sit idle)"),
  ],
)
def test_a_split_that_idles_or_shares_gpus_is_a_one_line_error(env, gpus, expected):
  with pytest.raises(UserError) as e:
    launcher.plan(env, gpus)
  assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_a_node_whose_share_is_unknown_drives_every_gpu_with_a_warning():
  env = {k: v for k, v in _srun(2, nodes=2).items() if k != "SLURM_STEP_TASKS_PER_NODE"}
  p = launcher.plan(env, 4)
  assert p.local_device_ids == (0, 1, 2, 3)
  assert len(p.warnings) == 1 and "does not say how many processes share this node" in p.warnings[0]


def test_visible_gpus_are_counted_without_starting_jax(tmp_path):
  for name in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
    (tmp_path / name).mkdir()
  count = lambda env, platforms=None, plugin=True: launcher.visible_gpu_count(  # noqa: E731
    env, platforms, plugin, proc_dir=str(tmp_path)
  )
  assert count({}) == 3  # the driver's GPUs
  assert count({"CUDA_VISIBLE_DEVICES": "4,5"}) == 2
  assert count({"CUDA_VISIBLE_DEVICES": "GPU-3b1f,GPU-77aa,GPU-0c2e"}) == 3
  assert count({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == 1  # CUDA stops at the first invalid one
  assert count({"CUDA_VISIBLE_DEVICES": ""}) == 0
  assert count({}, platforms="cpu") == 0 and count({}, platforms="cuda,cpu") == 3
  assert count({}, plugin=False) == 0  # a CPU-only JAX


# ---------------------------------------------------------------------------------------------
# What a user sees
# ---------------------------------------------------------------------------------------------


def test_start_prints_the_warning_on_stdout_and_initialises_nothing_alone(capsys):
  import jax  # pylint: disable=g-import-not-at-top

  p = launcher.start({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2"})
  assert (p.launcher, p.initialize) == ("single", False) and not jax.distributed.is_initialized()
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1 and out[0].startswith("warning: this runs as 1 process, but inside SLURM")
  assert launcher.start({}).warnings == () and capsys.readouterr().out == ""


def test_main_refuses_a_launch_it_cannot_join_in_one_line_before_writing(tmp_path):
  workdir = tmp_path / "run"
  env = {k: v for k, v in MPIRUN_2.items() if k != launcher.OMPI_URI}
  result = cli_driver.run_main(workdir, tmp_path / "data", env=env)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
    "error: this process is 1 of 2 started by Open MPI's mpirun"
  )
  assert not workdir.exists()


@pytest.mark.parametrize(
  "env, by",
  [
    (SRUN_2, "srun (SLURM job 4242)"),
    (MPIRUN_2, "mpirun (Open MPI)"),
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES"),
  ],
)
def test_predict_refuses_to_run_as_one_of_several_processes(tmp_path, env, by):
  launcher.require_single_process({})  # alone: fine
  launcher.require_single_process(_srun(1))
  with pytest.raises(
    UserError,
    match=re.escape(
      f"predict runs as a single process, but this one was started as 1 of 2 by {by}"
    ),
  ):
    launcher.require_single_process(env)
  if env is SRUN_2:  # the command itself: one line, exit 2, before it reads anything
    with cli_driver.environ(**env):
      result = cli_driver.run(
        "predict", ["predict", f"--workdir={tmp_path}", f"--images={tmp_path}"]
      )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: predict runs as a single process, but this one")
    assert len(result.stderr.strip().splitlines()) == 1


def test_subprocesses_of_the_suite_never_inherit_a_launch():
  base = {"PATH": "/bin", "HOME": "/h", **SRUN_2, **MPIRUN_2, "PMI_SIZE": "2", "TPU_WORKER_ID": "1"}
  env = suite_env.subprocess_env(2, base)
  assert not [k for k in env if k.startswith(launcher.CLUSTER_ENV_PREFIXES)]
  assert env["PATH"] == "/bin"
  assert launcher.plan(env) == launcher.plan({})
