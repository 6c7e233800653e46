"""C++ of the fused decode step (see :mod:`sdsprune.inference.fused`).

It is appended to the bitmask kernel's source and built with it, so the step calls the
same row loops (``kernel_mm``, ``dense_mm``, ``bf16dp_rows``) without a dispatcher between
them, and the extension is compiled once.
"""

STEP_SOURCE = r"""
#include <ATen/core/dispatch/Dispatcher.h>
#include <atomic>
#include <thread>
#include <cmath>
#include <omp.h>

// One linear layer of the plan. kind 0: dense rows (weight); 1: bitmask (values, offsets,
// masks); 2: 2:4 (values, pos) through the registered op sdsprune::nm24_mm.
struct PlanLinear {
  int64_t kind = 0, in = 0, out = 0, grain = 0;
  at::Tensor a, b, c, bias;  // bias: float32, or undefined
};

static float* fptr(at::Tensor& t) { return t.data_ptr<float>(); }

// The threads of one parallel region wait for each other here by spinning: the phases of a
// decode step are microseconds long, shorter than a sleeping thread takes to wake.
class SpinBarrier {
 public:
  static constexpr int SPINS_BEFORE_YIELD = 4096;
  explicit SpinBarrier(int threads) : threads_(threads) {}
  void wait() {
    if (threads_ == 1) return;
    const int phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_release);
    } else {
      // past a few tens of microseconds the awaited thread is likely off its core (more
      // threads than cores, or a busy machine): give the core away instead of spinning on
      for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
        if (spins < SPINS_BEFORE_YIELD) _mm_pause(); else std::this_thread::yield();
      }
    }
  }

 private:
  const int threads_;
  std::atomic<int> arrived_{0}, phase_{0};
};

// First row of thread part `part` of `parts`, splitting the rows' bytes evenly (a bitmask
// layer's rows hold different numbers of values).
static int64_t part_start(const PlanLinear& L, int part, int parts) {
  if (part == 0) return 0;
  if (part == parts) return L.out;
  if (L.kind != 1) return L.out * part / parts;
  const int64_t* off = L.b.data_ptr<int64_t>();
  const int64_t value_bytes = L.a.element_size(), mask_bytes = L.in / CHUNK * 2;
  auto cost = [&](int64_t o) { return off[o] * value_bytes + o * mask_bytes; };
  const int64_t target = cost(L.out) * part / parts;
  int64_t lo = 0, hi = L.out;  // first row whose start cost reaches target
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (cost(mid) < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Rows [begin, end) of a 2:4 layer through its own extension's op on those rows (inside a
// parallel region the op runs on the calling thread).
static void nm24_rows(const PlanLinear& L, const float* x, int64_t T, int64_t begin, int64_t end,
                      float* y) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("sdsprune::nm24_mm", "")
      .typed<at::Tensor(at::Tensor, at::Tensor, at::Tensor, int64_t)>();
  if (end <= begin) return;
  auto xin = torch::from_blob(const_cast<float*>(x), {T, L.in}, torch::kFloat32);
  if (L.a.scalar_type() == at::kBFloat16) xin = xin.to(at::kBFloat16);
  auto r = op.call(xin, L.a.narrow(0, begin, end - begin), L.b.narrow(0, begin, end - begin),
                   L.grain).to(at::kFloat).contiguous();
  const float* rp = r.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    std::memcpy(y + t * L.out + begin, rp + t * (end - begin), sizeof(float) * (end - begin));
}

// Rows [begin, end) of y (T, out) = x (T, in) W^T (+ bias); xb: x in bfloat16 (padded to a
// whole pair of chunks) where the bfloat16 dot-product path reads it, else null.
static void linear_rows(const PlanLinear& L, const float* x, const uint16_t* xb, int64_t T,
                        int64_t begin, int64_t end, float* y) {
  const bool bf16 = L.a.scalar_type() == at::kBFloat16;
  if (L.kind == 2) {
    nm24_rows(L, x, T, begin, end, y);
  } else if (L.kind == 0) {
    const int64_t in = L.in;
    if (bf16) {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(L.a.data_ptr());
      rows_range(x, T, in, L.out, [&](int64_t o) { return DenseRow<uint16_t>{w + o * in}; }, begin, end, y);
    } else {
      const float* w = L.a.data_ptr<float>();
      rows_range(x, T, in, L.out, [&](int64_t o) { return DenseRow<float>{w + o * in}; }, begin, end, y);
    }
  } else {
    const int64_t* off = L.b.data_ptr<int64_t>();
    const uint16_t* m = reinterpret_cast<const uint16_t*>(L.c.data_ptr());
    const int64_t chunks = L.in / CHUNK;
    if (bf16) {
      const uint16_t* v = reinterpret_cast<const uint16_t*>(L.a.data_ptr());
#if defined(__AVX512F__)
      if (xb != nullptr && T == 1) {
        bf16dp_range(xb, chunks, v, off, m, begin, end, y);
      } else
#endif
        rows_range(x, T, L.in, L.out,
                   [&](int64_t o) { return PackedRow<uint16_t>{v + off[o], m + o * chunks}; }, begin, end, y);
    } else {
      const float* v = L.a.data_ptr<float>();
      rows_range(x, T, L.in, L.out,
                 [&](int64_t o) { return PackedRow<float>{v + off[o], m + o * chunks}; }, begin, end, y);
    }
  }
  if (L.bias.defined()) {
    const float* bias = L.bias.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = begin; o < end; ++o) y[t * L.out + o] += bias[o];
  }
}

// out = x / rms(x) * weight, row by row (n values a row)
static void rms_norm(const float* x, const float* weight, float eps, int64_t T, int64_t n, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * n;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += xt[i] * xt[i];
    const float scale = 1.f / std::sqrt(ss / float(n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[t * n + i] = xt[i] * scale * weight[i];
  }
}

// rotate_half rotary embedding on heads of d values, in place; cs: cos then sin, d/2 each
static void rotate(float* x, int64_t heads, int64_t d, const float* cs) {
  const int64_t half = d / 2;
  const float* c = cs;
  const float* s = cs + half;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * d;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i] + a * s[i];
    }
  }
}

template <typename C> static inline float cache_get(const C* p) { return float(*p); }
template <typename C> static inline C cache_cast(float v) { return C(v); }

// One sequence's new keys and values (all kv heads) into its cache at `index`.
template <typename C>
static void store_kv(const float* k, const float* v, C* kc, C* vc, int64_t kv_heads, int64_t d,
                     int64_t length, int64_t index) {
  for (int64_t h = 0; h < kv_heads; ++h)
    for (int64_t i = 0; i < d; ++i) {
      kc[(h * length + index) * d + i] = cache_cast<C>(k[h * d + i]);
      vc[(h * length + index) * d + i] = cache_cast<C>(v[h * d + i]);
    }
}

// One query head's attention over its kv head's cache (kh, vh: length x d) up to `index`,
// over the kept positions; scores: room for index + 1 floats.
template <typename C>
static void attend_head(const float* qh, const C* kh, const C* vh, int64_t d, int64_t index,
                        const uint8_t* keep, float scale, float* oh, float* scores) {
  float top = -INFINITY;
  for (int64_t j = 0; j <= index; ++j) {
    if (keep && !keep[j]) { scores[j] = -INFINITY; continue; }
    const C* kj = kh + j * d;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < d; ++i) dot += qh[i] * cache_get(kj + i);
    scores[j] = dot * scale;
    top = std::max(top, scores[j]);
  }
  std::fill(oh, oh + d, 0.f);
  if (top == -INFINITY) return;  // nothing to attend to (a fully padded row)
  float total = 0.f;
  for (int64_t j = 0; j <= index; ++j) {
    if (scores[j] == -INFINITY) continue;
    const float p = std::exp(scores[j] - top);
    total += p;
    const C* vj = vh + j * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) oh[i] += p * cache_get(vj + i);
  }
  const float inv = 1.f / total;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) oh[i] *= inv;
}

// g = silu(g) * u
static void silu_mul(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// x (width floats, whole chunks) into xb as bfloat16, the chunk after it zeroed unless told
// otherwise (the bfloat16 dot-product kernel reads whole pairs of chunks)
static void round_to_bf16(const float* x, int64_t width, uint16_t* xb, bool zero_tail = true) {
#if defined(__AVX512F__)
  to_bf16(x, width, xb);
  if (zero_tail) std::fill(xb + width, xb + width + CHUNK, 0);
#endif
}

// A Llama-family decoder (Llama, Mistral, Qwen2) as one C++ loop over its blocks for decode
// steps: embedding, per block RMSNorm, q/k/v, rotary, KV-cache write, attention, o, residual,
// RMSNorm, SiLU-gated MLP, residual; final RMSNorm and the LM head. Activations float32.
struct DecodePlan : torch::CustomClassHolder {
  int64_t layers, hidden, heads, kv_heads, head_dim, inter;
  double eps, scale, rope_scale;
  at::Tensor inv_freq, embed;
  std::vector<at::Tensor> norms;     // per layer: input, post-attention; then the final one
  std::vector<PlanLinear> linears;   // per layer: q k v o gate up down; then the LM head

  // ints: layers, hidden, heads, kv_heads, head_dim, intermediate, then per linear
  // kind, grain and whether a bias follows; floats: eps, attention scale, rotary scale;
  // tensors: inv_freq, embedding, the norms in order, then per linear its tensors (+ bias).
  DecodePlan(std::vector<at::Tensor> tensors, std::vector<int64_t> ints, std::vector<double> floats)
      : layers(ints[0]), hidden(ints[1]), heads(ints[2]), kv_heads(ints[3]), head_dim(ints[4]),
        inter(ints[5]), eps(floats[0]), scale(floats[1]), rope_scale(floats[2]) {
    size_t t = 0;
    inv_freq = tensors[t++].to(at::kFloat).contiguous();
    embed = tensors[t++].contiguous();
    for (int64_t i = 0; i < 2 * layers + 1; ++i) norms.push_back(tensors[t++].to(at::kFloat).contiguous());
    size_t n = 6;
    const int64_t count = 7 * layers + 1;
    for (int64_t i = 0; i < count; ++i) {
      PlanLinear L;
      L.kind = ints[n++];
      L.grain = ints[n++];
      const bool has_bias = ints[n++] != 0;
      L.a = tensors[t++];
      if (L.kind == 0) {
        L.out = L.a.size(0);
        L.in = L.a.size(1);
      } else if (L.kind == 1) {
        L.b = tensors[t++];
        L.c = tensors[t++];
        L.out = L.c.size(0);
        L.in = L.c.size(1) * CHUNK;
      } else {
        L.b = tensors[t++];
        L.out = L.a.size(0);
        L.in = 2 * L.a.size(1);
      }
      if (has_bias) L.bias = tensors[t++].to(at::kFloat).contiguous();
      linears.push_back(L);
    }
    TORCH_CHECK(t == tensors.size() && n == ints.size(), "malformed decode plan");
    use_bf16dp = embed.scalar_type() == at::kBFloat16 && has_bf16dp();
  }

  // Logits (B, vocab), float32, of tokens ids (B) at rotary positions (B), their keys and
  // values written at cache index `index` of keys[l] / values[l] (B, kv_heads, length, d);
  // keep (B, >= index + 1; uint8) marks the cache positions each sequence attends to (an
  // empty tensor: all up to index); each layer's filled length (an int64 scalar tensor, as
  // transformers' static cache counts it) then grows by one.
  //
  // The whole step is one parallel region of torch's threads: each linear's rows are split
  // over the threads by bytes, the small serial parts (norms, rotary, attention) run on
  // thread 0, and the phases meet at a spinning barrier (about 7 a block, where calling a
  // threaded kernel per linear would wake the threads 7 times a block).
  at::Tensor step(at::Tensor ids, at::Tensor positions, int64_t index, at::Tensor keep,
                  std::vector<at::Tensor> keys, std::vector<at::Tensor> values,
                  std::vector<at::Tensor> lengths) {
    const int64_t B = ids.size(0), d = head_dim;
    TORCH_CHECK((int64_t)keys.size() == layers && (int64_t)values.size() == layers, "one cache a layer");
    const int64_t length = keys[0].size(2);
    TORCH_CHECK(index >= 0 && index < length, "cache index out of range");
    TORCH_CHECK(keep.numel() == 0 || (keep.size(0) == B && keep.size(1) > index), "keep mask shape");
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    auto h = embed.index_select(0, ids.to(at::kLong)).to(at::kFloat).contiguous();
    auto x = at::empty({B, hidden}, f32), tmp = at::empty({B, hidden}, f32);
    auto q = at::empty({B, heads * d}, f32), k = at::empty({B, kv_heads * d}, f32);
    auto v = at::empty({B, kv_heads * d}, f32), att = at::empty({B, heads * d}, f32);
    auto g = at::empty({B, inter}, f32), u = at::empty({B, inter}, f32);
    auto logits = at::empty({B, linears.back().out}, f32);
    auto keep8 = keep.numel() ? keep.to(at::kByte).contiguous() : keep;
    const std::vector<float> cs = rotary_tables(positions.to(at::kLong).contiguous(), B);
    // one token of a bfloat16 model: activations rounded to bfloat16 once per phase for the
    // bfloat16 dot-product kernel (zero-padded to a whole pair of chunks)
    const bool dp = B == 1 && use_bf16dp;
    std::vector<uint16_t> xb(dp ? (std::max({hidden, heads * d, inter}) + 2 * CHUNK) : 0, 0);
    const float e = float(eps);
    const int threads = at::get_num_threads();
    SpinBarrier barrier(threads);
#pragma omp parallel num_threads(threads)
    {
      const int part = omp_get_thread_num(), parts = omp_get_num_threads();
      std::vector<float> scores(length);
      // this thread's rows of each layer in a phase, then everyone waits
      auto linears_phase = [&](std::initializer_list<std::pair<const PlanLinear*, float*>> jobs,
                               float* in) {
        const uint16_t* in_b = dp ? xb.data() : nullptr;
        for (const auto& job : jobs) {
          const PlanLinear& L = *job.first;
          linear_rows(L, in, in_b, B, part_start(L, part, parts), part_start(L, part + 1, parts), job.second);
        }
        barrier.wait();
      };
      auto serial_phase = [&](auto&& work, const float* out, int64_t width) {
        if (part == 0) {
          work();
          if (dp) round_to_bf16(out, width, xb.data());
        }
        barrier.wait();
      };
      for (int64_t l = 0; l < layers; ++l) {
        const PlanLinear* L = &linears[7 * l];
        serial_phase([&] { rms_norm(fptr(h), fptr(norms[2 * l]), e, B, hidden, fptr(x)); }, fptr(x), hidden);
        linears_phase({{&L[0], fptr(q)}, {&L[1], fptr(k)}, {&L[2], fptr(v)}}, fptr(x));
        if (part == 0) {
          rotate_and_store(l, q, k, v, keys, values, cs, index, length);
          if (dp) std::fill(xb.data() + heads * d, xb.data() + heads * d + CHUNK, 0);
        }
        barrier.wait();
        // query heads over the threads in contiguous runs (heads of one kv head read its
        // cache once from memory), each thread rounding its heads' outputs for the bfloat16
        // kernel (the chunk after them zeroed by thread 0 above)
        for (int64_t i = B * heads * part / parts; i < B * heads * (part + 1) / parts; ++i) {
          attend_one(l, i / heads, i % heads, q, att, keys, values, keep8, index, length, scores);
          if (dp) round_to_bf16(fptr(att) + i * d, d, xb.data() + i * d, false);
        }
        barrier.wait();
        linears_phase({{&L[3], fptr(tmp)}}, fptr(att));
        serial_phase([&] {
          h.add_(tmp);
          rms_norm(fptr(h), fptr(norms[2 * l + 1]), e, B, hidden, fptr(x));
        }, fptr(x), hidden);
        linears_phase({{&L[4], fptr(g)}, {&L[5], fptr(u)}}, fptr(x));
        serial_phase([&] { silu_mul(fptr(g), fptr(u), B * inter); }, fptr(g), inter);
        linears_phase({{&L[6], fptr(tmp)}}, fptr(g));
        if (part == 0) h.add_(tmp);  // the next phase is thread 0's too
      }
      serial_phase([&] { rms_norm(fptr(h), fptr(norms[2 * layers]), e, B, hidden, fptr(x)); }, fptr(x), hidden);
      linears_phase({{&linears.back(), fptr(logits)}}, fptr(x));
    }
    for (auto& filled : lengths) filled.data_ptr<int64_t>()[0] += 1;
    return logits;
  }

 private:
  bool use_bf16dp = false;

  // cos then sin (d/2 each) per sequence, in float32 as transformers computes them
  std::vector<float> rotary_tables(const at::Tensor& pos, int64_t B) const {
    const int64_t d = head_dim;
    std::vector<float> cs(B * d);
    const float* freq = inv_freq.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < d / 2; ++i) {
        const float angle = float(pos.data_ptr<int64_t>()[b]) * freq[i];
        cs[b * d + i] = std::cos(angle) * float(rope_scale);
        cs[b * d + d / 2 + i] = std::sin(angle) * float(rope_scale);
      }
    return cs;
  }

  // rotary on q and k, then each sequence's keys and values into its cache at index; the
  // chunk after the attention output's bfloat16 copy zeroed
  void rotate_and_store(int64_t l, at::Tensor& q, at::Tensor& k, at::Tensor& v,
                        std::vector<at::Tensor>& keys, std::vector<at::Tensor>& values,
                        const std::vector<float>& cs, int64_t index, int64_t length) {
    const int64_t d = head_dim, B = q.size(0);
    for (int64_t b = 0; b < B; ++b) {
      rotate(fptr(q) + b * heads * d, heads, d, cs.data() + b * d);
      rotate(fptr(k) + b * kv_heads * d, kv_heads, d, cs.data() + b * d);
      const int64_t off = b * kv_heads * length * d;
      const float* kb = fptr(k) + b * kv_heads * d;
      const float* vb = fptr(v) + b * kv_heads * d;
      if (keys[l].scalar_type() == at::kBFloat16)
        store_kv(kb, vb, keys[l].data_ptr<at::BFloat16>() + off, values[l].data_ptr<at::BFloat16>() + off,
                 kv_heads, d, length, index);
      else
        store_kv(kb, vb, keys[l].data_ptr<float>() + off, values[l].data_ptr<float>() + off,
                 kv_heads, d, length, index);
    }
  }

  // query head hq of sequence b attends over its kv head's cache
  void attend_one(int64_t l, int64_t b, int64_t hq, at::Tensor& q, at::Tensor& att,
                  std::vector<at::Tensor>& keys, std::vector<at::Tensor>& values,
                  const at::Tensor& keep8, int64_t index, int64_t length, std::vector<float>& scores) {
    const int64_t d = head_dim, h = hq / (heads / kv_heads);
    const uint8_t* kb = keep8.numel() ? keep8.data_ptr<uint8_t>() + b * keep8.size(1) : nullptr;
    const int64_t off = (b * kv_heads + h) * length * d;
    const float* qh = fptr(q) + (b * heads + hq) * d;
    float* oh = fptr(att) + (b * heads + hq) * d;
    if (keys[l].scalar_type() == at::kBFloat16)
      attend_head(qh, keys[l].data_ptr<at::BFloat16>() + off, values[l].data_ptr<at::BFloat16>() + off,
                  d, index, kb, float(scale), oh, scores.data());
    else
      attend_head(qh, keys[l].data_ptr<float>() + off, values[l].data_ptr<float>() + off, d, index,
                  kb, float(scale), oh, scores.data());
  }
};

TORCH_LIBRARY_FRAGMENT(sdsprune, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("step", &DecodePlan::step);
}
"""
