// Row reductions over fp32 logits (CPU): log-softmax, argmax, the log-prob of given tokens.
// Invariant: each row is reduced alone, the max and the sum of exp(x - max) each in one pass over
// v = 0..V-1 in 8 fixed lanes (lane = v % 8) added in a fixed tree; argmax keeps the lowest index
// among equal maxima. log-softmax and token_logprobs share one logsumexp, so a token's log-prob is
// the same bits whichever op produced it.
// Variant: rows < 4 split the sum into 4 chunks, the order then depending on the row count.
#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/config.h"
#include "cpu_ops.h"

namespace detinfer::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int kVariantSplits = 4;

float sum_exp(const float* x, int64_t begin, int64_t end, float max) {
  float lanes[kLanes] = {};
  int64_t v = begin;
  for (; v + kLanes <= end; v += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += std::exp(x[v + j] - max);
  for (; v < end; ++v) lanes[(v - begin) % kLanes] += std::exp(x[v] - max);
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

float logsumexp(const float* x, int64_t vocab, int64_t rows) {
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < vocab; ++v) max = x[v] > max ? x[v] : max;
  if (std::isinf(max)) return max;
  float sum;
  if (!variant_kernels() || rows >= kVariantSplits) {
    sum = sum_exp(x, 0, vocab, max);
  } else {
    int64_t chunk = (vocab + kVariantSplits - 1) / kVariantSplits;
    sum = 0.f;
    for (int64_t begin = 0; begin < vocab; begin += chunk)
      sum += sum_exp(x, begin, begin + chunk < vocab ? begin + chunk : vocab, max);
  }
  return max + std::log(sum);
}

}  // namespace

void log_softmax(Tensor& out, const Tensor& x) {
  int64_t rows = x.dim(0), vocab = x.dim(1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.ptr<float>() + r * vocab;
    float lse = logsumexp(xr, vocab, rows);
    for (int64_t v = 0; v < vocab; ++v) out.ptr<float>()[r * vocab + v] = xr[v] - lse;
  }
}

void argmax(Tensor& out, const Tensor& x) {
  int64_t rows = x.dim(0), vocab = x.dim(1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.ptr<float>() + r * vocab;
    int64_t best = 0;
    for (int64_t v = 1; v < vocab; ++v)
      if (xr[v] > xr[best]) best = v;
    out.ptr<int32_t>()[r] = static_cast<int32_t>(best);
  }
}

void token_logprobs(Tensor& out, const Tensor& x, const Tensor& ids) {
  int64_t rows = x.dim(0), vocab = x.dim(1);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t id = ids.ptr<int32_t>()[r];
    DI_CHECK(id >= 0 && id < vocab, "token_logprobs: id ", id, " at row ", r, " is out of range [0, ", vocab, ")");
    const float* xr = x.ptr<float>() + r * vocab;
    out.ptr<float>()[r] = xr[id] - logsumexp(xr, vocab, rows);
  }
}

}  // namespace detinfer::cpu
