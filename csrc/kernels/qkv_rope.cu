// qkv_rope_append: one layer's attention inputs from the fused q|k|v projection, in one launch.
//   qkv [T, (heads + 2*kv_heads) * D] bf16: each row holds the q heads, then the k heads, then v
//   q_out[t]         [heads, D]    = rope(norm_q(q heads of row t))
//   k_cache[slot[t]] [kv_heads, D] = rope(norm_k(k heads of row t))
//   v_cache[slot[t]] [kv_heads, D] = v heads of row t
// norm_q / norm_k are Qwen3's per-head RMSNorms (skipped when their weights are null).
// The same bits as rmsnorm over [T*heads, D] and [T*kv_heads, D], rope, then kv_append: the head
// norm is rmsnorm.cu's row code (rmsnorm_row.cuh: the same chunks, order and tree, computed by one
// warp per head row, see the kernel), and the rotation is the rope kernel's (rope_pair.cuh),
// applied to the norm's bf16 output. Invariant: one warp per (token, head row) whatever T is;
// nothing is reduced across rows. A slot outside the cache (or negative) skips the row's cache
// write, as kv_append does; a position outside cos_sin leaves the heads unrotated, as rope does.
// Not reproduced: the variant configuration's split of norm rows when fewer than 4 rows are
// normalized (rmsnorm.cu), since q and k have at least 4 head rows in every supported model.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "cuda_ops.h"
#include "pdl.cuh"
#include "rmsnorm_row.cuh"
#include "rope_pair.cuh"

namespace detinfer::cuda {
namespace {

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

// One warp per head row: W head rows of one token per block (blockDim.x = 32 W), grid
// (T, ceil((heads + 2*kv_heads) / W)); W is 2 for a few tokens, so that their heads spread over
// more SMs, and 8 otherwise. Lane l holds 8-element chunk l of the head (D <= 256,
// D a multiple of 16, so that chunk l's rotation partner is the whole chunk l +- D/16).
// The head norm's sum of squares is rmsnorm's: in the norm's block of norm_row::kThreads threads,
// thread t < D/8 owns chunk t (the rest own none) and adds its 8 squares in element order; the
// block tree is warp 0's xor-shuffle, then a second round over the per-warp sums in which every
// other warp gives +0.0. Lane l here adds the same squares in the same order and runs the same
// shuffle; the second round is left out, since adding +0.0 to a sum of squares changes no bit.
constexpr int kMaxWarps = 8;

// Chunk c of a head as it is stored (bit for bit, NaN payloads included).
__device__ __forceinline__ void load_raw(const __nv_bfloat16* x, int c, bool vec,
                                         __nv_bfloat16 (&r)[norm_row::kChunk]) {
  if (vec) {
    const uint4 q = *reinterpret_cast<const uint4*>(x + c * norm_row::kChunk);
    memcpy(r, &q, sizeof(q));
  } else {
#pragma unroll
    for (int j = 0; j < norm_row::kChunk; ++j) r[j] = x[c * norm_row::kChunk + j];
  }
}

__global__ void __launch_bounds__(kMaxWarps * 32) qkv_rope_append_kernel(QkvRopeArgs a) {
  pdl_start_small_batch();  // one block per row (token)
  using norm_row::kChunk;
  const int64_t t = blockIdx.x;
  const int h = static_cast<int>(blockIdx.y * (blockDim.x / 32) + threadIdx.x / 32);
  const int lane = threadIdx.x % 32;
  const int D = a.dim, chunks = D / kChunk, half_chunks = chunks / 2;
  if (h >= a.heads + 2 * a.kv_heads) return;
  const int64_t row = static_cast<int64_t>(a.heads + 2 * a.kv_heads) * D;
  const __nv_bfloat16* x = a.qkv + t * row + static_cast<int64_t>(h) * D;
  const int64_t slot = a.slots[t];
  const bool cached = slot >= 0 && slot < a.capacity;
  const bool is_q = h < a.heads, is_k = !is_q && h < a.heads + a.kv_heads;
  const bool mine = lane < chunks;  // this lane's chunk exists

  if (!is_q && !is_k) {  // a v head: copied to the cache
    if (!cached || !mine) return;
    __nv_bfloat16* dst = a.v_cache + (slot * a.kv_heads + (h - a.heads - a.kv_heads)) * D;
    __nv_bfloat16 v[kChunk];
    load_raw(x, lane, a.vec, v);
    norm_row::store_chunk(dst, lane, a.vec, kChunk, v);
    return;
  }
  if (is_k && !cached) return;  // nothing reads a k row that is not written (the whole warp leaves)

  // Every load first (the head, the norm's weights, the rotation's cos and sin), so that their
  // latencies overlap. Element i of the first half pairs with i + D/2: cos at cs[i], sin at cs[D/2 + i].
  const bool first = lane < half_chunks;
  const int half = D / 2, i0 = (first ? lane : lane - half_chunks) * kChunk;
  const int32_t pos = a.positions[t];
  const bool rotate = pos >= 0 && pos < a.max_pos;
  __nv_bfloat16 y[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) y[j] = __float2bfloat16_rn(0.f);
  if (mine) load_raw(x, lane, a.vec, y);
  const __nv_bfloat16* w = is_q ? a.q_norm : a.k_norm;
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

  // The head's values after the norm (the norm's bf16 output; the input itself without a norm),
  // 8 per lane.
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
      for (int j = 0; j < kChunk; ++j)
        y[j] = norm_row::normalized(xv[j], inv, wv[j]);
  }

  // The rotation partner's chunk (l + D/16 for the first half, l - D/16 for the second).
  const int partner = first ? lane + half_chunks : lane - half_chunks;
  uint32_t words[kChunk / 2], other[kChunk / 2];
  static_assert(sizeof(words) == sizeof(y), "8 bf16 values in 4 words");
  memcpy(words, y, sizeof(y));
#pragma unroll
  for (int i = 0; i < kChunk / 2; ++i) other[i] = __shfl_sync(0xffffffffu, words[i], partner & 31);
  if (!mine) return;
  __nv_bfloat16 z[kChunk];
  memcpy(z, other, sizeof(z));

  __nv_bfloat16* dst = is_q ? a.q_out + (t * a.heads + h) * D : a.k_cache + (slot * a.kv_heads + (h - a.heads)) * D;
  if (!rotate) {
    norm_row::store_chunk(dst, lane, a.vec, kChunk, y);
    return;
  }
  __nv_bfloat16 out[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j)
    out[j] = first ? rope_pair::rotate_first(__bfloat162float(y[j]), __bfloat162float(z[j]), cosv[j], sinv[j])
                   : rope_pair::rotate_second(__bfloat162float(z[j]), __bfloat162float(y[j]), cosv[j], sinv[j]);
  norm_row::store_chunk(dst, lane, a.vec, kChunk, out);
}

}  // namespace

void qkv_rope_append(Tensor& q_out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& positions,
                     const Tensor& cos_sin, const Tensor& slots, const Tensor* q_norm, const Tensor* k_norm,
                     float eps) {
  const int64_t T = q_out.dim(0);
  const int heads = static_cast<int>(q_out.dim(1)), kv_heads = static_cast<int>(k_cache.dim(2));
  const int D = static_cast<int>(q_out.dim(2));
  if (T == 0) return;
  DI_CHECK(T <= 0x7fffffff, "qkv_rope_append: too many tokens (", T, ")");
  QkvRopeArgs a{};
  a.q_out = q_out.ptr<__nv_bfloat16>();
  a.k_cache = k_cache.ptr<__nv_bfloat16>();
  a.v_cache = v_cache.ptr<__nv_bfloat16>();
  a.qkv = qkv.ptr<__nv_bfloat16>();
  a.positions = positions.ptr<int32_t>();
  a.slots = slots.ptr<int32_t>();
  a.cos_sin = cos_sin.ptr<float>();
  a.q_norm = q_norm ? q_norm->ptr<__nv_bfloat16>() : nullptr;
  a.k_norm = k_norm ? k_norm->ptr<__nv_bfloat16>() : nullptr;
  a.capacity = k_cache.dim(0) * k_cache.dim(1);
  a.max_pos = cos_sin.dim(0);
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.dim = D;
  a.eps = eps;
  // As rmsnorm.cu decides: 16-byte accesses when the row and every pointer allow them.
  a.vec = D % norm_row::kChunk == 0 && aligned16(qkv.data()) && aligned16(q_out.data()) && aligned16(k_cache.data()) &&
          aligned16(v_cache.data()) && (!q_norm || aligned16(q_norm->data())) && (!k_norm || aligned16(k_norm->data()));
  DI_CHECK(D % 16 == 0 && D <= 256,
           "qkv_rope_append: the CUDA kernel takes head dims that are multiples of 16 up to 256 but received ", D);
  a.vec_table = aligned16(cos_sin.data());  // rows of D floats, D a multiple of 16
  const int warps = T <= 16 ? 2 : kMaxWarps;
  dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((heads + 2 * kv_heads + warps - 1) / warps));
  launch_overlapped(qkv_rope_append_kernel, grid, warps * 32, 0, static_cast<cudaStream_t>(cuda_runtime::stream()), a);
  CUDA_CHECK_LAUNCH("qkv_rope_append", qkv.describe() + " -> " + q_out.describe());
}

}  // namespace detinfer::cuda
