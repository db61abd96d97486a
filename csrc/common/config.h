// Process-wide kernel configuration.
#pragma once

#include <atomic>

namespace detinfer {

// When true, matmul, the row reductions and attention choose their split from the batch size the
// way ordinary inference libraries do. It exists only to show that the invariance tests can fail.
extern std::atomic<bool> g_variant_kernels;

inline bool variant_kernels() { return g_variant_kernels.load(std::memory_order_relaxed); }

}  // namespace detinfer
