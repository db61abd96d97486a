// SiLU·mul of one element, bf16(bf16(silu(g)) * u) with silu(g) = g / (1 + expf(-g)) in fp32: the
// one expression of the silu_mul kernels (elementwise.cu) and of the gate/up product's fused
// epilogues (matmul_sm90_kernel.cuh, matmul_tiles.cuh), so all give the same bits.
#pragma once

#include <cuda_bf16.h>

namespace detinfer::cuda {

__device__ __forceinline__ __nv_bfloat16 silu_mul_value(__nv_bfloat16 gate, __nv_bfloat16 up) {
  const float g = __bfloat162float(gate);
  const float silu = g / (1.0f + expf(-g));
  return __float2bfloat16_rn(__bfloat162float(__float2bfloat16_rn(silu)) * __bfloat162float(up));
}

}  // namespace detinfer::cuda
