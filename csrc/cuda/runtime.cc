#include "runtime.h"

#include <mutex>

#include "check.h"

#ifndef DETINFER_CUDA_ARCHS
#define DETINFER_CUDA_ARCHS ""
#endif

namespace detinfer::cuda_runtime {
namespace {

std::once_flag g_init_once;
cudaStream_t g_stream = nullptr;
std::string g_init_error;

std::string explain(cudaError_t err) {
  switch (err) {
    case cudaErrorInsufficientDriver:
      return "no NVIDIA driver was found (or it is older than CUDA " + std::to_string(CUDART_VERSION / 1000) +
             "." + std::to_string(CUDART_VERSION % 1000 / 10) +
             " needs); install the NVIDIA driver, or use device: 'cpu'";
    case cudaErrorNoDevice:
      return "the NVIDIA driver is installed but no CUDA device is visible (check CUDA_VISIBLE_DEVICES); "
             "use device: 'cpu'";
    default:
      return std::string("CUDA is unusable: ") + cudaGetErrorString(err) + "; use device: 'cpu'";
  }
}

void init() {
  std::call_once(g_init_once, [] {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();
      g_init_error = explain(err);
      return;
    }
    if (count == 0) {
      g_init_error = explain(cudaErrorNoDevice);
      return;
    }
    err = cudaSetDevice(0);
    if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) {
      cudaGetLastError();
      g_init_error = explain(err);
    }
  });
}

}  // namespace

Status status() {
  init();
  Status s;
  s.compiled = true;
  s.available = g_init_error.empty();
  s.reason = g_init_error;
  s.archs = DETINFER_CUDA_ARCHS;
  s.runtime_version = 0;
  s.driver_version = 0;
  cudaRuntimeGetVersion(&s.runtime_version);
  cudaDriverGetVersion(&s.driver_version);
  if (s.available) {
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    for (int i = 0; i < count; ++i) {
      cudaDeviceProp p{};
      CUDA_CHECK(cudaGetDeviceProperties(&p, i));
      s.devices.push_back({i, p.name, p.major, p.minor, p.totalGlobalMem, p.multiProcessorCount});
    }
  }
  return s;
}

void require() {
  init();
  if (!g_init_error.empty()) fail("CUDA device requested but ", g_init_error);
}

void* alloc(size_t nbytes) {
  require();
  void* p = nullptr;
  // Stream-ordered: memory is reused only after the work queued before its release has run.
  cudaError_t err = cudaMallocAsync(&p, nbytes, g_stream);
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail("out of GPU memory allocating ", nbytes, " bytes (", free_b >> 20, " MiB free of ",
         total_b >> 20, " MiB): ", cudaGetErrorString(err));
  }
  return p;
}

void free(void* ptr) noexcept {
  if (ptr == nullptr || g_stream == nullptr) return;
  // A failure here cannot be reported (called from destructors); clear it so it is not sticky
  // for the next checked call.
  if (cudaFreeAsync(ptr, g_stream) != cudaSuccess) cudaGetLastError();
}

void upload(void* dst, const void* src, size_t nbytes) {
  require();
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, g_stream));
  CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

void download(void* dst, const void* src, size_t nbytes) {
  require();
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToHost, g_stream));
  CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

void copy_async(void* dst, const void* src, size_t nbytes) {
  require();
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, g_stream));
}

void synchronize() {
  require();
  CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

void* stream() {
  require();
  return g_stream;
}

}  // namespace detinfer::cuda_runtime
