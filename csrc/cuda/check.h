// CUDA_CHECK(call): a failing CUDA call becomes a detinfer::Error naming the call, the error and
// the place; the runtime's record of it is cleared (cudaGetLastError), so that the next launch's
// check does not report it again. CUDA_CHECK_LAUNCH(op, shapes): the same for the kernel launch
// just made.
#pragma once

#include <cuda_runtime.h>

#include "../common/error.h"

#define CUDA_CHECK(call)                                                                  \
  do {                                                                                    \
    cudaError_t di_err_ = (call);                                                         \
    if (di_err_ != cudaSuccess) {                                                         \
      (void)cudaGetLastError();                                                           \
      ::detinfer::fail(#call, " failed: ", cudaGetErrorString(di_err_), " (",             \
                       cudaGetErrorName(di_err_), ") at ", __FILE__, ":", __LINE__);      \
    }                                                                                     \
  } while (0)

#define CUDA_CHECK_LAUNCH(op, shapes)                                                     \
  do {                                                                                    \
    cudaError_t di_err_ = cudaGetLastError();                                             \
    if (di_err_ != cudaSuccess)                                                           \
      ::detinfer::fail("CUDA kernel launch for ", op, " ", shapes, " failed: ",           \
                       cudaGetErrorString(di_err_), " at ", __FILE__, ":", __LINE__);     \
  } while (0)
