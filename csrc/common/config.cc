#include "config.h"

namespace detinfer {
std::atomic<bool> g_variant_kernels{false};
}
