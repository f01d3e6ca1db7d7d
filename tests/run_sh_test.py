"""run.sh's accelerator choice (issue 10): detection, the override, and re-installing on a switch.

Detection runs through `bash run.sh accelerator` with a fake `nvidia-smi` on a PATH that holds
nothing else of the host's but `dirname` and `timeout`, and a fake /sys tree for the TPU probe, so
the same answers come on a GPU host, a TPU VM or a plain CPU machine. The install tests run a copy of
run.sh beside a fake `.venv/bin/python` that logs what pip is asked to do: nothing is installed.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN_SH = ROOT / "run.sh"
BASH = shutil.which("bash")
QUERY = "--query-gpu=driver_version --format=csv,noheader"


def _clean_env(**extra):
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("DSBN_JAX_ACCELERATOR", "TPU_ACCELERATOR_TYPE", "DSBN_JAX_TEST_SYSROOT")
  }
  env.update(extra)
  return env


def _accelerator(tmp_path, nvidia_smi=None, sysroot=None, **env):
  """`bash run.sh accelerator` with only a fake nvidia-smi (a /bin/sh body, or none) on PATH."""
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  for tool in ("dirname", "timeout"):
    if shutil.which(tool) and not (bindir / tool).exists():
      (bindir / tool).symlink_to(shutil.which(tool))
  if nvidia_smi is not None:
    script = bindir / "nvidia-smi"
    # Answers only the query run.sh is meant to make.
    script.write_text(
      f'#!/bin/sh\n[ "$*" = "{QUERY}" ] || {{ echo "bad args: $*"; exit 64; }}\n'
      + nvidia_smi
      + "\n"
    )
    script.chmod(0o755)
  if sysroot is None:
    sysroot = tmp_path / "sysroot"  # empty: no TPU on PCI, no /dev/accel*
    sysroot.mkdir(exist_ok=True)
  full_env = _clean_env(PATH=str(bindir), DSBN_JAX_TEST_SYSROOT=str(sysroot), **env)
  return subprocess.run(
    [BASH, str(RUN_SH), "accelerator"], env=full_env, capture_output=True, text=True, timeout=60
  )


@pytest.mark.parametrize(
  "smi,extra,why",
  [
    ("echo 590.44.01", "cuda13", "NVIDIA driver 590.44.01 supports CUDA 13 (>= 580)"),
    ("echo 580.65.06", "cuda13", "NVIDIA driver 580.65.06 supports CUDA 13 (>= 580)"),
    (
      "echo 550.54.14; echo 550.54.14",
      "cuda12",  # two GPUs: one line each
      "NVIDIA driver 550.54.14 supports CUDA 12 (>= 525), not CUDA 13 (>= 580)",
    ),
    ("echo 525.60.13", "cuda12", "NVIDIA driver 525.60.13 supports CUDA 12 (>= 525)"),
  ],
)
def test_nvidia_driver_picks_the_newest_cuda_extra_it_supports(tmp_path, smi, extra, why):
  r = _accelerator(tmp_path, smi)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith(f"{extra}: {why}"), r.stdout
  assert r.stdout.count("\n") == 1 and r.stderr == ""


@pytest.mark.parametrize(
  "smi,note",
  [
    ("echo 470.82.01", "NVIDIA driver 470.82.01 is older than 525"),
    (
      "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; "
      "exit 9",
      "nvidia-smi failed (exit 9: NVIDIA-SMI has failed because it couldn't",
    ),
    ("exit 6", "nvidia-smi failed (exit 6)"),
    ("echo 'No devices were found'", "nvidia-smi printed no driver version ('No devices"),
  ],
)
def test_unusable_nvidia_driver_falls_back_to_cpu_with_a_warning(tmp_path, smi, note):
  r = _accelerator(tmp_path, smi)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith(f"cpu: no usable NVIDIA GPU: {note}"), r.stdout
  warning = r.stderr.splitlines()
  assert len(warning) == 1 and warning[0].startswith(f"[run.sh] warning: {note}"), r.stderr
  assert "installing the CPU build" in warning[0]


def test_no_gpu_and_no_tpu_is_cpu(tmp_path):
  r = _accelerator(tmp_path)
  assert (r.returncode, r.stdout, r.stderr) == (
    0,
    "cpu: no NVIDIA driver (nvidia-smi) and no TPU found\n",
    "",
  )


def _pci(sysroot, slot, vendor, device):
  d = sysroot / "sys/bus/pci/devices" / slot
  d.mkdir(parents=True)
  (d / "vendor").write_text(vendor + "\n")
  (d / "device").write_text(device + "\n")


def test_tpu_vm_is_detected_as_jax_does(tmp_path):
  sysroot = tmp_path / "tpu_vm"
  _pci(sysroot, "0000:00:04.0", "0x1ae0", "0x0042")  # Google's gVNIC network card: not a TPU
  assert _accelerator(tmp_path, sysroot=sysroot).stdout.startswith("cpu: ")
  _pci(sysroot, "0000:00:05.0", "0x1ae0", "0x0063")  # a TPU v5e chip
  r = _accelerator(tmp_path, sysroot=sysroot)
  assert r.stdout == "tpu: TPU chip on PCI (vendor 0x1ae0, device 0x0063)\n", r
  r = _accelerator(tmp_path, TPU_ACCELERATOR_TYPE="v6e-8")  # GKE's TPU nodes
  assert r.stdout == "tpu: TPU_ACCELERATOR_TYPE=v6e-8\n", r


@pytest.mark.parametrize("choice", ["cpu", "cuda12", "cuda13", "tpu"])
def test_override_wins_without_probing(tmp_path, choice):
  marker = tmp_path / "nvidia-smi-ran"
  r = _accelerator(tmp_path, f"touch {marker}; echo 590.44.01", DSBN_JAX_ACCELERATOR=choice)
  assert (r.returncode, r.stdout, r.stderr) == (0, f"{choice}: DSBN_JAX_ACCELERATOR={choice}\n", "")
  assert not marker.exists()


@pytest.mark.parametrize("command", ["accelerator", "test", "main"])
def test_invalid_override_is_a_one_line_error_before_anything_is_installed(tmp_path, command):
  work = tmp_path / "repo"
  work.mkdir()
  for name in ("run.sh", "pyproject.toml"):
    shutil.copy(ROOT / name, work / name)
  # Nothing but dirname on PATH (no python3): had run.sh gone on, it could not even make the venv.
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "dirname").symlink_to(shutil.which("dirname"))
  env = _clean_env(PATH=str(bindir), DSBN_JAX_ACCELERATOR="gpu")
  r = subprocess.run(
    [BASH, str(work / "run.sh"), command], env=env, capture_output=True, text=True, timeout=60
  )
  assert r.returncode == 2 and r.stdout == "", r
  assert r.stderr == (
    "error: DSBN_JAX_ACCELERATOR='gpu' is not one of cpu, cuda12, cuda13, tpu "
    "(unset it to detect)\n"
  ), r.stderr
  assert sorted(p.name for p in work.iterdir()) == ["pyproject.toml", "run.sh"]


# A stand-in for .venv/bin/python: logs each call, and keeps a list of installed accelerator
# packages that `pip install -e .[...]` adds to and `pip uninstall` removes from.
FAKE_PYTHON = '''#!{python}
import pathlib, sys
root = pathlib.Path(__file__).resolve().parents[2]  # repo/.venv/bin/python -> repo
args = sys.argv[1:]
with open(root / "calls.log", "a") as f:
  f.write(" ".join(args) + "\\n")
state = root / "installed.txt"
installed = state.read_text().split() if state.exists() else []
plugins = {{"cuda12": ["jax-cuda12-plugin==0.10.2", "jax_cuda12_pjrt==0.10.2"],
           "cuda13": ["jax-cuda13-plugin==0.10.2", "jax-cuda13-pjrt==0.10.2"],
           "tpu": ["libtpu==0.0.40"]}}
if args[:3] == ["-m", "pip", "list"]:
  print("\\n".join(["absl-py==2.5.1"] + installed))
elif args[:3] == ["-m", "pip", "uninstall"]:
  installed = [p for p in installed if p.split("==")[0] not in args]
elif args[:3] == ["-m", "pip", "install"] and "-e" in args:
  extras = args[-1].partition("[")[2].rstrip("]").split(",")
  installed += [p for e in extras for p in plugins.get(e, []) if p not in installed]
state.write_text("\\n".join(installed))
'''


def _install_repo(tmp_path):
  work = tmp_path / "repo"
  (work / ".venv/bin").mkdir(parents=True)
  for name in ("run.sh", "pyproject.toml"):
    shutil.copy(ROOT / name, work / name)
  python = work / ".venv/bin/python"
  python.write_text(FAKE_PYTHON.format(python=sys.executable))
  python.chmod(0o755)
  return work


def _run(work, *args, accelerator, workers="1"):
  """``workers``: DSBN_JAX_TEST_WORKERS (None: unset, run.sh's default)."""
  env = _clean_env(DSBN_JAX_ACCELERATOR=accelerator, DSBN_JAX_TEST_WORKERS=workers or "")
  if workers is None:
    del env["DSBN_JAX_TEST_WORKERS"]
  r = subprocess.run(
    [BASH, str(work / "run.sh"), *args], env=env, capture_output=True, text=True, timeout=120
  )
  assert r.returncode == 0, r
  log = work / "calls.log"
  calls = log.read_text().splitlines() if log.exists() else []
  log.unlink(missing_ok=True)
  installed = (work / "installed.txt").read_text().split()
  return r, calls, installed


def test_stamp_holds_the_choice_and_a_switch_reinstalls_and_drops_the_other_plugins(tmp_path):
  work = _install_repo(tmp_path)
  upgrade = "-m pip install -q --upgrade pip setuptools wheel"
  listing = "-m pip list --format=freeze"
  pytest_call = "-m pytest tests -q"

  r, calls, installed = _run(work, "test", "-q", accelerator="cuda12")
  assert calls == [upgrade, listing, "-m pip install -q -e .[test,cuda12]", pytest_call]
  assert "[run.sh] accelerator cuda12: DSBN_JAX_ACCELERATOR=cuda12\n" in r.stderr
  assert installed == ["jax-cuda12-plugin==0.10.2", "jax_cuda12_pjrt==0.10.2"]
  sha = subprocess.run(
    ["sha256sum", str(work / "pyproject.toml")], capture_output=True, text=True, check=True
  ).stdout.split()[0]
  stamp = work / ".venv/.dsbn_jax_install"
  assert stamp.read_text() == f"{sha} accelerator=cuda12 extras=test,cuda12\n"

  # Same choice: no install, for `test` and for `main` (whose extras the test install includes).
  assert _run(work, "test", "-q", accelerator="cuda12")[1] == [pytest_call]
  main = "-m dsbn_jax.sweep --config=configs/digits.py --workdir=runs/default"
  assert _run(work, "main", accelerator="cuda12")[1] == [main]

  # CPU after CUDA: the CUDA plugins go, then the CPU install.
  r, calls, installed = _run(work, "test", "-q", accelerator="cpu")
  assert calls == [
    upgrade,
    listing,
    "-m pip uninstall -q -y jax-cuda12-plugin jax_cuda12_pjrt",
    "-m pip install -q -e .[test]",
    pytest_call,
  ]
  assert installed == [] and stamp.read_text() == f"{sha} accelerator=cpu extras=test\n"

  # CUDA 13, then CUDA 12 again: never both plugins at once.
  _, calls, installed = _run(work, "main", accelerator="cuda13")
  assert calls == [upgrade, listing, "-m pip install -q -e .[cuda13]", main]
  _, calls, installed = _run(work, "test", "-q", accelerator="cuda12")
  assert calls[2:] == [
    "-m pip uninstall -q -y jax-cuda13-plugin jax-cuda13-pjrt",
    "-m pip install -q -e .[test,cuda12]",
    pytest_call,
  ]
  assert installed == ["jax-cuda12-plugin==0.10.2", "jax_cuda12_pjrt==0.10.2"]

  # A changed pyproject.toml re-installs with the same choice.
  with open(work / "pyproject.toml", "a", encoding="utf-8") as f:
    f.write("\n")
  assert "-m pip install -q -e .[test,cuda12]" in _run(work, "test", "-q", accelerator="cuda12")[1]


def test_the_suite_runs_on_two_workers_unless_told_otherwise(tmp_path):
  """pytest-xdist: two workers taking whole files (one per core up to two), DSBN_JAX_TEST_WORKERS
  sets the count, an -n of the user's wins."""
  work = _install_repo(tmp_path)
  _run(work, "test", accelerator="cpu")  # the install
  default = min(2, len(os.sched_getaffinity(0)))
  xdist = f" -n {default} --dist loadfile" if default > 1 else ""
  assert _run(work, "test", "-q", accelerator="cpu", workers=None)[1] == [
    f"-m pytest tests{xdist} -q"
  ]
  assert _run(work, "test", "-x", accelerator="cpu", workers="3")[1] == [
    "-m pytest tests -n 3 --dist loadfile -x"
  ]
  assert _run(work, "test", accelerator="cpu", workers="1")[1] == ["-m pytest tests"]
  assert _run(work, "test", "-n", "0", "-k", "port", accelerator="cpu", workers="2")[1] == [
    "-m pytest tests -n 0 -k port"
  ]
