// The CUDA backend's entry points, one per op, each enqueued on the device stream
// (csrc/cuda/runtime.h). Arguments were validated by csrc/ops.cc. Each kernel family lives in its
// own file (rmsnorm.cu, matmul.cu, elementwise.cu, attention.cu, sampling.cu) whose header comment
// states its invariant.
#pragma once

#include "../ops.h"

namespace detinfer::cuda {

void embedding(Tensor& out, const Tensor& table, const Tensor& ids);
void rmsnorm(Tensor& out, const Tensor& x, const Tensor& w, float eps);
void add_rmsnorm(Tensor& out, Tensor& residual, const Tensor& x, const Tensor& w, float eps);
void matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias);
// The matmul kernel family device 0 runs: "wgmma (sm_90a)" or "mma.sync". Its bits differ from
// the other family's, so it is part of what "same architecture, same build" means.
const char* matmul_kernels();
void rope(Tensor& x, const Tensor& positions, const Tensor& cos_sin);
void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up);
void add(Tensor& out, const Tensor& a, const Tensor& b);
void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, const Tensor& slots);
void attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
               const AttentionBatch& batch, float scale);
void log_softmax(Tensor& out, const Tensor& x);
void argmax(Tensor& out, const Tensor& x);
void token_logprobs(Tensor& out, const Tensor& x, const Tensor& ids);
void choose_tokens(Tensor& out, const Tensor& x, const Tensor& params);
void cast(Tensor& dst, const Tensor& src);

}  // namespace detinfer::cuda
