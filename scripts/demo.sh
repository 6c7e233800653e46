#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the bundled default model and corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
sdsprune eval smollm2-135m --dataset wiki --seqlen 1024 --max-chunks 40 "$@"
