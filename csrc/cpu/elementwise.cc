// Elementwise ops (CPU): embedding gather, RoPE, SiLU·mul (gate and up apart, or packed in one
// row [gate | up]), add, KV-cache append, casts.
// Invariant by nature: each output element depends on its own inputs only.
// Rounding follows Hugging Face's bf16 modules: every product and sum is rounded to bf16 where
// PyTorch would round it (RoPE: bf16(bf16(x*cos) + bf16(rot(x)*sin)); SiLU·mul: bf16(bf16(silu(g))*u)).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/bf16.h"
#include "cpu_ops.h"

namespace detinfer::cpu {

void embedding(Tensor& out, const Tensor& table, const Tensor& ids) {
  int64_t rows = ids.dim(0), vocab = table.dim(0);
  size_t row_bytes = static_cast<size_t>(table.dim(1)) * dtype_size(table.dtype);
  const int32_t* id = ids.ptr<int32_t>();
  for (int64_t t = 0; t < rows; ++t) {
    DI_CHECK(id[t] >= 0 && id[t] < vocab, "embedding: id ", id[t], " at index ", t, " is out of range [0, ", vocab, ")");
    std::memcpy(static_cast<char*>(out.data()) + t * row_bytes,
                static_cast<const char*>(table.data()) + id[t] * row_bytes, row_bytes);
  }
}

void rope(Tensor& x, const Tensor& positions, const Tensor& cos_sin) {
  int64_t tokens = x.dim(0), heads = x.dim(1), dim = x.dim(2), half = dim / 2, max_pos = cos_sin.dim(0);
  uint16_t* xs = x.ptr<uint16_t>();
  const int32_t* pos = positions.ptr<int32_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    DI_CHECK(pos[t] >= 0 && pos[t] < max_pos, "rope: position ", pos[t], " at index ", t,
             " is outside the table's [0, ", max_pos, ")");
    const float* cs = cos_sin.ptr<float>() + pos[t] * dim;
    for (int64_t h = 0; h < heads; ++h) rope_head(xs + (t * heads + h) * dim, cs, dim);
  }
}

void rope_head(uint16_t* v, const float* cs, int64_t dim) {
  int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    float c = round_bf16(cs[i]), s = round_bf16(cs[half + i]);
    float x1 = bf16_to_f32(v[i]), x2 = bf16_to_f32(v[i + half]);
    v[i] = f32_to_bf16(round_bf16(x1 * c) + round_bf16(-x2 * s));
    v[i + half] = f32_to_bf16(round_bf16(x2 * c) + round_bf16(x1 * s));
  }
}

namespace {
// bf16(bf16(silu(g)) * u): the one expression of silu_mul and silu_mul_packed.
uint16_t silu_mul_value(uint16_t gate, uint16_t up) {
  float g = bf16_to_f32(gate);
  float silu = g / (1.0f + std::exp(-g));
  return f32_to_bf16(round_bf16(silu) * bf16_to_f32(up));
}
}  // namespace

void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up) {
  int64_t n = out.numel();
  const uint16_t* g = gate.ptr<uint16_t>();
  const uint16_t* u = up.ptr<uint16_t>();
  uint16_t* o = out.ptr<uint16_t>();
  for (int64_t i = 0; i < n; ++i) o[i] = silu_mul_value(g[i], u[i]);
}

void silu_mul_packed(Tensor& out, const Tensor& gate_up) {
  int64_t rows = out.dim(0), I = out.dim(1);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* g = gate_up.ptr<uint16_t>() + r * 2 * I;
    uint16_t* o = out.ptr<uint16_t>() + r * I;
    for (int64_t i = 0; i < I; ++i) o[i] = silu_mul_value(g[i], g[I + i]);
  }
}

void add(Tensor& out, const Tensor& a, const Tensor& b) {
  int64_t n = out.numel();
  const uint16_t* as = a.ptr<uint16_t>();
  const uint16_t* bs = b.ptr<uint16_t>();
  uint16_t* o = out.ptr<uint16_t>();
  for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(bf16_to_f32(as[i]) + bf16_to_f32(bs[i]));
}

void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, const Tensor& slots) {
  int64_t tokens = k.dim(0), row = k.dim(1) * k.dim(2);
  int64_t capacity = k_cache.dim(0) * k_cache.dim(1);
  const int32_t* slot = slots.ptr<int32_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    if (slot[t] < 0) continue;
    DI_CHECK(slot[t] < capacity, "kv_append: slot ", slot[t], " at index ", t, " is outside the cache's ",
             capacity, " slots");
    std::memcpy(k_cache.ptr<uint16_t>() + slot[t] * row, k.ptr<uint16_t>() + t * row, row * 2);
    std::memcpy(v_cache.ptr<uint16_t>() + slot[t] * row, v.ptr<uint16_t>() + t * row, row * 2);
  }
}

namespace {
float load_any(const Tensor& t, int64_t i) {
  switch (t.dtype) {
    case DType::BF16: return bf16_to_f32(t.ptr<uint16_t>()[i]);
    case DType::F16: return f16_to_f32(t.ptr<uint16_t>()[i]);
    default: return t.ptr<float>()[i];
  }
}
void store_any(Tensor& t, int64_t i, float v) {
  switch (t.dtype) {
    case DType::BF16: t.ptr<uint16_t>()[i] = f32_to_bf16(v); break;
    case DType::F16: t.ptr<uint16_t>()[i] = f32_to_f16(v); break;
    default: t.ptr<float>()[i] = v;
  }
}
}  // namespace

void cast(Tensor& dst, const Tensor& src) {
  int64_t n = src.numel();
  for (int64_t i = 0; i < n; ++i) store_any(dst, i, load_any(src, i));
}

}  // namespace detinfer::cpu
