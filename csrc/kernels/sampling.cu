// PLACEHOLDER: the CUDA kernels of this family are not written yet; each entry throws.
#include "../common/error.h"
#include "cuda_ops.h"

namespace detinfer::cuda {

void log_softmax(Tensor&, const Tensor&) { fail("CUDA log_softmax is not implemented yet"); }
void argmax(Tensor&, const Tensor&) { fail("CUDA argmax is not implemented yet"); }
void token_logprobs(Tensor&, const Tensor&, const Tensor&) { fail("CUDA token_logprobs is not implemented yet"); }

}  // namespace detinfer::cuda
