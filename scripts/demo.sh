#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the bundled default model and corpus,
# sized for about 10 minutes from a fresh clone on 2 idle CPU cores, setup included
# (measurements in benchmarks/results/demo-fresh-clone.md): prune SmolLM2-135M with SparseGPT
# and with SDS at 2:4 from the same 16 x 512 calibration tokens of wiki, print dense /
# SparseGPT / SDS wiki perplexity on 10 chunks of 1024 tokens, then the paired 95% intervals
# (SDS against SparseGPT, each against dense) from runs/demo/results.md (table, plots and run
# files in runs/demo; extra arguments go to `compare`).
# SDS runs a shortened schedule here (--sds: 20 adjustment steps, a 1-epoch block re-fit on 8
# windows; the defaults are 50 steps and 2 epochs on 16 windows), then its default
# distillation epoch (14 of the 16 windows; 2 held out), which keeps most of its gain.
# The full `cpu-small` protocol (docs/evaluation.md) with default SDS settings, the setting of
# the README's headline table, takes about half an hour on 2 cores:
#   sdsprune compare smollm2-135m --methods dense,sparsegpt,sds:sparsegpt --sparsity 2:4 \
#     --calib wiki --nsamples 64 --seqlen 512 --dataset wiki --eval-seqlen 1024 \
#     --max-chunks 40 --out runs/compare-cpu-small
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
OUT=runs/demo
sdsprune compare smollm2-135m --methods dense,sparsegpt,sds:sparsegpt --sparsity 2:4 \
  --calib wiki --nsamples 16 --seqlen 512 --dataset wiki --eval-seqlen 1024 --max-chunks 10 \
  --sds block_epochs=1,block_windows=8,adjust_iters=20 --out "$OUT" "$@"
case " $* " in
  *" --out"* | *" --json "*) ;; # another folder, or JSON output: nothing more to print
  *) grep '^- ' "$OUT/results.md" || true ;;
esac
