// How many blocks of a kernel the whole device holds at once: the count the launch rules of
// attention.cu and the Hopper matmul compare their grids with.
#pragma once

#include <cuda_runtime.h>

#include "../cuda/runtime.h"

namespace detinfer::cuda {

// Blocks of `kernel` (of `threads` threads and `smem` bytes of dynamic shared memory, a size the
// kernel is already allowed) resident on the whole device at once: SMs x blocks per SM.
template <typename Kernel>
cudaError_t device_blocks(Kernel kernel, int threads, int smem, int& blocks) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  blocks = cuda_runtime::multiprocessors() * per_sm;
  return err;
}

}  // namespace detinfer::cuda
