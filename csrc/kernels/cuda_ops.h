// The CUDA backend's entry points, one per op, each enqueued on the device stream
// (csrc/cuda/runtime.h). Arguments were validated by csrc/ops.cc. Each kernel family lives in its
// own file (rmsnorm.cu, matmul.cu, elementwise.cu, attention.cu, sampling.cu) whose header comment
// states its invariant.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/op_list.h"

namespace detinfer::cuda {

// Whether p starts on a 16-byte boundary (the kernels' vector loads and stores need it).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every op of common/op_list.h.
DETINFER_BACKEND_OPS(DETINFER_DECLARE_OP)

// norm_matmul's unfused norm (rmsnorm.cu): with x, residual_out = residual_in + x and out =
// rmsnorm(residual_out); without, out = rmsnorm(residual_in). residual_out may be residual_in.
void add_rmsnorm_to(Tensor& out, Tensor& residual_out, const Tensor& residual_in, const Tensor* x, const Tensor& w,
                    float eps);

// The matmul kernel family device 0 runs: "wgmma (sm_90a)" or "mma.sync". Its bits differ from
// the other family's, so it is part of what "same architecture, same build" means.
const char* matmul_kernels();

// The prefill attention kernel this process runs now: "wgmma" (sm_90a) or "mma.sync" (elsewhere,
// or forced by setPrefillKernel). Either gives the same bits.
const char* prefill_kernel();

// Bytes of the decode attention workspace this process holds (attention.cu), which a decode launch
// takes when the caller's workspace cannot hold its partials (or it has none): grown, never
// released. 0 before the first such launch. A CUDA graph may not capture a launch that takes it
// (attention fails instead), since a later launch that grows it frees the memory the graph would
// write: models give their own workspace (lib/model/transformer.ts), sized for their largest
// captured step.
size_t decode_workspace_bytes();

}  // namespace detinfer::cuda
