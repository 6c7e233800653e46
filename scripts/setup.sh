#!/usr/bin/env bash
# Create .venv (if missing) and install sdsprune with its test tools into it.
# torch is pinned first: on the project's CPU machines torch==2.13.0 is a CPU wheel, while an
# unpinned torch would pull a multi-GB CUDA build.
# A CUDA build of torch (for a GPU machine): name a PyTorch wheel index, e.g.
#   SDSPRUNE_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
# torch is then installed with pip's --index-url from it (the cuXXX your driver supports:
# nvidia-smi shows its CUDA version), replacing a CPU-only torch already in .venv; a CUDA
# build already there is kept (delete .venv to switch CUDA versions). Unset: torch from pip's
# configured index, installed only when .venv has none.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
TORCH_SPEC="torch==${SDSPRUNE_TORCH_VERSION:-2.13.0}"
if [ -n "${SDSPRUNE_TORCH_INDEX:-}" ]; then
  if ! python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "setup: installing a CUDA build, $TORCH_SPEC from $SDSPRUNE_TORCH_INDEX"
    python -m pip uninstall --quiet -y torch 2>/dev/null || true  # a CPU build would satisfy the pin
    python -m pip install --quiet --index-url "$SDSPRUNE_TORCH_INDEX" "$TORCH_SPEC"
  fi
elif ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "$TORCH_SPEC"
fi
python -m pip install --quiet -e ".[dev${SDSPRUNE_EXTRAS:+,$SDSPRUNE_EXTRAS}]"
python -c "import sdsprune, torch; print(f'sdsprune ready (torch {torch.__version__})')"
