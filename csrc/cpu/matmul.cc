// matmul (CPU): out[M,N] = a[M,K] · w[N,K]^T (+ bias)     bf16 in, fp32 accumulate, out bf16 or f32
// Invariant: each output element is one dot product over k = 0..K-1 in 8 fixed lanes (lane =
// k % 8), lanes added in a fixed tree, then the bias; nothing depends on M.
// Variant: M < 8 splits K into 4 chunks reduced separately and added (a split-K chosen from M).
#include <cstdint>
#include <vector>

#include "../common/bf16.h"
#include "../common/config.h"
#include "cpu_ops.h"

namespace detinfer::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int64_t kVariantMaxRows = 8;
constexpr int kVariantSplits = 4;

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

}  // namespace

void matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias) {
  int64_t M = a.dim(0), K = a.dim(1), N = w.dim(0);
  const uint16_t* as = a.ptr<uint16_t>();
  const uint16_t* ws = w.ptr<uint16_t>();
  const uint16_t* bs = bias ? bias->ptr<uint16_t>() : nullptr;
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) row[k] = bf16_to_f32(as[m * K + k]);
    for (int64_t n = 0; n < N; ++n) {
      float acc = dot_row(row.data(), ws + n * K, K, M);
      if (bs) acc += bf16_to_f32(bs[n]);
      if (out.dtype == DType::F32) {
        out.ptr<float>()[m * N + n] = acc;
      } else {
        out.ptr<uint16_t>()[m * N + n] = f32_to_bf16(acc);
      }
    }
  }
}

}  // namespace detinfer::cpu
