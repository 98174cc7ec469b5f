#!/usr/bin/env bash
# One-step set-up: system data package (Fashion-MNIST), PyTorch, then egg-optim with every extra and the recipes kit (recipes/, egg-optim-recipes).
# Keeps an already installed torch (CPU or CUDA build). Without one it installs torch==2.13.0: a CPU build
# where the machine provides one locally, else the default (CUDA) wheel from PyPI. On a GPU-less machine
# elsewhere, install a CPU torch first (see README) to avoid gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "setup: could not install dataset-fashion-mnist (Fashion-MNIST tests will be skipped)"
fi

if python -c "import torch" 2>/dev/null; then
  python -m pip install -q -e ".[all]" -e ./recipes
else
  python -m pip install -q "torch==2.13.0" -e ".[all]" -e ./recipes
fi
python -c "import torch, egg_optim, egg_recipes; print(f'setup: egg_optim {egg_optim.__version__}, torch {torch.__version__}')"
