// The rotation of one RoPE pair (elements i and i + D/2 of a head), with the CPU backend's
// roundings: c, s = bf16(table values); y1 = bf16(bf16(x1*c) + bf16(-x2*s)),
// y2 = bf16(bf16(x2*c) + bf16(x1*s)). Shared by the rope kernel (elementwise.cu) and the fused
// q/k/v kernel (qkv_rope.cu) so that both rotate to the same bits.
#pragma once

#include <cuda_bf16.h>

namespace detinfer::cuda::rope_pair {

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// The two halves of the rotation, for kernels where one thread holds only one of them.
__device__ __forceinline__ __nv_bfloat16 rotate_first(float x1, float x2, float cos_f32, float sin_f32) {
  float c = round_bf16(cos_f32), s = round_bf16(sin_f32);
  return __float2bfloat16_rn(round_bf16(x1 * c) + round_bf16(-x2 * s));
}

__device__ __forceinline__ __nv_bfloat16 rotate_second(float x1, float x2, float cos_f32, float sin_f32) {
  float c = round_bf16(cos_f32), s = round_bf16(sin_f32);
  return __float2bfloat16_rn(round_bf16(x2 * c) + round_bf16(x1 * s));
}

__device__ __forceinline__ void rotate(__nv_bfloat16& y1, __nv_bfloat16& y2, float x1, float x2, float cos_f32,
                                       float sin_f32) {
  y1 = rotate_first(x1, x2, cos_f32, sin_f32);
  y2 = rotate_second(x1, x2, cos_f32, sin_f32);
}

}  // namespace detinfer::cuda::rope_pair
