// Stands in for the CUDA kernels when the package is built without CUDA. They cannot be reached
// without a CUDA tensor, which such a build cannot make (cuda/runtime_stub.cc), but they must link.
#include "../cuda/runtime.h"
#include "cuda_ops.h"

namespace detinfer::cuda {

#define DETINFER_STUB_OP(name, params) \
  void name params { cuda_runtime::require(); }
DETINFER_BACKEND_OPS(DETINFER_STUB_OP)
#undef DETINFER_STUB_OP

const char* matmul_kernels() { return "none"; }
const char* prefill_kernel() { return "none"; }
size_t decode_workspace_bytes() { return 0; }

}  // namespace detinfer::cuda
