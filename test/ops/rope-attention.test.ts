// qkvRopeAttention: qkvRopeAppend then attention in one op. On CUDA a decode launch is one kernel
// that computes its query rows from the q|k|v product and writes each sequence's newest cache row
// itself; the output and both caches must get the bits of the two ops run one after the other,
// with every decode pipeline production can pick (forced, and the library's choice), at the
// shapes of Qwen3-0.6B and -8B (head norms), a Llama-style group without them, heads of 64 over
// pages of 12 slots (divisions, not shifts) and a group of 32 query heads (two row tiles per kv
// head, both writing the new row). Each sequence's newest cache row starts as NaN, so a kernel
// that read it before writing it would show. Then batch invariance of the fused launch, with its
// variant twin, and the errors that name a bad argument. Prefill launches run the two ops.
import { afterEach, describe, expect, it } from 'vitest'
import { native, type AttentionBatch, type DeviceName, type NativeTensor } from '../../lib/native.js'
import { readBytes, tensorFrom, toBf16 } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { mulberry32 } from '../helpers/random.js'
import { expectSameBits, randomBf16 } from './reference.js'

const n = native()
const EPS = 1e-6
const NAN_BF16 = 0x7fc0

interface Shape {
  heads: number
  kvHeads: number
  dim: number
  blockSize: number
  headNorm: boolean
}

/** Sequences of the given lengths (keys after this step) in a paged cache; one query token each. */
class Scene {
  readonly lens: number[]
  private readonly pages: number[][]
  private readonly cacheBits: Uint16Array
  private readonly cacheShape: number[]
  private readonly qkv: Float32Array
  private readonly cosSin: Float32Array
  private readonly maxPos: number
  private readonly qNorm: Float32Array | null
  private readonly kNorm: Float32Array | null

  constructor(
    readonly device: DeviceName,
    readonly shape: Shape,
    lens: number[],
    seed: number,
  ) {
    const { heads, kvHeads, dim, blockSize } = shape
    this.lens = lens
    const perSeq = lens.map((len) => Math.ceil(len / blockSize))
    const total = perSeq.reduce((a, b) => a + b, 0) + 2
    const order = [...Array(total).keys()]
    const rand = mulberry32(seed)
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1))
      ;[order[i], order[j]] = [order[j]!, order[i]!]
    }
    let next = 0
    this.pages = perSeq.map((count) => order.slice(next, (next += count)))
    // Keys 0 .. len-2 of each sequence random; key len-1 (this step's) and every other slot NaN.
    const row = kvHeads * dim
    this.cacheShape = [total, blockSize, kvHeads, dim]
    this.cacheBits = new Uint16Array(total * blockSize * row).fill(NAN_BF16)
    lens.forEach((len, s) => {
      const keys = toBf16(randomBf16((len - 1) * row, seed + 100 + s))
      for (let p = 0; p < len - 1; p++) this.cacheBits.set(keys.subarray(p * row, (p + 1) * row), this.slot(s, p) * row)
    })
    this.qkv = randomBf16(lens.length * (heads + 2 * kvHeads) * dim, seed + 1, 3)
    this.maxPos = Math.max(...lens) + 8
    this.cosSin = new Float32Array(this.maxPos * dim)
    for (let p = 0; p < this.maxPos; p++)
      for (let i = 0; i < dim / 2; i++) {
        const angle = p / Math.pow(1_000_000, (2 * i) / dim)
        this.cosSin[p * dim + i] = Math.cos(angle)
        this.cosSin[p * dim + dim / 2 + i] = Math.sin(angle)
      }
    this.qNorm = shape.headNorm ? randomBf16(dim, seed + 2, 2) : null
    this.kNorm = shape.headNorm ? randomBf16(dim, seed + 3, 2) : null
  }

  slot(seq: number, pos: number): number {
    const { blockSize } = this.shape
    return this.pages[seq]![Math.floor(pos / blockSize)]! * blockSize + (pos % blockSize)
  }

  /**
   * One launch over sequences `seqs` (in this order): fused (qkvRopeAttention) or the two ops; the
   * output rows and both caches afterwards, as bytes.
   */
  async run(seqs: number[], fused: boolean): Promise<{ out: Buffer; k: Buffer; v: Buffer }> {
    const { heads, kvHeads, dim, blockSize } = this.shape
    const d = this.device
    const T = seqs.length
    const width = (heads + 2 * kvHeads) * dim
    const qkv = new Float32Array(T * width)
    seqs.forEach((s, t) => qkv.set(this.qkv.subarray(s * width, (s + 1) * width), t * width))
    const maxBlocks = Math.max(...seqs.map((s) => this.pages[s]!.length))
    const tables = new Int32Array(T * maxBlocks)
    seqs.forEach((s, i) => tables.set(this.pages[s]!, i * maxBlocks))
    const lens = seqs.map((s) => this.lens[s]!)
    const batch: AttentionBatch = {
      blockTables: tensorFrom(d, 'i32', [T, maxBlocks], tables),
      queryStart: tensorFrom(d, 'i32', [T + 1], [...Array(T + 1).keys()]),
      seqLens: tensorFrom(d, 'i32', [T], lens),
      maxQueryLen: 1,
      maxSeqLen: Math.max(...lens),
    }
    const ts: NativeTensor[] = [batch.blockTables, batch.queryStart, batch.seqLens]
    const keep = <X extends NativeTensor>(t: X): X => (ts.push(t), t)
    const kc = keep(tensorFrom(d, 'bf16', this.cacheShape, this.cacheBits))
    const vc = keep(tensorFrom(d, 'bf16', this.cacheShape, this.cacheBits))
    const qkvT = keep(tensorFrom(d, 'bf16', [T, width], qkv))
    const pos = keep(tensorFrom(d, 'i32', [T], lens.map((len) => len - 1)))
    const slots = keep(tensorFrom(d, 'i32', [T], seqs.map((s) => this.slot(s, this.lens[s]! - 1))))
    const table = keep(tensorFrom(d, 'f32', [this.maxPos, dim], this.cosSin))
    const qn = this.qNorm ? keep(tensorFrom(d, 'bf16', [dim], this.qNorm)) : null
    const kn = this.kNorm ? keep(tensorFrom(d, 'bf16', [dim], this.kNorm)) : null
    const qOut = keep(n.empty(d, 'bf16', [T, heads, dim]))
    const out = keep(n.empty(d, 'bf16', [T, heads, dim]))
    const scale = 1 / Math.sqrt(dim)
    try {
      if (fused) n.qkvRopeAttention(out, qOut, kc, vc, qkvT, pos, table, slots, qn, kn, EPS, batch, scale)
      else {
        n.qkvRopeAppend(qOut, kc, vc, qkvT, pos, table, slots, qn, kn, EPS)
        n.attention(out, qOut, kc, vc, batch, scale)
      }
      return { out: await readBytes(out), k: await readBytes(kc), v: await readBytes(vc) }
    } finally {
      for (const t of ts) t.dispose()
    }
  }
}

// Lengths around the key blocks (64) and the splits (256), and long enough for several splits.
const LENS = [1, 2, 63, 64, 65, 200, 255, 256, 257, 700, 1100]

async function expectFusedEqualsSeparate(scene: Scene, seqs: number[], what: string): Promise<void> {
  const want = await scene.run(seqs, false)
  const got = await scene.run(seqs, true)
  expectSameBits(got.out, want.out, `output of ${what}`)
  expectSameBits(got.k, want.k, `k cache of ${what}`)
  expectSameBits(got.v, want.v, `v cache of ${what}`)
  // Every sequence's newest row was written (it started as NaN), so the comparison above is of
  // attention over the new rows, not over NaN.
  expect(nanCount(got.out), `NaN outputs of ${what}`).toBe(0)
}

function nanCount(bytes: Buffer): number {
  const bits = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2)
  return bits.filter((b) => (b & 0x7f80) === 0x7f80 && (b & 0x7f) !== 0).length
}

function suite(device: DeviceName, shapes: Record<string, Shape>, pipelines: readonly string[]): void {
  afterEach(() => {
    n.setDecodePipeline('auto')
    n.setVariantKernels(false)
  })
  for (const [name, shape] of Object.entries(shapes))
    for (const pipeline of pipelines)
      it(`${name}: equals qkvRopeAppend then attention bit for bit, one sequence at a time and all at once (${pipeline})`, async () => {
        n.setDecodePipeline(pipeline as 'auto')
        const scene = new Scene(device, shape, LENS, 31 + shape.heads + shape.dim)
        for (let s = 0; s < LENS.length; s++) await expectFusedEqualsSeparate(scene, [s], `${LENS[s]} keys alone`)
        await expectFusedEqualsSeparate(scene, [...LENS.keys()].reverse(), 'every length in one launch')
      })
}

describe('qkvRopeAttention on the CPU', () => {
  suite('cpu', { 'heads of 64, head norms': { heads: 4, kvHeads: 2, dim: 64, blockSize: 16, headNorm: true } }, ['auto'])
})

const GPU_SHAPES: Record<string, Shape> = {
  'Qwen3-0.6B': { heads: 16, kvHeads: 8, dim: 128, blockSize: 16, headNorm: true },
  'Qwen3-8B': { heads: 32, kvHeads: 8, dim: 128, blockSize: 16, headNorm: true },
  'Llama-style, no head norms': { heads: 32, kvHeads: 8, dim: 128, blockSize: 32, headNorm: false },
  'heads of 64, pages of 12': { heads: 8, kvHeads: 2, dim: 64, blockSize: 12, headNorm: true },
  'a group of 32 heads': { heads: 32, kvHeads: 1, dim: 128, blockSize: 16, headNorm: true },
}

describeGpu('qkvRopeAttention on CUDA', () => {
  suite('cuda', GPU_SHAPES, ['auto', 'paired', 'rotating', 'paired3'])

  it("a sequence's output is the same alone and among 40 others, bit for bit (and differs with the variant kernels)", async () => {
    // 41 sequences: 1100 keys last, the rest random lengths.
    const rand = mulberry32(77)
    const lens = [...Array.from({ length: 40 }, () => 1 + Math.floor(rand() * 1500)), 1100]
    const scene = new Scene('cuda', GPU_SHAPES['Qwen3-0.6B']!, lens, 5)
    const row = 16 * 128 * 2
    const alone = (await scene.run([40], true)).out
    const among = (await scene.run([...lens.keys()], true)).out.subarray(40 * row, 41 * row)
    expectSameBits(among, alone, 'sequence of 1100 keys among 40 others')
    n.setVariantKernels(true)
    const aloneV = (await scene.run([40], true)).out
    const amongV = (await scene.run([...lens.keys()], true)).out.subarray(40 * row, 41 * row)
    expect(Buffer.compare(aloneV, amongV), 'variant kernels: the split follows the batch').not.toBe(0)
  })
})

describe('qkvRopeAttention errors', () => {
  it('names the argument that does not fit', () => {
    const d: DeviceName = 'cpu'
    const cache = n.empty(d, 'bf16', [4, 16, 2, 64])
    const ints = tensorFrom(d, 'i32', [3], [0, 1, 2])
    const table = n.empty(d, 'f32', [8, 64])
    const q = n.empty(d, 'bf16', [3, 4, 64])
    const batch: AttentionBatch = {
      blockTables: tensorFrom(d, 'i32', [3, 1], [0, 1, 2]),
      queryStart: tensorFrom(d, 'i32', [4], [0, 1, 2, 3]),
      seqLens: tensorFrom(d, 'i32', [3], [1, 1, 1]),
      maxQueryLen: 1,
      maxSeqLen: 1,
    }
    const wrongQkv = n.empty(d, 'bf16', [3, 7 * 64])
    expect(() => n.qkvRopeAttention(q, q, cache, cache, wrongQkv, ints, table, ints, null, null, EPS, batch, 0.125)).toThrow(
      /qkv_rope_attention: expected dimension 1 of qkv to be 512 \(\(heads \+ 2 \* kv heads\) \* head dim\)/,
    )
    const qkv = n.empty(d, 'bf16', [3, 8 * 64])
    const shortOut = n.empty(d, 'bf16', [2, 4, 64])
    expect(() => n.qkvRopeAttention(shortOut, q, cache, cache, qkv, ints, table, ints, null, null, EPS, batch, 0.125)).toThrow(
      /qkv_rope_attention: expected out and q to have the same shape/,
    )
    for (const t of [cache, ints, table, q, wrongQkv, qkv, shortOut, batch.blockTables, batch.queryStart, batch.seqLens]) t.dispose()
  })
})
