"""Prompts through a packed layer: its rows rebuilt dense, thread by thread, for torch's GEMM.

A call with many tokens (a prompt) is compute-bound, and torch's dense GEMM (oneDNN / MKL,
on the CPU's bf16 dot products where it has them) is the fastest way to do its arithmetic.
So the packed kernels (:mod:`~sdsprune.inference.bitmask`, :mod:`~sdsprune.inference.nm24`)
rebuild the dense rows for that call only and hand them to the GEMM, with two rules:

- the rows are split over the threads and each thread rebuilds *its own* rows into its own
  scratch buffer and multiplies them, single-threaded, into its columns of the output. A
  single rebuild pass feeding torch's threaded GEMM has every core read rows another core
  has just written; on the 2-vCPU machine measured that made bfloat16 prompts 0.86-0.91x
  dense torch's speed in some groups of rounds and 0.94-1.05x in others (the cores'
  placement differs over time), against 0.95-1.12x for the split here in the same rounds
  (``benchmarks/prompt_split.py``, ``benchmarks/results/prompt-split/``);
- each thread rebuilds at most ``tile_rows`` rows at a time (about ``TILE_BYTES``), so no
  weight is ever held expanded; the scratch buffer is kept for the next call (a fresh
  multi-MiB allocation can come from fresh pages, whose faults cost more than the rebuild).

``TILED_SOURCE`` is the C++ both kernels compile in (also ``parallel_with_state``, which
the bitmask kernel's float32 prompt passes use); ``tile_rows`` sizes the tiles.
"""

from __future__ import annotations

import torch

TILE_BYTES = 4 * 2**20  # scratch of one thread's tile
MIN_TILE_ROWS = 256

TILED_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <algorithm>

// One scratch buffer per thread and dtype, grown to the largest tile seen and kept.
static torch::Tensor scratch_for(int64_t elements, const torch::TensorOptions& options) {
  thread_local torch::Tensor buffers[2];
  torch::Tensor& buffer = buffers[options.dtype() == torch::kBFloat16 ? 1 : 0];
  if (!buffer.defined() || buffer.numel() < elements) buffer = torch::empty({elements}, options);
  return buffer;
}

// f(first, last) over [0, count) on torch's threads (one item at least per task), each
// thread with the caller's thread-local state: its inference mode, which the tensors it
// writes (torch ops on worker threads) must see.
template <typename F>
static void parallel_with_state(int64_t count, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
    const at::ThreadLocalStateGuard guard(state);
    f(first, last);
  });
}

// y (T, out) = x (T, in) W^T, W's rows rebuilt by expand(r0, r1, dst) (rows [r0, r1) written
// densely to dst, row length stride >= in, in the dtype of options). The rows are split over
// the threads in whole multiples of row_align; each thread expands its rows tile by tile and
// multiplies them with torch's GEMM (single-threaded inside the parallel region) into its
// columns of y (ldc = out).
template <typename Expand>
static torch::Tensor rows_by_thread_mm(const torch::Tensor& x, int64_t out, int64_t in,
                                       int64_t stride, int64_t tile_rows, int64_t row_align,
                                       const torch::TensorOptions& options, Expand expand) {
  auto xw = x.to(options.dtype()).contiguous();
  auto y = torch::empty({xw.size(0), out}, xw.options());
  const int64_t blocks = out / row_align;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  parallel_with_state(threads, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t begin = blocks * t / threads * row_align;
      const int64_t end = t + 1 == threads ? out : blocks * (t + 1) / threads * row_align;
      auto scratch = scratch_for(std::min(tile_rows, end - begin) * stride, options);
      for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {
        const int64_t r1 = std::min(end, r0 + tile_rows);
        expand(r0, r1, scratch.data_ptr());
        auto tile = scratch.narrow(0, 0, (r1 - r0) * stride).view({r1 - r0, stride}).narrow(1, 0, in);
        auto columns = y.narrow(1, r0, r1 - r0);
        at::mm_out(columns, xw, tile.t());
      }
    }
  });
  return y;
}
"""


def tile_rows(in_features: int, dtype: torch.dtype, align: int = 16) -> int:
    """Rows per tile of one thread's rebuild: about TILE_BYTES of scratch (rows padded to
    ``align`` inputs, as the bitmask layout pads them)."""
    row_bytes = -(-in_features // align) * align * torch.empty((), dtype=dtype).element_size()
    return max(MIN_TILE_ROWS, TILE_BYTES // row_bytes)
