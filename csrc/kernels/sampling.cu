// Row reductions over fp32 logits x [R,V] (V up to 151936 and beyond):
//   log_softmax     out[r,:] = x[r,:] - logsumexp(x[r,:])          out f32 [R,V]
//   argmax          out[r] = argmax_v x[r,v], lowest v on ties     out i32 [R]
//   token_logprobs  out[r] = x[r,ids[r]] - logsumexp(x[r,:])       out f32 [R]
// Invariant: one block of kThreads threads per row whatever R is. Thread t visits v = t,
// t + kThreads, ... in increasing v: first the max, then one fp32 sum of expf(x - max); the
// kThreads values are combined by the fixed tree of block_reduce.cuh; lse = max + logf(sum).
// log_softmax and token_logprobs call the same row_logsumexp with the same block size, so a
// token's log-prob has the same bits from either op. Row r depends on row r alone.
// Variant (variant_kernels()): R < kVariantSplits spreads each row over kVariantSplits blocks
// (partial max and sum each, combined through a workspace), as split row reductions do.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common/config.h"
#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "block_reduce.cuh"
#include "cuda_ops.h"
#include "device_buffer.cuh"

namespace detinfer::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kVariantSplits = 4;

// max and sum of expf(x - max) of x[begin, end), by the block's fixed order and tree.
struct MaxSum {
  float max, sum;
};

__device__ MaxSum row_max_sum(const float* x, int64_t begin, int64_t end) {
  float m = -INFINITY;
  for (int64_t v = begin + threadIdx.x; v < end; v += kThreads) m = fmaxf(m, x[v]);
  m = block_max<kThreads>(m);
  if (isinf(m) && m < 0) return {m, 0.f};
  float s = 0.f;
  for (int64_t v = begin + threadIdx.x; v < end; v += kThreads) s = s + expf(x[v] - m);
  return {m, block_sum<kThreads>(s)};
}

__device__ float row_logsumexp(const float* x, int64_t V) {
  MaxSum ms = row_max_sum(x, 0, V);
  if (isinf(ms.max) && ms.max < 0) return ms.max;
  return ms.max + logf(ms.sum);
}

__global__ void __launch_bounds__(kThreads) log_softmax_kernel(float* out, const float* x, int64_t V) {
  int64_t r = blockIdx.x;
  const float* xr = x + r * V;
  float lse = row_logsumexp(xr, V);
  for (int64_t v = threadIdx.x; v < V; v += kThreads) out[r * V + v] = xr[v] - lse;
}

// An id outside [0, V) (the host validates them) gives NaN instead of reading out of bounds.
__global__ void __launch_bounds__(kThreads) token_logprobs_kernel(float* out, const float* x, const int32_t* ids,
                                                                  int64_t V) {
  int64_t r = blockIdx.x;
  const float* xr = x + r * V;
  float lse = row_logsumexp(xr, V);
  if (threadIdx.x == 0) {
    int32_t id = ids[r];
    out[r] = id >= 0 && id < V ? xr[id] - lse : NAN;
  }
}

__global__ void __launch_bounds__(kThreads) argmax_kernel(int32_t* out, const float* x, int64_t V) {
  int64_t r = blockIdx.x;
  const float* xr = x + r * V;
  ArgBest best{-INFINITY, 0x7fffffff};
  for (int64_t v = threadIdx.x; v < V; v += kThreads) best = arg_better(best, ArgBest{xr[v], static_cast<int>(v)});
  best = block_argmax<kThreads>(best);
  if (threadIdx.x == 0) out[r] = best.index == 0x7fffffff ? 0 : best.index;
}

// Variant only: block (r, s) writes the (max, sum) of part s of row r.
__global__ void __launch_bounds__(kThreads) lse_partial_kernel(float2* partial, const float* x, int64_t V,
                                                               int64_t per_split) {
  int64_t r = blockIdx.x, s = blockIdx.y;
  int64_t begin = s * per_split, end = min(V, begin + per_split);
  MaxSum ms = row_max_sum(x + r * V, begin, end);
  if (threadIdx.x == 0) partial[r * gridDim.y + s] = make_float2(ms.max, ms.sum);
}

// Variant only: combines the parts of row r in part order, then writes like the invariant kernels
// (out_rows: log_softmax rows; out_tokens: token log-probs).
__global__ void __launch_bounds__(kThreads) lse_apply_kernel(float* out_rows, float* out_tokens, const int32_t* ids,
                                                             const float* x, const float2* partial, int splits,
                                                             int64_t V) {
  int64_t r = blockIdx.x;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, partial[r * splits + s].x);
  float lse = m;
  if (!(isinf(m) && m < 0)) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) {
      float2 p = partial[r * splits + s];
      if (p.y > 0.f) sum = sum + p.y * expf(p.x - m);
    }
    lse = m + logf(sum);
  }
  const float* xr = x + r * V;
  if (out_rows)
    for (int64_t v = threadIdx.x; v < V; v += kThreads) out_rows[r * V + v] = xr[v] - lse;
  if (out_tokens && threadIdx.x == 0) {
    int32_t id = ids[r];
    out_tokens[r] = id >= 0 && id < V ? xr[id] - lse : NAN;
  }
}

// The one place the launch is chosen: a block of kThreads per row; a split only in the variant.
int row_splits(int64_t rows, int64_t V) {
  if (variant_kernels() && rows < kVariantSplits && V >= kVariantSplits) return kVariantSplits;
  return 1;
}

std::string shapes(int64_t rows, int64_t V) {
  return "[rows=" + std::to_string(rows) + ", V=" + std::to_string(V) + "]";
}

// The variant's split path for log_softmax (out_rows) and token_logprobs (out_tokens).
void split_logsumexp(const char* op, float* out_rows, float* out_tokens, const int32_t* ids, const float* x,
                     int64_t rows, int64_t V, int splits, cudaStream_t stream) {
  DeviceBuffer partial(static_cast<size_t>(rows) * splits * sizeof(float2));
  int64_t per = (V + splits - 1) / splits;
  lse_partial_kernel<<<dim3(static_cast<unsigned>(rows), splits), kThreads, 0, stream>>>(
      static_cast<float2*>(partial.data()), x, V, per);
  CUDA_CHECK_LAUNCH(op, shapes(rows, V));
  lse_apply_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      out_rows, out_tokens, ids, x, static_cast<const float2*>(partial.data()), splits, V);
  CUDA_CHECK_LAUNCH(op, shapes(rows, V));
}

cudaStream_t device_stream() { return static_cast<cudaStream_t>(cuda_runtime::stream()); }

}  // namespace

void log_softmax(Tensor& out, const Tensor& x) {
  int64_t rows = x.dim(0), V = x.dim(1);
  if (rows == 0 || V == 0) return;
  DI_CHECK(rows <= 0x7fffffff, "log_softmax: too many rows (", rows, ")");
  cudaStream_t stream = device_stream();
  int splits = row_splits(rows, V);
  if (splits > 1) return split_logsumexp("log_softmax", out.ptr<float>(), nullptr, nullptr, x.ptr<float>(), rows, V,
                                         splits, stream);
  log_softmax_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(out.ptr<float>(), x.ptr<float>(), V);
  CUDA_CHECK_LAUNCH("log_softmax", shapes(rows, V));
}

void token_logprobs(Tensor& out, const Tensor& x, const Tensor& ids) {
  int64_t rows = x.dim(0), V = x.dim(1);
  if (rows == 0) return;
  DI_CHECK(V > 0, "token_logprobs: x has no columns");
  DI_CHECK(rows <= 0x7fffffff, "token_logprobs: too many rows (", rows, ")");
  cudaStream_t stream = device_stream();
  int splits = row_splits(rows, V);
  if (splits > 1) return split_logsumexp("token_logprobs", nullptr, out.ptr<float>(), ids.ptr<int32_t>(),
                                         x.ptr<float>(), rows, V, splits, stream);
  token_logprobs_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(out.ptr<float>(), x.ptr<float>(),
                                                                               ids.ptr<int32_t>(), V);
  CUDA_CHECK_LAUNCH("token_logprobs", shapes(rows, V));
}

void argmax(Tensor& out, const Tensor& x) {
  int64_t rows = x.dim(0), V = x.dim(1);
  if (rows == 0) return;
  DI_CHECK(V > 0, "argmax: x has no columns");
  DI_CHECK(rows <= 0x7fffffff, "argmax: too many rows (", rows, ")");
  argmax_kernel<<<static_cast<unsigned>(rows), kThreads, 0, device_stream()>>>(out.ptr<int32_t>(), x.ptr<float>(), V);
  CUDA_CHECK_LAUNCH("argmax", shapes(rows, V));
}

}  // namespace detinfer::cuda
