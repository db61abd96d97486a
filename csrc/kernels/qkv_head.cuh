// One head row of the fused q|k|v projection made ready for attention, by one warp: Qwen3's head
// norm (rmsnorm_row.cuh's row code) and then the rotation (rope_pair.cuh), or the row as it is (a
// v head). Shared by the q/k/v kernel (qkv_rope.cu) and the decode attention kernel that computes
// its own query rows and the step's key row (attention.cu, qkv_rope_attention), so that both give
// the same bits.
// Lane l of the warp holds 8-element chunk l of the head (D <= 256, D a multiple of 16, so that
// chunk l's rotation partner is the whole chunk l +- D/16). The head norm's sum of squares is
// rmsnorm's: in the norm's block of norm_row::kThreads threads, thread t < D/8 owns chunk t (the
// rest own none) and adds its 8 squares in element order; the block tree is warp 0's xor-shuffle,
// then a second round over the per-warp sums in which every other warp gives +0.0. Lane l here
// adds the same squares in the same order and runs the same shuffle; the second round is left
// out, since adding +0.0 to a sum of squares changes no bit.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "../common/tensor.h"
#include "block_reduce.cuh"
#include "rmsnorm_row.cuh"
#include "rope_pair.cuh"

namespace detinfer::cuda {

// What the head rows are computed from, by value.
struct QkvHeads {
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

// Chunk c of a head as it is stored (bit for bit, NaN payloads included).
__device__ __forceinline__ void load_head_chunk(const __nv_bfloat16* x, int c, bool vec,
                                                __nv_bfloat16 (&r)[norm_row::kChunk]) {
  if (vec) {
    const uint4 q = *reinterpret_cast<const uint4*>(x + c * norm_row::kChunk);
    memcpy(r, &q, sizeof(q));
  } else {
#pragma unroll
    for (int j = 0; j < norm_row::kChunk; ++j) r[j] = x[c * norm_row::kChunk + j];
  }
}

// Head h (a q head below a.heads, then the k heads, then the v heads) of token t, called by all
// 32 lanes of a warp: lane l < D/8 gets chunk l in `out` and returns true; the other lanes return
// false. A q or k head is normalized (when its norm weight is given) and rotated (when the token's
// position is inside cos_sin); a v head is copied.
__device__ __forceinline__ bool qkv_head_chunk(const QkvHeads& a, int64_t t, int h, int lane,
                                               __nv_bfloat16 (&out)[norm_row::kChunk]) {
  using norm_row::kChunk;
  const int D = a.dim, chunks = D / kChunk, half_chunks = chunks / 2;
  const __nv_bfloat16* x = a.qkv + t * static_cast<int64_t>(a.heads + 2 * a.kv_heads) * D + static_cast<int64_t>(h) * D;
  const bool mine = lane < chunks;  // this lane's chunk exists
  if (h >= a.heads + a.kv_heads) {  // a v head
    if (mine) load_head_chunk(x, lane, a.vec, out);
    return mine;
  }
  // Every load first (the head, the norm's weights, the rotation's cos and sin), so that their
  // latencies overlap. Element i of the first half pairs with i + D/2: cos at cs[i], sin at cs[D/2 + i].
  const bool first = lane < half_chunks;
  const int half = D / 2, i0 = (first ? lane : lane - half_chunks) * kChunk;
  const int32_t pos = a.positions[t];
  const bool rotate = pos >= 0 && pos < a.max_pos;
  __nv_bfloat16 y[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) y[j] = __float2bfloat16_rn(0.f);
  if (mine) load_head_chunk(x, lane, a.vec, y);
  const __nv_bfloat16* w = h < a.heads ? a.q_norm : a.k_norm;
  float wv[kChunk];
  if (w && mine) norm_row::load_chunk(w, D, lane, a.vec, wv);
  float cosv[kChunk], sinv[kChunk];
  if (rotate && mine) {
    const float* cs = a.cos_sin + static_cast<int64_t>(pos) * D;
    if (a.vec_table) {
#pragma unroll
      for (int q = 0; q < kChunk / 4; ++q) {
        const float4 c4 = *reinterpret_cast<const float4*>(cs + i0 + 4 * q);
        const float4 s4 = *reinterpret_cast<const float4*>(cs + half + i0 + 4 * q);
        cosv[4 * q] = c4.x, cosv[4 * q + 1] = c4.y, cosv[4 * q + 2] = c4.z, cosv[4 * q + 3] = c4.w;
        sinv[4 * q] = s4.x, sinv[4 * q + 1] = s4.y, sinv[4 * q + 2] = s4.z, sinv[4 * q + 3] = s4.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) cosv[j] = cs[i0 + j], sinv[j] = cs[half + i0 + j];
    }
  }

  // The head's values after the norm (the norm's bf16 output; the input itself without a norm).
  if (w) {
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
      for (int j = 0; j < kChunk; ++j) y[j] = norm_row::normalized(xv[j], inv, wv[j]);
  }

  // The rotation partner's chunk (l + D/16 for the first half, l - D/16 for the second).
  const int partner = first ? lane + half_chunks : lane - half_chunks;
  uint32_t words[kChunk / 2], other[kChunk / 2];
  static_assert(sizeof(words) == sizeof(y), "8 bf16 values in 4 words");
  memcpy(words, y, sizeof(y));
#pragma unroll
  for (int i = 0; i < kChunk / 2; ++i) other[i] = __shfl_sync(0xffffffffu, words[i], partner & 31);
  if (!mine) return false;
  if (!rotate) {
    memcpy(out, y, sizeof(y));
    return true;
  }
  __nv_bfloat16 z[kChunk];
  memcpy(z, other, sizeof(z));
#pragma unroll
  for (int j = 0; j < kChunk; ++j)
    out[j] = first ? rope_pair::rotate_first(__bfloat162float(y[j]), __bfloat162float(z[j]), cosv[j], sinv[j])
                   : rope_pair::rotate_second(__bfloat162float(z[j]), __bfloat162float(y[j]), cosv[j], sinv[j]);
  return true;
}

// The cache row a k or v head of token t goes to (k_cache + the offset), or -1: its slot is
// outside the cache (or negative) and the row is not written.
__device__ __forceinline__ int64_t qkv_head_cache_offset(const QkvHeads& a, int64_t t, int kv_head) {
  const int64_t slot = a.slots[t];
  return slot >= 0 && slot < a.capacity ? (slot * a.kv_heads + kv_head) * a.dim : -1;
}

// The QkvHeads of qkv_rope_append's arguments (qkv_rope.cu), with the accesses they allow; fails
// on a head dim the kernels do not take.
QkvHeads qkv_heads(const Tensor& q_out, const Tensor& k_cache, const Tensor& v_cache, const Tensor& qkv,
                   const Tensor& positions, const Tensor& cos_sin, const Tensor& slots, const Tensor* q_norm,
                   const Tensor* k_norm, float eps);

}  // namespace detinfer::cuda
