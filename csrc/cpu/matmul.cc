// matmul (CPU): out[M,N] = a[M,K] · w[N,K]^T (+ bias)     bf16 in, fp32 accumulate, out bf16 or f32
// Invariant: each output element is one dot product over k = 0..K-1 in 8 fixed lanes (lane =
// k % 8), lanes added in a fixed tree, then the bias; nothing depends on M.
// Variant: M < 8 splits K into 4 chunks reduced separately and added (a split-K chosen from M).
#include <algorithm>
#include <cstdint>
#include <functional>
#include <system_error>
#include <thread>
#include <vector>

#include "../common/bf16.h"
#include "../common/config.h"
#include "cpu_ops.h"

namespace detinfer::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int64_t kVariantMaxRows = 8;
constexpr int kVariantSplits = 4;
constexpr int64_t kBlockN = 16;                    // weight rows kept in cache across the rows of a
constexpr int64_t kWorkPerThread = int64_t{1} << 22;  // multiply-adds below which a thread is not worth starting

float dot(const float* a, const uint16_t* w, int64_t begin, int64_t end) {
  float lanes[kLanes] = {};
  int64_t k = begin;
  for (; k + kLanes <= end; k += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[k + j] * bf16_to_f32(w[k + j]);
  for (; k < end; ++k) lanes[(k - begin) % kLanes] += a[k] * bf16_to_f32(w[k]);
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

float dot_row(const float* a, const uint16_t* w, int64_t K, int64_t M) {
  if (!variant_kernels() || M >= kVariantMaxRows) return dot(a, w, 0, K);
  int64_t chunk = (K + kVariantSplits - 1) / kVariantSplits;
  float total = 0.f;
  for (int64_t begin = 0; begin < K; begin += chunk) total += dot(a, w, begin, begin + chunk < K ? begin + chunk : K);
  return total;
}

// Columns [n_begin, n_end) of every row, in blocks of kBlockN columns whose weight rows stay in
// cache while every row of a passes over them. Each element is still dot_row's one chain.
void matmul_columns(Tensor& out, const std::vector<float>& a, const uint16_t* ws, const uint16_t* bs, int64_t M,
                    int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  const bool f32 = out.dtype == DType::F32;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockN) {
    const int64_t n1 = std::min(n_end, n0 + kBlockN);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) {
        float acc = dot_row(a.data() + m * K, ws + n * K, K, M);
        if (bs) acc += bf16_to_f32(bs[n]);
        if (f32) {
          out.ptr<float>()[m * N + n] = acc;
        } else {
          out.ptr<uint16_t>()[m * N + n] = f32_to_bf16(acc);
        }
      }
  }
}

}  // namespace

// Threads split N (never K): the number of threads changes which thread computes an element,
// not how it is computed.
void matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias) {
  int64_t M = a.dim(0), K = a.dim(1), N = w.dim(0);
  const uint16_t* as = a.ptr<uint16_t>();
  const uint16_t* ws = w.ptr<uint16_t>();
  const uint16_t* bs = bias ? bias->ptr<uint16_t>() : nullptr;
  std::vector<float> rows(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) rows[i] = bf16_to_f32(as[i]);

  const int64_t work = M * N * K;
  const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::min({hardware, std::max<int64_t>(1, work / kWorkPerThread), (N + kBlockN - 1) / kBlockN});
  if (threads <= 1) {
    matmul_columns(out, rows, ws, bs, M, N, K, 0, N);
    return;
  }
  const int64_t per = ((N + threads - 1) / threads + kBlockN - 1) / kBlockN * kBlockN;
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  int64_t next = std::min(N, per);  // columns [next, N) not handed to a thread yet
  try {
    while (next < N && static_cast<int64_t>(pool.size()) + 1 < threads) {
      const int64_t end = std::min(N, next + per);
      pool.emplace_back(matmul_columns, std::ref(out), std::cref(rows), ws, bs, M, N, K, next, end);
      next = end;
    }
  } catch (const std::system_error&) {
    // No thread to be had: this one computes the rest (the same arithmetic, only later).
  }
  matmul_columns(out, rows, ws, bs, M, N, K, 0, std::min(N, per));
  if (next < N) matmul_columns(out, rows, ws, bs, M, N, K, next, N);
  for (auto& th : pool) th.join();
}

}  // namespace detinfer::cpu
