// qkv_rope_append: one layer's attention inputs from the fused q|k|v projection, in one launch.
//   qkv [T, (heads + 2*kv_heads) * D] bf16: each row holds the q heads, then the k heads, then v
//   q_out[t]         [heads, D]    = rope(norm_q(q heads of row t))
//   k_cache[slot[t]] [kv_heads, D] = rope(norm_k(k heads of row t))
//   v_cache[slot[t]] [kv_heads, D] = v heads of row t
// norm_q / norm_k are Qwen3's per-head RMSNorms (skipped when their weights are null).
// The same bits as rmsnorm over [T*heads, D] and [T*kv_heads, D], rope, then kv_append: the head
// norm is rmsnorm.cu's row code (rmsnorm_row.cuh, one block of norm_row::kThreads threads per head
// row, the same order and tree), and the rotation is the rope kernel's (rope_pair.cuh), applied to
// the norm's bf16 output. Invariant: one block per (token, head row) whatever T is; nothing is
// reduced across rows. A slot outside the cache (or negative) skips the row's cache write, as
// kv_append does; a position outside cos_sin leaves the heads unrotated, as rope does.
// Not reproduced: the variant configuration's split of norm rows when fewer than 4 rows are
// normalized (rmsnorm.cu), since q and k have at least 4 head rows in every supported model.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "cuda_ops.h"
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
  bool vec;                      // 16-byte loads and stores in the norm (never changes its order)
};

// Grid (T, heads + 2*kv_heads): block (t, h) owns head row h of token t. Dynamic shared memory:
// the D bf16 values of the normalized head.
__global__ void __launch_bounds__(norm_row::kThreads) qkv_rope_append_kernel(QkvRopeArgs a) {
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y;
  const int D = a.dim, half = D / 2;
  const int64_t row = static_cast<int64_t>(a.heads + 2 * a.kv_heads) * D;
  const __nv_bfloat16* x = a.qkv + t * row + static_cast<int64_t>(h) * D;
  const int64_t slot = a.slots[t];
  const bool cached = slot >= 0 && slot < a.capacity;
  const bool is_q = h < a.heads, is_k = !is_q && h < a.heads + a.kv_heads;

  if (!is_q && !is_k) {  // a v head: copied to the cache
    if (!cached) return;
    __nv_bfloat16* dst = a.v_cache + (slot * a.kv_heads + (h - a.heads - a.kv_heads)) * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = x[i];
    return;
  }
  if (is_k && !cached) return;  // nothing reads a k row that is not written

  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* y = reinterpret_cast<__nv_bfloat16*>(smem);
  const __nv_bfloat16* w = is_q ? a.q_norm : a.k_norm;
  if (w) {
    const int64_t chunks = (D + norm_row::kChunk - 1) / norm_row::kChunk;
    float sum = norm_row::row_sum_squares(x, D, 0, chunks, a.vec);
    norm_row::normalize_row(y, x, w, D, norm_row::inverse_rms(sum, D, a.eps), a.vec);
  } else {
    for (int i = threadIdx.x; i < D; i += blockDim.x) y[i] = x[i];
  }
  __syncthreads();

  __nv_bfloat16* dst = is_q ? a.q_out + (t * a.heads + h) * D : a.k_cache + (slot * a.kv_heads + (h - a.heads)) * D;
  const int32_t pos = a.positions[t];
  if (pos < 0 || pos >= a.max_pos) {
    for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = y[i];
    return;
  }
  const float* cs = a.cos_sin + static_cast<int64_t>(pos) * D;
  for (int i = threadIdx.x; i < half; i += blockDim.x)
    rope_pair::rotate(dst[i], dst[i + half], __bfloat162float(y[i]), __bfloat162float(y[i + half]), cs[i],
                      cs[half + i]);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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
  a.vec = D % norm_row::kChunk == 0 && aligned16(qkv.data()) && (!q_norm || aligned16(q_norm->data())) &&
          (!k_norm || aligned16(k_norm->data()));
  dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(heads + 2 * kv_heads));
  size_t smem = static_cast<size_t>(D) * sizeof(__nv_bfloat16);
  qkv_rope_append_kernel<<<grid, norm_row::kThreads, smem, static_cast<cudaStream_t>(cuda_runtime::stream())>>>(a);
  CUDA_CHECK_LAUNCH("qkv_rope_append", qkv.describe() + " -> " + q_out.describe());
}

}  // namespace detinfer::cuda
