// Development harness for the output head's token choice (choose_tokens in
// csrc/kernels/sampling.cu), runnable without Node.
// Build: cmake -S . -B build/dev-harnesses -DDETINFER_DEV_HARNESSES=ON && cmake --build build/dev-harnesses --target dev_sampling
// Run:   build/dev/dev_sampling check         GPU against the CPU backend (greedy ids, targets, top ids;
//                                              sampled ids agree but for float32 near-ties), rows
//                                              bit-identical alone and in batches, the variant's difference;
//                                              at V = 151936 and at the vocabularies that meet each edge of
//                                              the kernel's 8192-logit slices (one slice, less than one, a
//                                              one-logit last slice, odd V without float4 loads), with rows
//                                              of many equal logits that take the exact one-block path.
//                                              Prints PASS / FAIL lines; exits 1 on any failure.
//        build/dev/dev_sampling bench OUT.json  medians (CUDA events, rotating inputs) at V = 151936 for
//                                              1..256 rows: greedy, temperature, top-k 50, top-p 0.9, top-p + 20 top log-probs.
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

#include "common/config.h"
#include "common/token_choice.h"
#include "cuda/check.h"
#include "cuda/runtime.h"
#include "dev/harness.cuh"
#include "ops.h"

using namespace detinfer;
namespace ch = detinfer::choice;

namespace {

constexpr int64_t kVocab = 151936;

std::vector<float> random_logits(int64_t rows, int64_t V, uint32_t seed, float std) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, std);
  std::vector<float> x(rows * V);
  for (auto& v : x) v = dist(rng);
  return x;
}

struct Choice {
  float t, top_p, min_p;
  int top_k, target;
};

std::vector<int32_t> params_for(int64_t rows, Choice c, uint32_t seed, int top_n) {
  std::vector<int32_t> p(rows * ch::kParams, 0);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t* q = p.data() + r * ch::kParams;
    q[ch::kTemperature] = ch::float_bits(c.t);
    q[ch::kTopP] = ch::float_bits(c.top_p);
    q[ch::kMinP] = ch::float_bits(c.min_p);
    q[ch::kTopK] = c.top_k;
    q[ch::kSeed] = static_cast<int32_t>(seed + r * 7919);
    q[ch::kPosition] = static_cast<int32_t>(100 + r);
    q[ch::kTarget] = c.target;
    q[ch::kTopN] = top_n;
  }
  return p;
}

template <class T>
Tensor make(Device d, DType dt, std::vector<int64_t> shape, const std::vector<T>& host) {
  return dev::upload(d, dt, shape, host.data());
}

std::vector<int32_t> run(Device d, const std::vector<float>& x, int64_t rows, int64_t V, const std::vector<int32_t>& params,
                         int top_n) {
  Tensor xt = make(d, DType::F32, {rows, V}, x);
  Tensor pt = make(d, DType::I32, {rows, ch::kParams}, params);
  Tensor out = make_tensor(d, DType::I32, {rows, 2 + 2 * top_n});
  ops::choose_tokens(out, xt, pt, nullptr);
  return dev::download<int32_t>(out);
}

// A row of one of several shapes: normal of several widths, an exact tie for the best logit,
// -infinity entries, logits on a few levels (bins crowded past the candidate lists: the exact
// one-block path) and all-equal logits.
std::vector<float> shaped_row(int64_t V, uint32_t seed, int kind) {
  const float widths[] = {3.f, 1.f, 0.3f, 6.f};
  std::vector<float> row = random_logits(1, V, seed, widths[kind % 4]);
  switch (kind % 8) {
    case 1: {  // ties with the best of the first ids, near the start and at the end
      int64_t head = std::min<int64_t>(V, 4096);
      int64_t best = std::max_element(row.begin(), row.begin() + head) - row.begin();
      row[V - 1 - (V > 7 ? 6 : 0)] = row[best];
      row[std::min<int64_t>(3, V - 1)] = row[best];
      break;
    }
    case 2:
      for (int64_t v = 10; v < V; v += 97) row[v] = -INFINITY;
      break;
    case 5:  // integer levels: bins of tens of thousands of tokens at V = 151936
      for (auto& x : row) x = std::floor(x / widths[kind % 4]);
      break;
    case 6:  // all equal
      std::fill(row.begin(), row.end(), 0.25f);
      break;
    default:
      break;
  }
  return row;
}

std::vector<int32_t> mixed_params(int64_t rows, int64_t V, uint32_t seed) {
  std::mt19937 rng(seed);
  auto pick = [&](std::initializer_list<float> xs) { return *(xs.begin() + rng() % xs.size()); };
  std::vector<int32_t> p(rows * ch::kParams, 0);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t* q = p.data() + r * ch::kParams;
    const int kind = static_cast<int>(r % 7);
    const bool sample = kind != 3 && kind != 5;
    q[ch::kTemperature] = ch::float_bits(sample ? pick({0.3f, 0.7f, 1.f, 1.6f}) : 0.f);
    q[ch::kTopP] = ch::float_bits(sample ? pick({1.f, 0.95f, 0.9f, 0.5f}) : 1.f);
    q[ch::kMinP] = ch::float_bits(sample ? pick({0.f, 0.f, 0.05f}) : 0.f);
    q[ch::kTopK] = sample ? static_cast<int32_t>(pick({0, 0, 1, 5, 50, 1000, 5000})) : 0;
    q[ch::kSeed] = static_cast<int32_t>(rng());
    q[ch::kPosition] = static_cast<int32_t>(rng() % 4000);
    q[ch::kTarget] = kind == 3 ? static_cast<int32_t>(rng() % V) : -1;
    q[ch::kTopN] = r % 3 == 2 ? 0 : (r % 3 == 1 ? 20 : 7);
  }
  return p;
}

bool check_mixed(int64_t V, int64_t rows) {
  const int top_n = 20, width = 2 + 2 * top_n;
  std::vector<float> x(rows * V);
  for (int64_t r = 0; r < rows; ++r) {
    auto row = shaped_row(V, 900 + static_cast<uint32_t>(r), static_cast<int>(r));
    std::copy(row.begin(), row.end(), x.begin() + r * V);
  }
  auto params = mixed_params(rows, V, static_cast<uint32_t>(V));
  auto gpu = run(Device::CUDA, x, rows, V, params, top_n), cpu = run(Device::CPU, x, rows, V, params, top_n);
  bool ok = true;
  int sampled = 0, same_sampled = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* g = gpu.data() + r * width;
    const int32_t* h = cpu.data() + r * width;
    const int32_t* q = params.data() + r * ch::kParams;
    const bool sample = q[ch::kTarget] < 0 && ch::as_float(q[ch::kTemperature]) > 0.f;
    if (sample) sampled++, same_sampled += g[0] == h[0];
    else if (g[0] != h[0]) {
      printf("FAIL V=%ld row %ld: id %d, CPU backend %d\n", (long)V, (long)r, g[0], h[0]);
      ok = false;
    }
    if (!std::equal(g + 2, g + 2 + top_n, h + 2)) {
      printf("FAIL V=%ld row %ld: top ids differ from the CPU backend\n", (long)V, (long)r);
      ok = false;
    }
    float lg = ch::as_float(g[1]), lh = ch::as_float(h[1]);
    if (g[0] == h[0] && !(std::fabs(lg - lh) <= 1e-4f * std::max(1.f, std::fabs(lh)))) {
      printf("FAIL V=%ld row %ld: log-prob %.7g, CPU backend %.7g\n", (long)V, (long)r, lg, lh);
      ok = false;
    }
  }
  if (same_sampled < sampled * 3 / 4) {
    printf("FAIL V=%ld: only %d/%d sampled ids equal to the CPU backend\n", (long)V, same_sampled, sampled);
    ok = false;
  }
  // Rows alone (every row, or every 7th of a large batch), and all rows in reverse order: the same bits.
  int alone_differ = 0;
  for (int64_t r = 0; r < rows; r += rows > 64 ? 7 : 1) {
    std::vector<float> one(x.begin() + r * V, x.begin() + (r + 1) * V);
    std::vector<int32_t> p1(params.begin() + r * ch::kParams, params.begin() + (r + 1) * ch::kParams);
    auto alone = run(Device::CUDA, one, 1, V, p1, top_n);
    if (!std::equal(alone.begin(), alone.end(), gpu.begin() + r * width)) alone_differ++;
  }
  std::vector<float> xr(rows * V);
  std::vector<int32_t> pr(params.size());
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(x.begin() + r * V, x.begin() + (r + 1) * V, xr.begin() + (rows - 1 - r) * V);
    std::copy(params.begin() + r * ch::kParams, params.begin() + (r + 1) * ch::kParams,
              pr.begin() + (rows - 1 - r) * ch::kParams);
  }
  auto reversed = run(Device::CUDA, xr, rows, V, pr, top_n);
  int reverse_differ = 0;
  for (int64_t r = 0; r < rows; ++r)
    reverse_differ += !std::equal(gpu.begin() + r * width, gpu.begin() + (r + 1) * width,
                                  reversed.begin() + (rows - 1 - r) * width);
  if (alone_differ || reverse_differ) {
    printf("FAIL V=%ld: %d rows alone and %d rows reordered differ from the batch\n", (long)V, alone_differ,
           reverse_differ);
    ok = false;
  }
  printf("%s V=%-6ld %ld mixed rows: %d/%d sampled ids equal to the CPU backend, greedy/target/top ids equal, "
         "alone and reordered bit-identical\n",
         ok ? "PASS" : "FAIL", (long)V, (long)rows, same_sampled, sampled);
  return ok;
}

const Choice kChoices[] = {
    {0.f, 1.f, 0.f, 0, -1},      // greedy
    {0.7f, 1.f, 0.f, 0, -1},     // temperature
    {0.7f, 1.f, 0.f, 50, -1},    // top-k 50
    {0.7f, 0.9f, 0.f, 0, -1},    // top-p 0.9
    {0.7f, 0.9f, 0.05f, 40, -1}, // all three
    {0.f, 1.f, 0.f, 0, 12345},   // a scored target
};
const char* kNames[] = {"greedy", "temperature 0.7", "top-k 50", "top-p 0.9", "top-k 40 top-p 0.9 min-p 0.05", "target"};

bool check() {
  bool ok = true;
  const int64_t rows = 24, V = kVocab;
  for (float std : {0.7f, 3.f}) {
    auto x = random_logits(rows, V, 17, std);
    for (size_t c = 0; c < std::size(kChoices); ++c) {
      auto params = params_for(rows, kChoices[c], 1234, 20);
      auto gpu = run(Device::CUDA, x, rows, V, params, 20), cpu = run(Device::CPU, x, rows, V, params, 20);
      int same_ids = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t* g = gpu.data() + r * 42;
        const int32_t* h = cpu.data() + r * 42;
        same_ids += g[0] == h[0];
        if (!std::equal(g + 2, g + 22, h + 2)) {
          printf("FAIL %s std %.1f row %ld: top ids differ from the CPU backend\n", kNames[c], std, (long)r);
          ok = false;
        }
        float lg = ch::as_float(g[1]), lh = ch::as_float(h[1]);
        if (g[0] == h[0] && std::fabs(lg - lh) > 1e-4f * std::max(1.f, std::fabs(lh))) {
          printf("FAIL %s row %ld: log-prob %.7g vs CPU %.7g\n", kNames[c], (long)r, lg, lh);
          ok = false;
        }
      }
      bool exact = kChoices[c].t == 0.f;
      bool ids_ok = !((exact && same_ids != rows) || same_ids < rows * 3 / 4);
      printf("%s %-32s std %.1f: %d/%ld ids equal to the CPU backend%s\n", ids_ok ? "PASS" : "FAIL", kNames[c], std,
             same_ids, (long)rows, exact ? " (must be all)" : " (float32 near-ties may differ; at least 3/4)");
      if (!ids_ok) ok = false;
      // Bitwise: each row alone against the batch of all rows.
      for (int64_t r = 0; r < rows; r += 5) {
        std::vector<float> one(x.begin() + r * V, x.begin() + (r + 1) * V);
        std::vector<int32_t> p1(params.begin() + r * ch::kParams, params.begin() + (r + 1) * ch::kParams);
        auto alone = run(Device::CUDA, one, 1, V, p1, 20);
        if (!std::equal(alone.begin(), alone.end(), gpu.begin() + r * 42)) {
          printf("FAIL %s: row %ld alone differs from the batch\n", kNames[c], (long)r);
          ok = false;
        }
      }
    }
  }
  // Every slice edge: mixed parameters per row, rows of several shapes, each row alone and in a
  // batch in another order, bit for bit; against the CPU backend.
  for (int64_t V : {int64_t{151936}, int64_t{4096}, int64_t{8192}, int64_t{8193}, int64_t{16384}, int64_t{16385},
                    int64_t{5000}, int64_t{32771}, int64_t{1000}}) {
    if (!check_mixed(V, 24)) ok = false;
  }
  // More rows than one round of launches holds (kChunkRows = 256 in csrc/kernels/sampling.cu).
  if (!check_mixed(5000, 600)) ok = false;
  // The variant: a row alone (split sums) against the batch must differ somewhere. Narrow rows
  // (std 0.3) with one logit at 12, so that the sum is near 2 and log(sum)'s last bit follows
  // the sum's (on spread rows the last bit of a logsumexp near 12 moves only now and then); the
  // same rows with the invariant kernel must not differ.
  const int64_t vrows = 64;
  std::vector<float> x(vrows * V);
  for (int64_t r = 0; r < vrows; ++r) {
    auto row = random_logits(1, V, 500 + r, 0.3f);
    row[(r * 7919) % V] = 12.f;
    std::copy(row.begin(), row.end(), x.begin() + r * V);
  }
  auto params = params_for(vrows, kChoices[0], 1, 0);
  const auto differing = [&] {
    auto batch = run(Device::CUDA, x, vrows, V, params, 0);
    int differ = 0;
    for (int64_t r = 0; r < vrows; ++r) {
      std::vector<float> one(x.begin() + r * V, x.begin() + (r + 1) * V);
      std::vector<int32_t> p1(params.begin() + r * ch::kParams, params.begin() + (r + 1) * ch::kParams);
      auto alone = run(Device::CUDA, one, 1, V, p1, 0);
      differ += alone[0] != batch[r * 2] || alone[1] != batch[r * 2 + 1];
    }
    return differ;
  };
  const int invariant_differ = differing();
  printf("%s invariant: %d/%ld of the same rows alone differ from the batch (must be 0)\n",
         invariant_differ == 0 ? "PASS" : "FAIL", invariant_differ, (long)vrows);
  if (invariant_differ != 0) ok = false;
  g_variant_kernels.store(true);
  const int differ = differing();
  g_variant_kernels.store(false);
  printf("%s variant: %d/%ld rows alone differ from the batch (must be > 0)\n", differ > 0 ? "PASS" : "FAIL", differ,
         (long)vrows);
  if (differ == 0) ok = false;
  printf(ok ? "ALL OK\n" : "FAILED\n");
  return ok;
}

void bench(const char* path) {
  FILE* json = fopen(path, "w");
  if (!json) fail("cannot write ", path);
  fprintf(json, "{\"vocab\": %ld, \"results\": [\n", (long)kVocab);
  cudaStream_t s = static_cast<cudaStream_t>(cuda_runtime::stream());
  dev::EventPair events;
  printf("%6s  %-32s %10s %10s\n", "rows", "choice", "median us", "graph us");
  bool first = true;
  for (int64_t rows : {1, 8, 64, 256}) {
    constexpr int kRotate = 4;
    std::vector<Tensor> xs;
    for (int i = 0; i < kRotate; ++i)
      xs.push_back(make(Device::CUDA, DType::F32, {rows, kVocab}, random_logits(rows, kVocab, 40 + i, 1.f)));
    for (size_t c = 0; c + 1 < std::size(kChoices); ++c) {
      for (int top_n : {0, 20}) {
        if (top_n && c != 3) continue;
        Tensor pt = make(Device::CUDA, DType::I32, {rows, ch::kParams}, params_for(rows, kChoices[c], 99, top_n));
        Tensor out = make_tensor(Device::CUDA, DType::I32, {rows, 2 + 2 * top_n});
        for (int i = 0; i < 5; ++i) ops::choose_tokens(out, xs[i % kRotate], pt, nullptr);
        std::vector<double> times;
        for (int i = 0; i < 40; ++i) {
          CUDA_CHECK(cudaEventRecord(events.start, s));
          ops::choose_tokens(out, xs[i % kRotate], pt, nullptr);
          CUDA_CHECK(cudaEventRecord(events.stop, s));
          times.push_back(events.elapsed_ms() * 1000.0);
        }
        // The same call replayed from a CUDA graph, as inside a decode step: no host launch cost.
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        ops::choose_tokens(out, xs[0], pt, nullptr);
        CUDA_CHECK(cudaStreamEndCapture(s, &graph));
        CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        std::vector<double> replays;
        for (int i = 0; i < 45; ++i) {
          CUDA_CHECK(cudaEventRecord(events.start, s));
          CUDA_CHECK(cudaGraphLaunch(exec, s));
          CUDA_CHECK(cudaEventRecord(events.stop, s));
          if (i >= 5) replays.push_back(events.elapsed_ms() * 1000.0);
        }
        CUDA_CHECK(cudaGraphExecDestroy(exec));
        CUDA_CHECK(cudaGraphDestroy(graph));
        std::string name = std::string(kNames[c]) + (top_n ? " + 20 top" : "");
        const double us = dev::median(times), graph_us = dev::median(replays);
        printf("%6ld  %-32s %10.1f %10.1f\n", (long)rows, name.c_str(), us, graph_us);
        fprintf(json, "%s  {\"rows\": %ld, \"choice\": \"%s\", \"us\": %.2f, \"graph_us\": %.2f}", first ? "" : ",\n",
                (long)rows, name.c_str(), us, graph_us);
        first = false;
      }
    }
  }
  fprintf(json, "\n]}\n");
  fclose(json);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    cuda_runtime::require();
    std::string mode = argc > 1 ? argv[1] : "check";
    if (mode == "check") return check() ? 0 : 1;
    if (mode == "profile" && argc > 3) {
      // A fixed number of calls of one case, for Nsight Compute: profile ROWS CHOICE (index of kChoices).
      const int64_t rows = std::atol(argv[2]);
      const int c = std::atoi(argv[3]);
      if (rows < 1 || c < 0 || c >= static_cast<int>(std::size(kChoices))) fail("profile: bad ROWS or CHOICE");
      Tensor x = make(Device::CUDA, DType::F32, {rows, kVocab}, random_logits(rows, kVocab, 40, 1.f));
      Tensor pt = make(Device::CUDA, DType::I32, {rows, ch::kParams}, params_for(rows, kChoices[c], 99, 0));
      Tensor out = make_tensor(Device::CUDA, DType::I32, {rows, 2});
      for (int i = 0; i < 10; ++i) ops::choose_tokens(out, x, pt, nullptr);
      cuda_runtime::synchronize();
      return 0;
    }
    if (mode == "bench" && argc > 2) {
      bench(argv[2]);
      return 0;
    }
    fprintf(stderr, "usage: dev_sampling check | bench OUT.json\n");
    return 2;
  } catch (const std::exception& e) {
    fprintf(stderr, "dev_sampling: %s\n", e.what());
    return 1;
  }
}
