"""End to end on configs/smoke.py: outputs, resume, kill -9 + resume, guards, NaN stop, multi-host.

Each run is a real ``python -m dsbn_jax.main`` subprocess (the command users type), on the
generated Digits data, with the device count set through XLA_FLAGS.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsbn_jax import checkpointing, run_control
from tests import data_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "DSBN_JAX_"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             CUDA_VISIBLE_DEVICES="", **extra)
  return env


def _main(workdir, data_dir, *overrides, devices=1, check=True, env_extra=None, timeout=600):
  cmd = [sys.executable, "-m", "dsbn_jax.main", "--config=configs/smoke.py",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(devices, **(env_extra or {})),
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def _params(workdir):
  return checkpointing.read_state_arrays(str(workdir))


def _assert_same_state(a, b, atol=0.0):
  (step_a, sa), (step_b, sb) = a, b
  assert step_a == step_b
  flat_a = jax.tree_util.tree_leaves_with_path(sa)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(sb))
  assert len(flat_a) == len(flat_b)
  for path, x in flat_a:
    np.testing.assert_allclose(x, flat_b[path], atol=atol, rtol=0, err_msg=str(path))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
  """An uninterrupted 6-step run, the yardstick of the resume tests."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  proc = _main(workdir, data_dir)
  return workdir, proc


def test_outputs_exist_and_parse(reference_run):
  workdir, proc = reference_run
  results = json.loads((workdir / "results.json").read_text())
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
      f"default, batch 8 + 8 (source + target, global), workdir {workdir}")
  assert "warning" not in proc.stdout  # a small CNN on CPU is what CPUs are for


def test_second_invocation_resumes_and_extends(reference_run, tmp_path, data_dir):
  workdir = tmp_path / "run"
  _main(workdir, data_dir, "--config.total_steps=3")
  with pytest.raises(AssertionError):  # another total_steps is another configuration...
    _main(workdir, data_dir)
  proc = _main(workdir, data_dir, "--config.total_steps=3")  # ...the same one resumes (finished)
  assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert [e["step"] for e in results["evals"]] == [3]
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [3]  # re-evaluated, logged once
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]


@pytest.mark.parametrize("kill_at", [2, 4, 5])
def test_killed_run_resumes_to_the_uninterrupted_result(reference_run, tmp_path, data_dir,
                                                        kill_at):
  workdir = tmp_path / "run"
  crashed = _main(workdir, data_dir, check=False, env_extra={"DSBN_JAX_KILL_AT_STEP": str(kill_at)})
  assert crashed.returncode == -9, crashed.stderr[-2000:]
  assert not (workdir / "results.json").exists()
  resumed = _main(workdir, data_dir)
  expected_start = 3 if kill_at > 3 else None
  if expected_start:
    assert f"at step {expected_start}" in resumed.stdout
  else:
    assert "resumed from" not in resumed.stdout
  _assert_same_state(_params(workdir), _params(reference_run[0]))
  res = json.loads((workdir / "results.json").read_text())
  ref = json.loads((reference_run[0] / "results.json").read_text())
  assert res["evals"] == ref["evals"]
  assert _train_rows(workdir) == _train_rows(reference_run[0])  # each step logged once, as ref


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_stops_after_the_step_saves_it_and_resumes_bit_identical(reference_run, tmp_path,
                                                                         data_dir, sig):
  """SIGTERM/SIGINT as step 4 starts: step 4 finishes, checkpoint 5 (none is due there) is
  written, exit 75; the same command resumes at step 5 and ends where the uninterrupted run did."""
  workdir = tmp_path / "run"
  stopped = _main(workdir, data_dir, check=False, env_extra={"DSBN_JAX_SIGNAL_AT_STEP": f"4:{sig}"})
  assert stopped.returncode == run_control.EXIT_STOPPED, stopped.stderr[-2000:]
  assert stopped.stdout.splitlines()[-1] == (
      f"stopped at step 5 ({sig}), checkpoint saved; run the same command to resume")
  assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "5"]  # no step lost
  assert not (workdir / "results.json").exists()
  resumed = _main(workdir, data_dir)
  assert "at step 5" in resumed.stdout
  _assert_same_state(_params(workdir), _params(reference_run[0]))
  assert _train_rows(workdir) == _train_rows(reference_run[0])  # each step logged once, as ref


def test_second_run_in_a_live_workdir_is_refused_naming_the_holder(tmp_path, data_dir):
  """One live run per workdir. (A holder that dies never leaves the lock stale: the kill -9
  resume tests above restart in the workdir of a killed run.)"""
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = run_control.WorkdirLock(str(workdir))
  lock.acquire()  # as a live run holds it
  try:
    second = _main(workdir, data_dir, check=False)
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


def test_workdir_of_another_config_is_refused_untouched(reference_run, data_dir):
  workdir, _ = reference_run
  before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  proc = _main(workdir, data_dir, "--config.method=alda", check=False)
  assert proc.returncode == 2
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith("error: workdir") and "method: 'alda_dsbn' -> 'alda'" in err
  after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(workdir) for p in fs}
  assert before == after


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, data_dir):
  workdir = tmp_path / "run"
  proc = _main(workdir, data_dir, "--config.optim.lr0=1e12", check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite") and "lower optim.lr0" in last
  assert not (workdir / "results.json").exists()
  steps = sorted(os.listdir(workdir / "checkpoints")) if (workdir / "checkpoints").exists() else []
  for s in steps:  # whatever was saved is finite
    state = checkpointing.read_state_arrays(str(workdir), int(s))[1]
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))


def test_nan_injected_at_step_4_stops_the_run_and_keeps_the_good_step_3_checkpoint(
    reference_run, tmp_path, data_dir):
  """NaN pixels in step 4's source batch: the real step computes a NaN loss; the run stops at once
  with a one-line error, nothing non-finite is saved, and checkpoint 3 is the uninterrupted one."""
  workdir = tmp_path / "run"
  proc = _main(workdir, data_dir, check=False, env_extra={"DSBN_JAX_NAN_AT_STEP": "4"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite train/") and "at step 5" in last, last
  assert "the last good checkpoint (step 3) is kept" in last
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
  assert not (workdir / "results.json").exists()
  _assert_same_state(checkpointing.read_state_arrays(str(workdir), 3),
                     checkpointing.read_state_arrays(str(reference_run[0]), 3))
  resumed = _main(workdir, data_dir)  # the fault was transient: resuming finishes the run exactly
  assert "at step 3" in resumed.stdout
  _assert_same_state(_params(workdir), _params(reference_run[0]))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, data_dir, env_by_process=({}, {})):
  """The smoke run as 2 processes x 2 CPU devices (gloo); returns the Popens and their outputs."""
  port = _free_port()
  cmd = [sys.executable, "-m", "dsbn_jax.main", "--config=configs/smoke.py",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
  procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                                **env_by_process[i]))
           for i in range(2)]
  return procs, [p.communicate(timeout=600) for p in procs]


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(reference_run, tmp_path,
                                                                      data_dir):
  """SIGTERM to process 1 alone as its step 4 starts: both processes agree, both save checkpoint
  5 (a collective save) and exit 75; both resumed, the run ends as the uninterrupted one."""
  multi = tmp_path / "multi"
  procs, outs = _two_processes(multi, data_dir, ({}, {"DSBN_JAX_SIGNAL_AT_STEP": "4:SIGTERM"}))
  assert [p.returncode for p in procs] == [run_control.EXIT_STOPPED] * 2, outs[1][1][-2000:]
  assert outs[0][0].splitlines()[-1].startswith("stopped at step 5 (a signal to another process)")
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "5"]
  procs, outs = _two_processes(multi, data_dir)
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
  assert "at step 5" in outs[0][0]
  (step_m, sm), (step_r, sr) = _params(multi), _params(reference_run[0])
  assert step_m == step_r == 6
  _assert_same_state((6, {k: sm[k] for k in ("params", "batch_stats")}),  # 4 devices vs 1
                     (6, {k: sr[k] for k in ("params", "batch_stats")}), atol=1e-5)


def test_two_processes_match_one_process_with_four_devices(tmp_path, data_dir):
  """Real multi-host: 2 processes x 2 CPU devices (gloo) == 1 process x 4 devices."""
  single = tmp_path / "single"
  _main(single, data_dir, devices=4)
  multi = tmp_path / "multi"
  procs, outs = _two_processes(multi, data_dir)
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert outs[0][0].splitlines()[0].startswith(  # the main process speaks for the whole mesh
      "dsbn_jax: platform cpu, 4 x cpu, 2 processes, mesh data=4, ")
  assert not outs[1][0].startswith("dsbn_jax:")
  # Reduction order differs (gloo all-reduce vs one process): params and BN statistics agree to
  # 1e-5; the momentum buffers (sums of raw gradients, O(1) and larger) to 1e-4 relative.
  (step_m, sm), (step_s, ss) = _params(multi), _params(single)
  assert step_m == step_s == 6
  _assert_same_state((6, {k: sm[k] for k in ("params", "batch_stats")}),
                     (6, {k: ss[k] for k in ("params", "batch_stats")}), atol=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(sm["opt_state"]),
                  jax.tree_util.tree_leaves(ss["opt_state"])):
    np.testing.assert_allclose(x, y, atol=1e-4 * max(1.0, float(np.abs(y).max())), rtol=0)
  a = json.loads((multi / "results.json").read_text())
  b = json.loads((single / "results.json").read_text())
  assert a["num_processes"] == 2 and b["num_processes"] == 1
  assert a["evals"] == b["evals"] and a["confusion_matrix"] == b["confusion_matrix"]
  rows = lambda w: [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]  # noqa
  for ra, rb in zip(rows(multi), rows(single)):
    for k in ra:
      if k.startswith("train/") and k != "train/images_per_s":
        np.testing.assert_allclose(ra[k], rb[k], atol=1e-5, err_msg=k)


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
    f.write(data[:len(data) // 2])
  return {"root": str(root), "victim": victim.path}


_OFFICE = ["--config.data.dataset=office31", "--config.data.source=amazon",
           "--config.data.target=webcam"]


@pytest.mark.parametrize("overrides, devices, expected", [
    (["--config.data.target=mnist"], 1, "unknown domain 'mnist' for dataset digits; valid:"),
    (["--config.model.backbone=resnet50", "--config.model.pretrained_path=/nope/r50.pth"], 1,
     "weights file '/nope/r50.pth' (config field model.pretrained_path) not found"),
    (["--config.model.backbone=resnet50", "--config.model.pretrained_path={root}/resnet18.pth"],
     1, "not a torchvision ResNet-50 state_dict"),
    (["--config.method=alda_dsnb"], 1, "alda_dsnb"),
    (["--config.optim.lr=0.1"], 1, "unknown config field 'lr' Did you mean \"lr0\""),
    (["--config.optim.lr0=abc"], 1, "could not convert string to float: 'abc'"),
    (_OFFICE + ["--config.data.manual_dir={root}/missing"], 1, "{root}/missing"),
    (_OFFICE + ["--config.data.manual_dir={root}/empty"], 1, "{root}/empty"),
    (["--config.data.dataset=custom", "--config.data.manual_dir={root}/tree",
      "--config.data.source=a", "--config.data.target=b"], 1, "{victim}"),
    ([], 3, "config.batch_size=8 cannot be split over 3 devices"),
], ids=["unknown_domain", "missing_weights", "other_architecture_weights", "method_typo",
        "config_field_typo", "config_value_type", "missing_manual_dir", "empty_manual_dir",
        "truncated_jpeg", "batch_not_divisible"])
def test_bad_inputs_are_one_line_errors_and_leave_the_workdir_intact(
    reference_run, bad_inputs, tmp_path, data_dir, overrides, devices, expected):
  """Each bad input, run on (a copy of) a finished workdir: one line, exit 2, no file changed."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  before = _snapshot(workdir)
  overrides = [o.format(**bad_inputs) for o in overrides]
  proc = _main(workdir, data_dir, *overrides, devices=devices, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected.format(**bad_inputs) in last, last
  assert "Traceback" not in proc.stderr
  assert _snapshot(workdir) == before
  fresh = tmp_path / "fresh"  # and no run is started in a new workdir
  proc = _main(fresh, data_dir, *overrides, devices=devices, check=False)
  assert proc.returncode == 2 and not (fresh / "results.json").exists()


def _snapshot(root) -> dict:
  """Relative path -> bytes of every file under ``root``."""
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(root) for f in files}


def test_same_seed_twice_gives_identical_results(reference_run, tmp_path, data_dir):
  workdir = tmp_path / "again"
  _main(workdir, data_dir)
  _assert_same_state(_params(workdir), _params(reference_run[0]))
  res = json.loads((workdir / "results.json").read_text())
  ref = json.loads((reference_run[0] / "results.json").read_text())
  for key in ("evals", "confusion_matrix", "per_class_accuracy"):
    assert res[key] == ref[key], key
  rows, ref_rows = (_train_rows(w) for w in (workdir, reference_run[0]))
  assert rows == ref_rows


def _train_rows(workdir) -> list:
  """metrics.jsonl train rows without the timing field."""
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in rows
          if "train/loss" in r]


def test_a_run_without_any_confident_target_stays_finite(tmp_path, data_dir):
  """δ = 1: no target passes the strict threshold in any step; L_T is empty, losses stay finite."""
  workdir = tmp_path / "run"
  _main(workdir, data_dir, "--config.loss.threshold=1.0")
  rows = _train_rows(workdir)
  assert len(rows) == 6 and all(r["train/confident_frac"] == 0.0 for r in rows)
  assert all(np.isfinite(v) for r in rows for v in r.values())
  state = _params(workdir)[1]
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))
  assert json.loads((workdir / "results.json").read_text())["steps"] == 6
