#!/usr/bin/env bash
# Create .venv (if missing) and install sdsprune with its test tools into it.
# torch is pinned first: on the project's CPU machines torch==2.13.0 is a CPU wheel, while an
# unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==${SDSPRUNE_TORCH_VERSION:-2.13.0}"
fi
python -m pip install --quiet -e ".[dev${SDSPRUNE_EXTRAS:+,$SDSPRUNE_EXTRAS}]"
python -c "import sdsprune, torch; print(f'sdsprune ready (torch {torch.__version__})')"
