// Tensor parallelism emulated on the CPU backend: the row-parallel product (matmulPartitioned,
// matmulPartials, combinePartials) against float64 and its own pieces, then TP 1, 2, 4 and 8 of
// every architecture giving the same logits, tokens and log-probs bit for bit, with the variant
// twin (an NCCL-style ring sum whose order follows the rank count) that does not.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { setVariantKernels } from '../../lib/device.js'
import { loadModel } from '../../lib/api.js'
import { loadModelConfig } from '../../lib/model/config.js'
import { checkTensorParallel } from '../../lib/model/tensor-parallel.js'
import { Transformer } from '../../lib/model/transformer.js'
import { native } from '../../lib/native.js'
import { readBytes, readF32 } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { randomInts } from '../helpers/random.js'
import { writeTinyModel, type TinyModel, type TinyModelSpec } from '../helpers/tiny-model.js'
import { bf16Tensor, expectClose, randomBf16, refMatmul } from '../ops/reference.js'
import { ARCHITECTURES } from './architectures.js'
import { blockTables, firstDifferentRow, runBatched, runChunked } from './forward-helpers.js'

const n = native()
const DEGREES = [1, 2, 4, 8]

let root: string
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'detinfer-tp-'))
})
afterAll(() => {
  setVariantKernels(false)
  rmSync(root, { recursive: true, force: true })
})

/**
 * For TP 2, 4 and 8, each rank r's matmulPartials over its own columns of a [M,K] and w [N,K] must
 * give partitions [r*8/N_, (r+1)*8/N_) of the one-device partials (`fullBytes`, f32 [8, M, N]).
 */
async function expectRanksGivePartitions(
  device: 'cpu' | 'cuda',
  a: Float32Array,
  w: Float32Array,
  M: number,
  N: number,
  K: number,
  fullBytes: Buffer,
): Promise<void> {
  const part = fullBytes.length / 8
  for (const N_ of [2, 4, 8])
    for (let r = 0; r < N_; r++) {
      const cols = K / N_
      const slice = (x: Float32Array, rows: number) => {
        const out = new Float32Array(rows * cols)
        for (let i = 0; i < rows; i++) out.set(x.subarray(i * K + r * cols, i * K + (r + 1) * cols), i * cols)
        return out
      }
      const mine = n.empty(device, 'f32', [8 / N_, M, N])
      n.matmulPartials(mine, bf16Tensor(device, [M, cols], slice(a, M)), bf16Tensor(device, [N, cols], slice(w, N)))
      const want = fullBytes.subarray(((r * 8) / N_) * part, (((r + 1) * 8) / N_) * part)
      expect((await readBytes(mine)).equals(want), `TP${N_} rank ${r}`).toBe(true)
    }
}

describe('matmulPartitioned: K in 8 partitions, the partials added by a fixed tree', () => {
  // [M, N, K]: K/8 a multiple of 16.
  const shapes: [number, number, number][] = [
    [1, 64, 128],
    [5, 40, 256],
    [33, 72, 384],
    [64, 130, 1024],
  ]

  it.each(shapes)('matches a float64 reference (M=%i, N=%i, K=%i), bf16 and f32 out, with and without bias', async (M, N, K) => {
    const seed = M * 7 + N * 3 + K
    const a = randomBf16(M * K, seed)
    const w = randomBf16(N * K, seed + 1)
    const bias = randomBf16(N, seed + 2)
    for (const withBias of [false, true])
      for (const dtype of ['bf16', 'f32'] as const) {
        const out = n.empty('cpu', dtype, [M, N])
        n.matmulPartitioned(out, bf16Tensor('cpu', [M, K], a), bf16Tensor('cpu', [N, K], w), withBias ? bf16Tensor('cpu', [N], bias) : null)
        const ref = refMatmul(a, w, M, N, K, withBias ? bias : undefined)
        const tol = dtype === 'bf16' ? { rtol: 2 ** -8, atol: 1e-3 * Math.sqrt(K) } : { rtol: 1e-5, atol: 1e-5 * Math.sqrt(K) }
        expectClose(await readF32(out), ref, tol.rtol, tol.atol, `${dtype} bias=${withBias}`)
      }
  })

  it('equals combinePartials over matmulPartials, and any run of partitions computed from its K columns (a rank) gives the same partials', async () => {
    const [M, N, K] = [7, 48, 512]
    const a = randomBf16(M * K, 91)
    const w = randomBf16(N * K, 92)
    const bias = bf16Tensor('cpu', [N], randomBf16(N, 93))
    const whole = n.empty('cpu', 'bf16', [M, N])
    n.matmulPartitioned(whole, bf16Tensor('cpu', [M, K], a), bf16Tensor('cpu', [N, K], w), bias)
    const full = n.empty('cpu', 'f32', [8, M, N])
    n.matmulPartials(full, bf16Tensor('cpu', [M, K], a), bf16Tensor('cpu', [N, K], w))
    const combined = n.empty('cpu', 'bf16', [M, N])
    n.combinePartials(combined, full, bias, 1)
    expect((await readBytes(combined)).equals(await readBytes(whole))).toBe(true)

    // The partials are not all equal (the tree has something to add) ...
    const fullBytes = await readBytes(full)
    const part = fullBytes.length / 8
    expect(fullBytes.subarray(0, part).equals(fullBytes.subarray(part, 2 * part))).toBe(false)
    // ... and each TP degree's rank r, from its own columns of a and w, gives partitions [r*8/N, (r+1)*8/N).
    await expectRanksGivePartitions('cpu', a, w, M, N, K, fullBytes)
  })

  it('differs from the unpartitioned matmul somewhere (the partition changes the bits)', async () => {
    const [M, N, K] = [16, 64, 1024]
    const a = bf16Tensor('cpu', [M, K], randomBf16(M * K, 5))
    const w = bf16Tensor('cpu', [N, K], randomBf16(N * K, 6))
    const plain = n.empty('cpu', 'f32', [M, N])
    const parted = n.empty('cpu', 'f32', [M, N])
    n.matmul(plain, a, w, null)
    n.matmulPartitioned(parted, a, w, null)
    // fp32 outputs show the other association; bf16 outputs hide most of it (a flip needs a sum near a rounding boundary)
    expect((await readBytes(plain)).equals(await readBytes(parted))).toBe(false)
  })

  it('rejects a K that is not 8 partitions of a multiple of 16, and a wrong partials shape or rank count', () => {
    const out = n.empty('cpu', 'bf16', [2, 8])
    for (const K of [120, 64, 136])
      expect(() => n.matmulPartitioned(out, n.empty('cpu', 'bf16', [2, K]), n.empty('cpu', 'bf16', [8, K]), null)).toThrow(
        new RegExp(`matmul_partitioned: expected K \\(the second dimension of a\\) to be a multiple of 128 \\(8 equal partitions, each a positive multiple of 16 columns\\) but received .*${K}`),
      )
    expect(() => n.matmulPartials(n.empty("cpu", "f32", [3, 2, 8]), n.empty("cpu", "bf16", [2, 72]), n.empty("cpu", "bf16", [8, 72]))).toThrow(
      /matmul_partials: expected K .* to be a multiple of 48 \(3 equal partitions/,
    )
    expect(() => n.matmulPartials(n.empty('cpu', 'f32', [9, 2, 8]), n.empty('cpu', 'bf16', [2, 144]), n.empty('cpu', 'bf16', [8, 144]))).toThrow(
      /matmul_partials: expected dimension 0 of partials \(the partitions\) to be between 1 and 8/,
    )
    expect(() => n.combinePartials(out, n.empty('cpu', 'f32', [4, 2, 8]), null, 1)).toThrow(/combine_partials: expected dimension 0 of partials to be 8/)
    expect(() => n.combinePartials(out, n.empty('cpu', 'f32', [8, 2, 8]), null, 3)).toThrow(/combine_partials: expected ranks to be 1, 2, 4 or 8 but received 3/)
  })
})

// Every architecture with 8 heads and 8 kv heads (so every degree divides them), head_dim 16
// (o_proj's K = 128 = 8 partitions of 16), intermediate 128 and a vocabulary of 280.
const TP_SPECS: { name: string; spec: TinyModelSpec }[] = ARCHITECTURES.map(({ name, spec }) => ({
  name,
  spec: { ...spec, hiddenSize: 64, numHeads: 8, numKvHeads: 8, headDim: 16, intermediateSize: 128, vocabSize: 280 },
}))

describe.each(TP_SPECS)('emulated tensor parallelism: $name', ({ name, spec }) => {
  let tiny: TinyModel
  const models = new Map<number, Transformer>()
  let plain: Transformer

  beforeAll(async () => {
    tiny = writeTinyModel(join(root, name.split(' ')[0]!), { ...spec, seed: name.length * 37 })
    const opts = { device: 'cpu' as const, maxBatchTokens: 96, kvBlocks: 24, kvBlockSize: 16 }
    for (const tp of DEGREES) models.set(tp, await Transformer.load(tiny.dir, { ...opts, tensorParallel: tp }))
    plain = await Transformer.load(tiny.dir, opts)
  })
  afterAll(() => {
    setVariantKernels(false)
    for (const m of models.values()) m.dispose()
    plain?.dispose()
  })

  const vocab = () => tiny.config['vocab_size'] as number
  const seqs = () => [0, 1, 2].map((s) => Array.from(randomInts(20 + 9 * s, 50 + s, vocab())))

  // Three sequences: a prefill chunk each, then mixed chunks and single decode tokens.
  async function logitsOf(model: Transformer): Promise<Buffer[][]> {
    return runBatched(model, seqs(), (s, step) => (step === 0 ? 7 + 4 * s : step % 2 === 0 ? 1 : 2 + s), blockTables(3, 4))
  }

  it('TP 1, 2, 4 and 8 give bit-identical logits over prefill and decode steps', async () => {
    const base = await logitsOf(models.get(1)!)
    for (const tp of [2, 4, 8]) {
      const got = await logitsOf(models.get(tp)!)
      base.forEach((rows, s) => expect(firstDifferentRow(got[s]!, rows), `TP${tp} sequence ${s}`).toBe(-1))
    }
    // and a decoded sequence equals its one prefill at TP4 (prefill/decode invariance still holds)
    const table = blockTables(1, 4)[0]!
    const seq = seqs()[2]!
    const whole = await runChunked(models.get(4)!, seq, seq.length, table)
    const decoded = await runChunked(models.get(4)!, seq, [seq.length - 6, 1], table)
    expect(firstDifferentRow(decoded, whole)).toBe(-1)
  })

  it('stays close to the unpartitioned model (the partition moves fp32 sums by an ulp; bf16 outputs rarely)', async () => {
    const table = blockTables(1, 4)[0]!
    const seq = seqs()[1]!
    const a = await runChunked(plain, seq, seq.length, table)
    const b = await runChunked(models.get(1)!, seq, seq.length, table)
    const fa = new Float32Array(Buffer.concat(a).buffer.slice(0))
    const fb = new Float32Array(Buffer.concat(b).buffer.slice(0))
    let num = 0
    let den = 0
    for (let i = 0; i < fa.length; i++) {
      num += (fa[i]! - fb[i]!) ** 2
      den += fa[i]! ** 2
    }
    expect(den).toBeGreaterThan(0)
    expect(Math.sqrt(num / den)).toBeLessThan(1e-2)
  })

  it('variant twin: ordinary TP (per-rank bf16 outputs summed in ring order) gives different bits across degrees', async () => {
    setVariantKernels(true)
    try {
      const byDegree = new Map<number, Buffer[][]>()
      for (const tp of DEGREES) byDegree.set(tp, await logitsOf(models.get(tp)!))
      const differing = [2, 4, 8].filter((tp) =>
        byDegree.get(1)!.some((rows, s) => firstDifferentRow(byDegree.get(tp)![s]!, rows) >= 0),
      )
      expect(differing).toEqual([2, 4, 8])
    } finally {
      setVariantKernels(false)
    }
  })
})

describe('loadModel({ tensorParallel })', () => {
  let tiny: TinyModel
  beforeAll(() => {
    tiny = writeTinyModel(join(root, 'public'), {
      architecture: 'Qwen3ForCausalLM',
      numHeads: 8,
      numKvHeads: 8,
      headDim: 16,
      intermediateSize: 128,
      vocabSize: 280,
      seed: 4242,
    })
  })

  it('greedy and seeded sampling give the same tokens and log-probs at TP 1, 2, 4 and 8', async () => {
    const results: { tokens: number[]; logprobs: number[] }[][] = []
    for (const tp of DEGREES) {
      const model = await loadModel(tiny.dir, { device: 'cpu', tensorParallel: tp, maxBatchTokens: 64, kvCacheTokens: 512 })
      try {
        const prompts = ['the cat', 'a tale of two', 'in the beginning']
        const greedy = await model.generateBatch(prompts, { maxTokens: 12 })
        const sampled = await model.generateBatch(prompts, { maxTokens: 12, temperature: 0.9, seed: 7 })
        results.push([...greedy, ...sampled].map((r) => ({ tokens: r.tokens, logprobs: r.logprobs })))
      } finally {
        model.dispose()
      }
    }
    expect(results[0]!.every((r) => r.tokens.length === 12)).toBe(true)
    for (let i = 1; i < results.length; i++) {
      results[i]!.forEach((r, k) => {
        expect(r.tokens, `TP${DEGREES[i]} completion ${k}`).toEqual(results[0]![k]!.tokens)
        // toEqual on numbers is Object.is per element: the same f32 values, bit for bit
        expect(r.logprobs, `TP${DEGREES[i]} completion ${k}`).toEqual(results[0]![k]!.logprobs)
      })
    }
  })

  it('rejects a degree other than 1, 2, 4 or 8, and a model whose heads do not divide', async () => {
    await expect(loadModel(tiny.dir, { device: 'cpu', tensorParallel: 3 })).rejects.toThrow(
      'Expected 1, 2, 4 or 8 for tensorParallel but received 3 of type number',
    )
    await expect(loadModel(tiny.dir, { device: 'cpu', tensorParallel: '2' as unknown as number })).rejects.toThrow(
      /Expected 1, 2, 4 or 8 for tensorParallel but received "2" of type string/,
    )
    const gqa = writeTinyModel(join(root, 'gqa'), { architecture: 'LlamaForCausalLM', numHeads: 8, numKvHeads: 2, headDim: 16, intermediateSize: 128, vocabSize: 280 })
    await expect(loadModel(gqa.dir, { device: 'cpu', tensorParallel: 4 })).rejects.toThrow(
      'Expected num_key_value_heads of the model to be divisible by tensorParallel 4 but received num_key_value_heads 2',
    )
    const small = writeTinyModel(join(root, 'small'), { architecture: 'LlamaForCausalLM' }) // 4 heads of 16: o_proj K = 64
    await expect(loadModel(small.dir, { device: 'cpu', tensorParallel: 1 })).rejects.toThrow(
      /Expected num_attention_heads \* head_dim \(the K of o_proj\) to be a multiple of 128 .* but received 64/,
    )
  })

  it('refuses a degree above 1 on CUDA: multi-GPU runs need N GPUs and NCCL', async () => {
    const config = await loadModelConfig(tiny.dir)
    expect(() => checkTensorParallel(2, config, 'cuda')).toThrow(/needs 2 GPUs and NCCL, which this build does not have/)
    expect(checkTensorParallel(1, config, 'cuda')).toBe(1)
    expect(checkTensorParallel(8, config, 'cpu')).toBe(8)
  })
})

describeGpu('matmulPartitioned on CUDA', () => {
  // K/8 = 48 (the mma.sync kernels on every device) and 128 (wgmma on an sm_90a build on Hopper).
  it.each([
    [1, 72, 384],
    [37, 200, 1024],
    [130, 96, 1024],
  ])('matches float64 (M=%i, N=%i, K=%i), and each rank of TP 2, 4, 8 gives the one-device partials', async (M, N, K) => {
    const a = randomBf16(M * K, M + 1)
    const w = randomBf16(N * K, N + 2)
    const bias = randomBf16(N, 3)
    const out = n.empty('cuda', 'f32', [M, N])
    n.matmulPartitioned(out, bf16Tensor('cuda', [M, K], a), bf16Tensor('cuda', [N, K], w), bf16Tensor('cuda', [N], bias))
    expectClose(await readF32(out), refMatmul(a, w, M, N, K, bias), 1e-5, 1e-5 * Math.sqrt(K), 'cuda f32')
    const full = n.empty('cuda', 'f32', [8, M, N])
    n.matmulPartials(full, bf16Tensor('cuda', [M, K], a), bf16Tensor('cuda', [N, K], w))
    const combined = n.empty('cuda', 'f32', [M, N])
    n.combinePartials(combined, full, bf16Tensor('cuda', [N], bias), 1)
    expect((await readBytes(combined)).equals(await readBytes(out))).toBe(true)
    await expectRanksGivePartitions('cuda', a, w, M, N, K, await readBytes(full))
    // A row's output does not depend on M: row 0 alone equals row 0 of the whole product.
    const one = n.empty('cuda', 'f32', [1, N])
    n.matmulPartitioned(one, bf16Tensor('cuda', [1, K], a.subarray(0, K)), bf16Tensor('cuda', [N, K], w), bf16Tensor('cuda', [N], bias))
    expect((await readBytes(one)).equals((await readBytes(out)).subarray(0, N * 4))).toBe(true)
  })
})
