#!/usr/bin/env bash
# Fresh machine -> a trained ViT: install vissl_vit in .venv, fetch Fashion-MNIST (Debian package),
# train the quickstart config. Extra arguments are passed on as overrides (config.X=v).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
bash tools/get_fashion_mnist.sh
exec .venv/bin/python tools/run_distributed_engines.py config=quickstart/vit_fashion_mnist "$@"
