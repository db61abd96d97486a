// The CPU backend: every op in plain C++, with the same fixed reduction orders as the CUDA
// kernels (each output reduced by one loop in ascending index order, never split by batch size).
// Arguments were validated by csrc/ops.cc.
#pragma once

#include "../common/op_list.h"

namespace detinfer::cpu {

// Every op of common/op_list.h.
DETINFER_BACKEND_OPS(DETINFER_DECLARE_OP)

// Row functions shared by the ops that fuse them (qkv_rope.cc), so fused and separate ops give the
// same bits. rmsnorm_row: y[0..H) = rmsnorm(x[0..H)) as rmsnorm computes it in a tensor of `rows`
// rows (the variant's split depends on the row count). rope_head: one head v[0..D) rotated in
// place as rope rotates it, cs being the table row of its position.
void rmsnorm_row(uint16_t* y, const uint16_t* x, const uint16_t* w, int64_t hidden, int64_t rows, float eps);
void rope_head(uint16_t* v, const float* cs, int64_t dim);

}  // namespace detinfer::cpu
