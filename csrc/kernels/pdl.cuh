// Programmatic dependent launch (sm_90 and newer): a kernel launched with launch_overlapped may
// start while the kernel before it on the stream is still running, so that its launch, its
// prologue and whatever it reads that no earlier kernel writes (weights) overlap that kernel's
// tail. Every such kernel calls pdl_wait() before it reads anything an earlier kernel wrote and
// before it writes anything: the wait returns once the kernels before it have completed and their
// writes are visible, exactly the order of a plain launch. It then calls pdl_launch_dependents(),
// which lets the next overlapped kernel start (the norms and the q/k/v kernel call it first at
// small batches: pdl_start_small_batch). Nothing a kernel computes changes, so neither does
// any bit; the overlap only moves when a kernel starts waiting.
// A kernel that never waits must never be launched overlapped: the kernel after it would wait
// only for it, not for the ones before. Plain launches (<<<>>>) after or before an overlapped one
// keep the full order.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_set>
#include <utility>

namespace detinfer::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The start of a small-batch norm or q/k/v kernel: with at most kEarlyReleaseRows rows (blocks
// along x), it lets the next kernel start before waiting itself. The next kernel (a product) then
// requests its weights while the product before this kernel still runs, instead of only during
// this short kernel; its own pdl_wait still waits for this kernel, which completes only after its
// wait, so the order of every write and read is that of a plain launch. On the H200 (random
// Qwen3-0.6B, replayed decode step) this took 1053 -> 979 us at batch 1, 1134 -> 1037 at 8 and
// 1365 -> 1341 at 32, and lost 1348 -> 1370 at 64, where the products stream enough that the
// early weights compete with the running product's. Releasing early from every kernel (products
// and attention too) was slower: 1097 -> 1175 us at batch 1.
constexpr unsigned kEarlyReleaseRows = 32;

__device__ __forceinline__ void pdl_start_small_batch() {
  if (gridDim.x <= kEarlyReleaseRows) {
    pdl_launch_dependents();
    pdl_wait();
  } else {
    pdl_wait();
    pdl_launch_dependents();
  }
}

// The environment variable `name` is "0": a development switch that turns a launch choice off,
// for measuring it (the bits are the same either way).
inline bool switched_off(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, "0") == 0;
}

// Device 0 is compute capability 9.0 or newer, and DETINFER_PDL is not "0" (a switch for
// measuring the overlap; the bits are the same either way).
inline bool pdl_enabled() {
  static const bool on = [] {
    if (switched_off("DETINFER_PDL")) return false;
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return major >= 9;
  }();
  return on;
}

// Asks, once per kernel, that an SM running it keep the most shared memory its L1 allows (on
// Hopper 228 KB of 256): kernels that share an SM must run under one split of L1 and shared
// memory, so a kernel launched overlapped can place its blocks beside those of the kernel before
// it only if that split leaves it room. A hint; a failure to take it changes nothing else.
// DETINFER_SMEM_CARVEOUT=0 leaves the driver's choice (a switch for measuring it).
inline void prefer_shared_memory(const void* kernel) {
  static const bool on = !switched_off("DETINFER_SMEM_CARVEOUT");
  if (!on) return;
  static std::mutex mutex;
  static std::unordered_set<const void*> done;
  std::lock_guard<std::mutex> lock(mutex);
  if (!done.insert(kernel).second) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared) !=
      cudaSuccess)
    cudaGetLastError();
}

// kernel<<<grid, block, smem, stream>>>(args...), overlapped with the kernel before it where
// pdl_enabled(). A failed launch is left for CUDA_CHECK_LAUNCH (cudaGetLastError), as with <<<>>>.
template <typename... Params, typename... Args>
void launch_overlapped(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = pdl_enabled() ? 1 : 0;
  prefer_shared_memory(reinterpret_cast<const void*>(kernel));
  (void)cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace detinfer::cuda
