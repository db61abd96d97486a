// The CPU backend: every op in plain C++, with the same fixed reduction orders as the CUDA
// kernels (each output reduced by one loop in ascending index order, never split by batch size).
// Arguments were validated by csrc/ops.cc.
#pragma once

#include "../common/op_list.h"

namespace detinfer::cpu {

// Every op of common/op_list.h.
DETINFER_BACKEND_OPS(DETINFER_DECLARE_OP)

}  // namespace detinfer::cpu
