// The transformer forward pass (Llama, Qwen2, Qwen3, Mistral) composed of native ops over a paged
// KV cache. One forward() takes a ragged batch of sequence chunks (prefill chunks and decode
// tokens alike) and enqueues every op; nothing waits for the device.
//
//   embed -> for each layer: [norm] q|k|v = x·Wqkv (+b) -> [q/k head norm] -> rope(q,k)
//            -> write k,v to the cache -> attention -> o_proj -> residual + norm
//            -> gate|up = x·Wgate|up -> silu·mul (one op, fused on CUDA) -> down_proj -> residual + norm
//   -> gather the rows that want logits -> lm_head (f32 logits) -> token choice (output-head.ts)
//
// Every op is batch-invariant (README.md, "The determinism contract"), so a row's logits depend only on its own sequence.
import { resolveDevice } from '../device.js'
import { DisposedError, checkInteger, describeValue } from '../errors.js'
import { native, type AttentionBatch, type DeviceName, type NativeTensor } from '../native.js'
import { loadModelConfig, type ModelConfig } from './config.js'
import { DecodeGraphs, type GraphStats } from './decode-graphs.js'
import { MAX_LOGIT_PROCESSOR_ROWS, checkRowProcessors } from './logit-processors.js'
import { MAX_TOP_LOGPROBS, OutputHead, type ChosenIds, type StepTokens, type TokenChoice } from './output-head.js'
import { StepInputs, checkChunks, inputInts, layoutStep, type SequenceChunk, type StepLimits, type StepSizes, type StepViews } from './step-layout.js'
import type { LaunchedStep } from '../step.js'

export type { SequenceChunk }
import { ropeTable } from './rope.js'
import { allocationError, disposeWeights, loadWeights, type LayerWeights, type LoadProgress, type ModelWeights } from './weights.js'
import { checkDeviceMemory, decodeWorkspaceFloats, deviceWeightBytes, type DeviceMemory, type LoadSizes } from './load-memory.js'
import { checkTensorParallel, disposeRankLayers, rankLayers, type RankLayer } from './tensor-parallel.js'

export interface ForwardOutput {
  /** f32 [R, vocab]: rows of all chunks that asked, in chunk order ('last' gives 1 row, 'all' tokens.length rows). */
  logits: NativeTensor
  rowsPerChunk: number[]
}

export interface TransformerOptions {
  device: DeviceName
  /** Most tokens (all chunks together) in one forward. */
  maxBatchTokens: number
  /** Blocks in the KV cache (each holds kvBlockSize positions of every layer). */
  kvBlocks: number
  kvBlockSize?: number
  /** Most logit rows in one forward; defaults to maxBatchTokens. */
  maxLogitRows?: number
  /**
   * Most sequences of a decode step that runs as a CUDA graph, and the rows of the decode
   * attention workspace allocated at load on CUDA (lib/model/load-memory.ts says its size).
   * Default (and at most) min(maxBatchTokens, maxLogitRows). Decode steps with more sequences
   * run eagerly, with a workspace the process keeps.
   */
  maxDecodeRows?: number
  /**
   * Rows of the logit processors' table (penalties, logit bias and token masks, lib/model/logit-processors.ts):
   * the most sequences with processors that can run at once. Default: the most rows of a decode
   * step, min(maxBatchTokens, maxLogitRows). The table is allocated at its first use; the memory
   * check at load counts it all the same (lib/model/load-memory.ts).
   */
  logitProcessorRows?: number
  /**
   * @internal For the tests that prove fusion keeps the bits: q, k, v and gate, up as separate
   * products through the separate ops (rmsnorm per head, rope, kvAppend, siluMul).
   */
  unfusedLayers?: boolean
  /**
   * Decode steps replayed as CUDA graphs (lib/model/decode-graphs.ts); default true on CUDA. On
   * the CPU, true runs the same padded decode buckets eagerly (what the tests compare).
   */
  cudaGraphs?: boolean
  /**
   * Tensor parallelism, emulated in this process (lib/model/tensor-parallel.ts): 1, 2, 4 or 8
   * ranks whose row-parallel products (o_proj, down_proj) use the fixed 8-way K partition and
   * tree, so every degree gives the same bits. Unset: the unpartitioned products (other bits
   * than any degree). Above 1 on the CPU only.
   */
  tensorParallel?: number
  /** @internal dir's config.json, when the caller parsed it already. */
  config?: ModelConfig
  /**
   * @internal Reads the CUDA device's free and total memory for the check before the weights
   * upload (default: the device's own figures); tests give a smaller free figure.
   */
  deviceMemory?: () => DeviceMemory
  onProgress?: (p: LoadProgress) => void
}

/** One rank's step buffers (rank 0 of TP1: the model's own). */
interface RankBuffers {
  qkv: NativeTensor // bf16 [T, (heads + 2*kvHeads)/N * D]
  q: NativeTensor // bf16 [T, heads/N * D]
  attn: NativeTensor // bf16 [T, heads/N * D]
  gateUp: NativeTensor // bf16 [T, 2I/N]
  act: NativeTensor // bf16 [T, I/N]
}

/** The emulated ranks: their weights, caches and buffers, and the shared workspaces. */
interface TensorParallelState {
  ranks: number
  layers: RankLayer[][] // [rank][layer]
  caches: KvCache[] // [rank], kvHeads/N heads each (rank 0: the model's cache)
  buffers: RankBuffers[]
  partials: NativeTensor // f32 [8 * T * H] flat: the row-parallel partials of a step, [8, T, H]
  logitShards: NativeTensor | null // f32 [L * V] flat: each rank's [L, V/N] vocabulary rows (N > 1)
  gatherIds: Map<number, NativeTensor> // rows -> i32 [rows * N]: the all-gather of the logit shards
  owned: NativeTensor[]
}

/** Step buffers, allocated once for maxBatchTokens rows; each forward uses views of their first rows. */
interface Activations {
  residual: NativeTensor // bf16 [T, H]
  residualNext: NativeTensor // bf16 [T, H]: where a fused norm writes residual + x (NormedRows)
  normed: NativeTensor // bf16 [T, H]
  proj: NativeTensor // bf16 [T, H], o_proj and down_proj outputs
  qkv: NativeTensor // bf16 [T, (heads + 2*kvHeads)*D], the q|k|v product
  q: NativeTensor // bf16 [T, heads*D], rotated q
  qNormed: NativeTensor | null // bf16 [T, heads*D] (Qwen3, unfused layers only)
  kNormed: NativeTensor | null // bf16 [T, kvHeads*D] (Qwen3, unfused layers only)
  attn: NativeTensor // bf16 [T, heads*D]
  gateUp: NativeTensor // bf16 [T, 2I], the gate|up product (matmulSiluMul's scratch where it does not fuse)
  act: NativeTensor // bf16 [T, I]
  gathered: NativeTensor // bf16 [L, H]
  logits: NativeTensor // f32 [L, V]
}

/**
 * The rows a product normalizes before it multiplies (normMatmul): rmsnorm(residualIn + x) with
 * weight `norm`, the sum written to residualOut; without x, rmsnorm(residualIn).
 */
interface NormedRows {
  residualIn: NativeTensor
  x: NativeTensor | null
  residualOut: NativeTensor
  norm: NativeTensor
}

interface KvCache {
  k: NativeTensor[] // per layer bf16 [blocks, blockSize, kvHeads, D]
  v: NativeTensor[]
}

/** What a loaded Transformer holds besides its sizes. */
interface TransformerState {
  weights: ModelWeights
  cache: KvCache
  act: Activations
  cosSin: NativeTensor // f32 [maxPositions, D]
  /** f32: decode attention's split partials for maxDecodeRows sequences at maxPositions (CUDA only). */
  decodeWorkspace: NativeTensor | null
  head: OutputHead
  inputs: StepInputs
}

/**
 * The unfused layers' products, one per row block of a packed weight: output i is [T, widths[i]],
 * the i-th consecutive [T, widths[i]] block of `buffer`'s memory, = x · (rows of `weight` and
 * `bias` of block i)^T. The same K chain per element as the fused product over the whole weight.
 */
function blockProducts(
  buffer: NativeTensor,
  T: number,
  x: NativeTensor,
  weight: NativeTensor,
  bias: NativeTensor | null,
  widths: number[],
): NativeTensor[] {
  const n = native()
  const flat = n.view(buffer, [buffer.shape[0]! * buffer.shape[1]!])
  let row = 0
  return widths.map((width) => {
    const out = n.view(n.narrow(flat, T * row, T * width), [T, width])
    n.matmul(out, x, n.narrow(weight, row, width), bias ? n.narrow(bias, row, width) : null) // [T,H] · [width,H]^T
    row += width
    return out
  })
}

/** Allocates a tensor that `what` names in the error when it fails. */
type Allocate = (what: string, dtype: 'bf16' | 'f32', shape: number[]) => NativeTensor

/** The step buffers for `T` tokens and `L` logit rows. */
function allocateActivations(
  alloc: Allocate,
  c: ModelConfig,
  T: number,
  L: number,
  unfused: boolean,
): Activations {
  const H = c.hiddenSize
  const I = c.intermediateSize
  const qWidth = c.numHeads * c.headDim
  const kvWidth = c.numKvHeads * c.headDim
  const step = (name: string, dtype: 'bf16' | 'f32', shape: number[]) => alloc(`the step buffer ${name}`, dtype, shape)
  return {
    residual: step('residual', 'bf16', [T, H]),
    residualNext: step('residualNext', 'bf16', [T, H]),
    normed: step('normed', 'bf16', [T, H]),
    proj: step('proj', 'bf16', [T, H]),
    qkv: step('qkv', 'bf16', [T, qWidth + 2 * kvWidth]),
    q: step('q', 'bf16', [T, qWidth]),
    qNormed: unfused && c.qkNorm ? step('qNormed', 'bf16', [T, qWidth]) : null,
    kNormed: unfused && c.qkNorm ? step('kNormed', 'bf16', [T, kvWidth]) : null,
    attn: step('attn', 'bf16', [T, qWidth]),
    gateUp: step('gateUp', 'bf16', [T, 2 * I]),
    act: step('act', 'bf16', [T, I]),
    gathered: step('gathered', 'bf16', [L, H]),
    logits: step('logits', 'f32', [L, c.vocabSize]),
  }
}

/** The emulated ranks' state: rank 0 shares the model's cache (and, at TP1, its buffers). */
function allocateTensorParallel(
  alloc: Allocate,
  c: ModelConfig,
  T: number,
  L: number,
  N: number,
  act: Activations,
  cache: KvCache,
  newCache: (rank: number) => KvCache,
  layers: RankLayer[][],
): TensorParallelState {
  const owned: NativeTensor[] = []
  const own = (what: string, dtype: 'bf16' | 'f32', shape: number[]) => {
    const t = alloc(what, dtype, shape)
    owned.push(t)
    return t
  }
  const D = c.headDim
  const I = c.intermediateSize
  const buffers: RankBuffers[] = []
  const caches: KvCache[] = [cache]
  for (let r = 0; r < N; r++) {
    if (N === 1) {
      buffers.push({ qkv: act.qkv, q: act.q, attn: act.attn, gateUp: act.gateUp, act: act.act })
      continue
    }
    if (r > 0) {
      const rankCache = newCache(r)
      owned.push(...rankCache.k, ...rankCache.v)
      caches.push(rankCache)
    }
    const rank = (name: string, shape: number[]) => own(`rank ${r}'s step buffer ${name}`, 'bf16', shape)
    buffers.push({
      qkv: rank('qkv', [T, ((c.numHeads + 2 * c.numKvHeads) / N) * D]),
      q: rank('q', [T, (c.numHeads / N) * D]),
      attn: rank('attn', [T, (c.numHeads / N) * D]),
      gateUp: rank('gateUp', [T, (2 * I) / N]),
      act: rank('act', [T, I / N]),
    })
  }
  return {
    ranks: N,
    layers,
    caches,
    buffers,
    partials: own('the row-parallel partials', 'f32', [8 * T * c.hiddenSize]),
    logitShards: N > 1 ? own('the logit shards', 'f32', [L * c.vocabSize]) : null,
    gatherIds: new Map(),
    owned,
  }
}

/** The CUDA device's free and total memory, and its name. */
function cudaDeviceMemory(): DeviceMemory {
  const n = native()
  return { ...n.memoryInfo(), name: n.cudaStatus().devices[0]?.name ?? 'device 0' }
}

export class Transformer {
  private readonly weights: ModelWeights
  private readonly cache: KvCache
  private readonly act: Activations
  private readonly cosSin: NativeTensor
  private readonly decodeWorkspace: NativeTensor | null
  /** @internal The output head and the step inputs (decode-graphs.ts replays over them). */
  readonly head: OutputHead
  /** Sequences with logit processors (penalties, logit bias, token masks) that can run at once. */
  readonly logitProcessorRows: number
  /** @internal */
  readonly inputs: StepInputs
  private readonly graphs: DecodeGraphs | null
  private readonly tp: TensorParallelState | null
  private disposed = false

  private constructor(
    readonly config: ModelConfig,
    readonly device: DeviceName,
    readonly maxBatchTokens: number,
    readonly kvBlocks: number,
    readonly kvBlockSize: number,
    readonly maxLogitRows: number,
    /** Most sequences of a decode step replayed as a CUDA graph (TransformerOptions). */
    readonly maxDecodeRows: number,
    /** Longest sequence: max_position_embeddings, or less when the KV cache holds fewer positions. */
    readonly maxPositions: number,
    state: TransformerState,
    private readonly unfused: boolean,
    cudaGraphs: boolean,
    tp: TensorParallelState | null = null,
  ) {
    this.tp = tp
    this.weights = state.weights
    this.cache = state.cache
    this.act = state.act
    this.cosSin = state.cosSin
    this.decodeWorkspace = state.decodeWorkspace
    this.head = state.head
    this.logitProcessorRows = state.head.processors?.rows ?? 0
    this.inputs = state.inputs
    this.graphs = cudaGraphs ? new DecodeGraphs(this, maxDecodeRows, maxPositions, device === 'cuda') : null
  }

  private get limits(): StepLimits {
    return {
      vocabSize: this.config.vocabSize,
      maxPositionEmbeddings: this.config.maxPositionEmbeddings,
      maxPositions: this.maxPositions,
      kvBlockSize: this.kvBlockSize,
      kvBlocks: this.kvBlocks,
      maxBatchTokens: this.maxBatchTokens,
      maxLogitRows: this.maxLogitRows,
    }
  }

  /**
   * Allocates the table of penalties and logit bias if it is not yet (the scheduler calls this
   * when it admits a generation that uses them, so that a failed allocation refuses that request
   * alone instead of failing a step and every request in it).
   */
  reserveLogitProcessors(): void {
    this.head.processorTable()
  }

  /** The decode buckets and the graphs captured so far (null when graphs are off). */
  graphStats(): GraphStats | null {
    return this.graphs?.stats() ?? null
  }

  static async load(dir: string, opts: TransformerOptions): Promise<Transformer> {
    if (typeof dir !== 'string' || dir === '') throw new TypeError(`Expected a directory path for dir but received ${describeValue(dir)}`)
    if (opts?.device !== 'cpu' && opts?.device !== 'cuda')
      throw new TypeError(`Expected 'cpu' or 'cuda' for device but received ${describeValue(opts?.device)}`)
    const device = resolveDevice(opts.device)
    const maxBatchTokens = checkInteger('maxBatchTokens', opts.maxBatchTokens, 1)
    const kvBlocks = checkInteger('kvBlocks', opts.kvBlocks, 1)
    const kvBlockSize = checkInteger('kvBlockSize', opts.kvBlockSize ?? 16, 1)
    const maxLogitRows = checkInteger('maxLogitRows', opts.maxLogitRows ?? maxBatchTokens, 1)
    const stepRows = Math.min(maxBatchTokens, maxLogitRows)
    const maxDecodeRows = checkInteger('maxDecodeRows', opts.maxDecodeRows ?? stepRows, 1, stepRows)
    const logitProcessorRows = checkInteger('logitProcessorRows', opts.logitProcessorRows ?? Math.min(maxBatchTokens, maxLogitRows, MAX_LOGIT_PROCESSOR_ROWS), 0, MAX_LOGIT_PROCESSOR_ROWS)
    const unfused = opts.unfusedLayers === true
    if (opts.cudaGraphs !== undefined && typeof opts.cudaGraphs !== 'boolean')
      throw new TypeError(`Expected a boolean for cudaGraphs but received ${describeValue(opts.cudaGraphs)}`)
    const cudaGraphs = opts.cudaGraphs ?? device === 'cuda'
    if (opts.tensorParallel !== undefined && unfused)
      throw new TypeError('Expected unfusedLayers or tensorParallel but received both')

    const config = opts.config ?? (await loadModelConfig(dir))
    const tpRanks = opts.tensorParallel === undefined ? 0 : checkTensorParallel(opts.tensorParallel, config, device)
    // On CUDA, what the load allocates must fit in the device's free memory: checked once the
    // weights' headers are, before the first upload (lib/model/load-memory.ts).
    const sizes: LoadSizes = {
      maxBatchTokens,
      maxLogitRows,
      kvBlocks,
      kvBlockSize,
      tensorParallel: tpRanks,
      decodeWorkspaceRows: device === 'cuda' ? maxDecodeRows : 0,
      logitProcessorRows,
      unfusedLayers: unfused,
    }
    const readMemory = opts.deviceMemory ?? cudaDeviceMemory
    const weights = await loadWeights(dir, config, device, {
      ...(opts.onProgress && { onProgress: opts.onProgress }),
      ...(device === 'cuda' && {
        beforeUpload: (tensors) => void checkDeviceMemory(dir, config, sizes, readMemory(), deviceWeightBytes(tensors)),
      }),
    })
    let rankWeights: RankLayer[][] = []
    const n = native()
    // Everything allocated here, freed if a later allocation (or anything else) fails; an
    // allocation that fails names what it was for.
    const owned: { dispose(): void }[] = []
    const named = <T extends { dispose(): void }>(what: string, dtype: 'bf16' | 'f32' | 'i32', shape: number[], make: () => T): T => {
      let t: T
      try {
        t = make()
      } catch (err) {
        throw allocationError(`allocate ${what} on ${device}`, dtype, shape, dir, err)
      }
      owned.push(t)
      return t
    }
    const alloc: Allocate = (what, dtype, shape) => named(what, dtype, shape, () => n.empty(device, dtype, shape))
    let model: Transformer
    try {
      const maxPositions = Math.min(config.maxPositionEmbeddings, kvBlocks * kvBlockSize)
      const ropeShape = [maxPositions, config.headDim]
      const cosSin = named('the RoPE table', 'f32', ropeShape, () => n.fromBuffer(device, 'f32', ropeShape, ropeTable(config, maxPositions)))
      // Owned by the model so that its captured decode steps point into memory that stays put
      // (the process's own workspace is freed when a larger launch grows it).
      const workspaceShape = [decodeWorkspaceFloats(config, sizes.decodeWorkspaceRows, maxPositions)]
      const decodeWorkspace =
        workspaceShape[0]! > 0 ? alloc(`the decode attention workspace (${maxDecodeRows} sequences at ${maxPositions} positions)`, 'f32', workspaceShape) : null
      const cacheShape = [kvBlocks, kvBlockSize, config.numKvHeads / Math.max(1, tpRanks), config.headDim]
      const newCache = (rank = 0): KvCache => {
        const cache: KvCache = { k: [], v: [] }
        const of = tpRanks > 1 ? ` of rank ${rank}` : ''
        for (let l = 0; l < config.numLayers; l++) {
          cache.k.push(alloc(`the KV cache's keys of layer ${l}${of}`, 'bf16', cacheShape))
          cache.v.push(alloc(`the KV cache's values of layer ${l}${of}`, 'bf16', cacheShape))
        }
        return cache
      }
      const cache = newCache()
      const act = allocateActivations(alloc, config, maxBatchTokens, maxLogitRows, unfused)
      let tp: TensorParallelState | null = null
      if (tpRanks > 0) {
        rankWeights = await rankLayers(weights, config, device, tpRanks, dir)
        tp = allocateTensorParallel(alloc, config, maxBatchTokens, maxLogitRows, tpRanks, act, cache, newCache, rankWeights)
      }
      // params [L, 8], results [L, 2 + 2 * MAX_TOP_LOGPROBS] and a row map [L], i32
      const headShape = [maxLogitRows, 8 + 2 + 2 * MAX_TOP_LOGPROBS + 1]
      const head = named('the token-choice buffers', 'i32', headShape, () => new OutputHead(device, maxLogitRows, { rows: logitProcessorRows, vocab: config.vocabSize }))
      const maxBlocks = Math.ceil(maxPositions / kvBlockSize)
      const inputCount = inputInts(maxBatchTokens, maxLogitRows, maxBatchTokens, maxBlocks)
      const inputs = named('the step inputs', 'i32', [inputCount], () => new StepInputs(device, inputCount))
      const state = { weights, cache, act, cosSin, decodeWorkspace, head, inputs }
      model = new Transformer(config, device, maxBatchTokens, kvBlocks, kvBlockSize, maxLogitRows, maxDecodeRows, maxPositions, state, unfused, cudaGraphs, tp)
    } catch (err) {
      for (const t of owned) t.dispose()
      disposeRankLayers(rankWeights)
      disposeWeights(weights)
      throw err
    }
    try {
      model.probe(dir)
    } catch (err) {
      model.dispose() // everything above, and whatever the probe's step made
      throw err
    }
    return model
  }

  /**
   * One token through every op, so that a shape the kernels do not support (the CUDA attention
   * kernels take head dims 64 and 128) fails at load with the kernel's reason, not at the first
   * request. It writes cache slot 0, which holds nothing yet.
   */
  private probe(dir: string): void {
    try {
      this.forward([{ tokens: [0], startPosition: 0, blockTable: [0], logits: 'last' }])
    } catch (err) {
      throw new Error(`The model in ${dir} cannot run on ${this.device}: ${(err as Error).message}`)
    }
  }

  /**
   * One step: the forward pass over `chunks`, then the output head's token choice for each logits
   * row (choices[r] for row r, in chunk order). Reads back only the chosen ids, their log-probs and
   * the top-N when topN > 0.
   */
  async step(chunks: SequenceChunk[], choices: TokenChoice[], topN: number): Promise<StepTokens> {
    return this.launch(chunks, choices, topN).tokens
  }

  /**
   * step() without the wait: enqueues the step and the read-back of its results and returns at
   * once. With `after` (a step launched earlier by this model, whose results need not be back),
   * every chunk is one decode token whose id is the one chosen for row afterRows[i] (default: the
   * same row i) of `after`, taken on the device: the chunks' own tokens are not read. The rows
   * compute exactly what they would with those ids given by the host.
   */
  launch(chunks: SequenceChunk[], choices: TokenChoice[], topN: number, after?: LaunchedStep, afterRows?: readonly number[]): LaunchedStep {
    if (this.disposed) throw new DisposedError('transformer')
    const sizes = checkChunks(chunks, this.limits)
    if (choices.length !== sizes.logitRows)
      throw new RangeError(`Expected ${sizes.logitRows} token choices (one per logits row) for choices but received ${choices.length}`)
    const processorRows = new Set<number>()
    for (const [r, c] of choices.entries()) {
      if (c.target >= this.config.vocabSize)
        throw new RangeError(`Expected an integer between -1 and ${this.config.vocabSize - 1} for choices[${r}].target but received ${c.target}`)
      if (c.processors) checkRowProcessors(`choices[${r}]`, c, this.logitProcessorRows, this.config.vocabSize, processorRows)
    }
    const chosen = after?.chosen as ChosenIds | undefined
    if (after) {
      const from = chosen?.rows ?? 0
      const expected = afterRows?.length ?? from
      if (!chosen || chunks.length !== expected || !chunks.every((c) => c.tokens.length === 1 && c.logits === 'last'))
        throw new RangeError(
          `Expected ${expected} decode chunks (one token each, logits 'last') after a launched step but received ${chunks.length} chunks`,
        )
      for (const [i, r] of (afterRows ?? []).entries())
        if (!Number.isInteger(r) || r < 0 || r >= from)
          throw new RangeError(`Expected an integer between 0 and ${from - 1} for afterRows[${i}] but received ${describeValue(r)}`)
    } else if (afterRows) {
      throw new RangeError('afterRows needs a launched step to take the tokens from (after)')
    }
    if (this.graphs?.accepts(chunks)) return this.graphs.launch(chunks, choices, chosen, afterRows)
    const { logits } = this.forwardChecked(chunks, sizes, chosen, afterRows)
    if (choices.length === 0) return { tokens: this.head.choose(logits, choices, topN), chosen: null }
    return this.head.launch(logits, choices, topN)
  }

  /** Runs one step over `chunks`; the returned logits tensor is overwritten by the next forward. */
  forward(chunks: SequenceChunk[]): ForwardOutput {
    if (this.disposed) throw new DisposedError('transformer')
    return this.forwardChecked(chunks, checkChunks(chunks, this.limits))
  }

  // The forward pass over checked chunks; with `chosen`, the tokens come from a launched step's
  // results on the device (launch).
  private forwardChecked(chunks: SequenceChunk[], sizes: StepSizes, chosen?: ChosenIds, afterRows?: readonly number[]): ForwardOutput {
    const step = layoutStep(chunks, sizes, this.kvBlockSize)
    this.inputs.upload(step.packed)
    const views = this.inputs.views(step)
    if (chosen) this.head.takeIds(views.ids, chosen, afterRows)
    return { logits: this.enqueueForward(views), rowsPerChunk: step.rowsPerChunk }
  }

  /**
   * @internal The forward pass over a step's input views: every op enqueued, nothing waits.
   * Returns the logits view f32 [R, V] (overwritten by the next step).
   */
  enqueueForward(v: StepViews): NativeTensor {
    const n = native()
    const c = this.config
    const T = v.tokens
    const R = v.logitRows
    const rows = (t: NativeTensor, count = T) => n.narrow(t, 0, count)
    const normed = rows(this.act.normed)
    if (this.tp || this.unfused) {
      const residual = rows(this.act.residual)
      n.embedding(residual, this.weights.embedTokens, v.ids)
      n.rmsnorm(normed, residual, this.weights.layers[0]!.inputNorm, c.rmsNormEps)
      for (let l = 0; l < c.numLayers; l++) {
        const layer = this.weights.layers[l]!
        const nextNorm = l + 1 < c.numLayers ? this.weights.layers[l + 1]!.inputNorm : this.weights.norm
        this.attentionBlock(l, layer, T, normed, v.positions, v.slots, v.batch)
        // residual += o_proj; normed = post_attention_layernorm(residual)
        n.addRmsnorm(normed, residual, rows(this.act.proj), layer.postAttentionNorm, c.rmsNormEps)
        this.mlpBlock(l, layer, T, normed)
        // residual += down_proj; normed = next layer's input norm (or the final norm)
        n.addRmsnorm(normed, residual, rows(this.act.proj), nextNorm, c.rmsNormEps)
      }
    } else {
      // Each norm inside the product after it (normMatmul; one launch on Hopper at one row):
      // the residual stream alternates between two buffers, since the product reads one while it
      // writes the sum to the other.
      let residual = rows(this.act.residual)
      let other = rows(this.act.residualNext)
      const next = (x: NativeTensor | null, norm: NativeTensor): NormedRows => {
        const input = { residualIn: residual, x, residualOut: other, norm }
        if (x) [residual, other] = [other, residual]
        return input
      }
      const proj = rows(this.act.proj)
      n.embedding(residual, this.weights.embedTokens, v.ids)
      for (let l = 0; l < c.numLayers; l++) {
        const layer = this.weights.layers[l]!
        // residual (+= down_proj of the layer before) -> input_layernorm -> attention
        this.attentionBlock(l, layer, T, next(l === 0 ? null : proj, layer.inputNorm), v.positions, v.slots, v.batch)
        // residual += o_proj -> post_attention_layernorm -> MLP
        this.mlpBlock(l, layer, T, next(proj, layer.postAttentionNorm))
      }
      // residual += the last down_proj; normed = the final norm
      n.addRmsnorm(normed, residual, proj, this.weights.norm, c.rmsNormEps)
    }
    const logits = rows(this.act.logits, R)
    if (R > 0) {
      const gathered = rows(this.act.gathered, R)
      n.embedding(gathered, normed, v.rows) // row gather: gathered[r] = normed[rows[r]]
      if (this.tp) this.lmHeadRanks(this.tp, logits, gathered, R)
      else n.matmul(logits, gathered, this.weights.lmHead, null) // [R,H] · [V,H]^T -> f32 [R,V]
    }
    return logits
  }

  // x = normed [T,H] (or the rows the first product normalizes) -> act.proj [T,H] =
  // o_proj(attention(rope(q), cache)). The emulated ranks and the unfused layers take normed rows.
  private attentionBlock(
    l: number,
    w: LayerWeights,
    T: number,
    input: NativeTensor | NormedRows,
    positions: NativeTensor,
    slots: NativeTensor,
    batch: AttentionBatch,
  ): void {
    const n = native()
    const c = this.config
    const D = c.headDim
    let q3: NativeTensor
    if (!('residualIn' in input)) {
      if (this.tp) return this.attentionRanks(this.tp, l, T, input, positions, slots, batch)
      q3 = this.unfusedAttentionInputs(l, w, T, input, positions, slots)
    } else {
      const qkv = n.narrow(this.act.qkv, 0, T)
      this.normProduct(qkv, null, input, w.qkvProj, w.qkvBias) // [T,H] · [(heads+2kv)*D,H]^T -> [T, q|k|v]
      // q -> rope(q_norm(q)); k -> rope(k_norm(k)) and v -> the cache rows at slots
      q3 = n.view(n.narrow(this.act.q, 0, T), [T, c.numHeads, D])
      n.qkvRopeAppend(q3, this.cache.k[l]!, this.cache.v[l]!, qkv, positions, this.cosSin, slots, w.qNorm, w.kNorm, c.rmsNormEps)
    }
    const attn = n.narrow(this.act.attn, 0, T)
    n.attention(n.view(attn, [T, c.numHeads, D]), q3, this.cache.k[l]!, this.cache.v[l]!, batch, 1 / Math.sqrt(D), this.decodeWorkspace)
    n.matmul(n.narrow(this.act.proj, 0, T), attn, w.oProj, w.oBias) // [T,heads*D] · [H,heads*D]^T -> [T,H]
  }

  // out = rmsnorm(rows) · weight^T (+ bias); with gateUp (its scratch), SiLU·mul of the gate|up product.
  private normProduct(
    out: NativeTensor,
    gateUp: NativeTensor | null,
    rows: NormedRows,
    weight: NativeTensor,
    bias: NativeTensor | null,
  ): void {
    const n = native()
    const eps = this.config.rmsNormEps
    const normed = n.narrow(this.act.normed, 0, rows.residualIn.shape[0]!)
    const { residualIn, x, residualOut, norm } = rows
    if (gateUp) n.normMatmulSiluMul(out, gateUp, normed, residualOut, residualIn, x, norm, eps, weight, bias)
    else n.normMatmul(out, normed, residualOut, residualIn, x, norm, eps, weight, bias)
  }

  // The same as qkvRopeAppend with one product per weight and one op per step (unfusedLayers).
  // q, k, v live in act.qkv's memory as three [T, width] blocks; the weights are row ranges of qkvProj.
  private unfusedAttentionInputs(
    l: number,
    w: LayerWeights,
    T: number,
    normed: NativeTensor,
    positions: NativeTensor,
    slots: NativeTensor,
  ): NativeTensor {
    const n = native()
    const c = this.config
    const D = c.headDim
    const widths = [c.numHeads * D, c.numKvHeads * D, c.numKvHeads * D]
    const [q0, k0, v] = blockProducts(this.act.qkv, T, normed, w.qkvProj, w.qkvBias, widths) as [
      NativeTensor,
      NativeTensor,
      NativeTensor,
    ]
    let q = q0
    let k = k0
    if (w.qNorm && w.kNorm) {
      // Qwen3: RMSNorm over each head's D values, before RoPE.
      const qn = n.narrow(this.act.qNormed!, 0, T)
      const kn = n.narrow(this.act.kNormed!, 0, T)
      n.rmsnorm(n.view(qn, [T * c.numHeads, D]), n.view(q, [T * c.numHeads, D]), w.qNorm, c.rmsNormEps)
      n.rmsnorm(n.view(kn, [T * c.numKvHeads, D]), n.view(k, [T * c.numKvHeads, D]), w.kNorm, c.rmsNormEps)
      q = qn
      k = kn
    }
    const q3 = n.view(q, [T, c.numHeads, D])
    const k3 = n.view(k, [T, c.numKvHeads, D])
    n.rope(q3, positions, this.cosSin)
    n.rope(k3, positions, this.cosSin)
    n.kvAppend(this.cache.k[l]!, this.cache.v[l]!, k3, n.view(v, [T, c.numKvHeads, D]), slots)
    return q3
  }

  // x = normed [T,H] (or the rows the gate|up product normalizes) -> act.proj [T,H] =
  // down(silu(gate(x)) * up(x))
  private mlpBlock(l: number, w: LayerWeights, T: number, input: NativeTensor | NormedRows): void {
    const n = native()
    const I = this.config.intermediateSize
    const act = n.narrow(this.act.act, 0, T)
    if (!('residualIn' in input)) {
      if (this.tp) return this.mlpRanks(this.tp, l, T, input, w.downBias)
      const normed = input
      // gate and up as two products into two [T,I] blocks of act.gateUp's memory
      const [gate, up] = blockProducts(this.act.gateUp, T, normed, w.gateUpProj, w.gateUpBias, [I, I]) as [
        NativeTensor,
        NativeTensor,
      ]
      n.siluMul(act, gate, up)
    } else {
      // [T,H] · [2I,H]^T -> [T, gate|up] -> silu·mul -> [T,I], one launch where the kernels fuse it
      this.normProduct(act, n.narrow(this.act.gateUp, 0, T), input, w.gateUpProj, w.gateUpBias)
    }
    n.matmul(n.narrow(this.act.proj, 0, T), act, w.downProj, w.downBias) // [T,I] · [H,I]^T -> [T,H]
  }

  // The emulated ranks' attention: each its heads' q|k|v, cache and attention, then its o_proj
  // partitions' partials; one combine by the fixed tree (+ o_proj's bias) into act.proj.
  private attentionRanks(
    tp: TensorParallelState,
    l: number,
    T: number,
    normed: NativeTensor,
    positions: NativeTensor,
    slots: NativeTensor,
    batch: AttentionBatch,
  ): void {
    const n = native()
    const c = this.config
    const D = c.headDim
    const N = tp.ranks
    const w = this.weights.layers[l]!
    const partials = this.stepPartials(tp, T)
    for (let r = 0; r < N; r++) {
      const rw = tp.layers[r]![l]!
      const buf = tp.buffers[r]!
      const cache = tp.caches[r]!
      const qkv = n.narrow(buf.qkv, 0, T)
      n.matmul(qkv, normed, rw.qkvProj, rw.qkvBias) // column-parallel: the rank's heads of q|k|v
      const q3 = n.view(n.narrow(buf.q, 0, T), [T, c.numHeads / N, D])
      n.qkvRopeAppend(q3, cache.k[l]!, cache.v[l]!, qkv, positions, this.cosSin, slots, w.qNorm, w.kNorm, c.rmsNormEps)
      const attn = n.narrow(buf.attn, 0, T)
      n.attention(n.view(attn, [T, c.numHeads / N, D]), q3, cache.k[l]!, cache.v[l]!, batch, 1 / Math.sqrt(D), this.decodeWorkspace)
      n.matmulPartials(n.narrow(partials, (r * 8) / N, 8 / N), attn, rw.oProj) // row-parallel: partitions of rank r
    }
    n.combinePartials(n.narrow(this.act.proj, 0, T), partials, w.oBias, N)
  }

  // The emulated ranks' MLP: each its columns of gate|up, then its down_proj partitions' partials.
  private mlpRanks(tp: TensorParallelState, l: number, T: number, normed: NativeTensor, downBias: NativeTensor | null): void {
    const n = native()
    const N = tp.ranks
    const partials = this.stepPartials(tp, T)
    for (let r = 0; r < N; r++) {
      const rw = tp.layers[r]![l]!
      const buf = tp.buffers[r]!
      const act = n.narrow(buf.act, 0, T)
      n.matmulSiluMul(act, n.narrow(buf.gateUp, 0, T), normed, rw.gateUpProj, rw.gateUpBias) // [T, gate_r | up_r] -> [T, I/N]
      n.matmulPartials(n.narrow(partials, (r * 8) / N, 8 / N), act, rw.downProj)
    }
    n.combinePartials(n.narrow(this.act.proj, 0, T), partials, downBias, N)
  }

  // The partials workspace of a T-token step: f32 [8, T, H].
  private stepPartials(tp: TensorParallelState, T: number): NativeTensor {
    const H = this.config.hiddenSize
    return native().view(native().narrow(tp.partials, 0, 8 * T * H), [8, T, H])
  }

  // lm_head by vocabulary rows: rank r's [R, V/N] logits, then the all-gather into [R, V] (a row
  // gather over [R*N, V/N] views: logits row i, shard r <- shard r's row i).
  private lmHeadRanks(tp: TensorParallelState, logits: NativeTensor, gathered: NativeTensor, R: number): void {
    const n = native()
    const N = tp.ranks
    if (N === 1 || !tp.logitShards) {
      n.matmul(logits, gathered, this.weights.lmHead, null)
      return
    }
    const V = this.config.vocabSize
    const width = V / N
    for (let r = 0; r < N; r++) {
      const shard = n.view(n.narrow(tp.logitShards, r * R * width, R * width), [R, width])
      n.matmul(shard, gathered, n.narrow(this.weights.lmHead, r * width, width), null)
    }
    let ids = tp.gatherIds.get(R)
    if (!ids) {
      const order = new Int32Array(R * N)
      for (let i = 0; i < R; i++) for (let r = 0; r < N; r++) order[i * N + r] = r * R + i
      ids = n.fromBuffer(this.device, 'i32', [R * N], order)
      tp.gatherIds.set(R, ids)
    }
    const shards = n.view(n.narrow(tp.logitShards, 0, R * V), [N * R, width])
    n.embedding(n.view(logits, [R * N, width]), shards, ids)
  }

  /** Frees the weights, the KV cache and the step buffers. */
  dispose(): void {
    if (this.disposed) return
    this.disposed = true
    if (this.tp) {
      disposeRankLayers(this.tp.layers)
      for (const t of [...this.tp.owned, ...this.tp.gatherIds.values()]) t.dispose()
    }
    disposeWeights(this.weights)
    for (const t of [...this.cache.k, ...this.cache.v]) t.dispose()
    for (const t of Object.values(this.act)) t?.dispose()
    this.cosSin.dispose()
    this.decodeWorkspace?.dispose()
    this.graphs?.dispose()
    this.head.dispose()
    this.inputs.dispose()
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.dispose()
  }
}
