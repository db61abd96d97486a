// Development harness for the matmul kernels (csrc/kernels/matmul.cu), runnable without Node.
// Build: cmake -S . -B build-dev -DDETINFER_DEV_HARNESSES=ON && cmake --build build-dev --target dev_matmul
//        (or `npx cmake-js compile --CDDETINFER_DEV_HARNESSES=ON`; the binary lands in build/dev/)
// Run:   build/dev/dev_matmul check            CPU reference at small shapes (tails in M, N, K),
//                                              bitwise invariance across M, the variant's difference
//        build/dev/dev_matmul bench out.json   timings of every (N,K) x M of bench/matmul.mjs and
//                                              the device-to-device copy ceiling, as JSON; then every
//                                              tile configuration of matmul.cu on the same inputs,
//                                              each checked to give the production kernel's bits
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/config.h"
#include "cuda/check.h"
#include "cuda/runtime.h"
#include "kernels/matmul.cuh"
#include "ops.h"

using namespace detinfer;

namespace {

std::vector<uint16_t> random_bf16(size_t n, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<uint16_t> out(n);
  for (auto& v : out) {
    float x = dist(rng);
    v = f32_to_bf16(x == 0.f ? scale * 1e-3f : x);
  }
  return out;
}

Tensor upload(Device device, DType dtype, std::vector<int64_t> shape, const void* data) {
  Tensor t = make_tensor(device, dtype, shape);
  if (device == Device::CUDA) {
    cuda_runtime::upload(t.data(), data, t.nbytes());
  } else {
    std::memcpy(t.data(), data, t.nbytes());
  }
  return t;
}

std::vector<uint8_t> bytes_of(const Tensor& t) {
  std::vector<uint8_t> out(t.nbytes());
  if (t.device() == Device::CUDA) {
    cuda_runtime::download(out.data(), t.data(), t.nbytes());
  } else {
    std::memcpy(out.data(), t.data(), t.nbytes());
  }
  return out;
}

float value_at(const std::vector<uint8_t>& b, DType dtype, size_t i) {
  if (dtype == DType::F32) {
    float f;
    std::memcpy(&f, b.data() + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, b.data() + 2 * i, 2);
  return bf16_to_f32(h);
}

// GPU against the CPU backend and a float64 reference, at one shape.
bool check_reference(int64_t M, int64_t N, int64_t K, DType out_dtype, bool with_bias) {
  auto a = random_bf16(M * K, 1 + M, 1.f), w = random_bf16(N * K, 2 + N, 1.f), bias = random_bf16(N, 3, 1.f);
  Tensor ga = upload(Device::CUDA, DType::BF16, {M, K}, a.data()), gw = upload(Device::CUDA, DType::BF16, {N, K}, w.data());
  Tensor gb = upload(Device::CUDA, DType::BF16, {N}, bias.data());
  Tensor ca = upload(Device::CPU, DType::BF16, {M, K}, a.data()), cw = upload(Device::CPU, DType::BF16, {N, K}, w.data());
  Tensor cb = upload(Device::CPU, DType::BF16, {N}, bias.data());
  Tensor go = make_tensor(Device::CUDA, out_dtype, {M, N}), co = make_tensor(Device::CPU, out_dtype, {M, N});
  ops::matmul(go, ga, gw, with_bias ? &gb : nullptr);
  ops::matmul(co, ca, cw, with_bias ? &cb : nullptr);
  auto g = bytes_of(go), c = bytes_of(co);
  double num = 0, den = 0, num_cpu = 0, worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = with_bias ? bf16_to_f32(bias[n]) : 0.0;
      for (int64_t k = 0; k < K; ++k) ref += double(bf16_to_f32(a[m * K + k])) * bf16_to_f32(w[n * K + k]);
      double gv = value_at(g, out_dtype, m * N + n), cv = value_at(c, out_dtype, m * N + n);
      num += (gv - ref) * (gv - ref);
      num_cpu += (cv - ref) * (cv - ref);
      den += ref * ref;
      worst = std::max(worst, std::abs(gv - ref) / (std::abs(ref) + 1.0));
    }
  double rel = std::sqrt(num / den), rel_cpu = std::sqrt(num_cpu / den);
  // bf16 outputs: within twice the CPU backend's error. fp32 outputs carry only the accumulation
  // error, larger on tensor cores than in the CPU's fp32 lanes: an absolute relative bound.
  bool ok = std::isfinite(rel) && (out_dtype == DType::F32 ? rel < 2e-5 : rel < 1e-2 && rel <= 2 * rel_cpu + 1e-6);
  std::printf("%s reference M=%ld N=%ld K=%ld %s%s: rel err gpu %.3g cpu %.3g worst %.3g\n", ok ? "ok  " : "FAIL",
              long(M), long(N), long(K), dtype_name(out_dtype), with_bias ? " +bias" : "", rel, rel_cpu, worst);
  return ok;
}

// Rows of one matrix, computed inside batches of every M, must be bit-identical; returns whether
// any row differed (expected false for the invariant kernels, true somewhere for the variant).
bool rows_differ(int64_t N, int64_t K, const std::vector<int64_t>& Ms, bool verbose) {
  int64_t max_m = *std::max_element(Ms.begin(), Ms.end());
  auto a = random_bf16(max_m * K, 11, 1.f), w = random_bf16(N * K, 12, 1.f);
  Tensor ga = upload(Device::CUDA, DType::BF16, {max_m, K}, a.data()), gw = upload(Device::CUDA, DType::BF16, {N, K}, w.data());
  Tensor full = make_tensor(Device::CUDA, DType::BF16, {max_m, N});
  ops::matmul(full, ga, gw, nullptr);
  auto ref = bytes_of(full);
  bool differ = false;
  for (int64_t M : Ms) {
    // the first M rows, and M rows starting at an odd offset
    for (int64_t start : {int64_t{0}, std::min<int64_t>(max_m - M, 3)}) {
      Tensor sub = narrow_rows(ga, start, M);
      Tensor out = make_tensor(Device::CUDA, DType::BF16, {M, N});
      ops::matmul(out, sub, gw, nullptr);
      auto got = bytes_of(out);
      int64_t first = -1;
      for (size_t i = 0; i < got.size(); ++i)
        if (got[i] != ref[start * N * 2 + i]) {
          first = static_cast<int64_t>(i / 2);
          break;
        }
      if (first >= 0) differ = true;
      if (verbose || first >= 0)
        std::printf("  N=%ld K=%ld M=%ld start=%ld: %s\n", long(N), long(K), long(M), long(start),
                    first < 0 ? "bit-identical" : ("first difference at element " + std::to_string(first)).c_str());
    }
  }
  return differ;
}

// The decode configurations with compact a ("... a8", "... a16") take M up to that many rows.
bool config_takes(int config, int64_t M) {
  const char* a = std::strstr(cuda::matmul_dev::config_name(config), " a");
  return a == nullptr || M <= std::atoi(a + 2);
}

int check() {
  bool ok = true;
  for (auto [M, N, K] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 64, 64}, {3, 40, 72}, {16, 96, 128}, {17, 33, 264}, {64, 130, 512}, {100, 200, 320}, {129, 136, 1000},
           {300, 257, 520}, {1, 1000, 4104}})
    for (DType dt : {DType::BF16, DType::F32})
      for (bool bias : {false, true}) ok = check_reference(M, N, K, dt, bias) && ok;
  // Every tile configuration gives the production bits, tails in M, N and K included.
  for (auto [M, N, K] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 40, 72}, {37, 300, 1032}, {130, 1000, 4104}, {300, 520, 1024}, {5, 24, 8}, {13, 200, 1000},
           {8, 1024, 3072}}) {
    auto a = random_bf16(M * K, 21, 1.f), w = random_bf16(N * K, 22, 1.f);
    Tensor ga = upload(Device::CUDA, DType::BF16, {M, K}, a.data()), gw = upload(Device::CUDA, DType::BF16, {N, K}, w.data());
    Tensor gb = upload(Device::CUDA, DType::BF16, {N}, random_bf16(N, 23, 1.f).data());
    // f32 and bf16 outputs (bf16 is where the staged-store configurations store differently),
    // with and without a bias.
    for (DType dt : {DType::F32, DType::BF16})
      for (bool bias : {false, true}) {
        Tensor want = make_tensor(Device::CUDA, dt, {M, N}), got = make_tensor(Device::CUDA, dt, {M, N});
        ops::matmul(want, ga, gw, bias ? &gb : nullptr);
        auto wb = bytes_of(want);
        int bad = 0;
        for (int c = 0; c < cuda::matmul_dev::config_count(); ++c) {
          if (!config_takes(c, M)) continue;
          cuda::matmul_dev::matmul_with_config(got, ga, gw, bias ? &gb : nullptr, c);
          if (bytes_of(got) != wb) {
            ++bad;
            std::printf("  config %s differs at M=%ld N=%ld K=%ld\n", cuda::matmul_dev::config_name(c), long(M), long(N),
                        long(K));
          }
        }
        std::printf("%s all %d tile configurations give the same bits at M=%ld N=%ld K=%ld %s%s\n", bad ? "FAIL" : "ok  ",
                    cuda::matmul_dev::config_count(), long(M), long(N), long(K), dtype_name(dt), bias ? " +bias" : "");
        ok = ok && bad == 0;
      }
  }
  std::vector<int64_t> Ms{1, 2, 3, 7, 8, 16, 31, 64, 128, 257, 1024};
  for (auto [N, K] : std::vector<std::pair<int64_t, int64_t>>{{4096, 4096}, {1000, 1032}}) {
    g_variant_kernels = false;
    bool d = rows_differ(N, K, Ms, false);
    std::printf("%s invariant: rows bit-identical across M for N=%ld K=%ld\n", d ? "FAIL" : "ok  ", long(N), long(K));
    ok = ok && !d;
    g_variant_kernels = true;
    bool dv = rows_differ(N, K, Ms, false);
    g_variant_kernels = false;
    std::printf("%s variant: rows differ for some M, N=%ld K=%ld\n", dv ? "ok  " : "FAIL", long(N), long(K));
    ok = ok && dv;
  }
  std::printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}

// ---------------------------------------------------------------------------------------------
// Benchmark: median of per-call CUDA-event times over inputs rotated through a pool larger than L2.
struct Timer {
  cudaEvent_t start, stop;
  Timer() {
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~Timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
};

// Per call when `calls` calls are queued back to back between two events, median of `reps`
// repetitions. With calls = 1 that is the single-call time, launch included; with more it is the
// steady state of a forward pass, where launch and host time overlap the previous kernel.
template <typename F>
double back_to_back_us(F&& call, int calls, int reps) {
  cudaStream_t s = static_cast<cudaStream_t>(cuda_runtime::stream());
  Timer t;
  std::vector<double> times;
  for (int i = 0; i < 3; ++i) call(i);
  for (int r = 0; r < reps; ++r) {
    CUDA_CHECK(cudaEventRecord(t.start, s));
    for (int i = 0; i < calls; ++i) call(r * calls + i);
    CUDA_CHECK(cudaEventRecord(t.stop, s));
    CUDA_CHECK(cudaEventSynchronize(t.stop));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, t.start, t.stop));
    times.push_back(ms * 1e3 / calls);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

template <typename F>
double median_us(F&& call, int iters) {
  return back_to_back_us(call, 1, iters);
}

__global__ void count_differences(const uint16_t* a, const uint16_t* b, size_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    local += a[i] != b[i];
  if (local) atomicAdd(count, local);
}

__global__ void fill_random_bf16(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    float v = (static_cast<float>(h & 0xffff) / 65536.f - 0.5f) * 0.125f + 1e-4f;
    uint32_t bits;
    memcpy(&bits, &v, 4);
    p[i] = static_cast<uint16_t>(bits >> 16);
  }
}

int bench(const char* path) {
  FILE* f = std::fopen(path, "w");
  DI_CHECK(f, "cannot write ", path);
  cudaStream_t s = static_cast<cudaStream_t>(cuda_runtime::stream());
  // Ceiling: a 2 GiB device-to-device copy, bytes read + written.
  size_t copy_bytes = size_t(2) << 30;
  Tensor src = make_tensor(Device::CUDA, DType::BF16, {int64_t(copy_bytes / 2)});
  Tensor dst = make_tensor(Device::CUDA, DType::BF16, {int64_t(copy_bytes / 2)});
  fill_random_bf16<<<4096, 256, 0, s>>>(src.ptr<uint16_t>(), copy_bytes / 2, 7);
  double copy_us = median_us([&](int) { CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), copy_bytes, cudaMemcpyDeviceToDevice, s)); }, 20);
  double copy_gbs = 2.0 * copy_bytes / copy_us / 1e3;
  std::printf("copy 2 GiB: %.1f us, %.1f GB/s (read + written)\n", copy_us, copy_gbs);
  std::fprintf(f, "{\n  \"copy_gbs\": %.2f,\n  \"results\": [\n", copy_gbs);
  src = Tensor{};
  dst = Tensor{};
  cuda_runtime::synchronize();

  // 8B-class shapes, then Qwen3-0.6B's decode products (q|k|v, o, gate|up, down) at small M.
  std::vector<std::pair<int64_t, int64_t>> shapes{{4096, 4096}, {12288, 4096}, {4096, 12288}, {151936, 1024},
                                                  {4096, 1024}, {1024, 2048},  {6144, 1024},  {1024, 3072}};
  const std::vector<int64_t> all_ms{1, 8, 32, 128, 512, 4096}, decode_ms{1, 8, 16, 64};
  bool first = true, all_same = true;
  std::vector<std::string> sweep;
  for (auto [N, K] : shapes) {
    const std::vector<int64_t>& Ms = N * K <= 4096 * 4096 / 2 ? decode_ms : all_ms;
    size_t w_bytes = size_t(N) * K * 2;
    int pool = static_cast<int>(std::max<size_t>(2, (size_t(400) << 20) / w_bytes + 1));
    std::vector<Tensor> ws, as;
    for (int p = 0; p < pool; ++p) {
      ws.push_back(make_tensor(Device::CUDA, DType::BF16, {N, K}));
      fill_random_bf16<<<4096, 256, 0, s>>>(ws.back().ptr<uint16_t>(), size_t(N) * K, 100 + p);
    }
    for (int64_t M : Ms) {
      as.clear();
      for (int p = 0; p < pool; ++p) {
        as.push_back(make_tensor(Device::CUDA, DType::BF16, {M, K}));
        fill_random_bf16<<<1024, 256, 0, s>>>(as.back().ptr<uint16_t>(), size_t(M) * K, 200 + p);
      }
      Tensor out = make_tensor(Device::CUDA, DType::BF16, {M, N});
      int iters = M * N * K > (int64_t(1) << 36) ? 20 : 50;
      double us = median_us([&](int i) { ops::matmul(out, as[i % pool], ws[i % pool], nullptr); }, iters);
      double tflops = 2.0 * M * N * K / us / 1e6;
      double wgbs = double(w_bytes) / us / 1e3;
      double b2b = back_to_back_us([&](int i) { ops::matmul(out, as[i % pool], ws[i % pool], nullptr); },
                                   M * N * K > (int64_t(1) << 36) ? 5 : 20, 7);
      std::printf("N=%6ld K=%6ld M=%5ld: %9.1f us  %7.1f TFLOP/s  weights %7.1f GB/s (%.0f%% of copy); back to back %.1f us (%.0f%%)  [%s]\n",
                  long(N), long(K), long(M), us, tflops, wgbs, 100 * wgbs / copy_gbs, b2b,
                  100 * double(w_bytes) / b2b / 1e3 / copy_gbs,
                  cuda::matmul_dev::config_name(cuda::matmul_dev::production_config(M, N, K)));
      std::fprintf(f, "%s    {\"N\": %ld, \"K\": %ld, \"M\": %ld, \"us\": %.3f, \"tflops\": %.2f, \"weight_gbs\": %.2f, \"us_back_to_back\": %.3f, \"config\": \"%s\"}",
                   first ? "" : ",\n", long(N), long(K), long(M), us, tflops, wgbs, b2b,
                   cuda::matmul_dev::config_name(cuda::matmul_dev::production_config(M, N, K)));
      first = false;
      // Every tile configuration on the same inputs: time, and the same bits as production?
      ops::matmul(out, as[0], ws[0], nullptr);
      Tensor other = make_tensor(Device::CUDA, DType::BF16, {M, N});
      unsigned long long* count = nullptr;
      CUDA_CHECK(cudaMalloc(&count, sizeof(*count)));
      for (int c = 0; c < cuda::matmul_dev::config_count(); ++c) {
        if (M > 64 && std::strncmp(cuda::matmul_dev::config_name(c), "16x", 3) == 0) continue;
        if (!config_takes(c, M)) continue;
        auto run = [&](int i) { cuda::matmul_dev::matmul_with_config(other, as[i % pool], ws[i % pool], nullptr, c); };
        double cus = median_us(run, 10);
        // Decode-sized products: also back to back, which leaves out the launch and host time.
        double cb2b = M <= 128 ? back_to_back_us(run, 20, 5) : 0.0;
        cuda::matmul_dev::matmul_with_config(other, as[0], ws[0], nullptr, c);
        CUDA_CHECK(cudaMemsetAsync(count, 0, sizeof(*count), s));
        count_differences<<<1024, 256, 0, s>>>(out.ptr<uint16_t>(), other.ptr<uint16_t>(), size_t(M) * N, count);
        unsigned long long diffs = 0;
        CUDA_CHECK(cudaMemcpyAsync(&diffs, count, sizeof(diffs), cudaMemcpyDeviceToHost, s));
        CUDA_CHECK(cudaStreamSynchronize(s));
        std::string b2b = cb2b > 0 ? " (back to back " + std::to_string(cb2b).substr(0, 6) + " us)" : "";
        std::printf("    %-22s %9.1f us %7.1f TFLOP/s %7.1f GB/s%s %s\n", cuda::matmul_dev::config_name(c), cus,
                    2.0 * M * N * K / cus / 1e6, double(w_bytes) / cus / 1e3, b2b.c_str(),
                    diffs ? ("DIFFERENT BITS: " + std::to_string(diffs)).c_str() : "same bits");
        sweep.push_back("{\"N\": " + std::to_string(N) + ", \"K\": " + std::to_string(K) + ", \"M\": " +
                        std::to_string(M) + ", \"config\": \"" + cuda::matmul_dev::config_name(c) +
                        "\", \"us\": " + std::to_string(cus) + ", \"us_back_to_back\": " + std::to_string(cb2b) +
                        ", \"differing\": " + std::to_string(diffs) + "}");
        all_same = all_same && diffs == 0;
      }
      cudaFree(count);
      // Exploration for a split-K fixed per (N,K) (not used by production): what S K ranges,
      // combined in order through a workspace, would gain in decode and cost in prefill.
      if (M == 1 || M == 4096) {
        int c = cuda::matmul_dev::production_config(M, N, K);
        for (int splits : {2, 4}) {
          double sus = median_us([&](int i) { cuda::matmul_dev::matmul_with_config(other, as[i % pool], ws[i % pool], nullptr, c, splits); }, 10);
          std::printf("    split-K %d (%s)  %9.1f us %7.1f TFLOP/s %7.1f GB/s (another summation order: other bits)\n", splits,
                      cuda::matmul_dev::config_name(c), sus, 2.0 * M * N * K / sus / 1e6, double(w_bytes) / sus / 1e3);
        }
      }
    }
    ws.clear();
    as.clear();
    cuda_runtime::synchronize();
  }
  std::fprintf(f, "\n  ],\n  \"configs_same_bits\": %s,\n  \"sweep\": [\n", all_same ? "true" : "false");
  for (size_t i = 0; i < sweep.size(); ++i) std::fprintf(f, "    %s%s\n", sweep[i].c_str(), i + 1 < sweep.size() ? "," : "");
  std::fprintf(f, "  ]\n}\n");
  std::fclose(f);
  std::printf("every tile configuration gave the production bits: %s\n", all_same ? "yes" : "NO");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string mode = argc > 1 ? argv[1] : "check";
    if (mode == "check") return check();
    if (mode == "bench") return bench(argc > 2 ? argv[2] : "matmul_kernels.json");
    std::fprintf(stderr, "usage: dev_matmul check | bench OUT.json\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
