// Process-wide kernel configuration.
#pragma once

#include <atomic>

namespace detinfer {

// When true, matmul, the row reductions and attention choose their split from the batch size the
// way ordinary inference libraries do. It exists only to show that the invariance tests can fail.
extern std::atomic<bool> g_variant_kernels;

inline bool variant_kernels() { return g_variant_kernels.load(std::memory_order_relaxed); }

// Development switch: how every CUDA decode attention launch streams K and V, 1 paired, 2
// rotating, 3 paired three key blocks deep; 0 (the default): the library's choice by grid size
// (attention.cu). Launch geometry only, the bits are the same either way; it lets the tests and
// the harness run each pipeline production can pick.
extern std::atomic<int> g_decode_pipeline;

inline int forced_decode_pipeline() { return g_decode_pipeline.load(std::memory_order_relaxed); }

// Development switch: 1 runs every CUDA prefill attention launch with the mma.sync kernel, as on
// sm_80-89; 0 (the default): the library's choice, wgmma on Hopper (attention.cu). The same bits
// either way; it lets the tests compare the two families and the harness time them.
extern std::atomic<int> g_prefill_kernel;

inline int forced_prefill_kernel() { return g_prefill_kernel.load(std::memory_order_relaxed); }

// Development switch: 1 runs every CUDA matmul with the mma.sync family, as on sm_80-89; 0 (the
// default): the library's choice, wgmma on Hopper with sm_90a code (matmul.cu). The same bits
// either way; it lets the tests run the sm_80-89 tiles on a Hopper and the harness time them.
extern std::atomic<int> g_matmul_kernels;

inline int forced_matmul_kernels() { return g_matmul_kernels.load(std::memory_order_relaxed); }

}  // namespace detinfer
