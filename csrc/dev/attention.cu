// dev_attention: validation and benchmark of the CUDA attention kernels (csrc/kernels/attention.cu),
// through the same op entry points the addon uses (ops::attention, ops::kv_append).
//   build: cmake -S . -B build-dev -DDETINFER_DEV_HARNESSES=ON && cmake --build build-dev -j
//          (or npx cmake-js compile --CDDETINFER_DEV_HARNESSES=ON); the binary is build/dev/dev_attention
//   run:   build/dev/dev_attention [--json PATH] [--quick]
//          build/dev/dev_attention --decode BATCH CONTEXT [HEADS]   one decode shape only (for Nsight
//          Compute: -k regex:decode_wide), 8 kv heads, no validation
//          build/dev/dev_attention --pipeline paired|rotating|paired3 ...   every decode launch with that pipeline
//          build/dev/dev_attention --split KEYS ...   splits of KEYS keys (a multiple of 64) instead of
//          the build's 256 (common/config.h): other bits, the same invariants
//          build/dev/dev_attention --sweep   decode shapes with each pipeline beside the library's choice
//          build/dev/dev_attention --validate   the validation below alone (exit status 1 on a failure)
//          build/dev/dev_attention --prefill TOKENS DIM [mma.sync]   one prefill shape only (Nsight Compute)
//          build/dev/dev_attention --chunk QUERIES CONTEXT [HEADS]   the last QUERIES positions of a
//          CONTEXT-key sequence (a prefill chunk over a cached prefix), HEADS query heads (default
//          16, Qwen3-0.6B's) over 8 kv heads at head dim 128: grids of few tiles with long walks
// 1. validation: CUDA against the CPU backend (prefill, chunk over a cached prefix, decode), and the
//    decode kernel against the prefill kernel bit for bit at every position of a 700-token sequence;
// 2. benchmark (CUDA events around each launch, medians, rotating KV caches larger than L2, a
//    device-to-device copy measured in the same run as the bandwidth ceiling):
//    decode at batch 1, 8, 64 x context 1k, 8k, 32k; prefill of one sequence of 512 to 32768 tokens
//    at head dims 128 and 64, with the library's prefill kernel and with the mma.sync one forced.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/attention_schedule.h"
#include "common/bf16.h"
#include "common/config.h"
#include "dev/harness.cuh"
#include "ops.h"

using namespace detinfer;
using namespace detinfer::dev;

namespace {

Tensor upload_i32(const std::vector<int32_t>& v, Device device) {
  return upload(device, DType::I32, {static_cast<int64_t>(v.size())}, v.data());
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
  fill_random(c.k, seed, 1.f);
  fill_random(c.v, seed + 1, 1.f);
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

// ---------------------------------------------------------------------------------------------
// Validation

// CUDA and CPU outputs of the same launch; returns the worst |a-b| / (2e-3 + |b|/128).
double compare_backends(int heads, int kv_heads, int dim, int block_size, const std::vector<int>& lens,
                        const std::vector<int>& queries, uint32_t seed) {
  const int seqs = static_cast<int>(lens.size());
  const int max_len = *std::max_element(lens.begin(), lens.end());
  PagedCache cache = make_cache(seqs, max_len, kv_heads, dim, block_size, 1, seed);
  std::vector<int32_t> starts{0};
  for (int q : queries) starts.push_back(starts.back() + q);
  Tensor q = make_tensor(Device::CUDA, DType::BF16, {starts.back(), heads, dim});
  fill_random(q, seed + 7, 3.f);
  Tensor out = make_tensor(Device::CUDA, DType::BF16, q.shape);
  std::vector<int32_t> lens32(lens.begin(), lens.end());
  AttentionBatch b = make_batch(cache.tables[0], starts, lens32, Device::CUDA);
  float scale = 1.f / std::sqrt(static_cast<float>(dim));
  ops::attention(out, q, cache.k, cache.v, b, scale, nullptr);

  Tensor q_h = copy_to(q, Device::CPU), k_h = copy_to(cache.k, Device::CPU), v_h = copy_to(cache.v, Device::CPU);
  Tensor out_h = make_tensor(Device::CPU, DType::BF16, q.shape);
  AttentionBatch bh = make_batch(copy_to(cache.tables[0], Device::CPU), starts, lens32, Device::CPU);
  ops::attention(out_h, q_h, k_h, v_h, bh, scale, nullptr);
  std::vector<uint16_t> g = download<uint16_t>(out);
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
  fill_random(q, seed + 3, 3.f);
  Tensor out = make_tensor(Device::CUDA, DType::BF16, q.shape);
  float scale = 1.f / std::sqrt(static_cast<float>(dim));
  ops::attention(out, q, cache.k, cache.v, make_batch(cache.tables[0], {0, len}, {len}, Device::CUDA), scale, nullptr);
  std::vector<uint16_t> whole = download<uint16_t>(out);
  const int64_t row = static_cast<int64_t>(heads) * dim;
  for (int p = 0; p < len; ++p) {
    Tensor qp = narrow_rows(q, p, 1), op = make_tensor(Device::CUDA, DType::BF16, {1, heads, dim});
    ops::attention(op, qp, cache.k, cache.v, make_batch(cache.tables[0], {0, 1}, {p + 1}, Device::CUDA), scale, nullptr);
    std::vector<uint16_t> one = download<uint16_t>(op);
    if (std::memcmp(one.data(), whole.data() + p * row, row * 2) != 0) return p;
  }
  return -1;
}

// Every shape with each of the decode kernel's pipelines (paired, rotating and three-deep paired
// K/V copies) and each prefill family (the library's: wgmma on Hopper; mma.sync forced).
bool validate() {
  bool ok = true;
  struct Shape { int heads, kv_heads, dim, block_size; };
  for (const char* prefill : {"auto", "mma.sync"})
  for (const char* pipeline : {"paired", "rotating", "paired3"})
  for (Shape s : {Shape{8, 2, 128, 16}, Shape{4, 4, 64, 32}, Shape{16, 2, 64, 16}, Shape{32, 1, 128, 16}, Shape{6, 2, 128, 16}}) {
    ops::set_decode_pipeline(pipeline);
    ops::set_prefill_kernel(prefill);
    std::printf("prefill %-8s decode %-8s ", prefill, pipeline);
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
  ops::set_decode_pipeline("auto");
  ops::set_prefill_kernel("auto");
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Benchmark

constexpr int kHeads = 32, kKvHeads = 8, kDim = 128, kBlockSize = 16;

int rotations_for(double bytes) { return static_cast<int>(std::clamp(std::ceil(1e9 / bytes), 1.0, 64.0)); }

struct DecodeResult { int batch, context; double ms, gbps; };
struct PrefillResult { int tokens, dim; std::string kernel; double ms, tflops; };

DecodeResult bench_decode(int batch, int context, int heads = kHeads) {
  const double kv_bytes = 2.0 * batch * context * kKvHeads * kDim * 2;
  const int rot = rotations_for(kv_bytes);
  PagedCache cache = make_cache(batch, context, kKvHeads, kDim, kBlockSize, rot, 1234 + batch + context);
  Tensor q = make_tensor(Device::CUDA, DType::BF16, {batch, heads, kDim});
  fill_random(q, 99, 3.f);
  Tensor out = make_tensor(Device::CUDA, DType::BF16, q.shape);
  std::vector<int32_t> starts(batch + 1), lens(batch, context);
  std::iota(starts.begin(), starts.end(), 0);
  std::vector<AttentionBatch> batches;
  for (int r = 0; r < rot; ++r) batches.push_back(make_batch(cache.tables[r], starts, lens, Device::CUDA));
  const float scale = 1.f / std::sqrt(static_cast<float>(kDim));
  double ms = median_gpu_us([&](int i) { ops::attention(out, q, cache.k, cache.v, batches[i % rot], scale, nullptr); }, 40) / 1e3;
  return {batch, context, ms, kv_bytes / (ms * 1e-3) / 1e9};
}

// One causal prefill of the last `queries` of `tokens` positions (0: all of them), `heads` query
// heads over 8 kv heads of head dim `dim`, with the prefill family `kernel` ("auto": the library's
// choice; "mma.sync").
PrefillResult bench_prefill(int tokens, int dim, const char* kernel, int queries = 0, int heads = kHeads) {
  if (queries <= 0 || queries > tokens) queries = tokens;
  const double kv_bytes = 2.0 * tokens * kKvHeads * dim * 2;
  const int rot = std::min(rotations_for(kv_bytes), 8);
  PagedCache cache = make_cache(1, tokens, kKvHeads, dim, kBlockSize, rot, 77 + tokens);
  Tensor q = make_tensor(Device::CUDA, DType::BF16, {queries, heads, dim});
  fill_random(q, 98, 3.f);
  Tensor out = make_tensor(Device::CUDA, DType::BF16, q.shape);
  std::vector<AttentionBatch> batches;
  for (int r = 0; r < rot; ++r) batches.push_back(make_batch(cache.tables[r], {0, queries}, {tokens}, Device::CUDA));
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  ops::set_prefill_kernel(kernel);
  const int reps = tokens >= 16384 && queries == tokens ? 7 : 20;
  double ms = median_gpu_us([&](int i) { ops::attention(out, q, cache.k, cache.v, batches[i % rot], scale, nullptr); }, reps) / 1e3;
  ops::set_prefill_kernel("auto");
  // Causal work: query p sees p+1 keys (p from tokens - queries); 2 flops per multiply-add in Q·K^T
  // and in P·V.
  const double keys = static_cast<double>(queries) * (tokens - queries) + static_cast<double>(queries) * (queries + 1) / 2;
  const double flops = 4.0 * heads * dim * keys;
  return {tokens, dim, kernel, ms, flops / (ms * 1e-3) / 1e12};
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  bool quick = false, sweep = false, validate_only = false;
  int only_batch = 0, only_context = 0, only_heads = kHeads, only_prefill = 0, prefill_dim = kDim;
  int chunk_queries = 0, chunk_context = 0, chunk_heads = 16;
  std::string prefill_kernel = "auto";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--sweep")) sweep = true;
    if (!std::strcmp(argv[i], "--validate")) validate_only = true;
    if (!std::strcmp(argv[i], "--pipeline") && i + 1 < argc) ops::set_decode_pipeline(argv[++i]);
    if (!std::strcmp(argv[i], "--split") && i + 1 < argc) ops::set_attention_split_size(std::atoi(argv[++i]));
    if (!std::strcmp(argv[i], "--prefill") && i + 2 < argc) {
      only_prefill = std::atoi(argv[++i]), prefill_dim = std::atoi(argv[++i]);
      if (i + 1 < argc && argv[i + 1][0] != '-') prefill_kernel = argv[++i];
    }
    if (!std::strcmp(argv[i], "--chunk") && i + 2 < argc) {
      chunk_queries = std::atoi(argv[++i]), chunk_context = std::atoi(argv[++i]);
      if (i + 1 < argc && argv[i + 1][0] != '-') chunk_heads = std::atoi(argv[++i]);
    }
    if (!std::strcmp(argv[i], "--decode") && i + 2 < argc) {
      only_batch = std::atoi(argv[++i]), only_context = std::atoi(argv[++i]);
      if (i + 1 < argc && argv[i + 1][0] != '-') only_heads = std::atoi(argv[++i]);
    }
  }
  try {
    cuda_runtime::Status st = cuda_runtime::status();
    if (!st.available) {
      std::printf("no CUDA device: %s\n", st.reason.c_str());
      return 1;
    }
    std::printf("device: %s\n", st.devices[0].name.c_str());
    if (validate_only) return validate() ? 0 : 1;
    if (only_batch > 0) {
      const double copy = copy_gbs(size_t{1} << 30);
      bench_decode(only_batch, only_context, only_heads);  // warm-up: the clocks leave idle
      const DecodeResult r = bench_decode(only_batch, only_context, only_heads);
      std::printf("decode batch %d context %d heads %d kv heads %d: %.1f us, %.0f GB/s, %.0f%% of copy (%.0f GB/s)\n",
                  r.batch, r.context, only_heads, kKvHeads, r.ms * 1e3, r.gbps, 100 * r.gbps / copy, copy);
      return 0;
    }
    if (chunk_queries > 0) {
      bench_prefill(chunk_context, kDim, "auto", chunk_queries, chunk_heads);  // warm-up
      const PrefillResult r = bench_prefill(chunk_context, kDim, "auto", chunk_queries, chunk_heads);
      std::printf("prefill chunk of %d queries over %d keys, %d heads over %d kv heads, D=%d %s: %.1f us, %.1f TFLOP/s\n",
                  std::min(chunk_queries, chunk_context), r.tokens, chunk_heads, kKvHeads, r.dim, ops::cuda_prefill_kernel(),
                  r.ms * 1e3, r.tflops);
      return 0;
    }
    if (only_prefill > 0) {
      bench_prefill(only_prefill, prefill_dim, prefill_kernel.c_str());  // warm-up
      const PrefillResult r = bench_prefill(only_prefill, prefill_dim, prefill_kernel.c_str());
      std::printf("prefill %d tokens D=%d %s: %.1f us, %.1f TFLOP/s\n", r.tokens, r.dim,
                  r.kernel == "auto" ? ops::cuda_prefill_kernel() : r.kernel.c_str(), r.ms * 1e3, r.tflops);
      return 0;
    }
    if (sweep) {
      const double copy = copy_gbs(size_t{1} << 30);
      std::printf("copy %.0f GB/s\n batch  context  blocks   paired us rotating us  paired3 us  library us  of copy\n",
                  copy);
      for (auto [batch, context] : std::vector<std::pair<int, int>>{
               {1, 256}, {1, 1024}, {1, 8192}, {1, 32768}, {8, 256}, {8, 1024}, {8, 8192}, {8, 32768}, {16, 256},
               {32, 256}, {32, 1024}, {64, 128}, {64, 256}, {64, 512}, {64, 1024}, {64, 8192}, {128, 256}}) {
        // Decode blocks: one per (sequence, kv head, split); four query heads per kv head.
        const int split = ops::attention_split_size_now();  // --split, else the build's
        const int blocks = batch * kKvHeads * ((context + split - 1) / split);
        bench_decode(batch, context);  // warm-up
        double us[4], gbps = 0;
        for (int p = 0; p < 4; ++p) {
          ops::set_decode_pipeline(p == 0 ? "paired" : p == 1 ? "rotating" : p == 2 ? "paired3" : "auto");
          const DecodeResult r = bench_decode(batch, context);
          us[p] = r.ms * 1e3, gbps = r.gbps;
        }
        std::printf("%6d %8d %7d %11.1f %11.1f %11.1f %11.1f %7.0f%%\n", batch, context, blocks, us[0], us[1], us[2],
                    us[3], 100 * gbps / copy);
      }
      return 0;
    }
    bool ok = validate();

    const double copy = copy_gbs(size_t{1} << 30);
    std::vector<DecodeResult> dec;
    for (int batch : {1, 8, 64})
      for (int context : {1024, 8192, 32768}) {
        if (quick && batch * context > 8 * 8192) continue;
        dec.push_back(bench_decode(batch, context));
      }
    std::vector<PrefillResult> pre;
    for (int dim : {128, 64})
      for (int tokens : {512, 2048, 8192, 32768}) {
        if (quick && tokens > 8192) continue;
        for (const char* kernel : {"auto", "mma.sync"}) pre.push_back(bench_prefill(tokens, dim, kernel));
      }

    std::printf("\ncopy (device to device, read + write): %.0f GB/s\n", copy);
    std::printf("\ndecode, %d heads, %d kv heads, D=%d, block %d, paged (shuffled pages)\n", kHeads, kKvHeads, kDim, kBlockSize);
    std::printf("%6s %8s %10s %10s %8s\n", "batch", "context", "time us", "KV GB/s", "of copy");
    for (auto& r : dec)
      std::printf("%6d %8d %10.1f %10.0f %7.0f%%\n", r.batch, r.context, r.ms * 1e3, r.gbps, 100 * r.gbps / copy);
    std::printf("\nprefill, one sequence, causal, %d heads, %d kv heads (auto: %s)\n%8s %4s %9s %10s %10s\n", kHeads,
                kKvHeads, ops::cuda_prefill_kernel(), "tokens", "D", "kernel", "time us", "TFLOP/s");
    for (auto& r : pre)
      std::printf("%8d %4d %9s %10.1f %10.1f\n", r.tokens, r.dim, r.kernel.c_str(), r.ms * 1e3, r.tflops);

    if (!json_path.empty()) {
      std::vector<std::string> dec_json, pre_json;
      for (auto& r : dec)
        dec_json.push_back(JsonObject()
                               .integer("batch", r.batch)
                               .integer("context", r.context)
                               .number("ms", r.ms, 5)
                               .number("kv_gbps", r.gbps, 1)
                               .text());
      for (auto& r : pre)
        pre_json.push_back(JsonObject()
                               .integer("tokens", r.tokens)
                               .integer("dim", r.dim)
                               .string("kernel", r.kernel == "auto" ? ops::cuda_prefill_kernel() : r.kernel)
                               .number("ms", r.ms, 5)
                               .number("tflops", r.tflops, 2)
                               .text());
      const std::string shape = JsonObject()
                                    .integer("heads", kHeads)
                                    .integer("kv_heads", kKvHeads)
                                    .integer("dim", kDim)
                                    .integer("block_size", kBlockSize)
                                    .text();
      write_file(json_path, "{\n  \"device\": " + json_quote(st.devices[0].name) +
                                ",\n  \"validation_passed\": " + (ok ? "true" : "false") +
                                ",\n  \"copy_gbps\": " + std::to_string(copy) + ",\n  \"shape\": " + shape +
                                ",\n  \"decode\": " + json_array(dec_json, "    ") +
                                ",\n  \"prefill\": " + json_array(pre_json, "    ") + "\n}\n");
    }
    return ok ? 0 : 2;
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 1;
  }
}
