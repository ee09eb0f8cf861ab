#!/usr/bin/env bash
# The project's test command (README): the whole pytest suite, offline, on tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"${KNNMT_VENV:-.venv}/bin/python" -m pytest -q "$@"
