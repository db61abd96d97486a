// No kernel reads shared memory it has not written: every op gives the same bits whether the shared
// memory its blocks are handed holds NaN, a huge finite value, or what the kernels before it left.
// Kernels see whatever the last block on the SM left there, so a tile row a kernel forgets to copy
// or zero-fill reads stale values that a fresh GPU often holds as zeros; a masked score's p of 0
// then hides it until a NaN comes along (0 × NaN = NaN), as the paired decode copies did under the
// variant configuration (attention-invariance.test.ts). Here each op runs once, then again after a
// product of NaN operands and after one of -1.7e38 operands has staged those values into the shared
// memory of every SM, and the three results are compared bit for bit: matmul and gate|up with
// SiLU·mul (both kernel families, ragged and decode shapes), the products with the norm in their
// prologue, the row-parallel products of tensor parallelism, token choice (greedy, sampled,
// scored, top log-probs) at a 151,936-token vocabulary, rmsnorm, log_softmax and argmax, and
// attention (prefill with both kernels, prefill of chunks over a cached prefix, decode with each
// K/V pipeline, head dims 128 and 64, lengths on both sides of the key block and split edges) in
// the library's configuration and in the variant one.
// The kernels that keep no shared memory (qkvRopeAppend, kvAppend, embedding, rope, siluMul, the
// partials' combine) cannot read it stale and are not run here.
import { afterAll, afterEach, beforeAll, describe, it } from 'vitest'
import { chooseOnLogits, type TokenChoice } from '../../lib/model/output-head.js'
import { native, type NativeTensor } from '../../lib/native.js'
import { readBytes, tensorFrom } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { randomArray, randomNormal } from '../helpers/random.js'
import { AttentionScene, type Slice } from './attention-fixture.js'
import { bf16Tensor, expectSameBits, NAN_BF16, poisonSharedMemory, randomBf16 } from './reference.js'

const n = native()

/** bf16 bit patterns staged into shared memory before an op runs: NaN, and a huge finite value. */
const POISONS = [
  { name: 'NaN', bits: NAN_BF16 },
  { name: '-1.7e38', bits: 0xff00 },
]

/**
 * The op's output bytes, run as is and after each poison; the three must be equal. The poison
 * runs with the library's kernels: a test that forces mma.sync sets it only around its own launch.
 */
async function expectNoStaleReads(what: string, run: () => Promise<ArrayBufferView>): Promise<void> {
  const clean = await run()
  for (const p of POISONS) {
    poisonSharedMemory(p.bits)
    expectSameBits(await run(), clean, `${what}, after ${p.name} in shared memory`)
  }
}

/** The bytes of `outs`, one after another; then every tensor named is disposed. */
async function output(outs: NativeTensor | NativeTensor[], inputs: NativeTensor[]): Promise<Buffer> {
  const list = Array.isArray(outs) ? outs : [outs]
  const bytes = Buffer.concat(await Promise.all(list.map((t) => readBytes(t))))
  for (const t of [...list, ...inputs]) t.dispose()
  return bytes
}

const bytesOf = (v: ArrayBufferView): Buffer => Buffer.from(v.buffer, v.byteOffset, v.byteLength)

describeGpu('kernels read no stale shared memory (cuda)', () => {
  afterEach(() => {
    n.setMatmulKernels('auto')
    n.setDecodePipeline('auto')
    n.setPrefillKernel('auto')
    n.setVariantKernels(false)
  })

  // [M, N, K]: ragged tiles in every dimension, and Qwen3-0.6B's decode products.
  const PRODUCTS = [
    [1, 64, 64],
    [3, 40, 72],
    [17, 33, 264],
    [129, 136, 1000],
    [300, 257, 520],
    [130, 24, 2056],
    [1, 4096, 1024],
    [16, 1024, 3072],
    [64, 6144, 1024],
  ] as const
  for (const kernels of ['auto', 'mma.sync'] as const)
    it(`matmul (${kernels} kernels)`, async () => {
      for (const [M, N, K] of PRODUCTS) {
        const a = randomBf16(M * K, M + N + K)
        const w = randomBf16(N * K, M + N + K + 1)
        await expectNoStaleReads(`${M}×${N}×${K}`, () => {
          const at = bf16Tensor('cuda', [M, K], a)
          const wt = bf16Tensor('cuda', [N, K], w)
          const out = n.empty('cuda', 'f32', [M, N])
          n.setMatmulKernels(kernels)
          n.matmul(out, at, wt, null)
          n.setMatmulKernels('auto')
          return output(out, [at, wt])
        })
      }
    })

  it('gate|up with SiLU·mul (both kernel families), and the products with the norm in their prologue', async () => {
    for (const kernels of ['auto', 'mma.sync'] as const)
      for (const [M, I, K] of [
        [1, 3072, 1024],
        [9, 3072, 1024],
        [64, 1000, 520],
      ] as const) {
        const a = randomBf16(M * K, M + I + K)
        const w = randomBf16(2 * I * K, M + I + K + 1)
        await expectNoStaleReads(`gate|up ${M}×${I}×${K}, ${kernels} kernels`, () => {
          const at = bf16Tensor('cuda', [M, K], a)
          const wt = bf16Tensor('cuda', [2 * I, K], w)
          const gateUp = n.empty('cuda', 'bf16', [M, 2 * I])
          const out = n.empty('cuda', 'bf16', [M, I])
          n.setMatmulKernels(kernels)
          n.matmulSiluMul(out, gateUp, at, wt, null)
          n.setMatmulKernels('auto')
          return output(out, [at, wt, gateUp])
        })
      }
    // [M, N, K]: Qwen3-0.6B's q|k|v, o_proj and gate|up at decode sizes, where Hopper fuses the norm.
    for (const [M, N, K] of [
      [1, 4096, 1024],
      [7, 1024, 2048],
      [16, 6144, 1024],
    ] as const) {
      const residual = randomBf16(M * K, M + N + K, 2)
      const x = randomBf16(M * K, M + N + K + 1, 2)
      const normW = randomBf16(K, M + N + K + 2)
      const w = randomBf16(N * K, M + N + K + 3)
      for (const silu of [false, true])
        await expectNoStaleReads(`${silu ? 'normMatmulSiluMul' : 'normMatmul'} ${M}×${N}×${K}`, () => {
          const inputs = [
            bf16Tensor('cuda', [M, K], residual),
            bf16Tensor('cuda', [M, K], x),
            bf16Tensor('cuda', [K], normW),
            bf16Tensor('cuda', [N, K], w),
          ] as const
          const [residualIn, xt, normWt, wt] = inputs
          const normed = n.empty('cuda', 'bf16', [M, K])
          const residualOut = n.empty('cuda', 'bf16', [M, K])
          if (silu) {
            const out = n.empty('cuda', 'bf16', [M, N / 2])
            const gateUp = n.empty('cuda', 'bf16', [M, N])
            n.normMatmulSiluMul(out, gateUp, normed, residualOut, residualIn, xt, normWt, 1e-6, wt, null)
            return output([out, residualOut], [...inputs, normed, gateUp])
          }
          const out = n.empty('cuda', 'bf16', [M, N])
          n.normMatmul(out, normed, residualOut, residualIn, xt, normWt, 1e-6, wt, null)
          return output([out, residualOut], [...inputs, normed])
        })
    }
  })

  it('the row-parallel products: matmulPartitioned, and matmulPartials over a rank\'s columns', async () => {
    // [M, N, K]: K/8 a multiple of 16; ragged M and N, and Qwen3-0.6B's o_proj and down_proj.
    for (const [M, N, K] of [
      [3, 40, 256],
      [33, 130, 1024],
      [1, 1024, 2048],
      [64, 1024, 3072],
    ] as const) {
      const a = randomBf16(M * K, M + N + K + 5)
      const w = randomBf16(N * K, M + N + K + 6)
      const bias = randomBf16(N, M + N + K + 7)
      await expectNoStaleReads(`matmulPartitioned ${M}×${N}×${K}`, () => {
        const inputs = [bf16Tensor('cuda', [M, K], a), bf16Tensor('cuda', [N, K], w), bf16Tensor('cuda', [N], bias)]
        const out = n.empty('cuda', 'bf16', [M, N])
        n.matmulPartitioned(out, inputs[0]!, inputs[1]!, inputs[2]!)
        return output(out, inputs)
      })
      // Rank 1 of two: the second half of K's columns, partitions 4-7.
      const half = (x: Float32Array, rows: number): Float32Array => {
        const h = new Float32Array((rows * K) / 2)
        for (let i = 0; i < rows; i++) h.set(x.subarray(i * K + K / 2, (i + 1) * K), (i * K) / 2)
        return h
      }
      const aHalf = half(a, M)
      const wHalf = half(w, N)
      await expectNoStaleReads(`matmulPartials ${M}×${N}×${K / 2} (rank 1 of 2)`, () => {
        const inputs = [bf16Tensor('cuda', [M, K / 2], aHalf), bf16Tensor('cuda', [N, K / 2], wHalf)]
        const partials = n.empty('cuda', 'f32', [4, M, N])
        n.matmulPartials(partials, inputs[0]!, inputs[1]!)
        return output(partials, inputs)
      })
    }
  })

  it('token choice at a 151,936-token vocabulary: greedy, sampled, scored, with top log-probs', async () => {
    const V = 151936
    const choices: TokenChoice[] = [
      { temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: 5, target: -1, topLogprobs: 20 },
      { temperature: 0.7, topK: 0, topP: 0.95, minP: 0, seed: 4242, position: 9, target: -1, topLogprobs: 20 },
      { temperature: 1, topK: 50, topP: 1, minP: 0.05, seed: 7, position: 300, target: -1, topLogprobs: 20 },
      { temperature: 1.6, topK: 1000, topP: 0.5, minP: 0, seed: 99, position: 2, target: -1, topLogprobs: 20 },
      { temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: 40, target: 1234, topLogprobs: 20 },
    ]
    const x = randomNormal(choices.length * V, 17, 3)
    await expectNoStaleReads('chooseTokens', async () => {
      const logits = tensorFrom('cuda', 'f32', [choices.length, V], x)
      try {
        const r = await chooseOnLogits(logits, choices, 20)
        return Buffer.concat([r.ids, r.logprobs, r.topIds, r.topLogprobs].map(bytesOf))
      } finally {
        logits.dispose()
      }
    })
  })

  it('rmsnorm, log_softmax and argmax', async () => {
    for (const [rows, H] of [
      [1, 1024],
      [7, 4096],
      [64, 1000],
    ] as const) {
      const x = randomBf16(rows * H, rows + H, 2)
      const w = randomBf16(H, rows + H + 1)
      await expectNoStaleReads(`rmsnorm ${rows}×${H}`, () => {
        const xt = bf16Tensor('cuda', [rows, H], x)
        const wt = bf16Tensor('cuda', [H], w)
        const out = n.empty('cuda', 'bf16', [rows, H])
        n.rmsnorm(out, xt, wt, 1e-6)
        return output(out, [xt, wt])
      })
    }
    for (const [rows, V] of [
      [3, 151936],
      [5, 1000],
    ] as const) {
      const x = randomArray(rows * V, rows + V, 8)
      await expectNoStaleReads(`log_softmax ${rows}×${V}`, () => {
        const xt = tensorFrom('cuda', 'f32', [rows, V], x)
        const out = n.empty('cuda', 'f32', [rows, V])
        n.logSoftmax(out, xt)
        return output(out, [xt])
      })
      await expectNoStaleReads(`argmax ${rows}×${V}`, () => {
        const xt = tensorFrom('cuda', 'f32', [rows, V], x)
        const out = n.empty('cuda', 'i32', [rows])
        n.argmax(out, xt)
        return output(out, [xt])
      })
    }
  })

  describe('attention', () => {
    // Lengths on both sides of the 16-key page, 64-key block and 256-key split edges.
    const LENGTHS = [1, 17, 63, 65, 193, 256, 257, 700]
    const scenes: AttentionScene[] = []
    beforeAll(() => {
      scenes.push(new AttentionScene('cuda', { heads: 8, kvHeads: 2, dim: 128, blockSize: 16 }, LENGTHS, 91))
      scenes.push(new AttentionScene('cuda', { heads: 16, kvHeads: 2, dim: 64, blockSize: 16 }, LENGTHS, 92))
    })
    afterAll(() => scenes.forEach((s) => s.dispose()))

    const bits = async (scene: AttentionScene, slices: Slice[]): Promise<Buffer> =>
      Buffer.concat((await scene.run(slices)).map(bytesOf))
    const whole = (scene: AttentionScene): Slice[] => scene.seqs.map((s, seq) => ({ seq, start: 0, end: s.len }))
    const tails = (scene: AttentionScene): Slice[] =>
      scene.seqs.map((s, seq) => ({ seq, start: Math.max(0, s.len - 24), end: s.len }))
    const decode = (scene: AttentionScene): Slice[] => scene.seqs.map((s, seq) => ({ seq, start: s.len - 1, end: s.len }))

    it('prefill, whole and in chunks over a cached prefix, with either kernel', async () => {
      for (const scene of scenes)
        for (const kernel of ['auto', 'mma.sync'] as const) {
          n.setPrefillKernel(kernel)
          const what = `head dim ${scene.shape.dim}, ${kernel} prefill`
          await expectNoStaleReads(`${what}, whole`, () => bits(scene, whole(scene)))
          await expectNoStaleReads(`${what}, last 24 queries`, () => bits(scene, tails(scene)))
        }
    })

    it('decode with each K/V pipeline', async () => {
      for (const scene of scenes)
        for (const pipeline of ['auto', 'paired', 'rotating', 'paired3'] as const) {
          n.setDecodePipeline(pipeline)
          await expectNoStaleReads(`head dim ${scene.shape.dim}, ${pipeline} decode`, () => bits(scene, decode(scene)))
        }
    })

    it('decode and prefill under the variant configuration', async () => {
      n.setVariantKernels(true)
      for (const scene of scenes) {
        // 17 sequences at position 192: the variant splits them into 65 keys, which end inside key blocks.
        const longest = scene.seqs.length - 1 // 700, 257 and 256 keys: the last three
        const at192: Slice[] = Array.from({ length: 17 }, (_, i) => ({ seq: longest - (i % 3), start: 192, end: 193 }))
        for (const pipeline of ['paired', 'rotating', 'paired3'] as const) {
          n.setDecodePipeline(pipeline)
          const what = `head dim ${scene.shape.dim}, variant, ${pipeline} decode`
          await expectNoStaleReads(what, () => bits(scene, decode(scene)))
          await expectNoStaleReads(`${what}, 17 sequences at position 192`, () => bits(scene, at192))
        }
        await expectNoStaleReads(`head dim ${scene.shape.dim}, variant prefill`, () => bits(scene, whole(scene)))
      }
    })
  })
})
