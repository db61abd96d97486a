// PLACEHOLDER: the CUDA kernels of this family are not written yet; each entry throws.
#include "../common/error.h"
#include "cuda_ops.h"

namespace detinfer::cuda {

void kv_append(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&) { fail("CUDA kv_append is not implemented yet"); }
void attention(Tensor&, const Tensor&, const Tensor&, const Tensor&, const AttentionBatch&, float) { fail("CUDA attention is not implemented yet"); }

}  // namespace detinfer::cuda
