// qkvRopeAttention gives the bits of qkvRopeAppend then attention: the attention output of every
// real row and both caches, element for element. On CUDA a decode step (every sequence one query)
// runs one attention kernel that computes its query rows and the step's k and v rows itself
// (csrc/kernels/attention.cu, decode_inputs). The cases cover every decode pipeline (each forced,
// and the library's choice by grid size), lengths across the split edges (256 keys) and one
// sequence of many splits, 1 to 20 query heads per kv head (20: two row tiles, both writing the
// step's row), heads of 64 and 128, with and without Qwen3's head norms, the step layout's padding
// rows (slot -1, one key at page 0), and a prefill-shaped step (which runs the two ops). The twin:
// the same comparison against the two ops under the variant configuration (split size from the
// batch size) must see a difference, so the comparison can fail. On the CPU the op is the two ops
// by construction; the test runs there at small shapes to cover the binding and the checks.
import { afterEach, describe, expect, it } from 'vitest'
import { native, type AttentionBatch, type DeviceName, type NativeTensor } from '../../lib/native.js'
import { readBytes, tensorFrom, toBf16 } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { mulberry32 } from '../helpers/random.js'
import { shuffle } from './attention-fixture.js'
import { firstDifference } from '../helpers/compare.js'
import { randomBf16, withVariant } from './reference.js'

const n = native()
const BLOCK = 16
const NAN_BF16 = 0x7fc0

interface Case {
  heads: number
  kvHeads: number
  dim: number
  headNorm: boolean
  /** keys of each decode sequence after this step (its query is at position len-1) */
  lens: number[]
  /** padding rows after the sequences: slot -1, position 0, one key at page 0 */
  pad?: number
  /** queries of the first sequence (more than 1: a prefill-shaped step) */
  firstQueries?: number
}

interface Step {
  qkv: NativeTensor
  positions: NativeTensor
  slots: NativeTensor
  cosSin: NativeTensor
  qNorm: NativeTensor | null
  kNorm: NativeTensor | null
  batch: AttentionBatch
  cache: Uint16Array
  cacheShape: number[]
  tokens: number
  realRows: number
  dispose(): void
}

function makeStep(device: DeviceName, c: Case, seed: number): Step {
  const { heads, kvHeads, dim: D } = c
  const pad = c.pad ?? 0
  const first = c.firstQueries ?? 1
  const queries = c.lens.map((_, i) => (i === 0 ? first : 1))
  const realRows = queries.reduce((a, b) => a + b, 0)
  const tokens = realRows + pad
  const pages = c.lens.map((len) => Math.ceil(len / BLOCK))
  const totalPages = pages.reduce((a, b) => a + b, 0) + 2
  const order = shuffle([...Array(totalPages).keys()], seed)
  let next = 0
  const owned = pages.map((p) => order.slice(next, (next += p)))
  // Random keys and values in every owned page, NaN elsewhere (a stray read shows in the output).
  const row = kvHeads * D
  const cache = new Uint16Array(totalPages * BLOCK * row).fill(NAN_BF16)
  const bits = toBf16(randomBf16(totalPages * BLOCK * row, seed + 1))
  for (const ps of owned) for (const p of ps) cache.set(bits.subarray(p * BLOCK * row, (p + 1) * BLOCK * row), p * BLOCK * row)

  const maxBlocks = Math.max(1, ...pages)
  const tables = new Int32Array((c.lens.length + pad) * maxBlocks) // padding: page 0
  owned.forEach((ps, i) => tables.set(ps, i * maxBlocks))
  const positions: number[] = []
  const slots: number[] = []
  c.lens.forEach((len, i) => {
    for (let p = len - queries[i]!; p < len; p++) {
      positions.push(p)
      slots.push(owned[i]![Math.floor(p / BLOCK)]! * BLOCK + (p % BLOCK))
    }
  })
  for (let i = 0; i < pad; i++) positions.push(0), slots.push(-1)
  const starts = [0]
  for (const q of [...queries, ...Array<number>(pad).fill(1)]) starts.push(starts[starts.length - 1]! + q)
  const seqLens = [...c.lens, ...Array<number>(pad).fill(1)]
  const maxPos = Math.max(...seqLens) + 8
  const cosSin = new Float32Array(maxPos * D)
  for (let p = 0; p < maxPos; p++)
    for (let i = 0; i < D / 2; i++) {
      const angle = Math.fround(p * Math.fround(1 / 1e6 ** ((2 * i) / D)))
      cosSin[p * D + i] = Math.cos(angle)
      cosSin[p * D + D / 2 + i] = Math.sin(angle)
    }
  const width = (heads + 2 * kvHeads) * D
  const own: NativeTensor[] = []
  const t = <T extends NativeTensor>(x: T): T => (own.push(x), x)
  const batch: AttentionBatch = {
    blockTables: t(tensorFrom(device, 'i32', [seqLens.length, maxBlocks], tables)),
    queryStart: t(tensorFrom(device, 'i32', [seqLens.length + 1], starts)),
    seqLens: t(tensorFrom(device, 'i32', [seqLens.length], seqLens)),
    maxQueryLen: first,
    maxSeqLen: Math.max(...seqLens),
  }
  return {
    qkv: t(tensorFrom(device, 'bf16', [tokens, width], randomBf16(tokens * width, seed + 2, 4))),
    positions: t(tensorFrom(device, 'i32', [tokens], positions)),
    slots: t(tensorFrom(device, 'i32', [tokens], slots)),
    cosSin: t(tensorFrom(device, 'f32', [maxPos, D], cosSin)),
    qNorm: c.headNorm ? t(tensorFrom(device, 'bf16', [D], randomBf16(D, seed + 3, 2))) : null,
    kNorm: c.headNorm ? t(tensorFrom(device, 'bf16', [D], randomBf16(D, seed + 4, 2))) : null,
    batch,
    cache,
    cacheShape: [totalPages, BLOCK, kvHeads, D],
    tokens,
    realRows,
    dispose: () => own.forEach((x) => x.dispose()),
  }
}

interface Result {
  out: Buffer // the real rows' attention output
  k: Buffer
  v: Buffer
}

async function runStep(device: DeviceName, c: Case, s: Step, fused: boolean): Promise<Result> {
  const shape = [s.tokens, c.heads, c.dim]
  const out = n.empty(device, 'bf16', shape)
  const q = n.empty(device, 'bf16', shape)
  const k = n.fromBuffer(device, 'bf16', s.cacheShape, Buffer.from(s.cache.buffer))
  const v = n.fromBuffer(device, 'bf16', s.cacheShape, Buffer.from(s.cache.buffer))
  const scale = 1 / Math.sqrt(c.dim)
  if (fused) {
    n.qkvRopeAttention(out, q, k, v, s.qkv, s.positions, s.cosSin, s.slots, s.qNorm, s.kNorm, 1e-6, s.batch, scale)
  } else {
    n.qkvRopeAppend(q, k, v, s.qkv, s.positions, s.cosSin, s.slots, s.qNorm, s.kNorm, 1e-6)
    n.attention(out, q, k, v, s.batch, scale)
  }
  const result = { out: await readBytes(n.narrow(out, 0, s.realRows)), k: await readBytes(k), v: await readBytes(v) }
  for (const x of [out, q, k, v]) x.dispose()
  return result
}

function expectSame(got: Result, want: Result, what: string): void {
  for (const part of ['out', 'k', 'v'] as const) {
    const at = firstDifference(got[part], want[part])
    if (at >= 0) expect.fail(`${what}: ${part} differs first at byte ${at} of ${got[part].byteLength}`)
  }
}

function describeCase(c: Case): string {
  const lens = c.lens.length > 6 ? `${c.lens.length} sequences` : `lengths [${c.lens}]`
  return `${c.heads}/${c.kvHeads} heads of ${c.dim}${c.headNorm ? ' with head norms' : ''}, ${lens}` +
    (c.pad ? `, ${c.pad} padding rows` : '') + (c.firstQueries ? `, ${c.firstQueries} queries first` : '')
}

function randomLens(count: number, seed: number, max: number): number[] {
  const rand = mulberry32(seed)
  return Array.from({ length: count }, () => 1 + Math.floor(rand() * max))
}

function suite(device: DeviceName, cases: Case[], pipelines: ('auto' | 'paired' | 'rotating' | 'paired3')[]): void {
  afterEach(() => {
    if (device === 'cuda') n.setDecodePipeline('auto')
  })

  for (const c of cases)
    it(`equals qkvRopeAppend then attention bit for bit: ${describeCase(c)}`, async () => {
      const s = makeStep(device, c, c.lens.length * 31 + c.heads)
      try {
        for (const pipeline of pipelines) {
          if (device === 'cuda') n.setDecodePipeline(pipeline)
          const want = await runStep(device, c, s, false)
          expectSame(await runStep(device, c, s, true), want, `${describeCase(c)}, ${pipeline}`)
        }
      } finally {
        s.dispose()
      }
    })

  it('sees the variant configuration: the comparison can fail', async () => {
    const c: Case = { heads: 8, kvHeads: 2, dim: 64, headNorm: true, lens: [1000, 300, 700] }
    const s = makeStep(device, c, 77)
    try {
      const fused = await runStep(device, c, s, true)
      const variant = await withVariant(() => runStep(device, c, s, false))
      expect(firstDifference(fused.out, variant.out)).toBeGreaterThanOrEqual(0)
    } finally {
      s.dispose()
    }
  })

  it('refuses mismatched shapes, naming the op and the argument', () => {
    const c: Case = { heads: 4, kvHeads: 2, dim: 64, headNorm: false, lens: [5] }
    const s = makeStep(device, c, 5)
    const out = n.empty(device, 'bf16', [s.tokens, c.heads, c.dim])
    const wrongQ = n.empty(device, 'bf16', [s.tokens, c.heads, 32])
    const k = n.empty(device, 'bf16', s.cacheShape)
    try {
      expect(() =>
        n.qkvRopeAttention(out, wrongQ, k, k, s.qkv, s.positions, s.cosSin, s.slots, null, null, 1e-6, s.batch, 0.125),
      ).toThrow('qkv_rope_attention: expected dimension 2 of q_out to be 64 (head dim of the cache) but received bf16[1,4,32]')
      const q = n.empty(device, 'bf16', [s.tokens, c.heads, c.dim])
      expect(() =>
        n.qkvRopeAttention(out, q, k, k, s.qkv, s.positions, s.cosSin, s.slots, null, null, 1e-6, { ...s.batch, maxSeqLen: 999 }, 0.125),
      ).toThrow('qkv_rope_attention: maxSeqLen 999 exceeds the block table')
      q.dispose()
    } finally {
      for (const x of [out, wrongQ, k]) x.dispose()
      s.dispose()
    }
  })
}

describe('qkvRopeAttention on the CPU', () => {
  suite(
    'cpu',
    [
      { heads: 4, kvHeads: 2, dim: 64, headNorm: true, lens: [1, 17, 40], pad: 2 },
      { heads: 4, kvHeads: 2, dim: 64, headNorm: false, lens: [30, 9], firstQueries: 5 },
    ],
    ['auto'],
  )
})

describeGpu('qkvRopeAttention on CUDA', () => {
  suite(
    'cuda',
    [
      // Qwen3-0.6B's heads: one sequence (the batch-1 step), the split edges, a full batch with padding.
      { heads: 16, kvHeads: 8, dim: 128, headNorm: true, lens: [200] },
      { heads: 16, kvHeads: 8, dim: 128, headNorm: true, lens: [1, 2, 63, 64, 65, 255, 256, 257, 700, 1500] },
      { heads: 16, kvHeads: 8, dim: 128, headNorm: true, lens: randomLens(61, 11, 600), pad: 3 },
      // Qwen3-8B's: one long sequence of 20 splits, and 17 sequences.
      { heads: 32, kvHeads: 8, dim: 128, headNorm: true, lens: [5000] },
      { heads: 32, kvHeads: 8, dim: 128, headNorm: true, lens: randomLens(17, 12, 3000) },
      // Heads of 64 without norms, one head per kv head, two row tiles (20 heads per kv head).
      { heads: 8, kvHeads: 2, dim: 64, headNorm: false, lens: [1, 300, 513, 90], pad: 1 },
      { heads: 4, kvHeads: 4, dim: 128, headNorm: true, lens: [77, 256, 3] },
      { heads: 40, kvHeads: 2, dim: 128, headNorm: true, lens: [300, 1, 64] },
      // A prefill-shaped step: the two ops.
      { heads: 16, kvHeads: 8, dim: 128, headNorm: true, lens: [40, 300], firstQueries: 7 },
    ],
    ['auto', 'paired', 'rotating', 'paired3'],
  )
})
