#include "runtime.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <vector>

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

// The pinned staging ring of upload_async.
struct StagingRing {
  std::mutex mutex;
  char* host = nullptr;
  size_t capacity = 0;
  size_t offset = 0;  // where the next region may start; everything before it may still be in flight
};
StagingRing g_ring;
constexpr size_t kRingMinBytes = size_t{4} << 20;
constexpr size_t kRingAlign = 256;

cudaStreamCaptureStatus capture_status() {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(g_stream, &st));
  return st;
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

// Held from capture_begin to capture_end/capture_abort (on the JS thread), and by the worker
// threads' downloads and synchronizations around their stream work: a worker's copy never lands
// in another model's graph capture, it waits for the capture to end.
static std::mutex g_capture_mutex;
static std::unique_lock<std::mutex> g_capture_lock(g_capture_mutex, std::defer_lock);

void upload(void* dst, const void* src, size_t nbytes) {
  require();
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, g_stream));
  CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

void download(void* dst, const void* src, size_t nbytes) {
  require();
  std::lock_guard<std::mutex> no_capture(g_capture_mutex);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToHost, g_stream));
  CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

void copy_async(void* dst, const void* src, size_t nbytes) {
  require();
  CUDA_CHECK(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, g_stream));
}

void synchronize() {
  require();
  std::lock_guard<std::mutex> no_capture(g_capture_mutex);
  CUDA_CHECK(cudaStreamSynchronize(g_stream));
}

void* stream() {
  require();
  return g_stream;
}

int multiprocessors() {
  static std::once_flag once;
  static cudaError_t err = cudaSuccess;
  static int count = 0;
  std::call_once(once, [] {
    int device = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  });
  CUDA_CHECK(err);
  return count;
}

void upload_async(void* dst, const void* src, size_t nbytes) {
  require();
  if (nbytes == 0) return;
  std::lock_guard<std::mutex> lock(g_ring.mutex);
  if (capture_status() != cudaStreamCaptureStatusNone)
    fail("an asynchronous upload cannot run while a CUDA graph is being captured: the graph would replay "
         "the staging buffer's bytes of replay time, not these; upload the inputs before the capture begins "
         "or between replays");
  if (nbytes > g_ring.capacity) {
    // Regions of the old ring may still be read by queued copies: wait for them before freeing it.
    CUDA_CHECK(cudaStreamSynchronize(g_stream));
    size_t capacity = std::max(kRingMinBytes, 2 * g_ring.capacity);
    while (capacity < nbytes) capacity *= 2;
    if (g_ring.host != nullptr) {
      char* old = g_ring.host;
      g_ring.host = nullptr;
      g_ring.capacity = 0;
      CUDA_CHECK(cudaFreeHost(old));
    }
    void* host = nullptr;
    cudaError_t err = cudaMallocHost(&host, capacity);
    if (err != cudaSuccess) {
      cudaGetLastError();
      fail("out of pinned host memory allocating a ", capacity, "-byte staging buffer for an upload of ", nbytes,
           " bytes: ", cudaGetErrorString(err));
    }
    g_ring.host = static_cast<char*>(host);
    g_ring.capacity = capacity;
    g_ring.offset = 0;
  }
  size_t start = (g_ring.offset + kRingAlign - 1) / kRingAlign * kRingAlign;
  if (start > g_ring.capacity || nbytes > g_ring.capacity - start) {
    // Wrap around: the copies that read the start of the ring must have run before it is rewritten.
    CUDA_CHECK(cudaStreamSynchronize(g_stream));
    start = 0;
  }
  std::memcpy(g_ring.host + start, src, nbytes);
  CUDA_CHECK(cudaMemcpyAsync(dst, g_ring.host + start, nbytes, cudaMemcpyHostToDevice, g_stream));
  g_ring.offset = start + nbytes;
}

// Staged downloads: pinned blocks and events, reused (a handle is one of each).
struct StagedDownload {
  char* host = nullptr;
  size_t capacity = 0;
  cudaEvent_t landed = nullptr;
  size_t nbytes = 0;
};
static std::mutex g_staged_mutex;
static std::vector<StagedDownload*> g_staged_free;

void* download_begin(const void* src, size_t nbytes) {
  require();
  if (nbytes > kMaxStagedDownload)
    fail("a staged download holds at most ", kMaxStagedDownload, " bytes but ", nbytes, " were asked for");
  if (capture_status() != cudaStreamCaptureStatusNone)
    fail("a download cannot be enqueued while a CUDA graph is being captured");
  StagedDownload* d = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_staged_mutex);
    for (size_t i = 0; i < g_staged_free.size(); ++i)
      if (g_staged_free[i]->capacity >= nbytes) {
        d = g_staged_free[i];
        g_staged_free.erase(g_staged_free.begin() + static_cast<std::ptrdiff_t>(i));
        break;
      }
  }
  if (d == nullptr) {
    d = new StagedDownload();
    size_t capacity = size_t{64} << 10;
    while (capacity < nbytes) capacity *= 2;
    void* host = nullptr;
    cudaError_t err = cudaMallocHost(&host, capacity);
    if (err == cudaSuccess) err = cudaEventCreateWithFlags(&d->landed, cudaEventDisableTiming);
    if (err != cudaSuccess) {
      cudaGetLastError();
      if (host) cudaFreeHost(host);
      delete d;
      fail("could not set up a staged download of ", nbytes, " bytes: ", cudaGetErrorString(err));
    }
    d->host = static_cast<char*>(host);
    d->capacity = capacity;
  }
  d->nbytes = nbytes;
  cudaError_t err = cudaMemcpyAsync(d->host, src, nbytes, cudaMemcpyDeviceToHost, g_stream);
  if (err == cudaSuccess) err = cudaEventRecord(d->landed, g_stream);
  if (err != cudaSuccess) {
    download_abandon(d);
    CUDA_CHECK(err);
  }
  return d;
}

void download_finish(void* handle, void* dst) {
  auto* d = static_cast<StagedDownload*>(handle);
  cudaError_t err = cudaEventSynchronize(d->landed);
  if (err == cudaSuccess) std::memcpy(dst, d->host, d->nbytes);
  download_abandon(d);
  CUDA_CHECK(err);
}

void download_abandon(void* handle) noexcept {
  auto* d = static_cast<StagedDownload*>(handle);
  if (d == nullptr) return;
  try {
    std::lock_guard<std::mutex> lock(g_staged_mutex);
    g_staged_free.push_back(d);
  } catch (...) {
  }
}

void capture_begin() {
  require();
  if (capture_status() != cudaStreamCaptureStatusNone)
    fail("a CUDA graph capture is already in progress; end it (or abort it) before beginning another");
  g_capture_lock.lock();
  cudaError_t err = cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal);
  if (err != cudaSuccess) g_capture_lock.unlock();
  CUDA_CHECK(err);
}

void* capture_end(size_t* bytes) {
  require();
  if (capture_status() == cudaStreamCaptureStatusNone)
    fail("no CUDA graph capture is in progress to end; begin one first");
  cudaGraph_t graph = nullptr;
  cudaError_t err = cudaStreamEndCapture(g_stream, &graph);
  if (g_capture_lock.owns_lock()) g_capture_lock.unlock();
  if (err != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    fail("the CUDA graph capture was invalidated (an operation that cannot be captured, such as a "
         "synchronization or a copy from pageable memory, ran during it): ", cudaGetErrorString(err), " (",
         cudaGetErrorName(err), ")");
  }
  size_t free_before = 0, free_after = 0, total = 0;
  cudaError_t info_err = cudaMemGetInfo(&free_before, &total);
  cudaGraphExec_t exec = nullptr;
  err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (err != cudaSuccess) {
    cudaGetLastError();
    fail("cudaGraphInstantiate failed: ", cudaGetErrorString(err), " (", cudaGetErrorName(err), ")");
  }
  if (info_err == cudaSuccess) info_err = cudaMemGetInfo(&free_after, &total);
  if (info_err != cudaSuccess) {
    cudaGetLastError();
    *bytes = 0;
  } else {
    *bytes = free_before > free_after ? free_before - free_after : 0;
  }
  return exec;
}

void capture_abort() noexcept {
  init();
  if (g_stream == nullptr) return;
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(g_stream, &st) == cudaSuccess && st != cudaStreamCaptureStatusNone) {
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(g_stream, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
  }
  if (g_capture_lock.owns_lock()) g_capture_lock.unlock();
  cudaGetLastError();
}

void graph_launch(void* exec) {
  require();
  DI_CHECK(exec != nullptr, "graph_launch: no executable graph");
  CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), g_stream));
}

void graph_destroy(void* exec) noexcept {
  if (exec == nullptr) return;
  if (cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec)) != cudaSuccess) cudaGetLastError();
}

void memory_info(size_t* free_bytes, size_t* total_bytes) {
  require();
  CUDA_CHECK(cudaStreamSynchronize(g_stream));
  cudaMemPool_t pool = nullptr;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));
  // Memory that captures allocated (graph memory nodes) stays reserved for graphs after their
  // executables are destroyed, until it is trimmed.
  CUDA_CHECK(cudaDeviceGraphMemTrim(device));
  CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
}

}  // namespace detinfer::cuda_runtime
