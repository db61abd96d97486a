// PLACEHOLDER: the CUDA kernels of this family are not written yet; each entry throws.
#include "../common/error.h"
#include "cuda_ops.h"

namespace detinfer::cuda {

void embedding(Tensor&, const Tensor&, const Tensor&) { fail("CUDA embedding is not implemented yet"); }
void rope(Tensor&, const Tensor&, const Tensor&) { fail("CUDA rope is not implemented yet"); }
void silu_mul(Tensor&, const Tensor&, const Tensor&) { fail("CUDA silu_mul is not implemented yet"); }
void add(Tensor&, const Tensor&, const Tensor&) { fail("CUDA add is not implemented yet"); }
void cast(Tensor&, const Tensor&) { fail("CUDA cast is not implemented yet"); }

}  // namespace detinfer::cuda
