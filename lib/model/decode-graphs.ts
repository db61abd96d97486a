// Decode steps replayed as CUDA graphs. A step in which every sequence decodes one token is padded
// up to a bucket of rows (1, 2, 4, 8, 16, 24, 32, 48, 64, ...) and of attention context (256, 512,
// ... keys, up to the model's maxPositions), and each (rows, context) bucket is captured once: the
// forward pass and the output head's token choice, over views of buffers allocated at load. A
// replay is one native call; the step's inputs and token-choice parameters reach the device by
// asynchronous copies before it, and only the chosen ids and log-probs come back after it.
//
// Padding rows carry slot -1 and attend to one key; every op is batch-invariant, so they cannot
// change a real row's bits. A bucket runs eagerly the first time it is seen (which also sets up
// every kernel's one-time state), is captured the second time, and is replayed from then on.
// Every buffer a capture points into stays where it is as long as the model lives: the model's
// own (decode attention's split partials go to the model's workspace, allocated at load for the
// largest bucket, maxDecodeRows sequences at maxPositions, which the attention op refuses to
// outgrow while capturing), or the token choice's workspace, which the process keeps and never
// frees (csrc/kernels/sampling.cu).
//
// Logit processors (penalties, logit bias, token masks: lib/model/logit-processors.ts) add kernels before the
// token choice. A bucket has two captures: the plain one, with no processor kernel at all, which
// every step whose rows use none replays (so such requests pay nothing for the feature), and one
// with the processor kernels, replayed by the steps that have at least one such row. The latter's
// kernels run over min(rows, table rows) plan rows and return at once past the step's K rows
// that use processors (K read on the device from the plan uploaded before the replay), so one
// capture serves any mix of rows with and without processors; a row without them never reaches
// a processor kernel. Each capture follows the same rule: eager the first time, captured the
// second. (One graph with per-row early exits would make every plain step pay the processor
// kernels' launches; a graph per K would multiply the captures.)
import { variantKernels } from '../device.js'
import { native, type NativeGraph, type NativeTensor } from '../native.js'
import type { StepTokens, TokenChoice } from '../sampling.js'
import { usesProcessors } from './logit-processors.js'
import { MAX_TOP_LOGPROBS, type ChosenIds, type OutputHead } from './output-head.js'
import { layoutDecode, type SequenceChunk, type StepInputs, type StepViews } from './step-layout.js'

/** Decode batch sizes that get a graph; a step is padded up to the next one. */
export const BATCH_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
/** The smallest attention context bucket; the others double up to maxPositions. */
export const MIN_CONTEXT_BUCKET = 256

/** What the graphs need from the model they belong to. */
export interface GraphHost {
  readonly inputs: StepInputs
  readonly head: OutputHead
  readonly kvBlockSize: number
  /** Enqueues the forward pass over `views`; returns the logits view f32 [R, V]. */
  enqueueForward(views: StepViews): NativeTensor
}

export interface CapturedGraph {
  rows: number
  context: number
  /** The capture with the logit processors' kernels (steps with a row that uses them). */
  processors: boolean
  /** GPU memory the captured graph took when it was instantiated. */
  bytes: number
}

export interface GraphStats {
  batchBuckets: number[]
  contextBuckets: number[]
  captured: CapturedGraph[]
  bytes: number
}

/** One capture of a bucket: plain, or with the logit processors' kernels. */
interface Capture {
  seen: boolean
  graph: NativeGraph | null
}

interface Bucket {
  rows: number
  context: number
  views: StepViews
  params: NativeTensor // i32 [rows, 8]
  out: NativeTensor // i32 [rows, 2 + 2 * MAX_TOP_LOGPROBS]
  plain: Capture
  processed: Capture
}

/** Batch buckets up to `max` (and `max` itself). */
export function batchBuckets(max: number): number[] {
  const list = BATCH_BUCKETS.filter((b) => b < max)
  return [...list, max]
}

/** Context buckets: 256, 512, ... up to maxPositions (itself the last). */
export function contextBuckets(maxPositions: number): number[] {
  const list: number[] = []
  for (let c = MIN_CONTEXT_BUCKET; c < maxPositions; c *= 2) list.push(c)
  return [...list, maxPositions]
}

export class DecodeGraphs {
  readonly batchBuckets: number[]
  readonly contextBuckets: number[]
  private readonly buckets = new Map<string, Bucket>()

  /** capture false: the padded buckets run eagerly every time (the CPU, and tests of the padding). */
  constructor(
    private readonly host: GraphHost,
    maxRows: number,
    maxPositions: number,
    private readonly capture: boolean,
  ) {
    this.batchBuckets = batchBuckets(maxRows)
    this.contextBuckets = contextBuckets(maxPositions)
  }

  /**
   * Whether this step is a decode step the buckets hold. Under the variant kernels nothing is
   * captured (their split workspaces are allocated per launch), but the padding still applies.
   */
  accepts(chunks: SequenceChunk[]): boolean {
    if (chunks.length > this.batchBuckets[this.batchBuckets.length - 1]! || (this.capture && variantKernels())) return false
    return chunks.every((c) => c.tokens.length === 1 && c.logits === 'last')
  }

  /**
   * Enqueues the step and the read-back of its results and returns at once. With `after`, row r's
   * token is the id chosen for row afterRows[r] (default r) of that earlier step, taken on the
   * device (the chunks' tokens are not read).
   */
  launch(
    chunks: SequenceChunk[],
    choices: TokenChoice[],
    after?: ChosenIds,
    afterRows?: readonly number[],
  ): { tokens: Promise<StepTokens>; chosen: ChosenIds } {
    const maxSeqLen = chunks.reduce((m, c) => Math.max(m, c.startPosition + 1), 0)
    const rows = this.batchBuckets.find((b) => b >= chunks.length)!
    const context = this.contextBuckets.find((c) => c >= maxSeqLen)!
    const bucket = this.bucket(rows, context)
    const processed = usesProcessors(choices)
    const capture = processed ? bucket.processed : bucket.plain
    if (this.capture && capture.seen && !capture.graph) this.captureBucket(bucket, processed)
    this.fill(bucket, chunks, choices, processed)
    if (after) this.host.head.takeIds(bucket.views.ids, after, afterRows)
    if (capture.graph) capture.graph.replay()
    else this.enqueue(bucket, processed)
    capture.seen = true
    const tokens = this.host.head.read(bucket.out, chunks.length, MAX_TOP_LOGPROBS)
    return { tokens, chosen: { out: bucket.out, rows: chunks.length, width: 2 + 2 * MAX_TOP_LOGPROBS } }
  }

  stats(): GraphStats {
    const captured = [...this.buckets.values()].flatMap((b) =>
      [b.plain, b.processed].flatMap((c) => (c.graph ? [{ rows: b.rows, context: b.context, processors: c === b.processed, bytes: c.graph.bytes }] : [])),
    )
    return {
      batchBuckets: this.batchBuckets,
      contextBuckets: this.contextBuckets,
      captured,
      bytes: captured.reduce((s, c) => s + c.bytes, 0),
    }
  }

  dispose(): void {
    for (const b of this.buckets.values()) {
      b.plain.graph?.dispose()
      b.processed.graph?.dispose()
    }
    this.buckets.clear()
  }

  private bucket(rows: number, context: number): Bucket {
    const key = `${rows}/${context}`
    let b = this.buckets.get(key)
    if (!b) {
      const maxBlocks = Math.ceil(context / this.host.kvBlockSize)
      const views = this.host.inputs.views({ tokens: rows, logitRows: rows, sequences: rows, maxBlocks, maxQueryLen: 1, maxSeqLen: context })
      const [params, out] = this.host.head.views(rows, MAX_TOP_LOGPROBS)
      b = { rows, context, views, params, out, plain: { seen: false, graph: null }, processed: { seen: false, graph: null } }
      this.buckets.set(key, b)
    }
    return b
  }

  // Copies a step's inputs and token-choice parameters, padded to the bucket, to the device; with
  // processors, the plan of the rows that use them (padding rows use none).
  private fill(b: Bucket, chunks: SequenceChunk[], choices: TokenChoice[], processed: boolean): void {
    const maxBlocks = b.views.batch.blockTables.shape[1]!
    this.host.inputs.upload(layoutDecode(chunks, b.rows, maxBlocks, b.context, this.host.kvBlockSize).packed)
    this.host.head.uploadParams(b.params, padChoices(choices, b.rows))
    if (processed) this.host.head.processorTable().prepare(choices)
  }

  private enqueue(b: Bucket, processed: boolean): void {
    const logits = this.host.enqueueForward(b.views)
    if (processed) {
      const table = this.host.head.processorTable()
      table.enqueue(logits, b.params, Math.min(b.rows, table.rows))
    }
    this.host.head.enqueue(logits, b.params, b.out)
  }

  private captureBucket(b: Bucket, processed: boolean): void {
    const n = native()
    n.graphBegin()
    try {
      this.enqueue(b, processed)
    } catch (err) {
      n.graphAbort()
      throw err
    }
    try {
      const graph = n.graphEnd()
      if (processed) b.processed.graph = graph
      else b.plain.graph = graph
    } catch (err) {
      n.graphAbort()
      throw err
    }
  }
}

const GREEDY: TokenChoice = { temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: 0, target: -1 }

function padChoices(choices: TokenChoice[], rows: number): TokenChoice[] {
  return choices.length === rows ? choices : [...choices, ...new Array<TokenChoice>(rows - choices.length).fill(GREEDY)]
}
