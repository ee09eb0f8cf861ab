#!/usr/bin/env bash
# The oldest supported versions (.ci/min-versions.txt) in their own virtualenv, then the generation
# oracle tests (lambda = 0 equals generate, batch 1 equals batch N, beams, beam tracking) and the Ray
# build test on them.
# Used by .ci/run; about 3 minutes on 2 cores with a warm pip cache.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KNNMT_MIN_VENV:-.venv-min}"
PINS=.ci/min-versions.txt
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -c "$PINS" -e ".[dev]"
"$PY" - "$PINS" <<'PYEOF'
import sys
from importlib.metadata import version
pins = [line.split("==") for line in open(sys.argv[1]) if "==" in line and not line.startswith("#")]
wrong = [(n, v.strip(), version(n)) for n, v in pins if version(n).split("+")[0] != v.strip()]
if wrong:
    sys.exit(f"min-versions venv does not hold the pinned versions: {wrong}")
print("oldest supported:", ", ".join(f"{n} {version(n)}" for n, _ in pins))
PYEOF
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -m pytest -q -p no:cacheprovider tests/test_generation.py tests/test_beam_tracking.py tests/test_index.py \
  tests/test_distributed.py "$@"
