#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the bundled default model and corpus:
# prune SmolLM2-135M with SparseGPT and with SDS at 2:4 from the same small calibration set
# and print dense / SparseGPT / SDS perplexity (results, table and plots in runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
sdsprune compare smollm2-135m --methods dense,sparsegpt,sds:sparsegpt --sparsity 2:4 \
  --calib wiki --nsamples 32 --seqlen 512 --dataset wiki --eval-seqlen 1024 --max-chunks 20 \
  --out runs/demo "$@"
