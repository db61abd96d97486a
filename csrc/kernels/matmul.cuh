// Development access to the matmul configurations (csrc/dev/matmul.cu): run one tile
// configuration by index, with `splits` K ranges combined in order through a workspace (1: the
// invariant path's single chain). Library code calls cuda::matmul only.
#pragma once

#include <cstdint>

#include "../common/tensor.h"

namespace detinfer::cuda::matmul_dev {

int config_count();
const char* config_name(int config);
int production_config(int64_t M, int64_t N, int64_t K);  // the configuration matmul() uses
void matmul_with_config(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias, int config,
                        int splits = 1);

}  // namespace detinfer::cuda::matmul_dev
