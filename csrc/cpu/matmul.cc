// matmul (CPU): out[M,N] = a[M,K] · w[N,K]^T (+ bias)     bf16 in, fp32 accumulate, out bf16 or f32
// Invariant: each output element is one dot product over k = 0..K-1 in 8 fixed lanes (lane =
// k % 8), lanes added in a fixed tree, then the bias; nothing depends on M.
// Variant: M < 8 splits K into 4 chunks reduced separately and added (a split-K chosen from M).
// matmul_silu_mul: matmul into its gate_up scratch, then silu_mul_packed (elementwise.cc).
//
// matmul_partitioned / matmul_partials / combine_partials (the row-parallel product of tensor
// parallelism, common/partitions.h): K cut into 8 equal contiguous partitions, K/8 a multiple of
// 16. Invariant: partition p of an output element is dot() over its range [p*K/8, (p+1)*K/8),
// the same 8 lanes (lane = k % 8, since the range starts on a multiple of 8) and the same lane
// tree as the plain matmul; the 8 fp32 partials are added by partitions::tree8, then the bias,
// then one rounding. matmul_partials computes any run of Q consecutive partitions from the
// columns of a and w they cover (a TP rank's shard), each with the same chain, so a TP rank's
// partials are the single device's partials bit for bit. Threads split N as in matmul.
// Variant of combine_partials (variant_kernels()): ordinary tensor parallelism, whose result
// follows the rank count: each rank's partials added in sequence and rounded to bf16 (its
// row-parallel output), the ranks' outputs summed in ring order from rank 1 as an NCCL all-reduce
// of the activations would (a single rank: p0 + ... + p7 in sequence, rounded once).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <system_error>
#include <thread>
#include <vector>

#include "../common/bf16.h"
#include "../common/config.h"
#include "../common/partitions.h"
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

// Runs columns(n_begin, n_end) over [0, N) on up to the hardware's threads, in blocks of kBlockN
// columns, when `work` multiply-adds are worth it.
// Threads split N (never K): the number of threads changes which thread computes an element,
// not how it is computed.
template <typename Columns>
void for_columns(int64_t N, int64_t work, const Columns& columns) {
  const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::min({hardware, std::max<int64_t>(1, work / kWorkPerThread), (N + kBlockN - 1) / kBlockN});
  if (threads <= 1) {
    columns(0, N);
    return;
  }
  const int64_t per = ((N + threads - 1) / threads + kBlockN - 1) / kBlockN * kBlockN;
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  int64_t next = std::min(N, per);  // columns [next, N) not handed to a thread yet
  try {
    while (next < N && static_cast<int64_t>(pool.size()) + 1 < threads) {
      const int64_t end = std::min(N, next + per);
      pool.emplace_back([&columns, next, end] { columns(next, end); });
      next = end;
    }
  } catch (const std::system_error&) {
    // No thread to be had: this one computes the rest (the same arithmetic, only later).
  }
  columns(0, std::min(N, per));
  if (next < N) columns(next, N);
  for (auto& th : pool) th.join();
}

std::vector<float> rows_f32(const Tensor& a) {
  const int64_t count = a.dim(0) * a.dim(1);
  const uint16_t* as = a.ptr<uint16_t>();
  std::vector<float> rows(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) rows[i] = bf16_to_f32(as[i]);
  return rows;
}

// partials[q, m, n] for q < Q: dot() over partition q's range of K (K/Q columns each).
void partials_into(float* partials, int64_t Q, const Tensor& a, const Tensor& w) {
  const int64_t M = a.dim(0), K = a.dim(1), N = w.dim(0), width = K / Q;
  const uint16_t* ws = w.ptr<uint16_t>();
  const std::vector<float> rows = rows_f32(a);
  for_columns(N, M * N * K, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockN) {
      const int64_t n1 = std::min(n_end, n0 + kBlockN);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t q = 0; q < Q; ++q)
            partials[(q * M + m) * N + n] = dot(rows.data() + m * K, ws + n * K, q * width, (q + 1) * width);
    }
  });
}

// The variant's combine: per-rank subtotals in sequence, rounded to bf16, then the ring from rank 1.
float ring_sum(const float* p, int64_t stride, int ranks) {
  const int64_t per = partitions::kPartitions / ranks;
  float total = 0.f;
  for (int i = 0; i < ranks; ++i) {
    const int64_t r = (1 + i) % ranks;
    float subtotal = p[r * per * stride];
    for (int64_t j = 1; j < per; ++j) subtotal = subtotal + p[(r * per + j) * stride];
    subtotal = bf16_to_f32(f32_to_bf16(subtotal));  // a rank's output, exchanged in bf16
    total = i == 0 ? subtotal : total + subtotal;
  }
  return total;
}

void combine_into(Tensor& out, const float* partials, const Tensor* bias, int ranks) {
  const int64_t MN = out.dim(0) * out.dim(1), N = out.dim(1);
  const uint16_t* bs = bias ? bias->ptr<uint16_t>() : nullptr;
  const bool f32 = out.dtype == DType::F32;
  const bool ring = variant_kernels();
  for (int64_t i = 0; i < MN; ++i) {
    const float* p = partials + i;
    float v = ring ? ring_sum(p, MN, ranks)
                   : partitions::tree8(p[0], p[MN], p[2 * MN], p[3 * MN], p[4 * MN], p[5 * MN], p[6 * MN], p[7 * MN]);
    if (bs) v += bf16_to_f32(bs[i % N]);
    if (f32) {
      out.ptr<float>()[i] = v;
    } else {
      out.ptr<uint16_t>()[i] = f32_to_bf16(v);
    }
  }
}

}  // namespace

void matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias) {
  const int64_t M = a.dim(0), K = a.dim(1), N = w.dim(0);
  const uint16_t* ws = w.ptr<uint16_t>();
  const uint16_t* bs = bias ? bias->ptr<uint16_t>() : nullptr;
  const std::vector<float> rows = rows_f32(a);
  for_columns(N, M * N * K, [&](int64_t n_begin, int64_t n_end) {
    matmul_columns(out, rows, ws, bs, M, N, K, n_begin, n_end);
  });
}

// The product into gate_up, then SiLU·mul: on the CPU the op is the two ops in sequence.
void matmul_silu_mul(Tensor& out, Tensor& gate_up, const Tensor& a, const Tensor& w, const Tensor* bias) {
  matmul(gate_up, a, w, bias);
  silu_mul_packed(out, gate_up);
}

// The norm into normed (rmsnorm.cc), then the product: on the CPU the op is the ops in sequence.
static void norm_rows(Tensor& normed, Tensor& residual_out, const Tensor& residual_in, const Tensor* x,
                      const Tensor& norm_w, float eps) {
  if (!x) return rmsnorm(normed, residual_in, norm_w, eps);
  if (residual_out.data() != residual_in.data())
    std::memcpy(residual_out.data(), residual_in.data(), static_cast<size_t>(residual_in.numel()) * 2);
  add_rmsnorm(normed, residual_out, *x, norm_w, eps);
}

void norm_matmul(Tensor& out, Tensor& normed, Tensor& residual_out, const Tensor& residual_in, const Tensor* x,
                 const Tensor& norm_w, float eps, const Tensor& w, const Tensor* bias) {
  norm_rows(normed, residual_out, residual_in, x, norm_w, eps);
  matmul(out, normed, w, bias);
}

void norm_matmul_silu_mul(Tensor& out, Tensor& gate_up, Tensor& normed, Tensor& residual_out,
                          const Tensor& residual_in, const Tensor* x, const Tensor& norm_w, float eps, const Tensor& w,
                          const Tensor* bias) {
  norm_rows(normed, residual_out, residual_in, x, norm_w, eps);
  matmul_silu_mul(out, gate_up, normed, w, bias);
}

void matmul_partials(Tensor& partials, const Tensor& a, const Tensor& w) {
  partials_into(partials.ptr<float>(), partials.dim(0), a, w);
}

void combine_partials(Tensor& out, const Tensor& partials, const Tensor* bias, int ranks) {
  combine_into(out, partials.ptr<float>(), bias, ranks);
}

// The one-device row-parallel product: all 8 partitions, then the tree (as at TP1).
void matmul_partitioned(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias) {
  std::vector<float> partials(static_cast<size_t>(partitions::kPartitions * a.dim(0) * w.dim(0)));
  partials_into(partials.data(), partitions::kPartitions, a, w);
  combine_into(out, partials.data(), bias, 1);
}

}  // namespace detinfer::cpu
