// Fusing a layer's launches keeps its bits: the model with q|k|v and gate|up as one product each
// (qkvRopeAppend, siluMulPacked) gives the same logits, bit for bit, and so the same tokens, as
// the model with one product per weight and one op per step (unfusedLayers), for the four
// architectures of test/fixtures/hf, through prefill, chunked prefill mixed with decoding, and
// greedy decoding. On the CPU here; on CUDA (describeGpu) the same, since every fixture has
// head_dim 64.
// The fixtures' hidden size (128) is too small for the Hopper products that compute the norm
// before them in their prologue (normMatmul: K a multiple of 256); on CUDA, two layers at
// Qwen3-0.6B's and Qwen2's layer shapes (hidden 1024, q|k|v biases for Qwen2) run them at every
// decode step, against the unfused layers' separate addRmsnorm.
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { DeviceName } from '../../lib/native.js'
import { Transformer, type SequenceChunk } from '../../lib/model/transformer.js'
import { readBytes } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { firstDifference } from '../helpers/compare.js'
import { writeTinyModel } from '../helpers/tiny-model.js'
import { blockTables, splitRows, asF32 } from './forward-helpers.js'

const fixtures = join(resolve(dirname(fileURLToPath(import.meta.url)), '..', '..'), 'test', 'fixtures', 'hf')
const MODELS = ['llama', 'qwen2', 'qwen3', 'mistral']
const DECODE_STEPS = 12

/** Two prompts of 13 and 21 ids spread over the fixtures' 4096-token vocabulary. */
function promptIds(): number[][] {
  return [13, 21].map((len, i) => Array.from({ length: len }, (_, j) => (j * 131 + i * 977 + 7) % 4096))
}

function argmax(row: Float32Array): number {
  let best = 0
  for (let v = 1; v < row.length; v++) if (row[v]! > row[best]!) best = v
  return best
}

interface Trace {
  steps: Buffer[] // every step's logits bytes
  tokens: number[][] // each sequence's greedy continuation
}

/**
 * Two sequences in one batch: step 0 prefills A whole and B's first half, step 1 prefills the
 * rest of B while A decodes, then both decode greedily.
 */
async function trace(model: Transformer, prompts: number[][]): Promise<Trace> {
  const tables = blockTables(2, 4)
  const seqs = prompts.map((p) => [...p])
  const done = [0, 0] // positions already in the cache
  const out: Trace = { steps: [], tokens: [[], []] }
  const half = Math.ceil(prompts[1]!.length / 2)
  for (let step = 0; step < DECODE_STEPS + 2; step++) {
    const chunks: SequenceChunk[] = seqs.map((seq, s) => {
      const end = s === 1 && step === 0 ? half : seq.length
      return { tokens: seq.slice(done[s], end), startPosition: done[s]!, blockTable: tables[s]!, logits: 'last' }
    })
    const result = model.forward(chunks)
    const bytes = await readBytes(result.logits)
    out.steps.push(bytes)
    const rows = splitRows(bytes, 2)
    chunks.forEach((c, s) => {
      done[s] = c.startPosition + c.tokens.length
      if (done[s] < prompts[s]!.length) return // B's first half: its last row is not a prediction yet
      const next = argmax(asF32(rows[s]!))
      seqs[s]!.push(next)
      out.tokens[s]!.push(next)
    })
  }
  return out
}

/** The fixtures present, each as a name and its directory. */
const fixtureModels = MODELS.filter((m) => existsSync(join(fixtures, m, 'config.json'))).map((m) => ({ name: m, dir: () => join(fixtures, m) }))

/** `models`' directories are read when the suite runs (they may be written by a beforeAll). */
function fusedSuite(device: DeviceName, models = fixtureModels): void {
  for (const { name, dir } of models) {
    describe(name, () => {
      let fused: Transformer
      let unfused: Transformer
      const opts = { device, maxBatchTokens: 96, kvBlocks: 8, kvBlockSize: 16 }
      beforeAll(async () => {
        fused = await Transformer.load(dir(), opts)
        unfused = await Transformer.load(dir(), { ...opts, unfusedLayers: true })
      })
      afterAll(() => {
        fused?.dispose()
        unfused?.dispose()
      })

      it('fused layers give the unfused logits and tokens bit for bit', async () => {
        const prompts = promptIds()
        const a = await trace(fused, prompts)
        const b = await trace(unfused, prompts)
        expect(a.steps.length).toBe(DECODE_STEPS + 2)
        a.steps.forEach((bytes, step) => {
          const at = firstDifference(bytes, b.steps[step]!)
          if (at >= 0) expect.fail(`step ${step}: logits differ first at byte ${at}`)
        })
        expect(a.tokens).toEqual(b.tokens)
        expect(a.tokens[0]!.length).toBe(DECODE_STEPS + 2)
      })
    })
  }
}

describe('fused layers on the CPU', () => fusedSuite('cpu'))
describeGpu('fused layers on CUDA', () => fusedSuite('cuda'))

describeGpu('fused layers and norms on CUDA at hidden size 1024', () => {
  let root: string
  beforeAll(() => {
    root = mkdtempSync(join(tmpdir(), 'detinfer-fused-'))
    const layer = { hiddenSize: 1024, intermediateSize: 3072, numLayers: 2, numHeads: 16, numKvHeads: 8, headDim: 128, maxPositions: 1024, vocabSize: 4096 }
    writeTinyModel(join(root, 'qwen3'), { architecture: 'Qwen3ForCausalLM', ...layer, seed: 21 })
    writeTinyModel(join(root, 'qwen2'), { architecture: 'Qwen2ForCausalLM', ...layer, attentionBias: true, seed: 22 })
  })
  afterAll(() => rmSync(root, { recursive: true, force: true }))
  fusedSuite('cuda', ['qwen3', 'qwen2'].map((m) => ({ name: `${m} at 0.6B layer shapes`, dir: () => join(root, m) })))
})
