// rmsnorm (CPU): y[r,:] = bf16(bf16(x[r,:] * rsqrt(mean(x[r,:]^2) + eps)) * w)     x,y [R,H] bf16
// Invariant: each row's sum of squares is one pass over i = 0..H-1 in 8 fixed lanes (lane = i % 8),
// then the lanes are added in a fixed tree; row r depends on row r alone.
// Variant: rows < 4 split the row into 4 chunks reduced separately and added, as libraries that
// split small batches across blocks do; the sum then depends on the row count.
#include <cmath>
#include <cstdint>

#include "../common/bf16.h"
#include "../common/config.h"
#include "cpu_ops.h"

namespace detinfer::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int kVariantSplits = 4;

float sum_squares(const uint16_t* x, int64_t begin, int64_t end) {
  float lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      float v = bf16_to_f32(x[i + j]);
      lanes[j] += v * v;
    }
  for (; i < end; ++i) {
    float v = bf16_to_f32(x[i]);
    lanes[(i - begin) % kLanes] += v * v;
  }
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

float row_sum_squares(const uint16_t* x, int64_t hidden, int64_t rows) {
  if (!variant_kernels() || rows >= kVariantSplits) return sum_squares(x, 0, hidden);
  int64_t chunk = (hidden + kVariantSplits - 1) / kVariantSplits;
  float total = 0.f;
  for (int64_t begin = 0; begin < hidden; begin += chunk)
    total += sum_squares(x, begin, begin + chunk < hidden ? begin + chunk : hidden);
  return total;
}

}  // namespace

void rmsnorm_row(uint16_t* y, const uint16_t* x, const uint16_t* w, int64_t hidden, int64_t rows, float eps) {
  float mean = row_sum_squares(x, hidden, rows) / static_cast<float>(hidden);
  float inv = 1.0f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < hidden; ++i)
    y[i] = f32_to_bf16(round_bf16(bf16_to_f32(x[i]) * inv) * bf16_to_f32(w[i]));
}

void rmsnorm(Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  int64_t hidden = w.dim(0), rows = x.numel() / hidden;
  for (int64_t r = 0; r < rows; ++r)
    rmsnorm_row(out.ptr<uint16_t>() + r * hidden, x.ptr<uint16_t>() + r * hidden, w.ptr<uint16_t>(), hidden,
                  rows, eps);
}

void add_rmsnorm(Tensor& out, Tensor& residual, const Tensor& x, const Tensor& w, float eps) {
  int64_t hidden = w.dim(0), rows = x.numel() / hidden;
  uint16_t* res = residual.ptr<uint16_t>();
  const uint16_t* xs = x.ptr<uint16_t>();
  for (int64_t i = 0; i < rows * hidden; ++i) res[i] = f32_to_bf16(bf16_to_f32(res[i]) + bf16_to_f32(xs[i]));
  for (int64_t r = 0; r < rows; ++r)
    rmsnorm_row(out.ptr<uint16_t>() + r * hidden, res + r * hidden, w.ptr<uint16_t>(), hidden, rows, eps);
}

}  // namespace detinfer::cpu
