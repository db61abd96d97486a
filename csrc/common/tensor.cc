#include "tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "bf16.h"

namespace detinfer {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::BF16:
    case DType::F16:
    case DType::U16:
      return 2;
    case DType::F32:
    case DType::I32:
      return 4;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::F32: return "f32";
    case DType::I32: return "i32";
    case DType::U16: return "u16";
  }
  return "?";
}

DType parse_dtype(const std::string& name) {
  if (name == "bf16") return DType::BF16;
  if (name == "f16") return DType::F16;
  if (name == "f32") return DType::F32;
  if (name == "i32") return DType::I32;
  if (name == "u16") return DType::U16;
  fail("Expected one of bf16, f16, f32, i32, u16 for dtype but received '", name, "'");
}

const char* device_name(Device device) { return device == Device::CPU ? "cpu" : "cuda"; }

Device parse_device(const std::string& name) {
  if (name == "cpu") return Device::CPU;
  if (name == "cuda") return Device::CUDA;
  fail("Expected 'cpu' or 'cuda' for device but received '", name, "'");
}

namespace {
void* host_alloc(size_t nbytes) {
  // 64-byte alignment so that vector loads in the CPU backend never straddle lines.
  void* data = std::aligned_alloc(64, (nbytes + 63) / 64 * 64);
  if (data == nullptr) fail("out of host memory allocating ", nbytes, " bytes");
  return data;
}
void host_free(void* ptr) noexcept { std::free(ptr); }
}  // namespace

const Allocator kHostAllocator{host_alloc, host_free};

Storage::Storage(Device device_, const Allocator& allocator_, size_t nbytes_)
    : device(device_), allocator(&allocator_), nbytes(nbytes_) {
  data = allocator->alloc(nbytes == 0 ? 1 : nbytes);
}

Storage::~Storage() { allocator->free(data); }

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? "," : "") << shape[i];
  os << "]";
  return os.str();
}

std::string Tensor::describe() const {
  return std::string(dtype_name(dtype)) + shape_string(shape) + " on " + device_name(device());
}

// The element count of `shape` and its bytes at `dtype`, refused when a dimension is negative or
// the bytes pass 2^62 (a product that wrapped around would give a tensor of that shape a small
// allocation, and every op a write past it).
static int64_t checked_numel(const std::vector<int64_t>& shape, DType dtype) {
  constexpr int64_t kMaxBytes = int64_t{1} << 62;
  int64_t n = 1;
  for (int64_t d : shape) {
    DI_CHECK(d >= 0, "Expected non-negative dimensions for shape but received ", shape_string(shape));
    DI_CHECK(!__builtin_mul_overflow(n, d, &n) && n <= kMaxBytes / static_cast<int64_t>(dtype_size(dtype)),
             "Expected a shape of at most 2^62 bytes but received ", shape_string(shape), " of ", dtype_name(dtype));
  }
  return n;
}

Tensor allocate_tensor(Device device, const Allocator& allocator, DType dtype, const std::vector<int64_t>& shape) {
  const int64_t n = checked_numel(shape, dtype);
  Tensor t;
  t.storage = std::make_shared<Storage>(device, allocator, static_cast<size_t>(n) * dtype_size(dtype));
  t.dtype = dtype;
  t.shape = shape;
  return t;
}

Tensor reshape(const Tensor& t, const std::vector<int64_t>& shape) {
  Tensor v = t;
  v.shape = shape;
  DI_CHECK(checked_numel(shape, t.dtype) == t.numel(), "cannot view ", t.describe(), " as ", shape_string(shape),
           ": element counts differ");
  return v;
}

Tensor narrow_rows(const Tensor& t, int64_t start, int64_t count) {
  DI_CHECK(t.rank() >= 1, "cannot take rows of a scalar tensor");
  DI_CHECK(start >= 0 && count >= 0 && start + count <= t.shape[0], "rows [", start, ", ",
           start + count, ") are out of range for ", t.describe());
  Tensor v = t;
  int64_t row = t.numel() / (t.shape[0] == 0 ? 1 : t.shape[0]);
  v.offset = t.offset + static_cast<size_t>(start * row) * dtype_size(t.dtype);
  v.shape[0] = count;
  return v;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400) == 0) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp - 15 + 127) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow to inf
  if (absx < 0x38800000u) {  // subnormal or zero in f16
    float af;
    std::memcpy(&af, &absx, 4);
    // 2^-24 is the f16 subnormal step; scale and round to nearest even through float arithmetic
    float scaled = af * 16777216.0f;
    uint32_t q = static_cast<uint32_t>(scaled);
    float rem = scaled - static_cast<float>(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t rounded = absx + 0xfffu + ((absx >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

}  // namespace detinfer
