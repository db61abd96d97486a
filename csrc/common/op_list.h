// The op list: every op that both backends implement, with its parameters and shapes, written once.
// It is expanded into
//   - detinfer::ops   (ops.h: validation, then dispatch to a backend),
//   - detinfer::cpu   (cpu/cpu_ops.h: the CPU backend),
//   - detinfer::cuda  (kernels/cuda_ops.h: the CUDA kernels, and kernels/cuda_ops_stub.cc, which
//                      stands in for them in a build without CUDA).
// The binding (binding/ops_binding.cc) exposes op `snake_name` to JS as `camelName`, and
// lib/native.ts types it; test/layering.test.ts checks both against this list.
//
// Adding an op: a line here; its checks and dispatch in ops.cc; its CPU code in cpu/<family>.cc; its
// kernel in kernels/<family>.cu; a binding function and its entry in ops_binding.cc; its line in
// lib/native.ts. Ops that only one layer implements (ops::copy, cuda::matmul_kernels) are declared
// where they live, not here.
//
// Shapes use T for tokens (rows), H for hidden size, V for vocabulary, D for head dim.
#pragma once

#include "attention_batch.h"
#include "tensor.h"

// X(name, (parameters)) for each op; each returns void.
#define DETINFER_BACKEND_OPS(X)                                                                       \
  /* out[T,H] = table[ids[t], :]  (any dtype; table [V,H], ids i32 [T]). Also gathers rows. */        \
  X(embedding, (Tensor & out, const Tensor& table, const Tensor& ids))                                \
  /* out[r,:] = x[r,:] * rsqrt(mean(x[r,:]^2) + eps) * w   x,out [R,H] bf16, w [H] bf16 */            \
  X(rmsnorm, (Tensor & out, const Tensor& x, const Tensor& w, float eps))                             \
  /* residual = residual + x (bf16), then out = rmsnorm(residual) */                                  \
  X(add_rmsnorm, (Tensor & out, Tensor & residual, const Tensor& x, const Tensor& w, float eps))      \
  /* out[M,N] = a[M,K] · w[N,K]^T (+ bias[N])   bf16 in, fp32 accumulate, out bf16 or f32 */          \
  X(matmul, (Tensor & out, const Tensor& a, const Tensor& w, const Tensor* bias))                     \
  /* The row-parallel product (cpu/matmul.cc, kernels/matmul_partitioned.cu): K cut into 8 equal */   \
  /* contiguous partitions (K % 8 == 0, K/8 a multiple of 16), each partition's product in fp32 */    \
  /* in the plain matmul's order over its range, the 8 partials added by the fixed tree */            \
  /* ((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7)) in fp32, then + bias, then rounded (out bf16 or f32). */     \
  X(matmul_partitioned, (Tensor & out, const Tensor& a, const Tensor& w, const Tensor* bias))         \
  /* partials f32 [Q,M,N]: partials[q] = a[:, q*K/Q, (q+1)*K/Q) · w[:, same range]^T, each as one */  \
  /* partition of matmul_partitioned (K % Q == 0, K/Q a multiple of 16). A rank of a TP run */        \
  /* computes its Q = 8/TP partitions of the row-parallel product with it. */                         \
  X(matmul_partials, (Tensor & partials, const Tensor& a, const Tensor& w))                           \
  /* out[M,N] = ((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7)) (+ bias), partials f32 [8,M,N], out bf16/f32. */  \
  /* ranks (1, 2, 4 or 8: the TP degree that computed them) changes nothing, except in the */         \
  /* variant (variant_kernels()): per-rank subtotals rounded to bf16, then an NCCL-style ring sum. */ \
  X(combine_partials, (Tensor & out, const Tensor& partials, const Tensor* bias, int ranks))          \
  /* x [T, heads, D] bf16 rotated in place (rotate-half); positions i32 [T]; */                       \
  /* cos_sin f32 [max_pos, D]: cos of the D/2 frequencies, then their sin */                          \
  X(rope, (Tensor & x, const Tensor& positions, const Tensor& cos_sin))                               \
  /* out = silu(gate) * up   all bf16 [T, I] */                                                       \
  X(silu_mul, (Tensor & out, const Tensor& gate, const Tensor& up))                                   \
  /* out = a + b   bf16, same shape */                                                                \
  X(add, (Tensor & out, const Tensor& a, const Tensor& b))                                            \
  /* k_cache/v_cache [blocks, block_size, kv_heads, D] bf16; k,v [T, kv_heads, D]; slots i32 [T] */   \
  /* (slot = block * block_size + offset; a negative slot skips the row) */                           \
  X(kv_append, (Tensor & k_cache, Tensor & v_cache, const Tensor& k, const Tensor& v,                 \
                const Tensor& slots))                                                                 \
  /* out[t,i] = silu(gate_up[t,i]) * gate_up[t,I+i]   out [T, I], gate_up [T, 2I] (fused gate|up) */  \
  X(silu_mul_packed, (Tensor & out, const Tensor& gate_up))                                           \
  /* The gate/up product and its SiLU·mul in one op (w [2I,K] the fused gate|up weight, bias [2I]) */ \
  /* out [M,I] gets the bits of matmul(gate_up, a, w, bias) then silu_mul_packed(out, gate_up). */    \
  /* gate_up bf16 [M,2I] is scratch: the paths that do not fuse write the product there (the CPU, */  \
  /* the variant); its contents afterwards are unspecified. */                                        \
  X(matmul_silu_mul, (Tensor & out, Tensor & gate_up, const Tensor& a, const Tensor& w,               \
                      const Tensor* bias))                                                            \
  /* A product with the RMSNorm before it (on Hopper, one row's norm runs in the product's */        \
  /* prologue): with x, residual_out = residual_in + x (bf16) and the rows are that; without, */     \
  /* the rows are residual_in and residual_out is not written. out = rmsnorm(rows, norm_w, eps) */   \
  /* · w^T (+ bias): the bits of add_rmsnorm then matmul. normed [M,K] is scratch (the paths */      \
  /* that do not fuse write the norm there). residual_out may be residual_in. */                     \
  X(norm_matmul, (Tensor & out, Tensor & normed, Tensor & residual_out, const Tensor& residual_in,   \
                  const Tensor* x, const Tensor& norm_w, float eps, const Tensor& w,                 \
                  const Tensor* bias))                                                               \
  /* The same before matmul_silu_mul (gate_up [M,2I] its scratch, out [M,I]). */                     \
  X(norm_matmul_silu_mul, (Tensor & out, Tensor & gate_up, Tensor & normed, Tensor & residual_out,   \
                           const Tensor& residual_in, const Tensor* x, const Tensor& norm_w,         \
                           float eps, const Tensor& w, const Tensor* bias))                          \
  /* From the fused projection qkv [T, (heads + 2*kv_heads)*D] bf16 (q, k, v heads per row): */       \
  /* q_out [T, heads, D] = rope(q_norm(q)); the cache rows at slots get rope(k_norm(k)) and v (a */   \
  /* negative slot skips the row). q_norm, k_norm [D] or null (Qwen3's head norms). The same bits */  \
  /* as rmsnorm per head, rope and kv_append run one after the other. */                              \
  X(qkv_rope_append, (Tensor & q_out, Tensor & k_cache, Tensor & v_cache, const Tensor& qkv,          \
                      const Tensor& positions, const Tensor& cos_sin, const Tensor& slots,            \
                      const Tensor* q_norm, const Tensor* k_norm, float eps))                         \
  /* out,q [T, heads, D] bf16; causal attention over the paged cache, fixed split size */             \
  /* (common/attention_schedule.h). workspace (f32, CUDA only): the decode split partials when */    \
  /* it holds them, else a workspace the process keeps (kernels/cuda_ops.h) */                        \
  X(attention, (Tensor & out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,          \
                const AttentionBatch& batch, float scale, const Tensor* workspace))                   \
  /* out[r,:] = x[r,:] - logsumexp(x[r,:])   f32 [R,V] */                                             \
  X(log_softmax, (Tensor & out, const Tensor& x))                                                     \
  /* out[r] = argmax_v x[r,v], lowest index on ties   x f32 [R,V], out i32 [R] */                     \
  X(argmax, (Tensor & out, const Tensor& x))                                                          \
  /* out[r] = x[r, ids[r]] - logsumexp(x[r,:])   x f32 [R,V], ids i32 [R], out f32 [R] */             \
  X(token_logprobs, (Tensor & out, const Tensor& x, const Tensor& ids))                               \
  /* The output head's token choice (common/token_choice.h): for each row of logits x f32 [R,V] */    \
  /* and its parameters params i32 [R, choice::kParams], out i32 [R, 2 + 2N] gets the chosen id, */   \
  /* its log-prob (f32 bits), the N most likely ids and their log-probs (N <= kMaxTopLogprobs). */    \
  /* With live (i32 [>= 1]), rows r >= live[0] are skipped: their out rows are not written. */        \
  X(choose_tokens, (Tensor & out, const Tensor& x, const Tensor& params, const Tensor* live))         \
  /* Logit processors (common/logit_processors.h): for j < plan[0], adjusted[j,:] = the penalized */  \
  /* and biased logits of row r = plan[1+4j] of x with the counts and settings of table row k = */    \
  /* plan[2+4j] (its counts read as 0 and zeroed when plan[3+4j] is 1), the tokens mask row m = */    \
  /* plan[4+4j] forbids at -infinity (no mask when m is -1), and adjusted_params[j,:] = */            \
  /* params[r,:]. adjusted f32 [J,V], adjusted_params i32 [J,kParams], counts u16 [S,V], x f32 */     \
  /* [R,V], params i32 [R,kParams], plan i32 [1+4J], settings i32 [S,kSettings], mask i32 */          \
  /* [S,ceil(V/32)]. Rows j >= plan[0] are left as they are. */                                       \
  X(apply_logit_processors, (Tensor & adjusted, Tensor & adjusted_params, Tensor & counts,            \
                             const Tensor& x, const Tensor& params, const Tensor& plan,               \
                             const Tensor& settings, const Tensor& mask))                             \
  /* After choose_tokens on the adjusted rows (chosen i32 [J, >= 2]): for j < plan[0] whose id = */   \
  /* chosen[j,0] is a token, params[plan[1+4j], target] = id and counts[plan[2+4j], id] += 1 */       \
  /* (saturating at 32767). params i32 [R,kParams], counts u16 [S,V], plan i32 [1+4J]. */             \
  X(record_logit_choices, (Tensor & params, Tensor & counts, const Tensor& chosen, const Tensor& plan)) \
  /* Table row `row` of counts u16 [S,V] zeroed, then the words of the ids in prompt i32 [n] */      \
  /* marked as the prompt's (common/logit_processors.h, kInPrompt). */                               \
  X(reset_logit_row, (Tensor & counts, int row, const Tensor& prompt))                                \
  /* dst = src converted between f32, bf16 and f16 (same device, same element count) */               \
  X(cast, (Tensor & dst, const Tensor& src))

// Expands to the declaration `void name(parameters);` (used with DETINFER_BACKEND_OPS).
#define DETINFER_DECLARE_OP(name, params) void name params;
