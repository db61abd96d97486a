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

#include <algorithm>
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
#include "pdl.cuh"
#include "ptx.cuh"

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
// Invariant: each row is cut into P = ceil(V / kSlice) slices of kSlice logits, P fixed by V
// alone, never by R. Block (s, r) of a slice kernel reads slice s of row r; its thread t holds the
// values 4 (t + kSliceThreads j) + c (j < kSliceGroups, c < 4) of the slice, visited in that order
// (float4 loads when rows are 16-byte aligned, single loads otherwise: the same values either way).
// Float reductions: each slice's max and its sum of expf(x - slice max) by the block's fixed
// tree (block_reduce.cuh); the P slices' (max, sum) are combined in slice order 0..P-1 as
// sum = sum_s sum_s * expf(max_s - max), lse = max + logf(sum), in one place (the select
// kernel). Argmax and Gumbel-max are maxima of a total order on (value, id): exact, whatever the
// partition. The kept set and the top-N are selected exactly: counts and fixed-point masses are
// integers, whose sums do not depend on the order of the atomics that form them, and every
// comparison is a total order on (logit, id). The value bins only narrow the search; the result
// is defined without them. Row r depends on row r alone.
// Five short launches per chunk of kChunkRows rows, on the stream (no host synchronisation):
//   stats  (P x R blocks)  per slice: max, argmax, finiteness, sum of exp; Gumbel-max of rows
//                          that sample without a cut or min-p; zeroes the row's bins if it needs them
//   bins   (P/g x R)       the row's value bins (counts for top-k and top-N; fixed-point masses
//                          for top-p), g slices per block (1 to 4, more when the rows are many),
//                          through shared-memory bins (32-bit atomics only: a mass is added as a
//                          low and a high word with an exact carry) then one global integer
//                          atomic per nonzero bin and block; Gumbel-max of min-p rows
//   plan   (R)             finds the bins that hold the top-k / top-p cuts and the top-N, and a
//                          Gumbel-max bound: the best exact score among the slices' largest
//                          logits that lie above those bins (kept whatever the cut)
//   gather (P/g x R)       Gumbel-max over the tokens above those bins, exact scores only for
//                          tokens whose noise hash may reach the bound (a per-bin table), and a
//                          bit per value for the lists; then, warp by warp and only for the values
//                          some lane takes, copies the tokens of those bins into per-row candidate
//                          lists (warp-aggregated atomics on the row's list counters)
//   select (R)             lse; the cuts in list B by a radix select, Gumbel-max over the kept
//                          candidates; top-N (list A sorted); writes the row; 512 threads, so
//                          that two rows share an SM and 256 rows run in one wave. A row whose
//                          cut bins hold more than kCandidates tokens (by the plan's counts, or
//                          by the gather's count for a row without counts) takes the exact
//                          one-block path over the whole row:
//                          the bin of each cut gathered and cut by the same radix select, or by
//                          bisection over the row when even that bin holds more than kCandidates.
// With a live count (the logit processors' adjusted rows, of which a step uses the first K of a
// launch captured for J), the blocks of rows at or past it return at once, in all five kernels.
// Variant (variant_kernels()): R < kVariantSplits reduces each slice's sum in kVariantSplits
// parts, each with its own max, rescaled at the end, as if the row were split over more blocks
// because the batch is small: the log-probs' bits then depend on R.
namespace {

namespace ch = detinfer::choice;

constexpr int kChoiceThreads = 512;  // select kernel: one block per row, two per SM
constexpr int kSliceThreads = 512;    // slice kernels: one block per (slice, row)
constexpr int kSliceGroups = 4;       // float4 groups per thread and slice
constexpr int kSlice = 4 * kSliceThreads * kSliceGroups;  // 8192 logits per slice
// Blocks per SM the slice kernels are compiled for: 3 (at most 40 registers) for stats and gather,
// so that more slices stream at once; 2 for bins, which needs more registers and 24 KiB of bins.
static_assert(kSliceGroups % kVariantSplits == 0, "the variant's parts are whole groups");
// Rows per round of launches; sizes the workspace (about 90 KiB per row).
constexpr int64_t kChunkRows = 256;
// Value bins of the scaled logit distance d = (max - x)/T (raw logits for greedy rows): bin
// floor(d * kBinScale), the last bin holding everything at or beyond kBinRange (Scale::bin).
constexpr int kBins = 2048;
constexpr float kBinRange = 24.f;
constexpr float kBinScale = (kBins - 1) / kBinRange;
// Candidates gathered for an exact sort (the bins of the cuts, or the bins up to the N-th).
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

// What a row needs, from its parameters alone (every block of the row agrees).
struct RowMode {
  bool sampling, filter_k, filter_p, bins;
  int row_top;  // top log-probs wanted
  int gumbel;   // the kernel that runs the row's Gumbel-max over the slices: 0 none (greedy or
                // scored), 1 stats (no cut, no min-p), 2 bins (min-p, no cut), 3 gather (a cut)
};

__device__ RowMode row_mode(const RowChoice& p, int64_t V, int top_n) {
  RowMode m;
  m.sampling = p.target < 0 && p.t > 0.f;
  m.filter_k = m.sampling && p.top_k > 0 && p.top_k < V;
  m.filter_p = m.sampling && p.top_p < 1.f;
  m.row_top = p.top_n < 0 ? 0 : (p.top_n > top_n ? top_n : p.top_n);
  m.bins = m.filter_k || m.filter_p || m.row_top > 0;
  m.gumbel = !m.sampling ? 0 : (m.filter_k || m.filter_p) ? 3 : p.min_p > 0.f ? 2 : 1;
  return m;
}

// What the row's passes share: the scaled maximum, the bin of a logit, its weight and mass.
// The bin of x is floor((max - x) * kBinScale / T), the last bin holding everything at or beyond
// kBins - 1: a non-increasing function of x (each rounding step is monotone), computed the same
// way by every kernel. Bins only narrow the search (a token's bin decides which list it goes to,
// never whether it is kept), so they need not use the exact scaled logit x / T; nor do weights,
// which token_choice.h defines as exp2((x - max) * E), in every kernel by this one function.
struct Scale {
  float t;          // temperature (1 for greedy rows: bins on raw logits)
  float smax;       // max / t
  float max;        // the row's largest logit
  float bin_scale;  // kBinScale / t
  float inv_t;      // 1 / t, for bounds only (approx below)
  float e;          // ch::weight_scale(t)
  __device__ float scaled(float x) const { return x / t; }
  // x / t within two ulps (one rounding of 1/t, one of the product): for the pruning bounds.
  __device__ float approx(float x) const { return x * inv_t; }
  // floor(d) for d in [0, 2^23) by one add rounded down (2^23 + d keeps d's integer part in the
  // low mantissa bits): the value a float-to-int conversion gives, on the FMA pipe instead of the
  // conversion unit, which runs at an eighth of its rate. d >= 0 as max >= x.
  __device__ int bin(float x) const {
    const float d = fminf((max - x) * bin_scale, static_cast<float>(kBins - 1));
    return __float_as_int(__fadd_rd(d, 8388608.f)) - 0x4B000000;
  }
  __device__ float weight(float x) const { return ptx::exp2_ftz((x - max) * e); }
  __device__ unsigned long long mass(float x) const { return __float2ull_rz(weight(x) * ch::kMassScale); }
};

__device__ Scale row_scale(const RowChoice& p, const RowMode& mode, float m) {
  const float t = mode.sampling ? p.t : 1.f;
  return {t, mode.sampling ? m / p.t : m, m, kBinScale / t, 1.f / t, ch::weight_scale(t)};
}

// Sort key of token v: larger logit first, then lower id. Unique per token.
__device__ __forceinline__ unsigned long long sort_key(float x, int v) {
  return (static_cast<unsigned long long>(ch::order_key(x)) << 32) | static_cast<uint32_t>(~v);
}
__device__ __forceinline__ int key_id(unsigned long long k) { return static_cast<int>(~static_cast<uint32_t>(k)); }
__device__ __forceinline__ float key_logit(unsigned long long k) { return ch::key_value(static_cast<uint32_t>(k >> 32)); }

// ---- The workspace: per row, slice partials, bins, the plan, candidate lists. ----

struct SliceStats {
  float max;  // the slice's largest logit (-inf if none is larger)
  float sum;  // sum of expf(x - max) over the slice (0 when max is -inf)
  int index;  // lowest id holding max
  int bad;    // a NaN or +infinity in the slice
};

struct RowPlan {
  unsigned long long count_before;  // tokens in bins below lo
  unsigned long long mass_before;   // their mass
  unsigned long long z_all;         // the row's mass
  int lo, hi;                       // list B: the tokens of bins [lo, hi] (lo > hi: none)
  int top_bin;                      // list A: the tokens of bins [0, top_bin] (-1: none)
  int overflow_b, overflow_a;       // more than kCandidates tokens: the select kernel's exact path
  int bad;                          // the row is not finite (nothing else is set)
  float max;                        // the row's largest logit
  float bound;                      // the gather kernel's Gumbel-max bound (-inf: none)
};

struct ChoiceWork {
  SliceStats* stats;              // [rows, P]
  ArgBest* picks;                 // [rows, P] the slices' Gumbel-max (score, id)
  unsigned* bin_count;            // [rows, kBins]
  unsigned long long* bin_mass;   // [rows, kBins]
  RowPlan* plan;                  // [rows]
  unsigned* held;                 // [rows, 2] tokens appended to lists A and B
  unsigned long long* list_a;     // [rows, kCandidates] sort keys (top-N)
  unsigned long long* list_b;     // [rows, kCandidates] sort keys (the cuts)
  int slices;                     // P
};

struct RowStats {
  float max;
  int index;
  bool bad;
};

// The row's max, argmax and finiteness from its slices' partials: warp 0 folds them (a total order
// on (value, id) and an OR, exact in any order) and the block shares the result. Every thread of
// the block calls it, at most once per kernel.
__device__ RowStats load_row_stats(const SliceStats* st, int P) {
  __shared__ RowStats shared;
  if (threadIdx.x < 32) {
    ArgBest best{-INFINITY, 0x7fffffff};
    bool bad = false;
    for (int s = threadIdx.x; s < P; s += 32) {
      const SliceStats a = st[s];
      bad |= a.bad != 0;
      best = arg_better(best, ArgBest{a.max, a.index});
    }
    best = warp_argmax(best);
    bad = __any_sync(0xffffffffu, bad);
    if (threadIdx.x == 0) shared = RowStats{best.value, best.index, bad || best.value == -INFINITY};
  }
  __syncthreads();
  return shared;
}

// The best of the slices' Gumbel-max picks (exact in any order), as load_row_stats.
__device__ ArgBest load_best_pick(const ArgBest* picks, int P) {
  __shared__ ArgBest shared;
  if (threadIdx.x < 32) {
    ArgBest best{-INFINITY, 0x7fffffff};
    for (int s = threadIdx.x; s < P; s += 32) best = arg_better(best, picks[s]);
    best = warp_argmax(best);
    if (threadIdx.x == 0) shared = best;
  }
  __syncthreads();
  return shared;
}

// lse = m + logf(sum over slices, in slice order, of sum_s * expf(max_s - m)). Warp 0 forms the
// terms in parallel; one thread adds them in slice order (a slice with no sum adds +0, which
// leaves a sum >= 0 as it is). Every thread calls it, at most once per kernel, and gets lse.
constexpr int kTermSlices = 64;  // V up to 524,288 keeps its terms in shared memory

__device__ float load_row_lse(const SliceStats* st, int P, float m) {
  __shared__ float terms[kTermSlices];
  __shared__ float lse;
  if (P <= kTermSlices) {
    if (threadIdx.x < 32) {
      for (int s = threadIdx.x; s < P; s += 32) {
        const SliceStats a = st[s];
        terms[s] = a.sum > 0.f ? a.sum * expf(a.max - m) : 0.f;
      }
      __syncwarp();
      if (threadIdx.x == 0) {
        float sum = 0.f;
#pragma unroll 8
        for (int s = 0; s < P; ++s) sum = sum + terms[s];
        lse = m + logf(sum);
      }
    }
  } else if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int s = 0; s < P; ++s) {
      const SliceStats a = st[s];
      if (a.sum > 0.f) sum = sum + a.sum * expf(a.max - m);
    }
    lse = m + logf(sum);
  }
  __syncthreads();
  return lse;
}

// Rows at or past *count (when the launch has a count: choose_tokens' live) are skipped by every
// kernel of the launch, at its start (after the PDL calls, which every block makes). row0: the
// first row of this round of launches (kChunkRows rows a round). The launches without a count use
// the kernels' other instantiation (kLive false), which holds no such check.
struct RowsLive {
  const int32_t* count;
  int64_t row0;
  __device__ bool skip(int64_t r) const { return row0 + r >= static_cast<int64_t>(*count); }
};

// ---- Slice kernels ----

// Offset in its slice of this thread's value (j, c). Ids fit in int (V < 2^31).
__device__ __forceinline__ int slice_offset(int j, int c) { return 4 * (static_cast<int>(threadIdx.x) + kSliceThreads * j) + c; }

struct SliceRange {
  int begin, len;  // ids [begin, begin + len)
};

__device__ SliceRange slice_range(int64_t V, int s) {
  const int begin = s * kSlice;
  return {begin, V - begin < kSlice ? static_cast<int>(V - begin) : kSlice};
}

// This thread's values of the slice (-inf past its end; visitors check the offset).
__device__ __forceinline__ void load_slice(float (&v)[kSliceGroups][4], const float* xr, SliceRange sl, bool vec) {
  const float* xs = xr + sl.begin;
#pragma unroll
  for (int j = 0; j < kSliceGroups; ++j) {
    const int e = slice_offset(j, 0);
    if (vec) {
      // V % 4 == 0: a group lies wholly before the end or wholly past it.
      const float4 q = e < sl.len ? __ldg(reinterpret_cast<const float4*>(xs + e))
                                  : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      v[j][0] = q.x, v[j][1] = q.y, v[j][2] = q.z, v[j][3] = q.w;
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) v[j][c] = e + c < sl.len ? __ldg(xs + e + c) : -INFINITY;
    }
  }
}

__device__ __forceinline__ bool row_vec(const float* x, int64_t V) {
  return V % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

// Visits this thread's values of the slice in their fixed order, f(i, e, x): value i = 4j + c of
// the thread (its bit in a per-thread mask), at offset e in the slice; values past the end are
// skipped. Every slice but perhaps a row's last is full: visit_slice checks the end once, and the
// full case runs without a check per value.
template <bool FULL, class F>
__device__ __forceinline__ void for_each_value(const float (&v)[kSliceGroups][4], SliceRange sl, F&& f) {
#pragma unroll
  for (int j = 0; j < kSliceGroups; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (FULL || slice_offset(j, c) < sl.len) f(4 * j + c, slice_offset(j, c), v[j][c]);
}

template <class F>
__device__ __forceinline__ void visit_slice(const float (&v)[kSliceGroups][4], SliceRange sl, F&& f) {
  if (sl.len == kSlice) for_each_value<true>(v, sl, f);
  else for_each_value<false>(v, sl, f);
}

template <int THREADS>
__device__ unsigned long long block_sum_u64(unsigned long long v) {
  __shared__ unsigned long long scratch[32];
#pragma unroll
  for (int d = 16; d >= 1; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    unsigned long long w = threadIdx.x < THREADS / 32 ? scratch[threadIdx.x] : 0ull;
#pragma unroll
    for (int d = 16; d >= 1; d /= 2) w += __shfl_xor_sync(0xffffffffu, w, d);
    if (threadIdx.x == 0) scratch[0] = w;
  }
  __syncthreads();
  unsigned long long total = scratch[0];
  __syncthreads();
  return total;
}

__device__ __forceinline__ float gumbel_of(uint32_t bits) { return -logf(-logf(ch::noise_uniform(bits))); }

// Whether a token whose scaled logit is about `gap` above `bound`, the exact score of a kept token
// (gap <= 0 mostly), can come near that score with noise drawn from u. Its noise -log(-log u)
// would have to exceed -gap - tol, that is u > exp(-exp(gap + tol)). The gap comes from
// Scale::approx, within two ulps of the scaled logit; tol (2e-3, and 32 float32 ulps of the bound)
// is far above that and the rounding of a score (the gap matters only within kGumbelMax of the
// bound, where the scaled logit's ulps are the bound's or smaller). The bound uses the fast
// exponentials, loosened by a factor (1 - 2^-10) far beyond their error. A token it rules out has
// an exact score below the bound, so it could not have won (nor tied): every other token gets its
// exact score. It saves the two logarithms of most tokens and changes no choice. Before any
// score (bound = -inf) every finite token may win.
__device__ __forceinline__ float prune_tol(float bound) { return 2e-3f + fabsf(bound) * 4e-6f; }

// The least noise draw u with which such a token may win (0: any).
__device__ __forceinline__ float least_winning_u(float gap, float tol) {
  return gap + tol >= 0.f ? 0.f : __expf(-__expf(gap + tol)) * (1.f - 0.0009765625f);
}

__device__ __forceinline__ bool may_win(float gap, float tol, float u) {
  if (gap + tol >= 0.f) return true;
  return u >= least_winning_u(gap, tol);
}

// One step of Gumbel-max: token v with logit xv, kept by the cut (the caller checked), against
// `bound`, the exact score of a kept token (the best of this thread so far, or one given: every
// call that passes a bound must visit the token it comes from, or one at least as good). Pruning
// against a lower bound of the final best never changes the choice, so the result is the exact
// maximum of (x/T + noise, lowest id on ties) over the visited tokens. Only tokens that may win
// pay the exact division and logarithms.
__device__ __forceinline__ void gumbel_step(ArgBest& pick, float& bound, int64_t v, float xv, const Scale& s,
                                            uint32_t noise_row, float min_p) {
  const float sa = s.approx(xv);
  const float tol = prune_tol(bound);
  if (sa + (ch::kGumbelMax + tol) < bound) return;
  if (min_p > 0.f && s.weight(xv) < min_p) return;
  const uint32_t bits = ch::noise_token(noise_row, static_cast<uint32_t>(v));
  if (!may_win(sa - bound, tol, ch::noise_uniform(bits))) return;
  const ArgBest score{s.scaled(xv) + gumbel_of(bits), static_cast<int>(v)};
  pick = arg_better(pick, score);
  bound = fmaxf(bound, score.value);
}

// The Gumbel-max score of a token that is certainly kept (the row's best logit, or in the stats
// kernel, where everything is kept, the slice's): a lower bound of the final best, to start from.
__device__ __forceinline__ ArgBest gumbel_seed(float xv, int v, const Scale& s, uint32_t noise_row) {
  return ArgBest{s.scaled(xv) + gumbel_of(ch::noise_token(noise_row, static_cast<uint32_t>(v))), v};
}

// Appends `key` to a row's candidate list for the threads that `take` (warp-aggregated). The whole
// warp must call it. The plan counted the list's tokens; slots past kCandidates are never written.
__device__ __forceinline__ void append(bool take, unsigned long long* list, unsigned* held, unsigned long long key) {
  const unsigned ballot = __ballot_sync(0xffffffffu, take);
  if (ballot == 0) return;
  const int lane = threadIdx.x % 32, leader = __ffs(ballot) - 1;
  unsigned first = 0;
  if (lane == leader) first = atomicAdd(held, static_cast<unsigned>(__popc(ballot)));
  first = __shfl_sync(0xffffffffu, first, leader);
  if (take) {
    const unsigned slot = first + __popc(ballot & ((1u << lane) - 1u));
    if (slot < static_cast<unsigned>(kCandidates)) list[slot] = key;
  }
}

// Shared-memory atomics on a 32-bit shared address plus a constant offset: the address is
// formed once per kernel (opaque to the compiler, which would otherwise form it again per add).
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("mov.b32 %0, %0;" : "+r"(at));
  return at;
}
template <int OFFSET>
__device__ __forceinline__ void shared_add(uint32_t at, unsigned v) {
  asm volatile("red.shared.add.u32 [%0+%2], %1;" ::"r"(at), "r"(v), "n"(OFFSET) : "memory");
}
template <int OFFSET>
__device__ __forceinline__ unsigned shared_fetch_add(uint32_t at, unsigned v) {
  unsigned old;
  asm volatile("atom.shared.add.u32 %0, [%1+%3], %2;" : "=r"(old) : "r"(at), "r"(v), "n"(OFFSET) : "memory");
  return old;
}

template <bool kLive>
__global__ void __launch_bounds__(kSliceThreads, 3)
    choice_stats_kernel(ChoiceWork w, const float* x, const int32_t* params, int64_t V, int top_n, bool variant_split,
                        RowsLive live) {
  pdl_wait();
  pdl_launch_dependents();
  const int P = w.slices, s = blockIdx.x;
  const int64_t r = blockIdx.y;
  if constexpr (kLive)
    if (live.skip(r)) return;
  const float* xr = x + r * V;
  const SliceRange sl = slice_range(V, static_cast<int>(blockIdx.x));
  float v[kSliceGroups][4];
  load_slice(v, xr, sl, row_vec(x, V));
  // Values past the end are -inf (load_slice): they are not bad, never beat an earlier value (a
  // thread visits its values in increasing id, so the first of equal values is its lowest id), and
  // add expf(-inf) = +0 to a sum >= 0, which leaves it as it is. So no value needs an end check.
  ArgBest best{-INFINITY, 0x7fffffff};
  bool bad = false;
#pragma unroll
  for (int j = 0; j < kSliceGroups; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float xv = v[j][c];
      bad |= !(xv < INFINITY);  // NaN or +infinity
      if (xv > best.value) best = ArgBest{xv, sl.begin + slice_offset(j, c)};
    }
  bad = __syncthreads_or(bad);
  best = block_argmax<kSliceThreads>(best);
  const float m = best.value;
  float sum = 0.f;
  if (!bad && m != -INFINITY) {
    if (!variant_split) {
      float local = 0.f;
#pragma unroll
      for (int j = 0; j < kSliceGroups; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) local = local + expf(v[j][c] - m);
      sum = block_sum<kSliceThreads>(local);
    } else {
      // Contiguous quarters of the slice (groups 2q, 2q + 1 of every thread), each with its own max.
      constexpr int kPart = kSliceGroups / kVariantSplits;
#pragma unroll
      for (int q = 0; q < kVariantSplits; ++q) {
        float pm = -INFINITY;
#pragma unroll
        for (int j = q * kPart; j < (q + 1) * kPart; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) pm = fmaxf(pm, v[j][c]);
        pm = block_max<kSliceThreads>(pm);
        if (pm == -INFINITY) continue;
        float ps = 0.f;
#pragma unroll
        for (int j = q * kPart; j < (q + 1) * kPart; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            if (slice_offset(j, c) < sl.len) ps = ps + expf(v[j][c] - pm);
        ps = block_sum<kSliceThreads>(ps);
        if (ps > 0.f) sum = sum + ps * expf(pm - m);
      }
    }
  }
  if (threadIdx.x == 0) w.stats[r * P + s] = SliceStats{m, sum, best.index, bad ? 1 : 0};

  const RowChoice p = load_choice(params + r * ch::kParams);
  const RowMode mode = row_mode(p, V, top_n);
  if (mode.bins) {
    // This block's share of the row's bins, zeroed for the bins kernel (the next launch).
    for (int b = s * kSliceThreads + threadIdx.x; b < kBins; b += P * kSliceThreads)
      w.bin_count[r * kBins + b] = 0, w.bin_mass[r * kBins + b] = 0;
  }
  if (mode.gumbel == 1) {
    // No cut and no min-p: every token is kept, and the maximum is not needed.
    const Scale sc{p.t, 0.f, 0.f, 0.f, 1.f / p.t, 0.f};
    const uint32_t noise_row = ch::noise_row(p.seed, static_cast<uint32_t>(p.position));
    ArgBest pick = gumbel_seed(m, best.index, sc, noise_row);
    float bound = pick.value;
    visit_slice(v, sl,
                [&](int, int e, float xv) { gumbel_step(pick, bound, sl.begin + e, xv, sc, noise_row, 0.f); });
    pick = block_argmax<kSliceThreads>(pick);
    if (threadIdx.x == 0) w.picks[r * P + s] = pick;
  }
}

template <bool kLive>
__global__ void __launch_bounds__(kSliceThreads, 2)
    choice_bins_kernel(ChoiceWork w, const float* x, const int32_t* params, int64_t V, int top_n, int per_block,
                       RowsLive live) {
  pdl_wait();
  pdl_launch_dependents();
  if constexpr (kLive)
    if (live.skip(blockIdx.y)) return;
  // Per bin: the count, and the mass as two 32-bit words (low, high) so that every shared atomic
  // is a native 32-bit add; one array, so that one address serves all three.
  __shared__ unsigned bins[3 * kBins];
  unsigned* bin_count = bins;
  unsigned* mass_lo = bins + kBins;
  unsigned* mass_hi = bins + 2 * kBins;
  constexpr int kLoOffset = 4 * kBins, kHiOffset = 8 * kBins;  // bytes
  const int P = w.slices;
  const int first = static_cast<int>(blockIdx.x) * per_block, last = min(P, first + per_block);
  const int64_t r = blockIdx.y;
  const RowChoice p = load_choice(params + r * ch::kParams);
  const RowMode mode = row_mode(p, V, top_n);
  if (!mode.bins && mode.gumbel != 2) return;
  // The first slice's loads go out first; the row's stats arrive while they are in flight.
  const float* xr = x + r * V;
  const bool vec = row_vec(x, V);
  float v[kSliceGroups][4];
  load_slice(v, xr, slice_range(V, first), vec);
  const RowStats st = load_row_stats(w.stats + r * P, P);
  if (st.bad) return;
  const Scale sc = row_scale(p, mode, st.max);
  const uint32_t noise_row = ch::noise_row(p.seed, static_cast<uint32_t>(p.position));
  // Counts serve top-k and the top-N alone (a top-p row's lists are counted as they are gathered).
  const bool counts = mode.filter_k || mode.row_top > 0;
  const uint32_t bins_at = shared_address(bins);

  if (mode.bins) {
    for (int b = threadIdx.x; b < kBins; b += kSliceThreads) bin_count[b] = 0, mass_lo[b] = 0, mass_hi[b] = 0;
    __syncthreads();
  }
  unsigned tail_count = 0;
  unsigned long long tail_mass = 0;
  for (int s = first; s < last; ++s) {
    const SliceRange sl = slice_range(V, s);
    if (s > first) load_slice(v, xr, sl, vec);
    if (mode.bins) {
      visit_slice(v, sl, [&](int, int, float xv) {
        const int b = sc.bin(xv);
        const unsigned long long wv = mode.filter_p ? sc.mass(xv) : 0ull;  // masses serve top-p alone
        if (b == kBins - 1) {
          tail_count += 1, tail_mass += wv;  // the crowded last bin is added once per block, below
          return;
        }
        const uint32_t at = bins_at + 4u * static_cast<uint32_t>(b);
        if (counts) shared_add<0>(at, 1u);
        if (wv) {
          // A 64-bit add as 32-bit ones: the add that wraps the low word past 2^32 (its old value
          // plus its addend wraps) carries one into the high word. Every wrap is seen by exactly
          // one add, so high * 2^32 + low is the exact sum (below 2^56 per block).
          const unsigned lo = static_cast<unsigned>(wv), hi = static_cast<unsigned>(wv >> 32);
          const unsigned old = shared_fetch_add<kLoOffset>(at, lo);
          const unsigned up = hi + (old + lo < old ? 1u : 0u);
          if (up) shared_add<kHiOffset>(at, up);
        }
      });
    }
    if (mode.gumbel == 2) {
      // min-p without a cut: needs the row's maximum, hence this pass.
      ArgBest pick = gumbel_seed(st.max, st.index, sc, noise_row);
      float bound = pick.value;
      visit_slice(v, sl, [&](int, int e, float xv) {
        gumbel_step(pick, bound, sl.begin + e, xv, sc, noise_row, p.min_p);
      });
      pick = block_argmax<kSliceThreads>(pick);
      if (threadIdx.x == 0) w.picks[r * P + s] = pick;
    }
  }

  if (mode.bins) {
    __syncthreads();
    const unsigned long long tc = block_sum_u64<kSliceThreads>(tail_count);
    const unsigned long long tm = block_sum_u64<kSliceThreads>(tail_mass);
    unsigned* gc = w.bin_count + r * kBins;
    unsigned long long* gm = w.bin_mass + r * kBins;
    for (int b = threadIdx.x; b < kBins - 1; b += kSliceThreads) {
      if (bin_count[b]) atomicAdd(&gc[b], bin_count[b]);
      const unsigned long long mass = (static_cast<unsigned long long>(mass_hi[b]) << 32) | mass_lo[b];
      if (mass) atomicAdd(&gm[b], mass);
    }
    if (threadIdx.x == 0) {
      if (tc) atomicAdd(&gc[kBins - 1], static_cast<unsigned>(tc));
      if (tm) atomicAdd(&gm[kBins - 1], tm);
    }
  }
}

// ---- One block of kChoiceThreads per row: running totals, sorting, the exact fallback ----

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

// Visits x[0..V) of one row with the whole block, f(v, x[v]) (the exact fallback's passes; their
// sums are integers, so the visiting order does not matter).
template <class F>
__device__ __forceinline__ void for_each_logit(const float* x, int64_t V, F&& f) {
  for (int64_t v = threadIdx.x; v < V; v += kChoiceThreads) f(v, x[v]);
}

// Candidates in shared memory: sort keys and masses. List A is sorted by key, largest first
// (bitonic sort; empty entries have key 0 and sort last); list B and a gathered bin stay in list
// order, and their cuts come from a radix select (cut_by_radix), which does not depend on it.
struct Candidates {
  unsigned long long* key;
  unsigned long long* mass;
  int* count;  // shared counter
};

// Sorts the first n2 keys (a power of two, at most kCandidates). Pair i of a pass is
// (lo, lo + stride), lo = 2i - (i mod stride); thread t takes pairs t, t + kChoiceThreads, ...
// While the stride is at most 32, warp w's pairs lie within its own 64-entry chunks (64w .. 64w +
// 63, and 2048 further), so two such passes in a row need only the warp's own barrier; a block
// barrier comes before and after every pass of a larger stride.
__device__ void sort_candidates(Candidates c, int n2) {
  int last_stride = 0;
  for (int size = 2; size <= n2; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      if (stride > 32 || last_stride > 32) __syncthreads();
      else __syncwarp();
      last_stride = stride;
      for (int i = threadIdx.x; i < n2 / 2; i += kChoiceThreads) {
        int lo = 2 * i - (i & (stride - 1));
        int hi = lo + stride;
        bool descending = (lo & size) == 0;
        unsigned long long klo = c.key[lo], khi = c.key[hi];
        if ((klo < khi) == descending) c.key[lo] = khi, c.key[hi] = klo;
      }
    }
  }
  __syncthreads();
}

// Loads a gathered list of n keys (n <= kCandidates) and sorts it; with_mass, the masses of the
// sorted keys follow (mass(key) for the first n, 0 for the rest of the kCandidates entries).
__device__ void load_sorted(Candidates c, const unsigned long long* list, int n, const Scale& s, bool with_mass) {
  int n2 = 2;
  while (n2 < n) n2 *= 2;
  __syncthreads();  // the previous use of the candidates is over
  for (int i = threadIdx.x; i < n2; i += kChoiceThreads) c.key[i] = i < n ? list[i] : 0ull;
  __syncthreads();
  sort_candidates(c, n2);
  if (with_mass) {
    for (int i = threadIdx.x; i < kCandidates; i += kChoiceThreads) c.mass[i] = i < n ? s.mass(key_logit(c.key[i])) : 0ull;
    __syncthreads();
  }
}

// Gathers the tokens whose bin lies in [lo, hi] (at most kCandidates are kept; *c.count gets how
// many there are). Slots are taken in a racy order: whatever reads them must not depend on it.
__device__ void gather_bins(Candidates c, const float* x, int64_t V, const Scale& s, int lo, int hi, bool with_mass) {
  if (threadIdx.x == 0) *c.count = 0;
  __syncthreads();
  // Every thread runs every iteration: the ballot needs whole warps.
  for (int64_t v0 = 0; v0 < V; v0 += kChoiceThreads) {
    const int64_t v = v0 + threadIdx.x;
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
      if (slot < kCandidates) {
        c.key[slot] = sort_key(xv, static_cast<int>(v));
        c.mass[slot] = with_mass ? s.mass(xv) : 0ull;
      }
    }
  }
  __syncthreads();
}

// Loads a gathered list of n keys (n <= kCandidates) and their masses, in list order.
__device__ void load_candidates(Candidates c, const unsigned long long* list, int n, const Scale& s) {
  __syncthreads();  // the previous use of the candidates is over
  for (int i = threadIdx.x; i < n; i += kChoiceThreads) {
    const unsigned long long k = list[i];
    c.key[i] = k, c.mass[i] = s.mass(key_logit(k));
  }
  __syncthreads();
}

// The key at which the running total over keys[0, n) in descending key order (count, or mass when
// by_mass) first reaches `need` (>= 1), the keys unique and unsorted: a radix select. The bits
// that all keys share are skipped (a block AND and OR); then, from the highest bit where they
// differ, 8 bits at a time, each round keeps the digit in which the total is reached (integer
// totals: exact in any order), until one key is left in it or every bit is decided. The same key
// a sort and a running total give. *mass_to_cut gets the mass of the keys at or above it. An
// unreachable need (the plan rules it out) gives key 0: every key kept.
__device__ unsigned long long cut_by_radix(Candidates c, int n, unsigned long long need, bool by_mass,
                                           unsigned long long* mass_to_cut) {
  // Per digit: the count and the mass as low and high words, one array (one address serves all three).
  __shared__ unsigned digits[3 * 256];
  unsigned* digit_count = digits;
  unsigned* digit_lo = digits + 256;
  unsigned* digit_hi = digits + 512;
  __shared__ unsigned warp_and[2][32], warp_or[2][32];
  __shared__ unsigned long long prefix, mask, above, cut;
  // state 0: searching, 1: one key left in the kept digit, 2: unreachable, 3: every bit decided
  __shared__ int state, high;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned long long all_and = ~0ull, all_or = 0, total_local = 0;
  for (int i = threadIdx.x; i < n; i += kChoiceThreads) {
    all_and &= c.key[i], all_or |= c.key[i];
    total_local += by_mass ? c.mass[i] : 1ull;
  }
  const unsigned a_hi = __reduce_and_sync(0xffffffffu, static_cast<unsigned>(all_and >> 32));
  const unsigned a_lo = __reduce_and_sync(0xffffffffu, static_cast<unsigned>(all_and));
  const unsigned o_hi = __reduce_or_sync(0xffffffffu, static_cast<unsigned>(all_or >> 32));
  const unsigned o_lo = __reduce_or_sync(0xffffffffu, static_cast<unsigned>(all_or));
  if (lane == 0) warp_and[0][warp] = a_hi, warp_and[1][warp] = a_lo, warp_or[0][warp] = o_hi, warp_or[1][warp] = o_lo;
  const unsigned long long total = block_sum_u64<kChoiceThreads>(total_local);  // (its barriers order the above)
  if (threadIdx.x == 0) {
    unsigned long long ka = ~0ull, ko = 0;
    for (int w = 0; w < kChoiceThreads / 32; ++w) {
      ka &= (static_cast<unsigned long long>(warp_and[0][w]) << 32) | warp_and[1][w];
      ko |= (static_cast<unsigned long long>(warp_or[0][w]) << 32) | warp_or[1][w];
    }
    const unsigned long long diff = ka ^ ko;
    high = diff ? 63 - __clzll(static_cast<long long>(diff)) : -1;
    mask = high >= 63 ? 0ull : ~0ull << (high + 1);
    prefix = ka & mask;
    above = 0, cut = n > 0 ? ka : 0ull;
    state = total < need ? 2 : high < 0 ? 1 : 0;  // no differing bit: at most one key
  }
  __syncthreads();
  const uint32_t digits_at = shared_address(digits);
  constexpr int kLoOffset = 4 * 256, kHiOffset = 8 * 256;  // bytes from digit_count
  while (state == 0) {
    const int h = high, shift = h >= 7 ? h - 7 : 0;
    const unsigned dmask = (2u << (h - shift)) - 1u;
    for (int d = threadIdx.x; d < 256; d += kChoiceThreads) digit_count[d] = 0, digit_lo[d] = 0, digit_hi[d] = 0;
    __syncthreads();
    const unsigned long long pre = prefix, msk = mask;
    for (int i = threadIdx.x; i < n; i += kChoiceThreads) {
      const unsigned long long k = c.key[i];
      if ((k & msk) != pre) continue;
      const uint32_t at = digits_at + 4u * static_cast<uint32_t>((k >> shift) & dmask);
      shared_add<0>(at, 1u);
      if (by_mass) {
        // A 64-bit add as 32-bit ones, as in the bins kernel: the add that wraps the low word
        // carries one into the high word.
        const unsigned long long m = c.mass[i];
        const unsigned lo = static_cast<unsigned>(m), hi = static_cast<unsigned>(m >> 32);
        const unsigned old = shared_fetch_add<kLoOffset>(at, lo);
        const unsigned up = hi + (old + lo < old ? 1u : 0u);
        if (up) shared_add<kHiOffset>(at, up);
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l takes digits 255 - 8l ... 248 - 8l: the running total goes from the largest digit down.
      const unsigned long long base = above;
      auto digit_total = [&](int d) -> unsigned long long {
        return by_mass ? (static_cast<unsigned long long>(digit_hi[d]) << 32) | digit_lo[d] : digit_count[d];
      };
      unsigned long long own = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) own += digit_total(255 - (8 * lane + j));
      unsigned long long incl = own;
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const unsigned long long q = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += q;
      }
      __syncwarp();  // every lane has read `above`
      unsigned long long run = base + incl - own;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int d = 255 - (8 * lane + j);
        const unsigned long long v = digit_total(d);
        if (run < need && run + v >= need) {
          prefix = pre | (static_cast<unsigned long long>(d) << shift);
          mask = msk | (static_cast<unsigned long long>(dmask) << shift);
          above = run;
          state = digit_count[d] == 1 ? 1 : shift == 0 ? 3 : 0;  // 3: every bit decided
          high = shift - 1;
        }
        run += v;
      }
    }
    __syncthreads();
  }
  if (state == 1) {  // one key left in the kept digit (or in all): find it
    const unsigned long long pre = prefix, msk = mask;
    for (int i = threadIdx.x; i < n; i += kChoiceThreads)
      if ((c.key[i] & msk) == pre) cut = c.key[i];
  } else if (state == 3 && threadIdx.x == 0) {
    cut = prefix;
  }
  __syncthreads();
  const unsigned long long k_cut = state == 2 ? 0ull : cut;
  unsigned long long local = 0;
  for (int i = threadIdx.x; i < n; i += kChoiceThreads)
    if (c.key[i] >= k_cut) local += c.mass[i];
  *mass_to_cut = block_sum_u64<kChoiceThreads>(local);
  return k_cut;
}

// Fallback when the bin holding the cut has more than kCandidates tokens: the sort key at which
// the running total over tokens of bin `bin` (in sort-key order) reaches `target`, by bisection
// on the 64-bit sort key with a block reduction per step (at most 64 steps). Slow, exact, and
// only reached by rows with thousands of logits within 1/85 of a scaled unit of each other (or in
// the last bin).
__device__ unsigned long long cut_by_bisection(const float* x, int64_t V, const Scale& s, int bin,
                                               unsigned long long before, unsigned long long target, bool by_mass,
                                               unsigned long long* mass_to_cut) {
  // Find the largest key K such that total(tokens of bin with key >= K) >= target - before.
  unsigned long long need = target - before;
  unsigned long long lo = 0, hi = ~0ull;  // invariant: total(key >= lo) >= need
  while (lo < hi) {
    unsigned long long mid = lo + (hi - lo) / 2 + 1;
    unsigned long long local = 0;
    for_each_logit(x, V, [&](int64_t v, float xv) {
      if (s.bin(xv) != bin || sort_key(xv, static_cast<int>(v)) < mid) return;
      local += by_mass ? s.mass(xv) : 1ull;
    });
    if (block_sum_u64<kChoiceThreads>(local) >= need) lo = mid;
    else hi = mid - 1;
  }
  if (mass_to_cut) {
    unsigned long long local = 0;
    for_each_logit(x, V, [&](int64_t v, float xv) {
      if (s.bin(xv) == bin && sort_key(xv, static_cast<int>(v)) >= lo) local += s.mass(xv);
    });
    *mass_to_cut = block_sum_u64<kChoiceThreads>(local);
  }
  return lo;
}

// The sort key of the last token of the shortest prefix (in sort-key order) whose running total
// (count, or mass when by_mass) reaches target; *prefix_mass gets that prefix's mass. The exact
// one-block path: the bins are in shared memory, the row is scanned by the block.
__device__ unsigned long long prefix_cut(Candidates c, const unsigned* bin_count, const unsigned long long* bin_mass,
                                         const float* x, int64_t V, const Scale& s, unsigned long long target,
                                         bool by_mass, unsigned long long* prefix_mass) {
  BinCut bc = by_mass ? find_bin(bin_mass, target) : find_bin(bin_count, target);
  unsigned long long local = 0;
  for (int b = threadIdx.x; b < bc.bin; b += kChoiceThreads) local += bin_mass[b];
  unsigned long long mass_before = block_sum_u64<kChoiceThreads>(local);
  unsigned long long within = 0, cut;
  // (A top-p row without top-k or top-N has no counts: its bin is gathered, and counted then.)
  bool gathered = false;
  if (bin_count[bc.bin] <= static_cast<unsigned>(kCandidates)) {
    gather_bins(c, x, V, s, bc.bin, bc.bin, true);
    gathered = *c.count <= kCandidates;
  }
  if (gathered) cut = cut_by_radix(c, static_cast<int>(*c.count), target - bc.before, by_mass, &within);
  else cut = cut_by_bisection(x, V, s, bc.bin, bc.before, target, by_mass, &within);
  *prefix_mass = mass_before + within;
  return cut;
}

// ---- The plan: one block of kPlanThreads per row, the row's bins in registers ----

constexpr int kPlanThreads = 512;
constexpr int kPlanPer = kBins / kPlanThreads;  // thread t holds bins kPlanPer t ... kPlanPer t + kPlanPer - 1
static_assert(kBins % kPlanThreads == 0, "whole bins per thread");

// A thread's bins (counts or masses) and the total of the bins before them.
struct BinRun {
  unsigned long long v[kPlanPer];
  unsigned long long before;
};

// The first bin where the running total reaches `target`, and the total before it, if this thread
// holds it (find_running's rule: integer sums, so exact; an unreachable target is found nowhere).
__device__ __forceinline__ bool find_own(const BinRun& run, unsigned long long target, BinCut& out) {
  unsigned long long total = run.before;
#pragma unroll
  for (int j = 0; j < kPlanPer; ++j) {
    if (total < target && total + run.v[j] >= target) {
      out = {kPlanPer * static_cast<int>(threadIdx.x) + j, total};
      return true;
    }
    total += run.v[j];
  }
  return false;
}

// Bin b's value, for the thread that holds it (a select per bin: no indexing into registers).
__device__ __forceinline__ unsigned long long own_value(const BinRun& run, int b) {
  const int j = b - kPlanPer * static_cast<int>(threadIdx.x);
  unsigned long long v = 0;
#pragma unroll
  for (int i = 0; i < kPlanPer; ++i)
    if (i == j) v = run.v[i];
  return v;
}

// The total of the bins before bin b, if this thread holds bin b.
__device__ __forceinline__ bool total_before_own(const BinRun& run, int b, unsigned long long& out) {
  const int j = b - kPlanPer * static_cast<int>(threadIdx.x);
  if (j < 0 || j >= kPlanPer) return false;
  unsigned long long total = run.before;
#pragma unroll
  for (int i = 0; i < kPlanPer; ++i)
    if (i < j) total += run.v[i];
  out = total;
  return true;
}

// Finds the bins that hold the top-k / top-p cuts and the top-N, from one scan of the row's bin
// counts and masses (every total below is an integer sum, exact in any order), and the gather
// kernel's Gumbel-max bound. Each step's results are published by the thread that holds the bin,
// one barrier per step.
template <bool kLive>
__global__ void __launch_bounds__(kPlanThreads)
    choice_plan_kernel(ChoiceWork w, const int32_t* params, int64_t V, int top_n, RowsLive live) {
  pdl_wait();
  pdl_launch_dependents();
  if constexpr (kLive)
    if (live.skip(blockIdx.x)) return;
  const int P = w.slices;
  const int64_t r = blockIdx.x;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const RowChoice p = load_choice(params + r * ch::kParams);
  const RowMode mode = row_mode(p, V, top_n);
  if (!mode.bins) return;
  // This thread's bins go out first; the row's stats arrive while they are in flight.
  BinRun count, mass;
  const unsigned* gc = w.bin_count + r * kBins + kPlanPer * t;
  const unsigned long long* gm = w.bin_mass + r * kBins + kPlanPer * t;
#pragma unroll
  for (int j = 0; j < kPlanPer; ++j) count.v[j] = gc[j], mass.v[j] = gm[j];
  const RowStats st = load_row_stats(w.stats + r * P, P);
  if (st.bad) {
    if (t == 0) {
      RowPlan plan{};
      plan.bad = 1;
      w.plan[r] = plan;
    }
    return;
  }

  // Scan: each thread's totals before its bins, and the row's mass.
  __shared__ unsigned long long warp_count[kPlanThreads / 32], warp_mass[kPlanThreads / 32];
  __shared__ BinCut k_cut, n_cut, p_lo, p_hi;
  __shared__ unsigned long long z_lo_shared, k_bin_mass, n_bin_count;
  __shared__ unsigned long long count_before_lo, mass_before_lo, count_through_hi;
  unsigned long long c = 0, m = 0;
#pragma unroll
  for (int j = 0; j < kPlanPer; ++j) c += count.v[j], m += mass.v[j];
  unsigned long long ic = c, im = m;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const unsigned long long oc = __shfl_up_sync(0xffffffffu, ic, d), om = __shfl_up_sync(0xffffffffu, im, d);
    if (lane >= d) ic += oc, im += om;
  }
  if (lane == 31) warp_count[warp] = ic, warp_mass[warp] = im;
  if (t == 0) {
    const BinCut none{kBins - 1, 0};
    k_cut = n_cut = p_lo = p_hi = none;
  }
  __syncthreads();
  count.before = ic - c, mass.before = im - m;
  unsigned long long z_all = 0;
  for (int i = 0; i < kPlanThreads / 32; ++i) {
    if (i < warp) count.before += warp_count[i], mass.before += warp_mass[i];
    z_all += warp_mass[i];
  }

  // Step 1: the k-th token's bin and the mass before it; the N-th token's bin and its count.
  const int n = mode.row_top > 0 ? (mode.row_top < V ? mode.row_top : static_cast<int>(V)) : 0;
  if (mode.filter_k) {
    BinCut kb;
    if (find_own(count, static_cast<unsigned long long>(p.top_k), kb)) {
      k_cut = kb;
      total_before_own(mass, kb.bin, z_lo_shared);
      k_bin_mass = own_value(mass, kb.bin);
    }
  }
  if (n > 0) {
    BinCut nb;
    if (find_own(count, static_cast<unsigned long long>(n), nb)) {
      n_cut = nb;
      n_bin_count = own_value(count, nb.bin);
    }
  }
  __syncthreads();

  // List B: the bins that can hold the top-k cut and the top-p cut. With top-k, the mass Z of the
  // top-k set lies between the mass of the bins before the k-th token's bin and that plus its
  // bin's; the top-p target ceil(p Z) and the bin where it is reached grow with Z.
  int lo = kBins, hi = -1;
  unsigned long long z_lo = z_all, z_hi = z_all;
  if (mode.filter_k) {
    lo = hi = k_cut.bin;
    z_lo = z_lo_shared;
    z_hi = z_lo + k_bin_mass;
  }
  if (mode.filter_p) {
    // Step 2: the bins where the top-p targets are reached (one target without top-k).
    BinCut a, b;
    const unsigned long long target_lo = ch::top_p_target(p.top_p, z_lo), target_hi = ch::top_p_target(p.top_p, z_hi);
    if (find_own(mass, target_lo, a)) p_lo = a;
    if (find_own(mass, target_hi, b)) p_hi = b;
    __syncthreads();
    // (z_lo is 0 only when the k-th token lies in bin 0: then lo is 0 already.)
    lo = p_lo.bin < lo ? p_lo.bin : lo;
    hi = p_hi.bin > hi ? p_hi.bin : hi;
  }
  RowPlan plan{};
  plan.z_all = z_all;
  plan.lo = lo, plan.hi = hi;
  plan.top_bin = -1;
  plan.max = st.max;
  plan.bound = -INFINITY;
  if (mode.gumbel == 3 && t < 32) {
    // The gather kernel's bound: the best exact score among the slices' largest logits that are
    // kept whatever the cut (in bins below lo, and min-p), the row's largest always among them
    // (every pass keeps it). The gather kernel visits each of them, so it may prune against it.
    const Scale sc = row_scale(p, mode, st.max);
    const uint32_t noise_row = ch::noise_row(p.seed, static_cast<uint32_t>(p.position));
    float bound = t == 0 ? gumbel_seed(st.max, st.index, sc, noise_row).value : -INFINITY;
    for (int s = t; s < P; s += 32) {
      const SliceStats a = w.stats[r * P + s];
      if (a.max == -INFINITY || sc.bin(a.max) >= lo) continue;
      if (p.min_p > 0.f && sc.weight(a.max) < p.min_p) continue;
      bound = fmaxf(bound, gumbel_seed(a.max, a.index, sc, noise_row).value);
    }
    plan.bound = warp_max(bound);
  }
  if (lo <= hi) {
    // Step 3: the tokens and mass before bin lo, and the tokens up to bin hi.
    total_before_own(count, lo, count_before_lo);
    total_before_own(mass, lo, mass_before_lo);
    if (total_before_own(count, hi, count_through_hi)) count_through_hi += own_value(count, hi);
    __syncthreads();
    plan.count_before = count_before_lo;
    plan.mass_before = mass_before_lo;
    plan.overflow_b = count_through_hi - count_before_lo > static_cast<unsigned long long>(kCandidates);
  }
  if (n > 0) {
    plan.top_bin = n_cut.bin;
    plan.overflow_a = n_cut.before + n_bin_count > static_cast<unsigned long long>(kCandidates);
  }
  if (t == 0) {
    w.plan[r] = plan;
    w.held[2 * r] = 0, w.held[2 * r + 1] = 0;
  }
}

template <bool kLive>
__global__ void __launch_bounds__(kSliceThreads, 3)
    choice_gather_kernel(ChoiceWork w, const float* x, const int32_t* params, int64_t V, int top_n, int per_block,
                         RowsLive live) {
  pdl_wait();
  pdl_launch_dependents();
  if constexpr (kLive)
    if (live.skip(blockIdx.y)) return;
  const int P = w.slices;
  const int first = static_cast<int>(blockIdx.x) * per_block, last = min(P, first + per_block);
  const int64_t r = blockIdx.y;
  const RowChoice p = load_choice(params + r * ch::kParams);
  const RowMode mode = row_mode(p, V, top_n);
  if (!mode.bins) return;
  // The first slice's loads go out first; the row's plan arrives while they are in flight.
  const float* xr = x + r * V;
  const bool vec = row_vec(x, V);
  float v[kSliceGroups][4];
  load_slice(v, xr, slice_range(V, first), vec);
  const RowPlan plan = w.plan[r];
  if (plan.bad) return;
  const bool take_b = plan.lo <= plan.hi && !plan.overflow_b;
  const bool take_a = plan.top_bin >= 0 && !plan.overflow_a;
  const bool picks = mode.gumbel == 3 && take_b;
  if (!take_a && !take_b) return;
  const Scale sc = row_scale(p, mode, plan.max);
  unsigned* held = w.held + 2 * r;
  unsigned long long* list_a = w.list_a + r * kCandidates;
  unsigned long long* list_b = w.list_b + r * kCandidates;
  const uint32_t noise_row = ch::noise_row(p.seed, static_cast<uint32_t>(p.position));
  ArgBest pick{-INFINITY, 0x7fffffff};
  const float bound = plan.bound;
  // The lists as ranges of bins (an empty range when a list is not taken): list B holds bins
  // b with b - b_lo <= b_span (unsigned), list A bins b <= a_top, and the Gumbel-max visits b < kept_below.
  const int b_lo = take_b ? plan.lo : 0x7fffffff;
  const unsigned b_span = take_b ? static_cast<unsigned>(plan.hi - plan.lo) : 0u;
  const int a_top = take_a ? plan.top_bin : -1;
  const int kept_below = picks ? plan.lo : 0;
  // win_h[b]: a token of bin b can reach the bound only if its noise hash is at least win_h[b]
  // (0xffffffff: never, but for a hash of all ones, which the exact-score loop checks). From
  // may_win at the largest scaled logit of the bin: a token of bin b lies at most b/kBinScale below
  // the scaled maximum, within rounding (relative 4e-7 of the bin's distance, 1.2e-7 of the scaled
  // logits: see Scale::bin); sv_max adds a whole bin, 1e-3 and 1e-6 of the scaled maximum, far
  // more. The least u is W, and u = (2 (h >> 9) + 1) / 2^24 >= W exactly when
  // h >> 9 >= floor(ceil(W 2^24) / 2). Bins at or past kept_below hold no token to visit.
  __shared__ uint32_t win_h[kBins];
  if (picks) {
    const float tol = prune_tol(bound);
    for (int b = threadIdx.x; b < kBins; b += kSliceThreads) {
      float least = 2.f;  // never
      if (b < kept_below) {
        const float sv_max = sc.smax - static_cast<float>(b - 1) / kBinScale + (1e-3f + fabsf(sc.smax) * 1e-6f);
        least = least_winning_u(sv_max - bound, tol);
      }
      const uint32_t half = static_cast<uint32_t>(ceilf(least * 16777216.f)) >> 1;
      win_h[b] = half >= (1u << 23) ? 0xffffffffu : half << 9;
    }
    __syncthreads();
  }
  static_assert(kSliceGroups * 4 <= 32, "one bit per value of a thread");
  for (int s = first; s < last; ++s) {
    const SliceRange sl = slice_range(V, s);
    if (s > first) load_slice(v, xr, sl, vec);
    // First the per-thread work, without branches: the bin of each value, one bit per value for
    // each list, and for the tokens above the cut bins (kept whatever the cut) a bit when their
    // noise may reach the bound.
    unsigned want_a = 0, want_b = 0, maybe = 0;
    visit_slice(v, sl, [&](int i, int e, float xv) {
      const int b = sc.bin(xv);
      want_b |= (static_cast<unsigned>(b - b_lo) <= b_span ? 1u : 0u) << i;
      want_a |= (b <= a_top ? 1u : 0u) << i;
      if (picks) {
        const uint32_t bits = ch::noise_token(noise_row, static_cast<uint32_t>(sl.begin + e));
        maybe |= (bits >= win_h[b] ? 1u : 0u) << i;
      }
    });
    // The exact scores of those few (the value is read again from memory).
    const float* xs = xr + sl.begin;
    while (maybe) {
      const int i = __ffs(maybe) - 1;
      maybe &= maybe - 1;
      const int e = slice_offset(i / 4, i % 4);
      const float xv = __ldg(xs + e);
      // A hash of all ones passes win_h's "never" too: only tokens kept whatever the cut count.
      if (sc.bin(xv) >= kept_below || (p.min_p > 0.f && sc.weight(xv) < p.min_p)) continue;
      pick = arg_better(pick, gumbel_seed(xv, sl.begin + e, sc, noise_row));
    }
    // Then the appends, warp by warp, for the values that some lane of the warp takes (few: the
    // lists hold at most kCandidates tokens per row); the value is read again from memory.
    unsigned any = __reduce_or_sync(0xffffffffu, want_a | want_b);
    while (any) {
      const int i = __ffs(any) - 1;
      any &= any - 1;
      const int e = slice_offset(i / 4, i % 4);
      const bool in_a = (want_a >> i) & 1u, in_b = (want_b >> i) & 1u;
      const unsigned long long key = in_a || in_b ? sort_key(__ldg(xs + e), sl.begin + e) : 0ull;
      append(in_b, list_b, held + 1, key);
      append(in_a, list_a, held, key);
    }
  }
  if (picks) {
    // One pick for the block's slices, in the slot of its first; the others are emptied.
    pick = block_argmax<kSliceThreads>(pick);
    if (threadIdx.x == 0)
      for (int s = first; s < last; ++s) w.picks[r * P + s] = s == first ? pick : ArgBest{-INFINITY, 0x7fffffff};
  }
}

template <bool kLive>
__global__ void __launch_bounds__(kChoiceThreads, 2)
    choice_select_kernel(int32_t* out, ChoiceWork w, const float* x, const int32_t* params, int64_t V, int top_n,
                         RowsLive live) {
  pdl_wait();
  pdl_launch_dependents();
  if constexpr (kLive)
    if (live.skip(blockIdx.x)) return;
  extern __shared__ unsigned long long smem[];
  unsigned long long* bin_mass = smem;
  unsigned* bin_count = reinterpret_cast<unsigned*>(bin_mass + kBins);
  Candidates cand{bin_mass + kBins + kBins / 2, bin_mass + kBins + kBins / 2 + kCandidates, nullptr};
  __shared__ int cand_count;
  cand.count = &cand_count;

  const int P = w.slices;
  const int64_t r = blockIdx.x;
  const float* xr = x + r * V;
  int32_t* o = out + r * (2 + 2 * static_cast<int64_t>(top_n));
  const RowChoice p = load_choice(params + r * ch::kParams);
  const RowMode mode = row_mode(p, V, top_n);
  const RowStats st = load_row_stats(w.stats + r * P, P);
  if (st.bad) {
    for (int i = threadIdx.x; i < 2 + 2 * top_n; i += kChoiceThreads)
      o[i] = (i == 0 || (i >= 2 && i < 2 + top_n)) ? -1 : ch::float_bits(NAN);
    return;
  }
  const float m = st.max;
  const float lse = load_row_lse(w.stats + r * P, P, m);
  // The slices' Gumbel-max picks (written by the rows that sample; read only by them).
  const ArgBest* picks = w.picks + r * P;
  const Scale s = row_scale(p, mode, m);
  // The exact one-block path reads the bins from shared memory.
  bool bins_loaded = false;
  auto load_bins = [&] {
    if (bins_loaded) return;
    for (int b = threadIdx.x; b < kBins; b += kChoiceThreads)
      bin_count[b] = w.bin_count[r * kBins + b], bin_mass[b] = w.bin_mass[r * kBins + b];
    __syncthreads();
    bins_loaded = true;
  };

  int id;
  if (p.target >= 0) {
    id = p.target < V ? p.target : -1;  // the host validates targets; never read out of bounds
  } else if (!mode.sampling) {
    id = st.index;
  } else {
    const uint32_t noise_row = ch::noise_row(p.seed, static_cast<uint32_t>(p.position));
    ArgBest pick{-INFINITY, 0x7fffffff};
    if (mode.gumbel != 3) {
      pick = load_best_pick(picks, P);
    } else {
      // The kept set: tokens whose sort key is at least `cut`, and min-p.
      const RowPlan plan = w.plan[r];
      unsigned long long cut = 0, z = plan.z_all, unused;
      ArgBest mine = gumbel_seed(m, st.index, s, noise_row);  // the best logit is always kept
      // List B holds every token of bins [lo, hi] unless they were too many (the plan knew it from
      // the counts, or, for a row without counts, the gather kernel counted past the list's end).
      const unsigned held = w.held[2 * r + 1];
      if (!plan.overflow_b && held <= static_cast<unsigned>(kCandidates)) {
        // The tokens of bins [lo, hi], in list order; the bins below lo hold plan.count_before
        // tokens of mass plan.mass_before, all kept, their Gumbel-max in the slices' picks.
        pick = load_best_pick(picks, P);
        const int n = static_cast<int>(held);
        load_candidates(cand, w.list_b + r * kCandidates, n, s);
        if (mode.filter_k) {
          cut = cut_by_radix(cand, n, static_cast<unsigned long long>(p.top_k) - plan.count_before, false, &z);
          z += plan.mass_before;
        }
        if (mode.filter_p) {
          const unsigned long long cut_p =
              cut_by_radix(cand, n, ch::top_p_target(p.top_p, z) - plan.mass_before, true, &unused);
          cut = cut_p > cut ? cut_p : cut;
        }
        float bound = fmaxf(mine.value, pick.value);  // both exact scores of kept tokens
        for (int i = threadIdx.x; i < n; i += kChoiceThreads) {
          const unsigned long long k = cand.key[i];
          if (k >= cut) gumbel_step(mine, bound, key_id(k), key_logit(k), s, noise_row, p.min_p);
        }
      } else {
        load_bins();
        if (mode.filter_k)
          cut = prefix_cut(cand, bin_count, bin_mass, xr, V, s, static_cast<unsigned long long>(p.top_k), false, &z);
        if (mode.filter_p) {
          const unsigned long long cut_p =
              prefix_cut(cand, bin_count, bin_mass, xr, V, s, ch::top_p_target(p.top_p, z), true, &unused);
          cut = cut_p > cut ? cut_p : cut;
        }
        float bound = mine.value;
        for_each_logit(xr, V, [&](int64_t v, float xv) {
          if (sort_key(xv, static_cast<int>(v)) >= cut) gumbel_step(mine, bound, v, xv, s, noise_row, p.min_p);
        });
      }
      pick = arg_better(pick, block_argmax<kChoiceThreads>(mine));
    }
    id = pick.index;
  }
  if (threadIdx.x == 0) {
    o[0] = id;
    o[1] = ch::float_bits(id >= 0 && id < V ? xr[id] - lse : NAN);
  }

  if (mode.row_top > 0) {
    // The N best logits: every token in the bins up to the one where the count reaches N.
    const int n = mode.row_top < V ? mode.row_top : static_cast<int>(V);
    const RowPlan plan = w.plan[r];
    if (!plan.overflow_a) {
      const unsigned held = w.held[2 * r];
      load_sorted(cand, w.list_a + r * kCandidates, held < static_cast<unsigned>(kCandidates) ? held : kCandidates, s,
                  false);
    } else {
      load_bins();
      __syncthreads();  // the candidates' previous use is over
      BinCut bc = find_bin(bin_count, static_cast<unsigned long long>(n));
      const unsigned long long cut =
          cut_by_bisection(xr, V, s, bc.bin, bc.before, static_cast<unsigned long long>(n), false, nullptr);
      // Every token before the cut: at most N of them, gathered then sorted.
      for (int i = threadIdx.x; i < kCandidates; i += kChoiceThreads) cand.key[i] = 0, cand.mass[i] = 0;
      if (threadIdx.x == 0) cand_count = 0;
      __syncthreads();
      for_each_logit(xr, V, [&](int64_t v, float xv) {
        unsigned long long k = sort_key(xv, static_cast<int>(v));
        if (k >= cut) {
          const int slot = atomicAdd(&cand_count, 1);
          if (slot < kCandidates) cand.key[slot] = k;
        }
      });
      __syncthreads();
      sort_candidates(cand, kCandidates);
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

// Slices per block of the bins and gather kernels: one while the rows are few (every slice in
// flight at once), up to 4 once there are several waves of blocks, so that a block's setup (its
// bins, the row's plan) serves more values and a row's bins take a quarter of the global atomics.
// Bins are integer sums and Gumbel-max an exact maximum: the result is the same for any grouping.
int bins_slices_per_block(int P, unsigned rows) {
  return static_cast<int>(std::clamp<int64_t>(int64_t{P} * rows / 1024, 1, 4));
}

// The workspace: kChunkRows rows of P slices (about 22 MiB at V = 151936), allocated at the first
// call and grown only for a wider vocabulary. CUDA graphs hold pointers into it, so it never
// shrinks, never grows with the number of rows, and a buffer it outgrows is kept, not freed (a
// graph captured earlier may still use it). All launches share the one stream, so reuse between
// calls is ordered.
ChoiceWork choice_workspace(int P) {
  auto round = [](size_t n) { return (n + 255) / 256 * 256; };
  const size_t R = static_cast<size_t>(kChunkRows), S = static_cast<size_t>(P);
  const size_t sizes[] = {
      round(R * kCandidates * sizeof(unsigned long long)),  // list_a
      round(R * kCandidates * sizeof(unsigned long long)),  // list_b
      round(R * kBins * sizeof(unsigned long long)),        // bin_mass
      round(R * kBins * sizeof(unsigned)),                  // bin_count
      round(R * S * sizeof(SliceStats)),                    // stats
      round(R * S * sizeof(ArgBest)),                       // picks
      round(R * sizeof(RowPlan)),                           // plan
      round(R * 2 * sizeof(unsigned)),                      // held
  };
  size_t bytes = 0;
  for (size_t n : sizes) bytes += n;
  static std::mutex mutex;
  static void* ptr = nullptr;
  static size_t capacity = 0;
  char* base;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (bytes > capacity) {
      ptr = cuda_runtime::alloc(bytes);  // the previous buffer stays allocated (see above)
      capacity = bytes;
    }
    base = static_cast<char*>(ptr);
  }
  ChoiceWork w;
  size_t at = 0;
  auto next = [&](size_t i) {
    char* q = base + at;
    at += sizes[i];
    return q;
  };
  w.list_a = reinterpret_cast<unsigned long long*>(next(0));
  w.list_b = reinterpret_cast<unsigned long long*>(next(1));
  w.bin_mass = reinterpret_cast<unsigned long long*>(next(2));
  w.bin_count = reinterpret_cast<unsigned*>(next(3));
  w.stats = reinterpret_cast<SliceStats*>(next(4));
  w.picks = reinterpret_cast<ArgBest*>(next(5));
  w.plan = reinterpret_cast<RowPlan*>(next(6));
  w.held = reinterpret_cast<unsigned*>(next(7));
  w.slices = P;
  return w;
}

// The five launches of each round of kChunkRows rows; kLive: the instantiation that skips the rows
// at or past *live (choose_tokens' live), which the other holds no check for.
template <bool kLive>
void launch_choice(Tensor& out, const Tensor& x, const Tensor& params, const int32_t* live) {
  int64_t rows = x.dim(0), V = x.dim(1);
  const int top_n = static_cast<int>((out.dim(1) - 2) / 2);
  static std::once_flag configured;
  std::call_once(configured, [] {
    CUDA_CHECK(cudaFuncSetAttribute(choice_select_kernel<kLive>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(kChoiceSmem)));
  });
  const int P = static_cast<int>((V + kSlice - 1) / kSlice);
  const bool variant_split = variant_kernels() && rows < kVariantSplits;
  const int64_t chunk = kChunkRows;
  const ChoiceWork w = choice_workspace(P);
  cudaStream_t stream = device_stream();
  const int64_t out_cols = 2 + 2 * static_cast<int64_t>(top_n);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const unsigned n = static_cast<unsigned>(std::min(chunk, rows - r0));
    const float* xc = x.ptr<float>() + r0 * V;
    const int32_t* pc = params.ptr<int32_t>() + r0 * choice::kParams;
    int32_t* oc = out.ptr<int32_t>() + r0 * out_cols;
    const RowsLive lc{live, r0};
    const dim3 slices(static_cast<unsigned>(P), n);
    launch_overlapped(choice_stats_kernel<kLive>, slices, kSliceThreads, 0, stream, w, xc, pc, V, top_n, variant_split,
                      lc);
    CUDA_CHECK_LAUNCH("choose_tokens (stats)", shapes(rows, V));
    const int per_block = bins_slices_per_block(P, n);
    const dim3 groups(static_cast<unsigned>((P + per_block - 1) / per_block), n);
    launch_overlapped(choice_bins_kernel<kLive>, groups, kSliceThreads, 0, stream, w, xc, pc, V, top_n, per_block, lc);
    CUDA_CHECK_LAUNCH("choose_tokens (bins)", shapes(rows, V));
    launch_overlapped(choice_plan_kernel<kLive>, n, kPlanThreads, 0, stream, w, pc, V, top_n, lc);
    CUDA_CHECK_LAUNCH("choose_tokens (plan)", shapes(rows, V));
    launch_overlapped(choice_gather_kernel<kLive>, groups, kSliceThreads, 0, stream, w, xc, pc, V, top_n, per_block,
                      lc);
    CUDA_CHECK_LAUNCH("choose_tokens (gather)", shapes(rows, V));
    launch_overlapped(choice_select_kernel<kLive>, n, kChoiceThreads, kChoiceSmem, stream, oc, w, xc, pc, V, top_n, lc);
    CUDA_CHECK_LAUNCH("choose_tokens (select)", shapes(rows, V));
  }
}

}  // namespace

void choose_tokens(Tensor& out, const Tensor& x, const Tensor& params, const Tensor* live) {
  int64_t rows = x.dim(0), V = x.dim(1);
  if (rows == 0) return;
  DI_CHECK(V > 0, "choose_tokens: x has no columns");
  DI_CHECK(rows <= 0x7fffffff, "choose_tokens: too many rows (", rows, ")");
  DI_CHECK(V <= 0x7fffffff, "choose_tokens: too many columns (", V, ")");
  if (live) launch_choice<true>(out, x, params, live->ptr<int32_t>());
  else launch_choice<false>(out, x, params, nullptr);
}

}  // namespace detinfer::cuda
