// Row reductions over fp32 logits x [R,V] (V up to 151936 and beyond):
//   log_softmax     out[r,:] = x[r,:] - logsumexp(x[r,:])          out f32 [R,V]
//   argmax          out[r] = argmax_v x[r,v], lowest v on ties     out i32 [R]
//   token_logprobs  out[r] = x[r,ids[r]] - logsumexp(x[r,:])       out f32 [R]
// Invariant: one block of kThreads threads per row whatever R is. Thread t visits v = t,
// t + kThreads, ... in increasing v: first the max, then one fp32 sum of expf(x - max); the
// kThreads values are combined by the fixed tree of block_reduce.cuh; lse = max + logf(sum).
// log_softmax and token_logprobs call the same row_logsumexp with the same block size, so a
// token's log-prob has the same bits from either op. Row r depends on row r alone.
// Variant (variant_kernels()): R < kVariantSplits spreads each row over kVariantSplits blocks
// (partial max and sum each, combined through a workspace), as split row reductions do.
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>

#include "../common/config.h"
#include "../common/token_choice.h"
#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "block_reduce.cuh"
#include "cuda_ops.h"
#include "device_buffer.cuh"

namespace detinfer::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kVariantSplits = 4;

// max and sum of expf(x - max) of x[begin, end), by the block's fixed order and tree.
struct MaxSum {
  float max, sum;
};

__device__ MaxSum row_max_sum(const float* x, int64_t begin, int64_t end) {
  float m = -INFINITY;
  for (int64_t v = begin + threadIdx.x; v < end; v += kThreads) m = fmaxf(m, x[v]);
  m = block_max<kThreads>(m);
  if (isinf(m) && m < 0) return {m, 0.f};
  float s = 0.f;
  for (int64_t v = begin + threadIdx.x; v < end; v += kThreads) s = s + expf(x[v] - m);
  return {m, block_sum<kThreads>(s)};
}

__device__ float row_logsumexp(const float* x, int64_t V) {
  MaxSum ms = row_max_sum(x, 0, V);
  if (isinf(ms.max) && ms.max < 0) return ms.max;
  return ms.max + logf(ms.sum);
}

__global__ void __launch_bounds__(kThreads) log_softmax_kernel(float* out, const float* x, int64_t V) {
  int64_t r = blockIdx.x;
  const float* xr = x + r * V;
  float lse = row_logsumexp(xr, V);
  for (int64_t v = threadIdx.x; v < V; v += kThreads) out[r * V + v] = xr[v] - lse;
}

// An id outside [0, V) (the host validates them) gives NaN instead of reading out of bounds.
__global__ void __launch_bounds__(kThreads) token_logprobs_kernel(float* out, const float* x, const int32_t* ids,
                                                                  int64_t V) {
  int64_t r = blockIdx.x;
  const float* xr = x + r * V;
  float lse = row_logsumexp(xr, V);
  if (threadIdx.x == 0) {
    int32_t id = ids[r];
    out[r] = id >= 0 && id < V ? xr[id] - lse : NAN;
  }
}

__global__ void __launch_bounds__(kThreads) argmax_kernel(int32_t* out, const float* x, int64_t V) {
  int64_t r = blockIdx.x;
  const float* xr = x + r * V;
  ArgBest best{-INFINITY, 0x7fffffff};
  for (int64_t v = threadIdx.x; v < V; v += kThreads) best = arg_better(best, ArgBest{xr[v], static_cast<int>(v)});
  best = block_argmax<kThreads>(best);
  if (threadIdx.x == 0) out[r] = best.index == 0x7fffffff ? 0 : best.index;
}

// Variant only: block (r, s) writes the (max, sum) of part s of row r.
__global__ void __launch_bounds__(kThreads) lse_partial_kernel(float2* partial, const float* x, int64_t V,
                                                               int64_t per_split) {
  int64_t r = blockIdx.x, s = blockIdx.y;
  int64_t begin = s * per_split, end = min(V, begin + per_split);
  MaxSum ms = row_max_sum(x + r * V, begin, end);
  if (threadIdx.x == 0) partial[r * gridDim.y + s] = make_float2(ms.max, ms.sum);
}

// Variant only: combines the parts of row r in part order, then writes like the invariant kernels
// (out_rows: log_softmax rows; out_tokens: token log-probs).
__global__ void __launch_bounds__(kThreads) lse_apply_kernel(float* out_rows, float* out_tokens, const int32_t* ids,
                                                             const float* x, const float2* partial, int splits,
                                                             int64_t V) {
  int64_t r = blockIdx.x;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, partial[r * splits + s].x);
  float lse = m;
  if (!(isinf(m) && m < 0)) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) {
      float2 p = partial[r * splits + s];
      if (p.y > 0.f) sum = sum + p.y * expf(p.x - m);
    }
    lse = m + logf(sum);
  }
  const float* xr = x + r * V;
  if (out_rows)
    for (int64_t v = threadIdx.x; v < V; v += kThreads) out_rows[r * V + v] = xr[v] - lse;
  if (out_tokens && threadIdx.x == 0) {
    int32_t id = ids[r];
    out_tokens[r] = id >= 0 && id < V ? xr[id] - lse : NAN;
  }
}

// The one place the launch is chosen: a block of kThreads per row; a split only in the variant.
int row_splits(int64_t rows, int64_t V) {
  if (variant_kernels() && rows < kVariantSplits && V >= kVariantSplits) return kVariantSplits;
  return 1;
}

std::string shapes(int64_t rows, int64_t V) {
  return "[rows=" + std::to_string(rows) + ", V=" + std::to_string(V) + "]";
}

// The variant's split path for log_softmax (out_rows) and token_logprobs (out_tokens).
void split_logsumexp(const char* op, float* out_rows, float* out_tokens, const int32_t* ids, const float* x,
                     int64_t rows, int64_t V, int splits, cudaStream_t stream) {
  DeviceBuffer partial(static_cast<size_t>(rows) * splits * sizeof(float2));
  int64_t per = (V + splits - 1) / splits;
  lse_partial_kernel<<<dim3(static_cast<unsigned>(rows), splits), kThreads, 0, stream>>>(
      static_cast<float2*>(partial.data()), x, V, per);
  CUDA_CHECK_LAUNCH(op, shapes(rows, V));
  lse_apply_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      out_rows, out_tokens, ids, x, static_cast<const float2*>(partial.data()), splits, V);
  CUDA_CHECK_LAUNCH(op, shapes(rows, V));
}

cudaStream_t device_stream() { return static_cast<cudaStream_t>(cuda_runtime::stream()); }

}  // namespace

void log_softmax(Tensor& out, const Tensor& x) {
  int64_t rows = x.dim(0), V = x.dim(1);
  if (rows == 0 || V == 0) return;
  DI_CHECK(rows <= 0x7fffffff, "log_softmax: too many rows (", rows, ")");
  cudaStream_t stream = device_stream();
  int splits = row_splits(rows, V);
  if (splits > 1) return split_logsumexp("log_softmax", out.ptr<float>(), nullptr, nullptr, x.ptr<float>(), rows, V,
                                         splits, stream);
  log_softmax_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(out.ptr<float>(), x.ptr<float>(), V);
  CUDA_CHECK_LAUNCH("log_softmax", shapes(rows, V));
}

void token_logprobs(Tensor& out, const Tensor& x, const Tensor& ids) {
  int64_t rows = x.dim(0), V = x.dim(1);
  if (rows == 0) return;
  DI_CHECK(V > 0, "token_logprobs: x has no columns");
  DI_CHECK(rows <= 0x7fffffff, "token_logprobs: too many rows (", rows, ")");
  cudaStream_t stream = device_stream();
  int splits = row_splits(rows, V);
  if (splits > 1) return split_logsumexp("token_logprobs", nullptr, out.ptr<float>(), ids.ptr<int32_t>(),
                                         x.ptr<float>(), rows, V, splits, stream);
  token_logprobs_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(out.ptr<float>(), x.ptr<float>(),
                                                                               ids.ptr<int32_t>(), V);
  CUDA_CHECK_LAUNCH("token_logprobs", shapes(rows, V));
}

void argmax(Tensor& out, const Tensor& x) {
  int64_t rows = x.dim(0), V = x.dim(1);
  if (rows == 0) return;
  DI_CHECK(V > 0, "argmax: x has no columns");
  DI_CHECK(rows <= 0x7fffffff, "argmax: too many rows (", rows, ")");
  argmax_kernel<<<static_cast<unsigned>(rows), kThreads, 0, device_stream()>>>(out.ptr<int32_t>(), x.ptr<float>(), V);
  CUDA_CHECK_LAUNCH("argmax", shapes(rows, V));
}


// ---------------------------------------------------------------------------------------------
// choose_tokens: the model's output head (csrc/common/token_choice.h defines what it computes).
//   out i32 [R, 2 + 2N] (id, logprob bits, N top ids, N top logprob bits), x f32 [R, V],
//   params i32 [R, choice::kParams]
// Invariant: one block of kChoiceThreads threads per row whatever R is; every float reduction
// (max, the logsumexp sum) runs in an order fixed by V and kChoiceThreads (thread t visits
// v = t, t + kChoiceThreads, ... in increasing v, then the fixed tree of block_reduce.cuh).
// The kept set and the top-N are selected exactly: counts and fixed-point masses are integers,
// whose sums do not depend on the order of the atomics that form them, and every comparison is a
// total order on (logit, id). The value bins below only narrow the search; the result is defined
// without them. Row r depends on row r alone.
// Variant (variant_kernels()): R < kVariantSplits reduces each row in kVariantSplits parts, each
// with its own max and sum rescaled at the end, as split row reductions do, so the log-probs' bits
// depend on R.
namespace {

namespace ch = detinfer::choice;

constexpr int kChoiceThreads = 1024;
// Value bins of the scaled logit distance d = max/T - x/T (raw logits for greedy rows): bin
// floor(d * kBinScale), the last bin holding everything at or beyond kBinRange.
constexpr int kBins = 2048;
constexpr float kBinRange = 24.f;
constexpr float kBinScale = (kBins - 1) / kBinRange;
// Candidates gathered into shared memory for an exact sort (one bin, or the bins up to the N-th).
constexpr int kCandidates = 4096;
constexpr size_t kChoiceSmem = kBins * (sizeof(unsigned) + sizeof(unsigned long long)) +
                               kCandidates * 2 * sizeof(unsigned long long);

struct RowChoice {
  float t, top_p, min_p;
  int top_k, position, target, top_n;
  uint32_t seed;
};

__device__ RowChoice load_choice(const int32_t* p) {
  return {ch::as_float(p[ch::kTemperature]), ch::as_float(p[ch::kTopP]), ch::as_float(p[ch::kMinP]),
          p[ch::kTopK], p[ch::kPosition], p[ch::kTarget], p[ch::kTopN], static_cast<uint32_t>(p[ch::kSeed])};
}

// What the row's passes share: the scaled maximum and the bin of a logit.
struct Scale {
  float t;     // temperature (1 for greedy rows: bins on raw logits)
  float smax;  // max / t
  __device__ float scaled(float x) const { return x / t; }
  __device__ int bin(float x) const {
    float d = (smax - scaled(x)) * kBinScale;
    return d >= static_cast<float>(kBins - 1) ? kBins - 1 : static_cast<int>(d);
  }
  __device__ float weight(float x) const { return expf(scaled(x) - smax); }
  __device__ unsigned long long mass(float x) const { return __float2ull_rz(weight(x) * ch::kMassScale); }
};

// Sort key of token v: larger logit first, then lower id. Unique per token.
__device__ __forceinline__ unsigned long long sort_key(float x, int v) {
  return (static_cast<unsigned long long>(ch::order_key(x)) << 32) | static_cast<uint32_t>(~v);
}
__device__ __forceinline__ int key_id(unsigned long long k) { return static_cast<int>(~static_cast<uint32_t>(k)); }

// Visits x[0..V) of one row, f(v, x[v]). Thread t takes the float4 groups t, t + kChoiceThreads,
// ... (kUnroll groups loaded before any is used, so that many loads are in flight) and their four
// values in order: each thread sees its values in increasing v, an order fixed by V alone.
// Rows that are not 16-byte aligned (V not a multiple of 4) go value by value, in the same order.
constexpr int kUnroll = 2;

template <class F>
__device__ __forceinline__ void for_each_logit(const float* x, int64_t V, bool vec, F&& f) {
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const int64_t groups = V / 4;
    for (int64_t g0 = threadIdx.x; g0 < groups; g0 += int64_t{kChoiceThreads} * kUnroll) {
      float4 buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t g = g0 + int64_t{u} * kChoiceThreads;
        if (g < groups) buf[u] = x4[g];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t g = g0 + int64_t{u} * kChoiceThreads;
        if (g < groups) {
          f(4 * g, buf[u].x);
          f(4 * g + 1, buf[u].y);
          f(4 * g + 2, buf[u].z);
          f(4 * g + 3, buf[u].w);
        }
      }
    }
  } else {
    for (int64_t v0 = threadIdx.x; v0 < V; v0 += int64_t{kChoiceThreads} * kUnroll) {
      float buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t{u} * kChoiceThreads;
        if (v < V) buf[u] = x[v];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t{u} * kChoiceThreads;
        if (v < V) f(v, buf[u]);
      }
    }
  }
}

__device__ unsigned long long block_sum_u64(unsigned long long v) {
  __shared__ unsigned long long scratch[32];
#pragma unroll
  for (int d = 16; d >= 1; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    unsigned long long w = threadIdx.x < kChoiceThreads / 32 ? scratch[threadIdx.x] : 0ull;
#pragma unroll
    for (int d = 16; d >= 1; d /= 2) w += __shfl_xor_sync(0xffffffffu, w, d);
    if (threadIdx.x == 0) scratch[0] = w;
  }
  __syncthreads();
  unsigned long long total = scratch[0];
  __syncthreads();
  return total;
}

// The first index (in order: descending logits) where the running total of `values` reaches
// `target`, and the total before it; PER values per thread, kChoiceThreads * PER in all. Integer
// sums: exact in any order. An unreachable target gives the last index.
struct BinCut {
  int bin;
  unsigned long long before;
};

template <int PER, class T>
__device__ BinCut find_running(const T* values, unsigned long long target) {
  __shared__ unsigned long long warp_totals[32];
  __shared__ BinCut found;
  int t = threadIdx.x, lane = t % 32, warp = t / 32;
  unsigned long long mine[PER];
  unsigned long long incl = 0;
#pragma unroll
  for (int j = 0; j < PER; ++j) mine[j] = values[PER * t + j], incl += mine[j];
  const unsigned long long own = incl;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    unsigned long long o = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += o;
  }
  if (lane == 31) warp_totals[warp] = incl;
  if (t == 0) found = {PER * kChoiceThreads - 1, 0};
  __syncthreads();
  unsigned long long run = incl - own;
  for (int w = 0; w < warp; ++w) run += warp_totals[w];
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    if (run < target && run + mine[j] >= target) found = {PER * t + j, run};
    run += mine[j];
  }
  __syncthreads();
  BinCut r = found;
  __syncthreads();
  return r;
}

template <class T>
__device__ BinCut find_bin(const T* values, unsigned long long target) {
  static_assert(kBins % kChoiceThreads == 0, "whole bins per thread");
  return find_running<kBins / kChoiceThreads>(values, target);
}

// Candidates in shared memory: sort keys and masses, sorted by key, largest first (bitonic sort
// of kCandidates entries; empty entries have key 0 and sort last).
struct Candidates {
  unsigned long long* key;
  unsigned long long* mass;
  int* count;  // shared counter
};

__device__ void sort_candidates(Candidates c) {
  for (int size = 2; size <= kCandidates; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < kCandidates / 2; i += kChoiceThreads) {
        int lo = 2 * i - (i & (stride - 1));
        int hi = lo + stride;
        bool descending = (lo & size) == 0;
        unsigned long long klo = c.key[lo], khi = c.key[hi];
        if ((klo < khi) == descending) {
          c.key[lo] = khi, c.key[hi] = klo;
          unsigned long long m = c.mass[lo];
          c.mass[lo] = c.mass[hi], c.mass[hi] = m;
        }
      }
      __syncthreads();
    }
  }
}

// Gathers the tokens whose bin lies in [lo, hi] (at most kCandidates; the caller checked) and
// sorts them. Slots are taken in a racy order; the sort makes the result independent of it.
__device__ void gather_bins(Candidates c, const float* x, int64_t V, const Scale& s, int lo, int hi, bool with_mass) {
  for (int i = threadIdx.x; i < kCandidates; i += kChoiceThreads) c.key[i] = 0, c.mass[i] = 0;
  if (threadIdx.x == 0) *c.count = 0;
  __syncthreads();
  // Every thread runs every iteration: the ballot needs whole warps. Four values per thread per
  // iteration (v = 4g .. 4g+3 of group g), each claimed by a warp-wide ballot.
  const int64_t groups = (V + 3) / 4;
  for (int64_t g0 = 0; g0 < groups; g0 += kChoiceThreads) {
    const int64_t g = g0 + threadIdx.x;
    for (int j = 0; j < 4; ++j) {
      const int64_t v = 4 * g + j;
      const float xv = v < V ? x[v] : 0.f;
      bool take = false;
      if (v < V) {
        int b = s.bin(xv);
        take = b >= lo && b <= hi;
      }
      unsigned ballot = __ballot_sync(0xffffffffu, take);
      int first = 0;
      if (threadIdx.x % 32 == 0 && ballot) first = atomicAdd(c.count, __popc(ballot));
      first = __shfl_sync(0xffffffffu, first, 0);
      if (take) {
        int slot = first + __popc(ballot & ((1u << (threadIdx.x % 32)) - 1u));
        c.key[slot] = sort_key(xv, static_cast<int>(v));
        c.mass[slot] = with_mass ? s.mass(xv) : 0ull;
      }
    }
  }
  __syncthreads();
  sort_candidates(c);
}

// The sort key of the candidate at which the running total (count, or mass when by_mass) first
// reaches `need` (>= 1), and in *mass_to_cut the candidates' mass up to and including it.
__device__ unsigned long long cut_in_candidates(Candidates c, unsigned long long need, bool by_mass,
                                                unsigned long long* mass_to_cut) {
  static_assert(kCandidates % kChoiceThreads == 0, "whole candidates per thread");
  int index;
  if (by_mass) {
    BinCut at = find_running<kCandidates / kChoiceThreads>(c.mass, need);
    index = at.bin;
    *mass_to_cut = at.before + c.mass[index];
  } else {
    index = static_cast<int>(need - 1);
    unsigned long long local = 0;
    for (int i = threadIdx.x; i <= index; i += kChoiceThreads) local += c.mass[i];
    *mass_to_cut = block_sum_u64(local);
  }
  return c.key[index];
}

// Fallback when the bin holding the cut has more than kCandidates tokens: the sort key at which
// the running total over tokens of bin `bin` (in sort-key order) reaches `target`, by bisection
// on the 64-bit sort key with a block reduction per step. Slow, exact, and only reached by rows
// with thousands of logits within 1/85 of a scaled unit of each other.
__device__ unsigned long long cut_by_bisection(const float* x, int64_t V, const Scale& s, int bin,
                                               unsigned long long before, unsigned long long target, bool by_mass,
                                               unsigned long long* mass_to_cut) {
  // Find the largest key K such that total(tokens of bin with key >= K) >= target - before.
  unsigned long long need = target - before;
  unsigned long long lo = 0, hi = ~0ull;  // invariant: total(key >= lo) >= need
  while (lo < hi) {
    unsigned long long mid = lo + (hi - lo) / 2 + 1;
    unsigned long long local = 0;
    for (int64_t v = threadIdx.x; v < V; v += kChoiceThreads) {
      float xv = x[v];
      if (s.bin(xv) != bin || sort_key(xv, static_cast<int>(v)) < mid) continue;
      local += by_mass ? s.mass(xv) : 1ull;
    }
    if (block_sum_u64(local) >= need) lo = mid;
    else hi = mid - 1;
  }
  if (mass_to_cut) {
    unsigned long long local = 0;
    for (int64_t v = threadIdx.x; v < V; v += kChoiceThreads) {
      float xv = x[v];
      if (s.bin(xv) == bin && sort_key(xv, static_cast<int>(v)) >= lo) local += s.mass(xv);
    }
    *mass_to_cut = block_sum_u64(local);
  }
  return lo;
}

// The sort key of the last token of the shortest prefix (in sort-key order) whose running total
// (count, or mass when by_mass) reaches target; *prefix_mass gets that prefix's mass.
__device__ unsigned long long prefix_cut(Candidates c, const unsigned* bin_count, const unsigned long long* bin_mass,
                                         const float* x, int64_t V, const Scale& s, unsigned long long target,
                                         bool by_mass, unsigned long long* prefix_mass) {
  BinCut bc = by_mass ? find_bin(bin_mass, target) : find_bin(bin_count, target);
  unsigned long long local = 0;
  for (int b = threadIdx.x; b < bc.bin; b += kChoiceThreads) local += bin_mass[b];
  unsigned long long mass_before = block_sum_u64(local);
  unsigned long long within = 0, cut;
  if (bin_count[bc.bin] <= static_cast<unsigned>(kCandidates)) {
    gather_bins(c, x, V, s, bc.bin, bc.bin, true);
    cut = cut_in_candidates(c, target - bc.before, by_mass, &within);
  } else {
    cut = cut_by_bisection(x, V, s, bc.bin, bc.before, target, by_mass, &within);
  }
  *prefix_mass = mass_before + within;
  return cut;
}

__device__ __forceinline__ float gumbel_of(uint32_t bits) { return -logf(-logf(ch::noise_uniform(bits))); }

__device__ __forceinline__ float gumbel(uint32_t noise_row, int v) {
  return gumbel_of(ch::noise_token(noise_row, static_cast<uint32_t>(v)));
}

// Whether a token whose scaled logit is `gap` above the best score so far, `best` (gap <= 0
// mostly), can come near that score with noise drawn from u. Its noise -log(-log u) would have to
// exceed -gap - tol, that is u > exp(-exp(gap + tol)), where tol (1e-3, and 16 float32 ulps of
// the score) is far above the rounding of a score; the bound uses the fast exponentials,
// loosened by a factor (1 - 2^-10) far beyond their error. A token it rules out has an exact score
// below best - tol, so it could not have won (nor tied): every other token gets its exact noise.
// It saves the two logarithms of most tokens and changes no choice.
__device__ __forceinline__ bool may_win(float gap, float best, float u) {
  const float tol = 1e-3f + fabsf(best) * 2e-6f;
  if (gap + tol >= 0.f) return true;
  const float threshold = __expf(-__expf(gap + tol));
  return u >= threshold * (1.f - 0.0009765625f);
}

__global__ void __launch_bounds__(kChoiceThreads)
    choose_tokens_kernel(int32_t* out, const float* x, const int32_t* params, int64_t V, int top_n, bool variant_split) {
  // float4 loads when every row starts 16-byte aligned (the visiting order is the same either way).
  const bool vec = V % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  extern __shared__ unsigned long long smem[];
  unsigned long long* bin_mass = smem;
  unsigned* bin_count = reinterpret_cast<unsigned*>(bin_mass + kBins);
  Candidates cand{bin_mass + kBins + kBins / 2, bin_mass + kBins + kBins / 2 + kCandidates, nullptr};
  __shared__ int cand_count;
  cand.count = &cand_count;

  const int64_t r = blockIdx.x;
  const float* xr = x + r * V;
  int32_t* o = out + r * (2 + 2 * static_cast<int64_t>(top_n));
  const RowChoice p = load_choice(params + r * ch::kParams);

  // Pass 1: the largest logit (lowest id on ties) and whether the row is finite.
  ArgBest best{-INFINITY, 0x7fffffff};
  int bad = 0;
  for_each_logit(xr, V, vec, [&](int64_t v, float xv) {
    bad |= isnan(xv) || (isinf(xv) && xv > 0);
    best = arg_better(best, ArgBest{xv, static_cast<int>(v)});
  });
  bad = __syncthreads_or(bad);
  best = block_argmax<kChoiceThreads>(best);
  if (bad || best.value == -INFINITY) {
    for (int i = threadIdx.x; i < 2 + 2 * top_n; i += kChoiceThreads)
      o[i] = (i == 0 || (i >= 2 && i < 2 + top_n)) ? -1 : ch::float_bits(NAN);
    return;
  }
  const float m = best.value;
  const bool sampling = p.target < 0 && p.t > 0.f;
  const bool filter_k = sampling && p.top_k > 0 && p.top_k < V;
  const bool filter_p = sampling && p.top_p < 1.f;
  const int row_top = p.top_n < 0 ? 0 : (p.top_n > top_n ? top_n : p.top_n);
  const bool bins = filter_k || filter_p || row_top > 0;
  const Scale s{sampling ? p.t : 1.f, sampling ? m / p.t : m};

  // Pass 2: the logsumexp sum (raw logits), and the bins' counts and masses when a cut is needed.
  if (bins) {
    for (int b = threadIdx.x; b < kBins; b += kChoiceThreads) bin_count[b] = 0, bin_mass[b] = 0;
    __syncthreads();
  }
  float sum = 0.f;
  unsigned tail_count = 0;
  unsigned long long tail_mass = 0;
  for_each_logit(xr, V, vec, [&](int64_t, float xv) {
    if (!variant_split) sum = sum + expf(xv - m);
    if (!bins) return;
    int b = s.bin(xv);
    unsigned long long w = sampling ? s.mass(xv) : 0ull;
    if (b == kBins - 1) {
      tail_count += 1, tail_mass += w;  // the crowded last bin is added once per thread, below
    } else {
      atomicAdd(&bin_count[b], 1u);
      if (w) atomicAdd(&bin_mass[b], w);
    }
  });
  if (variant_split) {
    // As split row reductions do: each part's own max and sum, rescaled to the row's max.
    const int64_t chunk = (V + kVariantSplits - 1) / kVariantSplits;
    sum = 0.f;
    for (int64_t begin = 0; begin < V; begin += chunk) {
      const int64_t end = min(V, begin + chunk);
      float cm = -INFINITY, cs = 0.f;
      for (int64_t v = begin + threadIdx.x; v < end; v += kChoiceThreads) cm = fmaxf(cm, xr[v]);
      cm = block_max<kChoiceThreads>(cm);
      for (int64_t v = begin + threadIdx.x; v < end; v += kChoiceThreads) cs = cs + expf(xr[v] - cm);
      cs = block_sum<kChoiceThreads>(cs);
      if (cs > 0.f) sum = sum + cs * expf(cm - m);
    }
  } else {
    sum = block_sum<kChoiceThreads>(sum);
  }
  const float lse = m + logf(sum);
  unsigned long long z_all = 0;
  if (bins) {
    unsigned long long tc = block_sum_u64(tail_count), tm = block_sum_u64(tail_mass);
    if (threadIdx.x == 0) bin_count[kBins - 1] = static_cast<unsigned>(tc), bin_mass[kBins - 1] = tm;
    __syncthreads();
    unsigned long long local = 0;
    for (int b = threadIdx.x; b < kBins; b += kChoiceThreads) local += bin_mass[b];
    z_all = block_sum_u64(local);
  }

  int id;
  if (p.target >= 0) {
    id = p.target < V ? p.target : -1;  // the host validates targets; never read out of bounds
  } else if (!sampling) {
    id = best.index;
  } else {
    // The kept set: tokens whose sort key is at least `cut` (0: all), and min-p.
    unsigned long long cut = 0;
    unsigned long long z = z_all, unused;
    if (filter_k) cut = prefix_cut(cand, bin_count, bin_mass, xr, V, s, static_cast<unsigned long long>(p.top_k), false, &z);
    if (filter_p) {
      unsigned long long cut_p = prefix_cut(cand, bin_count, bin_mass, xr, V, s, ch::top_p_target(p.top_p, z), true, &unused);
      cut = cut_p > cut ? cut_p : cut;
    }
    // Gumbel-max over the kept set, starting from the best logit, which is always kept.
    const uint32_t noise_row = ch::noise_row(p.seed, static_cast<uint32_t>(p.position));
    const float score0 = s.smax + gumbel(noise_row, best.index);
    ArgBest pick{score0, best.index};
    for_each_logit(xr, V, vec, [&](int64_t v, float xv) {
      const float sv = s.scaled(xv);
      // Pruned against the thread's best so far: the noise of a token this far below cannot win.
      if (sv + ch::kGumbelMax < pick.value || v == best.index) return;
      if (sort_key(xv, static_cast<int>(v)) < cut) return;
      if (p.min_p > 0.f && s.weight(xv) < p.min_p) return;
      const uint32_t bits = ch::noise_token(noise_row, static_cast<uint32_t>(v));
      if (!may_win(sv - pick.value, pick.value, ch::noise_uniform(bits))) return;
      pick = arg_better(pick, ArgBest{sv + gumbel_of(bits), static_cast<int>(v)});
    });
    id = block_argmax<kChoiceThreads>(pick).index;
  }
  if (threadIdx.x == 0) {
    o[0] = id;
    o[1] = ch::float_bits(id >= 0 ? xr[id] - lse : NAN);
  }

  if (row_top > 0) {
    // The N best logits: every token in the bins up to the one where the count reaches N.
    int n = row_top < V ? row_top : static_cast<int>(V);
    BinCut bc = find_bin(bin_count, static_cast<unsigned long long>(n));
    unsigned long long held = bc.before + bin_count[bc.bin];
    if (held <= static_cast<unsigned long long>(kCandidates)) {
      gather_bins(cand, xr, V, s, 0, bc.bin, false);  // sorted: the first n are the answer
    } else {
      const unsigned long long cut =
          cut_by_bisection(xr, V, s, bc.bin, bc.before, static_cast<unsigned long long>(n), false, nullptr);
      // Every token before the cut: at most N of them, gathered then sorted.
      for (int i = threadIdx.x; i < kCandidates; i += kChoiceThreads) cand.key[i] = 0, cand.mass[i] = 0;
      if (threadIdx.x == 0) cand_count = 0;
      __syncthreads();
      for (int64_t v = threadIdx.x; v < V; v += kChoiceThreads) {
        unsigned long long k = sort_key(xr[v], static_cast<int>(v));
        if (k >= cut) cand.key[atomicAdd(&cand_count, 1)] = k;
      }
      __syncthreads();
      sort_candidates(cand);
    }
    for (int i = threadIdx.x; i < top_n; i += kChoiceThreads) {
      if (i < n) {
        int v = key_id(cand.key[i]);
        o[2 + i] = v;
        o[2 + top_n + i] = ch::float_bits(xr[v] - lse);
      } else {
        o[2 + i] = -1;
        o[2 + top_n + i] = ch::float_bits(NAN);
      }
    }
  } else {
    for (int i = threadIdx.x; i < top_n; i += kChoiceThreads) o[2 + i] = -1, o[2 + top_n + i] = ch::float_bits(NAN);
  }
}

}  // namespace

void choose_tokens(Tensor& out, const Tensor& x, const Tensor& params) {
  int64_t rows = x.dim(0), V = x.dim(1);
  if (rows == 0) return;
  DI_CHECK(V > 0, "choose_tokens: x has no columns");
  DI_CHECK(rows <= 0x7fffffff, "choose_tokens: too many rows (", rows, ")");
  int top_n = static_cast<int>((out.dim(1) - 2) / 2);
  static std::once_flag configured;
  std::call_once(configured, [] {
    CUDA_CHECK(cudaFuncSetAttribute(choose_tokens_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(kChoiceSmem)));
  });
  bool variant_split = variant_kernels() && rows < kVariantSplits;
  choose_tokens_kernel<<<static_cast<unsigned>(rows), kChoiceThreads, kChoiceSmem, device_stream()>>>(
      out.ptr<int32_t>(), x.ptr<float>(), params.ptr<int32_t>(), V, top_n, variant_split);
  CUDA_CHECK_LAUNCH("choose_tokens", shapes(rows, V));
}

}  // namespace detinfer::cuda
