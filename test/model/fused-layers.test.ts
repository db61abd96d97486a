// Fusing a layer's launches keeps its bits: the model with q|k|v and gate|up as one product each
// (qkvRopeAppend, siluMulPacked) gives the same logits, bit for bit, and so the same tokens, as
// the model with one product per weight and one op per step (unfusedLayers), for the four
// architectures of test/fixtures/hf, through prefill, chunked prefill mixed with decoding, and
// greedy decoding. On the CPU here; on CUDA (describeGpu) the same, since every fixture has
// head_dim 64.
import { existsSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { DeviceName } from '../../lib/native.js'
import { Transformer, type SequenceChunk } from '../../lib/model/transformer.js'
import { readBytes } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { firstDifference } from '../helpers/compare.js'
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

function fusedSuite(device: DeviceName): void {
  for (const name of MODELS.filter((m) => existsSync(join(fixtures, m, 'config.json')))) {
    describe(name, () => {
      let fused: Transformer
      let unfused: Transformer
      const opts = { device, maxBatchTokens: 96, kvBlocks: 8, kvBlockSize: 16 }
      beforeAll(async () => {
        fused = await Transformer.load(join(fixtures, name), opts)
        unfused = await Transformer.load(join(fixtures, name), { ...opts, unfusedLayers: true })
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
