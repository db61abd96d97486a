// The forward pass on CUDA: close to the CPU backend (bitwise equality across backends is not
// promised), and the same bitwise prefill/decode and batch invariance as on the CPU.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { Transformer } from '../../lib/model/transformer.js'
import { readF32 } from '../../lib/tensor.js'
import { describeGpu, gpuAvailable } from '../helpers/gpu.js'
import { randomInts } from '../helpers/random.js'
import { writeTinyModel, type TinyModel } from '../helpers/tiny-model.js'
import { blockTables, firstDifferentRow, runBatched, runChunked } from './forward-helpers.js'
import { referenceLogits } from './reference-transformer.js'
import { ARCHITECTURES } from './architectures.js'

let root: string
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'detinfer-forward-gpu-'))
})
afterAll(() => rmSync(root, { recursive: true, force: true }))

describe.skipIf(gpuAvailable)('without a usable GPU', () => {
  it("device 'cuda' is refused with the reason", async () => {
    const dir = writeTinyModel(join(root, 'no-gpu'), { architecture: 'LlamaForCausalLM', numLayers: 1 }).dir
    await expect(Transformer.load(dir, { device: 'cuda', maxBatchTokens: 4, kvBlocks: 2 })).rejects.toThrow(
      'detinfer: CUDA device requested but',
    )
  })
})

// The CUDA attention kernels are built for head dims 64 and 128 (other head dims are refused with
// an error naming them), so the models here are the CPU suite's with wider heads.
const CUDA_HEAD_DIMS: Record<string, number> = {
  LlamaForCausalLM: 64,
  Qwen2ForCausalLM: 64,
  Qwen3ForCausalLM: 128,
  MistralForCausalLM: 64,
}

for (const { spec: cpuSpec } of ARCHITECTURES) {
  const spec = { ...cpuSpec, headDim: CUDA_HEAD_DIMS[cpuSpec.architecture]! }
  const name = `${spec.architecture}, head_dim ${spec.headDim}, ${spec.dtype ?? 'BF16'} weights`
  describeGpu(`forward pass on CUDA: ${name}`, () => {
    let tiny: TinyModel
    let gpu: Transformer
    let cpu: Transformer
    const opts = { maxBatchTokens: 320, kvBlocks: 96, kvBlockSize: 16 }

    beforeAll(async () => {
      tiny = writeTinyModel(join(root, spec.architecture), { ...spec, seed: name.length * 101 })
      gpu = await Transformer.load(tiny.dir, { device: 'cuda', ...opts })
      cpu = await Transformer.load(tiny.dir, { device: 'cpu', ...opts })
    })
    afterAll(() => {
      gpu?.dispose()
      cpu?.dispose()
    })

    it('logits are close to the CPU backend and to the float64 reference', async () => {
      const V = tiny.config['vocab_size'] as number
      const tokens = Array.from(randomInts(40, 7, V))
      const chunk = { tokens, startPosition: 0, blockTable: blockTables(1, 3)[0]!, logits: 'all' as const }
      const onGpu = await readF32(gpu.forward([chunk]).logits)
      const onCpu = await readF32(cpu.forward([chunk]).logits)
      const ref = referenceLogits(tiny, tokens)
      let worstCpu = 0
      let worstRef = 0
      for (let p = 0; p < tokens.length; p++) {
        let num = 0
        let den = 0
        let numRef = 0
        let denRef = 0
        for (let v = 0; v < V; v++) {
          const g = onGpu[p * V + v]!
          num += (g - onCpu[p * V + v]!) ** 2
          den += onCpu[p * V + v]! ** 2
          numRef += (g - ref[p]![v]!) ** 2
          denRef += ref[p]![v]! ** 2
        }
        worstCpu = Math.max(worstCpu, Math.sqrt(num / den))
        worstRef = Math.max(worstRef, Math.sqrt(numRef / denRef))
      }
      console.log(`${name}: CUDA vs CPU ${worstCpu.toExponential(2)}, CUDA vs float64 ${worstRef.toExponential(2)}`)
      // Both backends round the same intermediates to bf16; they differ only in fp32 summation
      // order, which flips an occasional bf16 rounding: well under the bf16-vs-float64 error.
      expect(worstCpu).toBeLessThan(0.02)
      expect(worstRef).toBeLessThan(0.03)
    })

    it('one prefill, chunked prefills and token-by-token decoding give bit-identical logits', async () => {
      const V = tiny.config['vocab_size'] as number
      const seq = Array.from(randomInts(300, 11, V))
      const table = blockTables(1, 20)[0]!
      const whole = await runChunked(gpu, seq, 300, table)
      expect(firstDifferentRow(await runChunked(gpu, seq, [37, 64, 155, 1, 43], table), whole)).toBe(-1)
      expect(firstDifferentRow(await runChunked(gpu, seq, [250, 1], table), whole)).toBe(-1)
    })

    it('a sequence gives bit-identical logits alone and beside other sequences', async () => {
      const V = tiny.config['vocab_size'] as number
      const seqs = [0, 1, 2, 3].map((s) => Array.from(randomInts(30 + 17 * s, 20 + s, V)))
      const tables = blockTables(4, 6)
      // One forward at a time: a forward's logits buffer is overwritten by the next forward, and a
      // CUDA download is queued on the stream when its worker runs, not when it is asked for.
      const alone: Buffer[][] = []
      for (const [s, seq] of seqs.entries()) alone.push(await runChunked(gpu, seq, seq.length, tables[s]!))
      const batched = await runBatched(gpu, seqs, (s, step) => (s > 0 ? 8 : step === 0 ? seqs[0]!.length - 8 : 1), tables)
      seqs.forEach((_, s) => expect(firstDifferentRow(batched[s]!, alone[s]!), `sequence ${s}`).toBe(-1))
    })
  })
}
