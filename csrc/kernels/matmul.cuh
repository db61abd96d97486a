// Development access to the matmul configurations production uses (csrc/dev/matmul.cu): run one
// of them by index, with `splits` K ranges combined in order through a workspace (1: the
// invariant path's single chain). The library holds only the configurations its choice
// (matmul_config, sm90::production_config) can return; the harness instantiates the others it
// explores itself, from matmul_tiles.cuh and matmul_sm90_kernel.cuh. Library code calls
// cuda::matmul only.
#pragma once

#include <cstdint>

#include "../common/tensor.h"

namespace detinfer::cuda::matmul_dev {

// Which family this device runs: the wgmma kernels (Hopper with sm_90a code in the build) or the
// mma.sync ones. The configurations below are that family's.
bool wgmma();
// Development only: run the mma.sync family even where the wgmma one is available.
void force_mma_sync(bool on);
int config_count();
const char* config_name(int config);
int production_config(int64_t M, int64_t N, int64_t K);  // the configuration matmul() uses
void matmul_with_config(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias, int config,
                        int splits = 1);

}  // namespace detinfer::cuda::matmul_dev

namespace detinfer::cuda {

// The K partitions of the row-parallel product (matmul_partitioned.cu): partials f32 [Q, M, N] =
// the product over each of Q equal ranges of K (K/Q a multiple of 16), each as the plain matmul's
// chain over its range (ascending k16 steps, one fp32 accumulator), in one launch whose
// blockIdx.z is the partition. The wgmma kernels when K/Q is a multiple of their 64-column tile
// (their copies do not stop inside a tile), the mma.sync kernels otherwise (they zero-fill past
// the range's end); the choice follows K/Q only.
void matmul_k_partitions(float* partials, const Tensor& a, const Tensor& w, int partitions);

}  // namespace detinfer::cuda
