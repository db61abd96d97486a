// The op set of detinfer. Every op validates its arguments (dtypes, shapes, devices) here, before
// anything is launched, then dispatches to the CPU backend (csrc/cpu) or the CUDA kernels
// (csrc/kernels). On CUDA an op enqueues on the device's stream and returns at once.
//
// The op list, with each op's shapes, is common/op_list.h.
#pragma once

#include <string>
#include <vector>

#include "common/attention_batch.h"
#include "common/op_list.h"
#include "common/tensor.h"
#if defined(DETINFER_STAMPS)
#include "kernels/matmul_sm90.cuh"
#endif

namespace detinfer {

// An uninitialised tensor of `shape` on `device`: host memory, or CUDA memory from csrc/cuda. Its
// storage returns the memory to whichever allocated it.
Tensor make_tensor(Device device, DType dtype, const std::vector<int64_t>& shape);

namespace ops {

// Every op of common/op_list.h (shapes and dtypes are documented there).
DETINFER_BACKEND_OPS(DETINFER_DECLARE_OP)

// dst = src (same dtype and element count, same device)
void copy(Tensor& dst, const Tensor& src);

// Switches matmul, the row reductions and attention to the batch-dependent variant (common/config.h).
void set_variant_kernels(bool enabled);
// Development: how every CUDA decode attention launch streams K and V, "paired", "rotating" or
// "paired3" (three key blocks deep); "auto" restores the library's choice (common/config.h).
void set_decode_pipeline(const std::string& pipeline);
void set_prefill_kernel(const std::string& kernel);
// Development: the keys per attention split (common/config.h); 0 restores the build's. And the
// size in force now.
void set_attention_split_size(int keys);
int attention_split_size_now();
void set_matmul_kernels(const std::string& kernels);
// The matmul kernel family the CUDA device runs: "wgmma (sm_90a)" or "mma.sync" ("none" in a build
// without CUDA). Its bits differ from the other family's, so it is part of what "same
// architecture, same build" means.
const char* cuda_matmul_kernels();
const char* cuda_prefill_kernel();
// Bytes of the CUDA decode attention workspace the process holds (0 in a build without CUDA).
size_t cuda_decode_workspace_bytes();

#if defined(DETINFER_STAMPS)
// Development (cmake -DDETINFER_STAMPS=ON): the descriptions of the last sm_90 matmul launches, by
// slot, and their blocks' timestamps [slots][blocks][events] (matmul_sm90_kernel.cuh), which are
// then cleared; `next` is the sequence number the next launch gets.
using MatmulStampRecord = cuda::sm90::stamps::Record;
void matmul_stamps(std::vector<MatmulStampRecord>& records, std::vector<unsigned long long>& data, long long& next);
#endif

}  // namespace ops
}  // namespace detinfer
