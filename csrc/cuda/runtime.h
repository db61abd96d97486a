// The CUDA runtime as the rest of the native code sees it: device discovery, one stream per
// process (device 0), allocation, copies. Compiled as runtime.cc when CUDA is enabled and as
// runtime_stub.cc (every call throws a clear error) when the package is built without it.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace detinfer::cuda_runtime {

struct DeviceInfo {
  int index;
  std::string name;
  int major, minor;
  size_t total_memory;
  int multiprocessors;
};

struct Status {
  bool compiled;           // built with CUDA
  bool available;          // a usable device is there
  std::string reason;      // why not, when !available
  std::string archs;       // compiled architectures, e.g. "80;86;89;90a"
  int runtime_version;     // cudaRuntimeGetVersion, 0 when not compiled
  int driver_version;      // cudaDriverGetVersion, 0 when none
  std::vector<DeviceInfo> devices;
};

Status status();
// Throws an Error explaining why CUDA cannot be used, unless it can.
void require();
void* alloc(size_t nbytes);
void free(void* ptr) noexcept;
void upload(void* dst, const void* src, size_t nbytes);          // host -> device, waits
void download(void* dst, const void* src, size_t nbytes);        // device -> host, waits
void copy_async(void* dst, const void* src, size_t nbytes);      // device -> device, enqueued
void synchronize();
// The stream every op is enqueued on (a cudaStream_t, as void* so that headers stay CUDA-free).
void* stream();
// The current device's multiprocessors (SMs), queried once: what the kernels' launch rules count.
int multiprocessors();

// host -> device without waiting: src is copied into a pinned staging ring and the device copy is
// enqueued from there, so src may be reused at once. A ring region is written again only after the
// stream has been synchronized past its copy. Throws while the stream is being captured (a captured
// copy would replay whatever the staging bytes hold at replay time).
void upload_async(void* dst, const void* src, size_t nbytes);

// device -> host, enqueued now and waited for later: download_begin enqueues the copy of src on
// the stream, behind every op enqueued so far and ahead of every later one, into a pinned staging
// block, and returns its handle; download_finish (any thread) waits for that copy, copies the bytes
// to dst and gives the block back (also when it throws); download_abandon gives it back unread.
// At most kMaxStagedDownload bytes; throws while the stream is being captured.
constexpr size_t kMaxStagedDownload = size_t{1} << 20;
void* download_begin(const void* src, size_t nbytes);
void download_finish(void* handle, void* dst);
void download_abandon(void* handle) noexcept;

// CUDA graphs of the one stream. capture_begin starts recording (thread-local mode: only this
// thread's unsafe calls invalidate it); capture_end stops, instantiates and returns the executable
// graph (a cudaGraphExec_t), with *bytes the GPU memory its instantiation took; a capture
// invalidated by an unsafe call (a synchronization, say) throws. capture_abort ends a capture after
// an error and clears the error; it does nothing when no capture is running.
void capture_begin();
void* capture_end(size_t* bytes);
void capture_abort() noexcept;
void graph_launch(void* exec);
void graph_destroy(void* exec) noexcept;
// Free and total device memory (cudaMemGetInfo) after the stream's work has run and the
// stream-ordered pool has handed unused memory back.
void memory_info(size_t* free_bytes, size_t* total_bytes);

}  // namespace detinfer::cuda_runtime
