// The CUDA backend's entry points, one per op, each enqueued on the device stream
// (csrc/cuda/runtime.h). Arguments were validated by csrc/ops.cc. Each kernel family lives in its
// own file (rmsnorm.cu, matmul.cu, elementwise.cu, attention.cu, sampling.cu) whose header comment
// states its invariant.
#pragma once

#include "../common/op_list.h"

namespace detinfer::cuda {

// Every op of common/op_list.h.
DETINFER_BACKEND_OPS(DETINFER_DECLARE_OP)

// The matmul kernel family device 0 runs: "wgmma (sm_90a)" or "mma.sync". Its bits differ from
// the other family's, so it is part of what "same architecture, same build" means.
const char* matmul_kernels();

// The prefill attention kernel this process runs now: "wgmma" (sm_90a) or "mma.sync" (elsewhere,
// or forced by setPrefillKernel). Either gives the same bits.
const char* prefill_kernel();

}  // namespace detinfer::cuda
