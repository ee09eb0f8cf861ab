#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with CPU PyTorch first, then knnmt.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KNNMT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch before anything that depends on it: the pinned CPU build (a bare `torch` would pull CUDA).
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev]"
echo "knnmt is installed in $VENV ($("$PY" -c 'import knnmt; print(knnmt.__version__)'))" >&2
