#!/usr/bin/env bash
# Create .venv with a CPU build of torch and sdfsmis (editable) plus its test tools.
# GPU users: install your CUDA build of torch into the environment first; the range in
# pyproject.toml accepts it and nothing is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
