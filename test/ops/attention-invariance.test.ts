// Prefill/decode and batch invariance of attention, bit for bit: the output at each position of a
// 700-token sequence (crossing the split edges at 256 and 512) is the same whether computed in one
// prefill, in chunks of 3, 64 or 100, token by token with the decode kernel, or alongside 1 to 64
// other sequences of random lengths, in prefill and in decode launches. Each comparison has a twin
// under the variant configuration (split size from the batch size) that must see a difference.
// On CUDA every decode pipeline production can pick must match prefill: the decode kernel copies
// K and V paired or rotating, chosen by the grid's size, and the tests run each one forced
// (setDecodePipeline) as well as the library's choice. Likewise both prefill kernels: on Hopper the
// library's is the wgmma one, and the mma.sync kernel of sm_80-89 is forced (setPrefillKernel).
// At head dim 128 the Hopper prefill takes one tile a block when the grid has no more tiles than
// SMs, its two consumers taking alternate splits and consumer 1 handing its splits to consumer 0,
// else two tiles a block, one a consumer: the sequence alone is 88 tiles (one a block; its later
// tiles span three splits, so one handoff each), beside 1 to 64 others a grid of 176 or more (two
// a block), so "prefill alongside ... equals prefill alone" compares the two.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { native, type DeviceName } from '../../lib/native.js'
import { mulberry32 } from '../helpers/random.js'
import { describeGpu } from '../helpers/gpu.js'
import { AttentionScene, compareToReference, firstDifferentRow, shuffle, type AttentionShape, type Slice } from './attention-fixture.js'
import { poisonSharedMemory } from './reference.js'

const L = 700
const SHAPE: AttentionShape = { heads: 8, kvHeads: 2, dim: 128, blockSize: 16 }
const ROW = SHAPE.heads * SHAPE.dim
const OTHERS = 64
const DECODE_POSITIONS = [0, 1, 63, 64, 255, 256, 257, 511, 512, 699]

function makeScene(device: DeviceName): AttentionScene {
  const rand = mulberry32(4242)
  const others = Array.from({ length: OTHERS }, () => 1 + Math.floor(rand() * 900))
  return new AttentionScene(device, SHAPE, [L, ...others], 4242)
}

/** Output of positions [0, L) of sequence 0 computed in chunks of `chunk` (1: the decode kernel). */
async function chunked(scene: AttentionScene, chunk: number): Promise<Uint16Array> {
  const row = scene.shape.heads * scene.shape.dim
  const out = new Uint16Array(L * row)
  for (let start = 0; start < L; start += chunk) {
    const end = Math.min(L, start + chunk)
    const [rows] = await scene.run([{ seq: 0, start, end }])
    out.set(rows!, start * row)
  }
  return out
}

/** Sequence 0's slice run inside a launch with `n` other sequences (random chunks, or single queries for decode). */
async function inBatch(scene: AttentionScene, mine: Slice, n: number, seed: number, decode: boolean): Promise<Uint16Array> {
  const rand = mulberry32(seed)
  const others: Slice[] = shuffle([...Array(OTHERS).keys()].map((i) => i + 1), seed)
    .slice(0, n)
    .map((seq) => {
      const len = scene.seqs[seq]!.len
      const queries = decode ? 1 : 1 + Math.floor(rand() * Math.min(len, 12))
      return { seq, start: len - queries, end: len }
    })
  const at = Math.floor(rand() * (n + 1))
  const slices = [...others.slice(0, at), mine, ...others.slice(at)]
  return (await scene.run(slices))[at]!
}

function invarianceSuite(device: DeviceName): void {
  let scene: AttentionScene
  let whole: Uint16Array
  beforeAll(async () => {
    scene = makeScene(device)
    ;[whole] = (await scene.run([{ seq: 0, start: 0, end: L }])) as [Uint16Array]
  })
  afterAll(() => scene.dispose())
  afterEach(() => {
    native().setVariantKernels(false)
    native().setDecodePipeline('auto')
    native().setPrefillKernel('auto')
    native().setAttentionSplitSize(0)
  })

  it('one prefill is reproducible run to run', async () => {
    const [again] = await scene.run([{ seq: 0, start: 0, end: L }])
    expect(firstDifferentRow(whole, again!, ROW)).toBe(-1)
  })

  for (const chunk of [3, 64, 100])
    it(`chunked prefill (chunk ${chunk}) equals one prefill bit for bit`, async () => {
      expect(firstDifferentRow(await chunked(scene, chunk), whole, ROW), 'first differing position').toBe(-1)
    })

  it('token-by-token decode equals one prefill bit for bit at every position', async () => {
    expect(firstDifferentRow(await chunked(scene, 1), whole, ROW), 'first differing position').toBe(-1)
  })

  if (device === 'cuda')
    for (const [i, pipeline] of (['paired', 'rotating', 'paired3'] as const).entries())
      it(`decode with ${pipeline} K/V copies, token by token and alongside 64 others, equals prefill bit for bit`, async () => {
        native().setDecodePipeline(pipeline)
        expect(firstDifferentRow(await chunked(scene, 1), whole, ROW), 'first differing position').toBe(-1)
        for (const pos of DECODE_POSITIONS) {
          const got = await inBatch(scene, { seq: 0, start: pos, end: pos + 1 }, OTHERS, 7 * pos + i, true)
          expect(firstDifferentRow(got, whole.subarray(pos * ROW, (pos + 1) * ROW), ROW), `at position ${pos}`).toBe(-1)
        }
      })

  if (device === 'cuda')
    it('prefill with the mma.sync kernel forced equals the library prefill bit for bit, whole and in chunks', async () => {
      native().setPrefillKernel('mma.sync')
      const [forced] = await scene.run([{ seq: 0, start: 0, end: L }])
      expect(firstDifferentRow(forced!, whole, ROW), 'first differing position').toBe(-1)
      expect(firstDifferentRow(await chunked(scene, 100), whole, ROW), 'first differing position').toBe(-1)
      const got = await inBatch(scene, { seq: 0, start: 300, end: 600 }, 33, 5, false)
      expect(firstDifferentRow(got, whole.subarray(300 * ROW, 600 * ROW), ROW), 'alongside 33 others').toBe(-1)
    })

  it('prefill from caches of block size 24 and 12 equals prefill from block size 16 bit for bit, head dims 128 and 64', async () => {
    // Sequence 0 draws the same queries, keys and values whatever the block size; its pages lie
    // elsewhere, and the slots past its last key, like the pages nobody owns, hold NaN. No
    // configuration takes anything from the block size, so this has no variant twin: what it
    // catches is a copy path that reads a slot it should not, or pages by a wrong rule (12 is not
    // a power of two: the kernels divide instead of shifting). Both head dims, since the Hopper
    // prefill's copies are compiled per head dim.
    for (const dim of [128, 64]) {
      const row = SHAPE.heads * dim
      let reference = whole
      if (dim !== SHAPE.dim) {
        const base = new AttentionScene(device, { ...SHAPE, dim }, [L], 4242)
        try {
          reference = (await base.run([{ seq: 0, start: 0, end: L }]))[0]!
        } finally {
          base.dispose()
        }
      }
      for (const blockSize of [24, 12]) {
        const paged = new AttentionScene(device, { ...SHAPE, dim, blockSize }, [L], 4242)
        const what = `head dim ${dim}, block size ${blockSize}`
        try {
          const [one] = await paged.run([{ seq: 0, start: 0, end: L }])
          expect(firstDifferentRow(one!, reference, row), `${what}: first differing position`).toBe(-1)
          expect(firstDifferentRow(await chunked(paged, 100), reference, row), `${what}, chunks of 100`).toBe(-1)
        } finally {
          paged.dispose()
        }
      }
    }
  })

  // The split size is the schedule's one constant; the development switch that measures others
  // must keep every invariant (each size its own bits), or a measurement would be of a broken schedule.
  for (const split of [64, 128, 512])
    it(`with ${split}-key splits (setAttentionSplitSize): prefill, chunks, decode and batches agree bit for bit, and differ from 256-key splits`, async () => {
      native().setAttentionSplitSize(split)
      expect(native().attentionSplitSize()).toBe(split)
      const [own] = await scene.run([{ seq: 0, start: 0, end: L }])
      // Other splits, other bits: past the first split somewhere in 700 positions.
      expect(firstDifferentRow(own!, whole, ROW), 'against 256-key splits').toBeGreaterThanOrEqual(Math.min(split, 256))
      expect(firstDifferentRow(await chunked(scene, 64), own!, ROW), 'chunks of 64').toBe(-1)
      const pipelines = device === 'cuda' ? (['auto', 'paired', 'rotating', 'paired3'] as const) : (['auto'] as const)
      for (const pipeline of pipelines) {
        native().setDecodePipeline(pipeline)
        for (const pos of DECODE_POSITIONS) {
          const want = own!.subarray(pos * ROW, (pos + 1) * ROW)
          const [alone] = await scene.run([{ seq: 0, start: pos, end: pos + 1 }])
          expect(firstDifferentRow(alone!, want, ROW), `${pipeline} decode at position ${pos}`).toBe(-1)
          const batched = await inBatch(scene, { seq: 0, start: pos, end: pos + 1 }, 33, split + pos, true)
          expect(firstDifferentRow(batched, want, ROW), `${pipeline} decode beside 33 others at position ${pos}`).toBe(-1)
        }
      }
      const got = await inBatch(scene, { seq: 0, start: 300, end: 600 }, 33, split, false)
      expect(firstDifferentRow(got, own!.subarray(300 * ROW, 600 * ROW), ROW), 'prefill beside 33 others').toBe(-1)
      const tail = { seq: 0, start: L - 100, end: L }
      const { worst } = compareToReference(scene, [tail], [own!.subarray(tail.start * ROW)])
      expect(worst, 'the last 100 positions against float64').toBeLessThanOrEqual(1)
    })

  it('prefill alongside 1 to 64 other sequences equals prefill alone', async () => {
    for (const [n, slice] of [
      [1, { seq: 0, start: 0, end: L }],
      [7, { seq: 0, start: 300, end: 600 }],
      [33, { seq: 0, start: 0, end: L }],
      [64, { seq: 0, start: 500, end: L }],
    ] as [number, Slice][]) {
      const got = await inBatch(scene, slice, n, 10 + n, false)
      const want = whole.subarray(slice.start * ROW, slice.end * ROW)
      expect(firstDifferentRow(got, want, ROW), `with ${n} others, positions ${slice.start}..${slice.end - 1}`).toBe(-1)
    }
  })

  it('decode alongside 1 to 64 other sequences equals prefill alone', async () => {
    for (const n of [1, 5, 33, 64])
      for (const pos of DECODE_POSITIONS) {
        const got = await inBatch(scene, { seq: 0, start: pos, end: pos + 1 }, n, 100 * n + pos, true)
        expect(firstDifferentRow(got, whole.subarray(pos * ROW, (pos + 1) * ROW), ROW), `with ${n} others at position ${pos}`).toBe(-1)
      }
  })

  describe('under the variant configuration', () => {
    it('one prefill and token-by-token decode differ', async () => {
      native().setVariantKernels(true)
      const [prefill] = await scene.run([{ seq: 0, start: 0, end: L }])
      expect(firstDifferentRow(await chunked(scene, 1), prefill!, ROW)).not.toBe(-1)
    })

    it('decode alone and decode alongside other sequences differ', async () => {
      native().setVariantKernels(true)
      let differs = 0
      for (const pos of DECODE_POSITIONS) {
        const [alone] = await scene.run([{ seq: 0, start: pos, end: pos + 1 }])
        const batched = await inBatch(scene, { seq: 0, start: pos, end: pos + 1 }, 7, pos, true)
        if (firstDifferentRow(alone!, batched, ROW) !== -1) differs++
      }
      expect(differs).toBeGreaterThan(0)
    })

    if (device === 'cuda')
      it('decode splits that end inside a key block read no stale shared memory (paired copies)', async () => {
        // The variant's splits need not end at a key block's edge: 17 sequences at position 192
        // split into 65 keys each, and the second split's last key block runs to key 192, the row
        // the step's q/k/v kernel writes. The paired copies before the kernel's wait leave that
        // row out; it must still be copied after the wait, masked or not, since p·V reads it with
        // p = 0 and 0 × NaN is NaN. A product of NaN operands first leaves NaN in shared memory.
        native().setVariantKernels(true)
        const slices = scene.seqs
          .map((s, seq) => ({ seq, len: s.len }))
          .filter((s) => s.len >= 193)
          .slice(0, 17)
          .map(({ seq }) => ({ seq, start: 192, end: 193 }))
        expect(slices).toHaveLength(17)
        for (const pipeline of ['paired', 'paired3'] as const) {
          native().setDecodePipeline(pipeline)
          for (let round = 0; round < 3; round++) {
            poisonSharedMemory()
            const { worst, nonFinite } = compareToReference(scene, slices, await scene.run(slices))
            expect(nonFinite, `${pipeline} copies, round ${round}: outputs not finite`).toBe(0)
            expect(worst, `${pipeline} copies, round ${round}: worst error over its bound`).toBeLessThanOrEqual(1)
          }
        }
      })

    it('prefill alone and prefill alongside other sequences differ', async () => {
      native().setVariantKernels(true)
      const [alone] = await scene.run([{ seq: 0, start: 0, end: L }])
      const batched = await inBatch(scene, { seq: 0, start: 0, end: L }, 7, 3, false)
      expect(firstDifferentRow(alone!, batched, ROW)).not.toBe(-1)
    })
  })
}

describe('attention invariance (cpu)', () => invarianceSuite('cpu'))

describeGpu('attention invariance (cuda)', () => invarianceSuite('cuda'))

describe('setAttentionSplitSize (development switch)', () => {
  it('takes 0 (the build size, 256) or a multiple of 64 up to 4096, and names anything else', () => {
    try {
      expect(native().attentionSplitSize()).toBe(256)
      native().setAttentionSplitSize(4096)
      expect(native().attentionSplitSize()).toBe(4096)
      for (const bad of [32, 100, 4160, -64])
        expect(() => native().setAttentionSplitSize(bad)).toThrow(
          `setAttentionSplitSize: expected 0 (the build's 256) or a multiple of 64 from 64 to 4096 but received ${bad}`,
        )
      native().setAttentionSplitSize(0)
      expect(native().attentionSplitSize()).toBe(256)
    } finally {
      native().setAttentionSplitSize(0)
    }
  })
})

describe('setPrefillKernel (development switch)', () => {
  it("takes 'mma.sync' or 'auto' and names anything else", () => {
    for (const k of ['mma.sync', 'auto'] as const) native().setPrefillKernel(k)
    expect(() => native().setPrefillKernel('wgmma' as 'auto')).toThrow(
      /setPrefillKernel: expected "auto" or "mma.sync" but received "wgmma"/,
    )
    expect(() => native().setPrefillKernel(1 as unknown as 'auto')).toThrow(/kernel/)
  })
})

describe('setDecodePipeline (development switch)', () => {
  it("takes 'paired', 'rotating', 'paired3' or 'auto' and names anything else", () => {
    for (const p of ['paired', 'rotating', 'paired3', 'auto'] as const) native().setDecodePipeline(p)
    expect(() => native().setDecodePipeline('fast' as 'auto')).toThrow(
      /setDecodePipeline: expected "auto", "paired", "rotating" or "paired3" but received "fast"/,
    )
    expect(() => native().setDecodePipeline(3 as unknown as 'auto')).toThrow(/pipeline/)
  })
})
