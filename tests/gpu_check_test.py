"""benchmarks/gpu_check.py --smoke, run as the GPU machine would run it: without TensorFlow.

The GPU machine has no tensorflow nor tensorflow_datasets, so the script must never import them
(``dsbn_jax.train``, ``input_pipeline``, ``transforms`` and ``datasets`` do, at import time). The
subprocess here gets a ``sitecustomize.py`` on its PYTHONPATH whose import hook makes both fail
(checked first: without the hook this venv imports them), then runs the smoke mode and reads every
figure of its JSON. ml_collections stays importable: the GPU run carries its wheel (BENCHMARKS.md,
"GPU check (issue 22)").
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tests import suite_env

SCRIPT = os.path.join(suite_env.ROOT, "benchmarks", "gpu_check.py")
BLOCKED = ("tensorflow", "tensorflow_datasets")

# Every meta path finder is wrapped so that it finds no module of BLOCKED: ``import tensorflow``
# fails with ModuleNotFoundError and ``importlib.util.find_spec("tensorflow")`` is None, as where
# they are not installed (torch's dynamo probes optional packages with find_spec).
SITECUSTOMIZE = f"""
import sys

class _Hide:
  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {BLOCKED!r}:
      return None
    find = getattr(self._finder, "find_spec", None)
    return None if find is None else find(name, path, target)

  def __getattr__(self, attr):
    return getattr(self._finder, attr)

sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
"""


@pytest.fixture(scope="module")
def no_tf_env(tmp_path_factory):
  """A subprocess environment in which importing TensorFlow or TFDS fails (one CPU device, the
  suite's compilation cache, no $OUT)."""
  blocker = tmp_path_factory.mktemp("no_tf")
  (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
  path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH", "")) if p)
  env = suite_env.subprocess_env(1, PYTHONPATH=path)
  env.pop("OUT", None)
  return env


def test_blocker_blocks_tensorflow(no_tf_env):
  """Without the hook this venv imports both (tensorflow-cpu is a dependency): the hook works."""
  probe = f"""
import importlib.util
for name in {BLOCKED!r}:
  print(name, importlib.util.find_spec(name))
  try:
    __import__(name)
    print("imported", name)
  except ModuleNotFoundError as e:
    print(e)
"""
  out = subprocess.run(
    [sys.executable, "-c", probe], env=no_tf_env, capture_output=True, text=True, timeout=60
  )
  expected = [line for m in BLOCKED for line in (f"{m} None", f"No module named {m!r}")]
  assert out.stdout.splitlines() == expected, out.stdout + out.stderr


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(no_tf_env, tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
  proc = subprocess.run(
    [sys.executable, SCRIPT, "--smoke", "--out", str(out)],
    env=no_tf_env,
    cwd=suite_env.ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  with open(out) as f:
    return json.load(f), proc.stdout


def test_smoke_runs_every_section(smoke):
  result, stdout = smoke
  assert result["errors"] == {} and result["skipped"] == {}, (result["errors"], result["skipped"])
  assert result["smoke"] is True
  s = result["settings"]
  assert (s["batch"], s["image_size"], s["images_per_step"], s["steps"]) == (2, 32, 4, 3)
  assert _positive(result["wall_s"]) and _positive(result["jax_state_init_s"])
  for key in ("jax", "jaxlib", "flax", "optax", "jax_device_kind", "python"):
    assert result["device"][key], key
  assert "| JAX / PyTorch, two_calls |" in stdout and "wrote " in stdout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["two_calls", "fused"])
def test_jax_step_figures(smoke, dtype, name):
  entry = smoke[0]["jax_step"][dtype][name]
  assert len(entry["step_ms"]) == entry["timed_steps"] == 3
  assert all(_positive(v) for v in entry["step_ms"])
  assert entry["median_step_ms"] == sorted(entry["step_ms"])[1]
  assert entry["images_per_s"] == pytest.approx(4 / (entry["median_step_ms"] / 1000), rel=1e-3)
  for key in ("compile_s", "trace_lower_s", "xla_compile_s"):
    assert _positive(entry[key]), key
  assert entry["finite"] is True and math.isfinite(entry["loss_first"])
  assert _positive(entry["compiled_memory"]["argument_bytes"])
  assert "device_memory_after" in entry  # None on a CPU: memory_stats() has nothing there


def test_first_losses_match_across_variants(smoke):
  """Every variant's first step starts from the same state and batch: the fused pass and bf16
  compute the same loss up to rounding (bf16 loosely), and the precision check's 'default' loss is
  the float32 two-call step's first one exactly (the same program, the same inputs, on a CPU)."""
  js = smoke[0]["jax_step"]
  ref = js["float32"]["two_calls"]["loss_first"]
  assert js["float32"]["fused"]["loss_first"] == pytest.approx(ref, rel=1e-4)
  for name in ("two_calls", "fused"):
    assert js["bfloat16"][name]["loss_first"] == pytest.approx(ref, rel=0.1)
  assert smoke[0]["precision"]["loss_default"] == ref


def test_torch_step_and_ratio(smoke):
  result = smoke[0]
  ts = result["torch_step"]
  assert ts["torch"] and ts["torchvision"]
  for dtype in ("float32", "bfloat16"):
    entry = ts[dtype]
    assert len(entry["step_ms"]) == 3 and _positive(entry["median_step_ms"])
    assert entry["compute"] == "float32"  # a CPU: TorchSide autocasts on a GPU only
    assert entry["lr0"] == 0.0 and math.isfinite(entry["loss_last"])
    assert result["memory"]["torch_max_memory_allocated_bytes"][dtype] is None  # CPU
    for name in ("two_calls", "fused"):
      jax_ips = result["jax_step"][dtype][name]["images_per_s"]
      assert result["ratio_jax_over_torch"][dtype][name] == round(
        jax_ips / entry["images_per_s"], 3
      )
  for key in ("jax_peak_bytes_in_use", "jax_peak_bytes_in_use_float32_two_calls"):
    assert key in result["memory"] and result["memory"][key] is None  # CPU: no memory_stats()


@pytest.mark.parametrize("source", ["device_resident", "host_fed", "resident_cache"])
def test_loop_reads_metrics_every_log_every_steps(smoke, source):
  entry = smoke[0]["loop"][source]
  assert entry["steps"] == 4 and entry["log_every_steps"] == 2
  assert entry["host_reads"] == 2  # steps 2 and 4: no per-step read back
  assert [r["step"] for r in entry["loss_rows"]] == [2, 4]
  assert entry["finite"] is True and entry["first_nonfinite_step"] is None
  assert _positive(entry["images_per_s"]) and _positive(entry["first_step_s"])


def test_precision_check(smoke):
  p = smoke[0]["precision"]
  assert math.isfinite(p["loss_default"]) and math.isfinite(p["loss_highest"])
  assert p["loss_abs_diff"] == abs(p["loss_default"] - p["loss_highest"])
  assert p["finite"] is True and _positive(p["highest_compile_s"])
  assert p["metrics"]["train/loss"]["default"] == p["loss_default"]
