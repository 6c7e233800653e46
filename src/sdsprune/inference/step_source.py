"""C++ of the fused decode step (see :mod:`sdsprune.inference.fused`).

It is appended to the bitmask kernel's source and built with it, so the step calls the
same row loops (``kernel_mm``, ``dense_mm``, ``bf16dp_rows``) without a dispatcher between
them, and the extension is compiled once.
"""

STEP_SOURCE = r"""
#include <ATen/core/dispatch/Dispatcher.h>
#include <cmath>

// One linear layer of the plan. kind 0: dense rows (weight); 1: bitmask (values, offsets,
// masks); 2: 2:4 (values, pos) through the registered op sdsprune::nm24_mm.
struct PlanLinear {
  int64_t kind = 0, in = 0, out = 0, grain = 0;
  at::Tensor a, b, c, bias;  // bias: float32, or undefined
};

static float* fptr(at::Tensor& t) { return t.data_ptr<float>(); }

// y (T, out) = x (T, in) W^T (+ bias), float32 activations, the weight in its stored dtype.
static void plan_linear(const PlanLinear& L, const float* x, int64_t T, float* y) {
  if (L.kind == 0) {
    if (L.a.scalar_type() == at::kBFloat16)
      dense_mm(x, T, L.in, reinterpret_cast<const uint16_t*>(L.a.data_ptr()), L.out, y);
    else
      dense_mm(x, T, L.in, L.a.data_ptr<float>(), L.out, y);
  } else if (L.kind == 1) {
    const int64_t* off = L.b.data_ptr<int64_t>();
    const uint16_t* m = reinterpret_cast<const uint16_t*>(L.c.data_ptr());
    if (L.a.scalar_type() == at::kBFloat16) {
      const uint16_t* v = reinterpret_cast<const uint16_t*>(L.a.data_ptr());
#if defined(__AVX512F__)
      if (T == 1 && has_bf16dp()) {
        const auto xb = to_bf16_pairs(x, L.in);
        bf16dp_rows(xb.data(), L.in / CHUNK, v, off, m, L.out, y);
      } else
#endif
        kernel_mm(x, T, L.in, v, off, m, L.out, y);
    } else {
      kernel_mm(x, T, L.in, L.a.data_ptr<float>(), off, m, L.out, y);
    }
  } else {
    static const auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("sdsprune::nm24_mm", "")
        .typed<at::Tensor(at::Tensor, at::Tensor, at::Tensor, int64_t)>();
    auto xin = torch::from_blob(const_cast<float*>(x), {T, L.in}, torch::kFloat32);
    auto r = op.call(L.a.scalar_type() == at::kBFloat16 ? xin.to(at::kBFloat16) : xin, L.a, L.b,
                     L.grain).to(at::kFloat).contiguous();
    std::memcpy(y, r.data_ptr<float>(), sizeof(float) * T * L.out);
  }
  if (L.bias.defined()) {
    const float* bias = L.bias.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < L.out; ++o) y[t * L.out + o] += bias[o];
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

// One sequence's attention for all query heads at cache index `index`: the new k, v are
// written there, then each head attends over the kept cache positions.
template <typename C>
static void attend(const float* q, const float* k, const float* v, C* kc, C* vc, int64_t kv_heads,
                   int64_t group, int64_t d, int64_t length, int64_t index, const uint8_t* keep,
                   float scale, float* out, std::vector<float>& scores) {
  for (int64_t h = 0; h < kv_heads; ++h)
    for (int64_t i = 0; i < d; ++i) {
      kc[(h * length + index) * d + i] = cache_cast<C>(k[h * d + i]);
      vc[(h * length + index) * d + i] = cache_cast<C>(v[h * d + i]);
    }
  scores.resize(index + 1);
  for (int64_t hq = 0; hq < kv_heads * group; ++hq) {
    const int64_t h = hq / group;
    const float* qh = q + hq * d;
    const C* kh = kc + h * length * d;
    const C* vh = vc + h * length * d;
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
    float* oh = out + hq * d;
    std::fill(oh, oh + d, 0.f);
    if (top == -INFINITY) continue;  // nothing to attend to (a fully padded row)
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
  }

  // Logits (B, vocab), float32, of tokens ids (B) at rotary positions (B), their keys and
  // values written at cache index `index` of keys[l] / values[l] (B, kv_heads, length, d);
  // keep (B, >= index + 1; uint8) marks the cache positions each sequence attends to (an
  // empty tensor: all up to index); each layer's filled length (an int64 scalar tensor, as
  // transformers' static cache counts it) then grows by one.
  at::Tensor step(at::Tensor ids, at::Tensor positions, int64_t index, at::Tensor keep,
                  std::vector<at::Tensor> keys, std::vector<at::Tensor> values,
                  std::vector<at::Tensor> lengths) {
    const int64_t B = ids.size(0), d = head_dim, group = heads / kv_heads;
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
    auto keep8 = keep.numel() ? keep.to(at::kByte).contiguous() : keep;
    // cos and sin per sequence (rotary tables computed in float32, as transformers does)
    std::vector<float> cs(B * d);
    const float* freq = inv_freq.data_ptr<float>();
    const auto pos = positions.to(at::kLong).contiguous();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < d / 2; ++i) {
        const float angle = float(pos.data_ptr<int64_t>()[b]) * freq[i];
        cs[b * d + i] = std::cos(angle) * float(rope_scale);
        cs[b * d + d / 2 + i] = std::sin(angle) * float(rope_scale);
      }
    std::vector<float> scores;
    const float e = float(eps);
    for (int64_t l = 0; l < layers; ++l) {
      const PlanLinear* L = &linears[7 * l];
      rms_norm(fptr(h), fptr(norms[2 * l]), e, B, hidden, fptr(x));
      plan_linear(L[0], fptr(x), B, fptr(q));
      plan_linear(L[1], fptr(x), B, fptr(k));
      plan_linear(L[2], fptr(x), B, fptr(v));
      for (int64_t b = 0; b < B; ++b) {
        rotate(fptr(q) + b * heads * d, heads, d, cs.data() + b * d);
        rotate(fptr(k) + b * kv_heads * d, kv_heads, d, cs.data() + b * d);
        const uint8_t* kb = keep8.numel() ? keep8.data_ptr<uint8_t>() + b * keep8.size(1) : nullptr;
        const int64_t off = b * kv_heads * length * d;
        const float* qb = fptr(q) + b * heads * d;
        const float* kk = fptr(k) + b * kv_heads * d;
        const float* vv = fptr(v) + b * kv_heads * d;
        float* ob = fptr(att) + b * heads * d;
        if (keys[l].scalar_type() == at::kBFloat16)
          attend(qb, kk, vv, keys[l].data_ptr<at::BFloat16>() + off, values[l].data_ptr<at::BFloat16>() + off,
                 kv_heads, group, d, length, index, kb, float(scale), ob, scores);
        else
          attend(qb, kk, vv, keys[l].data_ptr<float>() + off, values[l].data_ptr<float>() + off,
                 kv_heads, group, d, length, index, kb, float(scale), ob, scores);
      }
      plan_linear(L[3], fptr(att), B, fptr(tmp));
      h.add_(tmp);
      rms_norm(fptr(h), fptr(norms[2 * l + 1]), e, B, hidden, fptr(x));
      plan_linear(L[4], fptr(x), B, fptr(g));
      plan_linear(L[5], fptr(x), B, fptr(u));
      float* gp = fptr(g);
      const float* up = fptr(u);
      for (int64_t i = 0; i < B * inter; ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
      plan_linear(L[6], gp, B, fptr(tmp));
      h.add_(tmp);
    }
    rms_norm(fptr(h), fptr(norms[2 * layers]), e, B, hidden, fptr(x));
    const PlanLinear& head = linears[7 * layers];
    auto logits = at::empty({B, head.out}, f32);
    plan_linear(head, fptr(x), B, fptr(logits));
    for (auto& filled : lengths) filled.data_ptr<int64_t>()[0] += 1;
    return logits;
  }
};

TORCH_LIBRARY_FRAGMENT(sdsprune, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("step", &DecodePlan::step);
}
"""
