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
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
echo "tensorft installed in $VENV"
