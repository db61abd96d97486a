// Penalties and logit bias through the scheduler and the model: a request that uses them gives the
// same tokens and log-probs, bit for bit, alone and among other requests, with the padded decode
// buckets (CUDA graphs on a GPU) and without, with steps launched ahead and without, with
// sequences that stop where the scheduler could not foresee. The counts live on the device: a
// strong presence penalty makes a greedy completion of the shipped model never repeat a token
// (it repeats without), and a sequence that takes a row another sequence used (even one a step
// launched ahead added to after its owner ended) starts from zero, which a twin that never zeroes
// fails. Token masks (grammar-constrained completions): a masked completion gives the same bits
// alone and among others, and chooses only tokens its masks allow; the variant kernels break the
// comparison.
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultModelPath } from '../../lib/api.js'
import { setVariantKernels } from '../../lib/device.js'
import type { DeviceName } from '../../lib/native.js'
import { Transformer } from '../../lib/model/transformer.js'
import type { LogitProcessors, SamplingParams, TokenChoice } from '../../lib/sampling.js'
import { Scheduler, type ForwardModel } from '../../lib/scheduler.js'
import type { LaunchedStep } from '../../lib/step.js'
import { describeGpu } from '../helpers/gpu.js'
import { mulberry32 } from '../helpers/random.js'
import { tokenAllowed } from '../helpers/sampling-reference.js'
import { writeTinyModel } from '../helpers/tiny-model.js'

let dir: string
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'detinfer-processors-'))
  writeTinyModel(dir, { architecture: 'Qwen3ForCausalLM', hiddenSize: 128, intermediateSize: 256, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 64, maxPositions: 1024, seed: 21 })
})
afterAll(() => rmSync(dir, { recursive: true, force: true }))

interface Request {
  prompt: number[]
  sampling: SamplingParams | null
  maxTokens: number
  topLogprobs: number
  processors: LogitProcessors | null
}

/** Eleven requests, seven of them with penalties (three with a repetition penalty) or biases, greedy and sampled, some with top log-probs. */
function requests(withProcessors = true): Request[] {
  const rand = mulberry32(31_337)
  const bias = (n: number): [number, number][] => Array.from({ length: n }, (_, i) => [(i * 37 + 11) % 270, i % 2 ? -3.5 : 2.25])
  const kinds: (LogitProcessors | null)[] = [
    { frequencyPenalty: 0.8, presencePenalty: 0.4, repetitionPenalty: 1, logitBias: [] },
    null,
    { frequencyPenalty: 0, presencePenalty: 1.5, repetitionPenalty: 1.3, logitBias: bias(5) },
    null,
    { frequencyPenalty: -0.5, presencePenalty: 2, repetitionPenalty: 1, logitBias: [[42, 5]] },
    null,
    { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 1, logitBias: bias(250) },
    { frequencyPenalty: 2, presencePenalty: -1, repetitionPenalty: 0.9, logitBias: [] },
    null,
    { frequencyPenalty: 1.2, presencePenalty: 1.2, repetitionPenalty: 1, logitBias: bias(12) },
    { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 2, logitBias: [] },
  ]
  return kinds.map((processors, i) => ({
    prompt: Array.from({ length: 3 + Math.floor(rand() * 50) }, () => Math.floor(rand() * 260)),
    sampling: i % 3 === 1 ? { temperature: 0.9, topK: 0, topP: 0.95, minP: 0, seed: 100 + i } : null,
    maxTokens: 8 + (i % 4) * 6,
    topLogprobs: i % 4 === 0 ? 3 : 0,
    processors: withProcessors ? processors : null,
  }))
}

interface Run {
  tokens: number[]
  bits: string
}

/**
 * Runs `reqs` through a scheduler in two waves; with `stops`, a request also ends when its consumer
 * says so (after 3 tokens, at a token divisible by 7), at steps the scheduler could not foresee.
 */
async function serve(model: ForwardModel, reqs: Request[], opts: { maxBatchSize: number; launchAhead: boolean; stops: boolean }): Promise<Run[]> {
  const scheduler = new Scheduler(model, { maxBatchSize: opts.maxBatchSize, prefillChunkSize: 16, launchAhead: opts.launchAhead })
  const run = (r: Request) => {
    const tokens: number[] = []
    const lps: number[] = []
    let top = ''
    const done = scheduler.submit({
      kind: 'generate',
      ...r,
      onToken(token, logprob, alternatives) {
        tokens.push(token)
        lps.push(logprob)
        if (alternatives) top += alternatives.map((t) => `${t.token}:${t.logprob}`).join(',') + ';'
        return !(opts.stops && tokens.length >= 3 && token % 7 === 0)
      },
    }).done
    return done.then(() => ({ tokens, bits: `${tokens.join(',')}|${Buffer.from(Float32Array.from(lps).buffer).toString('hex')}|${top}` }))
  }
  const first = reqs.slice(0, 6).map(run)
  await new Promise((r) => setTimeout(r, 0))
  const second = reqs.slice(6).map(run)
  const results = await Promise.all([...first, ...second])
  await scheduler.close(new Error('done'))
  return results
}

interface Counter {
  ahead: number // steps launched after another
  aheadWithProcessors: number // of them, those with a row that uses processors
}

/** The model, counting the steps launched ahead; `keepCounts`: the twin that never zeroes a row a sequence takes. */
function counted(model: Transformer, counter: Counter, keepCounts = false): ForwardModel {
  const m = Object.create(model) as Transformer
  const strip = (choices: TokenChoice[]) =>
    keepCounts ? choices.map((c) => (c.processors ? { ...c, processors: { ...c.processors, first: false } } : c)) : choices
  m.step = (chunks, choices, topN) => model.step(chunks, strip(choices), topN)
  m.launch = (chunks, choices, topN, after?: LaunchedStep, afterRows?: readonly number[]) => {
    if (after) {
      counter.ahead++
      if (choices.some((c) => c.processors)) counter.aheadWithProcessors++
    }
    return model.launch(chunks, strip(choices), topN, after, afterRows)
  }
  return m
}

/** Each request with processors gives the same bits alone as among the others, in every configuration. */
async function expectInvariant(models: Transformer[], expectAhead: boolean): Promise<void> {
  const reqs = requests()
  // The bits of the first configuration, with and without stops: every other one must give them.
  const reference = new Map<boolean, string[]>()
  for (const model of models)
    for (const launchAhead of [true, false])
      for (const stops of [false, true]) {
        const counter = { ahead: 0, aheadWithProcessors: 0 }
        const opts = { maxBatchSize: 6, launchAhead, stops }
        const together = (await serve(counted(model, counter), reqs, opts)).map((r) => r.bits)
        if (launchAhead && expectAhead) expect(counter.aheadWithProcessors, `steps launched ahead with processors (stops ${stops})`).toBeGreaterThan(2)
        if (!launchAhead) expect(counter.ahead).toBe(0)
        for (const [i, r] of reqs.entries()) {
          if (!r.processors) continue
          const [alone] = await serve(model, [r], opts)
          expect(alone!.bits, `request ${i} alone (launchAhead ${launchAhead}, stops ${stops})`).toBe(together[i])
        }
        if (!reference.has(stops)) reference.set(stops, together)
        expect(together, `launchAhead ${launchAhead}, stops ${stops}`).toEqual(reference.get(stops))
      }
  // The processors change the completions (not a no-op).
  const plain = (await serve(models[0]!, requests(false), { maxBatchSize: 6, launchAhead: true, stops: false })).map((r) => r.bits)
  const withProcessors = reqs.flatMap((r, i) => (r.processors ? [i] : []))
  const ref = reference.get(false)!
  expect(withProcessors.filter((i) => plain[i] !== ref[i]).length).toBeGreaterThanOrEqual(4)
  // The requests without them are the same bits whether the others use processors or not.
  for (const i of reqs.keys()) if (!reqs[i]!.processors) expect(plain[i], `request ${i}, without processors`).toBe(ref[i])
}

/**
 * A sequence that takes the row another one held starts from zero counts. With one place in the
 * batch, request A (penalties, stopped by its consumer after 6 tokens, so that the step launched
 * ahead of its last one holds a wasted row that adds to its counts) then B, the same prompt and
 * penalties, on the same row: B must equal B served alone. With a repetition penalty too, where the
 * row is reset and B's prompt marked before B's first step.
 */
async function expectFreshRows(model: Transformer): Promise<void> {
  for (const processors of [
    { frequencyPenalty: 1.5, presencePenalty: 1.5, repetitionPenalty: 1, logitBias: [] },
    { frequencyPenalty: 0.5, presencePenalty: 0, repetitionPenalty: 1.8, logitBias: [] },
  ] satisfies LogitProcessors[])
    await expectFreshRow(model, processors)
}

async function expectFreshRow(model: Transformer, processors: LogitProcessors): Promise<void> {
  const prompt = [5, 17, 42, 8, 99, 3, 64]
  const pair = async (m: ForwardModel) => {
    const scheduler = new Scheduler(m, { maxBatchSize: 1, prefillChunkSize: 16, launchAhead: true })
    const a: number[] = []
    const b: number[] = []
    const first = scheduler.submit({ kind: 'generate', prompt, maxTokens: 30, sampling: null, processors, onToken: (t) => a.push(t) < 6 }).done
    const second = scheduler.submit({ kind: 'generate', prompt, maxTokens: 12, sampling: null, processors, onToken: (t) => b.push(t) > 0 }).done
    await Promise.all([first, second])
    await scheduler.close(new Error('done'))
    return { a, b }
  }
  const counter = { ahead: 0, aheadWithProcessors: 0 }
  const { a, b } = await pair(counted(model, counter))
  expect(a.length).toBe(6)
  expect(counter.aheadWithProcessors).toBeGreaterThan(4)
  const scheduler = new Scheduler(model, { maxBatchSize: 1, prefillChunkSize: 16 })
  const alone: number[] = []
  await scheduler.submit({ kind: 'generate', prompt, maxTokens: 12, sampling: null, processors, onToken: (t) => alone.push(t) > 0 }).done
  await scheduler.close(new Error('done'))
  expect(b).toEqual(alone)
  expect(alone.slice(0, 6)).toEqual(a)
  // The twin that never zeroes a row it takes: B starts from A's counts and comes out otherwise.
  const twin = await pair(counted(model, { ahead: 0, aheadWithProcessors: 0 }, true))
  expect(twin.b).not.toEqual(alone)
}

/**
 * The token mask a constrained completion would give at `position` (a stand-in for a grammar's:
 * a function of the position alone, so a completion gets the same masks alone and among others):
 * one allowed token at every fifth position, about a sixth of the vocabulary otherwise, never
 * none, and the last word's bits past the vocabulary set (ignored).
 */
function maskAt(position: number, vocab: number): Int32Array {
  const rand = mulberry32(50_000 + position)
  const mask = new Int32Array(Math.ceil(vocab / 32))
  const allow = (v: number) => (mask[v >>> 5] = mask[v >>> 5]! | (1 << (v & 31)))
  if (position % 5 === 0) allow(Math.floor(rand() * vocab))
  else {
    for (let v = 0; v < vocab; v++) if (rand() < 1 / 6) allow(v)
    allow(position % vocab)
  }
  if (vocab % 32 !== 0) mask[mask.length - 1] = mask[mask.length - 1]! | (-1 << (vocab % 32))
  return mask
}

/** The model with a mask (maskAt the choice's position) on every choice that has processors. */
function masked(model: Transformer): ForwardModel {
  const m = Object.create(model) as Transformer
  const vocab = model.config.vocabSize
  const add = (choices: TokenChoice[]) =>
    choices.map((c) => (c.processors ? { ...c, processors: { ...c.processors, mask: maskAt(c.position, vocab) } } : c))
  m.step = (chunks, choices, topN) => model.step(chunks, add(choices), topN)
  m.launch = (chunks, choices, topN, after?: LaunchedStep, afterRows?: readonly number[]) => model.launch(chunks, add(choices), topN, after, afterRows)
  return m
}

/** The requests of requests() (processors: masked), and one with a mask alone (neutral settings). */
function maskedRequests(): Request[] {
  const reqs = requests()
  reqs.splice(3, 0, { prompt: [9, 8, 7, 6, 5, 4, 3, 2, 1, 200], sampling: { temperature: 1.3, topK: 30, topP: 0.9, minP: 0.05, seed: 7 }, maxTokens: 14, topLogprobs: 2, processors: { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 1, logitBias: [] } })
  return reqs
}

/**
 * Serves the masked requests together and each masked one alone (with `models`, launched ahead or
 * not, stops or not) and returns the masked requests whose bits differ; checks that every token a
 * masked request chose is one its mask allowed.
 */
async function maskedDifferences(models: Transformer[]): Promise<string[]> {
  const reqs = maskedRequests()
  const vocab = models[0]!.config.vocabSize
  const differ: string[] = []
  for (const [mi, model] of models.entries())
    for (const launchAhead of [true, false])
      for (const stops of [false, true]) {
        const opts = { maxBatchSize: 6, launchAhead, stops }
        const together = await serve(masked(model), reqs, opts)
        for (const [i, r] of reqs.entries()) {
          if (!r.processors) continue
          together[i]!.tokens.forEach((t, k) => expect(tokenAllowed(maskAt(r.prompt.length + k, vocab), t), `request ${i}, token ${k}: ${t}`).toBe(true))
          const [alone] = await serve(masked(model), [r], opts)
          if (alone!.bits !== together[i]!.bits) differ.push(`request ${i} (model ${mi}, launchAhead ${launchAhead}, stops ${stops})`)
        }
      }
  return differ
}

const load = (device: DeviceName, cudaGraphs: boolean) =>
  Transformer.load(dir, { device, maxBatchTokens: 128, kvBlocks: 200, kvBlockSize: 16, maxLogitRows: 64, cudaGraphs })

describe('logit processors through the scheduler, on the CPU backend', () => {
  it('a request with penalties or biases gives the same bits alone and among others: padded buckets or not, launched ahead or not', async () => {
    const [padded, plain] = await Promise.all([load('cpu', true), load('cpu', false)])
    try {
      await expectInvariant([padded, plain], true)
    } finally {
      padded.dispose()
      plain.dispose()
    }
  })

  it("a repetition penalty marks the prompt the request was submitted with, whatever the caller's array holds later", async () => {
    const model = await load('cpu', true)
    try {
      const processors: LogitProcessors = { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 2, logitBias: [] }
      const given = [5, 17, 42, 8, 99, 3, 64, 17, 5]
      const run = async (prompt: number[], mutate: boolean) => {
        const scheduler = new Scheduler(model, { maxBatchSize: 1, prefillChunkSize: 16 })
        const out: number[] = []
        // Another request ahead of it: its first step comes after the caller has gone on.
        const before = scheduler.submit({ kind: 'generate', prompt: [1, 2, 3], maxTokens: 4, sampling: null, onToken: () => true }).done
        const done = scheduler.submit({ kind: 'generate', prompt, maxTokens: 12, sampling: null, processors, onToken: (t) => out.push(t) > 0 }).done
        // 40, marked as the prompt's, would change the first choice (40 unpenalized).
        if (mutate) prompt.fill(40)
        await Promise.all([before, done])
        await scheduler.close(new Error('done'))
        return out
      }
      expect(await run([...given], true)).toEqual(await run([...given], false))
    } finally {
      model.dispose()
    }
  })

  it('a sequence that takes a row another used starts from zero counts, after a wasted row too', async () => {
    const model = await load('cpu', true)
    try {
      await expectFreshRows(model)
    } finally {
      model.dispose()
    }
  })
})

describe('token masks through the scheduler, on the CPU backend', () => {
  afterAll(() => setVariantKernels(false))

  it('a masked completion gives the same bits alone and among others, and chooses only allowed tokens: padded buckets or not, launched ahead or not', async () => {
    const [padded, plain] = await Promise.all([load('cpu', true), load('cpu', false)])
    try {
      expect(await maskedDifferences([padded, plain])).toEqual([])
      // The masks change the completions (not a no-op), and a one-token mask is obeyed.
      const reqs = maskedRequests()
      const withMasks = await serve(masked(padded), reqs, { maxBatchSize: 6, launchAhead: true, stops: false })
      const without = await serve(padded, reqs, { maxBatchSize: 6, launchAhead: true, stops: false })
      const changed = reqs.flatMap((r, i) => (r.processors && withMasks[i]!.bits !== without[i]!.bits ? [i] : []))
      expect(changed.length).toBe(reqs.filter((r) => r.processors).length)
      for (const [i, r] of reqs.entries()) {
        if (!r.processors) expect(withMasks[i]!.bits, `request ${i}, without a mask`).toBe(without[i]!.bits)
        else
          withMasks[i]!.tokens.forEach((t, k) => {
            const mask = maskAt(r.prompt.length + k, padded.config.vocabSize)
            if ((r.prompt.length + k) % 5 === 0) expect(Array.from({ length: padded.config.vocabSize }, (_, v) => v).filter((v) => tokenAllowed(mask, v))).toEqual([t])
          })
      }
    } finally {
      padded.dispose()
      plain.dispose()
    }
  })

  it('variant twin: with the variant kernels, some masked completion differs alone', async () => {
    const model = await load('cpu', true)
    try {
      setVariantKernels(true)
      const differ = await maskedDifferences([model])
      setVariantKernels(false)
      expect(differ.length).toBeGreaterThan(0)
    } finally {
      setVariantKernels(false)
      model.dispose()
    }
  })
})

describe('logit processors at the model boundary', () => {
  it('launch() checks the rows of the processor table a step names, and their settings on a first choice', async () => {
    const model = await Transformer.load(dir, { device: 'cpu', maxBatchTokens: 32, kvBlocks: 20, kvBlockSize: 16, logitProcessorRows: 2 })
    try {
      const settings: LogitProcessors = { frequencyPenalty: 1, presencePenalty: 0, repetitionPenalty: 1, logitBias: [[3, 2]] }
      const chunk = (block: number) => ({ tokens: [7], startPosition: 0, blockTable: [block], logits: 'last' as const })
      const choice = (row: number, first = false, s = settings): TokenChoice => ({
        temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: 1, target: -1, processors: { row, first, settings: s },
      })
      expect(() => model.launch([chunk(0)], [choice(2)], 0)).toThrow(
        "Expected an integer between 0 and 1 (a row of the logit processors' table) for choices[0].processors.row but received 2 of type number",
      )
      expect(() => model.launch([chunk(0), chunk(1)], [choice(1), choice(1)], 0)).toThrow('for choices[1].processors.row but received 1 again')
      expect(() => model.launch([chunk(0)], [{ ...choice(0), target: 5 }], 0)).toThrow('Expected no processors for choices[0], a scored row (target 5)')
      const bad = { ...settings, logitBias: [[3, 1], [3, 2]] as [number, number][] }
      expect(() => model.launch([chunk(0)], [choice(0, true, bad)], 0)).toThrow('for choices[0].processors.settings.logitBias[1][0] but received 3')
      expect(() => model.launch([chunk(0)], [choice(0, true, { ...settings, presencePenalty: Number.NaN })], 0)).toThrow('presencePenalty but received NaN')
      const out = await model.step([chunk(0), chunk(1)], [choice(0, true), choice(1, true)], 0)
      expect(out.ids.length).toBe(2)
    } finally {
      model.dispose()
    }
  })

  it('launch() checks a mask on every choice that gives one: ceil(vocab / 32) i32 words that allow some token', async () => {
    const model = await Transformer.load(dir, { device: 'cpu', maxBatchTokens: 32, kvBlocks: 20, kvBlockSize: 16, logitProcessorRows: 2 })
    try {
      const vocab = model.config.vocabSize // 273: 9 words, the last with 17 bits in use
      const settings: LogitProcessors = { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 1, logitBias: [[3, 100]] }
      const chunk = (block: number) => ({ tokens: [7], startPosition: 0, blockTable: [block], logits: 'last' as const })
      const choice = (row: number, first: boolean, mask: unknown): TokenChoice => ({
        temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: 1, target: -1, processors: { row, first, settings, mask: mask as Int32Array },
      })
      const words = (...allowed: number[]) => {
        const m = new Int32Array(9)
        for (const v of allowed) m[v >>> 5] = m[v >>> 5]! | (1 << (v & 31))
        return m
      }
      expect(() => model.launch([chunk(0)], [choice(0, false, new Int32Array(8))], 0)).toThrow(
        `Expected an Int32Array of 9 words (one bit for each of ${vocab} tokens) for choices[0].processors.mask but received 8 words`,
      )
      expect(() => model.launch([chunk(0), chunk(1)], [choice(0, true, words(5)), choice(1, false, new Uint32Array(9))], 0)).toThrow(
        'for choices[1].processors.mask but received',
      )
      expect(() => model.launch([chunk(0)], [choice(0, true, [1, 2, 3, 4, 5, 6, 7, 8, 9])], 0)).toThrow('Expected an Int32Array of 9 words')
      expect(() => model.launch([chunk(0)], [choice(0, false, new Int32Array(9))], 0)).toThrow(
        `Expected a mask that allows at least one token below ${vocab} for choices[0].processors.mask but received one that allows none`,
      )
      // Only bits past the vocabulary (273 to 287, in the last word): none of its tokens allowed.
      const past = new Int32Array(9)
      past[8] = -1 << 17
      expect(() => model.launch([chunk(0)], [choice(0, false, past)], 0)).toThrow('allows at least one token below 273')
      // Valid masks, on a first choice and a later one: only allowed tokens are chosen, whatever the bias on 3 says.
      const out = await model.step([chunk(0), chunk(1)], [choice(0, true, words(272)), choice(1, true, words(0, 100))], 0)
      expect(out.ids[0]).toBe(272)
      expect([0, 100]).toContain(out.ids[1])
      const later = await model.step([chunk(0)], [choice(0, false, words(100))], 0)
      expect(later.ids[0]).toBe(100)
      const biased = await model.step([chunk(0)], [choice(0, false, undefined)], 0)
      expect(biased.ids[0]).toBe(3) // without a mask the bias of 100 wins
    } finally {
      model.dispose()
    }
  })

  it('with fewer table rows than places in the batch, requests with processors wait for a row; each gives its bits alone', async () => {
    const model = await Transformer.load(dir, { device: 'cpu', maxBatchTokens: 128, kvBlocks: 200, kvBlockSize: 16, maxLogitRows: 64, logitProcessorRows: 2 })
    try {
      const reqs = requests()
      const together = (await serve(model, reqs, { maxBatchSize: 6, launchAhead: true, stops: false })).map((r) => r.bits)
      for (const [i, r] of reqs.entries()) {
        const [alone] = await serve(model, [r], { maxBatchSize: 6, launchAhead: true, stops: false })
        expect(alone!.bits, `request ${i}`).toBe(together[i])
      }
    } finally {
      model.dispose()
    }
  })

  it('a batch of more than 65,535 sequences loads, with a table of 65,535 rows', async () => {
    const { forwardOf, loadModel } = await import('../../lib/api.js')
    const model = await loadModel(dir, { device: 'cpu', maxBatchTokens: 70_000, maxBatchSize: 70_000, kvCacheTokens: 4096 })
    try {
      expect((forwardOf(model) as Transformer).logitProcessorRows).toBe(65_535)
      const r = await model.generate([5, 6, 7], { maxTokens: 4, presencePenalty: 1 })
      expect(r.tokens).toHaveLength(4)
    } finally {
      await model.dispose()
    }
  })

  it('a table that cannot be allocated refuses the request that needs it, not the others', async () => {
    const model = await Transformer.load(dir, { device: 'cpu', maxBatchTokens: 64, kvBlocks: 40, kvBlockSize: 16, logitProcessorRows: 2 })
    try {
      let tries = 0
      // The model as the scheduler sees it, with the table's allocation failing once.
      const failing = Object.create(model, {
        reserveLogitProcessors: {
          value: () => {
            if (tries++ === 0) throw new Error('out of memory (a stand-in)')
            model.reserveLogitProcessors()
          },
        },
      }) as ForwardModel
      const scheduler = new Scheduler(failing, { maxBatchSize: 4, prefillChunkSize: 64 })
      const processors = { frequencyPenalty: 0.5, presencePenalty: 0.5, repetitionPenalty: 1, logitBias: [] as [number, number][] }
      const plain: number[] = []
      const go = (p: LogitProcessors | null, into: number[] = []) =>
        scheduler.submit({ kind: 'generate', prompt: [5, 6, 7], maxTokens: 6, sampling: null, processors: p, onToken: (t) => into.push(t) > 0 }).done
      const [refused, served] = await Promise.allSettled([go(processors), go(null, plain)])
      expect(refused.status).toBe('rejected')
      expect(String((refused as PromiseRejectedResult).reason)).toContain('out of memory (a stand-in)')
      expect(served.status).toBe('fulfilled')
      expect(plain.length).toBe(6)
      // The next request with processors allocates it and runs.
      const again: number[] = []
      await go(processors, again)
      expect(again.length).toBe(6)
      expect(tries).toBe(2)
      await scheduler.close(new Error('done'))
    } finally {
      model.dispose()
    }
  })
})

/** Greedy completions of "ROMEO:" by the shipped model: its tokens repeat, unless a strong presence penalty forbids it. */
async function expectNoRepeats(device: DeviceName): Promise<void> {
  const { Tokenizer } = await import('../../lib/tokenizer.js')
  const tokenizer = await Tokenizer.load(defaultModelPath)
  const model = await Transformer.load(defaultModelPath, { device, maxBatchTokens: 256, kvBlocks: 64, kvBlockSize: 16 })
  try {
    const prompt = tokenizer.encodePrompt('ROMEO:', false)
    const complete = async (processors: LogitProcessors | null) => {
      const counter = { ahead: 0, aheadWithProcessors: 0 }
      const scheduler = new Scheduler(counted(model, counter), { maxBatchSize: 4, prefillChunkSize: 256 })
      const tokens: number[] = []
      await scheduler.submit({ kind: 'generate', prompt, maxTokens: 64, sampling: null, processors, onToken: (t) => tokens.push(t) > 0 }).done
      await scheduler.close(new Error('done'))
      if (processors) expect(counter.aheadWithProcessors).toBeGreaterThan(30)
      return tokens
    }
    const plain = await complete(null)
    expect(plain.length).toBe(64)
    expect(new Set(plain).size).toBeLessThan(40)
    // 100 is beyond the API's range (-2 to 2): the scheduler takes what it is given. The first
    // token, chosen by the prefill step, is counted too: the second may not repeat it.
    const penalized = await complete({ frequencyPenalty: 0, presencePenalty: 100, repetitionPenalty: 1, logitBias: [] })
    expect(penalized.length).toBe(64)
    expect(new Set(penalized).size).toBe(64)
    expect(penalized[0]).toBe(plain[0])
  } finally {
    model.dispose()
  }
}

describe.runIf(existsSync(join(defaultModelPath, 'config.json')))('logit processors with the shipped model, on the CPU backend', () => {
  it('a strong presence penalty makes a greedy completion never repeat a token; without it, it repeats', async () => {
    await expectNoRepeats('cpu')
  })
})

describeGpu('logit processors through the scheduler, on CUDA', () => {
  it('a request with penalties or biases gives the same bits alone and among others: CUDA graphs or not, launched ahead or not', async () => {
    const [graphs, eager] = await Promise.all([load('cuda', true), load('cuda', false)])
    try {
      await expectInvariant([graphs, eager], true)
      const captured = graphs.graphStats()!.captured
      console.log(`captured ${captured.map((c) => `${c.rows}x${c.context}${c.processors ? ' with processors' : ''}`).join(', ')}`)
      // Both captures of a bucket were replayed: the plain one and the one with the processor kernels.
      expect(captured.some((c) => c.processors)).toBe(true)
      expect(captured.some((c) => !c.processors)).toBe(true)
    } finally {
      graphs.dispose()
      eager.dispose()
    }
  })

  it('a sequence that takes a row another used starts from zero counts, after a wasted row too', async () => {
    for (const cudaGraphs of [true, false]) {
      const model = await load('cuda', cudaGraphs)
      try {
        await expectFreshRows(model)
      } finally {
        model.dispose()
      }
    }
  })

  it('a strong presence penalty makes a greedy completion of the shipped model never repeat a token', async () => {
    await expectNoRepeats('cuda')
  })
})
