// The test users asked for by name: 1000 greedy completions of one prompt on an NVIDIA GPU, served
// under varied load (lib/determinism-check.ts: random arrival order among other random prompts of random
// lengths, batch sizes from 1 to 64, prefill chunk sizes from 1 to the whole prompt), each
// identical — tokens and log-probs, bit for bit — to the prompt's completion run alone. The same
// harness on the variant kernels must find differences.
//
// Models: random bf16 weights at Qwen3-0.6B's shapes (scripts/make-random-model.mjs, seed 1234;
// 0.6 B parameters, 28 layers, vocabulary 151936), and the model shipped with the package.
// DETINFER_DET_RUNS and DETINFER_DET_TOKENS change the size of the experiment (default 1000 and 256).
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { defaultPhases, runCheck, type CheckReport } from '../../lib/determinism-check.js'
import { setVariantKernels } from '../../lib/device.js'
import { defaultModelPath } from '../../lib/api.js'
import { Transformer } from '../../lib/model/transformer.js'
import { Tokenizer } from '../../lib/tokenizer.js'
import { GrammarEngine } from '../../lib/grammar.js'
// @ts-expect-error: a plain ESM script without type declarations
import { writeRandomModel } from '../../scripts/make-random-model.mjs'
import { describeGpu } from '../helpers/gpu.js'

const RUNS = Number(process.env.DETINFER_DET_RUNS ?? 1000)
const TOKENS = Number(process.env.DETINFER_DET_TOKENS ?? 256)
const VARIANT_RUNS = Math.min(RUNS, 200)
const MAX_BATCH = 64
const BATCH_TOKENS = 1024
const TIMEOUT = 60 * 60 * 1000

function summary(name: string, r: CheckReport): string {
  const d = r.firstDivergence
  return (
    `${name}: ${r.distinctCompletions} distinct completions (${r.distinctTexts} distinct texts) of ${r.runs} × ${r.maxTokens} tokens, ` +
    `${r.identicalToReference} identical to the reference, first divergence ${d ? `run ${d.run} token ${d.index}` : 'none'}, ` +
    `${r.generatedTokens} tokens in ${r.seconds.toFixed(1)} s (${r.tokensPerSecond.toFixed(0)} tok/s), up to ${r.maxConcurrentSeen} running`
  )
}

// Seeded sampling (contract item 4), drawn by the output head on the device: 200 runs on each
// model, the 0.6B shape's 151936-token vocabulary included.
const SAMPLED_RUNS = Math.min(RUNS, 200)
const SAMPLING = { temperature: 0.9, topK: 0, topP: 0.95, minP: 0, seed: 4242 }

function experiment(label: string, modelDir: () => string, withSampling = false) {
  let model: Transformer
  let prompt: number[]
  let vocab: number
  let tokenizer: Tokenizer
  let grammars: GrammarEngine
  beforeAll(async () => {
    tokenizer = await Tokenizer.load(modelDir())
    prompt = tokenizer.encodePrompt('ROMEO: Is the day so young?', false)
    model = await Transformer.load(modelDir(), {
      device: 'cuda',
      maxBatchTokens: BATCH_TOKENS,
      kvBlocks: Math.ceil((64 + TOKENS) / 16) * (MAX_BATCH + 2),
      kvBlockSize: 16,
      // Processor rows for the structured-output experiment (allocated at its first request).
      logitProcessorRows: MAX_BATCH,
    })
    vocab = Math.min(tokenizer.vocabSize, model.config.vocabSize)
    grammars = new GrammarEngine(tokenizer, model.config.vocabSize)
  }, TIMEOUT)
  afterAll(() => {
    setVariantKernels(false)
    grammars?.dispose()
    tokenizer?.close()
    model?.dispose()
  })
  const options = (runs: number) => ({
    prompt,
    runs,
    maxTokens: TOKENS,
    noise: { count: Math.ceil(runs / 2), vocab, maxPromptTokens: 64, maxTokens: TOKENS },
    phases: defaultPhases(MAX_BATCH, BATCH_TOKENS),
    seed: 2024,
  })

  it(`${label}: ${RUNS} completions under varied load are bit-identical to the completion run alone`, async () => {
    const r = await runCheck(model, options(RUNS))
    console.log(summary(`${label} invariant`, r))
    // Batches grow to the largest size the phases allow (fewer when a short run has fewer requests per phase).
    expect(r.maxConcurrentSeen).toBeGreaterThanOrEqual(Math.min(MAX_BATCH, Math.floor((RUNS * 1.5) / 5)) / 2)
    expect(r.firstDivergence).toBeNull()
    expect(r.identicalToReference).toBe(RUNS)
    expect(r.distinctCompletions).toBe(1)
  }, TIMEOUT)

  if (withSampling)
    it(`${label}: ${SAMPLED_RUNS} seeded samples under varied load equal the sample run alone`, async () => {
      const r = await runCheck(model, { ...options(SAMPLED_RUNS), sampling: SAMPLING })
      console.log(summary(`${label} sampled invariant`, r))
      expect(r.firstDivergence).toBeNull()
      expect(r.identicalToReference).toBe(SAMPLED_RUNS)
      setVariantKernels(true)
      try {
        const v = await runCheck(model, { ...options(SAMPLED_RUNS), sampling: SAMPLING })
        console.log(summary(`${label} sampled variant`, v))
        expect(v.identicalToReference).toBeLessThan(SAMPLED_RUNS)
      } finally {
        setVariantKernels(false)
      }
    }, TIMEOUT)

  // Structured output: the prompt's runs and half of the noise held to JSON by a grammar mask;
  // constrained sequences never ride in a step launched ahead, so the steps are made up otherwise.
  if (withSampling)
    it(`${label}: ${SAMPLED_RUNS} seeded samples held to JSON, among constrained and free noise, equal the sample run alone`, async () => {
      const constraints = { make: async () => (await grammars.constrain({ type: 'json_object' }))!, target: true, noiseShare: 0.5 }
      const structured = { ...options(SAMPLED_RUNS), sampling: SAMPLING, constraints }
      const r = await runCheck(model, structured)
      console.log(summary(`${label} structured invariant`, r))
      expect(r.firstDivergence).toBeNull()
      expect(r.identicalToReference).toBe(SAMPLED_RUNS)
      expect(tokenizer.decode(r.reference.tokens).startsWith('{')).toBe(true)
      setVariantKernels(true)
      try {
        const v = await runCheck(model, structured)
        console.log(summary(`${label} structured variant`, v))
        expect(v.identicalToReference).toBeLessThan(SAMPLED_RUNS)
      } finally {
        setVariantKernels(false)
      }
    }, TIMEOUT)

  it(`${label}: the variant kernels give more than one distinct completion or a log-prob difference`, async () => {
    setVariantKernels(true)
    try {
      const r = await runCheck(model, options(VARIANT_RUNS))
      console.log(summary(`${label} variant`, r))
      expect(r.identicalToReference).toBeLessThan(VARIANT_RUNS)
      expect(r.firstDivergence).not.toBeNull()
    } finally {
      setVariantKernels(false)
    }
  }, TIMEOUT)
}

describeGpu('determinism on the GPU: random weights at Qwen3-0.6B shapes', () => {
  let root = ''
  let dir = ''
  beforeAll(() => {
    root = mkdtempSync(join(tmpdir(), 'detinfer-q06-'))
    dir = join(root, 'model')
    writeRandomModel({ shape: 'qwen3-0.6b', seed: 1234, out: dir, tokenizerDir: defaultModelPath })
  }, TIMEOUT)
  afterAll(() => {
    if (root) rmSync(root, { recursive: true, force: true })
  })
  experiment('qwen3-0.6b-random', () => dir, true)
})

describeGpu('determinism on the GPU: the shipped model', () => {
  experiment('shipped model', () => defaultModelPath, true)
})
