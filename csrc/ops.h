// The op set of detinfer. Every op validates its arguments (dtypes, shapes, devices) here, before
// anything is launched, then dispatches to the CPU backend (csrc/cpu) or the CUDA kernels
// (csrc/kernels). On CUDA an op enqueues on the device's stream and returns at once.
//
// Shapes use T for tokens (rows), H for hidden size, V for vocabulary, D for head dim.
#pragma once

#include "common/tensor.h"

namespace detinfer {

// Per-launch description of a ragged batch of sequences for attention. Sequence b owns query rows
// [query_start[b], query_start[b+1]); its queries are the last rows of its context, so query i of
// a sequence with n queries sits at position seq_lens[b] - n + i and sees keys 0..that position.
struct AttentionBatch {
  Tensor block_tables;  // i32 [B, max_blocks_per_seq], physical block of each logical block
  Tensor query_start;   // i32 [B+1]
  Tensor seq_lens;      // i32 [B], keys in the cache for each sequence once this step is written
  int max_query_len = 0;
  int max_seq_len = 0;
};

namespace ops {

// out[T,H] = table[ids[t], :]  (any dtype; table [V,H], ids i32 [T]). Also gathers rows.
void embedding(Tensor& out, const Tensor& table, const Tensor& ids);
// out[r,:] = x[r,:] * rsqrt(mean(x[r,:]^2) + eps) * w   x,out [R,H] bf16, w [H] bf16
void rmsnorm(Tensor& out, const Tensor& x, const Tensor& w, float eps);
// residual = residual + x (bf16), then out = rmsnorm(residual)
void add_rmsnorm(Tensor& out, Tensor& residual, const Tensor& x, const Tensor& w, float eps);
// out[M,N] = a[M,K] · w[N,K]^T (+ bias[N])   bf16 in, fp32 accumulate, out bf16 or f32
void matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias);
// x [T, heads, D] bf16 rotated in place (rotate-half); positions i32 [T];
// cos_sin f32 [max_pos, D]: cos of the D/2 frequencies, then their sin
void rope(Tensor& x, const Tensor& positions, const Tensor& cos_sin);
// out = silu(gate) * up   all bf16 [T, I]
void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up);
// out = a + b   bf16, same shape
void add(Tensor& out, const Tensor& a, const Tensor& b);
// k_cache/v_cache [blocks, block_size, kv_heads, D] bf16; k,v [T, kv_heads, D]; slots i32 [T]
// (slot = block * block_size + offset; a negative slot skips the row)
void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, const Tensor& slots);
// out,q [T, heads, D] bf16; causal attention over the paged cache, fixed split size (kernels/attention.h)
void attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
               const AttentionBatch& batch, float scale);
// out[r,:] = x[r,:] - logsumexp(x[r,:])   f32 [R,V]
void log_softmax(Tensor& out, const Tensor& x);
// out[r] = argmax_v x[r,v], lowest index on ties   x f32 [R,V], out i32 [R]
void argmax(Tensor& out, const Tensor& x);
// out[r] = x[r, ids[r]] - logsumexp(x[r,:])   x f32 [R,V], ids i32 [R], out f32 [R]
void token_logprobs(Tensor& out, const Tensor& x, const Tensor& ids);
// The output head's token choice (common/token_choice.h): for each row of logits x f32 [R,V] and
// its parameters params i32 [R, choice::kParams], out i32 [R, 2 + 2N] receives the chosen id, its
// log-prob (f32 bits), the N most likely ids and their log-probs (N <= choice::kMaxTopLogprobs).
void choose_tokens(Tensor& out, const Tensor& x, const Tensor& params);
// dst = src (same dtype and element count, same device)
void copy(Tensor& dst, const Tensor& src);
// dst = src converted between f32, bf16 and f16 (same device, same element count)
void cast(Tensor& dst, const Tensor& src);

}  // namespace ops
}  // namespace detinfer
