// Block-wide reductions with a fixed tree, shared by the row kernels (rmsnorm, log-softmax,
// argmax). Each warp folds its 32 values by xor-shuffle at distances 16, 8, 4, 2, 1; warp 0 then
// folds the per-warp results the same way (missing warps contribute the identity). The tree
// depends only on THREADS, a compile-time constant, so a row's result never depends on the launch.
// Every thread gets the result; the shared scratch is free again when the call returns.
#pragma once

#include <cuda_runtime.h>

namespace detinfer::cuda {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d >= 1; d /= 2) v = v + __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int d = 16; d >= 1; d /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}

template <int THREADS>
__device__ float block_sum(float v) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps, at most 32");
  __shared__ float scratch[32];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float w = threadIdx.x < THREADS / 32 ? scratch[threadIdx.x] : 0.f;
    w = warp_sum(w);
    if (threadIdx.x == 0) scratch[0] = w;
  }
  __syncthreads();
  float total = scratch[0];
  __syncthreads();
  return total;
}

template <int THREADS>
__device__ float block_max(float v) {
  __shared__ float scratch[32];
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float w = threadIdx.x < THREADS / 32 ? scratch[threadIdx.x] : -INFINITY;
    w = warp_max(w);
    if (threadIdx.x == 0) scratch[0] = w;
  }
  __syncthreads();
  float total = scratch[0];
  __syncthreads();
  return total;
}

// (value, index) pairs: the larger value wins; equal values keep the lower index.
struct ArgBest {
  float value;
  int index;
};

__device__ __forceinline__ ArgBest arg_better(ArgBest a, ArgBest b) {
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

__device__ __forceinline__ ArgBest warp_argmax(ArgBest v) {
#pragma unroll
  for (int d = 16; d >= 1; d /= 2) {
    ArgBest o{__shfl_xor_sync(0xffffffffu, v.value, d), __shfl_xor_sync(0xffffffffu, v.index, d)};
    v = arg_better(v, o);
  }
  return v;
}

template <int THREADS>
__device__ ArgBest block_argmax(ArgBest v) {
  __shared__ float values[32];
  __shared__ int indices[32];
  v = warp_argmax(v);
  if (threadIdx.x % 32 == 0) values[threadIdx.x / 32] = v.value, indices[threadIdx.x / 32] = v.index;
  __syncthreads();
  if (threadIdx.x < 32) {
    ArgBest w = threadIdx.x < THREADS / 32 ? ArgBest{values[threadIdx.x], indices[threadIdx.x]}
                                           : ArgBest{-INFINITY, 0x7fffffff};
    w = warp_argmax(w);
    if (threadIdx.x == 0) values[0] = w.value, indices[0] = w.index;
  }
  __syncthreads();
  ArgBest best{values[0], indices[0]};
  __syncthreads();
  return best;
}

}  // namespace detinfer::cuda
