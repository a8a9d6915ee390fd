#!/usr/bin/env bash
# Make sure Fashion-MNIST is in /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist).
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
  echo "Installing Debian's dataset-fashion-mnist ..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
else
  cat >&2 <<MSG
Fashion-MNIST is missing from $DIR and apt-get cannot be used here.
Provide the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; gzipped or not) in a folder and run
the quickstart with  config.DATA.TRAIN.DATA_PATHS=[/that/folder] config.DATA.TEST.DATA_PATHS=[/that/folder]
MSG
  exit 1
fi
