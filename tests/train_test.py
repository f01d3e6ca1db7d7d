"""End to end on configs/smoke.py: outputs, resume, kill -9 + resume, guards, NaN stop, multi-host.

Runs are the command users type, ``python -m dsbn_jax.main --config=configs/smoke.py``, on the
generated Digits data (conftest's ``digits_data_dir``) and one CPU device (the mesh a CPU host
gives), started one of two ways:

- in this process (tests/cli_driver.py: the command's flag parsing and ``main``, with exit status,
  stdout and stderr as a subprocess gives them): the uninterrupted reference run (conftest's
  ``smoke_run``), every resume, the guards, the NaN stops and the bad-input matrix;
- as a real subprocess where only a process shows it: a ``kill -9`` crash, SIGTERM/SIGINT, two
  processes (gloo; started with SLURM's variables as srun sets them, and with Open MPI's as
  mpirun does: dsbn_jax/launcher.py), and one bad input typed as a command. These start in the background when the
  test session starts (conftest's ``background_runs``, with ``background_jobs`` below), and run
  while the in-process tests before them do.

A run started in this process and one started as a subprocess compute bit-identical states (the
same programs on the same CPU; checked below on every checkpoint a subprocess leaves), so a crashed
subprocess run resumed in this process must end exactly where the reference ended.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsbn_jax import checkpointing, config_defaults, run_control, train
from tests import cli_driver, data_fixtures, suite_env

ROOT = suite_env.ROOT


def _env(devices: int, base=None, **extra) -> dict:
  return suite_env.subprocess_env(devices, base, **extra)


def _command(workdir, data_dir, *overrides) -> list:
  return [
    sys.executable,
    "-m",
    "dsbn_jax.main",
    "--config=configs/smoke.py",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    *overrides,
  ]


def _main_subprocess(
  workdir, data_dir, *overrides, devices=1, env_extra=None, base_env=None, timeout=600
):
  """The command as a new process (never raises on a failure: the tests read returncode)."""
  return subprocess.run(
    _command(workdir, data_dir, *overrides),
    cwd=ROOT,
    env=_env(devices, base_env, **(env_extra or {})),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _main(workdir, data_dir, *overrides, devices=1, check=True, env_extra=None):
  """The command in this process (cli_driver.Result: returncode, stdout, stderr)."""
  result = cli_driver.run_main(workdir, data_dir, *overrides, devices=devices, env=env_extra)
  if check and result.returncode != 0:
    raise AssertionError(
      f"main {' '.join(overrides)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    )
  return result


def _params(workdir, step=None):
  return checkpointing.read_state_arrays(str(workdir), step)


def _assert_same_state(a, b, atol=0.0):
  (step_a, sa), (step_b, sb) = a, b
  assert step_a == step_b
  flat_a = jax.tree_util.tree_leaves_with_path(sa)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(sb))
  assert len(flat_a) == len(flat_b)
  for path, x in flat_a:
    np.testing.assert_allclose(x, flat_b[path], atol=atol, rtol=0, err_msg=str(path))


def _train_rows(workdir) -> list:
  """metrics.jsonl train rows without the timing field."""
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [
    {k: v for k, v in r.items() if k != "train/images_per_s"} for r in rows if "train/loss" in r
  ]


def _results(workdir) -> dict:
  return json.loads((workdir / "results.json").read_text())


# ---------------------------------------------------------------------------------------------
# The subprocesses, started in the background when the module starts
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# JAX derives the coordinator's port from the launcher's job id, in [61440, 65535]
# (jax/_src/clusters/slurm_cluster.py, ompi_cluster.py): each launch picks a job id whose port is
# free here.
_JAX_PORT_BASE = 65535 - 2**12 + 1
_RNG = random.SystemRandom()  # not the tests' seeded one


def _free_jax_port() -> int:
  for port in _RNG.sample(range(_JAX_PORT_BASE, 65536), 2**12):
    try:
      with socket.socket() as s:
        s.bind(("", port))
      return port
    except OSError:
      continue
  raise AssertionError("no free port in JAX's launcher range")


def _launch_env(launcher: str) -> list:
  """The variables a launcher gives each of 2 processes on this host, and nothing else (no
  JAX_*): "slurm" as ``srun -N 1 -n 2`` sets them, "ompi" as Open MPI 4's ``mpirun -np 2``."""
  offset = _free_jax_port() - _JAX_PORT_BASE + 2**12 * _RNG.randrange(1, 2**8)
  if launcher == "slurm":  # port = SLURM_JOB_ID % 2**12 + base; coordinator: first node
    return [
      {
        "SLURM_JOB_ID": str(offset),
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_PROCID": str(i),
        "SLURM_LOCALID": str(i),
        "SLURM_NODEID": "0",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_TASKS_PER_NODE": "2",
      }
      for i in range(2)
    ]
  # port = (job id // 2**12) % 2**12 + base; coordinator: the host of mpirun's URI
  uri = f"{offset * 2**12}.0;tcp://127.0.0.1:{_free_port()}"
  return [
    {
      "OMPI_MCA_orte_hnp_uri": uri,
      "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_RANK": str(i),
      "OMPI_COMM_WORLD_LOCAL_RANK": str(i),
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    for i in range(2)
  ]


def _two_processes(
  workdir, data_dir, base_env, env_by_process=({}, {}), overrides=(), launcher="slurm"
):
  """The smoke run as 2 processes x 2 CPU devices (gloo), started with ``launcher``'s variables
  only (``_launch_env``); returns the return codes and outputs."""
  launch = _launch_env(launcher)
  procs = [
    subprocess.Popen(
      _command(workdir, data_dir, *overrides),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=_env(2, base_env, **launch[i], **env_by_process[i]),
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  return [p.returncode for p in procs], outs


# Keeping a validator's pick too: a collective save that every process must decide alike.
MULTI_OVERRIDES = ("--config.select_with=bnm",)


def _multi_host_runs(root, data_dir, base_env) -> dict:
  """The multi-host scenario, started as srun starts two tasks: two processes, SIGTERM to process
  1 alone as its step 4 starts, then both resumed to the end (read by both multi-host tests)."""
  out = {}
  multi = root / "signalled"
  signal = ({}, {"DSBN_JAX_SIGNAL_AT_STEP": "4:SIGTERM"})
  out["signalled"] = multi, _two_processes(multi, data_dir, base_env, signal, MULTI_OVERRIDES)
  out["signalled_checkpoints"] = sorted(os.listdir(multi / "checkpoints"))
  out["signalled_resumed"] = _two_processes(multi, data_dir, base_env, overrides=MULTI_OVERRIDES)
  return out


KILL_AT = (2, 4, 5)
SIGNALS = ("SIGTERM", "SIGINT")


def _selected_jobs(session) -> set:
  """The background jobs the selected tests of this module read (``-k`` starts no other)."""
  jobs = set()
  for item in session.items:
    if str(getattr(item, "path", "")) != os.path.abspath(__file__):
      continue
    name = getattr(item, "originalname", item.name)
    params = getattr(getattr(item, "callspec", None), "params", {})
    if name == "test_killed_run_resumes_to_the_uninterrupted_result":
      jobs.add(f"kill{params['kill_at']}")
    elif name == "test_signal_stops_after_the_step_saves_it_and_resumes_bit_identical":
      jobs.add(params["sig"])
    elif name == "test_a_bad_input_typed_as_a_command_is_one_line_and_exit_2":
      jobs.add("bad_input")
  return jobs


def background_jobs(session, root, data_dir) -> dict:
  """The subprocess runs the selected tests of this module read, as zero-argument callables by
  name: "kill<k>" and each signal's name (``(workdir,
  CompletedProcess)``), "bad_input" (``BAD_COMMAND``'s CompletedProcess, its workdir
  ``<root>/bad_input``). conftest's ``background_runs`` starts them when the session starts; the
  environment they get is this process's now (a test may change it meanwhile)."""
  wanted = _selected_jobs(session)
  base_env = dict(os.environ)
  jobs = {}

  def one(name, env_extra):
    workdir = root / name
    return lambda: (
      workdir,
      _main_subprocess(workdir, data_dir, env_extra=env_extra, base_env=base_env),
    )

  # "multi_host" is not started here: see the multi_host fixture.
  for sig in SIGNALS:
    if sig in wanted:
      jobs[sig] = one(sig, {"DSBN_JAX_SIGNAL_AT_STEP": f"4:{sig}"})
  for k in KILL_AT:
    if f"kill{k}" in wanted:
      jobs[f"kill{k}"] = one(f"kill{k}", {"DSBN_JAX_KILL_AT_STEP": str(k)})
  if "bad_input" in wanted:  # fails before any training: quick
    jobs["bad_input"] = lambda: _main_subprocess(
      root / "bad_input", data_dir, *BAD_COMMAND[0], base_env=base_env
    )
  return jobs


@pytest.fixture(scope="module")
def background(background_runs):
  """Futures of this module's ``background_jobs``, by name (started by conftest)."""
  prefix = f"{__name__.rsplit('.', 1)[-1]}:"
  return {k[len(prefix) :]: background_runs[k] for k in background_runs if k.startswith(prefix)}


def _job(background, name):
  return background[name].result(timeout=1800)


@pytest.fixture(scope="module")
def multi_host(background, background_runs, tmp_path_factory, digits_data_dir):
  """``_multi_host_runs``, started once every background run has ended: two processes meet in
  gloo collectives with a 30 s deadline, which a process starved of CPU by other runs on this
  2-core machine can miss (seen once in CI while the background runs went on)."""
  for future in [*background.values(), *background_runs.values()]:  # this module's: started
    future.result(timeout=1800)
  root = tmp_path_factory.mktemp("multi_host")
  return _multi_host_runs(root, digits_data_dir, dict(os.environ))


@pytest.fixture(scope="module")
def open_mpi_run(background, background_runs, tmp_path_factory, digits_data_dir):
  """``(workdir, (codes, outs))`` of the smoke run as Open MPI's mpirun starts two processes
  (its variables only), uninterrupted; started once every background run has ended, as
  ``multi_host``."""
  for future in [*background.values(), *background_runs.values()]:  # this module's: started
    future.result(timeout=1800)
  workdir = tmp_path_factory.mktemp("open_mpi") / "run"
  runs = _two_processes(
    workdir, digits_data_dir, dict(os.environ), overrides=MULTI_OVERRIDES, launcher="ompi"
  )
  return workdir, runs


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory, digits_data_dir):
  """The smoke run (``MULTI_OVERRIDES``) as 1 process x 4 devices, uninterrupted: what every
  2-process run must equal."""
  single = tmp_path_factory.mktemp("four_devices") / "single"
  _main(single, digits_data_dir, *MULTI_OVERRIDES, devices=4)
  return single


@pytest.fixture(scope="module")
def reference_run(smoke_run):
  """The uninterrupted 6-step run (conftest's smoke_run), the yardstick of the resume tests."""
  return smoke_run


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_outputs_exist_and_parse(reference_run):
  workdir, proc = reference_run
  results = _results(workdir)
  assert results["steps"] == 6 and [e["step"] for e in results["evals"]] == [3, 6]
  assert results["best_accuracy"] == max(e["accuracy"] for e in results["evals"])
  assert results["last_accuracy"] == results["evals"][-1]["accuracy"]
  assert results["num_target_images"] == sum(map(sum, results["confusion_matrix"]))
  assert len(results["per_class_accuracy"]) == 10
  config = json.loads((workdir / "config.json").read_text())
  assert config["method"] == "alda_dsbn" and config["model"]["num_classes"] == 10
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert "step 6/6" in proc.stdout and "img/s" in proc.stdout and "ETA" in proc.stdout
  assert proc.stdout.splitlines()[0] == (
    "dsbn_jax: platform cpu, 1 x cpu, 1 process, mesh data=1, compute float32, matmul precision "
    f"default, batch 8 + 8 (source + target, global), workdir {workdir}"
  )
  assert "warning" not in proc.stdout  # a small CNN on CPU is what CPUs are for
  assert proc.stdout.splitlines()[-1].startswith("alda_dsbn digits -> digits_m: target accuracy")


def test_second_invocation_resumes_and_extends(tmp_path, digits_data_dir):
  workdir = tmp_path / "run"
  _main(workdir, digits_data_dir, "--config.total_steps=3")
  with pytest.raises(AssertionError):  # another total_steps is another configuration...
    _main(workdir, digits_data_dir)
  proc = _main(workdir, digits_data_dir, "--config.total_steps=3")  # ...the same one resumes
  assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
  results = _results(workdir)
  assert [e["step"] for e in results["evals"]] == [3]
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [3]  # re-evaluated, logged once
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("kill_at", KILL_AT)
def test_killed_run_resumes_to_the_uninterrupted_result(
  reference_run, background, digits_data_dir, kill_at
):
  """``kill -9`` of the command as step ``kill_at`` starts (after ``kill_at`` steps; 2: before
  any checkpoint; 4 and 5: after checkpoint 3 was started, asynchronously); the same command again
  resumes from the newest checkpoint the crash left complete and ends bit-identical to the
  uninterrupted run: state, evaluations, confusion matrix, per-class accuracy and every logged
  train row (a run that resumes nothing: two runs of one seed agree).

  Whether the asynchronous save of checkpoint 3 was complete when the kill came depends on the
  machine's load (a busy CPU delays orbax's writer thread): either is a valid crash, and an
  incomplete save must be ignored on resume (it lives in a ``3.orbax-checkpoint-tmp-*`` folder)."""
  ref = reference_run[0]
  workdir, crashed = _job(background, f"kill{kill_at}")
  assert crashed.returncode == -9, crashed.stderr[-2000:]
  assert not (workdir / "results.json").exists()
  saved = list(checkpointing.saved_steps(str(workdir)))
  assert saved in ([], [3]) if kill_at > 3 else saved == [], saved
  for step in saved:  # a subprocess computes what this process computes, bit for bit
    _assert_same_state(_params(workdir, step), _params(ref, step))
  resumed = _main(workdir, digits_data_dir)
  if saved:
    assert f"resumed from {workdir}/checkpoints at step 3" in resumed.stdout
  else:
    assert "resumed from" not in resumed.stdout
  _assert_same_state(_params(workdir), _params(ref))
  res, want = _results(workdir), _results(ref)
  for key in (
    "evals",
    "confusion_matrix",
    "per_class_accuracy",
    "best_accuracy",
    "best_step",
    "last_accuracy",
    "mean_class_accuracy",
    "num_target_images",
  ):
    assert res[key] == want[key], key
  assert _train_rows(workdir) == _train_rows(ref)  # each step logged once, as ref


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_stops_after_the_step_saves_it_and_resumes_bit_identical(
  reference_run, background, digits_data_dir, sig
):
  """SIGTERM/SIGINT as step 4 starts: step 4 finishes, checkpoint 5 (none is due there) is
  written, exit 75; the same command resumes at step 5 and ends where the uninterrupted run did."""
  ref = reference_run[0]
  workdir, stopped = _job(background, sig)
  assert stopped.returncode == run_control.EXIT_STOPPED, stopped.stderr[-2000:]
  assert stopped.stdout.splitlines()[-1] == (
    f"stopped at step 5 ({sig}), checkpoint saved; run the same command to resume"
  )
  assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "5"]  # no step lost
  assert not (workdir / "results.json").exists()
  _assert_same_state(_params(workdir, 3), _params(ref, 3))
  resumed = _main(workdir, digits_data_dir)
  assert "at step 5" in resumed.stdout
  _assert_same_state(_params(workdir), _params(ref))
  assert _train_rows(workdir) == _train_rows(ref)  # each step logged once, as ref


def test_second_run_in_a_live_workdir_is_refused_naming_the_holder(tmp_path, digits_data_dir):
  """One live run per workdir. (A holder that dies never leaves the lock stale: the kill -9
  resume tests above restart in the workdir of a killed run.)"""
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = run_control.WorkdirLock(str(workdir))
  lock.acquire()  # as a live run holds it (flock: another open of the file is another holder)
  try:
    second = _main(workdir, digits_data_dir, check=False)
  finally:
    lock.release()
  assert second.returncode == 2
  err = [l for l in second.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and f"is in use by a running run (pid {os.getpid()} on " in err[0], err
  assert "Traceback" not in second.stderr
  assert sorted(os.listdir(workdir)) == [".lock"]  # the refused run wrote nothing
  again = run_control.WorkdirLock(str(workdir))  # released: free again
  again.acquire()
  again.release()


def test_workdir_of_another_config_is_refused_untouched(reference_run, tmp_path, digits_data_dir):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  proc = _main(workdir, digits_data_dir, "--config.method=alda", check=False)
  assert proc.returncode == 2
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith("error: workdir") and "method: 'alda_dsbn' -> 'alda'" in err
  after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  assert before == after


def test_a_workdir_from_before_model_bn_resumes_and_re_evaluates(
  reference_run, tmp_path, digits_data_dir
):
  """A finished ``alda_dsbn`` run whose config.json predates ``model.bn`` (no ``model.bn`` and no
  ``sweep.bn``, as runs wrote it then) resumes with its command and re-evaluates its final state
  to the same accuracies; ``alda`` with ``model.bn=dsbn`` names the same run; ``model.bn=shared``
  contradicts the name: one line, nothing changed."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  config = json.loads((workdir / "config.json").read_text())
  del config["model"]["bn"], config["sweep"]["bn"]
  (workdir / "config.json").write_text(json.dumps(config, indent=2))
  want = _results(workdir)
  for overrides in [(), ("--config.method=alda", "--config.model.bn=dsbn")]:
    proc = _main(workdir, digits_data_dir, *overrides)
    assert "resumed from" in proc.stdout and "at step 6" in proc.stdout, proc.stdout[-2000:]
    got = _results(workdir)
    assert got["method"] == "alda_dsbn"
    assert [e["accuracy"] for e in got["evals"]] == [e["accuracy"] for e in want["evals"]]
    assert got["last_accuracy"] == want["last_accuracy"]
  before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  proc = _main(workdir, digits_data_dir, "--config.model.bn=shared", check=False)
  assert proc.returncode == 2
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith("error: invalid config.model.bn='shared'") and "alda_dsbn" in err, err
  after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  assert before == after


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, digits_data_dir):
  workdir = tmp_path / "run"
  proc = _main(workdir, digits_data_dir, "--config.optim.lr0=1e12", check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite") and "lower optim.lr0" in last
  assert "Traceback" not in proc.stderr
  assert not (workdir / "results.json").exists()
  steps = sorted(os.listdir(workdir / "checkpoints")) if (workdir / "checkpoints").exists() else []
  for s in steps:  # whatever was saved is finite
    state = checkpointing.read_state_arrays(str(workdir), int(s))[1]
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))


def test_nan_injected_at_step_4_stops_the_run_and_keeps_the_good_step_3_checkpoint(
  reference_run, tmp_path, digits_data_dir
):
  """NaN pixels in step 4's source batch: the real step computes a NaN loss; the run stops at once
  with a one-line error, nothing non-finite is saved, and checkpoint 3 is the uninterrupted one."""
  ref = reference_run[0]
  workdir = tmp_path / "run"
  proc = _main(workdir, digits_data_dir, check=False, env_extra={"DSBN_JAX_NAN_AT_STEP": "4"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite train/") and "at step 5" in last, last
  assert "the last good checkpoint (step 3) is kept" in last
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
  assert not (workdir / "results.json").exists()
  _assert_same_state(_params(workdir, 3), _params(ref, 3))
  resumed = _main(workdir, digits_data_dir)  # the fault was transient: resuming finishes exactly
  assert "at step 3" in resumed.stdout
  _assert_same_state(_params(workdir), _params(ref))


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(reference_run, multi_host):
  """SIGTERM to process 1 alone as its step 4 starts: both processes agree, both save checkpoint
  5 (a collective save) and exit 75; both resumed, the run ends as the uninterrupted one."""
  runs = multi_host
  multi, (codes, outs) = runs["signalled"]
  assert codes == [run_control.EXIT_STOPPED] * 2, outs[1][1][-2000:]
  assert outs[0][0].splitlines()[-1].startswith("stopped at step 5 (a signal to another process)")
  assert runs["signalled_checkpoints"] == ["3", "5"]
  codes, outs = runs["signalled_resumed"]
  assert codes == [0, 0], outs[0][1][-2000:]
  assert "at step 5" in outs[0][0]
  (step_m, sm), (step_r, sr) = _params(multi), _params(reference_run[0])
  assert step_m == step_r == 6
  _assert_same_state(
    (6, {k: sm[k] for k in ("params", "batch_stats")}),  # 4 devices vs 1
    (6, {k: sr[k] for k in ("params", "batch_stats")}),
    atol=1e-5,
  )


def _assert_two_processes_match_four_devices(multi, single) -> None:
  """The run in ``multi`` (2 processes x 2 CPU devices) == the one in ``single`` (1 process x 4
  devices): state, results, validators' pick and train metrics."""
  # Reduction order differs (gloo all-reduce vs one process): params and BN statistics agree to
  # 1e-5; the momentum buffers (sums of raw gradients, O(1) and larger) to 1e-4 relative.
  (step_m, sm), (step_s, ss) = _params(multi), _params(single)
  assert step_m == step_s == 6
  _assert_same_state(
    (6, {k: sm[k] for k in ("params", "batch_stats")}),
    (6, {k: ss[k] for k in ("params", "batch_stats")}),
    atol=1e-5,
  )
  for x, y in zip(
    jax.tree_util.tree_leaves(sm["opt_state"]), jax.tree_util.tree_leaves(ss["opt_state"])
  ):
    np.testing.assert_allclose(x, y, atol=1e-4 * max(1.0, float(np.abs(y).max())), rtol=0)
  a, b = _results(multi), _results(single)
  assert a["num_processes"] == 2 and b["num_processes"] == 1
  assert a["confusion_matrix"] == b["confusion_matrix"]
  assert [(e["step"], e["accuracy"]) for e in a["evals"]] == [
    (e["step"], e["accuracy"]) for e in b["evals"]
  ]
  for ea, eb in zip(a["evals"], b["evals"]):  # from the probabilities: float rounding apart
    assert ea["validators"].keys() == eb["validators"].keys()
    for k, v in ea["validators"].items():
      np.testing.assert_allclose(v, eb["validators"][k], rtol=1e-4, atol=1e-6, err_msg=k)
  picked = a["selected"]["step"]  # by process 0's scores, on both processes
  assert picked == a["selection"]["bnm"]["step"]
  assert os.listdir(multi / checkpointing.SELECTED_DIR) == [str(picked)]
  rows = lambda w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]  # noqa
  for ra, rb in zip(rows(multi), rows(single)):
    for k in ra:
      if k.startswith("train/") and k != "train/images_per_s":
        np.testing.assert_allclose(ra[k], rb[k], atol=1e-5, err_msg=k)


def _assert_launch_lines(outs, launch: str) -> None:
  """Process 0 says how it was launched, then the run's start-up line for the whole mesh;
  process 1 says neither."""
  lines = outs[0][0].splitlines()
  assert lines[0].startswith(f"launch: {launch}"), lines[:2]
  assert ", 2 processes (2 on this node), this process's devices: all it sees" in lines[0]
  assert lines[1].startswith("dsbn_jax: platform cpu, 4 x cpu, 2 processes, mesh data=4, ")
  assert not outs[1][0].startswith(("launch:", "dsbn_jax:"))


def test_two_processes_match_one_process_with_four_devices(multi_host, four_devices):
  """Real multi-host, started as srun starts two tasks (SLURM's variables only, no JAX_*): 2
  processes x 2 CPU devices (gloo), stopped and resumed, == 1 process x 4 devices,
  uninterrupted."""
  multi, (_, outs) = multi_host["signalled"]
  _assert_launch_lines(outs, "srun (SLURM job ")
  codes, outs = multi_host["signalled_resumed"]
  for code, (_, err) in zip(codes, outs):
    assert code == 0, err[-3000:]
  _assert_launch_lines(outs, "srun (SLURM job ")
  _assert_two_processes_match_four_devices(multi, four_devices)


def test_two_processes_started_by_open_mpi_match_one_process_with_four_devices(
  open_mpi_run, four_devices
):
  """Started as Open MPI's mpirun starts two processes (its variables only): == 1 process x 4
  devices."""
  multi, (codes, outs) = open_mpi_run
  for code, (_, err) in zip(codes, outs):
    assert code == 0, err[-3000:]
  _assert_launch_lines(outs, "mpirun (Open MPI)")
  _assert_two_processes_match_four_devices(multi, four_devices)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
  """Files for the bad-input matrix: another architecture's weights, an empty manual dir, a
  custom domain tree with a truncated JPEG."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("bad_inputs")
  torch.save(torchvision.models.resnet18().state_dict(), root / "resnet18.pth")
  (root / "empty").mkdir()
  entries = data_fixtures.make_domain_tree(str(root / "tree"), ["a", "b"], ["c0", "c1"])
  victim = next(e for e in entries if e.path.endswith(".jpg"))
  data = open(victim.path, "rb").read()
  with open(victim.path, "wb") as f:
    f.write(data[: len(data) // 2])
  return {"root": str(root), "victim": victim.path}


_OFFICE = [
  "--config.data.dataset=office31",
  "--config.data.source=amazon",
  "--config.data.target=webcam",
]
BAD_INPUTS = [  # (id, overrides, devices, the error line holds)
  (
    "unknown_domain",
    ["--config.data.target=mnist"],
    1,
    "unknown domain 'mnist' for dataset digits; valid:",
  ),
  (
    "missing_weights",
    ["--config.model.backbone=resnet50", "--config.model.pretrained_path=/nope/r50.pth"],
    1,
    "weights file '/nope/r50.pth' (config field model.pretrained_path) not found",
  ),
  (
    "other_architecture_weights",
    ["--config.model.backbone=resnet50", "--config.model.pretrained_path={root}/resnet18.pth"],
    1,
    "not a torchvision ResNet-50 state_dict",
  ),
  ("method_typo", ["--config.method=alda_dsnb"], 1, "alda_dsnb"),
  (
    "config_field_typo",
    ["--config.optim.lr=0.1"],
    1,
    "unknown config field 'lr' Did you mean \"lr0\"",
  ),
  ("config_value_type", ["--config.optim.lr0=abc"], 1, "could not convert string to float: 'abc'"),
  (
    "missing_manual_dir",
    _OFFICE + ["--config.data.manual_dir={root}/missing"],
    1,
    "{root}/missing",
  ),
  ("empty_manual_dir", _OFFICE + ["--config.data.manual_dir={root}/empty"], 1, "{root}/empty"),
  (
    "truncated_jpeg",
    [
      "--config.data.dataset=custom",
      "--config.data.manual_dir={root}/tree",
      "--config.data.source=a",
      "--config.data.target=b",
    ],
    1,
    "{victim}",
  ),
]


BAD_COMMAND = (["--config.optim.lr=0.1"], "unknown config field 'lr' Did you mean \"lr0\"")


def _snapshot(root) -> dict:
  """Relative path -> bytes of every file under ``root``."""
  return {
    os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
    for d, _, files in os.walk(root)
    for f in files
  }


def _assert_one_line_error(proc, expected: str) -> None:
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, last
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
  "overrides, devices, expected",
  [case[1:] for case in BAD_INPUTS],
  ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_inputs_are_one_line_errors_and_leave_the_workdir_intact(
  reference_run, bad_inputs, tmp_path, digits_data_dir, overrides, devices, expected
):
  """Each bad input, run on (a copy of) a finished workdir: one line, exit 2, no file changed."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  before = _snapshot(workdir)
  overrides = [o.format(**bad_inputs) for o in overrides]
  proc = _main(workdir, digits_data_dir, *overrides, devices=devices, check=False)
  if "--config.data.dataset=custom" in overrides:  # a finished digits run's workdir: another
    # configuration, refused before this one's data is read (the workdir lock comes first)
    _assert_one_line_error(proc, f"workdir {workdir} holds a run of another configuration")
  else:
    _assert_one_line_error(proc, expected.format(**bad_inputs))
  assert _snapshot(workdir) == before
  fresh = tmp_path / "fresh"  # and no run is started in a new workdir
  proc = _main(fresh, digits_data_dir, *overrides, devices=devices, check=False)
  _assert_one_line_error(proc, expected.format(**bad_inputs))
  assert not fresh.exists()


def test_a_bad_input_typed_as_a_command_is_one_line_and_exit_2(background):
  """The matrix above runs in this process; here one case as the real command (a new process,
  through absl's app.run): what a user sees, start-up included, is one line and exit status 2,
  and no workdir is created."""
  proc = _job(background, "bad_input")
  _assert_one_line_error(proc, BAD_COMMAND[1])
  assert not any(line.startswith("error:") for line in proc.stdout.splitlines())
  workdir = [a for a in proc.args if a.startswith("--workdir=")][0].split("=", 1)[1]
  assert not os.path.exists(workdir)


def test_a_run_without_any_confident_target_stays_finite(tmp_path, digits_data_dir):
  """δ = 1: no target passes the strict threshold in any step; L_T is empty, losses stay finite."""
  workdir = tmp_path / "run"
  _main(workdir, digits_data_dir, "--config.loss.threshold=1.0")
  rows = _train_rows(workdir)
  assert len(rows) == 6 and all(r["train/confident_frac"] == 0.0 for r in rows)
  assert all(np.isfinite(v) for r in rows for v in r.values())
  state = _params(workdir)[1]
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))
  assert _results(workdir)["steps"] == 6


def test_every_field_added_since_a_release_has_its_old_value_for_resume():
  """A config.json written before a field existed resumes only if ``train._ADDED_LATER`` gives the
  value that field's absence meant (or the field is resume-safe): a field added without one makes
  every older workdir and sweep root "another configuration". The fields of 36d69b6 (the version
  before model.bn and the new methods' fields) are recorded in tests/golden/; every field since
  must be accounted for, with its default as the old value."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  golden = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
  with open(os.path.join(golden, "config_fields_36d69b6.json")) as f:
    before = set(json.load(f))
  for dataset in ("digits", "office31", "office_home", "custom"):
    flat = traverse_util.flatten_dict(train._jsonable(config_defaults.get_config(dataset)), sep=".")
    for key in sorted(set(flat) - before):
      if key in train._RESUME_SAFE:
        continue
      assert key in train._ADDED_LATER, f"{key} (new since 36d69b6) is not in train._ADDED_LATER"
      assert train._ADDED_LATER[key] == flat[key], (key, train._ADDED_LATER[key], flat[key])
