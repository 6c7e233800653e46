#!/usr/bin/env bash
# The GPU check, as one command on a fresh GPU machine (under 8 minutes on one GPU):
# set up .venv (scripts/setup.sh; SDSPRUNE_SKIP_SETUP=1 skips it when .venv is ready), then
# prune the default model with SparseGPT and SDS at 2:4 on CUDA in bf16 and compare the
# perplexity with a CPU float32 run, check activation offloading, bench the 2:4
# semi-structured backend, and report peak GPU memory (scripts/gpu_check.py says what passes).
# Results: runs/gpu-check/ (gpu_check.json, bench.json, the pruned checkpoints).
# A short lease: pass --cpu-reference benchmarks/results/gpu-check/cpu-reference.json (the CPU
# float32 reference written beforehand by gpu_check.py --write-cpu-reference) to skip it there.
# On a machine without an NVIDIA GPU it says so and exits 0, before installing anything.
# torch must be a CUDA build: setup.sh installs one from a PyTorch wheel index when
#   SDSPRUNE_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/gpu_check.sh
# (the cuXXX your driver supports; nvidia-smi shows its CUDA version). When nvidia-smi lists a
# GPU but torch cannot use it (a CPU-only build), it fails with one line on stderr saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi finds none): nothing to check."
  echo "gpu_check: run 'bash scripts/gpu_check.sh' on a machine with a CUDA GPU."
  exit 0
fi
nvidia-smi -L
if [ -z "${SDSPRUNE_SKIP_SETUP:-}" ]; then
  bash scripts/setup.sh
fi
if [ -x .venv/bin/python ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
else  # SDSPRUNE_SKIP_SETUP on a machine whose python3 already holds the dependencies
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
status=0
python3 scripts/gpu_check.py "$@" || status=$?
if [ "$status" -eq 3 ]; then  # torch cannot use the GPU: gpu_check.py printed why
  exit "$status"
fi
# the GPU-only unit tests (skipped everywhere else): every method on tiny models, 2:4 kernels
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_inference.py \
  -k "cuda or semi_structured" || status=$?
exit "$status"
