#include "config.h"

namespace detinfer {
std::atomic<bool> g_variant_kernels{false};
std::atomic<int> g_decode_pipeline{0};
}
