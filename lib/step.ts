// The step contract between the scheduler and the forward pass: what one step asks of the model
// for one sequence. The scheduler builds these and the model (lib/model/) runs them; neither side
// imports the other. The token choices of a step and the tokens it returns are in sampling.ts.
import type { StepTokens } from './sampling.js'

/**
 * The largest vocabulary detinfer loads, far above any released model's, so that a corrupt
 * vocab_size or token id fails at loading instead of sizing an allocation.
 */
export const MAX_VOCAB_SIZE = 1 << 24

export interface SequenceChunk {
  /** This step's new tokens of one sequence (a prefill chunk, or 1 decode token). */
  tokens: number[]
  /** Position of tokens[0]; positions before it are already in the KV cache. */
  startPosition: number
  /** Physical KV block ids covering positions 0 .. startPosition+tokens.length-1. */
  blockTable: number[]
  logits: 'none' | 'last' | 'all'
}

/**
 * A step the model has enqueued but not yet read back: its chosen tokens (`tokens`), and where those
 * ids lie on the device (`chosen`, opaque outside the model). A decode step launched `after` it takes
 * them as its input tokens on the device, so the host can prepare and enqueue that step before this
 * one's results have come back.
 */
export interface LaunchedStep {
  readonly tokens: Promise<StepTokens>
  readonly chosen: unknown
}
