"""A dense layer served by a streaming kernel at decode sizes (float32 or bfloat16, CPU).

At one token per call a linear layer is a matrix-vector product: every weight is read once
and used once, so its speed is the rate at which the weights stream from memory. torch's
CPU GEMM at batch 1 streams the default model's weights at about 10 GiB/s (its LM head at
4-9 GiB/s) where a plain AVX-512 loop over the same rows streams 17-29 GiB/s (one to two
threads, AMD EPYC). This module reuses the bitmask kernel's row loop with dense rows: each
row's 16-weight chunks are loaded as they are, up to four tokens share a pass over the
weights, and rows are split over threads like torch's GEMM splits them.

Above ``MAX_GEMV_TOKENS`` tokens per call (a prompt, or decoding more than four sequences)
the weights are used several times per read and torch's GEMM is the faster path, so the
layer calls it. The layer holds the dense layer's own weight (no copy): a tied LM head stays
tied to the embeddings.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from sdsprune.inference.bitmask import CHUNK, extension
from sdsprune.inference.native import NativeLinear, build_problem, dtype_problem

MAX_GEMV_TOKENS = 4  # one pass over the weights serves up to four tokens


def gemv_problem(linear: nn.Linear) -> str | None:
    """Why the streaming kernel cannot serve this layer (None when it can)."""
    if linear.in_features % CHUNK:
        return f"gemv needs inputs in whole chunks of {CHUNK} (this layer: {linear.in_features})"
    return dtype_problem("gemv", linear) or build_problem(extension())


class GemvLinear(NativeLinear):
    """``nn.Linear`` whose decode-sized calls go through the streaming kernel."""

    kernel = "gemv"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, extension())
        self.weight = linear.weight  # the same parameter: no copy, ties kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eager calls the extension directly (the dispatcher op costs microseconds per call);
        # torch.compile traces the registered op
        ops = torch.ops.sdsprune if torch.compiler.is_compiling() else self._ext
        y = ops.dense_linear(x, self.weight, MAX_GEMV_TOKENS)
        return y if self.bias is None else y + self.bias

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=gemv"


def measure_stream_bandwidth(dtype: torch.dtype, mib: int = 256, passes: int = 5) -> float | None:
    """GiB/s at which the streaming kernel reads a ``mib``-MiB weight at one token (the best
    of ``passes``): a bandwidth the machine delivers to a plain loop, against which the bytes
    of each decode step give its floor. None where the kernel cannot build."""
    if dtype not in (torch.float32, torch.bfloat16) or build_problem(extension()) is not None:
        return None
    columns = 1024
    rows = mib * 2**20 // (columns * torch.empty((), dtype=dtype).element_size())
    weight = torch.ones(rows, columns, dtype=dtype)
    x = torch.ones(1, columns, dtype=dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(passes + 1):  # the first pass faults the pages in
            start = time.perf_counter()
            extension().dense_linear(x, weight, MAX_GEMV_TOKENS)
            best = min(best, time.perf_counter() - start)
    return weight.numel() * weight.element_size() / best / 2**30
