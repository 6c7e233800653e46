"""A CPU kernel for unstructured sparse weights (AVX-512 or AVX2, float32 or bfloat16).

Decoding one token at a time reads every weight once per token, so its speed is set by the
bytes a weight takes, not by the arithmetic. This kernel stores a sparse layer as

- ``masks``: per row, one 16-bit mask per 16 inputs (bit i set: input i is kept);
- ``values``: the kept values of every row, one after another, in the weight's dtype;
- ``offsets``: where each row's values start.

At 50% sparsity a float32 weight then takes 2.125 bytes instead of 4 (70%: 1.325; bfloat16
halves the values). A chunk of 16 weights is rebuilt in registers from its mask and the next
``popcount(mask)`` values: AVX-512's ``vexpandps`` does it in one instruction; the AVX2 path
does each half of 8 with one permute from a 256-entry index table and a lane mask. Rows are
split over threads as torch splits a dense GEMM; each row serves up to four tokens while it
is in L1.

For calls with more tokens than ``MAX_KERNEL_TOKENS`` (a prompt), a float32 layer with at
most 60% of its weights kept is multiplied from the packed form too (``sparse_mm``): per kept
weight, one broadcast and one multiply-add per 16 tokens against the activations transposed,
so a prompt's work shrinks with the weights pruned (``benchmarks/prompt_paths.py`` times it
against torch's GEMM on the default model's layers). Other layers (bfloat16, whose dense GEMM
runs on the CPU's bf16 dot products; denser ones) are rebuilt dense for the call, each
thread its own rows, tile by tile, for torch's dense GEMM (``tiled_mm``, see
:mod:`~sdsprune.inference.tiled`; bfloat16 rows are spread two chunks per ``vpexpandw`` on
CPUs with AVX512-VBMI2): either way the layer holds only its packed form. Tiles are about
``TILE_BYTES`` and at least ``MIN_TILE_ROWS`` rows: on the default model's layers (50%, 128
tokens, 2 threads, one rebuild pass for all threads) 64 KiB tiles ran at 0.63x dense's speed,
256 KiB at 0.90x, 1 MiB at 0.99x and 4 MiB (a whole layer there) at 1.14x, as the GEMM on
each tile needs enough rows to run at full speed.

The kernel is registered as the op ``torch.ops.sdsprune.bitmask_linear`` (with a fake for
tracing), so ``torch.compile`` keeps it in a compiled decode step.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from sdsprune.inference.native import NativeLinear, build, build_problem, dtype_problem
from sdsprune.inference.step_source import STEP_SOURCE
from sdsprune.inference.tiled import TILED_SOURCE, tile_rows

CHUNK = 16  # inputs per mask
# A float32 prompt of at least SPARSE_MM_MIN_TOKENS tokens through a layer with at most
# SPARSE_MM_MAX_KEPT of its weights kept is multiplied from the packed form (sparse_mm); other
# prompts go through tiled_mm. In benchmarks/results/prompt-paths-split.json (one run of
# benchmarks/prompt_paths.py, 2 threads), below 32 tokens sparse_mm ran 0.85-0.99x dense's
# speed at 50% and 2:4 where tiled_mm ran 0.98-1.19x (at 60-70% the two were within a few
# percent); from 64 tokens sparse_mm led at 60-70% (128 tokens: 1.23-1.34x against 1.09-1.10x).
SPARSE_MM_MAX_KEPT = 0.6
SPARSE_MM_MIN_TOKENS = 32
MAX_KERNEL_TOKENS = 8  # above this, tile expansion + dense GEMM (the kernel re-reads per 4)
# values are read a full vector at a time and then spread (the bfloat16 dot-product path
# reads 32), so the flat value array carries this many zeros past its end
PADDING = 2 * CHUNK

_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

constexpr int64_t CHUNK = 16;

static inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#if defined(__AVX512F__)
// One register holds a chunk of 16 weights.
struct vec { __m512 r; };
static inline vec zero() { return {_mm512_setzero_ps()}; }
static inline vec load_x(const float* x) { return {_mm512_loadu_ps(x)}; }
static inline vec fmadd(vec a, vec b, vec c) { return {_mm512_fmadd_ps(a.r, b.r, c.r)}; }
static inline vec add(vec a, vec b) { return {_mm512_add_ps(a.r, b.r)}; }
static inline vec broadcast(float w) { return {_mm512_set1_ps(w)}; }
constexpr int SPMM_VECS = 8;  // accumulators of 16 tokens each (of 32 registers)
static inline float hsum(vec a) { return _mm512_reduce_add_ps(a.r); }
// The chunk's weights: the next popcount(m) values spread to the set bits, zeros elsewhere.
// (a full load, then the register form: the memory form of vexpandps is microcoded on AMD
// Zen 4, about 20x slower)
static inline vec expand(const float* v, uint32_t m) {
  return {_mm512_maskz_expand_ps((__mmask16)m, _mm512_loadu_ps(v))};
}
static inline vec expand(const uint16_t* v, uint32_t m) {  // bfloat16: the high half of a float
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)v));
  return {_mm512_maskz_expand_ps((__mmask16)m, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)))};
}
// 16 weights of a dense row
static inline vec load_w(const float* v) { return {_mm512_loadu_ps(v)}; }
static inline vec load_w(const uint16_t* v) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)v));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
}
static inline void store(float* dst, vec w) { _mm512_storeu_ps(dst, w.r); }
static inline void store(uint16_t* dst, vec w) {  // exact: w holds bfloat16 values
  const __m512i high = _mm512_srli_epi32(_mm512_castps_si512(w.r), 16);
  _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi32_epi16(high));
}
#else
// AVX2: a chunk of 16 weights is two registers of 8.
struct vec { __m256 lo, hi; };
static inline vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline vec load_x(const float* x) { return {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)}; }
static inline vec fmadd(vec a, vec b, vec c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline vec add(vec a, vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline vec broadcast(float w) { return {_mm256_set1_ps(w), _mm256_set1_ps(w)}; }
constexpr int SPMM_VECS = 4;  // accumulators of 16 tokens each (two of 16 registers each)
static inline float hsum(vec a) {
  const __m256 s8 = _mm256_add_ps(a.lo, a.hi);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
// SPREAD[b][i]: for mask byte b, which of the 8 loaded values lane i takes (the number of
// set bits below i); lanes whose bit is clear are zeroed by the lane mask.
struct SpreadTable {
  alignas(32) int32_t index[256][8];
  SpreadTable() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int i = 0; i < 8; ++i) index[b][i] = ((b >> i) & 1) ? k++ : 0;
    }
  }
};
static const SpreadTable SPREAD;
static inline __m256 spread8(__m256 loaded, uint32_t b) {
  const __m256i idx = _mm256_load_si256((const __m256i*)SPREAD.index[b]);
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i lanes = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(b), bits), bits);
  return _mm256_and_ps(_mm256_permutevar8x32_ps(loaded, idx), _mm256_castsi256_ps(lanes));
}
static inline __m256 load8(const float* v) { return _mm256_loadu_ps(v); }
static inline __m256 load8(const uint16_t* v) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)v));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
template <typename V>
static inline vec load_w(const V* v) { return {load8(v), load8(v + 8)}; }
template <typename V>
static inline vec expand(const V* v, uint32_t m) {
  const uint32_t low = m & 0xFF;
  return {spread8(load8(v), low), spread8(load8(v + _mm_popcnt_u32(low)), m >> 8)};
}
static inline void store(float* dst, vec w) {
  _mm256_storeu_ps(dst, w.lo);
  _mm256_storeu_ps(dst + 8, w.hi);
}
static inline void store(uint16_t* dst, vec w) {  // exact: w holds bfloat16 values
  const __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(w.lo), 16);
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(w.hi), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
  _mm256_storeu_si256((__m256i*)dst, packed);
}
#endif

// How one row's chunks of 16 weights are read, in order: from the packed form (the mask,
// then the next popcount(mask) values) or from a dense row (16 values each).
template <typename V>
struct PackedRow {
  const V* v;
  const uint16_t* m;
  inline vec next(int64_t c) {
    const uint32_t bits = m[c];
    const vec w = expand(v, bits);
    v += _mm_popcnt_u32(bits);
    return w;
  }
  // Chunks c .. c + U - 1 (U <= 4) at once: each chunk's values start at the popcount of the
  // masks before it in one 64-bit read, so the chunks do not wait on each other (one by one,
  // every chunk's load waits on the previous popcount and address add: ~3 cycles a chunk on
  // AMD Zen 4, the loop's limit once few weights are kept).
  template <int U>
  inline void group(int64_t c, vec* w) {
    uint64_t word = 0;
    std::memcpy(&word, m + c, U * sizeof(uint16_t));
    for (int u = 0; u < U; ++u) {
      const uint64_t before = u == 0 ? 0 : _mm_popcnt_u64(word & ((uint64_t(1) << (16 * u)) - 1));
      w[u] = expand(v + before, uint32_t(word >> (16 * u)) & 0xFFFF);
    }
    v += _mm_popcnt_u64(word);
  }
};
template <typename V>
struct DenseRow {
  const V* v;
  inline vec next(int64_t c) { return load_w(v + CHUNK * c); }
  template <int U>
  inline void group(int64_t c, vec* w) {
    for (int u = 0; u < U; ++u) w[u] = load_w(v + CHUNK * (c + u));
  }
};

// y[k * ystride] = row . x[k * xstride ...] for NT tokens. With few tokens a single
// accumulator chain would wait on FMA latency, so U chunks are in flight at once (four at
// one token: a dense row's loop ran 2x faster than with two, in cache, one thread).
template <typename Row, int NT>
static void row_tokens(const float* x, int64_t xstride, Row row, int64_t chunks, float* y,
                       int64_t ystride) {
  constexpr int U = NT == 1 ? 4 : (NT == 2 ? 2 : 1);
  vec acc[U][NT];
  for (int u = 0; u < U; ++u)
    for (int k = 0; k < NT; ++k) acc[u][k] = zero();
  int64_t c = 0;
  for (; c + U <= chunks; c += U) {
    vec w[U];
    row.template group<U>(c, w);
    for (int u = 0; u < U; ++u)
      for (int k = 0; k < NT; ++k)
        acc[u][k] = fmadd(w[u], load_x(x + k * xstride + CHUNK * (c + u)), acc[u][k]);
  }
  for (; c < chunks; ++c) {
    const vec w = row.next(c);
    for (int k = 0; k < NT; ++k) acc[0][k] = fmadd(w, load_x(x + k * xstride + CHUNK * c), acc[0][k]);
  }
  for (int k = 0; k < NT; ++k) {
    vec total = acc[0][k];
    for (int u = 1; u < U; ++u) total = add(total, acc[u][k]);
    y[k * ystride] = hsum(total);
  }
}

// Rows per parallel task: enough weights x tokens (>= 65536, ~30 us of one core's memory
// traffic at one token) to be worth waking a thread for, and at least 16 rows.
static int64_t grain(int64_t weights, int64_t rows, int64_t tokens) {
  const int64_t per_row = std::max<int64_t>(1, weights / std::max<int64_t>(rows, 1) * tokens);
  return std::max<int64_t>(16, (65536 + per_row - 1) / per_row);
}

// Rows [begin, end) of y (T, out) = x (T, stride) times the rows' transpose, on this thread.
template <typename RowAt>
static void rows_range(const float* x, int64_t T, int64_t stride, int64_t out, RowAt row_at,
                       int64_t begin, int64_t end, float* y) {
  const int64_t chunks = stride / CHUNK;
  for (int64_t o = begin; o < end; ++o) {
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
      const float* xt = x + t0 * stride;
      float* yt = y + t0 * out + o;
      switch (std::min<int64_t>(4, T - t0)) {
        case 1: row_tokens<decltype(row_at(o)), 1>(xt, stride, row_at(o), chunks, yt, out); break;
        case 2: row_tokens<decltype(row_at(o)), 2>(xt, stride, row_at(o), chunks, yt, out); break;
        case 3: row_tokens<decltype(row_at(o)), 3>(xt, stride, row_at(o), chunks, yt, out); break;
        default: row_tokens<decltype(row_at(o)), 4>(xt, stride, row_at(o), chunks, yt, out);
      }
    }
  }
}

// y (T, out) = x (T, stride; zero-padded to whole chunks) times the rows' transpose, row o
// read by row_at(o); weights: how many the rows hold in all (sets the parallel grain).
template <typename RowAt>
static void rows_mm(const float* x, int64_t T, int64_t stride, int64_t out, int64_t weights,
                    RowAt row_at, float* y) {
  at::parallel_for(0, out, grain(weights, out, T), [&](int64_t begin, int64_t end) {
    rows_range(x, T, stride, out, row_at, begin, end, y);
  });
}

#if defined(__AVX512F__)
// One token, bfloat16 values, on CPUs with AVX512-BF16 and AVX512-VBMI2 (checked at run
// time; the rest of the file needs neither): 32 weights at a time (two chunks' masks) are
// spread as 16-bit lanes by one vpexpandw and multiplied in pairs by vdpbf16ps against the
// activations rounded to bfloat16 once per call (a bfloat16 model's activations already
// are; float32 activations take the general path), with float32 accumulation: half the
// spreads of the float32 path and no widening (1.8x faster in cache, one thread, AMD EPYC).
#define BF16DP __attribute__((target("avx512f,avx512bw,avx512bf16,avx512vbmi2")))
// acc + the 32 weights of chunks c and c + 1 (their masks in bits, values from v) . x
BF16DP static inline __m512 dp_pair(__m512 acc, const uint16_t* xb, const uint16_t* v,
                                    uint32_t bits, int64_t c) {
  const __m512i w = _mm512_maskz_expand_epi16(bits, _mm512_loadu_si512(v));
  return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(xb + c * CHUNK));
}

BF16DP static void bf16dp_range(const uint16_t* xb, int64_t chunks, const uint16_t* values,
                                const int64_t* offsets, const uint16_t* masks, int64_t begin,
                                int64_t end, float* y) {
  for (int64_t o = begin; o < end; ++o) {
    const uint16_t* v = values + offsets[o];
    const uint16_t* m = masks + o * chunks;
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();  // two chains in flight
    int64_t c = 0;
    for (; c + 4 <= chunks; c += 4) {  // two pairs from one read of their masks (see group)
      uint64_t word;
      std::memcpy(&word, m + c, sizeof word);
      even = dp_pair(even, xb, v, uint32_t(word), c);
      odd = dp_pair(odd, xb, v + _mm_popcnt_u32(uint32_t(word)), uint32_t(word >> 32), c + 2);
      v += _mm_popcnt_u64(word);
    }
    for (; c < chunks; c += 2) {  // xb is padded to whole pairs of chunks
      const uint32_t bits = c + 1 < chunks ? m[c] | (uint32_t(m[c + 1]) << 16) : m[c];
      even = dp_pair(even, xb, v, bits, c);
      v += _mm_popcnt_u32(bits);
    }
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
  }
}

// (a lambda does not take the target attribute, so the loop body is a function of its own)
static void bf16dp_rows(const uint16_t* xb, int64_t chunks, const uint16_t* values,
                        const int64_t* offsets, const uint16_t* masks, int64_t out, float* y) {
  at::parallel_for(0, out, grain(out * chunks * CHUNK, out, 1), [&](int64_t begin, int64_t end) {
    bf16dp_range(xb, chunks, values, offsets, masks, begin, end, y);
  });
}

// x (stride floats, whole chunks) rounded to bfloat16 into xb
BF16DP static void to_bf16(const float* x, int64_t stride, uint16_t* xb) {
  for (int64_t i = 0; i < stride; i += CHUNK) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    _mm256_storeu_si256((__m256i*)(xb + i), (__m256i)h);
  }
}

// x (stride floats) rounded to bfloat16, zero-padded to a whole pair of chunks
static std::vector<uint16_t> to_bf16_pairs(const float* x, int64_t stride) {
  std::vector<uint16_t> xb((stride + 2 * CHUNK - 1) / (2 * CHUNK) * 2 * CHUNK, 0);
  to_bf16(x, stride, xb.data());
  return xb;
}

static bool has_bf16dp() {
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2");
  return yes;
}
#else
static bool has_bf16dp() { return false; }
#endif

template <typename V>
static void kernel_mm(const float* x, int64_t T, int64_t stride, const V* values,
                      const int64_t* offsets, const uint16_t* masks, int64_t out, float* y) {
  const int64_t chunks = stride / CHUNK;
  // work per row is per chunk, kept or not: the grain counts the dense-equivalent weights
  rows_mm(x, T, stride, out, out * stride, [&](int64_t o) {
    return PackedRow<V>{values + offsets[o], masks + o * chunks};
  }, y);
}

template <typename V>
static void dense_mm(const float* x, int64_t T, int64_t in, const V* weight, int64_t out, float* y) {
  rows_mm(x, T, in, out, out * in, [&](int64_t o) { return DenseRow<V>{weight + o * in}; }, y);
}

// Rows [begin, end) written densely (row length stride, zero-padded) to dst, row begin first.
template <typename V>
static void expand_rows(const V* values, const int64_t* offsets, const uint16_t* masks,
                        int64_t chunks, int64_t begin, int64_t end, V* dst) {
  for (int64_t o = begin; o < end; ++o) {
    const V* v = values + offsets[o];
    const uint16_t* m = masks + o * chunks;
    V* row = dst + (o - begin) * chunks * CHUNK;
    for (int64_t c = 0; c < chunks; ++c) {
      const uint32_t bits = m[c];
      store(row + c * CHUNK, expand(v, bits));
      v += _mm_popcnt_u32(bits);
    }
  }
}

#if defined(__AVX512F__)
// The same for bfloat16 values, two chunks a vpexpandw (as dp_pair spreads them): half the
// instructions of the widening expand.
BF16DP static void expand_pairs(const uint16_t* values, const int64_t* offsets,
                                const uint16_t* masks, int64_t chunks, int64_t begin, int64_t end,
                                uint16_t* dst) {
  for (int64_t o = begin; o < end; ++o) {
    const uint16_t* v = values + offsets[o];
    const uint16_t* m = masks + o * chunks;
    uint16_t* row = dst + (o - begin) * chunks * CHUNK;
    int64_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
      const uint32_t bits = m[c] | (uint32_t(m[c + 1]) << 16);
      _mm512_storeu_si512(row + c * CHUNK, _mm512_maskz_expand_epi16(bits, _mm512_loadu_si512(v)));
      v += _mm_popcnt_u32(bits);
    }
    if (c < chunks)  // an odd last chunk: its 16 lanes (the values are padded as for dp_pair)
      _mm256_storeu_si256((__m256i*)(row + c * CHUNK),
                          _mm512_castsi512_si256(_mm512_maskz_expand_epi16(m[c], _mm512_loadu_si512(v))));
  }
}
#endif

template <typename V>
static V* ptr(torch::Tensor& t) { return reinterpret_cast<V*>(t.data_ptr()); }

// Rows [begin, end) of the packed weight written densely to dst, in its dtype:
// bfloat16 by expand_pairs where the CPU has vpexpandw.
static void expand_range(torch::Tensor& values, const int64_t* offsets, const uint16_t* masks,
                         int64_t chunks, int64_t begin, int64_t end, void* dst) {
  if (values.scalar_type() == torch::kFloat32) {
    expand_rows(ptr<float>(values), offsets, masks, chunks, begin, end, static_cast<float*>(dst));
    return;
  }
  uint16_t* rows = static_cast<uint16_t*>(dst);
#if defined(__AVX512F__)
  if (has_bf16dp()) {
    expand_pairs(ptr<uint16_t>(values), offsets, masks, chunks, begin, end, rows);
    return;
  }
#endif
  expand_rows(ptr<uint16_t>(values), offsets, masks, chunks, begin, end, rows);
}

// Many tokens: y (T, out) = x W^T through torch's GEMM, each thread rebuilding its own rows
// (tiled.py says why).
torch::Tensor tiled_mm(const torch::Tensor& x, torch::Tensor values, torch::Tensor offsets,
                       torch::Tensor masks, int64_t in, int64_t tile_rows) {
  const int64_t out = masks.size(0), chunks = masks.size(1);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const uint16_t* m = reinterpret_cast<const uint16_t*>(masks.data_ptr());
  return rows_by_thread_mm(x, out, in, chunks * CHUNK, tile_rows, CHUNK, values.options(),
                           [&](int64_t r0, int64_t r1, void* dst) {
                             expand_range(values, off, m, chunks, r0, r1, dst);
                           });
}

// Many tokens straight from the packed form (float32 values), so a prompt's work shrinks
// with the weights kept: per kept weight w = W[o][k], y[t][o] += w * x[t][k] for a block of
// tokens at once, with x transposed (xt: row k holds x[.][k] for every token) so each kept
// weight is one broadcast and one multiply-add per 16 tokens. Inputs are taken SPMM_CHUNKS
// chunks at a time (their block of xt stays in L1) and each row's kept positions in the
// block are listed once, then used for every token block.
constexpr int64_t SPMM_CHUNKS = 4;

// The column offsets (k * ldx) of the set bits of masks m[0 .. chunks) of one row, the
// first chunk being input k0; returns how many.
struct SetBits {
  alignas(32) int32_t position[256][8];
  SetBits() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int i = 0; i < 8; ++i) position[b][i] = 0;
      for (int i = 0; i < 8; ++i)
        if ((b >> i) & 1) position[b][k++] = i;
    }
  }
};
static const SetBits SET_BITS;
static int64_t kept_columns(const uint16_t* m, int64_t chunks, int64_t k0, int64_t ldx, int32_t* idx) {
  int64_t n = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int half = 0; half < 2; ++half) {
      const uint32_t bits = (uint32_t(m[c]) >> (8 * half)) & 0xFF;
      const __m256i at = _mm256_add_epi32(_mm256_load_si256((const __m256i*)SET_BITS.position[bits]),
                                          _mm256_set1_epi32(int32_t(k0 + c * CHUNK + 8 * half)));
      _mm256_storeu_si256((__m256i*)(idx + n), _mm256_mullo_epi32(at, _mm256_set1_epi32(int32_t(ldx))));
      n += _mm_popcnt_u32(bits);
    }
  }
  return n;
}

// yt[16 * NV tokens] (+)= sum over the n kept weights v[i] of v[i] * xt[idx[i] + tokens]
template <int NV>
static inline void kept_columns_mm(const float* xt, const int32_t* idx, const float* v, int64_t n,
                                   float* yt, bool first) {
  vec acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = first ? zero() : load_x(yt + CHUNK * j);
  for (int64_t i = 0; i < n; ++i) {
    const vec w = broadcast(v[i]);
    const float* x = xt + idx[i];
    for (int j = 0; j < NV; ++j) acc[j] = fmadd(w, load_x(x + CHUNK * j), acc[j]);
  }
  for (int j = 0; j < NV; ++j) store(yt + CHUNK * j, acc[j]);
}

// yt[tokens] (+)= the rows' products for `tokens` tokens (a multiple of 16) starting at the
// xt and yt given, in register blocks of SPMM_VECS, 4, 2 and 1 vectors.
static void kept_columns_tokens(const float* xt, const int32_t* idx, const float* v, int64_t n,
                                float* yt, int64_t tokens, bool first) {
  int64_t t = 0;
  for (; t + SPMM_VECS * CHUNK <= tokens; t += SPMM_VECS * CHUNK)
    kept_columns_mm<SPMM_VECS>(xt + t, idx, v, n, yt + t, first);
  if (SPMM_VECS > 4 && t + 4 * CHUNK <= tokens) {
    kept_columns_mm<4>(xt + t, idx, v, n, yt + t, first);
    t += 4 * CHUNK;
  }
  if (t + 2 * CHUNK <= tokens) {
    kept_columns_mm<2>(xt + t, idx, v, n, yt + t, first);
    t += 2 * CHUNK;
  }
  if (t < tokens) kept_columns_mm<1>(xt + t, idx, v, n, yt + t, first);
}

// The values of a row a few rows ahead are prefetched: one block's run of them (up to 256
// bytes) starts a whole row's values away from the last, a stride the hardware's
// prefetchers miss when the runs are line-aligned (every block of a 2:4 row holds 32).
constexpr int64_t SPMM_PREFETCH_ROWS = 4;
constexpr int64_t SPMM_PREFETCH_LINES = 5;

// Rows [begin, end) of one pass of yt (out, width) from its block of xt (inputs, width).
static void spmm_rows(const float* xt, int64_t width, const float* values, const int64_t* offsets,
                      const uint16_t* masks, int64_t chunks, int64_t begin, int64_t end, float* yt) {
  std::vector<int32_t> idx(SPMM_CHUNKS * CHUNK + 8);  // the table stores 8 at a time
  std::vector<int64_t> next(offsets + begin, offsets + end);  // each row's next kept value
  for (int64_t c0 = 0; c0 < chunks; c0 += SPMM_CHUNKS) {
    const int64_t c1 = std::min(chunks, c0 + SPMM_CHUNKS);
    for (int64_t o = begin; o < end; ++o) {
      if (o + SPMM_PREFETCH_ROWS < end) {
        const char* ahead = reinterpret_cast<const char*>(values + next[o + SPMM_PREFETCH_ROWS - begin]);
        for (int64_t line = 0; line < SPMM_PREFETCH_LINES; ++line)
          _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
      }
      const int64_t n = kept_columns(masks + o * chunks + c0, c1 - c0, c0 * CHUNK, width, idx.data());
      kept_columns_tokens(xt, idx.data(), values + next[o - begin], n, yt + o * width, width, c0 == 0);
      next[o - begin] += n;
    }
  }
}

// Tokens [t0, t0 + tokens) of y (T, out) = x W^T from the packed form (float32 values): x's
// block transposed into its own contiguous xt (one strided xt would put the rows in few
// cache sets), rows [0, out) multiplied into yt (split over the threads if split_rows), yt
// transposed back into y.
static void spmm_pass(const torch::Tensor& x, int64_t t0, int64_t tokens, const float* V,
                      const int64_t* off, const uint16_t* m, int64_t chunks, int64_t in,
                      int64_t out, bool split_rows, torch::Tensor& y) {
  const int64_t width = (tokens + CHUNK - 1) / CHUNK * CHUNK;
  // only the padding (inputs past in, tokens past this pass) zeroed
  auto xt = torch::empty({chunks * CHUNK, width}, x.options());
  xt.narrow(0, 0, in).narrow(1, 0, tokens).copy_(x.narrow(0, t0, tokens).t());
  xt.narrow(0, in, chunks * CHUNK - in).zero_();
  xt.narrow(1, tokens, width - tokens).zero_();
  auto yt = torch::empty({out, width}, x.options());
  const float* X = xt.data_ptr<float>();
  float* Y = yt.data_ptr<float>();
  if (split_rows)
    at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
      spmm_rows(X, width, V, off, m, chunks, begin, end, Y);
    });
  else
    spmm_rows(X, width, V, off, m, chunks, 0, out, Y);
  y.narrow(0, t0, tokens).copy_(yt.narrow(1, 0, tokens).t());
}

// Many tokens, float32 values: y (T, out) = x W^T from the packed form (see above), in
// passes of up to SPMM_PASS tokens. One pass splits its rows over the threads; several are
// split over the threads whole (their count a multiple of the thread count), each thread
// transposing, multiplying and writing back its own passes: row-split passes have every
// core read the xt another core wrote and write the yt another core reads: 8 prompts of 128
// tokens at once ran 0.83-0.98x dense's speed that way at 50%, 1.13-1.20x split by passes
// (benchmarks/results/prompt-split/README.md).
// Each output is summed over the same kept weights in the same order either way, so the
// bits do not depend on the split.
constexpr int64_t SPMM_PASS = 128;  // a pass's xt block of SPMM_CHUNKS x 16 inputs: 32 KiB
torch::Tensor sparse_mm(const torch::Tensor& x, const torch::Tensor& values,
                        const torch::Tensor& offsets, const torch::Tensor& masks, int64_t in) {
  const int64_t T = x.size(0), out = masks.size(0), chunks = masks.size(1);
  auto y = torch::empty({T, out}, x.options());
  const float* V = values.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const uint16_t* m = reinterpret_cast<const uint16_t*>(masks.data_ptr());
  const int64_t threads = at::get_num_threads();
  if (T <= SPMM_PASS || threads == 1) {
    for (int64_t t0 = 0; t0 < T; t0 += SPMM_PASS)
      spmm_pass(x, t0, std::min(SPMM_PASS, T - t0), V, off, m, chunks, in, out, true, y);
    return y;
  }
  const int64_t passes = ((T + SPMM_PASS - 1) / SPMM_PASS + threads - 1) / threads * threads;
  const int64_t per_pass = (T + passes - 1) / passes;
  parallel_with_state(passes, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const int64_t t0 = p * per_pass;
      if (t0 < T) spmm_pass(x, t0, std::min(per_pass, T - t0), V, off, m, chunks, in, out, false, y);
    }
  });
  return y;
}

// sparse_mm serves a float32 prompt of at least this many tokens with at most this share of
// weights kept; other prompts, tiled_mm (the Python constants of the same names say why)
constexpr double SPARSE_MM_MAX_KEPT = @SPARSE_MM_MAX_KEPT@;
constexpr int64_t SPARSE_MM_MIN_TOKENS = @SPARSE_MM_MIN_TOKENS@;

// activations (..., in) times the packed weight -> (..., out) in the activations' dtype. Up to
// max_kernel_tokens tokens: the kernel (float32 accumulation); more: sparse_mm (float32
// values, sparse enough) or tiled_mm.
torch::Tensor bitmask_linear(torch::Tensor input, torch::Tensor values, torch::Tensor offsets,
                             torch::Tensor masks, int64_t in, int64_t max_kernel_tokens,
                             int64_t tile_rows) {
  TORCH_CHECK(values.is_contiguous() && offsets.is_contiguous() && masks.is_contiguous(),
              "contiguous packed weight");
  TORCH_CHECK(input.size(-1) == in && masks.size(1) * CHUNK >= in, "shape mismatch");
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 || values.scalar_type() == torch::kBFloat16,
              "float32 or bfloat16 values only");
  const int64_t out = masks.size(0), stride = masks.size(1) * CHUNK;
  auto x2d = input.reshape({-1, in});
  const int64_t T = x2d.size(0);
  auto shape = input.sizes().vec();
  shape.back() = out;
  if (T > max_kernel_tokens) {
    const double kept = double(offsets.data_ptr<int64_t>()[out]) / double(std::max<int64_t>(1, out * in));
    auto y = values.scalar_type() == torch::kFloat32 && kept <= SPARSE_MM_MAX_KEPT &&
                     T >= SPARSE_MM_MIN_TOKENS
                 ? sparse_mm(x2d.to(torch::kFloat32).contiguous(), values, offsets, masks, in)
                 : tiled_mm(x2d.contiguous(), values, offsets, masks, in, tile_rows);
    return y.view(shape).to(input.scalar_type());
  }
  auto x = x2d.to(torch::kFloat32).contiguous();
  if (stride != in) x = torch::constant_pad_nd(x, {0, stride - in});
  auto y = torch::empty({T, out}, x.options());
  const uint16_t* m = reinterpret_cast<const uint16_t*>(masks.data_ptr());
  const int64_t* off = offsets.data_ptr<int64_t>();
#if defined(__AVX512F__)
  if (values.scalar_type() == torch::kBFloat16 && input.scalar_type() == torch::kBFloat16 &&
      T == 1 && has_bf16dp()) {
    const auto xb = to_bf16_pairs(x.data_ptr<float>(), stride);
    bf16dp_rows(xb.data(), masks.size(1), ptr<uint16_t>(values), off, m, out, y.data_ptr<float>());
    return y.view(shape).to(input.scalar_type());
  }
#endif
  if (values.scalar_type() == torch::kBFloat16)
    kernel_mm(x.data_ptr<float>(), T, stride, ptr<uint16_t>(values), off, m, out, y.data_ptr<float>());
  else
    kernel_mm(x.data_ptr<float>(), T, stride, ptr<float>(values), off, m, out, y.data_ptr<float>());
  return y.view(shape).to(input.scalar_type());
}

// activations (..., in) times a dense (out, in) weight: the kernel up to max_kernel_tokens
// tokens (float32 accumulation), torch's GEMM above (and for rows not whole chunks).
torch::Tensor dense_linear(torch::Tensor input, torch::Tensor weight, int64_t max_kernel_tokens) {
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2, "contiguous 2-d weight");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 || weight.scalar_type() == torch::kBFloat16,
              "float32 or bfloat16 weights only");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(input.size(-1) == in, "shape mismatch");
  auto x2d = input.reshape({-1, in});
  const int64_t T = x2d.size(0);
  if (T > max_kernel_tokens || in % CHUNK != 0)
    return at::linear(input.to(weight.scalar_type()), weight).to(input.scalar_type());
  auto x = x2d.to(torch::kFloat32).contiguous();
  auto y = torch::empty({T, out}, x.options());
  if (weight.scalar_type() == torch::kBFloat16)
    dense_mm(x.data_ptr<float>(), T, in, ptr<uint16_t>(weight), out, y.data_ptr<float>());
  else
    dense_mm(x.data_ptr<float>(), T, in, ptr<float>(weight), out, y.data_ptr<float>());
  auto shape = input.sizes().vec();
  shape.back() = out;
  return y.view(shape).to(input.scalar_type());
}

TORCH_LIBRARY_FRAGMENT(sdsprune, m) {
  m.def("bitmask_linear(Tensor input, Tensor values, Tensor offsets, Tensor masks, int in_features, "
        "int max_kernel_tokens, int tile_rows) -> Tensor");
  m.def("dense_linear(Tensor input, Tensor weight, int max_kernel_tokens) -> Tensor");
}
TORCH_LIBRARY_IMPL(sdsprune, CPU, m) {
  m.impl("bitmask_linear", &bitmask_linear);
  m.impl("dense_linear", &dense_linear);
}
"""


def kernel_source() -> str:
    """The kernel's C++ with the path-choice constants of this module filled in."""
    return _SOURCE.replace("@SPARSE_MM_MAX_KEPT@", repr(SPARSE_MM_MAX_KEPT)).replace(
        "@SPARSE_MM_MIN_TOKENS@", str(SPARSE_MM_MIN_TOKENS)
    )


@functools.cache
def extension():
    """The compiled kernel for this CPU, or a string saying why it is unavailable."""
    module = build(
        "bitmask",
        TILED_SOURCE + kernel_source() + STEP_SOURCE,
        ["bitmask_linear", "dense_linear", "sparse_mm", "tiled_mm"],
    )
    if not isinstance(module, str):
        torch.library.register_fake("sdsprune::bitmask_linear", _bitmask_linear_fake)
        torch.library.register_fake("sdsprune::dense_linear", _dense_linear_fake)
    return module


def _bitmask_linear_fake(
    input: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    masks: torch.Tensor,
    in_features: int,
    max_kernel_tokens: int,
    tile_rows: int,
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], masks.shape[0]))


def _dense_linear_fake(
    input: torch.Tensor, weight: torch.Tensor, max_kernel_tokens: int
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def bitmask_problem(linear: nn.Linear) -> str | None:
    """Why the bitmask kernel cannot serve this layer (None when it can)."""
    return dtype_problem("bitmask", linear) or build_problem(extension())


def pack_bitmask(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, offsets, masks) of a weight: see the module docstring.

    ``values`` (kept values row by row, then ``PADDING`` zeros) keeps the weight's dtype;
    ``offsets`` (int64, rows + 1); ``masks`` (int16 bit patterns, rows x chunks).
    """
    rows, cols = weight.shape
    chunks = -(-cols // CHUNK)
    padded = torch.zeros(rows, chunks * CHUNK, dtype=weight.dtype)
    padded[:, :cols] = weight.detach().cpu()
    kept = padded != 0
    bit_values = 1 << torch.arange(CHUNK, dtype=torch.int32)
    patterns = (kept.view(rows, chunks, CHUNK).to(torch.int32) * bit_values).sum(-1)
    masks = torch.where(patterns >= 2**15, patterns - 2**16, patterns).to(torch.int16)
    counts = kept.sum(1)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    values = torch.cat([padded[kept], torch.zeros(PADDING, dtype=weight.dtype)])
    return values.contiguous(), offsets, masks.contiguous()


def unpack_bitmask(
    values: torch.Tensor, offsets: torch.Tensor, masks: torch.Tensor, cols: int
) -> torch.Tensor:
    """The dense weight again: the inverse of :func:`pack_bitmask`, what the tests check it
    against."""
    rows, chunks = masks.shape
    patterns = masks.to(torch.int32) & 0xFFFF
    bits = (patterns.unsqueeze(-1) >> torch.arange(CHUNK, dtype=torch.int32)) & 1
    kept = bits.view(rows, chunks * CHUNK).bool()
    dense = torch.zeros(rows, chunks * CHUNK, dtype=values.dtype)
    dense[kept] = values[: int(offsets[-1])]
    return dense[:, :cols].contiguous()


class BitmaskLinear(NativeLinear):
    """``nn.Linear`` whose weight is held only in the packed bitmask form.

    Up to ``MAX_KERNEL_TOKENS`` tokens per call the kernel multiplies from the packed form
    (float32 accumulation; bfloat16 weights stay bfloat16, bit-exact); more tokens go through
    ``sparse_mm`` (float32, up to 60% kept, at least 32 tokens) or the rows rebuilt by each
    thread for torch's dense GEMM in the weight's dtype (see the module docstring).
    """

    kernel = "bitmask"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, extension())
        values, offsets, masks = pack_bitmask(linear.weight)
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("masks", masks, persistent=False)
        self._tile_rows = tile_rows(self.in_features, values.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, MAX_KERNEL_TOKENS)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every call through the prompt path, whatever its token count."""
        return self._linear(x, 0)

    def _linear(self, x: torch.Tensor, max_kernel_tokens: int) -> torch.Tensor:
        # eager calls the extension directly: the dispatcher op (which torch.compile traces)
        # costs a few microseconds more per call, x210 layers a decode step
        ops = torch.ops.sdsprune if torch.compiler.is_compiling() else self._ext
        y = ops.bitmask_linear(
            x,
            self.values,
            self.offsets,
            self.masks,
            self.in_features,
            max_kernel_tokens,
            self._tile_rows,
        )
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kept = int(self.offsets[-1])
        density = kept / max(self.in_features * self.out_features, 1)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel=bitmask, density={density:.2f}"
        )
