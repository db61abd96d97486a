// Logit processors (CPU): frequency, presence and repetition penalties, logit bias and the token
// mask, as common/logit_processors.h defines them. Elementwise per row: row j of the plan depends
// on its logits row, its table row (counts and settings), its mask row and nothing else.
#include <cstdint>
#include <cstring>

#include "../common/error.h"
#include "../common/logit_processors.h"
#include "cpu_ops.h"

namespace detinfer::cpu {
namespace {

namespace pr = detinfer::processors;
namespace ch = detinfer::choice;

struct PlanRow {
  int32_t row, table_row, mask_row;  // mask_row -1: no mask
  bool fresh;
};

// Entry j of a plan, checked against the tensors it indexes (the CPU can say what is wrong).
PlanRow plan_row(const Tensor& plan, int64_t j, int64_t rows, int64_t table_rows, const char* op) {
  const int32_t* e = plan.ptr<int32_t>() + 1 + pr::kPlanFields * j;
  PlanRow p{e[pr::kPlanRow], e[pr::kPlanTableRow], e[pr::kPlanMask], e[pr::kPlanFresh] != 0};
  DI_CHECK(p.row >= 0 && p.row < rows, op, ": plan row ", j, " names logits row ", p.row, ", outside [0, ", rows, ")");
  DI_CHECK(p.table_row >= 0 && p.table_row < table_rows, op, ": plan row ", j, " names table row ", p.table_row,
           ", outside [0, ", table_rows, ")");
  DI_CHECK(p.mask_row >= -1 && p.mask_row < table_rows, op, ": plan row ", j, " names mask row ", p.mask_row,
           ", outside [-1, ", table_rows, ")");
  return p;
}

// The rows in use: plan[0], at most the plan's J.
int64_t live_rows(const Tensor& plan) {
  const int64_t J = (plan.dim(0) - 1) / pr::kPlanFields;
  const int64_t k = plan.ptr<int32_t>()[0];
  return k < 0 ? 0 : k > J ? J : k;
}

}  // namespace

void apply_logit_processors(Tensor& adjusted, Tensor& adjusted_params, Tensor& counts, const Tensor& x,
                            const Tensor& params, const Tensor& plan, const Tensor& settings, const Tensor& mask) {
  const int64_t V = x.dim(1), K = live_rows(plan);
  for (int64_t j = 0; j < K; ++j) {
    const PlanRow p = plan_row(plan, j, x.dim(0), counts.dim(0), "apply_logit_processors");
    const int32_t* s = settings.ptr<int32_t>() + p.table_row * pr::kSettings;
    const float f = ch::as_float(s[pr::kFrequency]), presence = ch::as_float(s[pr::kPresence]);
    const float r = ch::as_float(s[pr::kRepetition]);
    const int32_t n_bias = s[pr::kBiasCount];
    DI_CHECK(n_bias >= 0 && n_bias <= pr::kMaxBias, "apply_logit_processors: table row ", p.table_row, " holds ",
             n_bias, " biases, outside [0, ", pr::kMaxBias, "]");
    const float* xr = x.ptr<float>() + p.row * V;
    float* ar = adjusted.ptr<float>() + j * V;
    uint16_t* cr = counts.ptr<uint16_t>() + p.table_row * V;
    if (p.fresh) std::memset(cr, 0, static_cast<size_t>(V) * sizeof(uint16_t));
    for (int64_t v = 0; v < V; ++v) ar[v] = pr::penalized_logit(xr[v], cr[v], f, presence, r);
    for (int32_t i = 0; i < n_bias; ++i) {
      const int32_t id = s[pr::kBias + 2 * i];
      DI_CHECK(id >= 0 && id < V, "apply_logit_processors: table row ", p.table_row, " biases token ", id,
               ", outside [0, ", V, ")");
      ar[id] = pr::biased_logit(pr::penalized_logit(xr[id], cr[id], f, presence, r), ch::as_float(s[pr::kBias + 2 * i + 1]));
    }
    // The mask last, over the biased values too: a bias cannot revive a forbidden token.
    if (p.mask_row >= 0) {
      const int32_t* words = mask.ptr<int32_t>() + p.mask_row * pr::mask_words(V);
      for (int64_t v = 0; v < V; ++v) ar[v] = pr::masked_logit(ar[v], pr::token_allowed(words, v));
    }
    std::memcpy(adjusted_params.ptr<int32_t>() + j * ch::kParams, params.ptr<int32_t>() + p.row * ch::kParams,
                ch::kParams * sizeof(int32_t));
  }
}

void record_logit_choices(Tensor& params, Tensor& counts, const Tensor& chosen, const Tensor& plan) {
  const int64_t V = counts.dim(1), K = live_rows(plan), width = chosen.dim(1);
  for (int64_t j = 0; j < K; ++j) {
    const PlanRow p = plan_row(plan, j, params.dim(0), counts.dim(0), "record_logit_choices");
    const int32_t id = chosen.ptr<int32_t>()[j * width];
    if (id < 0 || id >= V) continue;  // a row that is not finite: nothing was chosen
    params.ptr<int32_t>()[p.row * ch::kParams + ch::kTarget] = id;
    uint16_t& c = counts.ptr<uint16_t>()[p.table_row * V + id];
    if ((c & pr::kCountMask) < pr::kMaxCount) c = static_cast<uint16_t>(c + 1);
  }
}

void reset_logit_row(Tensor& counts, int row, const Tensor& prompt) {
  const int64_t V = counts.dim(1), n = prompt.dim(0);
  uint16_t* cr = counts.ptr<uint16_t>() + row * V;
  const int32_t* ids = prompt.ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    DI_CHECK(ids[i] >= 0 && ids[i] < V, "reset_logit_row: prompt id ", i, " is ", ids[i], ", outside [0, ", V, ")");
  std::memset(cr, 0, static_cast<size_t>(V) * sizeof(uint16_t));
  for (int64_t i = 0; i < n; ++i) cr[ids[i]] = static_cast<uint16_t>(pr::kInPrompt);
}

}  // namespace detinfer::cpu
