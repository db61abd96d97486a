// Logit processors: OpenAI's frequency_penalty, presence_penalty and logit_bias, and vLLM's
// repetition_penalty, applied to a logits row before token choice (common/token_choice.h). Shared by the CPU backend
// (cpu/logit_processors.cc) and the CUDA kernels (kernels/logit_processors.cu), and followed by
// the tests' reference (test/helpers/sampling-reference.ts), so that all three compute one thing.
//
// The one definition. With x the model's logit of token v, c the number of times v was chosen so
// far in this completion (its output tokens only, never the prompt's), f the frequency penalty, p
// the presence penalty, r the repetition penalty and b v's bias (absent for a token logit_bias
// does not name):
//   if r != 1 and v is in the prompt or c > 0:  x = x > 0 ? x / r : x * r
//   c == 0:  y = x
//   c >  0:  y = (x - f * c) - p
//   then, for a token logit_bias names:  y = y + b
// each operation one float32 rounding, in exactly that order (x / r or x * r, then f * c, then the
// subtraction from x, then the subtraction of p, then the addition of b; both backends are built
// without contraction into FMA: -ffp-contract=off and nvcc --fmad=false, and with IEEE division).
// A token's u16 word holds c in its low 15 bits (saturating at 32767) and, in bit 15, whether the
// token is in the prompt: set only for completions with a repetition penalty, when the sequence
// takes its row (reset_logit_row).
// Token choice then runs on y (greedy: argmax y; sampling: temperature, top-k, top-p and min-p on
// y), while the log-probs the row reports are those of the raw logits x: the chosen token's is the
// one scoring it gives (choose_tokens with the token as target), and the top-N are x's.
//
// A processed step, per logits row r that has processors (the plan below lists them):
//   apply_logit_processors   adjusted[j] = y of row r_j; adjusted_params[j] = params[r_j]
//   choose_tokens            the choice on adjusted[j] (rows j >= K skipped)
//   record_logit_choices     params[r_j].target = that id; counts[k_j][id] += 1
//   choose_tokens            on x as for any row: processed rows are scored targets
// Everything stays on the device and in stream order, so a step launched before the previous one
// is read back sees the counts that step left.
#pragma once

#include <cstdint>

#include "token_choice.h"

namespace detinfer::processors {

// Tokens logit_bias may name per completion: detinfer's limit, the room of a settings row.
constexpr int kMaxBias = 300;
// A count saturates here (15 bits of a u16): a completion would need 32,767 of one token to reach it.
constexpr uint32_t kMaxCount = 32767;
// The count's bits of a token's word, and the bit that marks a token of the prompt.
constexpr uint32_t kCountMask = 0x7fff;
constexpr uint32_t kInPrompt = 0x8000;

// One row of the settings table (i32 [table rows, kSettings]; float fields as float32 bits),
// written when a sequence takes the row.
constexpr int kFrequency = 0;  // f32
constexpr int kPresence = 1;   // f32
constexpr int kBiasCount = 2;  // i32, 0 to kMaxBias
constexpr int kRepetition = 3;  // f32, above 0; 1: none
constexpr int kBias = 4;       // kMaxBias pairs (token id, bias as f32 bits), the first kBiasCount used
constexpr int kSettings = kBias + 2 * kMaxBias;

// The plan of a launch (i32 [1 + kPlanFields * J]): plan[0] = K, the rows in use (K <= J), then
// for each j < K: the logits row, the table row and whether the sequence takes the table row now
// (its first token: its counts are read as 0 and zeroed). Table rows of one plan are distinct.
constexpr int kPlanFields = 3;
constexpr int kPlanRow = 0;
constexpr int kPlanTableRow = 1;
constexpr int kPlanFresh = 2;

// y before the bias: the penalties of a token whose word (above) is `word`.
DI_HOST_DEVICE float penalized_logit(float x, uint32_t word, float f, float p, float r) {
  const uint32_t c = word & kCountMask;
  if (word != 0 && r != 1.0f) x = x > 0.0f ? x / r : x * r;
  if (c == 0) return x;
  const float fc = f * static_cast<float>(c);
  const float y = x - fc;
  return y - p;
}

// y of a token logit_bias names.
DI_HOST_DEVICE float biased_logit(float y, float b) { return y + b; }

}  // namespace detinfer::processors
