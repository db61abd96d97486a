#include "config.h"

namespace detinfer {
std::atomic<bool> g_variant_kernels{false};
std::atomic<int> g_decode_pipeline{0};
std::atomic<int> g_prefill_kernel{0};
std::atomic<int> g_matmul_kernels{0};
std::atomic<int> g_attention_split_size{0};
}
