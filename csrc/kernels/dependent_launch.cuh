// Programmatic dependent launch (sm_90 and newer). A kernel started with launch_dependent() may be
// scheduled while the kernel before it on the stream is still running, so that its launch and its
// prologue (barriers, shared memory set-up, the first tiles of constant weights) overlap that
// kernel's tail. Such a kernel calls wait_for_previous() before it touches anything an earlier
// kernel of the stream writes or reads: the wait returns once every earlier kernel has completed
// and its memory is visible. allow_next() lets the following kernel be scheduled early; it has no
// effect on what that kernel may read, which its own wait guards.
// Nothing here changes what a kernel computes, only when it may start. Older GPUs (and
// DETINFER_DEPENDENT_LAUNCH=0, for measuring) launch the same kernels the ordinary way; the
// device functions are then no-ops.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

#include "../cuda/check.h"

namespace detinfer::cuda {

__device__ __forceinline__ void wait_for_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether launches on this device carry the programmatic-serialization attribute.
inline bool dependent_launch_enabled() {
  static std::once_flag once;
  static bool enabled = false;
  static cudaError_t err = cudaSuccess;
  std::call_once(once, [] {
    int device = 0, major = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    const char* env = std::getenv("DETINFER_DEPENDENT_LAUNCH");
    enabled = err == cudaSuccess && major >= 9 && !(env && std::strcmp(env, "0") == 0);
  });
  CUDA_CHECK(err);
  return enabled;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a dependent launch where the device allows
// it. The kernel must call wait_for_previous() first (see above). Launch errors become exceptions
// naming `op`.
template <typename... Params, typename... Args>
void launch_dependent(const char* op, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = dependent_launch_enabled() ? 1 : 0;
  cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess)
    ::detinfer::fail("CUDA kernel launch for ", op, " failed: ", cudaGetErrorString(err), " (", cudaGetErrorName(err),
                     ")");
}

}  // namespace detinfer::cuda
