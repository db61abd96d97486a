// Development harness for the RMSNorm kernels (csrc/kernels/rmsnorm.cu), runnable without Node.
// Build: cmake -S . -B build-dev -DDETINFER_DEV_HARNESSES=ON && cmake --build build-dev --target dev_rmsnorm
// Run:   build/dev/dev_rmsnorm      CPU reference (float64 and the CPU backend) at several hidden
//                                   sizes, bitwise invariance across row counts, the variant's
//                                   difference, then the bandwidth of rows x 4096 at a few row counts.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/config.h"
#include "dev/harness.cuh"
#include "ops.h"

using namespace detinfer;
using namespace detinfer::dev;

namespace {

// A [shape] bf16 tensor on `device` holding `data`.
Tensor upload(Device device, const std::vector<int64_t>& shape, const std::vector<uint16_t>& data) {
  return dev::upload(device, DType::BF16, shape, data.data());
}

bool check_reference(int64_t rows, int64_t H, bool fused) {
  auto x = random_bf16(rows * H, 1 + H, -2.f, 2.f), r = random_bf16(rows * H, 2 + H, -2.f, 2.f);
  auto w = random_bf16(H, 3, 0.5f, 1.5f);
  Tensor gx = upload(Device::CUDA, {rows, H}, x), gr = upload(Device::CUDA, {rows, H}, r), gw = upload(Device::CUDA, {H}, w);
  Tensor cx = upload(Device::CPU, {rows, H}, x), cr = upload(Device::CPU, {rows, H}, r), cw = upload(Device::CPU, {H}, w);
  Tensor go = make_tensor(Device::CUDA, DType::BF16, {rows, H}), co = make_tensor(Device::CPU, DType::BF16, {rows, H});
  float eps = 1e-6f;
  if (fused) {
    ops::add_rmsnorm(go, gr, gx, gw, eps);
    ops::add_rmsnorm(co, cr, cx, cw, eps);
  } else {
    ops::rmsnorm(go, gx, gw, eps);
    ops::rmsnorm(co, cx, cw, eps);
  }
  auto g = download<uint16_t>(go), c = download<uint16_t>(co);
  auto gres = download<uint16_t>(gr), cres = download<uint16_t>(cr);
  double num = 0, den = 0, num_cpu = 0;
  int64_t same_bits = 0;
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0;
    std::vector<double> in(H);
    for (int64_t j = 0; j < H; ++j) {
      in[j] = fused ? round_bf16(bf16_to_f32(r[i * H + j]) + bf16_to_f32(x[i * H + j])) : bf16_to_f32(x[i * H + j]);
      ss += in[j] * in[j];
    }
    double inv = 1.0 / std::sqrt(ss / H + eps);
    for (int64_t j = 0; j < H; ++j) {
      double ref = in[j] * inv * bf16_to_f32(w[j]);
      double gv = bf16_to_f32(g[i * H + j]), cv = bf16_to_f32(c[i * H + j]);
      num += (gv - ref) * (gv - ref);
      num_cpu += (cv - ref) * (cv - ref);
      den += ref * ref;
      same_bits += g[i * H + j] == c[i * H + j];
    }
  }
  bool res_ok = gres == cres;
  double rel = std::sqrt(num / den), rel_cpu = std::sqrt(num_cpu / den);
  bool ok = rel < 1e-2 && rel <= 2 * rel_cpu + 1e-6 && res_ok;
  std::printf("%s %s rows=%ld H=%ld: rel err gpu %.3g cpu %.3g, %.2f%% same bits as cpu%s\n", ok ? "ok  " : "FAIL",
              fused ? "add_rmsnorm" : "rmsnorm", long(rows), long(H), rel, rel_cpu, 100.0 * same_bits / (rows * H),
              res_ok ? "" : ", RESIDUAL DIFFERS");
  return ok;
}

// Rows of one input normalized in one launch of max_rows rows and again in launches of n rows
// (consecutive groups at every offset, written into one output): bitwise equal? The outputs are
// bf16, so a sum that moves in its last bit changes few elements; the variant check uses many
// short rows to make such a change certain to show.
bool rows_differ(int64_t H, int64_t max_rows, const std::vector<int64_t>& counts) {
  auto x = random_bf16(max_rows * H, 5, -3.f, 3.f), w = random_bf16(H, 6, 0.5f, 1.5f);
  Tensor gx = upload(Device::CUDA, {max_rows, H}, x), gw = upload(Device::CUDA, {H}, w);
  Tensor full = make_tensor(Device::CUDA, DType::BF16, {max_rows, H});
  bool variant = g_variant_kernels;
  g_variant_kernels = false;
  ops::rmsnorm(full, gx, gw, 1e-6f);
  g_variant_kernels = variant;
  auto ref = download<uint16_t>(full);
  bool differ = false;
  for (int64_t n : counts) {
    Tensor out = make_tensor(Device::CUDA, DType::BF16, {max_rows, H});
    int64_t covered = max_rows - max_rows % n;
    for (int64_t start = 0; start < covered; start += n) {
      Tensor dst = narrow_rows(out, start, n);
      ops::rmsnorm(dst, narrow_rows(gx, start, n), gw, 1e-6f);
    }
    auto got = download<uint16_t>(out);
    int64_t rows_differing = 0;
    for (int64_t r = 0; r < covered; ++r)
      rows_differing += !std::equal(got.begin() + r * H, got.begin() + (r + 1) * H, ref.begin() + r * H);
    if (rows_differing) std::printf("  H=%ld launches of %ld rows: %ld of %ld rows differ\n", long(H), long(n),
                                    long(rows_differing), long(covered));
    differ = differ || rows_differing > 0;
  }
  return differ;
}

int run() {
  bool ok = true;
  for (int64_t H : {1, 7, 64, 128, 1000, 2048, 4096, 5120, 8192, 16384})
    for (int64_t rows : {1, 5, 33})
      for (bool fused : {false, true}) ok = check_reference(rows, H, fused) && ok;
  for (int64_t H : {128, 4096, 8192}) {
    g_variant_kernels = false;
    bool d = rows_differ(H, 1024, {1, 2, 3, 4, 7, 64, 255, 256, 257, 1024});
    std::printf("%s invariant H=%ld: rows bit-identical across row counts\n", d ? "FAIL" : "ok  ", long(H));
    ok = ok && !d;
  }
  g_variant_kernels = true;
  bool dv = rows_differ(128, 65536, {1, 2, 3});
  g_variant_kernels = false;
  std::printf("%s variant H=128: rows differ for some row count\n", dv ? "ok  " : "FAIL");
  ok = ok && dv;
  // Bandwidth (bytes read + written) of rmsnorm at H = 4096.
  for (int64_t rows : {1, 16, 256, 4096, 32768}) {
    int64_t H = 4096;
    auto x = random_bf16(rows * H, 9, -1.f, 1.f), w = random_bf16(H, 10, 0.5f, 1.5f);
    Tensor gx = upload(Device::CUDA, {rows, H}, x), gw = upload(Device::CUDA, {H}, w);
    Tensor out = make_tensor(Device::CUDA, DType::BF16, {rows, H});
    double us = median_us([&](int) { ops::rmsnorm(out, gx, gw, 1e-6f); }, 30);
    std::printf("rmsnorm rows=%ld H=4096: %.1f us, %.1f GB/s\n", long(rows), us, 2.0 * rows * H * 2 / us / 1e3);
  }
  std::printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
