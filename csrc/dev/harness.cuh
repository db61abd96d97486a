// What the kernel development harnesses (csrc/dev/*.cu) share: random inputs, copies between the
// host and the devices, counting differing elements, timing with CUDA events, and writing JSON.
// Each harness is one translation unit of its own executable (CMakeLists.txt builds dev_<name>
// from csrc/dev/<name>.cu), which is the only kind of file that includes this header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/error.h"
#include "common/tensor.h"
#include "cuda/check.h"
#include "cuda/runtime.h"
#include "ops.h"

namespace detinfer::dev {

inline cudaStream_t stream() { return static_cast<cudaStream_t>(cuda_runtime::stream()); }

// ---- inputs and copies ------------------------------------------------------------------------

// n bf16 values uniform in [lo, hi) (mt19937 from seed); an exact 0 becomes 1e-3.
inline std::vector<uint16_t> random_bf16(size_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<uint16_t> out(n);
  for (auto& v : out) {
    float x = dist(rng);
    v = f32_to_bf16(x == 0.f ? 1e-3f : x);
  }
  return out;
}

// A tensor of `shape` on `device` holding the bytes at `data`.
inline Tensor upload(Device device, DType dtype, const std::vector<int64_t>& shape, const void* data) {
  Tensor t = make_tensor(device, dtype, shape);
  if (device == Device::CUDA) {
    cuda_runtime::upload(t.data(), data, t.nbytes());
  } else {
    std::memcpy(t.data(), data, t.nbytes());
  }
  return t;
}

// The contents of a CPU or CUDA tensor as host values of type T (T's size divides the tensor's).
template <typename T>
std::vector<T> download(const Tensor& t) {
  std::vector<T> out(t.nbytes() / sizeof(T));
  if (t.device() == Device::CUDA) {
    cuda_runtime::download(out.data(), t.data(), t.nbytes());
  } else {
    std::memcpy(out.data(), t.data(), t.nbytes());
  }
  return out;
}

// A copy of t on `device` (CPU <-> CUDA).
inline Tensor copy_to(const Tensor& t, Device device) {
  DI_CHECK(t.device() != device, "copy_to: the tensor is already on ", device_name(device));
  Tensor out = make_tensor(device, t.dtype, t.shape);
  if (device == Device::CPU) {
    cuda_runtime::download(out.data(), t.data(), t.nbytes());
  } else {
    cuda_runtime::upload(out.data(), t.data(), t.nbytes());
  }
  return out;
}

// Random bf16 values in [-range, range) made on the device (inputs of gigabytes), a hash of the
// element index and the seed.
__global__ void fill_random_bf16_kernel(__nv_bfloat16* x, size_t n, uint32_t seed, float range) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += gridDim.x * static_cast<size_t>(blockDim.x)) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u ^ seed ^ static_cast<uint32_t>(i >> 32) * 0x85EBCA77u;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    x[i] = __float2bfloat16_rn((static_cast<float>(h >> 8) * (1.f / 16777216.f) * 2.f - 1.f) * range);
  }
}

inline void fill_random(Tensor& t, uint32_t seed, float range) {
  DI_CHECK(t.dtype == DType::BF16 && t.device() == Device::CUDA, "fill_random: expected a CUDA bf16 tensor but received ",
           t.describe());
  fill_random_bf16_kernel<<<1024, 256, 0, stream()>>>(t.ptr<__nv_bfloat16>(), t.numel(), seed, range);
  CUDA_CHECK_LAUNCH("fill_random_bf16", t.describe());
}

// ---- comparing outputs ------------------------------------------------------------------------

__global__ void count_differences_kernel(const uint16_t* a, const uint16_t* b, size_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    local += a[i] != b[i];
  if (local) atomicAdd(count, local);
}

// How many 16-bit elements of two CUDA tensors of the same size differ (on the device; waits for
// the stream).
inline uint64_t count_differences(const Tensor& a, const Tensor& b) {
  DI_CHECK(a.nbytes() == b.nbytes() && dtype_size(a.dtype) == 2 && dtype_size(b.dtype) == 2,
           "count_differences: expected two 16-bit tensors of one size but received ", a.describe(), " and ",
           b.describe());
  unsigned long long* count = nullptr;
  CUDA_CHECK(cudaMalloc(&count, sizeof(*count)));
  unsigned long long diffs = 0;
  cudaError_t err = cudaMemsetAsync(count, 0, sizeof(*count), stream());
  if (err == cudaSuccess) {
    count_differences_kernel<<<1024, 256, 0, stream()>>>(a.ptr<uint16_t>(), b.ptr<uint16_t>(), a.numel(), count);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess) err = cudaMemcpyAsync(&diffs, count, sizeof(diffs), cudaMemcpyDeviceToHost, stream());
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream());
  cudaFree(count);
  CUDA_CHECK(err);
  return diffs;
}

// ---- timing -------------------------------------------------------------------------------------

struct EventPair {
  cudaEvent_t start, stop;
  EventPair() {
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~EventPair() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;
  // Milliseconds between the two events, once stop has completed.
  float elapsed_ms() const {
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    return ms;
  }
};

inline double median(std::vector<double> v) {
  DI_CHECK(!v.empty(), "median: no values");
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Microseconds per call when `calls` calls are queued back to back between two events, median of
// `reps` repetitions after 3 warm-up calls. With calls = 1 that is the single-call time, launch
// included; with more it is the steady state of a forward pass, where launch and host time overlap
// the previous kernel. call(i) gets a running index (to rotate through inputs).
template <typename F>
double back_to_back_us(F&& call, int calls, int reps) {
  EventPair t;
  std::vector<double> times;
  for (int i = 0; i < 3; ++i) call(i);
  for (int r = 0; r < reps; ++r) {
    CUDA_CHECK(cudaEventRecord(t.start, stream()));
    for (int i = 0; i < calls; ++i) call(r * calls + i);
    CUDA_CHECK(cudaEventRecord(t.stop, stream()));
    times.push_back(t.elapsed_ms() * 1e3 / calls);
  }
  return median(times);
}

// Median single-call time, launch included.
template <typename F>
double median_us(F&& call, int iters) {
  return back_to_back_us(call, 1, iters);
}

__global__ void spin_kernel(long long cycles) {
  long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

// Median GPU time of one call: a spin kernel queued before each start event lets the host enqueue
// the call ahead, so that its launch overhead is not counted.
template <typename F>
double median_gpu_us(F&& call, int iters) {
  EventPair t;
  std::vector<double> times;
  for (int i = 0; i < 3; ++i) call(i);
  for (int i = 0; i < iters; ++i) {
    spin_kernel<<<1, 1, 0, stream()>>>(100000);
    CUDA_CHECK(cudaEventRecord(t.start, stream()));
    call(i);
    CUDA_CHECK(cudaEventRecord(t.stop, stream()));
    times.push_back(t.elapsed_ms() * 1e3);
  }
  return median(times);
}

// The bandwidth ceiling: GB/s (bytes read + written) of a device-to-device copy of `bytes`.
inline double copy_gbs(size_t bytes) {
  void *a = nullptr, *b = nullptr;
  CUDA_CHECK(cudaMalloc(&a, bytes));
  cudaError_t err = cudaMalloc(&b, bytes);
  double us = 0;
  if (err == cudaSuccess) err = cudaMemsetAsync(a, 1, bytes, stream());
  if (err == cudaSuccess)
    us = median_gpu_us([&](int) { CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream())); }, 20);
  cudaFree(a);
  if (b) cudaFree(b);
  CUDA_CHECK(err);
  return 2.0 * bytes / us / 1e3;
}

// ---- JSON output --------------------------------------------------------------------------------

inline std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// One JSON object on one line, built field by field in order:
//   JsonObject().integer("N", 4096).number("us", 12.5, 3).string("config", name).text()
class JsonObject {
 public:
  JsonObject& integer(const char* key, int64_t v) { return raw(key, std::to_string(v)); }
  JsonObject& number(const char* key, double v, int decimals) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.*f", decimals, v);
    return raw(key, buf);
  }
  JsonObject& string(const char* key, const std::string& v) { return raw(key, json_quote(v)); }
  JsonObject& boolean(const char* key, bool v) { return raw(key, v ? "true" : "false"); }
  // A value that is JSON text already (a nested object or array).
  JsonObject& raw(const char* key, const std::string& json) {
    body_ += (body_.empty() ? "" : ", ") + json_quote(key) + ": " + json;
    return *this;
  }
  std::string text() const { return "{" + body_ + "}"; }

 private:
  std::string body_;
};

// A JSON array of the given JSON texts, one per line, each line indented by `indent`.
inline std::string json_array(const std::vector<std::string>& items, const std::string& indent) {
  if (items.empty()) return "[]";
  std::string out = "[\n";
  for (size_t i = 0; i < items.size(); ++i) out += indent + items[i] + (i + 1 < items.size() ? ",\n" : "\n");
  return out + indent.substr(0, indent.size() >= 2 ? indent.size() - 2 : 0) + "]";
}

inline void write_file(const std::string& path, const std::string& text) {
  FILE* f = std::fopen(path.c_str(), "w");
  DI_CHECK(f, "cannot write ", path);
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  const bool closed = std::fclose(f) == 0;
  DI_CHECK(ok && closed, "cannot write ", path);
}

}  // namespace detinfer::dev
