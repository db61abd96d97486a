// Used when the package is built without CUDA: every CUDA entry point says so.
#include "runtime.h"

#include "../common/error.h"
#include "../kernels/cuda_ops.h"

namespace detinfer::cuda_runtime {

static const char* kReason =
    "this build of detinfer has no CUDA backend (nvcc was not found, or DETINFER_CUDA=OFF, when it "
    "was compiled); reinstall with CUDA's nvcc on PATH, or use device: 'cpu'";

Status status() { return Status{false, false, kReason, "", 0, 0, {}}; }
void require() { fail("CUDA device requested but ", kReason); }
void* alloc(size_t) { require(); return nullptr; }
void free(void*) noexcept {}
void upload(void*, const void*, size_t) { require(); }
void download(void*, const void*, size_t) { require(); }
void copy_async(void*, const void*, size_t) { require(); }
void synchronize() { require(); }
void* stream() { require(); return nullptr; }

}  // namespace detinfer::cuda_runtime

// The CUDA ops cannot be reached without a CUDA tensor, which cannot be made; they still must link.
namespace detinfer::cuda {
void embedding(Tensor&, const Tensor&, const Tensor&) { cuda_runtime::require(); }
void rmsnorm(Tensor&, const Tensor&, const Tensor&, float) { cuda_runtime::require(); }
void add_rmsnorm(Tensor&, Tensor&, const Tensor&, const Tensor&, float) { cuda_runtime::require(); }
void matmul(Tensor&, const Tensor&, const Tensor&, const Tensor*) { cuda_runtime::require(); }
const char* matmul_kernels() { return "none"; }
void rope(Tensor&, const Tensor&, const Tensor&) { cuda_runtime::require(); }
void silu_mul(Tensor&, const Tensor&, const Tensor&) { cuda_runtime::require(); }
void add(Tensor&, const Tensor&, const Tensor&) { cuda_runtime::require(); }
void kv_append(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&) { cuda_runtime::require(); }
void attention(Tensor&, const Tensor&, const Tensor&, const Tensor&, const AttentionBatch&, float) {
  cuda_runtime::require();
}
void log_softmax(Tensor&, const Tensor&) { cuda_runtime::require(); }
void argmax(Tensor&, const Tensor&) { cuda_runtime::require(); }
void token_logprobs(Tensor&, const Tensor&, const Tensor&) { cuda_runtime::require(); }
void choose_tokens(Tensor&, const Tensor&, const Tensor&) { cuda_runtime::require(); }
void cast(Tensor&, const Tensor&) { cuda_runtime::require(); }
}  // namespace detinfer::cuda
