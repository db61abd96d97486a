// Process-wide kernel configuration.
#pragma once

#include <atomic>

#include "attention_schedule.h"

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

// Development switch: the keys of an attention split in the invariant schedule; 0 (the default):
// the build's attention_schedule::kSplitSize. Any multiple of kKeyBlock keeps every invariant
// (a row's bits do not depend on the batch, prefill equals decode) but gives other bits than the
// build's size, so it is for measuring the schedule, never for serving. Set it before a model
// loads: its decode workspace and captured graphs follow the size at that time.
extern std::atomic<int> g_attention_split_size;

inline int attention_split_size() {
  const int s = g_attention_split_size.load(std::memory_order_relaxed);
  return s > 0 ? s : attention_schedule::kSplitSize;
}

}  // namespace detinfer
