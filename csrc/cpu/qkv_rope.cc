// qkv_rope_append (CPU): one layer's attention inputs from the fused q|k|v projection.
//   qkv [T, (heads + 2*kv_heads) * D] bf16: each row holds the q heads, then the k heads, then v
//   q_out[t] = rope(norm_q(q heads)), k_cache[slot[t]] = rope(norm_k(k heads)), v_cache[slot[t]] = v
// The same bits as rmsnorm over [T*heads, D] and [T*kv_heads, D], then rope, then kv_append: each
// head goes through rmsnorm_row and rope_head, the functions those ops run. A negative slot skips
// the row's cache write.
#include <cstdint>
#include <cstring>

#include "cpu_ops.h"

namespace detinfer::cpu {

void qkv_rope_append(Tensor& q_out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& positions,
                     const Tensor& cos_sin, const Tensor& slots, const Tensor* q_norm, const Tensor* k_norm,
                     float eps) {
  const int64_t T = q_out.dim(0), heads = q_out.dim(1), D = q_out.dim(2), kv_heads = k_cache.dim(2);
  const int64_t row = (heads + 2 * kv_heads) * D, max_pos = cos_sin.dim(0);
  const int64_t capacity = k_cache.dim(0) * k_cache.dim(1);
  const int32_t* pos = positions.ptr<int32_t>();
  const int32_t* slot = slots.ptr<int32_t>();
  // Every index is checked before anything is written.
  for (int64_t t = 0; t < T; ++t) {
    DI_CHECK(pos[t] >= 0 && pos[t] < max_pos, "qkv_rope_append: position ", pos[t], " at index ", t,
             " is outside the table's [0, ", max_pos, ")");
    DI_CHECK(slot[t] < capacity, "qkv_rope_append: slot ", slot[t], " at index ", t, " is outside the cache's ",
             capacity, " slots");
  }
  const size_t head_bytes = static_cast<size_t>(D) * 2;
  // Head h of a [rows, D] tensor: normalized (when w is given) and rotated into dst.
  auto prepare = [&](uint16_t* dst, const uint16_t* src, const Tensor* w, int64_t rows, const float* cs) {
    if (w) {
      rmsnorm_row(dst, src, w->ptr<uint16_t>(), D, rows, eps);
    } else {
      std::memcpy(dst, src, head_bytes);
    }
    rope_head(dst, cs, D);
  };
  for (int64_t t = 0; t < T; ++t) {
    const uint16_t* x = qkv.ptr<uint16_t>() + t * row;
    const float* cs = cos_sin.ptr<float>() + pos[t] * D;
    for (int64_t h = 0; h < heads; ++h)
      prepare(q_out.ptr<uint16_t>() + (t * heads + h) * D, x + h * D, q_norm, T * heads, cs);
    if (slot[t] < 0) continue;
    for (int64_t h = 0; h < kv_heads; ++h) {
      int64_t at = (slot[t] * kv_heads + h) * D;
      prepare(k_cache.ptr<uint16_t>() + at, x + (heads + h) * D, k_norm, T * kv_heads, cs);
      std::memcpy(v_cache.ptr<uint16_t>() + at, x + (heads + kv_heads + h) * D, head_bytes);
    }
  }
}

}  // namespace detinfer::cpu
