// qkv_rope_append: one layer's attention inputs from the fused q|k|v projection, in one launch.
//   qkv [T, (heads + 2*kv_heads) * D] bf16: each row holds the q heads, then the k heads, then v
//   q_out[t]         [heads, D]    = rope(norm_q(q heads of row t))
//   k_cache[slot[t]] [kv_heads, D] = rope(norm_k(k heads of row t))
//   v_cache[slot[t]] [kv_heads, D] = v heads of row t
// norm_q / norm_k are Qwen3's per-head RMSNorms (skipped when their weights are null).
// The same bits as rmsnorm over [T*heads, D] and [T*kv_heads, D], rope, then kv_append: each head
// row is qkv_row::head_chunk's (qkv_rope_row.cuh: rmsnorm.cu's row code, computed by one warp per
// head row, and the rope kernel's rotation), which decode attention also runs for its own rows
// when it takes the q|k|v product itself (qkv_rope_attention, attention.cu). Invariant: one warp
// per (token, head row) whatever T is; nothing is reduced across rows. A slot outside the cache (or negative) skips the row's cache
// write, as kv_append does; a position outside cos_sin leaves the heads unrotated, as rope does.
// Not reproduced: the variant configuration's split of norm rows when fewer than 4 rows are
// normalized (rmsnorm.cu), since q and k have at least 4 head rows in every supported model.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "cuda_ops.h"
#include "pdl.cuh"
#include "qkv_rope_row.cuh"

namespace detinfer::cuda {
namespace {

// One warp per head row: W head rows of one token per block (blockDim.x = 32 W), grid
// (T, ceil((heads + 2*kv_heads) / W)); W is 2 for a few tokens, so that their heads spread over
// more SMs, and 8 otherwise.
constexpr int kMaxWarps = 8;

__global__ void __launch_bounds__(kMaxWarps * 32) qkv_rope_append_kernel(QkvRopeArgs a) {
  pdl_start_small_batch();  // one block per row (token)
  const int64_t t = blockIdx.x;
  const int h = static_cast<int>(blockIdx.y * (blockDim.x / 32) + threadIdx.x / 32);
  const int lane = threadIdx.x % 32;
  if (h >= a.heads + 2 * a.kv_heads) return;
  const int64_t slot = a.slots[t];
  const bool cached = slot >= 0 && slot < a.capacity;
  const bool is_q = h < a.heads, is_k = !is_q && h < a.heads + a.kv_heads;
  if (!is_q && !cached) return;  // nothing reads a k or v row that is not written (the whole warp leaves)
  qkv_row::RowConstants c;
  qkv_row::row_constants(a, t, h, lane, c);
  __nv_bfloat16 out[qkv_row::kChunk];
  if (!qkv_row::head_chunk(a, t, h, lane, c, out)) return;
  __nv_bfloat16* dst = is_q   ? a.q_out + (t * a.heads + h) * a.dim
                       : is_k ? a.k_cache + (slot * a.kv_heads + (h - a.heads)) * a.dim
                              : a.v_cache + (slot * a.kv_heads + (h - a.heads - a.kv_heads)) * a.dim;
  norm_row::store_chunk(dst, lane, a.vec, qkv_row::kChunk, out);
}

}  // namespace

QkvRopeArgs qkv_rope_args(Tensor* q_out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& positions,
                          const Tensor& cos_sin, const Tensor& slots, const Tensor* q_norm, const Tensor* k_norm,
                          float eps) {
  QkvRopeArgs a{};
  const int D = static_cast<int>(k_cache.dim(3));
  a.q_out = q_out ? q_out->ptr<__nv_bfloat16>() : nullptr;
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
  a.heads = static_cast<int>(qkv.dim(1) / D) - 2 * static_cast<int>(k_cache.dim(2));
  a.kv_heads = static_cast<int>(k_cache.dim(2));
  a.dim = D;
  a.eps = eps;
  // As rmsnorm.cu decides: 16-byte accesses when the row and every pointer allow them.
  a.vec = D % norm_row::kChunk == 0 && aligned16(qkv.data()) && (!q_out || aligned16(q_out->data())) &&
          aligned16(k_cache.data()) && aligned16(v_cache.data()) && (!q_norm || aligned16(q_norm->data())) &&
          (!k_norm || aligned16(k_norm->data()));
  DI_CHECK(D % 16 == 0 && D <= 256,
           "qkv_rope_append: the CUDA kernel takes head dims that are multiples of 16 up to 256 but received ", D);
  a.vec_table = aligned16(cos_sin.data());  // rows of D floats, D a multiple of 16
  return a;
}

void qkv_rope_append(Tensor& q_out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& positions,
                     const Tensor& cos_sin, const Tensor& slots, const Tensor* q_norm, const Tensor* k_norm,
                     float eps) {
  const int64_t T = q_out.dim(0);
  if (T == 0) return;
  DI_CHECK(T <= 0x7fffffff, "qkv_rope_append: too many tokens (", T, ")");
  const QkvRopeArgs a = qkv_rope_args(&q_out, k_cache, v_cache, qkv, positions, cos_sin, slots, q_norm, k_norm, eps);
  const int warps = T <= 16 ? 2 : kMaxWarps;
  dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((a.heads + 2 * a.kv_heads + warps - 1) / warps));
  launch_overlapped(qkv_rope_append_kernel, grid, warps * 32, 0, static_cast<cudaStream_t>(cuda_runtime::stream()), a);
  CUDA_CHECK_LAUNCH("qkv_rope_append", qkv.describe() + " -> " + q_out.describe());
}

}  // namespace detinfer::cuda
