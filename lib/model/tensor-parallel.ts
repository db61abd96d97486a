// Tensor parallelism, emulated in one process (README "Tensor parallelism (emulated)").
//
// A TP degree N in {1, 2, 4, 8} gives rank r:
// - column-parallel layers, a slice of the weight's rows: the q|k|v product its heads r*heads/N..
//   (and kv heads likewise), gate|up its I/N columns of each, lm_head its V/N vocabulary rows;
//   each output element is the same dot product as over the whole weight, so nothing changes;
// - its own KV cache of kvHeads/N heads, and attention over its heads;
// - row-parallel layers (o_proj, down_proj), its K/N columns: the partials of partitions
//   [r*8/N, (r+1)*8/N) of the fixed 8-way K partition (common/partitions.h), written to a shared
//   f32 [8, T, H] workspace that one combine adds by the fixed tree. The partition, each
//   partition's chain and the tree are the same at every N, so every N gives TP1's bits.
// Ranks run one after the other as separate launches; the per-rank weights are copies built at load.
import { invalidArgument } from '../errors.js'
import { native, type DeviceName, type NativeTensor } from '../native.js'
import type { ModelConfig } from './config.js'
import { allocationError, type LayerWeights, type ModelWeights } from './weights.js'

export const TENSOR_PARALLEL_DEGREES = [1, 2, 4, 8] as const
const PARTITIONS = 8
const PARTITION_STEP = 16

/** One rank's share of a layer's weights (rank 0 of TP1: the layer's own tensors). */
export interface RankLayer {
  qkvProj: NativeTensor // [(heads + 2*kvHeads)/N * D, H]
  qkvBias: NativeTensor | null
  oProj: NativeTensor // [H, heads*D/N]
  gateUpProj: NativeTensor // [2I/N, H]
  gateUpBias: NativeTensor | null
  downProj: NativeTensor // [H, I/N]
}

/**
 * Checks a tensorParallel option against the model and the device; returns N. The model's heads,
 * kv heads, intermediate size and vocabulary must divide by N, and the row-parallel K (heads *
 * head_dim and intermediate_size) must split into 8 partitions of a multiple of 16 columns.
 */
export function checkTensorParallel(value: unknown, c: ModelConfig, device: DeviceName): number {
  if (!TENSOR_PARALLEL_DEGREES.includes(value as 1)) throw invalidArgument('tensorParallel', '1, 2, 4 or 8', value)
  const N = value as number
  if (device === 'cuda' && N > 1)
    throw new Error(
      `Expected tensorParallel 1 on CUDA but received ${N}: a multi-GPU run needs ${N} GPUs and NCCL, which this build ` +
        `does not have; tensor parallelism above 1 is emulated on the CPU only (device: 'cpu')`,
    )
  const divisible: [string, number][] = [
    ['num_attention_heads', c.numHeads],
    ['num_key_value_heads', c.numKvHeads],
    ['intermediate_size', c.intermediateSize],
    ['vocab_size', c.vocabSize],
  ]
  for (const [field, size] of divisible)
    if (size % N !== 0)
      throw new Error(`Expected ${field} of the model to be divisible by tensorParallel ${N} but received ${field} ${size}`)
  const rowParallel: [string, number][] = [
    ['num_attention_heads * head_dim (the K of o_proj)', c.numHeads * c.headDim],
    ['intermediate_size (the K of down_proj)', c.intermediateSize],
  ]
  for (const [what, K] of rowParallel)
    if (K % (PARTITIONS * PARTITION_STEP) !== 0)
      throw new Error(
        `Expected ${what} to be a multiple of ${PARTITIONS * PARTITION_STEP} (${PARTITIONS} partitions of a multiple of ` +
          `${PARTITION_STEP} columns) for tensorParallel but received ${K}`,
      )
  return N
}

/** The rows of each [start, count) range, in order, of a matrix of `width` values per row. */
function takeRows(bits: Uint16Array, width: number, ranges: [number, number][]): Uint16Array {
  const out = new Uint16Array(ranges.reduce((s, [, n]) => s + n, 0) * width)
  let at = 0
  for (const [start, count] of ranges) {
    out.set(bits.subarray(start * width, (start + count) * width), at)
    at += count * width
  }
  return out
}

/** Columns [start, start+count) of a [rows, width] matrix. */
function takeColumns(bits: Uint16Array, rows: number, width: number, start: number, count: number): Uint16Array {
  const out = new Uint16Array(rows * count)
  for (let i = 0; i < rows; i++) out.set(bits.subarray(i * width + start, i * width + start + count), i * count)
  return out
}

async function bitsOf(t: NativeTensor): Promise<Uint16Array> {
  const bytes = await native().download(t)
  return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2)
}

/**
 * Every rank's weights of every layer ([rank][layer]). At N = 1 rank 0 holds the layer's own
 * tensors; above, copies of the slices (owned: disposeRankLayers frees them).
 */
export async function rankLayers(w: ModelWeights, c: ModelConfig, device: DeviceName, N: number, dir: string): Promise<RankLayer[][]> {
  const whole = (l: LayerWeights): RankLayer => ({
    qkvProj: l.qkvProj,
    qkvBias: l.qkvBias,
    oProj: l.oProj,
    gateUpProj: l.gateUpProj,
    gateUpBias: l.gateUpBias,
    downProj: l.downProj,
  })
  if (N === 1) return [w.layers.map(whole)]
  const n = native()
  const D = c.headDim
  const H = c.hiddenSize
  const I = c.intermediateSize
  const q = c.numHeads * D
  const kv = c.numKvHeads * D
  const made: NativeTensor[] = []
  let at = '' // the rank and layer being uploaded, for an error's message
  const upload = (what: string, shape: number[], bits: Uint16Array) => {
    let t: NativeTensor
    try {
      t = n.fromBuffer(device, 'bf16', shape, bits)
    } catch (err) {
      throw allocationError(`upload ${at}'s ${what} to ${device}`, 'bf16', shape, dir, err)
    }
    made.push(t)
    return t
  }
  try {
    const ranks: RankLayer[][] = Array.from({ length: N }, () => [])
    for (const [l, layer] of w.layers.entries()) {
      const qkv = await bitsOf(layer.qkvProj)
      const qkvBias = layer.qkvBias && (await bitsOf(layer.qkvBias))
      const o = await bitsOf(layer.oProj)
      const gateUp = await bitsOf(layer.gateUpProj)
      const gateUpBias = layer.gateUpBias && (await bitsOf(layer.gateUpBias))
      const down = await bitsOf(layer.downProj)
      for (let r = 0; r < N; r++) {
        at = `rank ${r}'s copy of layer ${l}`
        // q|k|v rows are [q heads | k heads | v heads]: the rank's heads of each block.
        const qkvRanges: [number, number][] = [
          [(r * q) / N, q / N],
          [q + (r * kv) / N, kv / N],
          [q + kv + (r * kv) / N, kv / N],
        ]
        const gateUpRanges: [number, number][] = [
          [(r * I) / N, I / N],
          [I + (r * I) / N, I / N],
        ]
        const qkvRows = (q + 2 * kv) / N
        ranks[r]!.push({
          qkvProj: upload('q|k|v projection', [qkvRows, H], takeRows(qkv, H, qkvRanges)),
          qkvBias: qkvBias && upload('q|k|v bias', [qkvRows], takeRows(qkvBias, 1, qkvRanges)),
          oProj: upload('o projection', [H, q / N], takeColumns(o, H, q, (r * q) / N, q / N)),
          gateUpProj: upload('gate|up projection', [(2 * I) / N, H], takeRows(gateUp, H, gateUpRanges)),
          gateUpBias: gateUpBias && upload('gate|up bias', [(2 * I) / N], takeRows(gateUpBias, 1, gateUpRanges)),
          downProj: upload('down projection', [H, I / N], takeColumns(down, H, I, (r * I) / N, I / N)),
        })
      }
    }
    return ranks
  } catch (err) {
    for (const t of made) t.dispose()
    throw err
  }
}

/** Frees the per-rank copies (nothing at N = 1, whose rank holds the model's own tensors). */
export function disposeRankLayers(ranks: RankLayer[][]): void {
  if (ranks.length <= 1) return
  for (const layers of ranks) for (const l of layers) for (const t of Object.values(l)) (t as NativeTensor | null)?.dispose()
}
