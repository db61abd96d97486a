// Logit processors: OpenAI's frequency_penalty, presence_penalty and logit_bias, vLLM's
// repetition_penalty, and a token mask (the allowed next tokens of a constrained completion, such
// as one that follows a grammar or a JSON schema), applied to a logits row before token choice
// (common/token_choice.h). Shared by the CPU backend (cpu/logit_processors.cc) and the CUDA
// kernels (kernels/logit_processors.cu), and followed by the tests' reference
// (test/helpers/sampling-reference.ts), so that all three compute one thing.
//
// The one definition. With x the model's logit of token v, c the number of times v was chosen so
// far in this completion (its output tokens only, never the prompt's), f the frequency penalty, p
// the presence penalty, r the repetition penalty and b v's bias (absent for a token logit_bias
// does not name):
//   if r != 1 and v is in the prompt or c > 0:  x = x > 0 ? x / r : x * r
//   c == 0:  y = x
//   c >  0:  y = (x - f * c) - p
//   then, for a token logit_bias names:  y = y + b
//   then, on a masked row, for a token the mask does not allow:  y = -infinity
// each operation one float32 rounding, in exactly that order (x / r or x * r, then f * c, then the
// subtraction from x, then the subtraction of p, then the addition of b; both backends are built
// without contraction into FMA: -ffp-contract=off and nvcc --fmad=false, and with IEEE division).
// A token's u16 word holds c in its low 15 bits (saturating at 32767) and, in bit 15, whether the
// token is in the prompt: set only for completions with a repetition penalty, when the sequence
// takes its row (reset_logit_row).
// The mask comes last, after the penalties and the bias, so that a bias cannot revive a token the
// mask forbids; it only replaces y: an allowed token keeps exactly the y above, bit for bit, and a
// row whose plan entry names no mask is computed as if there were no mask table. A masked row's
// mask is the row of the mask table (i32 [table rows, W], W = ceil(V / 32)) that its plan entry
// names: the host writes a step's masks into the table's first rows, in one upload, and numbers
// them in the plan. Token v is allowed when bit v & 31 of word v >> 5 is set (token_allowed below);
// the bits of the last word at v >= V are ignored. The host gives a mask at every step of a
// constrained completion (it changes from step to step) and refuses one that allows no token.
// Token choice then runs on y (greedy: argmax y; sampling: temperature, top-k, top-p and min-p on
// y; a token at -infinity has weight 0 and never wins against a finite y, so a masked row chooses
// an allowed token), while the log-probs the row reports are those of the raw logits x: the chosen
// token's is the one scoring it gives (choose_tokens with the token as target), and the top-N are
// x's (a masked row's top-N may name tokens its mask forbids).
//
// A processed step, per logits row r that has processors (the plan below lists them):
//   apply_logit_processors   adjusted[j] = y of row r_j (masked when its plan entry says so);
//                            adjusted_params[j] = params[r_j]
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
// for each j < K: the logits row, the table row, whether the sequence takes the table row now
// (its first token: its counts are read as 0 and zeroed) and the row of the mask table that holds
// this step's token mask for it (-1: no mask; no mask words are read). Table rows of one plan are
// distinct.
constexpr int kPlanFields = 4;
constexpr int kPlanRow = 0;
constexpr int kPlanTableRow = 1;
constexpr int kPlanFresh = 2;
constexpr int kPlanMask = 3;

// The words of a token mask row (i32 [W]): W = ceil(V / 32).
DI_HOST_DEVICE int64_t mask_words(int64_t V) { return (V + 31) / 32; }

// Whether token v (0 <= v < V) is allowed by the mask row `words`: bit v & 31 of word v >> 5.
DI_HOST_DEVICE bool token_allowed(const int32_t* words, int64_t v) {
  return ((static_cast<uint32_t>(words[v >> 5]) >> (v & 31)) & 1u) != 0;
}

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

// y of a token on a masked row, after the penalties and the bias: unchanged when allowed, else
// -infinity (float32 bits 0xff800000).
DI_HOST_DEVICE float masked_logit(float y, bool allowed) {
  return allowed ? y : choice::as_float(static_cast<int32_t>(0xff800000u));
}

}  // namespace detinfer::processors
