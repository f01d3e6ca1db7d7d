#!/usr/bin/env bash
# dsbn_jax entry point. Every command sets itself up on a fresh machine (Python >= 3.10 needed).
#   bash run.sh              install, then run the main job on the embedded default (Digits -> Digits-M)
#   bash run.sh test [ARGS]  install with the test extra (torch/torchvision for parity), run pytest
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
  main)
    ensure_install ""
    if [ ! -f dsbn_jax/main.py ]; then
      echo "[run.sh] the main job (dsbn_jax/main.py) is not implemented yet; 'bash run.sh test' runs the suite." >&2
      exit 1
    fi
    exec "$VENV/bin/python" -m dsbn_jax.main --config=configs/digits.py
    ;;
  *)
    echo "usage: bash run.sh [test [pytest args]]" >&2
    exit 2
    ;;
esac
