// Seeded sampling: temperature, top-k, top-p and min-p, drawn by Gumbel-max with noise that is a
// pure function of (seed, position, token id). There is no generator state shared between
// sequences or steps, so a sampled token depends only on its sequence's seed, its position and its
// logits row: whatever else shares the batch, the same seed gives the same completion.
//
//   token = argmax over kept v of  logits[v] / temperature + gumbel(hash(seed, position, v))
//
// which draws v with probability softmax(logits / temperature) restricted to the kept set. The
// kept set is a prefix of the tokens sorted by logit (descending, lowest id first on ties): the
// top-k, then the shortest prefix of those whose probability reaches top-p, then the tokens whose
// probability is at least min-p times the most likely one's. The draw runs on the device, in the
// output head's chooseTokens op; csrc/common/token_choice.h gives its exact arithmetic (float32
// logits and noise, probability mass in 2^-40 fixed point so the top-p prefix is exact).

/**
 * OpenAI's frequency_penalty, presence_penalty and logit_bias, and vLLM's repetition_penalty, for
 * one completion, applied to its logits before every choice (csrc/common/logit_processors.h has
 * the arithmetic): for a token of the prompt or chosen before, `x = x > 0 ? x / r : x * r` when
 * the repetition penalty r is not 1; then `y = c > 0 ? (x - frequencyPenalty * c) -
 * presencePenalty : x`, then `y + bias` for a token logitBias names, c the times the token was
 * chosen so far in this completion. Values as they reach the device: float32.
 */
export interface LogitProcessors {
  frequencyPenalty: number
  presencePenalty: number
  /** 1: none. */
  repetitionPenalty: number
  /** [token id, bias] pairs: ids distinct, biases not 0, at most MAX_LOGIT_BIAS pairs. */
  logitBias: readonly (readonly [number, number])[]
}

/** Tokens logitBias may name per completion (csrc/common/logit_processors.h's kMaxBias). */
export const MAX_LOGIT_BIAS = 300

/** A row's logit processors: its sequence's row of the model's processor table. */
export interface RowProcessors {
  /** The sequence's row of the processor table, its own while it runs (distinct within a step). */
  row: number
  /** The sequence's first choice: it takes the row now (its counts start from 0, its settings are loaded). */
  first: boolean
  settings: LogitProcessors
  /** On the first choice with a repetition penalty: the prompt's ids, which it penalizes too. */
  prompt?: readonly number[]
  /**
   * The allowed next tokens of a constrained completion (grammar), i32 words, bit v & 31 of word
   * v >> 5: ceil(vocab / 32) words, at least one token below the vocabulary allowed. Given on every
   * choice of such a completion, absent otherwise. The others' logits are -Infinity for the choice,
   * after the penalties and biases (a bias cannot revive them); the allowed ones' are unchanged.
   */
  mask?: Int32Array
}

/** What to do with one logits row. */
export interface TokenChoice {
  /** 0: greedy (argmax, lowest id on ties). */
  temperature: number
  /** 0: no limit. */
  topK: number
  /** 1: no limit. */
  topP: number
  /** 0: no limit. */
  minP: number
  /** uint32 seed of the sampling noise. */
  seed: number
  /** Position of the token being chosen (the noise is keyed by seed, position and token id). */
  position: number
  /** -1: choose a token; otherwise the id whose log-prob is wanted (scoring). */
  target: number
  /** Most likely tokens to report for this row (0 to the launch's topN; absent: 0). */
  topLogprobs?: number
  /**
   * Penalties and biases of the row's completion (absent: none). The token is chosen from the
   * processed logits; the log-probs the row reports stay those of the raw logits (the chosen
   * token's is the one scoring it gives).
   */
  processors?: RowProcessors
}

/** One of the most likely tokens at a position, with its log-prob. */
export interface TopLogprob {
  token: number
  logprob: number
}

/** One step's choices, row by row. */
export interface StepTokens {
  /** Chosen (or target) id per row; -1 where the row's logits were not finite. */
  ids: Int32Array
  /** log-softmax of the raw logits at the id (NaN where not finite). */
  logprobs: Float32Array
  /** Top entries per row (the launch's width; a row that asked for fewer has id -1 in the rest). */
  topN: number
  /** [rows * topN], most likely first, lowest id first on ties. */
  topIds: Int32Array
  topLogprobs: Float32Array
}

export interface SamplingParams {
  temperature: number // > 0
  topK: number // 0: no limit
  topP: number // in (0, 1]; 1: no limit
  minP?: number // in [0, 1]; 0 or absent: no limit
  seed: number // uint32
}

/**
 * The output head's parameters for the token at `position` (greedy when `sampling` is null), with
 * `topLogprobs` most likely tokens to report and the completion's logit processors, if any. Every
 * choice has the same fields, in the same order.
 */
export function tokenChoice(
  sampling: SamplingParams | null,
  position: number,
  target = -1,
  topLogprobs = 0,
  processors?: RowProcessors,
): TokenChoice {
  if (!sampling || target >= 0) return { temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position, target, topLogprobs, processors }
  const { temperature, topK, topP, seed } = sampling
  return { temperature, topK, topP, minP: sampling.minP ?? 0, seed, position, target: -1, topLogprobs, processors }
}
