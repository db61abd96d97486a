// A stand-in forward pass with launch(): a KV "cache" of token ids read back through the block
// table, a next token that is a hash of the whole context, steps whose results come back only when
// the test lets them (so that requests can be cancelled while a step is in flight), optional
// failures, a logit processor table whose rows it records, and grammar masks, which it applies.
// For tests of the scheduler's
// bookkeeping (cache blocks, processor rows, the prefix cache) under steps launched ahead.
import type { ForwardModel, SequenceChunk, StepTokens, TokenChoice } from '../../lib/scheduler.js'
import type { LaunchedStep } from '../../lib/step.js'

function mix(h: number, x: number): number {
  h = Math.imul(h ^ x, 0x9e3779b1)
  h ^= h >>> 15
  h = Math.imul(h, 0x85ebca77)
  return (h ^ (h >>> 13)) >>> 0
}

export interface LaunchRecord {
  chunks: SequenceChunk[]
  choices: TokenChoice[]
  after: boolean
}

export class LaunchingModel implements ForwardModel {
  readonly device = 'cpu' as const
  readonly config: { vocabSize: number; maxPositionEmbeddings: number }
  readonly kvBlockSize: number
  readonly kvBlocks: number
  readonly maxBatchTokens: number
  readonly logitProcessorRows: number
  readonly cache: Int32Array
  readonly launches: LaunchRecord[] = []
  /** Step numbers (1-based, in launch order) whose results reject. */
  readonly failAt = new Set<number>()
  /** When true, results wait for release(); otherwise they come back on the next macrotask. */
  hold = false
  private readonly pending: (() => void)[] = []
  reserved = 0
  readonly rowErrors: string[] = []
  private readonly rowOwners = new Map<number, string>()

  constructor(opts: { kvBlocks: number; kvBlockSize: number; maxBatchTokens?: number; context?: number; vocab?: number; processorRows?: number }) {
    this.kvBlocks = opts.kvBlocks
    this.kvBlockSize = opts.kvBlockSize
    this.maxBatchTokens = opts.maxBatchTokens ?? 64
    this.logitProcessorRows = opts.processorRows ?? 0
    this.config = { vocabSize: opts.vocab ?? 32, maxPositionEmbeddings: opts.context ?? 4096 }
    this.cache = new Int32Array(opts.kvBlocks * opts.kvBlockSize).fill(-1)
  }

  reserveLogitProcessors(): void {
    this.reserved++
  }

  /** Lets the oldest held step's results come back. */
  release(): boolean {
    const next = this.pending.shift()
    next?.()
    return !!next
  }

  get held(): number {
    return this.pending.length
  }

  step(chunks: SequenceChunk[], choices: TokenChoice[], topN: number): Promise<StepTokens> {
    return this.launch(chunks, choices, topN).tokens
  }

  launch(chunks: SequenceChunk[], choices: TokenChoice[], _topN: number, after?: LaunchedStep, afterRows?: readonly number[]): LaunchedStep {
    // As the transformer (checkChunks): a step runs at least one chunk.
    if (chunks.length === 0) throw new TypeError('Expected a non-empty array of sequence chunks for chunks but received []')
    const tokensIn = chunks.reduce((n, c) => n + c.tokens.length, 0)
    if (tokensIn > this.maxBatchTokens) throw new Error(`${tokensIn} tokens exceed maxBatchTokens ${this.maxBatchTokens}`)
    const fed = chunks.map((c, i) => (after ? { ...c, tokens: [(after.chosen as number[])[afterRows?.[i] ?? i]!] } : c))
    this.launches.push({ chunks: fed.map((c) => ({ ...c, tokens: [...c.tokens], blockTable: [...c.blockTable] })), choices, after: !!after })
    const number = this.launches.length
    // Each processor row belongs to the sequence whose first choice took it (a sequence is named by its block table).
    const used = new Set<number>()
    let r = 0
    for (const c of fed) {
      const rows = c.logits === 'none' ? 0 : c.logits === 'last' ? 1 : c.tokens.length
      for (let k = 0; k < rows; k++, r++) {
        const proc = choices[r]?.processors
        if (!proc) continue
        if (used.has(proc.row)) this.rowErrors.push(`step ${number}: row ${proc.row} twice`)
        used.add(proc.row)
        const owner = c.blockTable.join()
        if (proc.first) this.rowOwners.set(proc.row, owner)
        else if (this.rowOwners.get(proc.row) !== owner) this.rowErrors.push(`step ${number}: row ${proc.row} used by another sequence than its owner`)
      }
    }
    const ids: number[] = []
    for (const c of fed) {
      c.tokens.forEach((t, i) => (this.cache[this.slot(c.blockTable, c.startPosition + i)] = t))
      const last = c.startPosition + c.tokens.length - 1
      const positions = c.logits === 'none' ? [] : c.logits === 'last' ? [last] : c.tokens.map((_, i) => c.startPosition + i)
      for (const p of positions) ids.push(this.next(c.blockTable, p))
    }
    // A grammar's mask, as the device applies it: a disallowed id gives way to the next allowed one.
    ids.forEach((id, r) => {
      const mask = choices[r]?.processors?.mask
      if (!mask) return
      const V = this.config.vocabSize
      for (let k = 0; k < V; k++) {
        const v = (id + k) % V
        if ((mask[v >> 5]! >>> (v & 31)) & 1) return void (ids[r] = v)
      }
      throw new Error(`step ${number}: row ${r}'s mask allows no token`)
    })
    if (ids.length !== choices.length) throw new Error(`${choices.length} choices for ${ids.length} rows`)
    const out: StepTokens = {
      ids: Int32Array.from(ids.map((id, r) => (choices[r]!.target >= 0 ? choices[r]!.target : id))),
      logprobs: Float32Array.from(ids, (id) => -id / 8),
      topN: 0,
      topIds: new Int32Array(0),
      topLogprobs: new Float32Array(0),
    }
    const tokens = new Promise<StepTokens>((resolve, reject) => {
      const settle = () => (this.failAt.has(number) ? reject(new Error(`step ${number} failed`)) : resolve(out))
      if (this.hold) this.pending.push(settle)
      else setTimeout(settle, 0)
    })
    tokens.catch(() => {})
    return { tokens, chosen: ids }
  }

  private slot(blockTable: number[], position: number): number {
    const block = blockTable[Math.floor(position / this.kvBlockSize)]
    if (block === undefined) throw new Error(`position ${position} is beyond the block table`)
    return block * this.kvBlockSize + (position % this.kvBlockSize)
  }

  private next(blockTable: number[], position: number): number {
    let h = 0x2468
    for (let p = 0; p <= position; p++) {
      const t = this.cache[this.slot(blockTable, p)]!
      if (t < 0) throw new Error(`cache slot of position ${p} read before it was written`)
      h = mix(h, t + 1)
    }
    return 1 + (h % (this.config.vocabSize - 1)) // never 0
  }
}
