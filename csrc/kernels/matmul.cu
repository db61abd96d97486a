// PLACEHOLDER: the CUDA kernels of this family are not written yet; each entry throws.
#include "../common/error.h"
#include "cuda_ops.h"

namespace detinfer::cuda {

void matmul(Tensor&, const Tensor&, const Tensor&, const Tensor*) { fail("CUDA matmul is not implemented yet"); }

}  // namespace detinfer::cuda
