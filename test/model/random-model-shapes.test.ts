// The shapes of scripts/make-random-model.mjs are the published models': the config parses, the
// script writes exactly the tensors the loader expects, and the parameter counts are the
// published ones (Qwen3-0.6B 596,049,920, Qwen3-8B 8,190,735,360, Llama-3.1-8B 8,030,261,248,
// Mistral-7B-v0.3 7,248,023,552).
import { describe, expect, it } from 'vitest'
import { parseModelConfig } from '../../lib/model/config.js'
import { expectedTensors } from '../../lib/model/weights.js'
// @ts-expect-error: a plain ESM script without type declarations
import { modelTensors, SHAPES } from '../../scripts/make-random-model.mjs'

const PUBLISHED_PARAMETERS: Record<string, number> = {
  'qwen3-0.6b': 596_049_920,
  'qwen3-8b': 8_190_735_360,
  'llama3.1-8b': 8_030_261_248,
  'mistral-7b': 7_248_023_552,
}

describe('random model shapes', () => {
  for (const [shape, raw] of Object.entries(SHAPES as Record<string, Record<string, unknown>>))
    it(`${shape}: the loader's tensors, and the published parameter count`, () => {
      const config = parseModelConfig(raw, `${shape} config`)
      const written = (modelTensors(raw) as [string, number[], number][]).map(([name, shape]) => ({ name, shape }))
      expect(written).toEqual(expectedTensors(config))
      const count = written.reduce((s, t) => s + t.shape.reduce((a, b) => a * b, 1), 0)
      if (PUBLISHED_PARAMETERS[shape] !== undefined) expect(count).toBe(PUBLISHED_PARAMETERS[shape])
    })

  it('qwen3-8b, llama3.1-8b and mistral-7b carry their architectures’ features', () => {
    const qwen = parseModelConfig(SHAPES['qwen3-8b'])
    expect([qwen.headDim, qwen.qkNorm, qwen.tieWordEmbeddings, qwen.ropeTheta, qwen.ropeScaling]).toEqual([128, true, false, 1e6, null])
    const llama = parseModelConfig(SHAPES['llama3.1-8b'])
    expect([llama.headDim, llama.qkNorm, llama.tieWordEmbeddings, llama.ropeTheta, llama.rmsNormEps]).toEqual([128, false, false, 500000, 1e-5])
    expect(llama.ropeScaling).toEqual({ type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 })
    const mistral = parseModelConfig(SHAPES['mistral-7b'])
    expect([mistral.architecture, mistral.headDim, mistral.qkNorm, mistral.vocabSize, mistral.ropeTheta]).toEqual(['MistralForCausalLM', 128, false, 32768, 1e6])
  })
})
