// What loading a model allocates on its device, and the check, before the first weight is uploaded,
// that a CUDA device's free memory holds it. The bytes come from the config and the sizes the model
// is loaded with (the weight files' headers give the same shapes: checkTensors holds them to the
// config); nothing is read or allocated to measure them.
//
// With H hidden_size, I intermediate_size, V vocab_size, n layers, h query heads and g kv heads
// of D values (q = h*D, kv = g*D), T = maxBatchTokens, L = maxLogitRows, bs = kvBlockSize and
// P = min(max_position_embeddings, kvBlocks * bs) the longest sequence:
//
//   weights    2 * (the elements of every tensor)   bf16 on the device, whatever the file's dtype
//              (fp16 and fp32 are converted); a tied lm_head is the embedding, counted once
//   KV cache   2 * n * kvBlocks * bs * g * D * 2    k and v of every layer, bf16 (the emulated
//              ranks' caches of g/N heads each add up to the same)
//   other      activations     2*T*(4H + (q + 2kv) + 2q + 3I) + 2*L*H + 4*L*V
//                              (residual x2, normed, proj, q|k|v, q, attn, gate|up, act, gathered
//                              rows in bf16, logits in f32; unfused Qwen3 layers add 2*T*(q + kv))
//              small buffers   4*P*D (RoPE table, f32) + 4*(5T + L + 1 + T*ceil(P/bs)) (step
//                              inputs) + 4*51*L (token-choice parameters and results)
//              tensorParallel  4*8*T*H (the row-parallel partials); above 1 rank (CPU only), the
//                              ranks' copies of q|k|v, o, gate|up and down (2*n*((q + 2kv)*H + H*q +
//                              3*I*H) plus their q|k|v and gate|up biases), their step buffers
//                              2*T*((q + 2kv) + 2q + 3I) and the logit shards 4*L*V
//              decode (CUDA)   4*R*h*ceil(P/S)*(D + 2) with R = maxDecodeRows and S = 256 keys per
//                              attention split (the addon's attentionSplitSize): the decode
//                              attention workspace (split partials and their max/sum) of the
//                              largest decode step replayed as a CUDA graph, allocated at load
//              logit processors  Lp*(6V + 4*ceil(V/32) + 4*618) + 4 with Lp = logitProcessorRows:
//                              the table of penalties, logit bias and token masks (counts u16,
//                              processed logits f32, mask bits, settings and plan;
//                              lib/model/logit-processors.ts). Allocated at the first request
//                              that uses one, not at load, but reserved here: that request must
//                              find the memory the KV cache would otherwise have taken
//
// The check asks for that plus a margin of 256 MiB and 1% of the device's memory, for what the
// estimate leaves out: kernel code CUDA loads on first use, the captured graphs' own memory (8 MiB
// for the 13 buckets of a Qwen3-0.6B benchmark), the token-choice workspace (22 MiB at a 151,936
// vocabulary) and the allocator's rounding.
import { DeviceMemoryError } from '../errors.js'
import { native } from '../native.js'
import type { ModelConfig } from './config.js'
import { LogitProcessorTable } from './logit-processors.js'
import { MAX_TOP_LOGPROBS } from './output-head.js'
import { inputInts } from './step-layout.js'
import { expectedTensors } from './weights.js'

/** The sizes a Transformer is loaded with: what its allocations follow. */
export interface LoadSizes {
  maxBatchTokens: number
  maxLogitRows: number
  kvBlocks: number
  kvBlockSize: number
  /** 0 when unset; 1, 2, 4 or 8 emulated ranks. */
  tensorParallel: number
  /** Rows of the decode attention workspace allocated at load: maxDecodeRows on CUDA, 0 elsewhere. */
  decodeWorkspaceRows: number
  /** Rows of the logit processors' table (allocated at its first use, not at load); 0 for none. */
  logitProcessorRows: number
  unfusedLayers?: boolean
}

export interface MemoryItem {
  what: string
  bytes: number
}

/** What a load allocates on its device, in bytes. */
export interface LoadMemory {
  weights: number
  kvCache: number
  /** Everything else, item by item (items of 0 bytes left out). */
  other: MemoryItem[]
  otherBytes: number
  total: number
  /** Positions the KV cache holds (kvBlocks * kvBlockSize). */
  kvPositions: number
  /** The longest sequence: min(max_position_embeddings, kvPositions). */
  maxPositions: number
}

/** The device's memory as the check reads it. */
export interface DeviceMemory {
  free: number
  total: number
  /** The device's name, for the message. */
  name?: string
}

const MiB = 2 ** 20
const GiB = 2 ** 30
const BF16 = 2
const F32 = 4
const I32 = 4
/** Token-choice buffers per logits row: parameters (8) and results (2 + 2 * MAX_TOP_LOGPROBS) and a row map (1), i32. */
const HEAD_INTS_PER_ROW = 8 + (2 + 2 * MAX_TOP_LOGPROBS) + 1

/**
 * f32 elements of decode attention's split partials for `rows` sequences of up to `positions`
 * keys: an output row of D and a (max, sum) pair per (sequence, query head, split), as the CUDA
 * decode launch lays them out (csrc/kernels/attention.cu).
 */
export function decodeWorkspaceFloats(c: ModelConfig, rows: number, positions: number): number {
  return rows * c.numHeads * Math.ceil(positions / native().attentionSplitSize()) * (c.headDim + 2)
}

/** Bytes of tensors of these shapes on the device, where every weight is bf16. */
export function deviceWeightBytes(tensors: readonly { shape: readonly number[] }[]): number {
  return tensors.reduce((sum, t) => sum + t.shape.reduce((a, b) => a * b, 1) * BF16, 0)
}

/** The safety margin the check keeps free: 256 MiB and 1% of the device's memory. */
export function memoryMargin(totalMemory: number): number {
  return 256 * MiB + Math.ceil(totalMemory / 100)
}

/**
 * What loading `c` with `s` allocates on its device (the formula at the top of this file).
 * `weightBytes` defaults to the tensors the config implies.
 */
export function estimateLoadMemory(c: ModelConfig, s: LoadSizes, { weightBytes }: { weightBytes?: number } = {}): LoadMemory {
  const { maxBatchTokens: T, maxLogitRows: L, kvBlocks, kvBlockSize: bs } = s
  const H = c.hiddenSize
  const I = c.intermediateSize
  const V = c.vocabSize
  const D = c.headDim
  const q = c.numHeads * D
  const kv = c.numKvHeads * D
  const N = s.tensorParallel
  const kvPositions = kvBlocks * bs
  const P = Math.min(c.maxPositionEmbeddings, kvPositions)

  const weights = weightBytes ?? deviceWeightBytes(expectedTensors(c))
  const kvCache = 2 * c.numLayers * kvPositions * kv * BF16
  const other: MemoryItem[] = []
  const add = (what: string, bytes: number) => {
    if (bytes > 0) other.push({ what, bytes })
  }

  const unfusedNorms = s.unfusedLayers && c.qkNorm ? T * (q + kv) : 0
  add(
    `activations for ${count(T)} tokens and ${count(L)} logit rows`,
    BF16 * (T * (4 * H + (q + 2 * kv) + 2 * q + 3 * I) + L * H + unfusedNorms) + F32 * L * V,
  )
  add(
    'RoPE table, step inputs and token-choice buffers',
    F32 * P * D + I32 * inputInts(T, L, T, Math.ceil(P / bs)) + I32 * HEAD_INTS_PER_ROW * L,
  )
  if (N >= 1) add('row-parallel partials of tensorParallel', F32 * 8 * T * H)
  if (N > 1) {
    const layer = (q + 2 * kv) * H + H * q + 3 * I * H + (c.qkvBias ? q + 2 * kv : 0) + (c.mlpBias ? 2 * I : 0)
    add(`the ${N} ranks' copies of the layer weights`, BF16 * c.numLayers * layer)
    add(`the ${N} ranks' step buffers and logit shards`, BF16 * T * (q + 2 * kv + 2 * q + 3 * I) + F32 * L * V)
  }
  const R = s.decodeWorkspaceRows
  add(`decode attention workspace (${count(R)} sequences at ${count(P)} positions)`, F32 * decodeWorkspaceFloats(c, R, P))
  const Lp = s.logitProcessorRows
  if (Lp > 0) add(`logit processors (penalties, bias, masks) for ${count(Lp)} sequences`, LogitProcessorTable.bytes(Lp, V))
  const otherBytes = other.reduce((sum, o) => sum + o.bytes, 0)
  return { weights, kvCache, other, otherBytes, total: weights + kvCache + otherBytes, kvPositions, maxPositions: P }
}

/**
 * Throws a DeviceMemoryError unless what loading `c` with `s` allocates, plus the margin, fits in
 * the device's free memory; returns the estimate otherwise. `model` names the model in the message.
 */
export function checkDeviceMemory(
  model: string,
  c: ModelConfig,
  s: LoadSizes,
  device: DeviceMemory,
  weightBytes?: number,
): LoadMemory {
  const estimate = (kvBlocks: number) =>
    estimateLoadMemory(c, { ...s, kvBlocks }, weightBytes !== undefined ? { weightBytes } : {})
  const need = estimate(s.kvBlocks)
  const margin = memoryMargin(device.total)
  if (need.total + margin <= device.free) return need
  // The largest KV cache that fits with everything else unchanged (the estimate grows with kvBlocks).
  let fits = 0
  for (let lo = 1, hi = s.kvBlocks - 1; lo <= hi; ) {
    const mid = Math.floor((lo + hi) / 2)
    if (estimate(mid).total + margin <= device.free) {
      fits = mid
      lo = mid + 1
    } else {
      hi = mid - 1
    }
  }
  throw new DeviceMemoryError(deviceMemoryMessage(model, s, need, margin, device, fits), {
    weights: need.weights,
    kvCache: need.kvCache,
    other: need.otherBytes,
    margin,
    free: device.free,
    total: device.total,
  })
}

/** The message of a load that does not fit; `fitBlocks` is the largest KV cache (in blocks) that would, or 0. */
export function deviceMemoryMessage(
  model: string,
  s: LoadSizes,
  need: LoadMemory,
  margin: number,
  device: DeviceMemory,
  fitBlocks: number,
): string {
  const items = need.other.map((o) => `${o.what} ${formatBytes(o.bytes)}`).join(', ')
  const lines = [
    `Not enough free memory on GPU 0${device.name ? ` (${device.name})` : ''} to load the model in ${model}: ` +
      `it needs ${formatBytes(need.total)} (weights ${formatBytes(need.weights)} in bf16, ` +
      `KV cache ${formatBytes(need.kvCache)} for ${count(need.kvPositions)} positions, ` +
      `other ${formatBytes(need.otherBytes)}: ${items}) plus a safety margin of ${formatBytes(margin)} ` +
      `(256 MiB and 1% of the device's memory, for kernel code, CUDA graphs and allocator rounding), ` +
      `but ${formatBytes(device.free)} of the device's ${formatBytes(device.total)} are free.`,
  ]
  if (need.weights + margin > device.free) {
    lines.push(
      'The weights alone do not fit: detinfer holds them in bf16 (fp16 and fp32 files are converted; there is no ' +
        'smaller dtype) on one GPU (tensor parallelism over several GPUs is not in this build). Free the memory ' +
        'other processes hold on this GPU, or use a GPU with more memory.',
    )
    return lines.join(' ')
  }
  if (fitBlocks > 0) {
    const positions = count(fitBlocks * s.kvBlockSize)
    lines.push(
      `A KV cache of at most ${positions} positions fits with the rest unchanged: kvCacheTokens ${positions} or ` +
        `kvBlocks ${count(fitBlocks)} (now ${count(need.kvPositions)} positions; ` +
        '`--kv-cache-tokens` of `detinfer generate`, `score` and `serve`); it also bounds the longest sequence.',
    )
  } else {
    lines.push('Even a KV cache of one block does not fit beside the other buffers.')
  }
  // One sequence (`detinfer generate` and `score`) is as small as these get.
  const perSequence =
    s.decodeWorkspaceRows > 1 || s.logitProcessorRows > 1
      ? need.other.filter((o) => o.what.startsWith('decode attention workspace') || o.what.startsWith('logit processors'))
      : []
  const named = perSequence.map((o) => `the ${formatBytes(o.bytes)} ${o.what.startsWith('logit') ? 'logit-processor table' : 'decode attention workspace'}`)
  lines.push(
    `The activations and logits shrink with maxBatchTokens (tokens per forward pass, now ${count(s.maxBatchTokens)}; ` +
      '`detinfer serve --max-batch-tokens`)' +
      (named.length > 0
        ? `, and ${named.join(' and ')} with maxBatchSize (sequences decoded ` +
          `together, now ${count(Math.max(s.decodeWorkspaceRows, s.logitProcessorRows))}; \`detinfer serve --max-batch-size\`).`
        : '.'),
  )
  return lines.join(' ')
}

/** A count for a message, with thousands separators. */
function count(n: number): string {
  return n.toLocaleString('en-US')
}

/** Bytes for a message: GiB or MiB with two decimals, or bytes. */
export function formatBytes(bytes: number): string {
  if (bytes >= GiB) return `${(bytes / GiB).toFixed(2)} GiB`
  if (bytes >= MiB) return `${(bytes / MiB).toFixed(2)} MiB`
  return `${bytes} bytes`
}
