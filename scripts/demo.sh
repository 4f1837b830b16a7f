#!/usr/bin/env bash
# The README's main command: set up .venv (idempotent, seconds when already done), then run
# the demo: a CP adapter fine-tunes SmolLM2-135M-Instruct on tweet sentiment, with held-out
# accuracy before and after. Extra arguments go to scripts/demo.py (--output-dir, --set k=v).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${TENSORFT_VENV:-.venv}/bin/python" scripts/demo.py "$@"
