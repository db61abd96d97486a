// The transformer forward pass (Llama, Qwen2, Qwen3, Mistral) composed of native ops over a paged
// KV cache. One forward() takes a ragged batch of sequence chunks (prefill chunks and decode
// tokens alike) and enqueues every op; nothing waits for the device.
//
//   embed -> for each layer: [norm] q|k|v = x·Wqkv (+b) -> [q/k head norm] -> rope(q,k)
//            -> write k,v to the cache -> attention -> o_proj -> residual + norm
//            -> gate|up = x·Wgate|up -> silu·mul -> down_proj -> residual + norm
//   -> gather the rows that want logits -> lm_head (f32 logits) -> token choice (output-head.ts)
//
// Every op is batch-invariant (see DESIGN.md), so a row's logits depend only on its own sequence.
import { resolveDevice } from '../device.js'
import { DisposedError, checkInteger, describeValue } from '../errors.js'
import { native, type AttentionBatch, type DeviceName, type NativeTensor } from '../native.js'
import { loadModelConfig, type ModelConfig } from './config.js'
import { OutputHead, type StepTokens, type TokenChoice } from './output-head.js'
import { ropeTable } from './rope.js'
import { disposeWeights, loadWeights, type LayerWeights, type LoadProgress, type ModelWeights } from './weights.js'

export interface SequenceChunk {
  /** This step's new tokens of one sequence (a prefill chunk, or 1 decode token). */
  tokens: number[]
  /** Position of tokens[0]; positions before it are already in the KV cache. */
  startPosition: number
  /** Physical KV block ids covering positions 0 .. startPosition+tokens.length-1. */
  blockTable: number[]
  logits: 'none' | 'last' | 'all'
}

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
   * @internal For the tests that prove fusion keeps the bits: q, k, v and gate, up as separate
   * products through the separate ops (rmsnorm per head, rope, kvAppend, siluMul).
   */
  unfusedLayers?: boolean
  onProgress?: (p: LoadProgress) => void
}

/** Step buffers, allocated once for maxBatchTokens rows; each forward uses views of their first rows. */
interface Activations {
  residual: NativeTensor // bf16 [T, H]
  normed: NativeTensor // bf16 [T, H]
  proj: NativeTensor // bf16 [T, H], o_proj and down_proj outputs
  qkv: NativeTensor // bf16 [T, (heads + 2*kvHeads)*D], the q|k|v product
  q: NativeTensor // bf16 [T, heads*D], rotated q
  qNormed: NativeTensor | null // bf16 [T, heads*D] (Qwen3, unfused layers only)
  kNormed: NativeTensor | null // bf16 [T, kvHeads*D] (Qwen3, unfused layers only)
  attn: NativeTensor // bf16 [T, heads*D]
  gateUp: NativeTensor // bf16 [T, 2I], the gate|up product
  act: NativeTensor // bf16 [T, I]
  gathered: NativeTensor // bf16 [L, H]
  logits: NativeTensor // f32 [L, V]
}

interface KvCache {
  k: NativeTensor[] // per layer bf16 [blocks, blockSize, kvHeads, D]
  v: NativeTensor[]
}

/**
 * One step's integer inputs, packed into one i32 array so they reach the device in one upload:
 * ids [T] | positions [T] | slots [T] | logitRows [R] | queryStart [B+1] | seqLens [B] | blockTables [B, maxBlocks]
 */
interface StepLayout {
  packed: Int32Array
  tokens: number
  logitRows: number
  sequences: number
  maxBlocks: number
  rowsPerChunk: number[]
  maxQueryLen: number
  maxSeqLen: number
}

/** Sizes of a validated step. */
interface StepSizes {
  tokens: number
  logitRows: number
  maxBlocks: number
}

/** What a loaded Transformer holds besides its sizes. */
interface TransformerState {
  weights: ModelWeights
  cache: KvCache
  act: Activations
  cosSin: NativeTensor // f32 [maxPositions, D]
  head: OutputHead
}

/** The step buffers for `T` tokens and `L` logit rows. */
function allocateActivations(
  alloc: (dtype: 'bf16' | 'f32', shape: number[]) => NativeTensor,
  c: ModelConfig,
  T: number,
  L: number,
  unfused: boolean,
): Activations {
  const H = c.hiddenSize
  const I = c.intermediateSize
  const qWidth = c.numHeads * c.headDim
  const kvWidth = c.numKvHeads * c.headDim
  return {
    residual: alloc('bf16', [T, H]),
    normed: alloc('bf16', [T, H]),
    proj: alloc('bf16', [T, H]),
    qkv: alloc('bf16', [T, qWidth + 2 * kvWidth]),
    q: alloc('bf16', [T, qWidth]),
    qNormed: unfused && c.qkNorm ? alloc('bf16', [T, qWidth]) : null,
    kNormed: unfused && c.qkNorm ? alloc('bf16', [T, kvWidth]) : null,
    attn: alloc('bf16', [T, qWidth]),
    gateUp: alloc('bf16', [T, 2 * I]),
    act: alloc('bf16', [T, I]),
    gathered: alloc('bf16', [L, H]),
    logits: alloc('f32', [L, c.vocabSize]),
  }
}

export class Transformer {
  private readonly weights: ModelWeights
  private readonly cache: KvCache
  private readonly act: Activations
  private readonly cosSin: NativeTensor
  private readonly head: OutputHead
  private disposed = false

  private constructor(
    readonly config: ModelConfig,
    readonly device: DeviceName,
    readonly maxBatchTokens: number,
    readonly kvBlocks: number,
    readonly kvBlockSize: number,
    readonly maxLogitRows: number,
    /** Longest sequence: max_position_embeddings, or less when the KV cache holds fewer positions. */
    readonly maxPositions: number,
    state: TransformerState,
    private readonly unfused: boolean,
  ) {
    this.weights = state.weights
    this.cache = state.cache
    this.act = state.act
    this.cosSin = state.cosSin
    this.head = state.head
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
    const unfused = opts.unfusedLayers === true

    const config = await loadModelConfig(dir)
    const weights = await loadWeights(dir, config, device, opts.onProgress)
    const n = native()
    const owned: { dispose(): void }[] = []
    const alloc = (dtype: 'bf16' | 'f32', shape: number[]) => {
      const t = n.empty(device, dtype, shape)
      owned.push(t)
      return t
    }
    try {
      const maxPositions = Math.min(config.maxPositionEmbeddings, kvBlocks * kvBlockSize)
      const cosSin = n.fromBuffer(device, 'f32', [maxPositions, config.headDim], ropeTable(config, maxPositions))
      owned.push(cosSin)
      const cacheShape = [kvBlocks, kvBlockSize, config.numKvHeads, config.headDim]
      const cache: KvCache = { k: [], v: [] }
      for (let l = 0; l < config.numLayers; l++) {
        cache.k.push(alloc('bf16', cacheShape))
        cache.v.push(alloc('bf16', cacheShape))
      }
      const act = allocateActivations(alloc, config, maxBatchTokens, maxLogitRows, unfused)
      const head = new OutputHead(device, maxLogitRows)
      owned.push(head)
      const state = { weights, cache, act, cosSin, head }
      const model = new Transformer(config, device, maxBatchTokens, kvBlocks, kvBlockSize, maxLogitRows, maxPositions, state, unfused)
      model.probe(dir)
      return model
    } catch (err) {
      for (const t of owned) t.dispose()
      disposeWeights(weights)
      throw err
    }
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
    const out = this.forward(chunks)
    const rows = out.logits.shape[0]!
    if (choices.length !== rows)
      throw new RangeError(`Expected ${rows} token choices (one per logits row) for choices but received ${choices.length}`)
    for (const [r, c] of choices.entries())
      if (c.target >= this.config.vocabSize)
        throw new RangeError(`Expected an integer between -1 and ${this.config.vocabSize - 1} for choices[${r}].target but received ${c.target}`)
    return this.head.choose(out.logits, choices, topN)
  }

  /** Runs one step over `chunks`; the returned logits tensor is overwritten by the next forward. */
  forward(chunks: SequenceChunk[]): ForwardOutput {
    if (this.disposed) throw new DisposedError('transformer')
    const step = this.layout(chunks, this.checkChunks(chunks))
    const n = native()
    const T = step.tokens
    const R = step.logitRows
    const B = step.sequences
    const inputs = n.fromBuffer(this.device, 'i32', [step.packed.length], step.packed)
    let at = 0
    const next = (count: number) => n.narrow(inputs, (at += count) - count, count)
    const ids = next(T)
    const positions = next(T)
    const slots = next(T)
    const logitRows = next(R)
    const batch: AttentionBatch = {
      queryStart: next(B + 1),
      seqLens: next(B),
      blockTables: n.view(next(B * step.maxBlocks), [B, step.maxBlocks]),
      maxQueryLen: step.maxQueryLen,
      maxSeqLen: step.maxSeqLen,
    }
    try {
      const c = this.config
      const rows = (t: NativeTensor, count = T) => n.narrow(t, 0, count)
      const residual = rows(this.act.residual)
      const normed = rows(this.act.normed)
      n.embedding(residual, this.weights.embedTokens, ids)
      n.rmsnorm(normed, residual, this.weights.layers[0]!.inputNorm, c.rmsNormEps)
      for (let l = 0; l < c.numLayers; l++) {
        const layer = this.weights.layers[l]!
        const nextNorm = l + 1 < c.numLayers ? this.weights.layers[l + 1]!.inputNorm : this.weights.norm
        this.attentionBlock(l, layer, T, normed, positions, slots, batch)
        // residual += o_proj; normed = post_attention_layernorm(residual)
        n.addRmsnorm(normed, residual, rows(this.act.proj), layer.postAttentionNorm, c.rmsNormEps)
        this.mlpBlock(layer, T, normed)
        // residual += down_proj; normed = next layer's input norm (or the final norm)
        n.addRmsnorm(normed, residual, rows(this.act.proj), nextNorm, c.rmsNormEps)
      }
      const logits = rows(this.act.logits, R)
      if (R > 0) {
        const gathered = rows(this.act.gathered, R)
        n.embedding(gathered, normed, logitRows) // row gather: gathered[r] = normed[logitRows[r]]
        n.matmul(logits, gathered, this.weights.lmHead, null) // [R,H] · [V,H]^T -> f32 [R,V]
      }
      return { logits, rowsPerChunk: step.rowsPerChunk }
    } finally {
      // Frees in stream order on CUDA: the ops enqueued above still read it.
      inputs.dispose()
    }
  }

  // x = normed [T,H] -> act.proj [T,H] = o_proj(attention(rope(q), cache))
  private attentionBlock(
    l: number,
    w: LayerWeights,
    T: number,
    normed: NativeTensor,
    positions: NativeTensor,
    slots: NativeTensor,
    batch: AttentionBatch,
  ): void {
    const n = native()
    const c = this.config
    const D = c.headDim
    let q3: NativeTensor
    if (this.unfused) {
      q3 = this.unfusedAttentionInputs(l, w, T, normed, positions, slots)
    } else {
      const qkv = n.narrow(this.act.qkv, 0, T)
      n.matmul(qkv, normed, w.qkvProj, w.qkvBias) // [T,H] · [(heads+2kv)*D,H]^T -> [T, q|k|v]
      // q -> rope(q_norm(q)); k -> rope(k_norm(k)) and v -> the cache rows at slots
      q3 = n.view(n.narrow(this.act.q, 0, T), [T, c.numHeads, D])
      n.qkvRopeAppend(q3, this.cache.k[l]!, this.cache.v[l]!, qkv, positions, this.cosSin, slots, w.qNorm, w.kNorm, c.rmsNormEps)
    }
    const attn = n.narrow(this.act.attn, 0, T)
    n.attention(n.view(attn, [T, c.numHeads, D]), q3, this.cache.k[l]!, this.cache.v[l]!, batch, 1 / Math.sqrt(D))
    n.matmul(n.narrow(this.act.proj, 0, T), attn, w.oProj, w.oBias) // [T,heads*D] · [H,heads*D]^T -> [T,H]
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
    const flat = n.view(this.act.qkv, [this.act.qkv.shape[0]! * this.act.qkv.shape[1]!])
    let at = 0
    let row = 0
    const [q0, k0, v] = widths.map((width) => {
      const out = n.view(n.narrow(flat, (at += T * width) - T * width, T * width), [T, width])
      const weight = n.narrow(w.qkvProj, row, width)
      const bias = w.qkvBias && n.narrow(w.qkvBias, row, width)
      row += width
      n.matmul(out, normed, weight, bias) // [T,H] · [width,H]^T -> [T,width]
      return out
    }) as [NativeTensor, NativeTensor, NativeTensor]
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

  // x = normed [T,H] -> act.proj [T,H] = down(silu(gate(x)) * up(x))
  private mlpBlock(w: LayerWeights, T: number, normed: NativeTensor): void {
    const n = native()
    const I = this.config.intermediateSize
    const act = n.narrow(this.act.act, 0, T)
    if (this.unfused) {
      // gate and up as two products into two [T,I] blocks of act.gateUp's memory
      const flat = n.view(this.act.gateUp, [this.act.gateUp.shape[0]! * 2 * I])
      const [gate, up] = [0, 1].map((i) => {
        const out = n.view(n.narrow(flat, i * T * I, T * I), [T, I])
        n.matmul(out, normed, n.narrow(w.gateUpProj, i * I, I), w.gateUpBias && n.narrow(w.gateUpBias, i * I, I))
        return out
      }) as [NativeTensor, NativeTensor]
      n.siluMul(act, gate, up)
    } else {
      const gateUp = n.narrow(this.act.gateUp, 0, T)
      n.matmul(gateUp, normed, w.gateUpProj, w.gateUpBias) // [T,H] · [2I,H]^T -> [T, gate|up]
      n.siluMulPacked(act, gateUp) // [T, gate|up] -> [T,I]
    }
    n.matmul(n.narrow(this.act.proj, 0, T), act, w.downProj, w.downBias) // [T,I] · [H,I]^T -> [T,H]
  }

  /** Validates the chunks at the boundary, with messages that name the chunk and field. */
  private checkChunks(chunks: SequenceChunk[]): StepSizes {
    if (!Array.isArray(chunks) || chunks.length === 0)
      throw new TypeError(`Expected a non-empty array of sequence chunks for chunks but received ${describeValue(chunks)}`)
    const vocab = this.config.vocabSize
    const sizes: StepSizes = { tokens: 0, logitRows: 0, maxBlocks: 1 }
    for (let i = 0; i < chunks.length; i++) {
      const ch = chunks[i]!
      const at = `chunks[${i}]`
      if (typeof ch !== 'object' || ch === null) throw new TypeError(`Expected a sequence chunk for ${at} but received ${describeValue(ch)}`)
      if (!Array.isArray(ch.tokens) || ch.tokens.length === 0)
        throw new TypeError(`Expected a non-empty array of token ids for ${at}.tokens but received ${describeValue(ch.tokens)}`)
      for (let j = 0; j < ch.tokens.length; j++) {
        const id = ch.tokens[j]
        if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= vocab)
          throw new RangeError(`Expected an integer between 0 and ${vocab - 1} for ${at}.tokens[${j}] but received ${describeValue(id)}`)
      }
      checkInteger(`${at}.startPosition`, ch.startPosition, 0)
      const end = ch.startPosition + ch.tokens.length
      if (end > this.maxPositions) {
        const limit = this.maxPositions === this.config.maxPositionEmbeddings ? 'max_position_embeddings' : 'KV cache capacity'
        throw new RangeError(
          `Expected positions below ${this.maxPositions} (${limit}) for ${at} but received positions ${ch.startPosition}..${end - 1}`,
        )
      }
      const need = Math.ceil(end / this.kvBlockSize)
      if (!Array.isArray(ch.blockTable) || ch.blockTable.length < need)
        throw new RangeError(
          `Expected at least ${need} block ids for ${at}.blockTable (positions 0..${end - 1}, ${this.kvBlockSize} per block) but received ${describeValue(ch.blockTable)}`,
        )
      for (let j = 0; j < need; j++) {
        const b = ch.blockTable[j]
        if (typeof b !== 'number' || !Number.isInteger(b) || b < 0 || b >= this.kvBlocks)
          throw new RangeError(`Expected an integer between 0 and ${this.kvBlocks - 1} for ${at}.blockTable[${j}] but received ${describeValue(b)}`)
      }
      if (ch.logits !== 'none' && ch.logits !== 'last' && ch.logits !== 'all')
        throw new TypeError(`Expected 'none', 'last' or 'all' for ${at}.logits but received ${describeValue(ch.logits)}`)
      sizes.tokens += ch.tokens.length
      sizes.logitRows += ch.logits === 'all' ? ch.tokens.length : ch.logits === 'last' ? 1 : 0
      sizes.maxBlocks = Math.max(sizes.maxBlocks, need)
    }
    if (sizes.tokens > this.maxBatchTokens)
      throw new RangeError(`Expected at most ${this.maxBatchTokens} tokens (maxBatchTokens) for chunks but received ${sizes.tokens}`)
    if (sizes.logitRows > this.maxLogitRows)
      throw new RangeError(`Expected at most ${this.maxLogitRows} logit rows (maxLogitRows) for chunks but received ${sizes.logitRows}`)
    return sizes
  }

  /** Lays out the step's integer inputs (see StepLayout) from validated chunks. */
  private layout(chunks: SequenceChunk[], sizes: StepSizes): StepLayout {
    const { tokens: T, logitRows: R, maxBlocks } = sizes
    const B = chunks.length
    const bs = this.kvBlockSize
    const packed = new Int32Array(3 * T + R + (B + 1) + B + B * maxBlocks)
    const ids = packed.subarray(0, T)
    const positions = packed.subarray(T, 2 * T)
    const slots = packed.subarray(2 * T, 3 * T)
    const logitRows = packed.subarray(3 * T, 3 * T + R)
    const queryStart = packed.subarray(3 * T + R, 3 * T + R + B + 1)
    const seqLens = packed.subarray(3 * T + R + B + 1, 3 * T + R + 2 * B + 1)
    const blockTables = packed.subarray(3 * T + R + 2 * B + 1)
    const step: StepLayout = { packed, tokens: T, logitRows: R, sequences: B, maxBlocks, rowsPerChunk: [], maxQueryLen: 0, maxSeqLen: 0 }
    let row = 0
    let logitRow = 0
    for (let b = 0; b < B; b++) {
      const ch = chunks[b]!
      const len = ch.tokens.length
      const end = ch.startPosition + len
      for (let j = 0; j < Math.ceil(end / bs); j++) blockTables[b * maxBlocks + j] = ch.blockTable[j]!
      for (let j = 0; j < len; j++) {
        const pos = ch.startPosition + j
        ids[row + j] = ch.tokens[j]!
        positions[row + j] = pos
        slots[row + j] = ch.blockTable[Math.floor(pos / bs)]! * bs + (pos % bs)
      }
      const first = ch.logits === 'all' ? 0 : len - 1
      const count = ch.logits === 'all' ? len : ch.logits === 'last' ? 1 : 0
      for (let j = 0; j < count; j++) logitRows[logitRow++] = row + first + j
      step.rowsPerChunk.push(count)
      queryStart[b] = row
      seqLens[b] = end
      step.maxQueryLen = Math.max(step.maxQueryLen, len)
      step.maxSeqLen = Math.max(step.maxSeqLen, end)
      row += len
    }
    queryStart[B] = row
    return step
  }

  /** Frees the weights, the KV cache and the step buffers. */
  dispose(): void {
    if (this.disposed) return
    this.disposed = true
    disposeWeights(this.weights)
    for (const t of [...this.cache.k, ...this.cache.v]) t.dispose()
    for (const t of Object.values(this.act)) t?.dispose()
    this.cosSin.dispose()
    this.head.dispose()
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.dispose()
  }
}
