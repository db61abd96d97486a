// End to end with a tiny random Qwen3 checkpoint, on the CPU backend and (when a GPU is there) on
// CUDA: continuous batching, chunked prefill, seeded sampling and scoring must give each request the
// same tokens and bit-identical log-probs as running it alone. The twin tests turn on the variant
// kernels (split reductions chosen from the batch size, like ordinary stacks) and expect the bits
// to move.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { setVariantKernels } from '../../lib/device.js'
import { loadModel, type LoadModelOptions, type Model } from '../../lib/api.js'
import type { GenerateOptions, GenerateResult } from '../../lib/generate.js'
import type { DeviceName } from '../../lib/native.js'
import { firstDifference } from '../helpers/compare.js'
import { describeGpu } from '../helpers/gpu.js'
import { mulberry32 } from '../helpers/random.js'
import { writeTinyModel } from '../helpers/tiny-model.js'

let dir: string
const open: Model[] = []

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'detinfer-serving-'))
  // Wide enough that matmul rows and attention splits see real reductions; context 1024 so
  // prompts cross the 256-key attention split; heads of 64, a size the CUDA attention takes.
  writeTinyModel(dir, {
    architecture: 'Qwen3ForCausalLM',
    hiddenSize: 128,
    intermediateSize: 256,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 64,
    maxPositions: 1024,
    seed: 5,
  })
})

afterAll(async () => {
  await Promise.all(open.map((m) => m.dispose()))
  setVariantKernels(false)
  rmSync(dir, { recursive: true, force: true })
})

async function loadOn(device: DeviceName, options: LoadModelOptions): Promise<Model> {
  const model = await loadModel(dir, { device, ...options })
  open.push(model)
  return model
}

/** Prompts of random ids (below the tokenizer's 270 ids) with lengths on both sides of block and split edges. */
function prompts(seed: number, lengths: number[]): number[][] {
  const rand = mulberry32(seed)
  return lengths.map((n) => Array.from({ length: n }, () => Math.floor(rand() * 260)))
}

function logprobBits(r: GenerateResult): Float32Array {
  return Float32Array.from(r.logprobs)
}

/** Index of the first request whose tokens or log-prob bits differ, or -1. */
function firstDifferentRequest(a: GenerateResult[], b: GenerateResult[]): number {
  return a.findIndex((r, i) => r.tokens.join() !== b[i]!.tokens.join() || firstDifference(logprobBits(r), logprobBits(b[i]!)) >= 0)
}

const LENGTHS = [1, 5, 15, 16, 17, 40, 255, 257, 300]

async function alone(model: Model, list: number[][], options: GenerateOptions): Promise<GenerateResult[]> {
  const out: GenerateResult[] = []
  for (const p of list) out.push(await model.generate(p, options))
  return out
}

function servingSuite(device: DeviceName): void {
  const load = (options: LoadModelOptions) => loadOn(device, options)
  const list = prompts(17, LENGTHS)
  const greedy = { maxTokens: 12 }
  let reference: GenerateResult[]

  beforeAll(async () => {
    const solo = await load({ maxBatchSize: 1, maxBatchTokens: 512, prefillChunkSize: 512 })
    reference = await alone(solo, list, greedy)
  })

  it('continuous batching gives each request its solo tokens and bit-identical log-probs', async () => {
    expect(new Set(reference.map((r) => r.tokens.join())).size).toBeGreaterThan(1)
    for (const shape of [
      { maxBatchSize: 9, maxBatchTokens: 512, prefillChunkSize: 512 },
      { maxBatchSize: 4, maxBatchTokens: 64, prefillChunkSize: 24 },
      { maxBatchSize: 9, maxBatchTokens: 40, prefillChunkSize: 7 },
    ]) {
      const model = await load(shape)
      const batched = await model.generateBatch(list, greedy)
      expect(firstDifferentRequest(batched, reference), JSON.stringify(shape)).toBe(-1)
    }
  })

  it('requests submitted while others decode get the same results too', async () => {
    const model = await load({ maxBatchSize: 6, maxBatchTokens: 96, prefillChunkSize: 32 })
    const early = list.slice(0, 5).map((p) => model.generate(p, greedy))
    // Wait until a short completion of another prompt is done: the first five are decoding by then.
    for await (const _ of model.stream(list[0]!, { maxTokens: 3 }));
    const late = list.slice(5).map((p) => model.generate(p, greedy))
    const results = [...(await Promise.all(early)), ...(await Promise.all(late))]
    expect(firstDifferentRequest(results, reference)).toBe(-1)
  })

  it('variant kernels: batching changes log-prob bits (the test above can fail)', async () => {
    const model = await load({ maxBatchSize: 9, maxBatchTokens: 40, prefillChunkSize: 7 })
    setVariantKernels(true)
    try {
      const soloModel = await load({ maxBatchSize: 1, maxBatchTokens: 512, prefillChunkSize: 512 })
      const soloVariant = await alone(soloModel, list, greedy)
      const batched = await model.generateBatch(list, greedy)
      expect(firstDifferentRequest(batched, soloVariant)).toBeGreaterThanOrEqual(0)
    } finally {
      setVariantKernels(false)
    }
  })

  it('score() returns the generation log-probs bit for bit, whatever the chunking', async () => {
    for (const shape of [
      { maxBatchSize: 1, maxBatchTokens: 512, prefillChunkSize: 512 },
      { maxBatchSize: 4, maxBatchTokens: 48, prefillChunkSize: 5 },
    ]) {
      const model = await load(shape)
      const scores = await Promise.all(list.map((p, i) => model.score(p, reference[i]!.tokens)))
      for (const [i, s] of scores.entries()) {
        expect(s.tokens).toEqual(reference[i]!.tokens)
        expect(firstDifference(Float32Array.from(s.logprobs), logprobBits(reference[i]!)), `prompt ${i}`).toBe(-1)
      }
    }
  })

  it('variant kernels: scoring in one batch moves the bits away from generation', async () => {
    const model = await load({ maxBatchSize: 9, maxBatchTokens: 512, prefillChunkSize: 512 })
    setVariantKernels(true)
    try {
      const soloModel = await load({ maxBatchSize: 1, maxBatchTokens: 512, prefillChunkSize: 512 })
      const generated = await alone(soloModel, list, greedy)
      const scores = await Promise.all(list.map((p, i) => model.score(p, generated[i]!.tokens)))
      const differs = scores.some((s, i) => firstDifference(Float32Array.from(s.logprobs), logprobBits(generated[i]!)) >= 0)
      expect(differs).toBe(true)
    } finally {
      setVariantKernels(false)
    }
  })

  it('seeded sampling is reproducible and independent of the batch', async () => {
    const sampling = { maxTokens: 10, temperature: 0.9, topP: 0.95, seed: 2024 }
    const soloModel = await load({ maxBatchSize: 1, maxBatchTokens: 512, prefillChunkSize: 512 })
    const solo = await alone(soloModel, list, sampling)
    const model = await load({ maxBatchSize: 5, maxBatchTokens: 64, prefillChunkSize: 16 })
    const batched = await model.generateBatch(list, sampling)
    expect(firstDifferentRequest(batched, solo)).toBe(-1)
    // Sampling really departs from greedy, and another seed gives another completion.
    expect(solo.some((r, i) => r.tokens.join() !== reference[i]!.tokens.join())).toBe(true)
    const other = await model.generateBatch(list, { ...sampling, seed: 7 })
    expect(other.some((r, i) => r.tokens.join() !== solo[i]!.tokens.join())).toBe(true)
    // And its log-probs are the model's: score() agrees bit for bit.
    const s = await model.score(list[3]!, solo[3]!.tokens)
    expect(firstDifference(Float32Array.from(s.logprobs), logprobBits(solo[3]!))).toBe(-1)
  })

  it('an AbortSignal cancels its request only: the others keep their solo bits', async () => {
    const model = await load({ maxBatchSize: 9, maxBatchTokens: 96, prefillChunkSize: 16 })
    const controller = new AbortController()
    const victim = model.stream(list[4]!, { maxTokens: 200, signal: controller.signal })
    const others = list.filter((_, i) => i !== 4).map((p) => model.generate(p, greedy))
    let pieces = 0
    const consume = async () => {
      for await (const _ of victim) if (++pieces === 3) controller.abort()
    }
    await expect(consume()).rejects.toMatchObject({ name: 'AbortError' })
    expect(pieces).toBeLessThan(200)
    expect(firstDifferentRequest(await Promise.all(others), reference.filter((_, i) => i !== 4))).toBe(-1)

    // generate() rejects with the signal's reason; an aborted signal submits nothing.
    const later = new AbortController()
    const running = model.generate(list[8]!, { maxTokens: 600, signal: later.signal })
    setTimeout(() => later.abort(new Error('client went away')), 1)
    await expect(running).rejects.toThrow('client went away')
    await expect(model.generate(list[0]!, { signal: later.signal })).rejects.toThrow('client went away')
    // A signal aborted after its request finished changes nothing.
    const after = new AbortController()
    const done = await model.generate(list[2]!, { ...greedy, signal: after.signal })
    after.abort()
    expect(firstDifferentRequest([done], [reference[2]!])).toBe(-1)
  })

  it('text prompts: generate, stream and stop strings agree', async () => {
    const model = await load({ maxBatchSize: 4 })
    const full = await model.generate('the cat sat on the mat', { maxTokens: 24 })
    expect(full.text).toBe(model.detokenize(full.tokens))
    let streamed = ''
    for await (const piece of model.stream('the cat sat on the mat', { maxTokens: 24 })) streamed += piece.text
    expect(streamed).toBe(full.text)
    if (full.text.length >= 6) {
      const stop = full.text.slice(3, 5)
      const cut = await model.generate('the cat sat on the mat', { maxTokens: 24, stop })
      expect(cut.finishReason).toBe('stop')
      expect(cut.stopReason).toBe(stop)
      expect(cut.text).toBe(full.text.slice(0, full.text.indexOf(stop)))
      expect(cut.tokens).toEqual(full.tokens.slice(0, cut.tokens.length))
    }
  })

  it('refuses a request larger than the KV cache, and serves many queued requests in a small one', async () => {
    const model = await load({ maxBatchSize: 8, kvCacheTokens: 640, maxBatchTokens: 128 })
    await expect(model.generate(list[8]!, { maxTokens: 400 })).rejects.toThrow(
      "The prompt (300 tokens) plus maxTokens (400) exceeds the model's context of 640 tokens",
    )
    // 640 positions hold two of the long prompts at a time: the rest wait their turn.
    const many = [...list, ...list]
    const results = await model.generateBatch(many, greedy)
    expect(firstDifferentRequest(results, [...reference, ...reference])).toBe(-1)
  })

  it('loadModel rejects bad options with messages that name them', async () => {
    await expect(loadModel(dir, { device: 'tpu' as never })).rejects.toThrow(`Expected 'auto', 'cpu' or 'cuda' for device but received "tpu"`)
    await expect(loadModel(dir, { device, maxBatchTokens: 256, maxBatchSize: 0 })).rejects.toThrow(
      'Expected integer between 1 and 256 for maxBatchSize but received 0 of type number',
    )
    await expect(loadModel(dir, { device, maxBatchTokens: 64, prefillChunkSize: 65 })).rejects.toThrow(
      'Expected integer between 1 and 64 for prefillChunkSize but received 65 of type number',
    )
    await expect(loadModel(dir, { device, kvBlocks: 8, kvCacheTokens: 128 })).rejects.toThrow(
      'Expected kvBlocks or kvCacheTokens for the KV-cache size but received both',
    )
    await expect(loadModel(join(dir, 'missing'))).rejects.toThrow(`No model at ${join(dir, 'missing')}`)
    // A misspelt key fails instead of loading with the default it meant to change.
    await expect(loadModel(dir, { device, maxBatchsize: 1 } as never)).rejects.toThrow(
      'Expected only the keys device, maxBatchTokens, maxBatchSize, prefillChunkSize, kvCacheTokens, kvBlocks, prefixCache, ' +
        'cudaGraphs, tensorParallel, chatTemplate, grammarWorkers, onProgress for options but received "maxBatchsize" of type string',
    )
    for (const grammarWorkers of [-1, 65, 1.5])
      await expect(loadModel(dir, { device, grammarWorkers })).rejects.toThrow(`Expected integer between 0 and 64 for grammarWorkers but received ${grammarWorkers}`)
  })
}

describe('serving a tiny Qwen3 on the CPU', () => servingSuite('cpu'))
describeGpu('serving a tiny Qwen3 on CUDA', () => servingSuite('cuda'))
