#!/usr/bin/env bash
# dsbn_jax entry point. Every command sets itself up on a fresh machine (Python >= 3.10 needed).
#   bash run.sh              install, then run the main job on the embedded default (Digits -> Digits-M)
#   bash run.sh test [ARGS]  install with the test extra (torch/torchvision for parity), run pytest
#   bash run.sh office31     the Office-31 sweep (configs/office31.py); likewise officehome
# Installation is skipped when .venv already holds this exact pyproject.toml (a stamp file).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

ensure_install() {  # $1 = extra ("" or "test")
  local extra=$1 spec="." stamp want
  [ -n "$extra" ] && spec=".[$extra]"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  stamp="$VENV/.dsbn_jax_installed${extra:+_$extra}"
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[run.sh] installing dsbn_jax${extra:+ with the '$extra' extra} into $VENV ..." >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
    "$VENV/bin/python" -m pip install -q -e "$spec" >&2
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-main}
case "$cmd" in
  test)
    shift
    ensure_install test
    exec "$VENV/bin/python" -m pytest tests "$@"
    ;;
  main)  # the embedded default: source-only vs ALDA+DSBN on Digits -> Digits-M, then the table
    ensure_install ""
    exec "$VENV/bin/python" -m dsbn_jax.sweep --config=configs/digits.py --workdir=runs/default
    ;;
  office31|officehome)  # every task x method x seed of the paper's tables (resumable)
    ensure_install ""
    shift
    exec "$VENV/bin/python" -m dsbn_jax.sweep --config="configs/$cmd.py" --workdir="runs/$cmd" "$@"
    ;;
  *)
    echo "usage: bash run.sh [test [pytest args] | office31 | officehome [sweep flags]]" >&2
    exit 2
    ;;
esac
