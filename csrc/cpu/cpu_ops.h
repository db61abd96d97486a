// The CPU backend: every op in plain C++, with the same fixed reduction orders as the CUDA
// kernels (each output reduced by one loop in ascending index order, never split by batch size).
// Arguments were validated by csrc/ops.cc.
#pragma once

#include "../ops.h"

namespace detinfer::cpu {

void embedding(Tensor& out, const Tensor& table, const Tensor& ids);
void rmsnorm(Tensor& out, const Tensor& x, const Tensor& w, float eps);
void add_rmsnorm(Tensor& out, Tensor& residual, const Tensor& x, const Tensor& w, float eps);
void matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias);
void rope(Tensor& x, const Tensor& positions, const Tensor& cos_sin);
void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up);
void silu_mul_packed(Tensor& out, const Tensor& gate_up);
void add(Tensor& out, const Tensor& a, const Tensor& b);
void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, const Tensor& slots);
void qkv_rope_append(Tensor& q_out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& positions,
                     const Tensor& cos_sin, const Tensor& slots, const Tensor* q_norm, const Tensor* k_norm,
                     float eps);
void attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
               const AttentionBatch& batch, float scale);
void log_softmax(Tensor& out, const Tensor& x);
void argmax(Tensor& out, const Tensor& x);
void token_logprobs(Tensor& out, const Tensor& x, const Tensor& ids);
void choose_tokens(Tensor& out, const Tensor& x, const Tensor& params);
void cast(Tensor& dst, const Tensor& src);

// Row functions shared by the ops that fuse them (qkv_rope.cc), so fused and separate ops give the
// same bits. rmsnorm_row: y[0..H) = rmsnorm(x[0..H)) as rmsnorm computes it in a tensor of `rows`
// rows (the variant's split depends on the row count). rope_head: one head v[0..D) rotated in
// place as rope rotates it, cs being the table row of its position.
void rmsnorm_row(uint16_t* y, const uint16_t* x, const uint16_t* w, int64_t hidden, int64_t rows, float eps);
void rope_head(uint16_t* v, const float* cs, int64_t dim);

}  // namespace detinfer::cpu
