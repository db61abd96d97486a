// A paged KV cache holding a set of sequences with random bf16 queries, keys and values, and the
// launches the attention tests make over it. Each sequence owns shuffled, non-contiguous pages;
// pages nobody owns hold NaN so that reading one shows up in the output.
import { native, type DeviceName, type NativeTensor } from '../../lib/native.js'
import { fromBf16, readBytes, roundBf16, tensorFrom } from '../../lib/tensor.js'
import { mulberry32, randomArray } from '../helpers/random.js'
import { NAN_BF16 } from './reference.js'

export interface AttentionShape {
  heads: number
  kvHeads: number
  dim: number
  blockSize: number
}

export interface SequenceData {
  len: number
  q: Float32Array // [len, heads, dim], bf16 values: the query of every position
  k: Float32Array // [len, kvHeads, dim]
  v: Float32Array
  pages: number[] // physical page of each logical block
}

/** Queries of one sequence in a launch: positions [start, end); the sequence has `end` keys. */
export interface Slice {
  seq: number
  start: number
  end: number
}

// Bounds of an output against the float64 reference: bf16 output (2^-9 relative) plus bf16
// attention weights in P·V (2^-9 relative each, on values of magnitude <= 1), with margin.
export const ATOL = 2e-3
export const RTOL = 2 ** -7

/**
 * Max |out − ref| / (ATOL + RTOL·|ref|) over all rows of the slices (a non-finite output counts as
 * infinitely far), the Frobenius relative error, and how many outputs are not finite.
 */
export function compareToReference(
  scene: AttentionScene,
  slices: Slice[],
  outs: Uint16Array[],
): { worst: number; frob: number; nonFinite: number } {
  const { heads, dim } = scene.shape
  let worst = 0
  let num = 0
  let den = 0
  let nonFinite = 0
  slices.forEach((sl, i) => {
    const got = fromBf16(outs[i]!)
    for (let pos = sl.start; pos < sl.end; pos++)
      for (let h = 0; h < heads; h++) {
        const ref = scene.reference(sl.seq, pos, h)
        const base = ((pos - sl.start) * heads + h) * dim
        for (let d = 0; d < dim; d++) {
          const o = got[base + d]!
          const r = ref[d]!
          if (!Number.isFinite(o)) nonFinite++
          const err = Number.isFinite(o) ? Math.abs(o - r) : Infinity
          worst = Math.max(worst, err / (ATOL + RTOL * Math.abs(r)))
          num += err * err
          den += r * r
        }
      }
  })
  return { worst, frob: Math.sqrt(num / den), nonFinite }
}

export class AttentionScene {
  readonly seqs: SequenceData[] = []
  readonly scale: number
  private kCache: NativeTensor
  private vCache: NativeTensor

  constructor(
    readonly device: DeviceName,
    readonly shape: AttentionShape,
    lengths: number[],
    seed: number,
    /** uniform range of the queries; keys and values are uniform in [-1, 1) */
    qRange = 3,
  ) {
    const { heads, kvHeads, dim, blockSize } = shape
    this.scale = 1 / Math.sqrt(dim)
    const pagesPerSeq = lengths.map((len) => Math.ceil(len / blockSize))
    const totalPages = pagesPerSeq.reduce((a, b) => a + b, 0) + 3
    const order = shuffle([...Array(totalPages).keys()], seed)
    let next = 0
    lengths.forEach((len, i) => {
      const s = seed * 7919 + i * 104729
      this.seqs.push({
        len,
        q: roundBf16(randomArray(len * heads * dim, s + 1, qRange)),
        k: roundBf16(randomArray(len * kvHeads * dim, s + 2)),
        v: roundBf16(randomArray(len * kvHeads * dim, s + 3)),
        pages: order.slice(next, (next += pagesPerSeq[i]!)),
      })
    })
    const cacheShape = [totalPages, blockSize, kvHeads, dim]
    const poison = new Uint16Array(totalPages * blockSize * kvHeads * dim).fill(NAN_BF16)
    this.kCache = tensorFrom(device, 'bf16', cacheShape, poison)
    this.vCache = tensorFrom(device, 'bf16', cacheShape, poison)
    this.seqs.forEach((_, i) => this.append(i, 0, this.seqs[i]!.len))
  }

  /** Writes keys and values of positions [from, to) of sequence `seq` into the cache (kvAppend). */
  append(seq: number, from: number, to: number): void {
    const s = this.seqs[seq]!
    const { kvHeads, dim, blockSize } = this.shape
    const row = kvHeads * dim
    const slots = Int32Array.from({ length: to - from }, (_, i) => {
      const p = from + i
      return s.pages[Math.floor(p / blockSize)]! * blockSize + (p % blockSize)
    })
    const k = tensorFrom(this.device, 'bf16', [to - from, kvHeads, dim], s.k.subarray(from * row, to * row))
    const v = tensorFrom(this.device, 'bf16', [to - from, kvHeads, dim], s.v.subarray(from * row, to * row))
    native().kvAppend(this.kCache, this.vCache, k, v, tensorFrom(this.device, 'i32', [to - from], slots))
    k.dispose()
    v.dispose()
  }

  /** One attention launch over the slices (in this order); returns each slice's output rows as raw bf16 bits. */
  async run(slices: Slice[], workspace?: NativeTensor): Promise<Uint16Array[]> {
    const launch = this.prepare(slices)
    try {
      launch.enqueue(workspace)
      return await launch.read()
    } finally {
      launch.dispose()
    }
  }

  /**
   * The inputs of one launch over the slices, uploaded: `enqueue` launches attention (as often as
   * called, into the same output), `read` returns each slice's output rows as raw bf16 bits.
   */
  prepare(slices: Slice[]): { enqueue(workspace?: NativeTensor): void; read(): Promise<Uint16Array[]>; dispose(): void } {
    const { heads, dim, blockSize } = this.shape
    const rowSize = heads * dim
    const starts = [0]
    for (const sl of slices) starts.push(starts[starts.length - 1]! + sl.end - sl.start)
    const total = starts[starts.length - 1]!
    const q = new Float32Array(total * rowSize)
    slices.forEach((sl, i) => q.set(this.seqs[sl.seq]!.q.subarray(sl.start * rowSize, sl.end * rowSize), starts[i]! * rowSize))
    const maxBlocks = Math.max(...slices.map((sl) => Math.ceil(sl.end / blockSize)))
    const tables = new Int32Array(slices.length * maxBlocks)
    slices.forEach((sl, i) => {
      const pages = this.seqs[sl.seq]!.pages
      for (let b = 0; b < Math.ceil(sl.end / blockSize); b++) tables[i * maxBlocks + b] = pages[b]!
    })
    const d = this.device
    const qT = tensorFrom(d, 'bf16', [total, heads, dim], q)
    const out = native().empty(d, 'bf16', [total, heads, dim])
    const batch = {
      blockTables: tensorFrom(d, 'i32', [slices.length, maxBlocks], tables),
      queryStart: tensorFrom(d, 'i32', [slices.length + 1], starts),
      seqLens: tensorFrom(d, 'i32', [slices.length], slices.map((sl) => sl.end)),
      maxQueryLen: Math.max(...slices.map((sl) => sl.end - sl.start)),
      maxSeqLen: Math.max(...slices.map((sl) => sl.end)),
    }
    return {
      enqueue: (workspace) => native().attention(out, qT, this.kCache, this.vCache, batch, this.scale, workspace),
      read: async () => {
        const bytes = await readBytes(out)
        const bits = new Uint16Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength))
        return slices.map((_, i) => bits.slice(starts[i]! * rowSize, starts[i + 1]! * rowSize))
      },
      dispose: () => {
        for (const t of [qT, out, batch.blockTables, batch.queryStart, batch.seqLens]) t.dispose()
      },
    }
  }

  /** float64 attention of sequence `seq` at position `pos`, head `h`: softmax(q·K^T·scale)·V over keys 0..pos. */
  reference(seq: number, pos: number, h: number): Float64Array {
    const { heads, kvHeads, dim } = this.shape
    const s = this.seqs[seq]!
    const kvh = Math.floor(h / (heads / kvHeads))
    const qo = (pos * heads + h) * dim
    const scores = new Float64Array(pos + 1)
    let max = -Infinity
    for (let j = 0; j <= pos; j++) {
      const ko = (j * kvHeads + kvh) * dim
      let acc = 0
      for (let d = 0; d < dim; d++) acc += s.q[qo + d]! * s.k[ko + d]!
      scores[j] = acc * this.scale
      if (scores[j]! > max) max = scores[j]!
    }
    const out = new Float64Array(dim)
    let sum = 0
    for (let j = 0; j <= pos; j++) {
      const w = Math.exp(scores[j]! - max)
      sum += w
      const vo = (j * kvHeads + kvh) * dim
      for (let d = 0; d < dim; d++) out[d] = out[d]! + w * s.v[vo + d]!
    }
    for (let d = 0; d < dim; d++) out[d] = out[d]! / sum
    return out
  }

  dispose(): void {
    this.kCache.dispose()
    this.vCache.dispose()
  }
}

export function shuffle<T>(items: T[], seed: number): T[] {
  const rand = mulberry32(seed)
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1))
    ;[items[i], items[j]] = [items[j]!, items[i]!]
  }
  return items
}

/** Index of the first position (row of `heads·dim` values) where a and b differ, or -1. */
export function firstDifferentRow(a: Uint16Array, b: Uint16Array, rowSize: number): number {
  if (a.length !== b.length) return 0
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return Math.floor(i / rowSize)
  return -1
}
