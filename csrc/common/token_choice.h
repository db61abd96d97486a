// Token choice: what the model's output head computes from one f32 logits row, shared by the CPU
// backend (cpu/sampling.cc) and the CUDA kernel (kernels/sampling.cu) so both implement one
// definition. Both compile this header (nvcc for the kernel), hence DI_HOST_DEVICE.
//
// Per row r, given logits x [V] and the row's parameters (params i32 [R, kChoiceParams]):
//   lse        = logsumexp(x)                          (the row reduction of token_logprobs)
//   target >= 0: id = target                           (scoring)
//   temperature == 0: id = argmax x, lowest id on ties (greedy)
//   otherwise   id = argmax over kept v of  x[v] / T + gumbel(seed, position, v),  lowest id on ties
//   logprob    = x[id] - lse
//   top N      = the N largest x (lowest id first on ties), each with x - lse
// The kept set is a prefix of the tokens sorted by logit descending, lowest id first on ties:
//   top-k: the first k;
//   top-p: the shortest prefix (of the top-k set) whose mass reaches P = ceil(p * Z), where the
//          mass of v is W(v) = floor(w(v) * 2^40), an integer, and Z the mass of the top-k set;
//          integer sums are exact, so the prefix does not depend on any order;
//   min-p: then only the tokens with w(v) >= min_p;
// with w(v) = exp2((x[v] - max) * E), E = log2(e) / T (weight_scale), each step one float32
// rounding and exp2 the backend's (CUDA: the hardware's ex2.approx; CPU: exp2f): w approximates
// exp(x[v]/T - max/T) within a few ulps and costs one multiply and one exp2 per token.
// A row holding NaN or +infinity, or only -infinity, is not finite: id = -1, logprob NaN.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DI_HOST_DEVICE inline
#endif

namespace detinfer::choice {

// Layout of one row of params (i32; the float fields hold float32 bits).
constexpr int kTemperature = 0;  // f32, 0: greedy
constexpr int kTopP = 1;         // f32 in (0, 1]; 1: off
constexpr int kMinP = 2;         // f32 in [0, 1]; 0: off
constexpr int kTopK = 3;         // i32, 0 or >= V: off
constexpr int kSeed = 4;         // u32 bits
constexpr int kPosition = 5;     // i32, position of the token being chosen
constexpr int kTarget = 6;       // i32, -1: choose; else the id whose log-prob is wanted
constexpr int kTopN = 7;         // i32, top log-probs wanted for this row (at most the output's N)
constexpr int kParams = 8;       // fields per row

// Output row layout (i32 [R, 2 + 2N]): id, logprob bits, then N top ids, then N top logprob bits;
// a row that asks for fewer than N fills the rest with id -1 and NaN.
constexpr int kMaxTopLogprobs = 20;

// Fixed-point scale of the probability mass used by top-p: 2^40.
constexpr float kMassScale = 1099511627776.0f;
// The Gumbel noise below lies in [-2.81, 16.64]; a token whose scaled logit is this far below
// the best score so far cannot win and needs no noise.
constexpr float kGumbelMax = 17.0f;

// Counter-based 32-bit hash: "lowbias32" (a murmur3-style finalizer with better constants).
DI_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// The hash of (seed, position): one per row, shared by its tokens' noise.
DI_HOST_DEVICE uint32_t noise_row(uint32_t seed, uint32_t position) {
  return mix32(mix32(seed ^ 0x9e3779b9u) ^ (position * 0x85ebca6bu));
}

DI_HOST_DEVICE uint32_t noise_token(uint32_t row, uint32_t token) { return mix32(row ^ ((token + 1u) * 0xc2b2ae35u)); }

DI_HOST_DEVICE uint32_t noise_bits(uint32_t seed, uint32_t position, uint32_t token) {
  return noise_token(noise_row(seed, position), token);
}

// A uniform value in (0, 1) with 24 significant bits, exact in float32: (2 * (h >> 9) + 1) / 2^24.
DI_HOST_DEVICE float noise_uniform(uint32_t h) {
  return static_cast<float>(((h >> 9) << 1) | 1u) * 5.9604644775390625e-8f;
}

// Order-preserving key of a float (larger float, larger key; -0 and +0 alike). Not for NaN.
DI_HOST_DEVICE uint32_t order_key(float x) {
  x = x + 0.0f;
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

DI_HOST_DEVICE float key_value(uint32_t key) {
  uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

DI_HOST_DEVICE float as_float(int32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

DI_HOST_DEVICE int32_t float_bits(float f) {
  int32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return bits;
}

// E = log2(e) / T in float32: the factor of a token's weight exponent (see the top of the file).
DI_HOST_DEVICE float weight_scale(float t) { return 1.44269504088896341f / t; }

// P = ceil(p * Z) in IEEE double: the mass the top-p prefix must reach.
DI_HOST_DEVICE uint64_t top_p_target(float p, uint64_t z) {
  double t = static_cast<double>(p) * static_cast<double>(z);
  uint64_t target = static_cast<uint64_t>(t);
  if (static_cast<double>(target) < t) target += 1;
  if (target < 1) target = 1;
  return target > z ? z : target;
}

}  // namespace detinfer::choice
