// One row of RMSNorm, as the rmsnorm kernels (rmsnorm.cu) compute it, for every kernel that
// normalizes rows: one block of kThreads threads per row; thread t owns the 8-element chunks
// c = t, t + kThreads, ... and adds their squares into one fp32 sum in increasing element order;
// the kThreads sums are added by block_sum's fixed tree. A kernel that fuses a norm into other
// work (qkv_rope.cu's Qwen3 head norm) calls these same functions with the same block size, so it
// produces the bits rmsnorm does.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "block_reduce.cuh"

namespace detinfer::cuda::norm_row {

constexpr int kThreads = 256;
constexpr int kChunk = 8;  // elements per 16-byte load

// Loads chunk c of a row (n = number of valid elements, 8 except for a last partial chunk).
__device__ __forceinline__ int load_chunk(const __nv_bfloat16* row, int64_t H, int64_t c, bool vec, float (&v)[kChunk]) {
  int64_t base = c * kChunk;
  int n = H - base < kChunk ? static_cast<int>(H - base) : kChunk;
  if (vec) {
    uint4 raw = *reinterpret_cast<const uint4*>(row + base);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = __bfloat162float(h[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = j < n ? __bfloat162float(row[base + j]) : 0.f;
  }
  return n;
}

// Sum of squares of chunks [c_begin, c_end) of one row, by the block's fixed order and tree.
__device__ inline float row_sum_squares(const __nv_bfloat16* row, int64_t H, int64_t c_begin, int64_t c_end, bool vec) {
  float sum = 0.f;
  for (int64_t c = c_begin + threadIdx.x; c < c_end; c += kThreads) {
    float v[kChunk];
    int n = load_chunk(row, H, c, vec, v);
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      if (j < n) sum = sum + v[j] * v[j];
  }
  return block_sum<kThreads>(sum);
}

// Chunk c of a row from out[0..n): one 16-byte store when `vec`, else element by element.
__device__ __forceinline__ void store_chunk(__nv_bfloat16* row, int64_t c, bool vec, int n,
                                            const __nv_bfloat16 (&out)[kChunk]) {
  if (vec) {
    *reinterpret_cast<uint4*>(row + c * kChunk) = *reinterpret_cast<const uint4*>(out);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      if (j < n) row[c * kChunk + j] = out[j];
  }
}

// One normalized element: v times the row's inverse rms, rounded to bf16, times the weight,
// rounded again. Every kernel that normalizes rows computes each element with this.
__device__ __forceinline__ __nv_bfloat16 normalized(float v, float inv, float w) {
  return __float2bfloat16_rn(__bfloat162float(__float2bfloat16_rn(v * inv)) * w);
}

__device__ inline void normalize_row(__nv_bfloat16* y, const __nv_bfloat16* x, const __nv_bfloat16* w, int64_t H,
                              float inv, bool vec) {
  int64_t chunks = (H + kChunk - 1) / kChunk;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    float v[kChunk], wv[kChunk];
    int n = load_chunk(x, H, c, vec, v);
    load_chunk(w, H, c, vec, wv);
    __nv_bfloat16 out[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      out[j] = normalized(v[j], inv, wv[j]);
    store_chunk(y, c, vec, n, out);
  }
}

__device__ __forceinline__ float inverse_rms(float sum, int64_t H, float eps) {
  float mean = sum / static_cast<float>(H);
  return 1.0f / sqrtf(mean + eps);
}

}  // namespace detinfer::cuda::norm_row
