// The scheduler's mechanics against a forward pass whose logits hash the whole context read back
// through the block table: results must not depend on batching, chunking, or which blocks a
// sequence got; every step must respect the token budget; admission must queue or refuse cleanly.
import { describe, expect, it } from 'vitest'
import { Model } from '../../lib/api.js'
import { Scheduler, type SequenceChunk, type StepTokens, type TokenChoice } from '../../lib/scheduler.js'
import type { LaunchedStep } from '../../lib/step.js'
import { RequestTooLargeError } from '../../lib/errors.js'
import { mulberry32 } from '../helpers/random.js'
import { ALPHABET, ContextHashModel, EOS, charTokenizer } from './context-hash-model.js'
import { LaunchingModel } from './launching-model.js'

function randomPrompts(count: number, seed: number, maxLength: number): number[][] {
  const rand = mulberry32(seed)
  return Array.from({ length: count }, () =>
    Array.from({ length: 1 + Math.floor(rand() * maxLength) }, () => 1 + Math.floor(rand() * ALPHABET.length)),
  )
}

function makeModel(opts: { kvBlocks?: number; kvBlockSize?: number; maxBatchTokens?: number; maxBatchSize?: number; prefillChunkSize?: number; context?: number } = {}) {
  const forward = new ContextHashModel({
    kvBlocks: opts.kvBlocks ?? 256,
    kvBlockSize: opts.kvBlockSize ?? 4,
    maxBatchTokens: opts.maxBatchTokens ?? 64,
    context: opts.context,
  })
  const model = new Model(
    { forward, tokenizer: charTokenizer, path: 'context-hash' },
    { maxBatchSize: opts.maxBatchSize ?? 16, prefillChunkSize: opts.prefillChunkSize ?? 16 },
  )
  return { forward, model }
}

describe('continuous batching (context-hash model)', () => {
  const prompts = randomPrompts(12, 7, 40)

  it('gives every request the tokens and log-probs it gets alone, for many batch shapes', async () => {
    const { model: soloModel } = makeModel({ maxBatchSize: 1, prefillChunkSize: 1024, maxBatchTokens: 64 })
    const solo = []
    for (const p of prompts) solo.push(await soloModel.generate(p, { maxTokens: 9 }))
    expect(new Set(solo.map((r) => r.tokens.join(','))).size).toBeGreaterThan(1)

    const shapes = [
      { maxBatchSize: 12, prefillChunkSize: 64, maxBatchTokens: 64 },
      { maxBatchSize: 3, prefillChunkSize: 5, maxBatchTokens: 16 },
      { maxBatchSize: 7, prefillChunkSize: 1, maxBatchTokens: 8, kvBlockSize: 16 },
    ]
    for (const shape of shapes) {
      const { model, forward } = makeModel(shape)
      const batched = await model.generateBatch(prompts, { maxTokens: 9 })
      for (const [i, r] of batched.entries()) {
        expect(r.tokens).toEqual(solo[i]!.tokens)
        expect(Float32Array.from(r.logprobs)).toEqual(Float32Array.from(solo[i]!.logprobs))
      }
      // The batch was really shared: some step ran several sequences.
      expect(Math.max(...forward.steps.map((s) => s.length))).toBeGreaterThan(1)
    }
  })

  it('packs decodes (one token each) and prompt chunks within maxBatchTokens and prefillChunkSize', async () => {
    const { model, forward } = makeModel({ maxBatchSize: 6, prefillChunkSize: 5, maxBatchTokens: 12 })
    await model.generateBatch(prompts, { maxTokens: 6 })
    for (const step of forward.steps) {
      expect(step.reduce((n, c) => n + c.tokens.length, 0)).toBeLessThanOrEqual(12)
      expect(step.length).toBeLessThanOrEqual(6)
      for (const c of step) expect(c.tokens.length).toBeLessThanOrEqual(5)
      // A sequence appears at most once per step, and its block table never holds another's block.
      const blocks = step.flatMap((c) => c.blockTable)
      expect(new Set(blocks).size).toBe(blocks.length)
    }
    // Requests joined while others were decoding: some step mixes a decode with a prefill chunk.
    const mixed = forward.steps.some((s) => s.some((c) => c.logits === 'last' && c.tokens.length === 1 && c.startPosition > 0) && s.some((c) => c.startPosition === 0))
    expect(mixed).toBe(true)
  })

  it('queues requests until cache blocks free up, and all of them finish', async () => {
    // 8 prompt tokens + 8 new ones need 15 positions, 4 blocks: 13 blocks hold 3 requests at a time.
    const { model, forward } = makeModel({ kvBlocks: 13, kvBlockSize: 4, maxBatchSize: 16 })
    forward.eosBias = -100
    const many = randomPrompts(20, 11, 100).map((p) => [...p, 1, 2, 3, 4, 5, 6, 7, 8].slice(0, 8))
    const results = await model.generateBatch(many, { maxTokens: 8 })
    expect(results.every((r) => r.tokens.length === 8)).toBe(true)
    expect(Math.max(...forward.steps.map((s) => s.length))).toBe(3)
    const { model: alone, forward: aloneForward } = makeModel()
    aloneForward.eosBias = -100
    for (const [i, p] of many.entries()) expect(results[i]!.tokens).toEqual((await alone.generate(p, { maxTokens: 8 })).tokens)
  })

  it('refuses a request that could never fit, naming the numbers, and keeps serving others', async () => {
    const { model } = makeModel({ kvBlocks: 4, kvBlockSize: 4 })
    const refused = model.generate([1, 2, 3, 4, 5, 6, 7, 8], { maxTokens: 12 })
    await expect(refused).rejects.toThrow(RequestTooLargeError)
    await expect(refused).rejects.toThrow(
      'The request needs 5 KV-cache blocks (19 positions: the prompt of 8 tokens plus maxTokens 12) but the cache holds 4 blocks of 4 positions',
    )
    const ok = await model.generate([1, 2, 3], { maxTokens: 5 })
    expect(ok.tokens.length).toBeGreaterThan(0)
  })

  it('refuses a prompt plus maxTokens longer than the context', async () => {
    const { model } = makeModel({ context: 32 })
    await expect(model.generate(Array(30).fill(3), { maxTokens: 8 })).rejects.toThrow(
      "The prompt (30 tokens) plus maxTokens (8) exceeds the model's context of 32 tokens",
    )
  })

  it('submit refuses a generation of fewer than 1 token, which would write past its cache blocks and fail the whole batch', async () => {
    // maxTokens 0 reserves prompt - 1 positions; the prefill writes the prompt's, 5 here: past the one block of 4.
    const forward = new ContextHashModel({ kvBlocks: 64, kvBlockSize: 4, maxBatchTokens: 64 })
    const scheduler = new Scheduler(forward, { maxBatchSize: 4, prefillChunkSize: 16 })
    const submit = (prompt: number[], maxTokens: number) => scheduler.submit({ kind: 'generate', prompt, maxTokens, sampling: null, onToken: () => true })
    const other = submit([7, 8, 9], 4).done
    for (const maxTokens of [0, -1, 1.5, NaN])
      expect(() => submit([1, 2, 3, 4, 5], maxTokens), String(maxTokens)).toThrow(
        new RangeError(`Scheduler: a generation needs an integer maxTokens >= 1 but maxTokens is ${maxTokens}`),
      )
    expect((await other).finishReason).toBe('length')
    expect(scheduler.load).toMatchObject({ running: 0, waiting: 0, usedBlocks: 0 })
  })

  it('load.peakRunning counts the sequences of a step, not those admitted that wait for a share of it', async () => {
    // maxBatchTokens 8 and chunks of 8: the 16-token prompt takes two whole steps, the 8-token one a third.
    const forward = new ContextHashModel({ kvBlocks: 64, kvBlockSize: 4, maxBatchTokens: 8 })
    const scheduler = new Scheduler(forward, { maxBatchSize: 4, prefillChunkSize: 8 })
    const submit = (prompt: number[]) => scheduler.submit({ kind: 'generate', prompt, maxTokens: 1, sampling: null, onToken: () => true }).done
    await Promise.all([submit(Array(16).fill(3)), submit(Array(8).fill(4))])
    expect(forward.steps.map((s) => s.length)).toEqual([1, 1, 1])
    expect(scheduler.load.peakRunning).toBe(1)
  })

  it('returns every cache block once all requests are done or cancelled', async () => {
    const { forward } = makeModel()
    const scheduler = new Scheduler(forward, { maxBatchSize: 4, prefillChunkSize: 8 })
    const runs = randomPrompts(6, 3, 20).map((prompt) =>
      scheduler.submit({ kind: 'generate', prompt, maxTokens: 30, sampling: null, onToken: () => true }),
    )
    runs[1]!.cancel()
    runs[4]!.cancel()
    const outcomes = await Promise.all(runs.map((r) => r.done))
    expect(outcomes.map((o) => o.finishReason)).toEqual(['length', 'cancelled', 'length', 'length', 'cancelled', 'length'])
    expect(scheduler.load).toMatchObject({ running: 0, waiting: 0, usedBlocks: 0, totalBlocks: 256 })
  })
})

describe('stop conditions (context-hash model)', () => {
  it('stops at maxTokens with finishReason length', async () => {
    const { model } = makeModel()
    const r = await model.generate('hello', { maxTokens: 7 })
    expect(r.tokens).toHaveLength(7)
    expect(r.logprobs).toHaveLength(7)
    expect(r.finishReason).toBe('length')
    expect(r.text).toBe(charTokenizer.decode(r.tokens))
  })

  it('stops at EOS, keeping the EOS token but not its text', async () => {
    const { model, forward } = makeModel()
    forward.eosBias = 9.5 // EOS wins most rows
    const r = await model.generate('hello', { maxTokens: 50 })
    expect(r.finishReason).toBe('stop')
    expect(r.tokens.at(-1)).toBe(EOS)
    expect(r.tokens.slice(0, -1)).not.toContain(EOS)
    expect(r.text).toBe(charTokenizer.decode(r.tokens.slice(0, -1)))
  })

  it('cuts the text before the first stop string and stops there', async () => {
    const { model, forward } = makeModel()
    forward.eosBias = -100
    const free = await model.generate('the', { maxTokens: 40 })
    // Pick a stop string from the middle of the free completion.
    const stop = free.text.slice(10, 12)
    const first = free.text.indexOf(stop)
    const r = await model.generate('the', { maxTokens: 40, stop: ['zzzz', stop] })
    expect(r.finishReason).toBe('stop')
    expect(r.text).toBe(free.text.slice(0, first))
    expect(r.tokens).toEqual(free.tokens.slice(0, first + stop.length))
    expect(r.logprobs).toEqual(free.logprobs.slice(0, first + stop.length))
  })

  it('streams pieces whose text adds up to the result, holding back a possible stop string', async () => {
    const { model, forward } = makeModel()
    forward.eosBias = -100
    const full = await model.generate('stream', { maxTokens: 30 })
    const stop = full.text.slice(20, 23)
    const expected = await model.generate('stream', { maxTokens: 30, stop })
    const pieces = []
    for await (const piece of model.stream('stream', { maxTokens: 30, stop })) pieces.push(piece)
    expect(pieces.map((p) => p.token)).toEqual(expected.tokens)
    expect(pieces.map((p) => p.logprob)).toEqual(expected.logprobs)
    expect(pieces.map((p) => p.text).join('')).toBe(expected.text)
    // No piece ever showed text past the cut.
    let shown = ''
    for (const p of pieces) {
      shown += p.text
      expect(expected.text.startsWith(shown)).toBe(true)
    }
  })

  it('stops generating when the consumer leaves the loop', async () => {
    const { model, forward } = makeModel()
    let n = 0
    for await (const _ of model.stream('abc', { maxTokens: 200 })) if (++n === 3) break
    const steps = forward.steps.length
    expect(steps).toBeLessThan(10)
    await model.generate('x', { maxTokens: 2 })
    expect(forward.steps.length - steps).toBeLessThanOrEqual(2)
  })
})

describe('seeded sampling (context-hash model)', () => {
  const prompts = randomPrompts(6, 21, 20)

  it('is reproducible and independent of the batch', async () => {
    const opts = { maxTokens: 12, temperature: 0.8, topP: 0.9, topK: 20, seed: 1234 }
    const { model: a } = makeModel({ maxBatchSize: 1 })
    const alone = []
    for (const p of prompts) alone.push(await a.generate(p, opts))
    const { model: b } = makeModel({ maxBatchSize: 4, prefillChunkSize: 3, maxBatchTokens: 10 })
    const batched = await b.generateBatch(prompts, opts)
    for (const [i, r] of batched.entries()) {
      expect(r.tokens).toEqual(alone[i]!.tokens)
      expect(r.logprobs).toEqual(alone[i]!.logprobs)
      expect(r.seed).toBe(1234)
    }
    // It really samples: greedy picks differ from sampled ones somewhere, and another seed differs.
    const greedy = await b.generateBatch(prompts, { maxTokens: 12 })
    expect(greedy.some((g, i) => g.tokens.join() !== batched[i]!.tokens.join())).toBe(true)
    const other = await b.generateBatch(prompts, { ...opts, seed: 99 })
    expect(other.some((o, i) => o.tokens.join() !== batched[i]!.tokens.join())).toBe(true)
  })

  it('reports a seed that reproduces the completion when none is given', async () => {
    const { model } = makeModel()
    const r = await model.generate('seed', { maxTokens: 10, temperature: 1 })
    expect(r.seed).toBeTypeOf('number')
    const again = await model.generate('seed', { maxTokens: 10, temperature: 1, seed: r.seed })
    expect(again.tokens).toEqual(r.tokens)
  })
})

// A stand-in for a backend that computes as it launches (the CPU): launch() with `after` takes each
// chunk's token from the earlier step's chosen ids, and, like the CPU embedding, refuses an id of -1
// (the choice of a non-finite logits row) by throwing. Its logits rows are non-finite (id -1) for
// sequences whose first token is 15, from position 5 on; otherwise the next id is a function of the
// position and the first token. With `failAt`, the step of that number rejects.
class ComputingModel {
  readonly device = 'cpu' as const
  readonly config = { vocabSize: 16, maxPositionEmbeddings: 64 }
  readonly kvBlockSize = 4
  readonly kvBlocks = 32
  readonly maxBatchTokens = 32
  readonly cache = new Int32Array(32 * 4).fill(-1)
  steps = 0
  failAt = -1

  step(chunks: SequenceChunk[], choices: TokenChoice[], topN: number): Promise<StepTokens> {
    return this.launch(chunks, choices, topN).tokens
  }

  launch(chunks: SequenceChunk[], _choices: TokenChoice[], _topN: number, after?: LaunchedStep, afterRows?: readonly number[]): LaunchedStep {
    const fed = chunks.map((c, i) => {
      if (!after) return c
      const id = (after.chosen as number[])[afterRows?.[i] ?? i]!
      if (id < 0 || id >= 16) throw new Error(`embedding: id ${id} at index ${i} is out of range [0, 16)`)
      return { ...c, tokens: [id] }
    })
    const step = ++this.steps
    const ids: number[] = []
    for (const c of fed) {
      c.tokens.forEach((t, i) => {
        const p = c.startPosition + i
        this.cache[c.blockTable[Math.floor(p / 4)]! * 4 + (p % 4)] = t
      })
      if (c.logits === 'none') continue
      const p = c.startPosition + c.tokens.length - 1
      const first = this.cache[c.blockTable[0]! * 4]!
      ids.push(first === 15 && p >= 5 ? -1 : ((p * 7 + first) % 15) + 1)
    }
    const tokens: StepTokens = {
      ids: Int32Array.from(ids),
      logprobs: Float32Array.from(ids, (x) => (x < 0 ? NaN : -1)),
      topN: 0,
      topIds: new Int32Array(0),
      topLogprobs: new Float32Array(0),
    }
    const result = step === this.failAt ? Promise.reject(new Error(`failure at step ${step}`)) : Promise.resolve(tokens)
    result.catch(() => {})
    return { tokens: result, chosen: ids }
  }
}

describe('steps launched ahead', () => {
  const generate = (s: Scheduler, prompt: number[], maxTokens = 8, stopAfter = Infinity) => {
    const tokens: number[] = []
    return s
      .submit({ kind: 'generate', prompt, maxTokens, sampling: null, onToken: (t) => (tokens.push(t), tokens.length < stopAfter) })
      .done.then((o) => ({ ...o, tokens }))
  }
  const outcome = (r: PromiseSettledResult<{ tokens: number[] }>) =>
    r.status === 'fulfilled' ? `ok ${r.value.tokens}` : `${(r.reason as Error).constructor.name}: ${(r.reason as Error).message}`

  it('a non-finite row fails only its own request, as without launching ahead', async () => {
    const run = async (launchAhead: boolean) => {
      const s = new Scheduler(new ComputingModel() as never, { maxBatchSize: 4, prefillChunkSize: 16, launchAhead })
      return (await Promise.allSettled([generate(s, [15, 1, 2]), generate(s, [1, 2, 3])])).map(outcome)
    }
    const plain = await run(false)
    expect(plain[0]).toMatch(/^NonFiniteLogitsError/)
    expect(plain[1]).toMatch(/^ok /)
    expect(await run(true)).toEqual(plain)
  })

  it('a step launched ahead for sequences that all ended is dropped: the next request does not start behind it', async () => {
    const model = new ComputingModel()
    const s = new Scheduler(model as never, { maxBatchSize: 4, prefillChunkSize: 16, launchAhead: true })
    // The request stops itself after 3 tokens; the step launched ahead of its third read-back (step 4) fails.
    model.failAt = 4
    expect((await generate(s, [1, 2, 3], 8, 3)).tokens).toHaveLength(3)
    await new Promise((r) => setTimeout(r, 10))
    const before = model.steps
    const next = await generate(s, [5, 6, 7], 1)
    expect(next.tokens).toHaveLength(1)
    expect(model.steps - before).toBe(1) // one step: its own prefill
  })

  it('a request waiting for cache blocks (a free place in the batch, too few blocks) does not stop steps launched ahead', async () => {
    // Each request needs 8 + 24 - 1 = 31 positions, 8 blocks of 4: 10 blocks hold one at a time.
    const prompts = [0, 5, 9].map((k) => Array.from({ length: 8 }, (_, i) => ((i + k) % 30) + 1))
    const run = async (together: boolean, launchAhead = true) => {
      const model = new LaunchingModel({ kvBlocks: 10, kvBlockSize: 4 })
      const s = new Scheduler(model, { maxBatchSize: 4, prefillChunkSize: 16, launchAhead })
      const gen = (prompt: number[]) => {
        const tokens: number[] = []
        return s.submit({ kind: 'generate', prompt, maxTokens: 24, sampling: null, onToken: (t) => (tokens.push(t), true) }).done.then(() => tokens)
      }
      const tokens = together ? await Promise.all(prompts.map(gen)) : [await gen(prompts[0]!), await gen(prompts[1]!), await gen(prompts[2]!)]
      return { tokens, ahead: model.launches.filter((l) => l.after).length }
    }
    const alone = await run(false)
    const together = await run(true)
    expect(together.tokens).toEqual(alone.tokens)
    expect(together.tokens).toEqual((await run(true, false)).tokens)
    expect(alone.ahead).toBe(3 * 22) // every decode step but each request's first
    expect(together.ahead).toBe(alone.ahead)
  })
})
