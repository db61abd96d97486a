// dev_attention: validation and benchmark of the CUDA attention kernels (csrc/kernels/attention.cu),
// through the same op entry points the addon uses (ops::attention, ops::kv_append).
//   build: cmake -S . -B build-dev -DDETINFER_DEV_HARNESSES=ON && cmake --build build-dev -j
//          (or npx cmake-js compile --CDDETINFER_DEV_HARNESSES=ON); the binary is build/dev/dev_attention
//   run:   build/dev/dev_attention [--json PATH] [--quick]
// 1. validation: CUDA against the CPU backend (prefill, chunk over a cached prefix, decode), and the
//    decode kernel against the prefill kernel bit for bit at every position of a 700-token sequence;
// 2. benchmark (CUDA events around each launch, medians, rotating KV caches larger than L2, a
//    device-to-device copy measured in the same run as the bandwidth ceiling):
//    decode at batch 1, 8, 64 x context 1k, 8k, 32k; prefill of one sequence of 512, 2048, 8192 tokens.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/config.h"
#include "cuda/check.h"
#include "cuda/runtime.h"
#include "ops.h"

using namespace detinfer;

namespace {

cudaStream_t stream() { return static_cast<cudaStream_t>(cuda_runtime::stream()); }

// ---------------------------------------------------------------------------------------------
// Random bf16 data made on the device (the benchmark caches reach gigabytes).
__global__ void fill_random_bf16(__nv_bfloat16* x, size_t n, uint32_t seed, float range) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += gridDim.x * static_cast<size_t>(blockDim.x)) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9E3779B1u ^ seed ^ static_cast<uint32_t>(i >> 32) * 0x85EBCA77u;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    x[i] = __float2bfloat16_rn((static_cast<float>(h >> 8) * (1.f / 16777216.f) * 2.f - 1.f) * range);
  }
}

void fill(Tensor& t, uint32_t seed, float range) {
  fill_random_bf16<<<1024, 256, 0, stream()>>>(t.ptr<__nv_bfloat16>(), t.numel(), seed, range);
  CUDA_CHECK_LAUNCH("fill_random_bf16", t.describe());
}

__global__ void spin(long long cycles) {
  long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

Tensor upload_i32(const std::vector<int32_t>& v, Device device) {
  Tensor t = make_tensor(device, DType::I32, {static_cast<int64_t>(v.size())});
  if (device == Device::CUDA)
    cuda_runtime::upload(t.data(), v.data(), v.size() * 4);
  else
    std::memcpy(t.data(), v.data(), v.size() * 4);
  return t;
}

Tensor to_device(const Tensor& t, Device device) {
  Tensor out = make_tensor(device, t.dtype, t.shape);
  if (t.device() == Device::CUDA && device == Device::CPU)
    cuda_runtime::download(out.data(), t.data(), t.nbytes());
  else if (t.device() == Device::CPU && device == Device::CUDA)
    cuda_runtime::upload(out.data(), t.data(), t.nbytes());
  else
    fail("to_device: unsupported copy");
  return out;
}

// A paged cache of `seqs` sequences of `len` keys each, pages shuffled; `rotations` disjoint copies
// (each its own pages and block table) so timed launches can cycle through more than L2 holds.
struct PagedCache {
  Tensor k, v;
  std::vector<Tensor> tables;  // one [seqs, max_blocks] per rotation
  int max_blocks = 0;
};

PagedCache make_cache(int seqs, int len, int kv_heads, int dim, int block_size, int rotations, uint32_t seed) {
  PagedCache c;
  c.max_blocks = (len + block_size - 1) / block_size;
  const int64_t pages = static_cast<int64_t>(rotations) * seqs * c.max_blocks;
  c.k = make_tensor(Device::CUDA, DType::BF16, {pages, block_size, kv_heads, dim});
  c.v = make_tensor(Device::CUDA, DType::BF16, {pages, block_size, kv_heads, dim});
  fill(c.k, seed, 1.f);
  fill(c.v, seed + 1, 1.f);
  std::vector<int32_t> order(pages);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  for (int r = 0; r < rotations; ++r) {
    std::vector<int32_t> table(order.begin() + static_cast<int64_t>(r) * seqs * c.max_blocks,
                               order.begin() + static_cast<int64_t>(r + 1) * seqs * c.max_blocks);
    Tensor t = upload_i32(table, Device::CUDA);
    c.tables.push_back(reshape(t, {seqs, c.max_blocks}));
  }
  return c;
}

AttentionBatch make_batch(const Tensor& table, const std::vector<int32_t>& query_start, const std::vector<int32_t>& lens,
                          Device device) {
  AttentionBatch b;
  b.block_tables = table;
  b.query_start = upload_i32(query_start, device);
  b.seq_lens = upload_i32(lens, device);
  for (size_t i = 0; i < lens.size(); ++i) {
    b.max_query_len = std::max(b.max_query_len, query_start[i + 1] - query_start[i]);
    b.max_seq_len = std::max(b.max_seq_len, lens[i]);
  }
  return b;
}

// Median of `iters` timings of fn() (after warm-up); a spin kernel before each start event lets
// the host enqueue ahead so that launch overhead is not counted as GPU time.
template <typename Fn>
double median_ms(int iters, Fn fn) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) fn(i);
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    spin<<<1, 1, 0, stream()>>>(100000);
    CUDA_CHECK(cudaEventRecord(start, stream()));
    fn(i);
    CUDA_CHECK(cudaEventRecord(stop, stream()));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// ---------------------------------------------------------------------------------------------
// Validation

std::vector<uint16_t> download_bf16(const Tensor& t) {
  std::vector<uint16_t> h(t.numel());
  cuda_runtime::download(h.data(), t.data(), t.nbytes());
  return h;
}

// CUDA and CPU outputs of the same launch; returns the worst |a-b| / (2e-3 + |b|/128).
double compare_backends(int heads, int kv_heads, int dim, int block_size, const std::vector<int>& lens,
                        const std::vector<int>& queries, uint32_t seed) {
  const int seqs = static_cast<int>(lens.size());
  const int max_len = *std::max_element(lens.begin(), lens.end());
  PagedCache cache = make_cache(seqs, max_len, kv_heads, dim, block_size, 1, seed);
  std::vector<int32_t> starts{0};
  for (int q : queries) starts.push_back(starts.back() + q);
  Tensor q = make_tensor(Device::CUDA, DType::BF16, {starts.back(), heads, dim});
  fill(q, seed + 7, 3.f);
  Tensor out = make_tensor(Device::CUDA, DType::BF16, q.shape);
  std::vector<int32_t> lens32(lens.begin(), lens.end());
  AttentionBatch b = make_batch(cache.tables[0], starts, lens32, Device::CUDA);
  float scale = 1.f / std::sqrt(static_cast<float>(dim));
  ops::attention(out, q, cache.k, cache.v, b, scale);

  Tensor q_h = to_device(q, Device::CPU), k_h = to_device(cache.k, Device::CPU), v_h = to_device(cache.v, Device::CPU);
  Tensor out_h = make_tensor(Device::CPU, DType::BF16, q.shape);
  AttentionBatch bh = make_batch(to_device(cache.tables[0], Device::CPU), starts, lens32, Device::CPU);
  ops::attention(out_h, q_h, k_h, v_h, bh, scale);
  std::vector<uint16_t> g = download_bf16(out);
  double worst = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    double a = bf16_to_f32(g[i]), r = bf16_to_f32(out_h.ptr<uint16_t>()[i]);
    double e = std::isfinite(a) ? std::fabs(a - r) / (2e-3 + std::fabs(r) / 128) : INFINITY;
    worst = std::max(worst, e);
  }
  return worst;
}

// Positions 0..len-1 of one sequence: one prefill launch versus len decode launches.
int first_decode_mismatch(int heads, int kv_heads, int dim, int block_size, int len, uint32_t seed) {
  PagedCache cache = make_cache(1, len, kv_heads, dim, block_size, 1, seed);
  Tensor q = make_tensor(Device::CUDA, DType::BF16, {len, heads, dim});
  fill(q, seed + 3, 3.f);
  Tensor out = make_tensor(Device::CUDA, DType::BF16, q.shape);
  float scale = 1.f / std::sqrt(static_cast<float>(dim));
  ops::attention(out, q, cache.k, cache.v, make_batch(cache.tables[0], {0, len}, {len}, Device::CUDA), scale);
  std::vector<uint16_t> whole = download_bf16(out);
  const int64_t row = static_cast<int64_t>(heads) * dim;
  for (int p = 0; p < len; ++p) {
    Tensor qp = narrow_rows(q, p, 1), op = make_tensor(Device::CUDA, DType::BF16, {1, heads, dim});
    ops::attention(op, qp, cache.k, cache.v, make_batch(cache.tables[0], {0, 1}, {p + 1}, Device::CUDA), scale);
    std::vector<uint16_t> one = download_bf16(op);
    if (std::memcmp(one.data(), whole.data() + p * row, row * 2) != 0) return p;
  }
  return -1;
}

bool validate() {
  bool ok = true;
  struct Shape { int heads, kv_heads, dim, block_size; };
  for (Shape s : {Shape{8, 2, 128, 16}, Shape{4, 4, 64, 32}, Shape{16, 2, 64, 16}, Shape{32, 1, 128, 16}}) {
    double w1 = compare_backends(s.heads, s.kv_heads, s.dim, s.block_size, {1, 17, 256, 300, 1100}, {1, 17, 200, 9, 33}, 11);
    double w2 = compare_backends(s.heads, s.kv_heads, s.dim, s.block_size, {1, 17, 256, 300, 1100}, {1, 1, 1, 1, 1}, 12);
    int mismatch = first_decode_mismatch(s.heads, s.kv_heads, s.dim, s.block_size, 600, 13);
    bool pass = w1 <= 1 && w2 <= 1 && mismatch < 0;
    ok = ok && pass;
    std::printf("validate heads=%d kv_heads=%d D=%d block=%d: cuda vs cpu worst %.3f (prefill) %.3f (decode) of bound; "
                "decode vs prefill %s -> %s\n",
                s.heads, s.kv_heads, s.dim, s.block_size, w1, w2,
                mismatch < 0 ? "bitwise equal at all 600 positions" : ("differ at " + std::to_string(mismatch)).c_str(),
                pass ? "PASS" : "FAIL");
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Benchmark

double copy_gbps() {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  CUDA_CHECK(cudaMalloc(&a, bytes));
  CUDA_CHECK(cudaMalloc(&b, bytes));
  CUDA_CHECK(cudaMemsetAsync(a, 1, bytes, stream()));
  double ms = median_ms(20, [&](int) { CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream())); });
  CUDA_CHECK(cudaFree(a));
  CUDA_CHECK(cudaFree(b));
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

constexpr int kHeads = 32, kKvHeads = 8, kDim = 128, kBlockSize = 16;

int rotations_for(double bytes) { return static_cast<int>(std::clamp(std::ceil(1e9 / bytes), 1.0, 64.0)); }

struct DecodeResult { int batch, context; double ms, gbps; };
struct PrefillResult { int tokens; double ms, tflops; };

DecodeResult bench_decode(int batch, int context) {
  const double kv_bytes = 2.0 * batch * context * kKvHeads * kDim * 2;
  const int rot = rotations_for(kv_bytes);
  PagedCache cache = make_cache(batch, context, kKvHeads, kDim, kBlockSize, rot, 1234 + batch + context);
  Tensor q = make_tensor(Device::CUDA, DType::BF16, {batch, kHeads, kDim});
  fill(q, 99, 3.f);
  Tensor out = make_tensor(Device::CUDA, DType::BF16, q.shape);
  std::vector<int32_t> starts(batch + 1), lens(batch, context);
  std::iota(starts.begin(), starts.end(), 0);
  std::vector<AttentionBatch> batches;
  for (int r = 0; r < rot; ++r) batches.push_back(make_batch(cache.tables[r], starts, lens, Device::CUDA));
  const float scale = 1.f / std::sqrt(static_cast<float>(kDim));
  double ms = median_ms(40, [&](int i) { ops::attention(out, q, cache.k, cache.v, batches[i % rot], scale); });
  return {batch, context, ms, kv_bytes / (ms * 1e-3) / 1e9};
}

PrefillResult bench_prefill(int tokens) {
  const double kv_bytes = 2.0 * tokens * kKvHeads * kDim * 2;
  const int rot = std::min(rotations_for(kv_bytes), 8);
  PagedCache cache = make_cache(1, tokens, kKvHeads, kDim, kBlockSize, rot, 77 + tokens);
  Tensor q = make_tensor(Device::CUDA, DType::BF16, {tokens, kHeads, kDim});
  fill(q, 98, 3.f);
  Tensor out = make_tensor(Device::CUDA, DType::BF16, q.shape);
  std::vector<AttentionBatch> batches;
  for (int r = 0; r < rot; ++r) batches.push_back(make_batch(cache.tables[r], {0, tokens}, {tokens}, Device::CUDA));
  const float scale = 1.f / std::sqrt(static_cast<float>(kDim));
  double ms = median_ms(20, [&](int i) { ops::attention(out, q, cache.k, cache.v, batches[i % rot], scale); });
  // Causal work: query p sees p+1 keys; 2 flops per multiply-add in Q·K^T and in P·V.
  const double flops = 4.0 * kHeads * kDim * (static_cast<double>(tokens) * (tokens + 1) / 2);
  return {tokens, ms, flops / (ms * 1e-3) / 1e12};
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
    if (!std::strcmp(argv[i], "--quick")) quick = true;
  }
  try {
    cuda_runtime::Status st = cuda_runtime::status();
    if (!st.available) {
      std::printf("no CUDA device: %s\n", st.reason.c_str());
      return 1;
    }
    std::printf("device: %s\n", st.devices[0].name.c_str());
    bool ok = validate();

    const double copy = copy_gbps();
    std::vector<DecodeResult> dec;
    for (int batch : {1, 8, 64})
      for (int context : {1024, 8192, 32768}) {
        if (quick && batch * context > 8 * 8192) continue;
        dec.push_back(bench_decode(batch, context));
      }
    std::vector<PrefillResult> pre;
    for (int tokens : {512, 2048, 8192}) pre.push_back(bench_prefill(tokens));

    std::printf("\ncopy (device to device, read + write): %.0f GB/s\n", copy);
    std::printf("\ndecode, %d heads, %d kv heads, D=%d, block %d, paged (shuffled pages)\n", kHeads, kKvHeads, kDim, kBlockSize);
    std::printf("%6s %8s %10s %10s %8s\n", "batch", "context", "time us", "KV GB/s", "of copy");
    for (auto& r : dec)
      std::printf("%6d %8d %10.1f %10.0f %7.0f%%\n", r.batch, r.context, r.ms * 1e3, r.gbps, 100 * r.gbps / copy);
    std::printf("\nprefill, one sequence, causal\n%8s %10s %10s\n", "tokens", "time us", "TFLOP/s");
    for (auto& r : pre) std::printf("%8d %10.1f %10.1f\n", r.tokens, r.ms * 1e3, r.tflops);

    if (!json_path.empty()) {
      FILE* f = std::fopen(json_path.c_str(), "w");
      if (!f) fail("cannot write ", json_path);
      std::fprintf(f, "{\n  \"device\": \"%s\",\n  \"validation_passed\": %s,\n  \"copy_gbps\": %.1f,\n", st.devices[0].name.c_str(),
                   ok ? "true" : "false", copy);
      std::fprintf(f, "  \"shape\": {\"heads\": %d, \"kv_heads\": %d, \"dim\": %d, \"block_size\": %d},\n", kHeads, kKvHeads, kDim,
                   kBlockSize);
      std::fprintf(f, "  \"decode\": [");
      for (size_t i = 0; i < dec.size(); ++i)
        std::fprintf(f, "%s\n    {\"batch\": %d, \"context\": %d, \"ms\": %.5f, \"kv_gbps\": %.1f}", i ? "," : "", dec[i].batch,
                     dec[i].context, dec[i].ms, dec[i].gbps);
      std::fprintf(f, "\n  ],\n  \"prefill\": [");
      for (size_t i = 0; i < pre.size(); ++i)
        std::fprintf(f, "%s\n    {\"tokens\": %d, \"ms\": %.5f, \"tflops\": %.2f}", i ? "," : "", pre[i].tokens, pre[i].ms,
                     pre[i].tflops);
      std::fprintf(f, "\n  ]\n}\n");
      std::fclose(f);
    }
    return ok ? 0 : 2;
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 1;
  }
}
