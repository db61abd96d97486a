// Tensors as the ops see them: a typed, shaped view into a storage block that lives on one device.
// Storage is reference counted so views (reshape, row ranges) keep their parent's memory alive.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "error.h"

namespace detinfer {

// U16: unsigned counts (the logit processors' token counts, common/logit_processors.h).
enum class DType : int { BF16 = 0, F16 = 1, F32 = 2, I32 = 3, U16 = 4 };
enum class Device : int { CPU = 0, CUDA = 1 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
DType parse_dtype(const std::string& name);
const char* device_name(Device device);
Device parse_device(const std::string& name);

// Where a storage's memory comes from and where it goes back. common/ knows host memory alone;
// make_tensor (ops.h) picks the CUDA runtime's allocator for CUDA tensors.
struct Allocator {
  void* (*alloc)(size_t nbytes);  // throws an Error when out of memory
  void (*free)(void* ptr) noexcept;
};
// 64-byte aligned host memory.
extern const Allocator kHostAllocator;

// A block of memory owned by one device; freed by the allocator that gave it.
struct Storage {
  Device device;
  const Allocator* allocator;
  void* data = nullptr;
  size_t nbytes = 0;
  Storage(Device device, const Allocator& allocator, size_t nbytes);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
};

struct Tensor {
  std::shared_ptr<Storage> storage;
  size_t offset = 0;  // bytes from storage->data
  DType dtype = DType::F32;
  std::vector<int64_t> shape;

  Device device() const { return storage->device; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape.at(i < 0 ? shape.size() + i : i); }
  int rank() const { return static_cast<int>(shape.size()); }
  void* data() const { return static_cast<char*>(storage->data) + offset; }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data()); }
  std::string describe() const;  // "bf16[4,4096] on cuda"
};

// An uninitialised tensor of `shape` whose memory comes from `allocator` (see make_tensor in ops.h).
Tensor allocate_tensor(Device device, const Allocator& allocator, DType dtype, const std::vector<int64_t>& shape);
// Same memory, new shape; the element count must match.
Tensor reshape(const Tensor& t, const std::vector<int64_t>& shape);
// Rows [start, start+count) of dimension 0.
Tensor narrow_rows(const Tensor& t, int64_t start, int64_t count);
std::string shape_string(const std::vector<int64_t>& shape);

}  // namespace detinfer
