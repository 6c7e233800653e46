"""A CPU kernel for 2:4 weights (AVX-512 or AVX2, float32 or bfloat16), compiled on first use.

torch has no CPU kernel that exploits 2:4 sparsity (its semi-structured kernels are CUDA
only, and CSR needs an index per non-zero). Here each row keeps its 2-of-4 values densely
packed plus a 1-byte in-group position per value: 16 kept values cover 32 inputs, whose
activations are picked from two registers with one ``permutex2var`` (no gathers); with AVX2,
8 kept values cover 16 inputs, laid out once per call so that two in-lane ``vpermilps`` and
a blend pick them (a block at 8 tokens: 1.59x dense speed, against 0.95x with two cross-lane
``permutevar8x32`` on the inputs as given; two runs under load). That reads 5 bytes per
kept value (3 in bfloat16) instead of 8 (4) bytes per 2 dense weights, and pays off for a
handful of tokens (decode); for more tokens the rows are rebuilt dense for that call, each
thread its own, and multiplied by torch's GEMM (:mod:`~sdsprune.inference.tiled`).

The extension is built by :mod:`sdsprune.inference.native` (needs a C++ compiler; about 45 s
once, then cached), with the code path of torch's CPU capability. Anything that prevents it
(no compiler, neither AVX-512 nor AVX2) makes the layer ineligible with a reason, never an
error. Its functions are also registered as the ops ``torch.ops.sdsprune.nm24_mm`` and
``nm24_tiled_mm`` (with fake implementations for tracing), so that ``torch.compile`` keeps the
kernel in its graph instead of failing on an unknown extension function.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from sdsprune.export.packing import nm_pattern
from sdsprune.inference.native import NativeLinear, build, build_problem, dtype_problem
from sdsprune.inference.tiled import TILED_SOURCE, tile_rows

MAX_KERNEL_TOKENS = 8  # above this, rows rebuilt dense for torch's GEMM are faster
# Rows per parallel task: at least ROW_GRAIN, and enough rows for MIN_TASK_PRODUCTS kept
# values x tokens (at one token 320 KB of packed float32 weights, ~30 us of one core's
# memory traffic: less is not worth waking a thread for). So a decode token's k/v
# projection of the default model (192 x 288 kept values) runs on one thread, and larger
# calls (its q, MLP, or k/v with 2+ tokens) give every thread of a 2-core CPU work.
ROW_GRAIN = 16
MIN_TASK_PRODUCTS = 65536
_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

// One SIMD chunk holds W kept values of a row, which cover 2 * W inputs. chunk_index turns
// their in-group positions into register lanes; pick gathers the matching activations
// with register permutes (no memory gathers) from the inputs as laid out by pick_layout.
#if defined(__AVX512F__)
constexpr int64_t W = 16;
using vec = __m512;
using ivec = __m512i;
static inline ivec chunk_index(const uint8_t* p) {
  const __m512i base = _mm512_set_epi32(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  return _mm512_add_epi32(base, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline vec pick(const float* x, ivec idx) {
  return _mm512_permutex2var_ps(_mm512_loadu_ps(x), idx, _mm512_loadu_ps(x + 16));
}
static inline vec load_values(const float* v) { return _mm512_loadu_ps(v); }
static inline vec load_values(const uint16_t* v) {  // bfloat16: the high half of a float
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline vec zero() { return _mm512_setzero_ps(); }
static inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline float hsum(vec a) { return _mm512_reduce_add_ps(a); }
static const float* pick_layout(const float* x, std::vector<float>&, int64_t, int64_t) {
  return x;
}
#else
constexpr int64_t W = 8;
using vec = __m256;
using ivec = __m256i;
// The 8 values of a chunk come from 4 groups of 4 inputs, 2 each. pick_layout stores every
// 16 inputs as groups 0, 2, 1, 3, so that one register holds groups 0 | 2 and the next
// 1 | 3 in its 128-bit halves: the in-group positions are then the lane indices of the
// in-lane permute (vpermilps, cheaper than the cross-lane one), and a blend merges them.
static inline ivec chunk_index(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
}
static inline vec pick(const float* x, ivec idx) {
  const __m256 even = _mm256_permutevar_ps(_mm256_loadu_ps(x), idx);     // groups 0 | 2
  const __m256 odd = _mm256_permutevar_ps(_mm256_loadu_ps(x + 8), idx);  // groups 1 | 3
  return _mm256_blend_ps(even, odd, 0xCC);
}
static const float* pick_layout(const float* x, std::vector<float>& buffer, int64_t T,
                                int64_t in) {
  buffer.assign(x, x + T * in);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c + 16 <= in; c += 16) {
      float* chunk = buffer.data() + t * in + c;
      std::memcpy(chunk + 4, x + t * in + c + 8, 4 * sizeof(float));
      std::memcpy(chunk + 8, x + t * in + c + 4, 4 * sizeof(float));
    }
  return buffer.data();
}
static inline vec load_values(const float* v) { return _mm256_loadu_ps(v); }
static inline vec load_values(const uint16_t* v) {  // bfloat16: the high half of a float
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)v));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline vec zero() { return _mm256_setzero_ps(); }
static inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline float hsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

static inline float scalar(float v) { return v; }
static inline float scalar(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[t0 + k, o] for NT tokens of one row (xs: the inputs in pick_layout, x: as given). With
// one or two tokens a single accumulator chain would wait on FMA latency, so U chunks are
// in flight at once.
template <typename V, int NT>
static void row_tokens(const float* xs, const float* x, const V* v, const uint8_t* p, float* y,
                       int64_t in, int64_t out, int64_t half) {
  constexpr int U = NT < 3 ? 2 : 1;
  vec acc[U][NT];
  for (int u = 0; u < U; ++u)
    for (int k = 0; k < NT; ++k) acc[u][k] = zero();
  int64_t j = 0;
  for (; j + U * W <= half; j += U * W) {
    for (int u = 0; u < U; ++u) {
      const ivec idx = chunk_index(p + j + u * W);
      const vec w = load_values(v + j + u * W);
      for (int k = 0; k < NT; ++k)
        acc[u][k] = fmadd(w, pick(xs + k * in + 2 * (j + u * W), idx), acc[u][k]);
    }
  }
  for (; j + W <= half; j += W) {
    const ivec idx = chunk_index(p + j);
    const vec w = load_values(v + j);
    for (int k = 0; k < NT; ++k) acc[0][k] = fmadd(w, pick(xs + k * in + 2 * j, idx), acc[0][k]);
  }
  for (int k = 0; k < NT; ++k) {
    vec total = acc[0][k];
    for (int u = 1; u < U; ++u) total = add(total, acc[u][k]);
    float s = hsum(total);
    for (int64_t r = j; r < half; ++r) s += scalar(v[r]) * x[k * in + 4 * (r / 2) + p[r]];
    y[k * out] = s;
  }
}

// y[t, o] = sum_j values[o, j] * x[t, 4 * (j / 2) + pos[o, j]], rows split over threads;
// each row is used for every token while it is in L1, four tokens at a time.
template <typename V>
static void mm(const float* x, const V* values, const uint8_t* pos, float* y, int64_t T,
               int64_t in, int64_t out, int64_t grain) {
  const int64_t half = in / 2;
  std::vector<float> buffer;
  const float* xs = pick_layout(x, buffer, T, in);
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const V* v = values + o * half;
      const uint8_t* p = pos + o * half;
      for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const float* xst = xs + t0 * in;
        const float* xt = x + t0 * in;
        float* yt = y + t0 * out + o;
        switch (std::min<int64_t>(4, T - t0)) {
          case 1: row_tokens<V, 1>(xst, xt, v, p, yt, in, out, half); break;
          case 2: row_tokens<V, 2>(xst, xt, v, p, yt, in, out, half); break;
          case 3: row_tokens<V, 3>(xst, xt, v, p, yt, in, out, half); break;
          default: row_tokens<V, 4>(xst, xt, v, p, yt, in, out, half);
        }
      }
    }
  });
}

// activations (..., in) times packed values (float32 or bfloat16) -> (..., out) in the
// activations' dtype, computed in float32. Reshaping and casting happen here rather than in
// Python, where each of those calls costs more than a decode-sized product of a small layer.
torch::Tensor nm24_mm(torch::Tensor input, torch::Tensor values, torch::Tensor pos,
                      int64_t grain) {
  TORCH_CHECK(values.is_contiguous() && pos.is_contiguous(), "contiguous weights");
  const int64_t in = input.size(-1), out = values.size(0);
  TORCH_CHECK(in == 2 * values.size(1) && in % 4 == 0, "shape mismatch");
  auto x = input.reshape({-1, in}).to(torch::kFloat32).contiguous();
  const int64_t T = x.size(0);
  auto y = torch::empty({T, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = pos.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (values.dtype() == torch::kBFloat16)
    mm(xp, reinterpret_cast<const uint16_t*>(values.data_ptr()), pp, yp, T, in, out, grain);
  else {
    TORCH_CHECK(values.dtype() == torch::kFloat32, "float32 or bfloat16 values only");
    mm(xp, values.data_ptr<float>(), pp, yp, T, in, out, grain);
  }
  auto shape = input.sizes().vec();
  shape.back() = out;
  return y.view(shape).to(input.scalar_type());
}

// Rows [begin, end) of the 2:4 weight written densely to dst (row length 2 * half).
template <typename V>
static void expand_rows(const V* values, const uint8_t* pos, int64_t half, int64_t begin,
                        int64_t end, V* dst) {
  for (int64_t o = begin; o < end; ++o) {
    const V* v = values + o * half;
    const uint8_t* p = pos + o * half;
    V* row = dst + (o - begin) * 2 * half;
    for (int64_t g = 0; g < half / 2; ++g) {  // one pass: each group of 4 written once
      V group[4] = {0, 0, 0, 0};
      group[p[2 * g]] = v[2 * g];
      group[p[2 * g + 1]] = v[2 * g + 1];
      std::memcpy(row + 4 * g, group, sizeof group);
    }
  }
}

// Many tokens: activations (..., in) times the weight through torch's GEMM, each thread
// rebuilding its own rows (tiled.py says why), in the activations' dtype.
torch::Tensor nm24_tiled_mm(torch::Tensor input, torch::Tensor values, torch::Tensor pos,
                            int64_t tile_rows) {
  const int64_t out = values.size(0), half = values.size(1), in = 2 * half;
  TORCH_CHECK(input.size(-1) == in, "shape mismatch");
  const uint8_t* pp = pos.data_ptr<uint8_t>();
  auto y = rows_by_thread_mm(input.reshape({-1, in}), out, in, in, tile_rows, 1, values.options(),
                             [&](int64_t r0, int64_t r1, void* dst) {
                               if (values.element_size() == 2)
                                 expand_rows(static_cast<const uint16_t*>(values.data_ptr()), pp,
                                             half, r0, r1, static_cast<uint16_t*>(dst));
                               else
                                 expand_rows(values.data_ptr<float>(), pp, half, r0, r1,
                                             static_cast<float*>(dst));
                             });
  auto shape = input.sizes().vec();
  shape.back() = out;
  return y.view(shape).to(input.scalar_type());
}

// The same two functions as dispatcher ops, so that torch.compile can keep them in its graph
// (their fake implementations, for tracing, are registered from Python).
TORCH_LIBRARY(sdsprune, m) {
  m.def("nm24_mm(Tensor input, Tensor values, Tensor pos, int grain) -> Tensor");
  m.def("nm24_tiled_mm(Tensor input, Tensor values, Tensor pos, int tile_rows) -> Tensor");
}
TORCH_LIBRARY_IMPL(sdsprune, CPU, m) {
  m.impl("nm24_mm", &nm24_mm);
  m.impl("nm24_tiled_mm", &nm24_tiled_mm);
}
"""


@functools.cache
def extension():
    """The compiled 2:4 kernels for this CPU, or a string saying why they are unavailable."""
    module = build("nm24", TILED_SOURCE + _SOURCE, ["nm24_mm", "nm24_tiled_mm"])
    if not isinstance(module, str):
        _register_fakes()
    return module


def _register_fakes() -> None:
    """Output shapes and dtypes of the ops, which torch.compile traces with fake tensors.

    Registered once the extension has defined the ops (torch refuses fakes of unknown ops).
    """
    torch.library.register_fake("sdsprune::nm24_mm", _nm24_mm_fake)
    torch.library.register_fake("sdsprune::nm24_tiled_mm", _nm24_tiled_mm_fake)


def _nm24_mm_fake(
    input: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, grain: int
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], values.shape[0]))


def _nm24_tiled_mm_fake(
    input: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, tile_rows: int
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], values.shape[0]))


def nm24_problem(linear: nn.Linear) -> str | None:
    """Why the nm24 kernel cannot serve this layer (None when it can)."""
    problem = dtype_problem("nm24", linear)
    if problem:
        return problem
    n = nm_pattern(linear.weight.detach(), 4)
    if n is None or n > 2:
        return "zeros are not in a 2:4 pattern"
    return build_problem(extension())


def pack_nm24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2) in the weight's dtype, positions (out, in/2) uint8) of a 2:4 weight."""
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


def rows_per_task(kept_per_row: int, tokens: int) -> int:
    """The parallel grain of a call: see ROW_GRAIN and MIN_TASK_PRODUCTS."""
    return max(ROW_GRAIN, -(-MIN_TASK_PRODUCTS // max(kept_per_row * tokens, 1)))


class Nm24Linear(NativeLinear):
    """``nn.Linear`` with a 2:4 weight, multiplied by the CPU kernel for few tokens.

    bfloat16 weights stay bfloat16 when packed (half the bytes of float32, bit-exact); the
    activations are widened to float32 and the products accumulated in float32 (as dense
    bfloat16 matmuls do on CPU), then rounded to bfloat16 once.
    """

    kernel = "nm24"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, extension())
        values, positions = pack_nm24(linear.weight.detach())
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("positions", positions, persistent=False)
        kept = values.shape[1]
        self._grains = [rows_per_task(kept, t) for t in range(MAX_KERNEL_TOKENS + 1)]
        self._tile_rows = tile_rows(self.in_features, values.dtype, align=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # few Python-level tensor calls: at decode each costs a noticeable part of the product.
        # So eager calls the extension directly; the dispatcher op, which torch.compile can
        # trace, costs about 2.5 us more per call (5.5 against 3 us here, x210 layers a step).
        ops = torch.ops.sdsprune if torch.compiler.is_compiling() else self._ext
        tokens = x.numel() // self.in_features
        if tokens <= MAX_KERNEL_TOKENS:
            y = ops.nm24_mm(x, self.values, self.positions, self._grains[tokens])
            return y if self.bias is None else y + self.bias
        return self.dense_forward(x)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product through the dense weight, rebuilt for this call only (many tokens)."""
        ops = torch.ops.sdsprune if torch.compiler.is_compiling() else self._ext
        y = ops.nm24_tiled_mm(x, self.values, self.positions, self._tile_rows)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=nm24"
