// Development harness: what one grid-wide dependency between two stages of a decode step costs,
// the way the library pays it (a kernel boundary, overlapped with programmatic dependent launch)
// against a grid barrier inside one persistent kernel.
//   build/dev/dev_stage_sync [stages] [KB]
// A stage is the smallest shape of a step's dependency: every block reads the whole vector the
// blocks of the stage before wrote (16 floats a block, read through L2), sums it, and writes its 16
// floats. A chain of `stages` stages (140 by default: five dependent kernels a layer for 28
// layers, a Qwen3-0.6B batch-1 step) runs as
//   kernels, plain        one kernel a stage, captured in a CUDA graph and replayed;
//   kernels, overlapped   the same launched with programmatic dependent launch (pdl.cuh): each
//                         kernel waits (griddepcontrol.wait) and then releases the next;
//   kernels, early        the same, releasing the next kernel before waiting, as the library's
//                         norms and q/k/v kernel do at small batches;
//   one kernel, counter   one cooperative kernel running every stage, a grid barrier (one atomic
//                         arrival a block, a spin on a generation word) between stages;
//   one kernel, flags     the same with each block's arrival in a flag of its own, which block 0
//                         watches before it publishes the next generation;
//   one kernel, no sync   the same without the barriers (the values race; only the time is
//                         read): the stages' own work, the floor under both.
// µs per stage, median of replays, for grids of 8 blocks (decode attention at batch 1), 64, 128
// (the narrow products) and one block per SM. The difference between a row and the floor is what a
// dependency costs; 140 times it is what the step pays for them. KB (default 0) gives each stage
// kernel that much dynamic shared memory, as large as the library's blocks (100-120 KB).
// Findings on the H200 (docs/performance.md, "What a dependency costs"), 140 stages, 0 KB, µs per
// stage, plain / overlapped / early / counter / no sync: 8 blocks 1.22 / 1.03 / 0.88 / 1.83 / 0.49;
// 132 blocks 1.68 / 1.40 / 1.31 / 2.69 / 0.85. An overlapped kernel boundary costs 0.4-0.6 µs over
// the stage's own work, and the counter barrier 1.3-1.8 µs. The flag barrier is slower still (1.79
// / 3.29 µs at 8 / 132 blocks against the counter's 1.92 / 2.72 in its run), and 120 KB stage
// kernels cost what 0 KB ones do, within 0.06 µs.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "dev/harness.cuh"
#include "kernels/pdl.cuh"

using namespace detinfer;
using namespace detinfer::cuda;

namespace {

constexpr int kThreads = 128;
constexpr int kPerBlock = 16;  // floats each block writes a stage

// Reads the n floats at in (through L2: other SMs wrote them) and writes this block's kPerBlock.
__device__ __forceinline__ void stage_work(const float* in, float* out, int n, float* red) {
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += kThreads) s += __ldcg(in + i);
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x < kPerBlock) {
    const float total = red[0] + red[1] + red[2] + red[3];
    __stcg(out + blockIdx.x * kPerBlock + threadIdx.x, total * 0.5f + static_cast<float>(threadIdx.x));
  }
  __syncthreads();
}

// MODE 0: plain; 1: wait, then release; 2: release, then wait.
template <int MODE>
__global__ void __launch_bounds__(kThreads) stage_kernel(const float* in, float* out, int n) {
  __shared__ float red[kThreads / 32];
  if (MODE == 1) {
    pdl_wait();
    pdl_launch_dependents();
  } else if (MODE == 2) {
    pdl_launch_dependents();
    pdl_wait();
  }
  stage_work(in, out, n, red);
}

// Sense by generation: the last block to arrive resets the count and advances the generation;
// the others spin until it moves. Release before the arrival, acquire after the spin.
__device__ __forceinline__ void grid_barrier(unsigned* count, unsigned* generation) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned gen = *reinterpret_cast<volatile unsigned*>(generation);
    __threadfence();
    if (atomicAdd(count, 1u) == gridDim.x - 1) {
      atomicExch(count, 0u);
      __threadfence();
      atomicAdd(generation, 1u);
    } else {
      while (*reinterpret_cast<volatile unsigned*>(generation) == gen) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// Arrivals without contention: block i stores the generation it is entering to flags[i]; block 0's
// threads each watch some of the flags, and once all have arrived, block 0 publishes the new
// generation, on which the other blocks spin.
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void flag_barrier(unsigned* flags, unsigned* generation, unsigned next) {
  __syncthreads();
  if (blockIdx.x == 0) {
    for (unsigned i = threadIdx.x + 1; i < gridDim.x; i += kThreads)
      while (ld_acquire(flags + i) != next) {
      }
    __syncthreads();
    if (threadIdx.x == 0) st_release(generation, next);
  } else if (threadIdx.x == 0) {
    st_release(flags + blockIdx.x, next);
    while (ld_acquire(generation) != next) {
    }
  }
  __syncthreads();
}

// SYNC 0: no barrier; 1: one counter; 2: flags. `base`: the generation before this launch.
template <int SYNC>
__global__ void __launch_bounds__(kThreads) persistent_kernel(float* a, float* b, int n, int stages, unsigned* count,
                                                              unsigned* generation, unsigned* flags, unsigned base) {
  __shared__ float red[kThreads / 32];
  for (int s = 0; s < stages; ++s) {
    stage_work(s % 2 ? b : a, s % 2 ? a : b, n, red);
    if (SYNC == 1) grid_barrier(count, generation);
    if (SYNC == 2) flag_barrier(flags, generation + 1, base + s + 1);
  }
}

struct Buffers {
  float *a = nullptr, *b = nullptr;
  unsigned* sync = nullptr;  // [count, generation, flag generation, flags per block ...]
  unsigned launched = 0;     // flag-barrier generations used so far
  Buffers(int n) {
    CUDA_CHECK(cudaMalloc(&a, n * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&b, n * sizeof(float)));
    CUDA_CHECK(cudaMalloc(&sync, (3 + n) * sizeof(unsigned)));
    std::vector<float> init(n);
    for (int i = 0; i < n; ++i) init[i] = 1.f + 1e-3f * static_cast<float>(i % 97);
    CUDA_CHECK(cudaMemcpy(a, init.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(b, init.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(sync, 0, (3 + n) * sizeof(unsigned)));
  }
  ~Buffers() {
    cudaFree(a);
    cudaFree(b);
    cudaFree(sync);
  }
};

// µs per stage of `stages` stage kernels of `blocks` blocks, each asking for `smem` bytes of
// (unused) dynamic shared memory as the library's kernels ask for theirs, captured once and
// replayed.
template <int MODE>
double kernels_us(Buffers& buf, int blocks, int stages, int smem) {
  const int n = blocks * kPerBlock;
  CUDA_CHECK(cudaFuncSetAttribute(stage_kernel<MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaStream_t s = dev::stream();
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < stages; ++i) {
    float* in = i % 2 ? buf.b : buf.a;
    float* out = i % 2 ? buf.a : buf.b;
    if (MODE == 0)
      stage_kernel<0><<<blocks, kThreads, smem, s>>>(in, out, n);
    else
      launch_overlapped(stage_kernel<MODE>, dim3(blocks), dim3(kThreads), smem, s, in, out, n);
  }
  CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec = nullptr;
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double us = dev::median_gpu_us([&](int) { CUDA_CHECK(cudaGraphLaunch(exec, s)); }, 30);
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  return us / stages;
}

// µs per stage of one cooperative kernel of `blocks` blocks running every stage.
template <int SYNC>
double persistent_us(Buffers& buf, int blocks, int stages) {
  int n = blocks * kPerBlock;
  cudaStream_t s = dev::stream();
  unsigned *count = buf.sync, *generation = buf.sync + 1, *flags = buf.sync + 3;
  unsigned base = 0;
  void* args[] = {&buf.a, &buf.b, &n, &stages, &count, &generation, &flags, &base};
  const double us = dev::median_gpu_us(
      [&](int) {
        base = buf.launched;  // the launch copies its arguments
        CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(persistent_kernel<SYNC>), dim3(blocks),
                                               dim3(kThreads), args, 0, s));
        if (SYNC == 2) buf.launched += stages;
      },
      30);
  return us / stages;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    cuda_runtime::require();
    const int stages = argc > 1 ? std::atoi(argv[1]) : 140;
    const int smem_kb = argc > 2 ? std::atoi(argv[2]) : 0;
    if (stages < 2 || smem_kb < 0 || smem_kb > 227) {
      std::fprintf(stderr, "usage: dev_stage_sync [stages >= 2] [shared memory of the stage kernels, KB, 0-227]\n");
      return 2;
    }
    const int smem = smem_kb * 1024;
    int device = 0, sms = 0, cooperative = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
    DI_CHECK(cooperative, "dev_stage_sync: this GPU does not support cooperative launches");
    std::printf("%d stages, stage kernels of %d KB of shared memory; µs per stage (median of 30 replays of the chain)\n",
                stages, smem_kb);
    std::printf("%7s %11s %11s %11s %11s %11s %11s\n", "blocks", "plain", "overlapped", "early", "counter", "flags",
                "no sync");
    for (int blocks : {8, 64, 128, sms}) {
      Buffers buf(blocks * kPerBlock);
      const double plain = kernels_us<0>(buf, blocks, stages, smem);
      const double overlapped = kernels_us<1>(buf, blocks, stages, smem);
      const double early = kernels_us<2>(buf, blocks, stages, smem);
      const double counter = persistent_us<1>(buf, blocks, stages);
      const double flags = persistent_us<2>(buf, blocks, stages);
      const double floor = persistent_us<0>(buf, blocks, stages);
      std::printf("%7d %11.2f %11.2f %11.2f %11.2f %11.2f %11.2f\n", blocks, plain, overlapped, early, counter, flags,
                  floor);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dev_stage_sync: %s\n", e.what());
    return 1;
  }
}
