// rmsnorm: y[r,:] = bf16(bf16(x[r,:] * rsqrt(mean(x[r,:]^2) + eps)) * w)     x,y [R,H] bf16, w [H]
// add_rmsnorm: residual[r,:] = bf16(residual[r,:] + x[r,:]), then y = rmsnorm(residual).
// add_rmsnorm_to (norm_matmul's unfused path): the same with the sum written to another tensor.
// R = numel / H, so Qwen3's per-head q/k norms are the same kernel over [T*heads, D].
// Invariant: one block of kThreads threads per row, whatever R is. Thread t owns the 8-element
// chunks c = t, t + kThreads, ... (elements 8c..8c+7, fewer in a last partial chunk) and adds
// their squares into one fp32 sum in increasing element order; the kThreads sums are added by a
// fixed tree (warp xor-shuffle 16..1, then warp 0 over the warp sums the same way). The load width
// (16 bytes or scalar) never changes that order. No atomics; row r depends on row r alone.
// Variant (variant_kernels()): R < kVariantSplits spreads each row over kVariantSplits blocks
// whose partial sums go through a workspace, as libraries that split rows for small batches do.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common/config.h"
#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "cuda_ops.h"
#include "device_buffer.cuh"
#include "pdl.cuh"
#include "rmsnorm_row.cuh"

namespace detinfer::cuda {
namespace {

using norm_row::kChunk;
using norm_row::kThreads;
using norm_row::inverse_rms;
using norm_row::load_chunk;
using norm_row::normalize_row;
using norm_row::normalized;
using norm_row::row_sum_squares;
using norm_row::store_chunk;
constexpr int kVariantSplits = 4;

// res_out[r,:] = res_in[r,:] + x[r,:] (rounded to bf16), each thread over the chunks it later
// reads back.
__device__ void add_residual_row(__nv_bfloat16* res_out, const __nv_bfloat16* res_in, const __nv_bfloat16* x,
                                 int64_t H, bool vec) {
  int64_t chunks = (H + kChunk - 1) / kChunk;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    float a[kChunk], b[kChunk];
    int n = load_chunk(res_in, H, c, vec, a);
    load_chunk(x, H, c, vec, b);
    __nv_bfloat16 out[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = __float2bfloat16_rn(a[j] + b[j]);
    store_chunk(res_out, c, vec, n, out);
  }
}

// One block per row. With `x_add`, the row is the residual x_in + x_add first, written to x_out
// (which may be x_in).
__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(__nv_bfloat16* y, const __nv_bfloat16* x_in,
                                                           __nv_bfloat16* x_out, const __nv_bfloat16* x_add,
                                                           const __nv_bfloat16* w, int64_t H, float eps, bool vec) {
  pdl_start_small_batch();  // one block per row
  int64_t r = blockIdx.x;
  const __nv_bfloat16* xr = x_in + r * H;
  // Each thread reads back only the chunks it wrote itself, so no barrier is needed here.
  if (x_add) {
    add_residual_row(x_out + r * H, xr, x_add + r * H, H, vec);
    xr = x_out + r * H;
  }
  float sum = row_sum_squares(xr, H, 0, (H + kChunk - 1) / kChunk, vec);
  normalize_row(y + r * H, xr, w, H, inverse_rms(sum, H, eps), vec);
}

// The same row in registers, for rows of at most PER chunks per thread (H <= PER * kThreads *
// kChunk): each thread loads its chunks (c = t, t + kThreads, ...) of the row and of the weights
// once and keeps them, instead of reading the row back after the residual add and again to
// normalize.
// The same sums in the same order and the same roundings as rmsnorm_kernel, so the same bits.
template <int PER>
__global__ void __launch_bounds__(kThreads) rmsnorm_regs_kernel(__nv_bfloat16* y, const __nv_bfloat16* x_in,
                                                                __nv_bfloat16* x_out, const __nv_bfloat16* x_add,
                                                                const __nv_bfloat16* w, int64_t H, float eps,
                                                                bool vec) {
  pdl_start_small_batch();  // one block per row
  const int64_t r = blockIdx.x, chunks = (H + kChunk - 1) / kChunk;
  const __nv_bfloat16* xr = x_in + r * H;
  float v[PER][kChunk], wv[PER][kChunk];
  int n[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int64_t c = threadIdx.x + int64_t{k} * kThreads;
    n[k] = 0;
    if (c >= chunks) continue;
    n[k] = load_chunk(xr, H, c, vec, v[k]);
    load_chunk(w, H, c, vec, wv[k]);
    if (x_add) {
      float b[kChunk];
      load_chunk(x_add + r * H, H, c, vec, b);
      __nv_bfloat16 out[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        out[j] = __float2bfloat16_rn(v[k][j] + b[j]);
        v[k][j] = __bfloat162float(out[j]);
      }
      store_chunk(x_out + r * H, c, vec, n[k], out);
    }
  }
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < PER; ++k)
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      if (j < n[k]) sum = sum + v[k][j] * v[k][j];
  const float inv = inverse_rms(block_sum<kThreads>(sum), H, eps);
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    if (n[k] == 0) continue;
    __nv_bfloat16 out[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      out[j] = normalized(v[k][j], inv, wv[k][j]);
    store_chunk(y + r * H, threadIdx.x + int64_t{k} * kThreads, vec, n[k], out);
  }
}

// Variant only: block (r, s) writes the sum of squares of part s of row r.
__global__ void __launch_bounds__(kThreads) rmsnorm_partial_kernel(float* partial, const __nv_bfloat16* x,
                                                                   int64_t H, int64_t chunks_per_split, bool vec) {
  int64_t r = blockIdx.x, s = blockIdx.y;
  int64_t chunks = (H + kChunk - 1) / kChunk;
  int64_t begin = s * chunks_per_split, end = min(chunks, begin + chunks_per_split);
  float sum = row_sum_squares(x + r * H, H, begin, end, vec);
  if (threadIdx.x == 0) partial[r * gridDim.y + s] = sum;
}

__global__ void __launch_bounds__(kThreads) rmsnorm_apply_kernel(__nv_bfloat16* y, const __nv_bfloat16* x,
                                                                 const float* partial, int splits,
                                                                 const __nv_bfloat16* w, int64_t H, float eps,
                                                                 bool vec) {
  int64_t r = blockIdx.x;
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum = sum + partial[r * splits + s];
  normalize_row(y + r * H, x + r * H, w, H, inverse_rms(sum, H, eps), vec);
}

__global__ void add_kernel_bf16(__nv_bfloat16* res_out, const __nv_bfloat16* res_in, const __nv_bfloat16* x,
                                int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    res_out[i] = __float2bfloat16_rn(__bfloat162float(res_in[i]) + __bfloat162float(x[i]));
}

struct NormLaunch {
  int splits;  // blocks per row: 1 on the invariant path
};

// The one place the launch is chosen: kThreads per row always; a split only in the variant.
NormLaunch norm_config(int64_t rows, int64_t H) {
  if (variant_kernels() && rows < kVariantSplits && H >= kVariantSplits * kChunk) return {kVariantSplits};
  return {1};
}

std::string shapes(int64_t rows, int64_t H) {
  return "[rows=" + std::to_string(rows) + ", H=" + std::to_string(H) + "]";
}

// y = rmsnorm(x_in) or, with x_add, x_out = x_in + x_add and y = rmsnorm(x_out); x_out may be x_in.
void run_norm(const char* op, Tensor& out, const __nv_bfloat16* x_in, __nv_bfloat16* x_out,
              const __nv_bfloat16* x_add, const Tensor& w, int64_t rows, float eps) {
  int64_t H = w.dim(0);
  if (rows == 0 || H == 0) return;
  DI_CHECK(rows <= 0x7fffffff, op, ": too many rows (", rows, ")");
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_runtime::stream());
  bool vec = H % kChunk == 0 && aligned16(out.data()) && aligned16(x_in) && aligned16(w.data()) &&
             (x_add == nullptr || (aligned16(x_add) && aligned16(x_out)));
  NormLaunch l = norm_config(rows, H);
  const __nv_bfloat16* wp = w.ptr<__nv_bfloat16>();
  __nv_bfloat16* yp = out.ptr<__nv_bfloat16>();
  if (l.splits == 1) {
    const int64_t per = (H + kThreads * kChunk - 1) / (kThreads * kChunk);  // chunks per thread
    const unsigned grid = static_cast<unsigned>(rows);
    auto* kernel = per <= 1   ? rmsnorm_regs_kernel<1>
                   : per <= 2 ? rmsnorm_regs_kernel<2>
                   : per <= 4 ? rmsnorm_regs_kernel<4>
                              : rmsnorm_kernel;
    launch_overlapped(kernel, grid, kThreads, 0, stream, yp, x_in, x_out, x_add, wp, H, eps, vec);
    CUDA_CHECK_LAUNCH(op, shapes(rows, H));
    return;
  }
  const __nv_bfloat16* x = x_in;
  if (x_add) {
    int64_t n = rows * H;
    add_kernel_bf16<<<static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(
        x_out, x_in, x_add, n);
    CUDA_CHECK_LAUNCH(op, shapes(rows, H));
    x = x_out;
  }
  DeviceBuffer partial(static_cast<size_t>(rows) * l.splits * sizeof(float));
  int64_t chunks = (H + kChunk - 1) / kChunk, per = (chunks + l.splits - 1) / l.splits;
  dim3 grid(static_cast<unsigned>(rows), l.splits);
  rmsnorm_partial_kernel<<<grid, kThreads, 0, stream>>>(static_cast<float*>(partial.data()), x, H, per, vec);
  CUDA_CHECK_LAUNCH(op, shapes(rows, H));
  rmsnorm_apply_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      yp, x, static_cast<const float*>(partial.data()), l.splits, wp, H, eps, vec);
  CUDA_CHECK_LAUNCH(op, shapes(rows, H));
}

}  // namespace

void rmsnorm(Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  run_norm("rmsnorm", out, x.ptr<__nv_bfloat16>(), nullptr, nullptr, w, x.numel() / w.dim(0), eps);
}

void add_rmsnorm(Tensor& out, Tensor& residual, const Tensor& x, const Tensor& w, float eps) {
  __nv_bfloat16* res = residual.ptr<__nv_bfloat16>();
  run_norm("add_rmsnorm", out, res, res, x.ptr<__nv_bfloat16>(), w, x.numel() / w.dim(0), eps);
}

void add_rmsnorm_to(Tensor& out, Tensor& residual_out, const Tensor& residual_in, const Tensor* x, const Tensor& w,
                    float eps) {
  run_norm("norm_matmul", out, residual_in.ptr<__nv_bfloat16>(), x ? residual_out.ptr<__nv_bfloat16>() : nullptr,
           x ? x->ptr<__nv_bfloat16>() : nullptr, w, residual_in.numel() / w.dim(0), eps);
}

}  // namespace detinfer::cuda
