// Used when the package is built without CUDA: every CUDA entry point says so.
#include "runtime.h"

#include "../common/error.h"

namespace detinfer::cuda_runtime {

static const char* kReason =
    "this build of detinfer has no CUDA backend (nvcc was not found, or DETINFER_CUDA=OFF, when it "
    "was compiled); reinstall with CUDA's nvcc on PATH, or use device: 'cpu'";

Status status() { return Status{false, false, kReason, "", 0, 0, {}}; }
void require() { fail("CUDA device requested but ", kReason); }
void* alloc(size_t) { require(); return nullptr; }
void free(void*) noexcept {}
void upload(void*, const void*, size_t) { require(); }
void download(void*, const void*, size_t) { require(); }
void copy_async(void*, const void*, size_t) { require(); }
void synchronize() { require(); }
void* stream() { require(); return nullptr; }
int multiprocessors() { require(); return 0; }
void upload_async(void*, const void*, size_t) { require(); }
void capture_begin() { require(); }
void* capture_end(size_t*) { require(); return nullptr; }
void capture_abort() noexcept {}
void graph_launch(void*) { require(); }
void graph_destroy(void*) noexcept {}
void memory_info(size_t*, size_t*) { require(); }
void* download_begin(const void*, size_t) { require(); return nullptr; }
void download_finish(void*, void*) { require(); }
void download_abandon(void*) noexcept {}

}  // namespace detinfer::cuda_runtime
