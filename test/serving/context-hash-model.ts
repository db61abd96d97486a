// A stand-in forward pass for testing the scheduler's mechanics (block tables, chunking, admission)
// without weights: a "KV cache" of token ids, and logits that are a hash of the whole context read
// back through the block table. A wrong block table, a lost chunk or a position fed twice changes the
// logits, and reading a cache slot nobody wrote throws. Results are exact integers-as-floats, so
// they are equal whatever else is in the batch, as the real kernels' are.
import type { ForwardModel, SequenceChunk, StepTokens, TokenChoice } from '../../lib/scheduler.js'
import { chooseOnLogits } from '../../lib/model/output-head.js'
import type { TextTokenizer } from '../../lib/generate.js'
import type { NativeTensor } from '../../lib/native.js'
import { tensorFrom } from '../../lib/tensor.js'

export const ALPHABET = ' abcdefghijklmnopqrstuvwxyz.,!?'
export const EOS = 0 // ids 1..ALPHABET.length are the characters

function mix(h: number, x: number): number {
  h = Math.imul(h ^ x, 0x9e3779b1)
  h ^= h >>> 15
  h = Math.imul(h, 0x85ebca77)
  return (h ^ (h >>> 13)) >>> 0
}

export class ContextHashModel implements ForwardModel {
  readonly device = 'cpu' as const
  readonly config: { vocabSize: number; maxPositionEmbeddings: number }
  readonly kvBlockSize: number
  readonly kvBlocks: number
  readonly maxBatchTokens: number
  readonly cache: Int32Array
  /** Chunks of every forward call, for tests that look at the packing. */
  readonly steps: SequenceChunk[][] = []
  eosBias = 0
  disposed = false
  /** The positions the model serves, when fewer than config.maxPositionEmbeddings (a small KV cache). */
  maxPositions?: number
  private lastLogits: NativeTensor | null = null

  constructor(opts: { kvBlocks: number; kvBlockSize: number; maxBatchTokens: number; context?: number; vocab?: number }) {
    this.kvBlocks = opts.kvBlocks
    this.kvBlockSize = opts.kvBlockSize
    this.maxBatchTokens = opts.maxBatchTokens
    this.config = { vocabSize: opts.vocab ?? ALPHABET.length + 1, maxPositionEmbeddings: opts.context ?? 4096 }
    this.cache = new Int32Array(opts.kvBlocks * opts.kvBlockSize).fill(-1)
  }

  /** The real output head on the stand-in logits. */
  step(chunks: SequenceChunk[], choices: TokenChoice[], topN: number): Promise<StepTokens> {
    return chooseOnLogits(this.forward(chunks).logits, choices, topN)
  }

  forward(chunks: SequenceChunk[]): { logits: NativeTensor; rowsPerChunk: number[] } {
    if (this.disposed) throw new Error('forward after dispose')
    const tokens = chunks.reduce((n, c) => n + c.tokens.length, 0)
    if (tokens > this.maxBatchTokens) throw new Error(`${tokens} tokens exceed maxBatchTokens ${this.maxBatchTokens}`)
    this.steps.push(chunks.map((c) => ({ ...c, tokens: [...c.tokens], blockTable: [...c.blockTable] })))
    const rows: number[][] = []
    const rowsPerChunk: number[] = []
    for (const c of chunks) {
      c.tokens.forEach((t, i) => (this.cache[this.slot(c.blockTable, c.startPosition + i)] = t))
      const last = c.startPosition + c.tokens.length - 1
      const positions = c.logits === 'none' ? [] : c.logits === 'last' ? [last] : c.tokens.map((_, i) => c.startPosition + i)
      for (const p of positions) rows.push(this.logitsAt(c.blockTable, p))
      rowsPerChunk.push(positions.length)
    }
    this.lastLogits?.dispose()
    const vocab = this.config.vocabSize
    this.lastLogits = tensorFrom('cpu', 'f32', [rows.length, vocab], Float32Array.from(rows.flat()))
    return { logits: this.lastLogits, rowsPerChunk }
  }

  dispose(): void {
    this.disposed = true
    this.lastLogits?.dispose()
  }

  private slot(blockTable: number[], position: number): number {
    const block = blockTable[Math.floor(position / this.kvBlockSize)]
    if (block === undefined) throw new Error(`position ${position} is beyond the block table`)
    return block * this.kvBlockSize + (position % this.kvBlockSize)
  }

  private logitsAt(blockTable: number[], position: number): number[] {
    let h = 0x12345
    for (let p = 0; p <= position; p++) {
      const t = this.cache[this.slot(blockTable, p)]!
      if (t < 0) throw new Error(`cache slot of position ${p} read before it was written`)
      h = mix(h, t + 1)
    }
    return Array.from({ length: this.config.vocabSize }, (_, v) => (mix(h, v) % 1000) / 100 + (v === EOS ? this.eosBias : 0))
  }
}

const decodeChars = (ids: readonly number[]) => ids.map((i) => (i === EOS ? '' : ALPHABET[i - 1] ?? '')).join('')

/** One character per id; id 0 is EOS. */
export const charTokenizer: TextTokenizer = {
  encodePrompt: (text) => [...text].map((c) => ALPHABET.indexOf(c) + 1),
  encodeContinuation: (text) => [...text].map((c) => ALPHABET.indexOf(c) + 1),
  encodeChat: (messages) => [...messages.map((m) => m.content).join('')].map((c) => ALPHABET.indexOf(c) + 1),
  decode: decodeChars,
  streamDecoder: () => ({ push: (id) => decodeChars([id]), flush: () => '' }),
  eosTokenIds: [EOS],
}
