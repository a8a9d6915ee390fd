#!/usr/bin/env bash
# Create .venv in the checkout and install vissl_vit into it (editable, with test and dev extras).
# Safe to rerun.
#
# torch: on a machine without an NVIDIA GPU the CPU build is installed first, from PyTorch's CPU
# index (the CUDA build that pip picks by default also runs on a CPU, but brings about 3 GB of CUDA
# wheels: a 5.7 GB .venv). VISSL_VIT_TORCH=cpu or VISSL_VIT_TORCH=cuda forces either; auto (the
# default) looks for nvidia-smi or /dev/nvidia0. If the CPU index cannot be reached, or pip's own
# configuration serves another build, pip's default build is installed instead (it says so).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
BUILD="${VISSL_VIT_TORCH:-auto}"
case "$BUILD" in
  auto) if command -v nvidia-smi >/dev/null 2>&1 || [ -e /dev/nvidia0 ]; then BUILD=cuda; else BUILD=cpu; fi ;;
  cpu|cuda) ;;
  *) echo "setup_env: VISSL_VIT_TORCH=$BUILD: expected auto, cpu or cuda" >&2; exit 2 ;;
esac
if [ "$BUILD" = cpu ] && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet --retries 1 --timeout 30 \
      --index-url https://download.pytorch.org/whl/cpu torch torchvision >/dev/null 2>&1 || true
  # a pair that does not load together (a CPU torch beside a torchvision built for the CUDA one,
  # as a partial mirror can serve) is removed, and pip's default build installed below
  if ! .venv/bin/python -c "import torch, torchvision.ops; torchvision.ops.nms" >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall --quiet -y torch torchvision >/dev/null 2>&1 || true
    echo "setup_env: the CPU build of torch and torchvision could not be installed from download.pytorch.org; installing pip's default build"
  fi
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python - <<'PYEOF'
import torch
build = "CUDA " + torch.version.cuda if torch.version.cuda else "CPU"
print(f"torch {torch.__version__} ({build} build)")
PYEOF
echo "vissl_vit installed in $(pwd)/.venv"
