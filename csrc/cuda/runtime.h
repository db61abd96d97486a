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

}  // namespace detinfer::cuda_runtime
