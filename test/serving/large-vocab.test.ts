// A model with Qwen3's 151,936-token vocabulary (hidden 64, 2 layers, random weights, so its
// next-token distributions are wide: top-p keeps tens of thousands of tokens) served end to end:
// greedy and seeded sampling with top-k, top-p and min-p, top log-probs, and scoring, each
// request bit-identical alone and in a batch, and score() equal to generate(); structured output
// (JSON schemas, JSON mode) through masks of 4,748 words, the same bits with the masks computed on
// the main thread and on grammar worker threads. On the CPU backend in CI, and on CUDA when a GPU
// is there. The variant twins expect the bits to move.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { setVariantKernels } from '../../lib/device.js'
import { NonFiniteLogitsError } from '../../lib/errors.js'
import type { GenerateOptions, GenerateResult } from '../../lib/generate.js'
import { loadModel, type Model } from '../../lib/api.js'
import { GrammarEngine } from '../../lib/grammar.js'
import { Tokenizer } from '../../lib/tokenizer.js'
import type { DeviceName } from '../../lib/native.js'
import { firstDifference } from '../helpers/compare.js'
import { describeGpu } from '../helpers/gpu.js'
import { mulberry32 } from '../helpers/random.js'
import { writeTinyModel } from '../helpers/tiny-model.js'

const V_QWEN = 151936
let dir: string

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'detinfer-vocab-'))
  writeTinyModel(dir, {
    architecture: 'Qwen3ForCausalLM',
    hiddenSize: 64,
    intermediateSize: 128,
    numLayers: 2,
    numHeads: 1,
    numKvHeads: 1,
    headDim: 64,
    vocabSize: V_QWEN,
    tieWordEmbeddings: false, // lm_head std 1/8: logits of std ~1, a wide distribution
    maxPositions: 512,
    seed: 11,
  })
})

afterAll(() => {
  setVariantKernels(false)
  rmSync(dir, { recursive: true, force: true })
})

function prompts(seed: number, lengths: number[]): number[][] {
  const rand = mulberry32(seed)
  return lengths.map((n) => Array.from({ length: n }, () => Math.floor(rand() * V_QWEN)))
}

/** Everything a result carries, as bits: tokens, log-probs and top log-probs. */
function resultBits(r: { tokens: number[]; logprobs: number[]; topLogprobs?: { token: number; logprob: number }[][] }): string {
  const top = (r.topLogprobs ?? []).map((t) => t.map((e) => `${e.token}:${Buffer.from(Float32Array.of(e.logprob).buffer).toString('hex')}`))
  return JSON.stringify([r.tokens, Buffer.from(Float32Array.from(r.logprobs).buffer).toString('hex'), top])
}

const CASES: GenerateOptions[] = [
  { maxTokens: 5, topLogprobs: 3 },
  { maxTokens: 5, temperature: 0.9, topP: 0.95, seed: 4242, topLogprobs: 2 },
  { maxTokens: 5, temperature: 0.7, topK: 50, minP: 0.05, seed: 7 },
  { maxTokens: 5, temperature: 1.2, seed: 99 },
]

const ANSWER = {
  type: 'object',
  properties: { answer: { enum: ['yes', 'no', 'maybe'] }, sure: { type: 'boolean' } },
  required: ['answer', 'sure'],
  additionalProperties: false,
}

/** Structured requests: a schema the model must complete (greedy and sampled), JSON mode with a penalty, and a choice. */
const FORMATS: GenerateOptions[] = [
  { maxTokens: 40, responseFormat: { type: 'json_schema', schema: ANSWER } },
  { maxTokens: 40, temperature: 1, seed: 5, topLogprobs: 2, responseFormat: { type: 'json_schema', schema: ANSWER } },
  { maxTokens: 10, temperature: 0.8, seed: 9, frequencyPenalty: 0.5, responseFormat: { type: 'json_object' } },
  { maxTokens: 20, temperature: 1, seed: 3, responseFormat: { type: 'choice', choices: ['alpha', 'beta gamma', 'δ'] } },
]

/** Replays `tokens` through a fresh constraint of the format: each must be one its mask allowed. */
async function expectAllowed(engine: GrammarEngine, options: GenerateOptions, tokens: number[]): Promise<void> {
  const c = (await engine.constrain(options.responseFormat!))!
  try {
    for (const [i, id] of tokens.entries()) {
      const mask = await c.mask()
      expect(mask.length).toBe(Math.ceil(V_QWEN / 32))
      expect((mask[id >> 5]! >>> (id & 31)) & 1, `token ${i} (${id})`).toBe(1)
      c.accept(id)
    }
  } finally {
    c.dispose()
  }
}

function suite(device: DeviceName) {
  let model: Model
  const list = prompts(3, [1, 9, 17, 40])
  beforeAll(async () => {
    model = await loadModel(dir, { device, maxBatchSize: 16, maxBatchTokens: 128, prefillChunkSize: 16, kvCacheTokens: 2048 })
  })
  afterAll(() => model?.dispose())

  it('every request alone equals the same request in a mixed batch: tokens, log-probs, top log-probs', async () => {
    const solo: GenerateResult[][] = []
    for (const options of CASES) {
      const out: GenerateResult[] = []
      for (const p of list) out.push(await model.generate(p, options))
      solo.push(out)
    }
    const batched = await Promise.all(CASES.map((options) => Promise.all(list.map((p) => model.generate(p, options)))))
    for (const [c, options] of CASES.entries())
      for (const i of list.keys()) expect(resultBits(batched[c]![i]!), `${JSON.stringify(options)} prompt ${i}`).toBe(resultBits(solo[c]![i]!))
    // The samples really sample: they leave the greedy path, and top log-probs are sorted and hold the greedy choice.
    expect(solo[1]!.some((r, i) => r.tokens.join() !== solo[0]![i]!.tokens.join())).toBe(true)
    for (const r of solo[0]!)
      r.topLogprobs!.forEach((top, t) => {
        expect(top).toHaveLength(3)
        expect(top[0]!.token).toBe(r.tokens[t])
        expect(top[0]!.logprob).toBe(r.logprobs[t])
        expect(top[1]!.logprob).toBeLessThanOrEqual(top[0]!.logprob)
      })
  })

  it('score() and stream() report the log-probs and top log-probs generate() saw, bit for bit', async () => {
    const options = CASES[1]!
    for (const p of list.slice(1, 3)) {
      const generated = await model.generate(p, options)
      const scored = await model.score(p, generated.tokens, { topLogprobs: 2 })
      expect(resultBits({ ...scored, tokens: generated.tokens })).toBe(resultBits(generated))
      const pieces = []
      for await (const piece of model.stream(p, options)) pieces.push(piece)
      expect(resultBits({ tokens: pieces.map((x) => x.token), logprobs: pieces.map((x) => x.logprob), topLogprobs: pieces.map((x) => x.topLogprobs!) })).toBe(resultBits(generated))
    }
  })

  it('structured output: JSON the schema accepts, every token one its grammar allowed, alone equal to in a batch of free requests', async () => {
    const engine = new GrammarEngine(await Tokenizer.load(dir, { modelVocabSize: V_QWEN }), V_QWEN)
    try {
      const some = list.slice(0, 3)
      const solo: GenerateResult[][] = []
      for (const options of FORMATS) {
        const out: GenerateResult[] = []
        for (const p of some) out.push(await model.generate(p, options))
        solo.push(out)
      }
      const free = list.map((p) => model.generate(p, CASES[1]!))
      const batched = await Promise.all(FORMATS.map((options) => Promise.all(some.map((p) => model.generate(p, options)))))
      await Promise.all(free)
      for (const [c, options] of FORMATS.entries())
        for (const i of some.keys()) {
          const r = solo[c]![i]!
          expect(resultBits(batched[c]![i]!), `${JSON.stringify(options)} prompt ${i}`).toBe(resultBits(r))
          await expectAllowed(engine, options, r.tokens)
          if (options.responseFormat!.type === 'json_schema') {
            // A schema of a few values: the model completes it and ends with EOS.
            expect(r.finishReason).toBe('stop')
            const value = JSON.parse(r.text) as { answer: string; sure: boolean }
            expect(Object.keys(value)).toEqual(['answer', 'sure'])
            expect(['yes', 'no', 'maybe']).toContain(value.answer)
            expect(typeof value.sure).toBe('boolean')
          } else if (options.responseFormat!.type === 'choice') {
            expect(r.finishReason).toBe('stop')
            expect(['alpha', 'beta gamma', 'δ']).toContain(r.text)
          } else {
            expect(r.text.startsWith('{')).toBe(true)
          }
        }
      // Sampling under a grammar samples: over a dozen seeds the answers are not all one.
      const texts = new Set<string>()
      for (let seed = 0; seed < 12; seed++) texts.add((await model.generate(some[0]!, { ...FORMATS[1]!, seed })).text)
      expect(texts.size).toBeGreaterThan(1)
    } finally {
      engine.dispose()
    }
  })

  it('structured output: the same bits with every mask on the main thread (grammarWorkers 0) and on 3 grammar workers, alone and batched', async () => {
    const models = await Promise.all(
      [0, 3].map((grammarWorkers) => loadModel(dir, { device, maxBatchSize: 16, maxBatchTokens: 128, prefillChunkSize: 16, kvCacheTokens: 2048, grammarWorkers })),
    )
    try {
      const bits = await Promise.all(
        models.map(async (m) => {
          // Every format for every prompt at once (the masks of a step spread over the workers), then one alone.
          const batched = await Promise.all(FORMATS.flatMap((options) => list.map((p) => m.generate(p, options))))
          const alone = await m.generate(list[0]!, FORMATS[1]!)
          return [...batched, alone].map(resultBits)
        }),
      )
      expect(bits[1]).toEqual(bits[0])
      // And the bits of the model of the default number of workers.
      expect(resultBits(await model.generate(list[0]!, FORMATS[1]!))).toBe(bits[0]!.at(-1))
    } finally {
      for (const m of models) await m.dispose()
    }
  })

  it('variant twin: batching moves the bits of structured requests', async () => {
    setVariantKernels(true)
    try {
      let differ = 0
      for (const options of FORMATS) {
        const batched = await Promise.all(list.map((p) => model.generate(p, options)))
        for (const [i, p] of list.entries()) if (resultBits(await model.generate(p, options)) !== resultBits(batched[i]!)) differ++
      }
      expect(differ).toBeGreaterThan(0)
    } finally {
      setVariantKernels(false)
    }
  })

  it('variant twin: batching moves the log-prob bits', async () => {
    // One last bit of a logsumexp moves only now and then: every case and prompt, alone and batched.
    setVariantKernels(true)
    try {
      let differ = 0
      for (const options of CASES) {
        const batched = await Promise.all(list.map((p) => model.generate(p, options)))
        for (const [i, p] of list.entries()) if (resultBits(await model.generate(p, options)) !== resultBits(batched[i]!)) differ++
      }
      expect(differ).toBeGreaterThan(0)
    } finally {
      setVariantKernels(false)
    }
  })
}

describe('151,936-token vocabulary on the CPU backend', () => suite('cpu'))
describeGpu('151,936-token vocabulary on CUDA', () => suite('cuda'))

describe('non-finite logits', () => {
  it('fail the request with an error that names the cause, and leave other requests alone', async () => {
    const bad = mkdtempSync(join(tmpdir(), 'detinfer-nan-'))
    try {
      writeTinyModel(bad, { architecture: 'Qwen3ForCausalLM', hiddenSize: 64, numLayers: 1, seed: 3 })
      // model.norm.weight at bf16's largest finite value: the weights pass the load's scan, but
      // the final norm's outputs overflow and every logits row is non-finite.
      const file = join(bad, 'model.safetensors')
      const bytes = readFileSync(file)
      const headerLength = Number(bytes.readBigUInt64LE(0))
      const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8'))
      const [begin, end] = header['model.norm.weight'].data_offsets as [number, number]
      for (let at = 8 + headerLength + begin; at < 8 + headerLength + end; at += 2) bytes.writeUInt16LE(0x7f7f, at)
      writeFileSync(file, bytes)
      const model = await loadModel(bad, { device: 'cpu' })
      try {
        await expect(model.generate([1, 2, 3], { maxTokens: 4 })).rejects.toThrow(NonFiniteLogitsError)
        await expect(model.generate([1, 2, 3], { maxTokens: 4, temperature: 1, seed: 1 })).rejects.toThrow(/not finite \(NaN or infinity\) at position 2/)
        await expect(model.score([1, 2, 3], [4, 5])).rejects.toThrow(NonFiniteLogitsError)
      } finally {
        await model.dispose()
      }
    } finally {
      rmSync(bad, { recursive: true, force: true })
    }
  })
})
