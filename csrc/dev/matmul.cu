// Development harness for the matmul kernels (csrc/kernels/matmul.cu), runnable without Node.
// Build: cmake -S . -B build-dev -DDETINFER_DEV_HARNESSES=ON && cmake --build build-dev --target dev_matmul
//        (or `npx cmake-js compile --CDDETINFER_DEV_HARNESSES=ON`; the binary lands in build/dev/)
// Run:   build/dev/dev_matmul check            CPU reference at small shapes (tails in M, N, K),
//                                              bitwise invariance across M, the variant's difference,
//                                              every configuration's bits against production's
//        build/dev/dev_matmul bench out.json   timings of every (N,K) x M of bench/matmul.mjs and
//                                              the device-to-device copy ceiling, as JSON; then every
//                                              tile configuration on the same inputs, each checked to
//                                              give the production kernel's bits
//        build/dev/dev_matmul bench out.json decode   the same at M = 1, 8 and 64 only
//        build/dev/dev_matmul bench out.json prefill  the 8B-class shapes at M = 512, 2048 and 4096 only
//        build/dev/dev_matmul bench out.json lmhead   the 151936 x 1024 LM head at M = 1, 8, 16 and 64 only
//        build/dev/dev_matmul bench out.json batch    Qwen3-0.6B's decode products at M = 16 to 64 only
//        build/dev/dev_matmul bench out.json batch8b  Qwen3-8B's decode products at M = 1 to 64 only
//        build/dev/dev_matmul bench out.json ragged   Llama-3.1-8B's gate|up and 32k-vocabulary LM heads
//                                              at M = 1 to 64 only
//        build/dev/dev_matmul gate-up          matmul + silu_mul_packed against matmul_silu_mul at
//                                              the 0.6B and 8B gate|up shapes: time and bits
//        build/dev/dev_matmul families         Hopper: fp32 outputs of the wgmma and the mma.sync
//                                              family on the same inputs, compared bit for bit
//        build/dev/dev_matmul mma-peak         the mma.sync tensor-core ceiling (TFLOP/s, registers only)
//        build/dev/dev_matmul mma-chain        cycles per step of dependent mma.sync chains in one warp
//        build/dev/dev_matmul wgmma-rate       Hopper: cycles per k16 step of wgmma m64nNk16 with both
//                                              operands in shared memory, issued as the decode tiles
//                                              issue them, by N, warpgroups per block and chains
//        build/dev/dev_matmul run CONFIG M N K one configuration at one shape (for a profiler)
// The configurations: the library holds the ones production chooses (cuda::matmul_dev); the ones
// explored and not chosen are instantiated here, from the kernel templates the library uses
// (matmul_tiles.cuh for mma.sync, matmul_sm90_kernel.cuh for wgmma), so each still gives the same
// K chain and is checked to give the same bits.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "common/bf16.h"
#include "common/config.h"
#include "cuda/check.h"
#include "cuda/runtime.h"
#include "dev/harness.cuh"
#include "kernels/matmul.cuh"
#include "kernels/matmul_sm90_kernel.cuh"
#include "kernels/matmul_tiles.cuh"
#include "ops.h"

using namespace detinfer;
using namespace detinfer::dev;
namespace mma_sync = detinfer::cuda::mma_sync;
namespace sm90 = detinfer::cuda::sm90;

namespace {

// ---------------------------------------------------------------------------------------------
// Configurations measured and not chosen. mma.sync: smaller and wider decode tiles, other depths
// and k-blocks per stage, larger prefill tiles. wgmma: other widths and depths, a full-height copy
// of a, 128x256 with one stage fewer than s4 and no staging, and narrow tiles with compact a
// between the two decode widths production chooses.
namespace explored {
using mma_sync::MatmulTiles;
using sm90::Tiles;

const mma_sync::TileEntry kMmaSync[] = {
    {"16x32 w1x4 s8", mma_sync::launch_tiles<MatmulTiles<16, 32, 1, 4, 8, 1>>},
    {"16x16 w1x2 s8", mma_sync::launch_tiles<MatmulTiles<16, 16, 1, 2, 8, 2>>},
    {"16x16 w1x2 s4 kb4", mma_sync::launch_tiles<MatmulTiles<16, 16, 1, 2, 4, 2, 4>>},
    {"16x8 w1x1 s4 kb4", mma_sync::launch_tiles<MatmulTiles<16, 8, 1, 1, 4, 4, 4>>},
    {"16x16 w1x2 s6 kb2", mma_sync::launch_tiles<MatmulTiles<16, 16, 1, 2, 6, 2, 2>>},
    {"32x64 w1x4 s4 kb2", mma_sync::launch_tiles<MatmulTiles<32, 64, 1, 4, 4, 1, 2>>},
    {"64x64 w2x2 s3 kb2", mma_sync::launch_tiles<MatmulTiles<64, 64, 2, 2, 3, 2, 2>>},
    {"128x64 w2x2 s4", mma_sync::launch_tiles<MatmulTiles<128, 64, 2, 2, 4, 2>>},
    {"128x128 w2x4 s4", mma_sync::launch_tiles<MatmulTiles<128, 128, 2, 4, 4, 1>>},
    {"128x256 w2x4 s3", mma_sync::launch_tiles<MatmulTiles<128, 256, 2, 4, 3, 1>>},
    {"16x64 w1x4 s6", mma_sync::launch_tiles<MatmulTiles<16, 64, 1, 4, 6, 1>>},
    // Fragments double-buffered across k16 steps and k-blocks ("f2"; production takes 128x256).
    {"256x128 w4x2 s3 f2", mma_sync::launch_tiles<MatmulTiles<256, 128, 4, 2, 3, 1, 1, true>>},
    {"128x128 w2x4 s3 f2", mma_sync::launch_tiles<MatmulTiles<128, 128, 2, 4, 3, 2, 1, true>>},
    {"64x64 w2x2 s4 f2", mma_sync::launch_tiles<MatmulTiles<64, 64, 2, 2, 4, 2, 1, true>>},
    {"16x32 w1x4 s12 f2", mma_sync::launch_tiles<MatmulTiles<16, 32, 1, 4, 12, 1, 1, true>>},
};

const sm90::Entry kWgmma[] = {
    {"wg 64x16 s8", sm90::launch_tiles<Tiles<64, 16, 8>>},
    {"wg 64x32 s16", sm90::launch_tiles<Tiles<64, 32, 16>>},
    {"wg 64x256 s4", sm90::launch_tiles<Tiles<64, 256, 4>>},
    {"wg 128x64 s8", sm90::launch_tiles<Tiles<128, 64, 8>>},
    {"wg 128x128 s6", sm90::launch_tiles<Tiles<128, 128, 6>>},
    {"wg 64x32 s16 full-a", sm90::launch_tiles<Tiles<64, 32, 16, false, true>>},
    {"wg 128x256 s3", sm90::launch_tiles<Tiles<128, 256, 3>>},
    {"wg 64x16 s24 a8", sm90::launch_tiles<Tiles<64, 16, 24, false, false, 8, 8>>},
    {"wg 64x64 s12 a8", sm90::launch_tiles<Tiles<64, 64, 12, false, false, 8, 8>>},
    {"wg 64x8 s16 a8 kt2", sm90::launch_tiles<Tiles<64, 8, 16, false, false, 8, 8, 2>>},
    {"wg 64x8 s4 a8 kt8", sm90::launch_tiles<Tiles<64, 8, 4, false, false, 8, 8, 8>>},
    {"wg 64x32 s8 a16 kt2", sm90::launch_tiles<Tiles<64, 32, 8, false, false, 8, 16, 2>>},
    {"wg 64x16 s8 a16 kt4", sm90::launch_tiles<Tiles<64, 16, 8, false, false, 8, 16, 4>>},
    // More bytes per copy for N = K = 4096 at M <= 8 (62% of copy with 64x32 s4 a8 kt4).
    {"wg 64x32 s3 a8 kt8", sm90::launch_tiles<Tiles<64, 32, 3, false, false, 8, 8, 8>>},
    {"wg 64x64 s4 a8 kt4", sm90::launch_tiles<Tiles<64, 64, 4, false, false, 8, 8, 4>>},
    {"wg 64x64 s2 a8 kt8", sm90::launch_tiles<Tiles<64, 64, 2, false, false, 8, 8, 8>>},
    // Several K tiles per copy for the 64-row tiles (M 17-64: batch 64 decode), a copied as 64 rows.
    {"wg 64x32 s4 kt2", sm90::launch_tiles<Tiles<64, 32, 4, false, false, 8, 64, 2>>},
    {"wg 64x64 s4 kt2", sm90::launch_tiles<Tiles<64, 64, 4, false, false, 8, 64, 2>>},
    {"wg 64x128 s4 kt2", sm90::launch_tiles<Tiles<64, 128, 4, false, false, 8, 64, 2>>},
    {"wg 128x128 s2 kt2 staged", sm90::launch_tiles<Tiles<128, 128, 2, true, false, 8, 128, 2>>},
    // 4 K tiles per copy for the 64-row tiles, narrower and wider than the two production takes.
    {"wg 64x8 s5 kt4", sm90::launch_tiles<Tiles<64, 8, 5, false, false, 8, 64, 4>>},
    {"wg 64x64 s3 kt4", sm90::launch_tiles<Tiles<64, 64, 3, false, false, 8, 64, 4>>},
    {"wg 64x16 s8 kt2", sm90::launch_tiles<Tiles<64, 16, 8, false, false, 8, 64, 2>>},
    // The LM head (151936 x 1024) at decode M: compact a beside the wide tiles production takes
    // (64x128 s8 copies all 64 rows of a), shallower rings for two or three blocks per SM, and
    // 256 columns.
    {"wg 64x128 s8 a8", sm90::launch_tiles<Tiles<64, 128, 8, false, false, 8, 8>>},
    {"wg 64x128 s12 a8", sm90::launch_tiles<Tiles<64, 128, 12, false, false, 8, 8>>},
    {"wg 64x128 s4 a8", sm90::launch_tiles<Tiles<64, 128, 4, false, false, 8, 8>>},
    {"wg 64x128 s3 a8 kt2", sm90::launch_tiles<Tiles<64, 128, 3, false, false, 8, 8, 2>>},
    {"wg 64x128 s8 a16", sm90::launch_tiles<Tiles<64, 128, 8, false, false, 8, 16>>},
    {"wg 64x256 s6 a8", sm90::launch_tiles<Tiles<64, 256, 6, false, false, 8, 8>>},
    {"wg 64x128 s4", sm90::launch_tiles<Tiles<64, 128, 4>>},
    // Batch-sized decode in output tiles of 32 rows of a compact a (production takes 64x32 and
    // 64x16 at M 17-32), 8 columns wide.
    {"wg 64x8 s8 a32 kt4", sm90::launch_tiles<Tiles<64, 8, 8, false, false, 8, 32, 4>>},
};
}  // namespace explored

// Every configuration of the family this device runs: first the library's (production's, by
// their index there), then the explored ones of this file.
struct Config {
  std::string name;
  int library_index;  // -1: explored
  int explored_index;
};

std::vector<Config> all_configs() {
  std::vector<Config> out;
  for (int i = 0; i < cuda::matmul_dev::config_count(); ++i) out.push_back({cuda::matmul_dev::config_name(i), i, -1});
  const bool wgmma = cuda::matmul_dev::wgmma();
  const int n = wgmma ? static_cast<int>(std::size(explored::kWgmma)) : static_cast<int>(std::size(explored::kMmaSync));
  for (int i = 0; i < n; ++i)
    out.push_back({wgmma ? explored::kWgmma[i].name : explored::kMmaSync[i].name, -1, i});
  return out;
}

// The decode configurations with compact a ("... a8", "... a16") and one K tile per copy take M up
// to that many rows (with several, any M, in output tiles of that many rows); those with several
// K tiles per copy ("... kt4") take K a multiple of that many tiles of 64.
bool config_takes(const Config& c, int64_t M, int64_t K) {
  const char* a = std::strstr(c.name.c_str(), " a");
  const char* kt = std::strstr(c.name.c_str(), " kt");
  if (kt && K % (64 * std::atoi(kt + 3)) != 0) return false;
  // The explored wgmma tiles run the library's accumulator chains for K, which the 256-column ones
  // cannot hold at two (sm90::launch takes 128x128 for its own configurations instead).
  if (c.library_index < 0 && cuda::matmul_dev::wgmma() && sm90::chains(K) == 2 && std::strstr(c.name.c_str(), "x256"))
    return false;
  return a == nullptr || kt != nullptr || M <= std::atoi(a + 2);
}

// out = a · w^T (+ bias) with configuration c, on the invariant path (one K chain, no split).
// The inputs are the harness's own: K a multiple of 8, rows 16-byte aligned, as ops::matmul checks.
void matmul_with(const Config& c, Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias) {
  if (c.library_index >= 0) {
    cuda::matmul_dev::matmul_with_config(out, a, w, bias, c.library_index);
    return;
  }
  const int M = static_cast<int>(a.dim(0)), K = static_cast<int>(a.dim(1)), N = static_cast<int>(w.dim(0));
  DI_CHECK(K > 0 && K % mma_sync::kChunk == 0, "dev_matmul: K = ", K, " is not a positive multiple of ", mma_sync::kChunk);
  const void* b = bias ? bias->data() : nullptr;
  const bool f32 = out.dtype == DType::F32;
  if (cuda::matmul_dev::wgmma()) {
    sm90::Problem p{a.data(), w.data(), b, out.data(), f32, M, N, K, K, 1};
    p.chains = sm90::chains(K);
    explored::kWgmma[c.explored_index].launch(p, stream());
  } else {
    mma_sync::MatmulArgs args{a.ptr<__nv_bfloat16>(), w.ptr<__nv_bfloat16>(), static_cast<const __nv_bfloat16*>(b),
                              out.data(), f32, M, N, K, K};
    explored::kMmaSync[c.explored_index].launch(args, 1, stream());
  }
  CUDA_CHECK_LAUNCH("dev_matmul " + c.name, a.describe() + " x " + w.describe());
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
  auto a = random_bf16(M * K, 1 + M, -1.f, 1.f), w = random_bf16(N * K, 2 + N, -1.f, 1.f), bias = random_bf16(N, 3, -1.f, 1.f);
  Tensor ga = upload(Device::CUDA, DType::BF16, {M, K}, a.data()), gw = upload(Device::CUDA, DType::BF16, {N, K}, w.data());
  Tensor gb = upload(Device::CUDA, DType::BF16, {N}, bias.data());
  Tensor ca = upload(Device::CPU, DType::BF16, {M, K}, a.data()), cw = upload(Device::CPU, DType::BF16, {N, K}, w.data());
  Tensor cb = upload(Device::CPU, DType::BF16, {N}, bias.data());
  Tensor go = make_tensor(Device::CUDA, out_dtype, {M, N}), co = make_tensor(Device::CPU, out_dtype, {M, N});
  ops::matmul(go, ga, gw, with_bias ? &gb : nullptr);
  ops::matmul(co, ca, cw, with_bias ? &cb : nullptr);
  auto g = download<uint8_t>(go), c = download<uint8_t>(co);
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
  auto a = random_bf16(max_m * K, 11, -1.f, 1.f), w = random_bf16(N * K, 12, -1.f, 1.f);
  Tensor ga = upload(Device::CUDA, DType::BF16, {max_m, K}, a.data()), gw = upload(Device::CUDA, DType::BF16, {N, K}, w.data());
  Tensor full = make_tensor(Device::CUDA, DType::BF16, {max_m, N});
  ops::matmul(full, ga, gw, nullptr);
  auto ref = download<uint8_t>(full);
  bool differ = false;
  for (int64_t M : Ms) {
    // the first M rows, and M rows starting at an odd offset
    for (int64_t start : {int64_t{0}, std::min<int64_t>(max_m - M, 3)}) {
      Tensor sub = narrow_rows(ga, start, M);
      Tensor out = make_tensor(Device::CUDA, DType::BF16, {M, N});
      ops::matmul(out, sub, gw, nullptr);
      auto got = download<uint8_t>(out);
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
           {8, 1024, 3072}, {3, 136, 1024}, {1, 72, 512}, {16, 264, 1536}, {9, 48, 2048}, {50, 136, 2048}}) {
    auto a = random_bf16(M * K, 21, -1.f, 1.f), w = random_bf16(N * K, 22, -1.f, 1.f);
    Tensor ga = upload(Device::CUDA, DType::BF16, {M, K}, a.data()), gw = upload(Device::CUDA, DType::BF16, {N, K}, w.data());
    Tensor gb = upload(Device::CUDA, DType::BF16, {N}, random_bf16(N, 23, -1.f, 1.f).data());
    // f32 and bf16 outputs (bf16 is where the staged-store configurations store differently),
    // with and without a bias.
    for (DType dt : {DType::F32, DType::BF16})
      for (bool bias : {false, true}) {
        Tensor want = make_tensor(Device::CUDA, dt, {M, N}), got = make_tensor(Device::CUDA, dt, {M, N});
        ops::matmul(want, ga, gw, bias ? &gb : nullptr);
        auto wb = download<uint8_t>(want);
        int bad = 0, run = 0;
        for (const Config& c : all_configs()) {
          if (!config_takes(c, M, K)) continue;
          ++run;
          matmul_with(c, got, ga, gw, bias ? &gb : nullptr);
          if (download<uint8_t>(got) != wb) {
            ++bad;
            std::printf("  config %s differs at M=%ld N=%ld K=%ld\n", c.name.c_str(), long(M), long(N), long(K));
          }
        }
        std::printf("%s all %d tile configurations give the same bits at M=%ld N=%ld K=%ld %s%s\n", bad ? "FAIL" : "ok  ",
                    run, long(M), long(N), long(K), dtype_name(dt), bias ? " +bias" : "");
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
// subset: "" every shape and M; "decode" M = 1, 8 and 64 only; "prefill" the 8B-class shapes at
// M = 512, 2048 and 4096 only; "lmhead" the 151936 x 1024 LM head at M = 1, 8, 16 and 64 only;
// "batch" Qwen3-0.6B's decode products at M = 16, 24, 32, 48 and 64 only; "batch8b" Qwen3-8B's
// (q|k|v 6144 x 4096, o 4096 x 4096, gate|up 24576 x 4096, down 4096 x 12288) at M = 1, 8 and those;
// "ragged" the other shapes of one to two waves of 64x128 tiles on 132 SMs (production_config's
// ragged_waves): Llama-3.1-8B's gate|up (28672 x 4096) and the LM heads of 32,000- and 32,768-token
// vocabularies at K 4096, at the M of "batch8b".
int bench(const char* path, const std::string& subset) {
  const bool decode_only = subset == "decode", prefill_only = subset == "prefill", lm_head_only = subset == "lmhead",
             batch_only = subset == "batch", batch8b_only = subset == "batch8b", ragged_only = subset == "ragged";
  // Ceiling: a 2 GiB device-to-device copy, bytes read + written.
  const double copy = copy_gbs(size_t(2) << 30);
  std::printf("copy 2 GiB: %.1f GB/s (read + written)\n", copy);

  // 8B-class shapes, then Qwen3-0.6B's decode products (q|k|v, o, gate|up, down) at small M.
  std::vector<std::pair<int64_t, int64_t>> shapes{{4096, 4096}, {12288, 4096}, {4096, 12288}, {151936, 1024},
                                                  {4096, 1024}, {1024, 2048},  {6144, 1024},  {1024, 3072}};
  if (batch8b_only) shapes = {{6144, 4096}, {4096, 4096}, {24576, 4096}, {4096, 12288}};
  if (ragged_only) shapes = {{28672, 4096}, {32000, 4096}, {32768, 4096}};
  const std::vector<int64_t> all_ms{1, 8, 32, 128, 512, 4096}, decode_ms{1, 8, 16, 64}, decode_steps{1, 8, 64},
      batch_ms{16, 24, 32, 48, 64}, batch8b_ms{1, 8, 16, 24, 32, 48, 64},
      prefill_ms{512, 2048, 4096};
  const std::vector<Config> configs = all_configs();
  bool all_same = true;
  std::vector<std::string> results, sweep;
  for (auto [N, K] : shapes) {
    const bool small = N * K <= 4096 * 4096 / 2;
    if (prefill_only && (small || K < 4096)) continue;
    if (lm_head_only && N != 151936) continue;
    if (batch_only && !small) continue;
    const std::vector<int64_t>& Ms = lm_head_only   ? decode_ms
                                     : batch8b_only || ragged_only ? batch8b_ms
                                     : batch_only   ? batch_ms
                                     : decode_only  ? decode_steps
                                     : prefill_only ? prefill_ms
                                     : small        ? decode_ms
                                                    : all_ms;
    size_t w_bytes = size_t(N) * K * 2;
    int pool = static_cast<int>(std::max<size_t>(2, (size_t(400) << 20) / w_bytes + 1));
    std::vector<Tensor> ws, as;
    for (int p = 0; p < pool; ++p) {
      ws.push_back(make_tensor(Device::CUDA, DType::BF16, {N, K}));
      fill_random(ws.back(), 100 + p, 0.0625f);
    }
    for (int64_t M : Ms) {
      as.clear();
      for (int p = 0; p < pool; ++p) {
        as.push_back(make_tensor(Device::CUDA, DType::BF16, {M, K}));
        fill_random(as.back(), 200 + p, 0.0625f);
      }
      Tensor out = make_tensor(Device::CUDA, DType::BF16, {M, N});
      int iters = M * N * K > (int64_t(1) << 36) ? 20 : 50;
      double us = median_us([&](int i) { ops::matmul(out, as[i % pool], ws[i % pool], nullptr); }, iters);
      double tflops = 2.0 * M * N * K / us / 1e6;
      double wgbs = double(w_bytes) / us / 1e3;
      double b2b = back_to_back_us([&](int i) { ops::matmul(out, as[i % pool], ws[i % pool], nullptr); },
                                   M * N * K > (int64_t(1) << 36) ? 5 : 20, 7);
      const char* production = cuda::matmul_dev::config_name(cuda::matmul_dev::production_config(M, N, K));
      std::printf("N=%6ld K=%6ld M=%5ld: %9.1f us  %7.1f TFLOP/s  weights %7.1f GB/s (%.0f%% of copy); back to back %.1f us (%.0f%%)  [%s]\n",
                  long(N), long(K), long(M), us, tflops, wgbs, 100 * wgbs / copy, b2b,
                  100 * double(w_bytes) / b2b / 1e3 / copy, production);
      results.push_back(JsonObject()
                            .integer("N", N)
                            .integer("K", K)
                            .integer("M", M)
                            .number("us", us, 3)
                            .number("tflops", tflops, 2)
                            .number("weight_gbs", wgbs, 2)
                            .number("us_back_to_back", b2b, 3)
                            .string("config", production)
                            .text());
      // Every tile configuration on the same inputs: time, and the same bits as production?
      ops::matmul(out, as[0], ws[0], nullptr);
      Tensor other = make_tensor(Device::CUDA, DType::BF16, {M, N});
      for (const Config& c : configs) {
        if (M > 64 && c.name.rfind("16x", 0) == 0) continue;
        if (!config_takes(c, M, K)) continue;
        auto run = [&](int i) { matmul_with(c, other, as[i % pool], ws[i % pool], nullptr); };
        double cus = median_us(run, 10);
        // Decode-sized products: also back to back, which leaves out the launch and host time.
        double cb2b = M <= 128 ? back_to_back_us(run, 20, 5) : 0.0;
        matmul_with(c, other, as[0], ws[0], nullptr);
        const uint64_t diffs = count_differences(out, other);
        std::string b2b_text = cb2b > 0 ? " (back to back " + std::to_string(cb2b).substr(0, 6) + " us)" : "";
        std::printf("    %-22s %9.1f us %7.1f TFLOP/s %7.1f GB/s%s %s%s\n", c.name.c_str(), cus, 2.0 * M * N * K / cus / 1e6,
                    double(w_bytes) / cus / 1e3, b2b_text.c_str(),
                    diffs ? ("DIFFERENT BITS: " + std::to_string(diffs)).c_str() : "same bits",
                    c.library_index >= 0 ? "" : " (explored)");
        sweep.push_back(JsonObject()
                            .integer("N", N)
                            .integer("K", K)
                            .integer("M", M)
                            .string("config", c.name)
                            .boolean("production", c.library_index >= 0)
                            .number("us", cus, 6)
                            .number("us_back_to_back", cb2b, 6)
                            .integer("differing", static_cast<int64_t>(diffs))
                            .text());
        all_same = all_same && diffs == 0;
      }
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
  write_file(path, "{\n  \"copy_gbs\": " + std::to_string(copy) + ",\n  \"results\": " + json_array(results, "    ") +
                       ",\n  \"configs_same_bits\": " + (all_same ? "true" : "false") +
                       ",\n  \"sweep\": " + json_array(sweep, "    ") + "\n}\n");
  std::printf("every tile configuration gave the production bits: %s\n", all_same ? "yes" : "NO");
  return 0;
}

// The gate|up product with its SiLU·mul: matmul then silu_mul_packed (two launches) against
// matmul_silu_mul (one on Hopper), back to back, at Qwen3-0.6B's and Qwen3-8B's gate|up shapes;
// the two must give the same bits.
int gate_up() {
  bool ok = true;
  for (auto [I, K] : std::vector<std::pair<int64_t, int64_t>>{{3072, 1024}, {12288, 4096}}) {
    const int64_t N = 2 * I;
    const size_t w_bytes = size_t(N) * K * 2;
    const int pool = static_cast<int>(std::max<size_t>(2, (size_t(400) << 20) / w_bytes + 1));
    std::vector<Tensor> ws;
    for (int p = 0; p < pool; ++p) {
      ws.push_back(make_tensor(Device::CUDA, DType::BF16, {N, K}));
      fill_random(ws.back(), 300 + p, 0.0625f);
    }
    for (int64_t M : {1, 8, 64, 512}) {
      std::vector<Tensor> as;
      for (int p = 0; p < pool; ++p) {
        as.push_back(make_tensor(Device::CUDA, DType::BF16, {M, K}));
        fill_random(as.back(), 400 + p, 1.f);
      }
      Tensor gate_up = make_tensor(Device::CUDA, DType::BF16, {M, N});
      Tensor separate = make_tensor(Device::CUDA, DType::BF16, {M, I}), fused = make_tensor(Device::CUDA, DType::BF16, {M, I});
      auto two = [&](int i) {
        ops::matmul(gate_up, as[i % pool], ws[i % pool], nullptr);
        ops::silu_mul_packed(separate, gate_up);
      };
      auto one = [&](int i) { ops::matmul_silu_mul(fused, gate_up, as[i % pool], ws[i % pool], nullptr); };
      const int calls = M >= 512 ? 5 : 20;
      const double us_two = back_to_back_us(two, calls, 7), us_one = back_to_back_us(one, calls, 7);
      two(0);
      one(0);
      const uint64_t diffs = count_differences(separate, fused);
      std::printf("I=%6ld K=%5ld M=%4ld: matmul + silu_mul_packed %8.1f us, matmul_silu_mul %8.1f us (x%.3f) %s\n",
                  long(I), long(K), long(M), us_two, us_one, us_two / us_one,
                  diffs ? ("DIFFERENT BITS: " + std::to_string(diffs)).c_str() : "same bits");
      ok = ok && diffs == 0;
    }
  }
  std::printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}

// The mma.sync family's tensor-core ceiling on this GPU: every warp runs kChains independent
// m16n8k16 bf16 accumulations from registers, no memory traffic, on four blocks of eight warps per
// SM. The ceiling against which the mma.sync kernels' large-M times are read on a GPU whose
// library matmul uses other instructions (wgmma on Hopper).
__global__ void __launch_bounds__(256) mma_sync_peak_kernel(int iters, float* sink) {
  constexpr int kChains = 8;
  const uint32_t x = 0x3c003c00u ^ (threadIdx.x & 7);  // bf16 pairs near 2^-7: the sums stay finite
  const uint32_t a[4] = {x, x ^ 1u, x ^ 2u, x ^ 3u};
  float acc[kChains][4] = {};
  for (int i = 0; i < iters; ++i)
#pragma unroll
    for (int c = 0; c < kChains; ++c) cuda::ptx::mma_bf16_16816(acc[c], a, x ^ 4u, x ^ 5u);
  float total = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c)
#pragma unroll
    for (int r = 0; r < 4; ++r) total += acc[c][r];
  if (total == -1.f) *sink = total;  // never true; keeps the products alive
}

// The SM's cycle counter, read by volatile asm like the MMAs, so that neither read moves across
// them (clock64() may: with one mma.sync chain it was read twice before the loop).
__device__ __forceinline__ long long cycle_clock() {
  long long t;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(t)::"memory");
  return t;
}

// The latency of a dependent mma.sync chain: one warp runs CHAINS independent m16n8k16
// accumulations, each step depending on the previous one of its chain, and reports cycles per
// step (the clock read around the loop). While the step time stays flat with more chains it is
// the instruction's latency; then the tensor pipe's issue rate takes over. A decode product
// has N/8 chains of K/16 steps (one per n8 tile of columns), however it is tiled.
template <int CHAINS>
__global__ void mma_chain_kernel(int iters, long long* cycles, float* sink) {
  const uint32_t x = 0x3c003c00u ^ (threadIdx.x & 7);
  const uint32_t a[4] = {x, x ^ 1u, x ^ 2u, x ^ 3u};
  float acc[CHAINS][4] = {};
  const long long start = cycle_clock();
  for (int i = 0; i < iters; ++i)
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) cuda::ptx::mma_bf16_16816(acc[c], a, x ^ 4u, x ^ 5u);
  // The products are complete before the second clock read.
#pragma unroll
  for (int c = 0; c < CHAINS; ++c)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+f"(acc[c][r]));
  const long long stop = cycle_clock();
  float total = 0.f;
#pragma unroll
  for (int c = 0; c < CHAINS; ++c)
#pragma unroll
    for (int r = 0; r < 4; ++r) total += acc[c][r];
  if (threadIdx.x == 0) *cycles = stop - start;
  if (total == -1.f) *sink = total;
}

template <int CHAINS>
void mma_chain(long long* cycles, float* sink) {
  const int iters = 4096;
  mma_chain_kernel<CHAINS><<<1, 32, 0, stream()>>>(iters, cycles, sink);  // warm-up
  mma_chain_kernel<CHAINS><<<1, 32, 0, stream()>>>(iters, cycles, sink);
  CUDA_CHECK_LAUNCH("mma_chain_kernel", "");
  long long c = 0;
  CUDA_CHECK(cudaMemcpy(&c, cycles, sizeof(c), cudaMemcpyDeviceToHost));
  std::printf("  %2d chain%s: %6.1f cycles per step, %5.1f cycles per mma\n", CHAINS, CHAINS == 1 ? " " : "s",
              double(c) / iters, double(c) / iters / CHAINS);
}

int mma_chains() {
  long long* cycles = nullptr;
  float* sink = nullptr;
  CUDA_CHECK(cudaMalloc(&cycles, sizeof(long long)));
  CUDA_CHECK(cudaMalloc(&sink, sizeof(float)));
  std::printf("mma.sync m16n8k16 bf16 -> f32, dependent chains in one warp:\n");
  // From two chains: with one, the H200 reported 0 cycles (the clock reads did not stay around the
  // loop, volatile asm or not), so its step time is bounded by the two-chain one instead.
  mma_chain<2>(cycles, sink);
  mma_chain<4>(cycles, sink);
  mma_chain<8>(cycles, sink);
  mma_chain<16>(cycles, sink);
  mma_chain<32>(cycles, sink);
  CUDA_CHECK(cudaFree(cycles));
  CUDA_CHECK(cudaFree(sink));
  return 0;
}

// wgmma-rate: one block per SM; each of WGS warpgroups issues kWgmmaSteps k16 steps of
// m64nNk16 (both operands K-major in shared memory, 128-byte swizzle, random bf16) in groups of
// 16 with wgmma_wait<1> between groups, as matmul_sm90_kernel's stages of 4 K tiles do, step k
// into chain k % CHAINS. Thread 0 of each warpgroup times its steps with clock64.
constexpr int kWgmmaSteps = 192;  // Qwen3-0.6B's down_proj: K = 3072
template <int N, int WGS, int CHAINS>
__global__ void __launch_bounds__(128 * WGS, 1) wgmma_rate_kernel(long long* cycles, float* sink) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char raw[];
  const uint32_t a = (cuda::ptx::smem_addr(raw) + 1023) & ~1023u, b = a + 64 * 128;
  for (int i = threadIdx.x; i < (64 + N) * 32; i += blockDim.x)  // bf16 pairs in [1, 2)
    cuda::ptx::st_shared_b32(a + 4 * i, 0x3f803f80u | ((i * 2654435761u) & 0x007f007fu));
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  float acc[CHAINS][N / 2] = {};
  const uint64_t da = cuda::ptx::smem_desc(a), db = cuda::ptx::smem_desc(b);
  const long long start = cycle_clock();
  for (int g = 0; g < kWgmmaSteps / 16; ++g) {
    cuda::ptx::wgmma_fence();
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) cuda::ptx::fence_registers(acc[c]);
#pragma unroll
    for (int k = 0; k < 16; ++k) sm90::Wgmma<N>::mma(acc[k % CHAINS], da + 2 * (k % 4), db + 2 * (k % 4));
    cuda::ptx::wgmma_commit();
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) cuda::ptx::fence_registers(acc[c]);
    cuda::ptx::wgmma_wait<1>();
  }
  cuda::ptx::wgmma_wait<0>();
#pragma unroll
  for (int c = 0; c < CHAINS; ++c) cuda::ptx::fence_registers(acc[c]);
  const long long stop = cycle_clock();
  float total = 0.f;
#pragma unroll
  for (int c = 0; c < CHAINS; ++c)
#pragma unroll
    for (int i = 0; i < N / 2; ++i) total += acc[c][i];
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * WGS + threadIdx.x / 128] = stop - start;
  if (total == -1.f) *sink = total;
#endif
}

template <int N, int WGS, int CHAINS>
void wgmma_rate(int sms, long long* cycles, float* sink) {
  const auto kernel = wgmma_rate_kernel<N, WGS, CHAINS>;
  const int smem = (64 + N) * 128 + 1024;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  for (int rep = 0; rep < 2; ++rep) kernel<<<sms, 128 * WGS, smem, stream()>>>(cycles, sink);  // warm-up, then timed
  CUDA_CHECK_LAUNCH("wgmma_rate_kernel", "");
  std::vector<long long> c(sms * WGS);
  CUDA_CHECK(cudaMemcpy(c.data(), cycles, c.size() * sizeof(long long), cudaMemcpyDeviceToHost));
  std::vector<double> per_step;
  for (long long v : c) per_step.push_back(double(v) / kWgmmaSteps);
  std::printf("  N %3d  %d warpgroup%s  %d chain%s: %6.1f cycles per k16 step per warpgroup (median of %d)\n", N, WGS,
              WGS == 1 ? " " : "s", CHAINS, CHAINS == 1 ? " " : "s", median(per_step), sms * WGS);
}

int wgmma_rates() {
  DI_CHECK(sm90::available(), "wgmma-rate: needs a Hopper GPU and a build with sm_90a code");
  const int sms = cuda_runtime::multiprocessors();
  long long* cycles = nullptr;
  float* sink = nullptr;
  CUDA_CHECK(cudaMalloc(&cycles, 2 * sms * sizeof(long long)));
  CUDA_CHECK(cudaMalloc(&sink, sizeof(float)));
  std::printf("wgmma m64nNk16 bf16 -> f32, A and B in shared memory, %d steps in groups of 16, one block per SM:\n",
              kWgmmaSteps);
  wgmma_rate<8, 1, 1>(sms, cycles, sink);
  wgmma_rate<8, 1, 2>(sms, cycles, sink);
  wgmma_rate<8, 1, 4>(sms, cycles, sink);
  wgmma_rate<8, 2, 1>(sms, cycles, sink);
  wgmma_rate<16, 1, 1>(sms, cycles, sink);
  wgmma_rate<32, 1, 1>(sms, cycles, sink);
  wgmma_rate<32, 2, 1>(sms, cycles, sink);
  wgmma_rate<48, 1, 1>(sms, cycles, sink);
  wgmma_rate<64, 1, 1>(sms, cycles, sink);
  wgmma_rate<128, 1, 1>(sms, cycles, sink);
  wgmma_rate<128, 2, 1>(sms, cycles, sink);
  wgmma_rate<256, 1, 1>(sms, cycles, sink);
  CUDA_CHECK(cudaFree(cycles));
  CUDA_CHECK(cudaFree(sink));
  return 0;
}

int mma_sync_peak() {
  const int sms = cuda_runtime::multiprocessors();
  float* sink = nullptr;
  CUDA_CHECK(cudaMalloc(&sink, sizeof(float)));
  const int blocks = 4 * sms, iters = 4096;
  const double us = median_us(
      [&](int) {
        mma_sync_peak_kernel<<<blocks, 256, 0, stream()>>>(iters, sink);
        CUDA_CHECK_LAUNCH("mma_sync_peak_kernel", "");
      },
      20);
  CUDA_CHECK(cudaFree(sink));
  const double flops = 2.0 * 16 * 8 * 16 * 8 /* chains */ * iters * 8 /* warps */ * blocks;
  std::printf("mma.sync m16n8k16 bf16 -> f32, registers only, %d SMs: %.1f us, %.1f TFLOP/s\n", sms, us,
              flops / (us * 1e-6) / 1e12);
  return 0;
}

// Whether the two instruction families give the same fp32 accumulator bits: every product of a
// list of shapes, fp32 out (the accumulator itself, no rounding to bf16), once with this device's
// family and once with the mma.sync family forced. Both walk K in ascending k16 steps into one
// accumulator, so any difference is the tensor cores' own arithmetic (wgmma m64nNk16 against
// mma.sync m16n8k16). A Hopper question: elsewhere both runs are mma.sync. If the bits are equal,
// a wgmma kernel that keeps the k16 chain gives the bits of an mma.sync one (e.g. a wgmma prefill
// attention beside the mma.sync decode kernel).
int families() {
  if (!cuda::matmul_dev::wgmma()) {
    std::printf("this device runs the mma.sync family only: nothing to compare\n");
    return 0;
  }
  bool same = true;
  struct Shape { int64_t M, N, K; };
  // K = 64: a single wgmma tile (four k16 steps); longer K: long chains. Values in [-1, 1) and,
  // for the last two, a in [-64, 64): products of several exponents.
  const Shape shapes[] = {{64, 256, 64}, {64, 256, 1024}, {1, 4096, 4096}, {128, 1024, 4096}, {300, 3072, 1024}, {64, 512, 4096}};
  for (size_t i = 0; i < std::size(shapes); ++i) {
    const auto [M, N, K] = shapes[i];
    const float range = i + 2 >= std::size(shapes) ? 64.f : 1.f;
    Tensor a = upload(Device::CUDA, DType::BF16, {M, K}, random_bf16(M * K, 31 + i, -range, range).data());
    Tensor w = upload(Device::CUDA, DType::BF16, {N, K}, random_bf16(N * K, 41 + i, -1.f, 1.f).data());
    Tensor out_wgmma = make_tensor(Device::CUDA, DType::F32, {M, N}), out_mma = make_tensor(Device::CUDA, DType::F32, {M, N});
    cuda::matmul_dev::force_mma_sync(false);
    ops::matmul(out_wgmma, a, w, nullptr);
    cuda::matmul_dev::force_mma_sync(true);
    ops::matmul(out_mma, a, w, nullptr);
    cuda::matmul_dev::force_mma_sync(false);
    const std::vector<uint32_t> x = download<uint32_t>(out_wgmma), y = download<uint32_t>(out_mma);
    int64_t diffs = 0, first = -1;
    for (size_t j = 0; j < x.size(); ++j)
      if (x[j] != y[j] && diffs++ == 0) first = static_cast<int64_t>(j);
    std::printf("M=%5ld N=%5ld K=%5ld a in [-%g, %g): %ld of %zu fp32 outputs differ", long(M), long(N), long(K), range,
                range, long(diffs), x.size());
    if (first >= 0) {
      float fx, fy;
      std::memcpy(&fx, &x[first], 4);
      std::memcpy(&fy, &y[first], 4);
      std::printf(" (first at row %ld col %ld: wgmma %.9g, mma.sync %.9g)", long(first / N), long(first % N), fx, fy);
    }
    std::printf("\n");
    same = same && diffs == 0;
  }
  std::printf("%s\n", same ? "SAME BITS in both families" : "THE FAMILIES DIFFER");
  return 0;
}

// One configuration at one shape, 3 warm-up calls then 5 timed (for a profiler: skip 3, count 1).
int run_config(const std::string& name, int64_t M, int64_t N, int64_t K) {
  for (const Config& c : all_configs()) {
    if (c.name != name) continue;
    Tensor a = make_tensor(Device::CUDA, DType::BF16, {M, K}), w = make_tensor(Device::CUDA, DType::BF16, {N, K});
    fill_random(a, 1, 0.0625f);
    fill_random(w, 2, 0.0625f);
    Tensor out = make_tensor(Device::CUDA, DType::BF16, {M, N});
    const double us = median_us([&](int) { matmul_with(c, out, a, w, nullptr); }, 5);
    std::printf("%s M=%ld N=%ld K=%ld: %.1f us, %.1f TFLOP/s\n", name.c_str(), long(M), long(N), long(K), us,
                2.0 * M * N * K / us / 1e6);
    return 0;
  }
  std::fprintf(stderr, "no configuration named '%s'\n", name.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string mode = argc > 1 ? argv[1] : "check";
    // --mma-sync (last argument): the sm_80-89 family on this GPU too (a Hopper measures it so).
    if (argc > 2 && std::string(argv[argc - 1]) == "--mma-sync") {
      cuda::matmul_dev::force_mma_sync(true);
      --argc;
      std::printf("forced: the mma.sync family\n");
    }
    if (mode == "check") return check();
    if (mode == "bench") return bench(argc > 2 ? argv[2] : "matmul_kernels.json", argc > 3 ? argv[3] : "");
    if (mode == "run" && argc > 5) return run_config(argv[2], std::atoll(argv[3]), std::atoll(argv[4]), std::atoll(argv[5]));
    if (mode == "gate-up") return gate_up();
    if (mode == "families") return families();
    if (mode == "mma-peak") return mma_sync_peak();
    if (mode == "mma-chain") return mma_chains();
    if (mode == "wgmma-rate") return wgmma_rates();
    std::fprintf(stderr,
                 "usage: dev_matmul check | bench OUT.json [decode|prefill|lmhead|batch|batch8b|ragged] | run CONFIG M N K | gate-up [--mma-sync] | "
                 "families | mma-peak | mma-chain | wgmma-rate\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
