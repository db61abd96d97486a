// Continuous batching. Requests join and leave the running batch between steps. Each step packs
// one token for every decoding sequence plus prefill chunks of admitted prompts, up to the model's
// maxBatchTokens, and hands them to the model's step with one token choice per logits row (greedy,
// seeded sampling or a scored target); the model's output head returns the chosen ids and their
// log-probs (lib/model/output-head.ts). The scheduler only batches and delivers.
//
// The kernels are batch-invariant and prefill/decode-invariant, so a sequence's logits do not depend
// on what else is in the step, how its prompt was chunked or which cache blocks it holds. This file
// must keep it that way: nothing a sequence receives may depend on another sequence (no shared
// random stream, no batch-dependent choice of op).
//
// On CUDA, reading results back is the only wait, and it happens off the JS thread; on the CPU
// backend the ops compute on the JS thread, so a step holds it for the step's time.
import { KvBlockAllocator, PrefixHasher } from './kv-cache.js'
import type { DeviceName } from './native.js'
import { NonFiniteLogitsError, RequestTooLargeError, contextText } from './errors.js'
import { tokenChoice, type LogitProcessors, type SamplingParams, type StepTokens, type TokenChoice, type TopLogprob } from './sampling.js'
import type { LaunchedStep, SequenceChunk } from './step.js'
import type { TokenConstraint } from './grammar.js'

// ---------------------------------------------------------------------------------------------
// The forward pass the scheduler drives (lib/model/transformer.ts implements it)

export type { SequenceChunk, StepTokens, TokenChoice, TokenConstraint, TopLogprob }

/** The part of the Transformer the scheduler drives (tests substitute their own). */
export interface ForwardModel {
  readonly device: DeviceName
  readonly config: { vocabSize: number; maxPositionEmbeddings: number }
  readonly kvBlockSize: number
  readonly kvBlocks: number
  readonly maxBatchTokens: number
  /** Logits rows one forward can return (default maxBatchTokens). */
  readonly maxLogitRows?: number
  /** Longest sequence it runs (default config.maxPositionEmbeddings). */
  readonly maxPositions?: number
  /**
   * Sequences with logit processors (TokenChoice.processors) it can run at once: the rows of its
   * processor table (absent or 0: none; generations with processors are refused).
   */
  readonly logitProcessorRows?: number
  /**
   * Optional: allocates what those sequences need on the device, if not yet allocated; throws when
   * it cannot. Called before admitting a generation with logit processors.
   */
  reserveLogitProcessors?(): void
  /**
   * Runs one step over `chunks` and chooses a token for each logits row they ask for (in chunk
   * order), with the `topN` most likely ids of every row when topN > 0.
   */
  step(chunks: SequenceChunk[], choices: TokenChoice[], topN: number): Promise<StepTokens>
  /**
   * Optional: step() without the wait, and with `after`, a decode step whose tokens are the ids
   * chosen by that earlier launched step (chunk i's, row afterRows[i], default i), taken on the
   * device. A model that has it lets the scheduler enqueue step n + 1 while step n runs.
   */
  launch?(chunks: SequenceChunk[], choices: TokenChoice[], topN: number, after?: LaunchedStep, afterRows?: readonly number[]): LaunchedStep
}

// ---------------------------------------------------------------------------------------------
// Requests

export type FinishReason = 'stop' | 'length' | 'cancelled'

/** The logit processors of a constrained completion that asks for no penalty or bias. */
const NO_PENALTIES: LogitProcessors = { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 1, logitBias: [] }

export interface GenerationRequest {
  kind: 'generate'
  prompt: number[]
  maxTokens: number
  sampling: SamplingParams | null // null: greedy
  /** Most likely alternatives to report per token (0 or absent: none). */
  topLogprobs?: number
  /** Penalties and logit bias, applied on the device before every choice (absent or null: none). */
  processors?: LogitProcessors | null
  /**
   * A grammar the tokens must follow (absent or null: none; lib/grammar.ts). Before each choice
   * the scheduler awaits its mask and hands it to the device with the sequence's logit processors
   * (disallowed tokens get -infinity before the choice); the chosen token, once read back,
   * advances it. The mask depends on the sequence's own tokens only, so the completion is the
   * same alone or in any batch. The scheduler owns it from a successful submit() and disposes of
   * it when the request ends, however it ends. A constrained sequence does not take part in steps
   * launched ahead (its next mask needs the token in flight): it decodes at most every other step
   * while others run, with the same bits.
   */
  constraint?: TokenConstraint | null
  /** Called once per generated token, in order; returning false ends the sequence ('stop'). */
  onToken(token: number, logprob: number, top: TopLogprob[] | null): boolean
}

export interface ScoreRequest {
  kind: 'score'
  tokens: number[]
  /** Index of the first token whose log-prob is wanted (>= 1). */
  from: number
  /** Most likely alternatives to report per scored token (0: none). */
  topLogprobs?: number
}

export interface SequenceTimings {
  queuedMs: number // submitted until admitted to the batch
  prefillMs: number // admitted until the first token (or the scores) came back
  decodeMs: number // first token until the last
  promptTokens: number
  /** Prompt tokens whose KV-cache blocks came from the prefix cache instead of being computed. */
  cachedTokens: number
  completionTokens: number
}

export interface GenerationOutcome {
  finishReason: FinishReason
  timings: SequenceTimings
}

export interface ScoreOutcome {
  logprobs: Float32Array // one per token in tokens[from..]
  /** Per scored token, the most likely ids at its position (null unless asked). */
  top: TopLogprob[][] | null
  timings: SequenceTimings
}

export interface SchedulerLoad {
  running: number
  waiting: number
  /** The most sequences that have run in one step since the start. */
  peakRunning: number
  /** KV-cache blocks held by sequences. */
  usedBlocks: number
  totalBlocks: number
  /** Blocks the prefix cache keeps that no sequence holds (reusable, evictable). */
  cachedBlocks: number
  /** Prompt tokens of admitted requests, and those of them served from the prefix cache, since the start. */
  promptTokens: number
  prefixHitTokens: number
  /** Steps of the running batch read back since the start. */
  steps: number
  /**
   * Milliseconds the batch has waited for grammar masks (structured output) before its steps since
   * the start: host work between a step's tokens and the next step, during which the device has
   * nothing of those sequences to run.
   */
  maskWaitMs: number
}

export interface SchedulerOptions {
  /** Sequences in the running batch at most. */
  maxBatchSize: number
  /** Prompt tokens of one sequence fed in one step at most. */
  prefillChunkSize: number
  /** Keep the KV-cache blocks of token prefixes for later sequences that start the same way (lib/kv-cache.ts). */
  prefixCache?: boolean
  /**
   * Enqueue a decode step before the previous one is read back when the model can take its tokens
   * on the device (ForwardModel.launch), so that the host's work overlaps the device's (default
   * true). False runs the steps one after another; the results are the same bits either way.
   */
  launchAhead?: boolean
}

/** A submitted request: its outcome, and a way to drop it between steps. */
export interface Scheduled<T> {
  readonly done: Promise<T>
  cancel(): void
}

interface Sequence {
  request: GenerationRequest | ScoreRequest
  tokens: number[] // prompt, then generated tokens (generate); the whole text (score)
  promptLength: number
  cached: number // positions already written to the KV cache (or taken from the prefix cache)
  blocks: number[]
  hasher: PrefixHasher // chain hashes of the sequence's full blocks
  registered: number // leading blocks registered with the prefix cache (or taken from it)
  reused: number // positions taken from the prefix cache
  cacheNeed: number // cache positions reserved
  processorRow: number // the sequence's row of the model's processor table while it runs (-1: none)
  constraint: TokenConstraint | null // the request's grammar, disposed of when the sequence ends
  mask: Int32Array | null // the grammar's mask for the sequence's next choice, once computed
  generated: number
  scores: Float32Array | null
  topScores: TopLogprob[][] | null
  cancelled: boolean
  finish: FinishReason | null
  error: unknown // set when the request's own consumer threw
  submittedAt: number
  admittedAt: number
  firstTokenAt: number
  resolve(value: unknown): void
  reject(err: unknown): void
}

/** What the step must do with one logits row. */
interface RowTask {
  seq: Sequence
  position: number // position of the token whose logits these are
  target: number // -1: choose the next token; else the id whose log-prob is wanted
}

interface PackedChunk {
  seq: Sequence
  chunk: SequenceChunk
  rows: RowTask[] // the chunk's logits rows when it asks for any
}

/** A step enqueued on the model and not yet read back. */
interface InFlight {
  packed: PackedChunk[]
  rows: RowTask[]
  launched: LaunchedStep
}

// ---------------------------------------------------------------------------------------------

export class Scheduler {
  readonly maxBatchSize: number
  private readonly launchesAhead: boolean
  readonly prefillChunkSize: number
  private readonly model: ForwardModel
  private readonly allocator: KvBlockAllocator
  private readonly waiting: Sequence[] = []
  private running: Sequence[] = []
  private loop: Promise<void> | null = null
  // The decode step enqueued ahead of the one being read (launchAhead), taken by the next step().
  private ahead: InFlight | null = null
  // Every step launched and not yet settled, read or not: close() waits for them all.
  private readonly unsettled = new Set<Promise<void>>()
  private closedWith: Error | null = null
  private promptTokens = 0
  private prefixHitTokens = 0
  private steps = 0
  private maskWaitMs = 0
  private peakRunning = 0
  // Rows of the model's logit processor table no running sequence holds.
  private readonly freeProcessorRows: number[]
  private processorsReserved = false

  constructor(model: ForwardModel, options: SchedulerOptions) {
    this.model = model
    this.maxBatchSize = Math.min(options.maxBatchSize, model.maxBatchTokens, model.maxLogitRows ?? Infinity)
    const processorRows = Math.min(this.maxBatchSize, model.logitProcessorRows ?? 0)
    this.freeProcessorRows = Array.from({ length: processorRows }, (_, i) => processorRows - 1 - i)
    this.launchesAhead = options.launchAhead ?? true
    this.prefillChunkSize = options.prefillChunkSize
    this.allocator = new KvBlockAllocator(model.kvBlocks, model.kvBlockSize, { prefixCache: options.prefixCache ?? false })
  }

  /** Sequences running and waiting, cache blocks in use, steps and the wait for grammar masks (for tests and monitoring). */
  get load(): SchedulerLoad {
    return {
      running: this.running.length,
      waiting: this.waiting.length,
      peakRunning: this.peakRunning,
      usedBlocks: this.allocator.usedBlocks,
      totalBlocks: this.allocator.totalBlocks,
      cachedBlocks: this.allocator.cachedBlocks,
      promptTokens: this.promptTokens,
      prefixHitTokens: this.prefixHitTokens,
      steps: this.steps,
      maskWaitMs: this.maskWaitMs,
    }
  }

  /**
   * Throws the RequestTooLargeError submit() would throw for a generation of `promptLength` tokens
   * and `maxTokens`, without submitting it: a caller with several requests checks them all first.
   */
  checkGeneration(promptLength: number, maxTokens: number): void {
    this.checkFits(promptLength, maxTokens, generationPositions(promptLength, maxTokens))
  }

  submit(request: GenerationRequest): Scheduled<GenerationOutcome>
  submit(request: ScoreRequest): Scheduled<ScoreOutcome>
  submit(request: GenerationRequest | ScoreRequest): Scheduled<GenerationOutcome | ScoreOutcome> {
    if (this.closedWith) throw this.closedWith
    if (request.kind === 'score' && !(request.from >= 1 && request.from < request.tokens.length))
      throw new RangeError(`Scheduler: a score request needs 1 <= from < ${request.tokens.length} but from is ${request.from}`)
    // Below 1, the positions reserved (generationPositions) miss the prompt's last, which the
    // prefill writes all the same, and a token would be chosen anyway.
    if (request.kind === 'generate' && !(Number.isInteger(request.maxTokens) && request.maxTokens >= 1))
      throw new RangeError(`Scheduler: a generation needs an integer maxTokens >= 1 but maxTokens is ${request.maxTokens}`)
    if (request.kind === 'generate' && (request.processors || request.constraint) && !this.model.logitProcessorRows)
      throw new RangeError('Scheduler: the model has no logit processor rows, so it cannot apply penalties, logit bias or a grammar')
    const tokens = request.kind === 'generate' ? [...request.prompt] : [...request.tokens]
    const promptLength = request.kind === 'generate' ? tokens.length : request.from
    const cacheNeed = request.kind === 'generate' ? generationPositions(tokens.length, request.maxTokens) : tokens.length
    this.checkFits(tokens.length, request.kind === 'generate' ? request.maxTokens : 0, cacheNeed)

    let resolve!: (v: unknown) => void
    let reject!: (e: unknown) => void
    const done = new Promise<GenerationOutcome | ScoreOutcome>((res, rej) => {
      resolve = res as (v: unknown) => void
      reject = rej
    })
    const seq: Sequence = {
      request,
      tokens,
      promptLength,
      cached: 0,
      blocks: [],
      hasher: new PrefixHasher(this.allocator.blockSize),
      registered: 0,
      reused: 0,
      cacheNeed,
      processorRow: -1,
      constraint: request.kind === 'generate' ? (request.constraint ?? null) : null,
      mask: null,
      generated: 0,
      scores: request.kind === 'score' ? new Float32Array(tokens.length - request.from) : null,
      topScores: request.kind === 'score' && (request.topLogprobs ?? 0) > 0 ? [] : null,
      cancelled: false,
      finish: null,
      error: undefined,
      submittedAt: performance.now(),
      admittedAt: 0,
      firstTokenAt: 0,
      resolve,
      reject,
    }
    this.waiting.push(seq)
    this.ensureLoop()
    return { done, cancel: () => void (seq.cancelled = true) }
  }

  /**
   * Fails every waiting and running request with `reason`, refuses new ones, and waits for the steps
   * in flight, a step launched ahead that no one will read included: a caller may free the model
   * once it resolves. Their errors are the requests' (or no one's), not close()'s.
   */
  async close(reason: Error): Promise<void> {
    this.closedWith = reason
    try {
      await this.loop
    } finally {
      await Promise.all(this.unsettled)
    }
  }

  private checkFits(contextTokens: number, maxTokens: number, cacheNeed: number): void {
    const context = this.model.maxPositions ?? this.model.config.maxPositionEmbeddings
    if (contextTokens + maxTokens > context)
      throw new RequestTooLargeError(
        `The prompt (${contextTokens} tokens) plus maxTokens (${maxTokens}) exceeds ${contextText(context, this.model.config.maxPositionEmbeddings)}`,
      )
    const blocks = this.allocator.blocksFor(cacheNeed)
    if (blocks > this.allocator.totalBlocks)
      throw new RequestTooLargeError(
        `The request needs ${blocks} KV-cache blocks (${cacheNeed} positions: the prompt of ${contextTokens} tokens ` +
          `plus maxTokens ${maxTokens}) but the cache holds ${this.allocator.totalBlocks} blocks of ` +
          `${this.allocator.blockSize} positions; load the model with a larger kvCacheTokens or ask for fewer tokens`,
      )
  }

  private ensureLoop(): void {
    if (this.loop) return
    this.loop = this.runLoop().finally(() => {
      this.loop = null
      if (this.waiting.length && !this.closedWith) this.ensureLoop()
    })
  }

  private async runLoop(): Promise<void> {
    // Let requests submitted in the same tick join the first step together.
    await Promise.resolve()
    while (this.running.length || this.waiting.length) {
      if (this.closedWith) return this.failAll(this.closedWith)
      this.dropCancelled()
      this.admit()
      if (!this.running.length) {
        // Only reachable if cache blocks leaked: with nothing running, any admissible request fits.
        if (this.waiting.length) this.failAll(new Error('Scheduler: no request can be admitted although none is running'))
        continue
      }
      try {
        await this.prepareMasks()
        // The grammars that failed may have ended every running sequence: a step needs one.
        if (!this.running.length) continue
        await this.step()
      } catch (err) {
        // A step that fails (a device error, say) leaves the model's state in doubt: every request
        // running or waiting fails with it.
        this.failAll(err)
        return
      }
    }
    // A step launched ahead for sequences that have all ended since: no one reads it, and the next
    // request must not start behind it (its rejection is already handled, launch()).
    this.ahead = null
  }

  // The grammar masks of the running constrained sequences that lack one (a new sequence, or one
  // whose last token was just read back). All are asked for at once, then awaited together: masks
  // of constraints held by grammar worker threads are computed in parallel, with those of this
  // thread computed meanwhile. A grammar that fails ends its own request only.
  private async prepareMasks(): Promise<void> {
    const wanting = this.running.filter((seq) => seq.constraint && !seq.mask && !seq.finish)
    if (!wanting.length) return this.retireFinished()
    const started = performance.now()
    // Through an async function: a mask() that throws at once is a rejection too.
    const masks = await Promise.allSettled(wanting.map(async (seq) => seq.constraint!.mask()))
    this.maskWaitMs += performance.now() - started
    for (const [i, seq] of wanting.entries()) {
      const r = masks[i]!
      if (r.status === 'fulfilled') seq.mask = r.value
      else {
        seq.finish = 'cancelled'
        seq.error = r.reason
      }
    }
    this.retireFinished()
  }

  private failAll(err: unknown): void {
    this.ahead = null
    for (const seq of [...this.running, ...this.waiting]) {
      this.allocator.release(seq.blocks)
      seq.blocks = []
      this.releaseProcessorRow(seq)
      this.releaseConstraint(seq)
      seq.reject(err)
    }
    this.running = []
    this.waiting.length = 0
    this.allocator.dropCached()
  }

  private dropCancelled(): void {
    for (const seq of this.running) if (seq.cancelled) seq.finish = 'cancelled'
    this.retireFinished()
    for (let i = this.waiting.length - 1; i >= 0; i--) {
      const seq = this.waiting[i]!
      if (!seq.cancelled) continue
      this.waiting.splice(i, 1)
      seq.finish = 'cancelled'
      this.releaseConstraint(seq)
      seq.resolve(this.outcome(seq))
    }
  }

  // First come, first served: a request that does not fit yet waits, and so do the ones behind it.
  // Leading blocks of the prompt found in the prefix cache are taken instead of computed (a request
  // whose next such block a running sequence is still computing waits until it is cached), except
  // that the last prompt token is always computed (its logits row is the first choice, or the first
  // score): at most floor((promptLength - 1) / blockSize) blocks are reused. A generation with
  // logit processors also takes a row of the model's processor table (there is one per place in
  // the batch unless the model has fewer).
  private admit(): void {
    while (this.waiting.length && this.running.length < this.maxBatchSize) {
      const seq = this.waiting[0]!
      const needsRow = seq.request.kind === 'generate' && (!!seq.request.processors || !!seq.constraint)
      if (needsRow && this.freeProcessorRows.length === 0) return
      if (needsRow && !this.processorsReserved) {
        // The table is allocated at its first use; when that fails, this request alone is refused.
        try {
          this.model.reserveLogitProcessors?.()
          this.processorsReserved = true
        } catch (err) {
          this.waiting.shift()
          this.releaseConstraint(seq)
          seq.reject(err)
          continue
        }
      }
      const reusable = Math.floor((seq.promptLength - 1) / this.allocator.blockSize)
      const hashes = this.allocator.prefixCache ? seq.hasher.extend(seq.tokens, reusable) : []
      const reused = this.allocator.acquirePrefix(hashes)
      if (reused.length < hashes.length && this.computingPromptBlock(reused.length, hashes[reused.length]!)) {
        // The next block it could reuse is being computed by a running sequence that starts the
        // same way (requests that came together, the choices of n > 1): it waits for that block
        // rather than compute it again.
        this.allocator.release(reused)
        return
      }
      const fresh = this.allocator.allocate(this.allocator.blocksFor(seq.cacheNeed) - reused.length)
      if (!fresh) {
        this.allocator.release(reused)
        return
      }
      this.waiting.shift()
      if (needsRow) seq.processorRow = this.freeProcessorRows.pop()!
      seq.blocks = [...reused, ...fresh]
      seq.registered = reused.length
      seq.cached = seq.reused = reused.length * this.allocator.blockSize
      this.promptTokens += seq.promptLength
      this.prefixHitTokens += seq.reused
      seq.admittedAt = performance.now()
      this.running.push(seq)
    }
  }

  /** Whether a running sequence is writing block `index` of its prompt, whose chain hash is `hash`, and has not registered it yet. */
  private computingPromptBlock(index: number, hash: string): boolean {
    for (const seq of this.running) {
      // The positions its prefill certainly writes: the prompt (generate), all but the last token (score).
      const written = seq.request.kind === 'generate' ? seq.promptLength : seq.tokens.length - 1
      const blocks = Math.floor(written / this.allocator.blockSize)
      if (index < seq.registered || index >= blocks) continue
      if (seq.hasher.extend(seq.tokens, blocks)[index] === hash) return true
    }
    return false
  }

  /** Registers the sequence's blocks that are now fully written with the prefix cache. */
  private registerFullBlocks(seq: Sequence): void {
    if (!this.allocator.prefixCache) return
    const full = Math.floor(seq.cached / this.allocator.blockSize)
    if (full <= seq.registered) return
    const hashes = seq.hasher.extend(seq.tokens, full)
    for (; seq.registered < full; seq.registered++) this.allocator.register(seq.blocks[seq.registered]!, hashes[seq.registered]!)
  }

  // ---------------------------------------------------------------------------------------------
  // One step: pack, forward, choose tokens, deliver.

  // The next decode step of the sequences that certainly go on is enqueued before this step is
  // read back (the model takes its tokens on the device): the host's work overlaps the device's. A
  // sequence that stops at this step because of its token leaves one wasted row in the next one,
  // whose result is dropped; its cache write lands past its last position, in a block no prefix
  // entry covers.
  private async step(): Promise<void> {
    const current = this.ahead ?? this.launch(this.pack())
    this.ahead = null
    const next = this.continuing(current)
    if (next) this.ahead = this.tryLaunchAhead(current, next)
    const out = await current.launched.tokens
    this.steps++
    if (out.ids.length !== current.rows.length)
      throw new Error(`Scheduler: the model chose ${out.ids.length} tokens but ${current.rows.length} logits rows were asked for`)
    for (const p of current.packed) {
      if (p.seq.finish) continue // retired while this step was in flight
      p.seq.cached += p.chunk.tokens.length
      this.registerFullBlocks(p.seq)
    }
    current.rows.forEach((row, r) => this.deliver(row, out, r))
    this.retireFinished()
  }

  private launch(packed: PackedChunk[], after?: InFlight, afterRows?: number[]): InFlight {
    // The sequences this step runs (a running one whose prompt waits for a share of the tokens is not among them).
    this.peakRunning = Math.max(this.peakRunning, packed.length)
    const rows = packed.flatMap((p) => (p.chunk.logits === 'none' ? [] : p.rows))
    const choices = rows.map((row) => this.choiceFor(row))
    const topN = rows.reduce((n, row) => Math.max(n, topLogprobsOf(row.seq.request)), 0)
    const chunks = packed.map((p) => p.chunk)
    const launched = after
      ? this.model.launch!(chunks, choices, topN, after.launched, afterRows)
      : this.model.launch
        ? this.model.launch(chunks, choices, topN)
        : { tokens: this.model.step(chunks, choices, topN), chosen: null }
    // Awaited later (or never, if an earlier step fails first): no unhandled rejection meanwhile.
    const settled: Promise<void> = launched.tokens.then(
      () => void this.unsettled.delete(settled),
      () => void this.unsettled.delete(settled),
    )
    this.unsettled.add(settled)
    return { packed, rows, launched }
  }

  // The step after `current`, when it is known before current's results: current is a decode step
  // of every running sequence, and the next step decodes those that will still be running after it
  // (they have tokens left whatever they choose). Null when none will, or when a sequence ends at
  // current (maxTokens) while a request waits: what it frees may admit that request, which goes
  // first. A request still waiting otherwise was just refused by admit() (no place, blocks or
  // processor row), and nothing frees one before current is read back.
  private continuing(current: InFlight): PackedChunk[] | null {
    if (!this.launchesAhead || !this.model.launch) return null
    const inCurrent = new Set(current.packed.map((p) => p.seq))
    if (!this.running.every((seq) => inCurrent.has(seq))) return null
    const next: PackedChunk[] = []
    let freed = false
    for (const p of current.packed) {
      if (p.chunk.tokens.length !== 1 || p.chunk.logits !== 'last' || p.seq.request.kind !== 'generate') return null
      if (p.seq.finish || p.seq.cancelled || p.seq.generated + 1 >= p.seq.request.maxTokens) freed = true
      // A constrained sequence's next mask needs the token of current: it waits for a later step.
      else if (!p.seq.constraint) next.push(p)
    }
    return next.length && !(this.waiting.length && freed) ? next : null
  }

  // launchAhead, or null when the launch throws: a backend that computes as it launches (the CPU)
  // refuses a token id of -1, the choice of a non-finite logits row, which only this step's results
  // will reveal. The step is then packed again once they are in, with the same bits (launching
  // ahead never changes them), and the row's request fails with its NonFiniteLogitsError alone. An
  // error that is not about the launched-ahead tokens recurs at that launch and is reported there.
  private tryLaunchAhead(current: InFlight, next: PackedChunk[]): InFlight | null {
    try {
      return this.launchAhead(current, next)
    } catch {
      return null
    }
  }

  // The next decode step of `next` (chunks of current), one position further, each token the one
  // current chooses for its row.
  private launchAhead(current: InFlight, next: PackedChunk[]): InFlight {
    const rowOf = new Map(current.rows.map((row, r) => [row.seq, r]))
    const packed = next.map((p): PackedChunk => {
      const position = p.chunk.startPosition + 1
      return {
        seq: p.seq,
        chunk: { tokens: [0], startPosition: position, blockTable: p.seq.blocks, logits: 'last' },
        rows: [{ seq: p.seq, position, target: -1 }],
      }
    })
    const afterRows = next.map((p) => rowOf.get(p.seq)!)
    return this.launch(packed, current, afterRows.every((r, i) => r === i) && afterRows.length === current.rows.length ? undefined : afterRows)
  }

  private choiceFor(row: RowTask): TokenChoice {
    const seq = row.seq
    const request = seq.request
    const topLogprobs = topLogprobsOf(request)
    // The noise of a sampled token is keyed by the position it will take.
    if (request.kind !== 'generate') return tokenChoice(null, row.position + 1, row.target, topLogprobs)
    // The row that chooses the first token (the prompt's last) takes the table row: that step
    // zeroes its counts on the device, after every step enqueued before it.
    const first = row.position + 1 === seq.promptLength
    const settings = request.processors ?? (seq.constraint ? NO_PENALTIES : null)
    if (seq.constraint && !seq.mask) throw new Error('Scheduler: a constrained sequence was packed before its grammar mask was ready')
    const processors =
      settings && seq.processorRow >= 0
        ? {
            row: seq.processorRow,
            first,
            settings,
            // A repetition penalty penalizes the prompt's tokens too: they are marked when the row is
            // taken. The sequence's copy, not the caller's array, which may have changed since submit().
            ...(first && settings.repetitionPenalty !== 1 && { prompt: seq.tokens.slice(0, seq.promptLength) }),
            ...(seq.mask && { mask: seq.mask }),
          }
        : undefined
    return tokenChoice(request.sampling, row.position + 1, -1, topLogprobs, processors)
  }

  /** Decodes first (one token each), then prompt chunks, within maxBatchTokens and maxLogitRows. */
  private pack(): PackedChunk[] {
    const packed: PackedChunk[] = []
    let tokenBudget = this.model.maxBatchTokens
    let rowBudget = this.model.maxLogitRows ?? this.model.maxBatchTokens
    const decoding: Sequence[] = []
    const prefilling: Sequence[] = []
    for (const s of this.running) (s.tokens.length - s.cached === 1 && s.request.kind === 'generate' ? decoding : prefilling).push(s)
    for (const seq of [...decoding, ...prefilling]) {
      if (tokenBudget === 0) break
      let p = this.chunkFor(seq, Math.min(seq.tokens.length - seq.cached, tokenBudget, this.prefillChunkSize))
      // A scored chunk returns a logits row per token: shorten it to the rows left.
      if (p.chunk.logits === 'all' && p.rows.length > rowBudget && rowBudget > 0) p = this.chunkFor(seq, rowBudget)
      const rows = p.chunk.logits === 'none' ? 0 : p.rows.length
      if (rows > rowBudget) continue
      const n = p.chunk.tokens.length
      tokenBudget -= n
      rowBudget -= rows
      packed.push(p)
    }
    return packed
  }

  private chunkFor(seq: Sequence, n: number): PackedChunk {
    const start = seq.cached
    const tokens = seq.tokens.slice(start, start + n)
    let logits: SequenceChunk['logits'] = 'none'
    let rows: RowTask[]
    if (seq.request.kind === 'generate') {
      if (start + n === seq.tokens.length) logits = 'last'
      rows = [{ seq, position: start + n - 1, target: -1 }]
    } else {
      // Rows at positions from-1 .. length-2 predict the scored tokens.
      if (start + n > seq.request.from - 1 && start < seq.tokens.length - 1) logits = 'all'
      rows = tokens.map((_, i) => ({ seq, position: start + i, target: seq.tokens[start + i + 1] ?? 0 }))
    }
    return { seq, chunk: { tokens, startPosition: start, blockTable: seq.blocks, logits }, rows }
  }

  private deliver(row: RowTask, out: StepTokens, r: number): void {
    const seq = row.seq
    if (seq.finish || seq.cancelled) return
    const id = out.ids[r]!
    const logprob = out.logprobs[r]!
    if (id < 0) {
      // A non-finite logits row fails its own request only.
      seq.finish = 'cancelled'
      seq.error = new NonFiniteLogitsError(row.position)
      return
    }
    const wanted = topLogprobsOf(seq.request)
    const top = wanted > 0 ? topOf(out, r, wanted) : null
    if (seq.request.kind === 'score') {
      const index = row.position + 1 - seq.request.from
      if (index >= 0 && index < seq.scores!.length) {
        seq.scores![index] = logprob
        if (top) seq.topScores![index] = top
      }
      if (row.position + 1 === seq.tokens.length - 1) {
        seq.firstTokenAt = performance.now()
        seq.finish = 'stop'
      }
      return
    }
    if (seq.constraint) {
      try {
        seq.constraint.accept(id)
      } catch (err) {
        // Not reachable while the device applies the mask; if it were, only this request fails.
        seq.finish = 'cancelled'
        seq.error = err
        return
      }
      seq.mask = null
    }
    seq.tokens.push(id)
    seq.generated++
    if (seq.generated === 1) seq.firstTokenAt = performance.now()
    let more: boolean
    try {
      more = seq.request.onToken(id, logprob, top)
    } catch (err) {
      // A throwing consumer ends its own request only.
      seq.finish = 'cancelled'
      seq.error = err
      return
    }
    if (!more) seq.finish = 'stop'
    else if (seq.generated >= seq.request.maxTokens) seq.finish = 'length'
  }

  private retireFinished(): void {
    const still: Sequence[] = []
    for (const seq of this.running) {
      if (!seq.finish) {
        still.push(seq)
        continue
      }
      this.allocator.release(seq.blocks)
      seq.blocks = []
      // The row may still be in a step launched ahead (a wasted row): the next sequence to take it
      // zeroes it in a later step, after that one on the device.
      this.releaseProcessorRow(seq)
      this.releaseConstraint(seq)
      if (seq.error !== undefined) seq.reject(seq.error)
      else seq.resolve(this.outcome(seq))
    }
    this.running = still
  }

  private releaseConstraint(seq: Sequence): void {
    seq.constraint?.dispose()
    seq.constraint = null
    seq.mask = null
  }

  private releaseProcessorRow(seq: Sequence): void {
    if (seq.processorRow < 0) return
    this.freeProcessorRows.push(seq.processorRow)
    seq.processorRow = -1
  }

  private outcome(seq: Sequence): GenerationOutcome | ScoreOutcome {
    const now = performance.now()
    const admitted = seq.admittedAt || now
    const first = seq.firstTokenAt || now
    const timings: SequenceTimings = {
      queuedMs: admitted - seq.submittedAt,
      prefillMs: first - admitted,
      decodeMs: now - first,
      promptTokens: seq.promptLength,
      cachedTokens: seq.reused,
      completionTokens: seq.generated,
    }
    if (seq.request.kind === 'score') return { logprobs: seq.scores!, top: seq.topScores, timings }
    return { finishReason: seq.finish ?? 'cancelled', timings }
  }
}

/** The cache positions a generation writes: it never feeds its last token back. */
function generationPositions(promptLength: number, maxTokens: number): number {
  return promptLength + maxTokens - 1
}

function topLogprobsOf(request: GenerationRequest | ScoreRequest): number {
  return request.topLogprobs ?? 0
}

function topOf(out: StepTokens, r: number, wanted: number): TopLogprob[] {
  const top: TopLogprob[] = []
  for (let i = 0; i < Math.min(wanted, out.topN); i++) {
    const token = out.topIds[r * out.topN + i]!
    if (token >= 0) top.push({ token, logprob: out.topLogprobs[r * out.topN + i]! })
  }
  return top
}
