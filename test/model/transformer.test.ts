// The forward pass on the CPU backend: against a float64 reference of each architecture, and the
// determinism contract (prefill/decode and batch invariance, bit for bit) with its variant twins.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { setVariantKernels } from '../../lib/device.js'
import { Transformer } from '../../lib/model/transformer.js'
import { readBytes, readF32 } from '../../lib/tensor.js'
import { randomInts } from '../helpers/random.js'
import { writeTinyModel, type TinyModel } from '../helpers/tiny-model.js'
import { ARCHITECTURES } from './architectures.js'
import { asF32, blockTables, firstDifferentRow, runBatched, runChunked } from './forward-helpers.js'
import { referenceLogits } from './reference-transformer.js'


// Relative error (Frobenius, per position) of bf16 activations against float64: every op rounds
// its output to bf16 (relative 2^-9 each), about 12 roundings per layer add up in quadrature and
// the residual stream carries them; 2 layers measured ~0.5-1%. 3% leaves room without admitting
// a wrong op (a missing bias, norm or RoPE detail gives errors of order 1).
const REL_BOUND = 0.03

let root: string
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'detinfer-forward-'))
})
afterAll(() => {
  setVariantKernels(false)
  rmSync(root, { recursive: true, force: true })
})

function relError(out: Float32Array, ref: Float64Array): number {
  let num = 0
  let den = 0
  for (let i = 0; i < ref.length; i++) {
    num += (out[i]! - ref[i]!) ** 2
    den += ref[i]! ** 2
  }
  return Math.sqrt(num / den)
}

describe.each(ARCHITECTURES)('forward pass: $name', ({ name, spec }) => {
  let tiny: TinyModel
  let model: Transformer
  const vocab = () => (tiny.config['vocab_size'] as number)

  beforeAll(async () => {
    tiny = writeTinyModel(join(root, name.split(' ')[0]!), { ...spec, seed: name.length * 101 })
    model = await Transformer.load(tiny.dir, { device: 'cpu', maxBatchTokens: 320, kvBlocks: 96, kvBlockSize: 16 })
  })
  afterAll(() => {
    setVariantKernels(false)
    model?.dispose()
  })

  it('logits match a float64 reference of the architecture', async () => {
    const tokens = Array.from(randomInts(40, 7, vocab()))
    const out = model.forward([{ tokens, startPosition: 0, blockTable: blockTables(1, 3)[0]!, logits: 'all' }])
    expect(out.rowsPerChunk).toEqual([40])
    expect(out.logits.shape).toEqual([40, vocab()])
    const logits = await readF32(out.logits)
    const ref = referenceLogits(tiny, tokens)
    let worst = 0
    for (let p = 0; p < tokens.length; p++) {
      const err = relError(logits.subarray(p * vocab(), (p + 1) * vocab()), ref[p]!)
      worst = Math.max(worst, err)
    }
    console.log(`${name}: worst per-position relative error vs float64 ${worst.toExponential(2)}`)
    expect(worst).toBeLessThan(REL_BOUND)
    expect(worst).toBeGreaterThan(0) // bf16 activations: an exact match would mean the reference was not independent
  })

  const sequence = () => Array.from(randomInts(300, 11, vocab()))

  it('one prefill, chunked prefills and token-by-token decoding give bit-identical logits (300 positions, across the 256-key split)', async () => {
    const table = blockTables(1, 20)[0]!
    const whole = await runChunked(model, sequence(), 300, table)
    const chunked = await runChunked(model, sequence(), [37, 64, 155, 1, 43], table)
    const decoded = await runChunked(model, sequence(), [250, 1], table)
    expect(whole).toHaveLength(300)
    expect(firstDifferentRow(chunked, whole)).toBe(-1)
    expect(firstDifferentRow(decoded, whole)).toBe(-1)
  })

  it('a sequence gives bit-identical logits alone and inside batches of several sequences', async () => {
    const seqs = [0, 1, 2, 3].map((s) => Array.from(randomInts(30 + 17 * s, 20 + s, vocab())))
    const tables = blockTables(4, 6)
    const alone = await Promise.all(seqs.map(async (seq, s) => runChunked(model, seq, seq.length, tables[s]!)))
    // Mixed steps: prefill chunks of different sizes beside single decode tokens.
    const batched = await runBatched(model, seqs, (s, step) => (step === 0 ? 9 + 5 * s : step % 2 === 0 ? 1 : 3 + s), tables)
    const beside = await runBatched(model, seqs, (s, step) => (s > 0 ? 8 : step === 0 ? seqs[0]!.length - 8 : 1), tables)
    expect(firstDifferentRow(beside[0]!, alone[0]!)).toBe(-1)
    seqs.forEach((_, s) => expect(firstDifferentRow(batched[s]!, alone[s]!), `sequence ${s}`).toBe(-1))
  })

  it("'last' and 'none' return the rows asked for, in chunk order", async () => {
    const tables = blockTables(3, 2)
    const a = Array.from(randomInts(12, 31, vocab()))
    const b = Array.from(randomInts(5, 32, vocab()))
    const c = Array.from(randomInts(7, 33, vocab()))
    const all = await Promise.all(
      [a, b, c].map(async (seq, s) => runChunked(model, seq, seq.length, tables[s]!)),
    )
    const out = model.forward([
      { tokens: a, startPosition: 0, blockTable: tables[0]!, logits: 'last' },
      { tokens: b, startPosition: 0, blockTable: tables[1]!, logits: 'none' },
      { tokens: c, startPosition: 0, blockTable: tables[2]!, logits: 'all' },
    ])
    expect(out.rowsPerChunk).toEqual([1, 0, 7])
    const bytes = await readBytes(out.logits)
    const row = bytes.length / 8
    expect(bytes.subarray(0, row).equals(all[0]![11]!)).toBe(true)
    for (let i = 0; i < 7; i++) expect(bytes.subarray((1 + i) * row, (2 + i) * row).equals(all[2]![i]!)).toBe(true)
  })

  describe('variant kernels (splits chosen from the batch): the same comparisons find differences', () => {
    afterAll(() => setVariantKernels(false))

    it('token-by-token decoding differs from one prefill', async () => {
      const table = blockTables(1, 20)[0]!
      setVariantKernels(true)
      const whole = await runChunked(model, sequence(), 300, table)
      const decoded = await runChunked(model, sequence(), [250, 1], table)
      setVariantKernels(false)
      expect(firstDifferentRow(decoded, whole)).toBeGreaterThanOrEqual(0)
    })

    it('a sequence decoded alone differs from the same sequence decoded beside other prefills', async () => {
      const seqs = [0, 1, 2, 3].map((s) => Array.from(randomInts(30 + 17 * s, 20 + s, vocab())))
      const tables = blockTables(4, 6)
      setVariantKernels(true)
      // Sequence 0 decodes its last 8 tokens one by one: alone each step has 1 row, in the batch
      // the others prefill 8 tokens each beside it.
      const alone = await runChunked(model, seqs[0]!, [seqs[0]!.length - 8, 1], tables[0]!)
      const batched = await runBatched(model, seqs, (s, step) => (s > 0 ? 8 : step === 0 ? seqs[0]!.length - 8 : 1), tables)
      setVariantKernels(false)
      expect(firstDifferentRow(batched[0]!, alone)).toBeGreaterThanOrEqual(0)
    })
  })

  it('logits rows are f32 and finite', async () => {
    const out = model.forward([{ tokens: [1, 2, 3], startPosition: 0, blockTable: [0], logits: 'all' }])
    const values = await readF32(out.logits)
    expect(out.logits.dtype).toBe('f32')
    expect(values.every(Number.isFinite)).toBe(true)
    expect(asF32((await readBytes(out.logits)).subarray(0, 4 * vocab()))).toEqual(values.subarray(0, vocab()))
  })
})
