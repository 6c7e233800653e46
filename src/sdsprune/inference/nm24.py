"""A CPU kernel for 2:4 weights (AVX-512, float32), compiled on first use.

torch has no CPU kernel that exploits 2:4 sparsity (its semi-structured kernels are CUDA
only, and CSR needs an index per non-zero). Here each row keeps its 2-of-4 values densely
packed plus a 1-byte in-group position per value: 16 kept values cover 32 inputs, whose
activations are picked from two registers with one ``permutex2var`` (no gathers). That reads
5 bytes per kept value instead of 8 bytes per 2 dense weights, and pays off for a handful of
tokens (decode); for more tokens the row is expanded back to dense and multiplied with MKL.

The extension is built with ``torch.utils.cpp_extension`` (needs a C++ compiler; about 45 s
once, then cached). Anything that prevents it (no compiler, no AVX-512) makes the layer
ineligible with a reason, never an error.
"""

from __future__ import annotations

import functools
import logging
import shutil

import torch
import torch.nn.functional as F
from torch import nn

from sdsprune.export.packing import nm_pattern

log = logging.getLogger(__name__)

MAX_KERNEL_TOKENS = 8  # above this, expanding to dense and using MKL is faster

_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <algorithm>

// y[t, o] = sum_j values[o, j] * x[t, 2 * (j - j % 16) + base[j % 16] + pos[o, j]]
torch::Tensor nm24_mm(torch::Tensor x, torch::Tensor values, torch::Tensor pos) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && values.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && values.is_contiguous() && pos.is_contiguous(), "contiguous");
  const int64_t T = x.size(0), in = x.size(1), out = values.size(0), half = values.size(1);
  TORCH_CHECK(in == 2 * half && in % 4 == 0, "shape mismatch");
  auto y = torch::empty({T, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const uint8_t* pp = pos.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const __m512i base = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float* v = vp + o * half;
      const uint8_t* p = pp + o * half;
      for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const int64_t nt = std::min<int64_t>(4, T - t0);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
        int64_t j = 0;
        for (; j + 16 <= half; j += 16) {
          const __m512i idx = _mm512_add_epi32(
              base, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + j))));
          const __m512 w = _mm512_loadu_ps(v + j);
          for (int64_t k = 0; k < nt; ++k) {
            const float* xt = xp + (t0 + k) * in + 2 * j;
            const __m512 xs =
                _mm512_permutex2var_ps(_mm512_loadu_ps(xt), idx, _mm512_loadu_ps(xt + 16));
            acc[k] = _mm512_fmadd_ps(w, xs, acc[k]);
          }
        }
        for (int64_t k = 0; k < nt; ++k) {
          const float* xt = xp + (t0 + k) * in;
          float s = _mm512_reduce_add_ps(acc[k]);
          for (int64_t r = j; r < half; ++r) s += v[r] * xt[4 * (r / 2) + p[r]];
          yp[(t0 + k) * out + o] = s;
        }
      }
    }
  });
  return y;
}

torch::Tensor nm24_dense(torch::Tensor values, torch::Tensor pos) {
  const int64_t out = values.size(0), half = values.size(1), in = 2 * half;
  auto w = torch::zeros({out, in}, values.options());
  const float* vp = values.data_ptr<float>();
  const uint8_t* pp = pos.data_ptr<uint8_t>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t j = 0; j < half; ++j)
        wp[o * in + 4 * (j / 2) + pp[o * half + j]] = vp[o * half + j];
  });
  return w;
}
"""


@functools.cache
def extension():
    """The compiled kernels, or a string saying why they are unavailable."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"nm24 needs AVX-512 (this CPU: {torch.backends.cpu.get_cpu_capability()})"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "nm24 needs a C++ compiler to build its kernel"
    try:
        from torch.utils.cpp_extension import load_inline

        log.info("building the nm24 CPU kernel (once, about a minute)")
        return load_inline(
            "sdsprune_nm24",
            cpp_sources=_SOURCE,
            functions=["nm24_mm", "nm24_dense"],
            extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # compiler errors come in many types
        return f"nm24 kernel failed to build: {str(exc).splitlines()[0][:200]}"


def nm24_problem(linear: nn.Linear) -> str | None:
    """Why the nm24 kernel cannot serve this layer (None when it can)."""
    weight = linear.weight.detach()
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return "nm24 is a CPU float32 kernel"
    n = nm_pattern(weight, 4)
    if n is None or n > 2:
        return "zeros are not in a 2:4 pattern"
    ext = extension()
    return ext if isinstance(ext, str) else None


def pack_nm24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2) float32, positions (out, in/2) uint8) of a 2:4 weight."""
    rows, cols = weight.shape
    groups = weight.view(rows, cols // 4, 4)
    nonzero = groups != 0
    nz = nonzero.to(torch.int16)
    count = nz.sum(dim=2, keepdim=True)
    # the same slot rule as the export: non-zeros first, then zeros, in position order
    rank = torch.where(nonzero, nz.cumsum(2) - 1, count + (1 - nz).cumsum(2) - 1)
    keep = rank < 2
    values = groups[keep].view(rows, cols // 2).contiguous()
    positions = torch.arange(4, dtype=torch.uint8).expand_as(groups)[keep]
    return values, positions.view(rows, cols // 2).contiguous()


class Nm24Linear(nn.Module):
    """``nn.Linear`` with a 2:4 weight, multiplied by the AVX-512 kernel for few tokens."""

    kernel = "nm24"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        ext = extension()
        if isinstance(ext, str):
            raise RuntimeError(ext)
        self._ext = ext
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = linear.bias
        values, positions = pack_nm24(linear.weight.detach())
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        if x2d.shape[0] <= MAX_KERNEL_TOKENS:
            y = self._ext.nm24_mm(x2d, self.values, self.positions)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2d, self._ext.nm24_dense(self.values, self.positions), self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=nm24"
