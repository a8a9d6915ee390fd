#!/usr/bin/env bash
# Create .venv in the checkout and install vissl_vit into it (editable, with test and dev extras).
# Safe to rerun. pip resolves torch through torchvision (the CUDA build, which also runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "vissl_vit installed in $(pwd)/.venv"
