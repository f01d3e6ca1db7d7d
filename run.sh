#!/usr/bin/env bash
# dsbn_jax entry point. Every command sets itself up on a fresh machine (Python >= 3.10 needed).
#   bash run.sh              install, then run the main job on the embedded default (Digits -> Digits-M)
#   bash run.sh test [ARGS]  install with the test extra (torch/torchvision for parity), run pytest
#   bash run.sh lint         ruff format --check and ruff check (what .ci/run runs before the tests)
#   bash run.sh office31     the Office-31 sweep (configs/office31.py); likewise officehome; sweep
#                            flags pass through (--tasks, --methods, --bn, --seeds)
#   bash run.sh accelerator  print the accelerator extra an install would pick, and why (no install)
# Accelerator: DSBN_JAX_ACCELERATOR=cpu|cuda12|cuda13|tpu picks the pyproject extra; unset, it is
# detected (an NVIDIA driver: the newest CUDA extra it supports; a Cloud TPU VM: tpu; else cpu).
# Installation is skipped when .venv already holds this exact pyproject.toml installed with this
# accelerator and these extras (a stamp file); anything else re-installs.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

# Minimum Linux driver for JAX's CUDA wheels, by major version (JAX's installation guide: "the
# driver version must be >= 525 for CUDA 12 on Linux, and >= 580 for CUDA 13 on Linux").
CUDA13_MIN_DRIVER=580
CUDA12_MIN_DRIVER=525
# Where the TPU probe looks: the real /sys and /dev, unless the tests point it at a fake tree.
SYSROOT=${DSBN_JAX_TEST_SYSROOT:-}

has_tpu() {  # sets TPU_WHY when this looks like a Cloud TPU VM
  local dev vendor device
  # What JAX itself checks (jax/_src/hardware_utils.py): a PCI device of Google's vendor id whose
  # device id is a TPU chip (v2/v3, v4, v5p, v5e, v6e, TPU7x). Google's vendor id alone is not
  # enough: every GCE VM's gVNIC network card carries it.
  for dev in "$SYSROOT"/sys/bus/pci/devices/*; do
    [ -r "$dev/vendor" ] && [ -r "$dev/device" ] || continue
    vendor=$(<"$dev/vendor"); device=$(<"$dev/device")
    if [ "$vendor" = 0x1ae0 ]; then
      case "$device" in
        0x0027|0x0056|0x005e|0x0062|0x0063|0x006f|0x0076)
          TPU_WHY="TPU chip on PCI (vendor 0x1ae0, device $device)"; return 0 ;;
      esac
    fi
  done
  # TPU generations newer than that list: GKE sets TPU_ACCELERATOR_TYPE on TPU nodes, and the TPU
  # driver creates /dev/accel0... (a file per chip; the Linux accel subsystem's NPUs use the
  # /dev/accel/ folder instead). /dev/vfio/N is not used: any PCI passthrough creates it.
  if [ -n "${TPU_ACCELERATOR_TYPE:-}" ]; then
    TPU_WHY="TPU_ACCELERATOR_TYPE=$TPU_ACCELERATOR_TYPE"; return 0
  fi
  for dev in "$SYSROOT"/dev/accel[0-9]*; do
    [ -c "$dev" ] && { TPU_WHY="TPU device ${dev#"$SYSROOT"}"; return 0; }
  done
  return 1
}

choose_accelerator() {  # sets ACCEL (cpu|cuda12|cuda13|tpu), ACCEL_WHY, ACCEL_WARN ("" or why)
  local out rc=0 first driver major gpu_note=""
  ACCEL_WARN=""
  if [ -n "${DSBN_JAX_ACCELERATOR:-}" ]; then
    case "$DSBN_JAX_ACCELERATOR" in
      cpu|cuda12|cuda13|tpu)
        ACCEL=$DSBN_JAX_ACCELERATOR; ACCEL_WHY="DSBN_JAX_ACCELERATOR=$ACCEL"; return ;;
      *)
        echo "error: DSBN_JAX_ACCELERATOR='$DSBN_JAX_ACCELERATOR' is not one of" \
             "cpu, cuda12, cuda13, tpu (unset it to detect)" >&2
        exit 2 ;;
    esac
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    if command -v timeout >/dev/null 2>&1; then  # a wedged driver can hang nvidia-smi
      out=$(timeout 60 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1) || rc=$?
    else
      out=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1) || rc=$?
    fi
    first=${out%%$'\n'*}; driver=${first//[[:space:]]/}  # the first GPU's line
    major=${driver%%.*}
    if [ "$rc" -ne 0 ]; then
      gpu_note="nvidia-smi failed (exit $rc${first:+: $first})"
    elif ! [[ "$major" =~ ^[0-9]+$ ]]; then
      gpu_note="nvidia-smi printed no driver version ('$first')"
    elif [ "$major" -ge "$CUDA13_MIN_DRIVER" ]; then
      ACCEL=cuda13; ACCEL_WHY="NVIDIA driver $driver supports CUDA 13 (>= $CUDA13_MIN_DRIVER)"
      return
    elif [ "$major" -ge "$CUDA12_MIN_DRIVER" ]; then
      ACCEL=cuda12
      ACCEL_WHY="NVIDIA driver $driver supports CUDA 12 (>= $CUDA12_MIN_DRIVER), not CUDA 13"
      ACCEL_WHY+=" (>= $CUDA13_MIN_DRIVER)"
      return
    else
      gpu_note="NVIDIA driver $driver is older than $CUDA12_MIN_DRIVER,"
      gpu_note+=" the minimum of JAX's CUDA 12 wheels"
    fi
  fi
  if has_tpu; then
    ACCEL=tpu; ACCEL_WHY=$TPU_WHY; return
  fi
  ACCEL=cpu
  if [ -n "$gpu_note" ]; then
    ACCEL_WHY="no usable NVIDIA GPU: $gpu_note"
    ACCEL_WARN="$gpu_note; installing the CPU build"
    ACCEL_WARN+=" (update the driver, or set DSBN_JAX_ACCELERATOR)"
  else
    ACCEL_WHY="no NVIDIA driver (nvidia-smi) and no TPU found"
  fi
}

ensure_install() {  # $1 = the command's pyproject extra ("" or "test"); the accelerator's is added
  local extras=$1 spec stamp want have_sha="" have_acc="" have_extras="" e ok=1 stale
  choose_accelerator
  if [ "$ACCEL" != cpu ]; then extras=${extras:+$extras,}$ACCEL; fi
  spec=".${extras:+[$extras]}"
  stamp="$VENV/.dsbn_jax_install"
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  # The stamp: pyproject.toml's hash, the accelerator and the extras of the last install. It serves
  # a command whose extras it includes (`run.sh` after `run.sh test`), for the same accelerator.
  if [ -r "$stamp" ]; then read -r have_sha have_acc have_extras < "$stamp" || true; fi
  [ "$have_sha" = "$want" ] && [ "$have_acc" = "accelerator=$ACCEL" ] || ok=0
  for e in ${extras//,/ }; do
    [[ ",${have_extras#extras=}," == *",$e,"* ]] || ok=0
  done
  [ "$ok" = 1 ] && return
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  echo "[run.sh] accelerator $ACCEL: $ACCEL_WHY" >&2
  [ -z "$ACCEL_WARN" ] || echo "[run.sh] warning: $ACCEL_WARN" >&2
  echo "[run.sh] installing dsbn_jax${extras:+[$extras]} into $VENV ..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
  # Switching accelerators: pip never removes what the new extra does not name, and JAX loads every
  # PJRT plugin it finds installed (jax-cuda*-plugin/-pjrt, libtpu): a CPU choice after a CUDA
  # install would still run on the GPU, and CUDA 12 and 13 plugins side by side fail to register.
  # So the plugins of the other accelerators go first. NVIDIA's library wheels (nvidia-*) stay:
  # nothing loads them without a plugin, and torch (test extra) depends on its own.
  case "$ACCEL" in
    cpu)    stale='jax[-_.]cuda1[23][-_.](plugin|pjrt)|libtpu' ;;
    cuda12) stale='jax[-_.]cuda13[-_.](plugin|pjrt)|libtpu' ;;
    cuda13) stale='jax[-_.]cuda12[-_.](plugin|pjrt)|libtpu' ;;
    tpu)    stale='jax[-_.]cuda1[23][-_.](plugin|pjrt)' ;;
  esac
  stale=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
          | grep -i -E "^($stale)==" | cut -d= -f1 | tr '\n' ' ') || true
  if [ -n "$stale" ]; then
    echo "[run.sh] removing the other accelerators' JAX plugins: $stale" >&2
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip uninstall -q -y $stale >&2
  fi
  "$VENV/bin/python" -m pip install -q -e "$spec" >&2
  rm -f "$VENV"/.dsbn_jax_installed*  # the stamps of an older run.sh (one per extra)
  echo "$want accelerator=$ACCEL extras=$extras" > "$stamp"
}

cmd=${1:-main}
case "$cmd" in
  test)
    shift
    ensure_install test
    # pytest-xdist workers, each taking whole test files (--dist loadfile: a module's fixtures and
    # background runs stay in one process): compiling and tracing are single-threaded, so two
    # workers use both cores of a 2-core machine. DSBN_JAX_TEST_WORKERS=N sets the count (1: one
    # process, no xdist); an -n in the arguments wins (`bash run.sh test -n 0 -k port`).
    cores=$(nproc 2>/dev/null || echo 1)
    workers=${DSBN_JAX_TEST_WORKERS:-$(( cores < 2 ? cores : 2 ))}
    xdist=()
    if [ "$workers" -gt 1 ] && [[ " $* " != *" -n"* && " $* " != *" --numprocesses"* ]]; then
      xdist=(-n "$workers" --dist loadfile)
    fi
    exec "$VENV/bin/python" -m pytest tests "${xdist[@]}" "$@"
    ;;
  lint)  # what .ci/run checks before the tests: ruff's formatter and linter (config: pyproject.toml)
    ensure_install test
    "$VENV/bin/ruff" format --check dsbn_jax configs benchmarks tests
    exec "$VENV/bin/ruff" check dsbn_jax configs benchmarks tests
    ;;
  main)  # the embedded default: source-only vs ALDA+DSBN on Digits -> Digits-M, then the table
    ensure_install ""
    exec "$VENV/bin/python" -m dsbn_jax.sweep --config=configs/digits.py --workdir=runs/default
    ;;
  accelerator)  # detection only: "<extra>: <why>" on stdout, nothing installed
    choose_accelerator
    [ -z "$ACCEL_WARN" ] || echo "[run.sh] warning: $ACCEL_WARN" >&2
    echo "$ACCEL: $ACCEL_WHY"
    ;;
  office31|officehome)  # every task x method x seed of the paper's tables (resumable)
    ensure_install ""
    shift
    exec "$VENV/bin/python" -m dsbn_jax.sweep --config="configs/$cmd.py" --workdir="runs/$cmd" "$@"
    ;;
  *)
    echo "usage: bash run.sh [test [pytest args] | lint | office31 | officehome [sweep flags]" \
         "| accelerator]" >&2
    exit 2
    ;;
esac
