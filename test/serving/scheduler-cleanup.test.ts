// Every way a request can end gives back its KV-cache blocks and its row of the processor table:
// cancelled while waiting, prefilling, decoding or with a step launched ahead in flight; a
// consumer that throws or says stop; a failed step; the scheduler closed mid-flight. And random
// traffic of all of these gives each completed request the tokens it gets alone.
import { describe, expect, it } from 'vitest'
import { Scheduler } from '../../lib/scheduler.js'
import type { LogitProcessors } from '../../lib/sampling.js'
import { mulberry32 } from '../helpers/random.js'
import { LaunchingModel } from './launching-model.js'

const PENALTY: LogitProcessors = { frequencyPenalty: 0.5, presencePenalty: 0, repetitionPenalty: 1, logitBias: [] }
const ROWS = 4
const tick = () => new Promise((r) => setTimeout(r, 0))
const ids = (n: number, from = 0) => Array.from({ length: n }, (_, i) => ((i + from) % 30) + 1)

function generate(s: Scheduler, prompt: number[], maxTokens: number, onToken: (count: number) => boolean = () => true) {
  const tokens: number[] = []
  const run = s.submit({
    kind: 'generate',
    prompt,
    maxTokens,
    sampling: null,
    processors: PENALTY,
    onToken: (t) => (tokens.push(t), onToken(tokens.length)),
  })
  return { cancel: run.cancel, done: run.done.then((o) => o.finishReason as string, (e: Error) => `error: ${e.message}`) }
}

/** The scheduler holds nothing: no sequence, no cache block, every processor row free (four can run at once). */
async function expectIdle(s: Scheduler, model: LaunchingModel): Promise<void> {
  expect(s.load).toMatchObject({ running: 0, waiting: 0, usedBlocks: 0 })
  const before = model.launches.length
  const all = await Promise.all(Array.from({ length: ROWS }, (_, k) => generate(s, ids(3, k), 2).done))
  expect(all).toEqual(Array(ROWS).fill('length'))
  expect(Math.max(...model.launches.slice(before).map((l) => l.chunks.length))).toBe(ROWS)
}

describe.each([
  { launchAhead: true, prefixCache: true },
  { launchAhead: true, prefixCache: false },
  { launchAhead: false, prefixCache: true },
])('scheduler clean-up (launchAhead $launchAhead, prefixCache $prefixCache)', (options) => {
  const make = (kvBlocks = 20) => {
    const model = new LaunchingModel({ kvBlocks, kvBlockSize: 4, maxBatchTokens: 16, processorRows: ROWS })
    return { model, s: new Scheduler(model, { maxBatchSize: ROWS, prefillChunkSize: 4, ...options }) }
  }

  it('a request cancelled at any step, running or waiting', async () => {
    const { model, s } = make()
    for (let at = 0; at < 14; at++) {
      model.hold = true
      const a = generate(s, ids(10), 12)
      const b = generate(s, ids(9, 3), 12)
      const c = generate(s, ids(30, 5), 30) // waits for blocks
      await tick()
      for (let k = 0; k < at && model.release(); k++) await tick()
      a.cancel()
      c.cancel()
      model.hold = false
      while (model.release()) await tick()
      expect(await Promise.all([a.done, b.done, c.done])).toEqual([expect.stringMatching(/^(cancelled|length)$/), 'length', 'cancelled'])
      await tick()
      expect(s.load).toMatchObject({ running: 0, waiting: 0, usedBlocks: 0 })
    }
    await expectIdle(s, model)
  })

  it('a consumer that throws or says stop', async () => {
    const { model, s } = make()
    const outcomes = await Promise.all([
      generate(s, ids(7), 10, (n) => {
        if (n === 3) throw new Error('consumer')
        return true
      }).done,
      generate(s, ids(8, 2), 10, (n) => n < 2).done,
      generate(s, ids(5, 4), 10).done,
    ])
    expect(outcomes).toEqual(['error: consumer', 'stop', 'length'])
    await expectIdle(s, model)
  })

  it('a failed step, at any step', async () => {
    for (let at = 1; at < 8; at++) {
      const { model, s } = make(40)
      model.failAt.add(at)
      const outcomes = await Promise.all([generate(s, ids(9), 6).done, generate(s, ids(6, 2), 6).done, generate(s, ids(40, 2), 6).done])
      expect(outcomes).toContain(`error: step ${at} failed`)
      expect(s.load.cachedBlocks).toBe(0)
      await expectIdle(s, model)
    }
  })

  it('closed mid-flight', async () => {
    for (let at = 0; at < 8; at++) {
      const { s } = make()
      const runs = [generate(s, ids(9), 6), generate(s, ids(6, 2), 6), generate(s, ids(40, 2), 20)]
      for (let k = 0; k < at; k++) await tick()
      await s.close(new Error('closed'))
      for (const outcome of await Promise.all(runs.map((r) => r.done))) expect(outcome).toMatch(/^(length|error: closed)$/)
      expect(s.load).toMatchObject({ running: 0, waiting: 0, usedBlocks: 0 })
    }
  })
})

describe('close()', () => {
  // A caller disposes of the model once close() resolves: no step may still be running then, not
  // even one launched ahead that nobody will read.
  const launchedAhead = async (stopAfter: number) => {
    const model = new LaunchingModel({ kvBlocks: 20, kvBlockSize: 4, maxBatchTokens: 16, processorRows: ROWS })
    const s = new Scheduler(model, { maxBatchSize: ROWS, prefillChunkSize: 4, launchAhead: true })
    model.hold = true
    const run = generate(s, ids(3), 8, (n) => n < stopAfter)
    await tick()
    model.release() // the prefill; the first decode step goes, and the second is launched ahead of its read-back
    await tick()
    expect(model.held).toBe(2)
    expect(model.launches.at(-1)!.after).toBe(true)
    return { model, s, run }
  }
  const settles = async (p: Promise<unknown>) => {
    let settled = false
    void p.then(() => (settled = true))
    for (let k = 0; k < 5; k++) await tick()
    return settled
  }

  it('closed mid-flight, resolves once the step launched ahead has settled', async () => {
    const { model, s, run } = await launchedAhead(Infinity)
    const closing = s.close(new Error('closed'))
    model.release() // the first decode step: its read-back ends the loop
    expect(await run.done).toBe('error: closed')
    expect(await settles(closing)).toBe(false)
    expect(model.held).toBe(1)
    model.release()
    expect(await settles(closing)).toBe(true)
  })

  it('after its requests ended, resolves once a step launched ahead for them has settled', async () => {
    const { model, s, run } = await launchedAhead(2)
    model.release() // the first decode step: its token says stop, and the loop ends
    expect(await run.done).toBe('stop')
    const closing = s.close(new Error('closed'))
    expect(await settles(closing)).toBe(false)
    expect(model.held).toBe(1)
    model.release()
    expect(await settles(closing)).toBe(true)
  })
})

describe('random traffic', () => {
  it('cancellations, stops, throwing consumers and scores over shared prefixes: the tokens of each request alone, nothing held after', async () => {
    for (let seed = 1; seed <= 8; seed++) {
      const rand = mulberry32(seed)
      const pick = (n: number) => Math.floor(rand() * n)
      const model = new LaunchingModel({ kvBlocks: 24, kvBlockSize: 4, maxBatchTokens: 12, processorRows: 3 })
      const s = new Scheduler(model, { maxBatchSize: 5, prefillChunkSize: 5, prefixCache: seed % 4 !== 0, launchAhead: seed % 3 !== 0 })
      const alone = new Scheduler(new LaunchingModel({ kvBlocks: 64, kvBlockSize: 4, maxBatchTokens: 256 }), { maxBatchSize: 1, prefillChunkSize: 256 })
      const bases = [0, 1].map(() => Array.from({ length: 20 }, () => 1 + pick(30)))
      const problems: string[] = []
      const jobs: Promise<void>[] = []
      for (let i = 0; i < 40; i++) {
        const prompt = [...bases[pick(2)]!.slice(0, 1 + pick(20)), ...Array.from({ length: pick(4) }, () => 1 + pick(30))]
        const maxTokens = 1 + pick(12)
        const kind = rand()
        const stopAt = kind < 0.15 ? 1 + pick(maxTokens) : Infinity
        const throwAt = kind > 0.9 ? 1 + pick(maxTokens) : Infinity
        const tokens: number[] = []
        const score = rand() < 0.15
        const run = score
          ? s.submit({ kind: 'score', tokens: [...prompt, 3], from: 1 })
          : s.submit({
              kind: 'generate',
              prompt,
              maxTokens,
              sampling: null,
              processors: rand() < 0.4 ? PENALTY : null,
              onToken: (t) => {
                tokens.push(t)
                if (tokens.length === throwAt) throw new Error('consumer')
                return tokens.length < stopAt
              },
            })
        if (rand() < 0.2) {
          const after = pick(6)
          void (async () => {
            for (let k = 0; k < after; k++) await tick()
            run.cancel()
          })()
        }
        const done = run.done as Promise<unknown>
        jobs.push(
          done.then(
            async () => {
              if (score) return
              const want: number[] = []
              await alone.submit({ kind: 'generate', prompt, maxTokens, sampling: null, onToken: (t) => (want.push(t), true) }).done
              if (want.slice(0, tokens.length).join() !== tokens.join()) problems.push(`seed ${seed}, request ${i}: ${tokens} alone ${want}`)
            },
            (e: Error) => void (e.message !== 'consumer' && problems.push(`seed ${seed}, request ${i}: ${e.message}`)),
          ),
        )
        if (rand() < 0.5) await tick()
      }
      await Promise.all(jobs)
      await tick()
      expect(problems).toEqual([])
      expect(model.rowErrors).toEqual([])
      expect(s.load).toMatchObject({ running: 0, waiting: 0, usedBlocks: 0 })
    }
  })
})
