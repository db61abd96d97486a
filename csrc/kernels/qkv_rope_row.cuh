// One head row of a layer's attention inputs from the fused q|k|v projection, as one warp computes
// it: the q and k heads normed (Qwen3's per-head RMSNorm, when its weight is given) and rotated,
// the v heads as stored. qkv_rope_append_kernel (qkv_rope.cu) writes such rows to q_out and the
// cache; decode attention (attention.cu, qkv_rope_attention) computes its own query rows and its
// sequence's newest cache row with the same function, so both give the same bits.
//
// The head norm's sum of squares is rmsnorm's: in the norm's block of norm_row::kThreads threads,
// thread t < D/8 owns chunk t (the rest own none) and adds its 8 squares in element order; the
// block tree is warp 0's xor-shuffle, then a second round over the per-warp sums in which every
// other warp gives +0.0. Lane l here adds the same squares in the same order and runs the same
// shuffle; the second round is left out, since adding +0.0 to a sum of squares changes no bit.
// The rotation is the rope kernel's (rope_pair.cuh), applied to the norm's bf16 output.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "block_reduce.cuh"
#include "rmsnorm_row.cuh"
#include "rope_pair.cuh"

namespace detinfer {
class Tensor;
}

namespace detinfer::cuda {

struct QkvRopeArgs {
  __nv_bfloat16* q_out;          // [T, heads, D]
  __nv_bfloat16* k_cache;        // [capacity, kv_heads, D]
  __nv_bfloat16* v_cache;
  const __nv_bfloat16* qkv;      // [T, (heads + 2*kv_heads) * D]
  const int32_t* positions;      // [T]
  const int32_t* slots;          // [T]
  const float* cos_sin;          // [max_pos, D]
  const __nv_bfloat16* q_norm;   // [D] or null
  const __nv_bfloat16* k_norm;   // [D] or null
  int64_t capacity;              // cache slots
  int64_t max_pos;
  int heads, kv_heads, dim;
  float eps;
  bool vec;                      // 16-byte loads and stores (never changes the norm's order)
  bool vec_table;                // 16-byte loads of cos_sin
};

// The arguments of one layer's rows (validated by ops.cc); q_out may be null where nothing writes it.
QkvRopeArgs qkv_rope_args(Tensor* q_out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& positions,
                          const Tensor& cos_sin, const Tensor& slots, const Tensor* q_norm, const Tensor* k_norm,
                          float eps);

namespace qkv_row {

using norm_row::kChunk;

// Chunk c of a head as it is stored (bit for bit, NaN payloads included).
__device__ __forceinline__ void load_raw(const __nv_bfloat16* x, int c, bool vec, __nv_bfloat16 (&r)[kChunk]) {
  if (vec) {
    const uint4 q = *reinterpret_cast<const uint4*>(x + c * kChunk);
    memcpy(r, &q, sizeof(q));
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) r[j] = x[c * kChunk + j];
  }
}

// What head row h of token t takes besides the row itself, for chunk `lane`: whether and how it
// rotates (the position is a host input), the norm's weights and the rotation's cos and sin. No
// kernel of a step writes any of them, so decode attention reads them before its wait.
struct RowConstants {
  bool rotate, first;
  float w[kChunk], cosv[kChunk], sinv[kChunk];
};

__device__ __forceinline__ void row_constants(const QkvRopeArgs& a, int64_t t, int h, int lane, RowConstants& c) {
  const int D = a.dim, chunks = D / kChunk, half_chunks = chunks / 2;
  const bool is_q = h < a.heads, is_k = !is_q && h < a.heads + a.kv_heads, mine = lane < chunks;
  c.first = lane < half_chunks;
  c.rotate = false;
  if (!is_q && !is_k) return;  // a v head: stored as it is
  // Element i of the first half pairs with i + D/2: cos at cs[i], sin at cs[D/2 + i].
  const int half = D / 2, i0 = (c.first ? lane : lane - half_chunks) * kChunk;
  const int32_t pos = a.positions[t];
  c.rotate = pos >= 0 && pos < a.max_pos;
  const __nv_bfloat16* w = is_q ? a.q_norm : a.k_norm;
  if (w && mine) norm_row::load_chunk(w, D, lane, a.vec, c.w);
  if (c.rotate && mine) {
    const float* cs = a.cos_sin + static_cast<int64_t>(pos) * D;
    if (a.vec_table) {
#pragma unroll
      for (int q = 0; q < kChunk / 4; ++q) {
        const float4 c4 = *reinterpret_cast<const float4*>(cs + i0 + 4 * q);
        const float4 s4 = *reinterpret_cast<const float4*>(cs + half + i0 + 4 * q);
        c.cosv[4 * q] = c4.x, c.cosv[4 * q + 1] = c4.y, c.cosv[4 * q + 2] = c4.z, c.cosv[4 * q + 3] = c4.w;
        c.sinv[4 * q] = s4.x, c.sinv[4 * q + 1] = s4.y, c.sinv[4 * q + 2] = s4.z, c.sinv[4 * q + 3] = s4.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) c.cosv[j] = cs[i0 + j], c.sinv[j] = cs[half + i0 + j];
    }
  }
}

// Chunk `lane` (8 elements) of head row h of token t: rope(norm(q or k head)), or the v head as
// stored, with the row's constants c (row_constants). Every lane of the warp calls it with the same
// t and h (the norm's sum and the rotation's partner are shuffles); lane l holds chunk l (D <= 256,
// D a multiple of 16, so that chunk l's rotation partner is the whole chunk l +- D/16). Returns
// false on the lanes past the head's chunks, which get nothing.
__device__ __forceinline__ bool head_chunk(const QkvRopeArgs& a, int64_t t, int h, int lane, const RowConstants& c,
                                           __nv_bfloat16 (&result)[kChunk]) {
  const int D = a.dim, chunks = D / kChunk, half_chunks = chunks / 2;
  const int64_t row = static_cast<int64_t>(a.heads + 2 * a.kv_heads) * D;
  const __nv_bfloat16* x = a.qkv + t * row + static_cast<int64_t>(h) * D;
  const bool is_q = h < a.heads, is_k = !is_q && h < a.heads + a.kv_heads;
  const bool mine = lane < chunks;  // this lane's chunk exists
  if (!is_q && !is_k) {  // a v head
    if (!mine) return false;
    load_raw(x, lane, a.vec, result);
    return true;
  }
  __nv_bfloat16 y[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) y[j] = __float2bfloat16_rn(0.f);
  if (mine) load_raw(x, lane, a.vec, y);

  // The head's values after the norm (the norm's bf16 output; the input itself without a norm),
  // 8 per lane.
  if (is_q ? a.q_norm : a.k_norm) {
    float xv[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) xv[j] = __bfloat162float(y[j]);
    float sum = 0.f;
    if (mine)
#pragma unroll
      for (int j = 0; j < kChunk; ++j) sum = sum + xv[j] * xv[j];
    sum = warp_sum(sum);
    const float inv = norm_row::inverse_rms(sum, D, a.eps);
    if (mine)
#pragma unroll
      for (int j = 0; j < kChunk; ++j) y[j] = norm_row::normalized(xv[j], inv, c.w[j]);
  }

  // The rotation partner's chunk (l + D/16 for the first half, l - D/16 for the second).
  const int partner = c.first ? lane + half_chunks : lane - half_chunks;
  uint32_t words[kChunk / 2], other[kChunk / 2];
  static_assert(sizeof(words) == sizeof(y), "8 bf16 values in 4 words");
  memcpy(words, y, sizeof(y));
#pragma unroll
  for (int i = 0; i < kChunk / 2; ++i) other[i] = __shfl_sync(0xffffffffu, words[i], partner & 31);
  if (!mine) return false;
  if (!c.rotate) {
    memcpy(result, y, sizeof(y));
    return true;
  }
  __nv_bfloat16 z[kChunk];
  memcpy(z, other, sizeof(z));
#pragma unroll
  for (int j = 0; j < kChunk; ++j)
    result[j] = c.first ? rope_pair::rotate_first(__bfloat162float(y[j]), __bfloat162float(z[j]), c.cosv[j], c.sinv[j])
                        : rope_pair::rotate_second(__bfloat162float(z[j]), __bfloat162float(y[j]), c.cosv[j], c.sinv[j]);
  return true;
}

}  // namespace qkv_row
}  // namespace detinfer::cuda
