// A stream-ordered device scratch buffer (split-K and split-row workspaces of the variant
// configuration). Freed when it goes out of scope, also when a launch check throws; the free is
// enqueued on the device stream, so the kernels queued before it still see the memory.
#pragma once

#include <cstddef>
#include <utility>

#include "../cuda/runtime.h"

namespace detinfer::cuda {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t nbytes) : data_(cuda_runtime::alloc(nbytes)) {}
  ~DeviceBuffer() { cuda_runtime::free(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(std::exchange(other.data_, nullptr)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      cuda_runtime::free(data_);
      data_ = std::exchange(other.data_, nullptr);
    }
    return *this;
  }
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
};

}  // namespace detinfer::cuda
