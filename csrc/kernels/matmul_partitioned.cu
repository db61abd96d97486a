// The row-parallel product of tensor parallelism (common/partitions.h), on CUDA:
//   matmul_partials:    partials f32 [Q,M,N], one launch of matmul.cu's tiled kernel whose
//                       blockIdx.z is the partition (matmul_k_partitions);
//   combine_partials:   out[M,N] = ((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7)) (+ bias), one thread per
//                       element;
//   matmul_partitioned: both, through a stream-ordered fp32 workspace [8,M,N].
//
// Invariant: K is cut into 8 equal contiguous partitions (K/8 a multiple of 16) whatever the TP
// degree; partition p of an output element is ONE fp32 accumulator receiving the k16 steps of its
// range in ascending order (the plain matmul's chain, restricted to the range); the 8 partials
// are added by the fixed tree in fp32, then the bias, then one rounding. No float atomics; the
// tiles may follow M, the partition ranges, the chains and the tree never do. A TP rank calls
// matmul_partials on its K columns with Q = 8/TP: its partials are the one-device partials.
// Variant (variant_kernels()): combine_partials adds the partials as ordinary tensor parallelism
// would, in a way that follows `ranks`: per-rank subtotals in sequence, rounded to bf16 (a rank's
// row-parallel output), then summed over the ranks in ring order from rank 1 (an NCCL all-reduce).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../common/config.h"
#include "../common/partitions.h"
#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "cuda_ops.h"
#include "device_buffer.cuh"
#include "matmul.cuh"

namespace detinfer::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void combine_partials_kernel(void* out, bool out_f32, const float* ws, const __nv_bfloat16* bias,
                                        int64_t MN, int N, int ranks, bool ring) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < MN;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* p = ws + i;
    float v;
    if (!ring) {
      v = partitions::tree8(p[0], p[MN], p[2 * MN], p[3 * MN], p[4 * MN], p[5 * MN], p[6 * MN], p[7 * MN]);
    } else {
      const int per = static_cast<int>(partitions::kPartitions) / ranks;
      v = 0.f;
      for (int k = 0; k < ranks; ++k) {
        const int r = (1 + k) % ranks;
        float subtotal = p[static_cast<int64_t>(r * per) * MN];
        for (int j = 1; j < per; ++j) subtotal = subtotal + p[static_cast<int64_t>(r * per + j) * MN];
        subtotal = __bfloat162float(__float2bfloat16_rn(subtotal));  // a rank's output, exchanged in bf16
        v = k == 0 ? subtotal : v + subtotal;
      }
    }
    if (bias) v = v + __bfloat162float(bias[i % N]);
    if (out_f32) {
      static_cast<float*>(out)[i] = v;
    } else {
      static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
    }
  }
}

void combine(Tensor& out, const float* partials, const Tensor* bias, int ranks) {
  const int64_t MN = out.dim(0) * out.dim(1);
  if (MN == 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_runtime::stream());
  const int blocks = static_cast<int>(std::min<int64_t>((MN + kThreads - 1) / kThreads, 4096));
  combine_partials_kernel<<<blocks, kThreads, 0, stream>>>(out.data(), out.dtype == DType::F32, partials,
                                                           bias ? bias->ptr<__nv_bfloat16>() : nullptr, MN,
                                                           static_cast<int>(out.dim(1)), ranks, variant_kernels());
  CUDA_CHECK_LAUNCH("combine_partials", "[M=" + std::to_string(out.dim(0)) + ", N=" + std::to_string(out.dim(1)) + "]");
}

}  // namespace

void matmul_partials(Tensor& partials, const Tensor& a, const Tensor& w) {
  matmul_k_partitions(partials.ptr<float>(), a, w, static_cast<int>(partials.dim(0)));
}

void combine_partials(Tensor& out, const Tensor& partials, const Tensor* bias, int ranks) {
  combine(out, partials.ptr<float>(), bias, ranks);
}

void matmul_partitioned(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias) {
  const int64_t M = a.dim(0), N = w.dim(0);
  if (M == 0 || N == 0) return;
  DeviceBuffer workspace(static_cast<size_t>(partitions::kPartitions * M * N) * sizeof(float));
  float* partials = static_cast<float*>(workspace.data());
  matmul_k_partitions(partials, a, w, static_cast<int>(partitions::kPartitions));
  combine(out, partials, bias, 1);
}

}  // namespace detinfer::cuda
