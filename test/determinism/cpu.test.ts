// The determinism experiment on the CPU backend (the CI version of the GPU suite): one prompt
// completed many times under varied batching must come back identical, tokens and log-probs bit
// for bit, to its completion run alone; the variant kernels must make the same harness see a
// difference.
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultPhases, runCheck, type CheckOptions } from '../../lib/determinism-check.js'
import { setVariantKernels } from '../../lib/device.js'
import { defaultModelPath } from '../../lib/api.js'
import { Transformer } from '../../lib/model/transformer.js'
import { GrammarEngine } from '../../lib/grammar.js'
import { Tokenizer } from '../../lib/tokenizer.js'
import { writeTinyModel } from '../helpers/tiny-model.js'
// @ts-expect-error: a plain ESM script without type declarations
import { writeRandomModel } from '../../scripts/make-random-model.mjs'

const MAX_BATCH = 16
const BATCH_TOKENS = 96

function options(prompt: number[], runs: number, maxTokens: number, vocab: number): CheckOptions {
  return {
    prompt,
    runs,
    maxTokens,
    noise: { count: Math.ceil(runs / 2), vocab, maxPromptTokens: 40, maxTokens },
    phases: defaultPhases(MAX_BATCH, BATCH_TOKENS),
    seed: 7,
  }
}

async function load(dir: string): Promise<Transformer> {
  // Processor rows for the constrained requests (structured output); allocated at their first use.
  return Transformer.load(dir, { device: 'cpu', maxBatchTokens: BATCH_TOKENS, kvBlocks: 40 * (MAX_BATCH + 1), kvBlockSize: 16, logitProcessorRows: MAX_BATCH })
}

describe('determinism on the CPU backend (random Qwen3, qwen3-tiny shape)', () => {
  let dir: string
  let model: Transformer
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'detinfer-det-'))
    // Random weights of std 0.02 (scripts/make-random-model.mjs) give close logits, so a changed
    // reduction order shows; the tokenizer files come from a tiny test tokenizer.
    writeTinyModel(join(dir, 'tokenizer'), { architecture: 'Qwen3ForCausalLM' })
    writeRandomModel({ shape: 'qwen3-tiny', seed: 11, out: join(dir, 'model'), tokenizerDir: join(dir, 'tokenizer') })
    model = await load(join(dir, 'model'))
  })
  afterAll(() => {
    setVariantKernels(false)
    model?.dispose()
    rmSync(dir, { recursive: true, force: true })
  })

  const prompt = [5, 17, 42, 8, 99, 3, 64, 21, 7, 130, 11, 2]

  it('gives 100 identical completions under varied batching', async () => {
    const r = await runCheck(model, options(prompt, 100, 32, model.config.vocabSize))
    console.log(`cpu invariant: ${r.distinctCompletions} distinct of ${r.runs}, max ${r.maxConcurrentSeen} running, ${r.seconds.toFixed(1)} s`)
    expect(r.firstDivergence).toBeNull()
    expect(r.identicalToReference).toBe(100)
    expect(r.distinctCompletions).toBe(1)
    expect(r.maxConcurrentSeen).toBeGreaterThan(1)
  })

  it('gives 60 identical seeded samples under varied batching, and the variant sees differences', async () => {
    const sampling = { temperature: 1, topK: 0, topP: 0.9, seed: 12345 }
    const sampled = { ...options(prompt, 60, 24, model.config.vocabSize), sampling }
    const r = await runCheck(model, sampled)
    console.log(`cpu sampled invariant: ${r.distinctCompletions} distinct of ${r.runs}`)
    expect(r.sampling).toEqual(sampling)
    expect(r.firstDivergence).toBeNull()
    expect(r.identicalToReference).toBe(60)
    // Sampling, not greedy decoding: the greedy completion of the same prompt is another one.
    const greedy = await runCheck(model, { ...options(prompt, 1, 24, model.config.vocabSize), noise: { ...sampled.noise, count: 0 } })
    expect(greedy.reference.tokens).not.toEqual(r.reference.tokens)
    setVariantKernels(true)
    try {
      const v = await runCheck(model, sampled)
      console.log(`cpu sampled variant: ${v.distinctCompletions} distinct of ${v.runs}, ${v.identicalToReference} identical`)
      expect(v.identicalToReference).toBeLessThan(60)
    } finally {
      setVariantKernels(false)
    }
  })

  it('structured output: 40 identical JSON completions among constrained and free noise, free ones identical beside constrained noise, and the variant sees differences', async () => {
    const tokenizer = await Tokenizer.load(join(dir, 'model'))
    const engine = new GrammarEngine(tokenizer, model.config.vocabSize)
    try {
      const constraints = { make: async () => (await engine.constrain({ type: 'json_object' }))!, target: true, noiseShare: 0.5 }
      const constrained = { ...options(prompt, 40, 24, model.config.vocabSize), constraints }
      const r = await runCheck(model, constrained)
      console.log(`cpu structured invariant: ${r.distinctCompletions} distinct of ${r.runs}, max ${r.maxConcurrentSeen} running`)
      expect(r.firstDivergence).toBeNull()
      expect(r.identicalToReference).toBe(40)
      expect(tokenizer.decode(r.reference.tokens).startsWith('{')).toBe(true)
      // Free completions beside constrained noise (which never rides in a step launched ahead).
      const free = await runCheck(model, { ...constrained, constraints: { ...constraints, target: false } })
      expect(free.firstDivergence).toBeNull()
      expect(free.identicalToReference).toBe(40)
      expect(free.reference.tokens).not.toEqual(r.reference.tokens)
      setVariantKernels(true)
      try {
        const v = await runCheck(model, constrained)
        console.log(`cpu structured variant: ${v.distinctCompletions} distinct of ${v.runs}, ${v.identicalToReference} identical`)
        expect(v.identicalToReference).toBeLessThan(40)
      } finally {
        setVariantKernels(false)
      }
    } finally {
      engine.dispose()
      tokenizer.close()
    }
  })

  it('sees differences with the variant kernels', async () => {
    setVariantKernels(true)
    try {
      const r = await runCheck(model, options(prompt, 100, 32, model.config.vocabSize))
      console.log(
        `cpu variant: ${r.distinctCompletions} distinct of ${r.runs} (${r.distinctTexts} distinct texts), ` +
          `${r.identicalToReference} identical to the reference`,
      )
      expect(r.identicalToReference).toBeLessThan(100)
      expect(r.firstDivergence).not.toBeNull()
    } finally {
      setVariantKernels(false)
    }
  })
})

describe.runIf(existsSync(join(defaultModelPath, 'config.json')))('determinism on the CPU backend (the shipped model)', () => {
  it('gives 24 identical completions of "ROMEO:" under varied batching', async () => {
    const { Tokenizer } = await import('../../lib/tokenizer.js')
    const tokenizer = await Tokenizer.load(defaultModelPath)
    const model = await load(defaultModelPath)
    try {
      const prompt = tokenizer.encodePrompt('ROMEO:', false)
      const r = await runCheck(model, options(prompt, 24, 32, Math.min(tokenizer.vocabSize, model.config.vocabSize)))
      expect(r.identicalToReference).toBe(24)
      expect(r.distinctCompletions).toBe(1)
    } finally {
      model.dispose()
    }
  })
})
