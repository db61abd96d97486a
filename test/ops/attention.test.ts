// Attention against a float64 reference, on the CPU backend and on CUDA: paged caches with shuffled
// pages, grouped-query ratios 1, 3, 4 and 8 (and 66, wider than a prefill tile), head dims 64 and
// 128, block sizes 16 and 32, lengths on both sides of the key-block and split edges; prefill of
// whole sequences, chunks over a cached prefix and single-query decode. Then CUDA against the CPU
// backend on the same inputs.
import { afterAll, describe, expect, it } from 'vitest'
import { native, type DeviceName } from '../../lib/native.js'
import { fromBf16 } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { expectSameBits } from './reference.js'
import { ATOL, AttentionScene, compareToReference, RTOL, type AttentionShape, type Slice } from './attention-fixture.js'

const LENGTHS = [1, 2, 15, 16, 17, 255, 256, 257, 1000, 4096]
const TAIL_QUERIES = 24 // queries per sequence in the chunk launch: the last positions
const FULL_PREFILL_MAX = 257 // sequences up to this length are also prefilled whole

// Bounds: ATOL and RTOL per output (attention-fixture.ts), and a Frobenius bound on the whole output.
const FROBENIUS = 6e-3

interface Case extends AttentionShape {
  ratio: number
  lengths: number[]
}

// CUDA prefill tiles hold the query heads of one kv head at consecutive positions, head fastest
// (csrc/kernels/attention.cu, PrefillTile): ratio 3 leaves a row of the 64 unused, and ratio 66
// takes two head tiles, the second 2 heads wide.
function cases(): Case[] {
  const out: Case[] = []
  for (const dim of [64, 128])
    for (const ratio of [1, 3, 4, 8])
      out.push({ dim, ratio, kvHeads: 2, heads: 2 * ratio, blockSize: ratio === 4 ? 32 : 16, lengths: LENGTHS })
  out.push({ dim: 64, ratio: 66, kvHeads: 1, heads: 66, blockSize: 16, lengths: [1, 17, 100, 257, 300] })
  return out
}

function launches(scene: AttentionScene): { name: string; slices: Slice[] }[] {
  const seqs = scene.seqs.map((s, i) => ({ i, len: s.len }))
  return [
    { name: 'chunk over cached prefix', slices: seqs.map(({ i, len }) => ({ seq: i, start: Math.max(0, len - TAIL_QUERIES), end: len })) },
    { name: 'decode', slices: seqs.map(({ i, len }) => ({ seq: i, start: len - 1, end: len })) },
    {
      name: 'whole prefill',
      slices: seqs.filter(({ len }) => len <= FULL_PREFILL_MAX).map(({ i, len }) => ({ seq: i, start: 0, end: len })),
    },
  ]
}

function referenceSuite(device: DeviceName): void {
  for (const c of cases()) {
    it(`matches float64 at head dim ${c.dim}, GQA ratio ${c.ratio}, block size ${c.blockSize}`, async () => {
      const scene = new AttentionScene(device, c, c.lengths, 1000 + c.dim + c.ratio)
      try {
        for (const { name, slices } of launches(scene)) {
          const outs = await scene.run(slices)
          const { worst, frob } = compareToReference(scene, slices, outs)
          console.log(`${device} D=${c.dim} ratio=${c.ratio} ${name}: worst ${worst.toFixed(3)} of bound, frobenius ${frob.toExponential(2)}`)
          expect(worst, `${name}: |out - ref| exceeds ${ATOL} + ${RTOL}·|ref|`).toBeLessThanOrEqual(1)
          expect(frob, `${name}: relative Frobenius error`).toBeLessThan(FROBENIUS)
        }
      } finally {
        scene.dispose()
      }
    })
  }
}

describe('attention (cpu) against float64', () => referenceSuite('cpu'))

describeGpu('attention (cuda) against float64', () => referenceSuite('cuda'))

describeGpu('attention: cuda against the cpu backend', () => {
  const scenes: AttentionScene[] = []
  afterAll(() => scenes.forEach((s) => s.dispose()))

  it('is close to the cpu backend on the same inputs (prefill chunks and decode)', async () => {
    const shape: AttentionShape = { heads: 8, kvHeads: 2, dim: 128, blockSize: 16 }
    const lengths = [3, 64, 300, 777, 2048]
    const cpu = new AttentionScene('cpu', shape, lengths, 77)
    const gpu = new AttentionScene('cuda', shape, lengths, 77)
    scenes.push(cpu, gpu)
    const tail = lengths.map((len, i) => ({ seq: i, start: Math.max(0, len - 40), end: len }))
    const decode = lengths.map((len, i) => ({ seq: i, start: len - 1, end: len }))
    for (const slices of [tail, decode]) {
      const [a, b] = [await cpu.run(slices), await gpu.run(slices)]
      let worst = 0
      slices.forEach((_, i) => {
        const x = fromBf16(a[i]!)
        const y = fromBf16(b[i]!)
        for (let j = 0; j < x.length; j++) worst = Math.max(worst, Math.abs(x[j]! - y[j]!) / (ATOL + RTOL * Math.abs(x[j]!)))
      })
      console.log(`cuda vs cpu: worst ${worst.toFixed(3)} of bound`)
      expect(worst).toBeLessThanOrEqual(1)
    }
  })
})

describeGpu("attention (cuda): the decode split partials' workspace", () => {
  const n = native()
  // Three sequences of 2 to 8 splits of 256 keys: decode writes partials, then combines them.
  const shape: AttentionShape = { heads: 8, kvHeads: 2, dim: 128, blockSize: 16 }
  const lengths = [300, 777, 2048]
  const floats = lengths.length * shape.heads * Math.ceil(2048 / 256) * (shape.dim + 2)
  const decode = lengths.map((len, i) => ({ seq: i, start: len - 1, end: len }))

  it('gives the same bits with a workspace that holds the partials, one too small, and none', async () => {
    const scene = new AttentionScene('cuda', shape, lengths, 91)
    const exact = n.empty('cuda', 'f32', [floats])
    const small = n.empty('cuda', 'f32', [floats - 1])
    try {
      const none = await scene.run(decode)
      for (const [name, ws] of [['exact', exact], ['one float short (the process workspace)', small]] as const) {
        const bits = await scene.run(decode, ws)
        bits.forEach((b, i) => expectSameBits(b, none[i]!, `${name}, sequence ${i}`))
      }
      const launch = scene.prepare(decode)
      const wrong = n.empty('cuda', 'bf16', [floats])
      expect(() => launch.enqueue(wrong)).toThrow(/^attention: expected workspace to be f32 but received bf16/)
      for (const t of [launch, wrong]) t.dispose()
    } finally {
      for (const t of [exact, small]) t.dispose()
      scene.dispose()
    }
  })

  it('a CUDA graph captures a decode launch into the workspace it is given, and refuses one too small', async () => {
    const scene = new AttentionScene('cuda', shape, lengths, 92)
    const launch = scene.prepare(decode)
    const exact = n.empty('cuda', 'f32', [floats])
    const small = n.empty('cuda', 'f32', [floats - 1])
    try {
      launch.enqueue()
      const eager = await launch.read()
      n.graphBegin()
      let refused = ''
      try {
        launch.enqueue(small)
      } catch (err) {
        refused = (err as Error).message
      } finally {
        n.graphAbort()
      }
      expect(refused).toMatch(
        new RegExp(`^attention: a decode launch captured in a CUDA graph needs a workspace of at least ${floats * 4} bytes for its split partials but received f32\\[${floats - 1}\\] on cuda`),
      )
      n.graphBegin()
      try {
        launch.enqueue(exact)
      } catch (err) {
        n.graphAbort()
        throw err
      }
      const graph = n.graphEnd()
      try {
        // A launch outside the graph that grows the process's workspace leaves the graph's alone.
        const longer = new AttentionScene('cuda', shape, [8192, 8192, 8192, 8192], 93)
        await longer.run(longer.seqs.map((s, i) => ({ seq: i, start: s.len - 1, end: s.len })))
        longer.dispose()
        graph.replay()
        const replayed = await launch.read()
        replayed.forEach((b, i) => expectSameBits(b, eager[i]!, `replayed, sequence ${i}`))
      } finally {
        graph.dispose()
      }
    } finally {
      for (const t of [exact, small]) t.dispose()
      launch.dispose()
      scene.dispose()
    }
  })
})
