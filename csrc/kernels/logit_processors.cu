// Logit processors (CUDA): frequency, presence and repetition penalties, logit bias and the token
// mask (common/logit_processors.h has the one definition, the plan and the settings layout).
//   apply_logit_processors  adjusted[j, v] = y(x[r_j, v], counts[k_j, v], mask[m_j]) for j < K = plan[0]
//                           adjusted f32 [J,V], x f32 [R,V], counts u16 [S,V], mask i32 [S,ceil(V/32)]
//   record_logit_choices    params[r_j].target = chosen[j, 0]; counts[k_j, chosen[j, 0]] += 1
//   reset_logit_row         counts[k, :] = 0, then counts[k, prompt[i]] = kInPrompt (a sequence with a
//                           repetition penalty takes row k; enqueued before its first step)
// Invariant: elementwise. Block (c, j) of apply_logit_processors owns logits c*kApplyChunk ...
// of plan row j; every value is one fixed sequence of float32 operations on that token's own
// logit, count and bias, then its own mask bit (no reduction), so a row cannot depend on the
// batch, on J or on K. The mask words are read only for a plan row that names a mask row. Rows
// j >= K return at once: the launch may be captured for more rows than a step uses (J fixed per
// CUDA graph bucket, K read on the device). A plan entry outside the tensors (the host never
// writes one) is skipped instead of read.
// Both kernels are plain launches (never overlapped): the kernel after them, launched overlapped,
// waits for them, and they wait for everything before them.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../common/logit_processors.h"
#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "cuda_ops.h"

namespace detinfer::cuda {
namespace {

namespace pr = detinfer::processors;
namespace ch = detinfer::choice;

constexpr int kApplyThreads = 256;
constexpr int kApplyChunk = 2048;  // logits per block: 75 blocks per row at V = 151936
constexpr int kRecordThreads = 256;

cudaStream_t device_stream() { return static_cast<cudaStream_t>(cuda_runtime::stream()); }

struct PlanRow {
  int row, table_row, mask_row;  // mask_row -1: no mask
  bool fresh, valid;
};

__device__ PlanRow load_plan_row(const int32_t* plan, int j, int rows, int table_rows) {
  const int32_t* e = plan + 1 + pr::kPlanFields * j;
  PlanRow p{e[pr::kPlanRow], e[pr::kPlanTableRow], e[pr::kPlanMask], e[pr::kPlanFresh] != 0, false};
  p.valid = p.row >= 0 && p.row < rows && p.table_row >= 0 && p.table_row < table_rows && p.mask_row >= -1 &&
            p.mask_row < table_rows;
  return p;
}

__global__ void __launch_bounds__(kApplyThreads)
    apply_logit_processors_kernel(float* adjusted, int32_t* adjusted_params, uint16_t* counts, const float* x,
                                  const int32_t* params, const int32_t* plan, const int32_t* settings,
                                  const int32_t* mask, int64_t V, int rows, int table_rows) {
  const int j = static_cast<int>(blockIdx.y);
  if (j >= plan[0]) return;
  const PlanRow p = load_plan_row(plan, j, rows, table_rows);
  if (!p.valid) return;
  const int32_t* s = settings + static_cast<int64_t>(p.table_row) * pr::kSettings;
  const float f = ch::as_float(s[pr::kFrequency]), presence = ch::as_float(s[pr::kPresence]);
  const float r = ch::as_float(s[pr::kRepetition]);
  const int n_bias = min(max(s[pr::kBiasCount], 0), pr::kMaxBias);
  const float* xr = x + static_cast<int64_t>(p.row) * V;
  float* ar = adjusted + static_cast<int64_t>(j) * V;
  uint16_t* cr = counts + static_cast<int64_t>(p.table_row) * V;
  // The row's mask words; null when the row is not masked this step (its words are not read).
  const int32_t* mr = p.mask_row >= 0 ? mask + static_cast<int64_t>(p.mask_row) * pr::mask_words(V) : nullptr;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kApplyChunk;
  const int64_t end = min(V, begin + kApplyChunk);
  for (int64_t v = begin + threadIdx.x; v < end; v += kApplyThreads) {
    uint32_t c = 0;
    if (p.fresh) cr[v] = 0;  // the sequence takes the row: the last owner's counts go
    else c = cr[v];
    const float y = pr::penalized_logit(xr[v], c, f, presence, r);
    ar[v] = mr ? pr::masked_logit(y, pr::token_allowed(mr, v)) : y;
  }
  if (blockIdx.x == 0 && threadIdx.x < ch::kParams)
    adjusted_params[static_cast<int64_t>(j) * ch::kParams + threadIdx.x] =
        params[static_cast<int64_t>(p.row) * ch::kParams + threadIdx.x];
  if (n_bias == 0) return;
  // The biased tokens of this block's logits, written after the loop above (same block, so the
  // barrier orders the two writes of a token; a fresh row's counts are 0 by then).
  __syncthreads();
  for (int i = threadIdx.x; i < n_bias; i += kApplyThreads) {
    const int32_t id = s[pr::kBias + 2 * i];
    if (id < begin || id >= end) continue;
    const uint32_t c = p.fresh ? 0u : cr[id];
    const float y = pr::biased_logit(pr::penalized_logit(xr[id], c, f, presence, r), ch::as_float(s[pr::kBias + 2 * i + 1]));
    ar[id] = mr ? pr::masked_logit(y, pr::token_allowed(mr, id)) : y;  // a bias cannot revive a masked token
  }
}

// One thread per plan row; the table rows of a plan are distinct, so no two threads write one count.
__global__ void __launch_bounds__(kRecordThreads)
    record_logit_choices_kernel(int32_t* params, uint16_t* counts, const int32_t* chosen, int64_t chosen_width,
                                const int32_t* plan, int J, int64_t V, int rows, int table_rows) {
  const int live = min(plan[0], J);
  for (int j = threadIdx.x; j < live; j += kRecordThreads) {
    const PlanRow p = load_plan_row(plan, j, rows, table_rows);
    const int32_t id = chosen[static_cast<int64_t>(j) * chosen_width];
    if (!p.valid || id < 0 || id >= V) continue;  // id -1: a row that is not finite
    params[static_cast<int64_t>(p.row) * ch::kParams + ch::kTarget] = id;
    uint16_t* c = counts + static_cast<int64_t>(p.table_row) * V + id;
    if ((*c & pr::kCountMask) < pr::kMaxCount) *c = static_cast<uint16_t>(*c + 1);
  }
}

constexpr int kResetThreads = 256;

// Zeroes the row, block-strided, then (a second launch, so that every zero is written first) marks
// the prompt's ids; an id outside [0, V) (the host never gives one) is skipped.
__global__ void __launch_bounds__(kResetThreads) zero_logit_row_kernel(uint16_t* row, int64_t V) {
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kResetThreads + threadIdx.x; v < V;
       v += static_cast<int64_t>(gridDim.x) * kResetThreads)
    row[v] = 0;
}

__global__ void __launch_bounds__(kResetThreads)
    mark_prompt_tokens_kernel(uint16_t* row, const int32_t* ids, int64_t n, int64_t V) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kResetThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kResetThreads) {
    const int32_t id = ids[i];
    if (id >= 0 && id < V) row[id] = static_cast<uint16_t>(pr::kInPrompt);
  }
}

std::string shapes(int64_t J, int64_t V) { return "[J=" + std::to_string(J) + ", V=" + std::to_string(V) + "]"; }

}  // namespace

void apply_logit_processors(Tensor& adjusted, Tensor& adjusted_params, Tensor& counts, const Tensor& x,
                            const Tensor& params, const Tensor& plan, const Tensor& settings, const Tensor& mask) {
  const int64_t J = adjusted.dim(0), V = x.dim(1);
  DI_CHECK(J <= 65535, "apply_logit_processors: at most 65535 plan rows per launch, received ", J);
  const dim3 grid(static_cast<unsigned>((V + kApplyChunk - 1) / kApplyChunk), static_cast<unsigned>(J));
  apply_logit_processors_kernel<<<grid, kApplyThreads, 0, device_stream()>>>(
      adjusted.ptr<float>(), adjusted_params.ptr<int32_t>(), counts.ptr<uint16_t>(), x.ptr<float>(),
      params.ptr<int32_t>(), plan.ptr<int32_t>(), settings.ptr<int32_t>(), mask.ptr<int32_t>(), V, static_cast<int>(x.dim(0)),
      static_cast<int>(counts.dim(0)));
  CUDA_CHECK_LAUNCH("apply_logit_processors", shapes(J, V));
}

void reset_logit_row(Tensor& counts, int row, const Tensor& prompt) {
  const int64_t V = counts.dim(1), n = prompt.dim(0);
  uint16_t* r = counts.ptr<uint16_t>() + static_cast<int64_t>(row) * V;
  const auto blocks = [](int64_t items) { return static_cast<unsigned>(std::min<int64_t>((items + kResetThreads - 1) / kResetThreads, 1024)); };
  if (V > 0) {
    zero_logit_row_kernel<<<blocks(V), kResetThreads, 0, device_stream()>>>(r, V);
    CUDA_CHECK_LAUNCH("reset_logit_row (zero)", shapes(n, V));
  }
  if (n > 0 && V > 0) {
    mark_prompt_tokens_kernel<<<blocks(n), kResetThreads, 0, device_stream()>>>(r, prompt.ptr<int32_t>(), n, V);
    CUDA_CHECK_LAUNCH("reset_logit_row (mark)", shapes(n, V));
  }
}

void record_logit_choices(Tensor& params, Tensor& counts, const Tensor& chosen, const Tensor& plan) {
  const int64_t J = chosen.dim(0), V = counts.dim(1);
  record_logit_choices_kernel<<<1, kRecordThreads, 0, device_stream()>>>(
      params.ptr<int32_t>(), counts.ptr<uint16_t>(), chosen.ptr<int32_t>(), chosen.dim(1), plan.ptr<int32_t>(),
      static_cast<int>(J), V, static_cast<int>(params.dim(0)), static_cast<int>(counts.dim(0)));
  CUDA_CHECK_LAUNCH("record_logit_choices", shapes(J, V));
}

}  // namespace detinfer::cuda
