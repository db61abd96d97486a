// Row reductions over fp32 logits (CPU): log-softmax, argmax, the log-prob of given tokens.
// Invariant: each row is reduced alone, the max and the sum of exp(x - max) each in one pass over
// v = 0..V-1 in 8 fixed lanes (lane = v % 8) added in a fixed tree; argmax keeps the lowest index
// among equal maxima. log-softmax and token_logprobs share one logsumexp, so a token's log-prob is
// the same bits whichever op produced it.
// Variant: rows < 4 split the sum into 4 chunks, the order then depending on the row count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/config.h"
#include "../common/token_choice.h"
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

// choose_tokens (common/token_choice.h): the same definition as the CUDA kernel. The kept set and
// the top-N come from exact sorts of (logit, id) keys; masses are integers. Row r alone.
namespace {

namespace ch = detinfer::choice;

uint64_t sort_key(float x, int64_t v) {
  return (static_cast<uint64_t>(ch::order_key(x)) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(v));
}
int32_t key_id(uint64_t k) { return static_cast<int32_t>(~static_cast<uint32_t>(k)); }

struct RowScale {
  float t, smax, max;
  float e = ch::weight_scale(t);
  float scaled(float x) const { return x / t; }
  float weight(float x) const { return std::exp2((x - max) * e); }
  uint64_t mass(float x) const { return static_cast<uint64_t>(weight(x) * ch::kMassScale); }
};

// Sort keys of the tokens whose scaled distance to the best is at most `gap`, largest first.
std::vector<uint64_t> sorted_within(const float* x, int64_t V, const RowScale& s, float gap) {
  std::vector<uint64_t> keys;
  for (int64_t v = 0; v < V; ++v)
    if (!(s.smax - s.scaled(x[v]) > gap)) keys.push_back(sort_key(x[v], v));
  std::sort(keys.begin(), keys.end(), [](uint64_t a, uint64_t b) { return a > b; });
  return keys;
}

// The key of the token at which the running total in sort-key order (count, or mass when
// by_mass) first reaches target; *prefix_mass gets the mass of that prefix.
uint64_t prefix_cut(const float* x, int64_t V, const RowScale& s, uint64_t target, bool by_mass, uint64_t* prefix_mass) {
  // Widen the candidate window until it holds the prefix: it always does once it holds every token.
  for (float gap = 1.f;; gap *= 2.f) {
    bool all = gap > 64.f;
    std::vector<uint64_t> keys = sorted_within(x, V, s, all ? std::numeric_limits<float>::infinity() : gap);
    uint64_t count = 0, mass = 0;
    for (uint64_t k : keys) {
      count += 1;
      mass += s.mass(x[key_id(k)]);
      if ((by_mass ? mass : count) >= target) {
        *prefix_mass = mass;
        return k;
      }
    }
    if (all) {
      *prefix_mass = mass;
      return keys.empty() ? 0 : keys.back();
    }
  }
}

float gumbel(uint32_t seed, int32_t position, int64_t v) {
  float u = ch::noise_uniform(ch::noise_bits(seed, static_cast<uint32_t>(position), static_cast<uint32_t>(v)));
  return -std::log(-std::log(u));
}

int32_t sample(const float* x, int64_t V, const int32_t* p, float max, int64_t best) {
  const float t = ch::as_float(p[ch::kTemperature]), top_p = ch::as_float(p[ch::kTopP]);
  const float min_p = ch::as_float(p[ch::kMinP]);
  const int32_t top_k = p[ch::kTopK], position = p[ch::kPosition];
  const uint32_t seed = static_cast<uint32_t>(p[ch::kSeed]);
  const RowScale s{t, max / t, max};
  uint64_t cut = 0;
  if ((top_k > 0 && top_k < V) || top_p < 1.f) {
    uint64_t z = 0;
    if (top_k > 0 && top_k < V) {
      cut = prefix_cut(x, V, s, static_cast<uint64_t>(top_k), false, &z);
    } else {
      for (int64_t v = 0; v < V; ++v) z += s.mass(x[v]);
    }
    if (top_p < 1.f) {
      uint64_t unused;
      cut = std::max(cut, prefix_cut(x, V, s, ch::top_p_target(top_p, z), true, &unused));
    }
  }
  const float score0 = s.smax + gumbel(seed, position, best);
  float best_score = score0;
  int64_t pick = best;
  for (int64_t v = 0; v < V; ++v) {
    float sv = s.scaled(x[v]);
    if (sv + ch::kGumbelMax < score0 || v == best) continue;
    if (sort_key(x[v], v) < cut) continue;
    if (min_p > 0.f && s.weight(x[v]) < min_p) continue;
    float score = sv + gumbel(seed, position, v);
    if (score > best_score || (score == best_score && v < pick)) best_score = score, pick = v;
  }
  return static_cast<int32_t>(pick);
}

}  // namespace

void choose_tokens(Tensor& out, const Tensor& x, const Tensor& params, const Tensor* live) {
  const int64_t vocab = x.dim(1), width = out.dim(1);
  // Rows past live[0] are skipped (the logit processors' rows not in use this step).
  const int64_t rows = live ? std::clamp<int64_t>(live->ptr<int32_t>()[0], 0, x.dim(0)) : x.dim(0);
  const int64_t launch_rows = x.dim(0);  // what the variant's split follows, as on CUDA
  const int64_t top_n = (width - 2) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.ptr<float>() + r * vocab;
    const int32_t* p = params.ptr<int32_t>() + r * ch::kParams;
    int32_t* o = out.ptr<int32_t>() + r * width;
    bool bad = false;
    int64_t best = 0;
    for (int64_t v = 0; v < vocab; ++v) {
      bad = bad || std::isnan(xr[v]) || (std::isinf(xr[v]) && xr[v] > 0);
      if (xr[v] > xr[best]) best = v;
    }
    const float max = xr[best];
    if (bad || vocab == 0 || (std::isinf(max) && max < 0)) {
      for (int64_t i = 0; i < width; ++i) o[i] = (i == 0 || (i >= 2 && i < 2 + top_n)) ? -1 : ch::float_bits(NAN);
      continue;
    }
    const float lse = logsumexp(xr, vocab, launch_rows);
    const int32_t target = p[ch::kTarget];
    const float t = ch::as_float(p[ch::kTemperature]);
    int32_t id;
    if (target >= 0) {
      DI_CHECK(target < vocab, "choose_tokens: target ", target, " at row ", r, " is out of range [0, ", vocab, ")");
      id = target;
    } else if (t > 0.f) {
      id = sample(xr, vocab, p, max, best);
    } else {
      id = static_cast<int32_t>(best);
    }
    o[0] = id;
    o[1] = ch::float_bits(xr[id] - lse);
    const int64_t row_top = std::clamp<int64_t>(p[ch::kTopN], 0, top_n);
    if (top_n > 0) {
      int64_t n = std::min(row_top, vocab);
      std::vector<uint64_t> keys(n > 0 ? static_cast<size_t>(vocab) : 0);
      for (int64_t v = 0; v < vocab && n > 0; ++v) keys[v] = sort_key(xr[v], v);
      std::partial_sort(keys.begin(), keys.begin() + n, keys.end(), [](uint64_t a, uint64_t b) { return a > b; });
      for (int64_t i = 0; i < top_n; ++i) {
        int32_t v = i < n ? key_id(keys[i]) : -1;
        o[2 + i] = v;
        o[2 + top_n + i] = v >= 0 ? ch::float_bits(xr[v] - lse) : ch::float_bits(NAN);
      }
    }
  }
}

}  // namespace detinfer::cpu
