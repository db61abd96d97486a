// Grammar constraints whose matchers are held by worker threads (GrammarEngineOptions.workers):
// their masks are those of this thread's matchers bit for bit along whole generations (the
// shipped tokenizer at Qwen3's 151,936-token vocabulary, and at a vocab_size that is no multiple
// of 32), constraints spread over this thread and the workers, a token accepted without a mask
// first is still checked at once, disposing the engine rejects masks under way with its reason
// and stops the workers, and a worker that exits or aborts fails its own constraints with an error
// naming the cause while later constraints work. A process whose workers hold constraints exits
// on its own, disposed or not.
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { DisposedError } from '../lib/errors.js'
import { GrammarEngine, GrammarError, defaultGrammarWorkers, type ResponseFormat, type TokenConstraint } from '../lib/grammar.js'
import { Tokenizer } from '../lib/tokenizer.js'
import { mulberry32 } from './helpers/random.js'
import { runModuleScript } from './helpers/server.js'

const repoRoot = join(import.meta.dirname, '..')
const V_QWEN = 151936

let t: Tokenizer
let big: Tokenizer
beforeAll(async () => {
  t = await Tokenizer.load(join(repoRoot, 'models', 'default'))
  big = await Tokenizer.load(join(repoRoot, 'models', 'default'), { modelVocabSize: V_QWEN })
})
afterAll(() => {
  t.close()
  big.close()
})

// What the tests read of the engine's internals.
interface WorkerInternals {
  failedWith: Error | null
  constraints: number
  pending: Map<number, unknown>
  thread: { post: (message: unknown) => void; worker: { terminate(): Promise<number> } }
  onReply(reply: unknown): void
}
const poolOf = (engine: GrammarEngine) => (engine as unknown as { pool: { workers: (WorkerInternals | null)[] } }).pool
const workerOf = (c: TokenConstraint) => (c as unknown as { worker?: WorkerInternals }).worker ?? null
const inWorker = (c: TokenConstraint) => c.constructor.name === 'WorkerConstraint'

const allowedIds = (mask: Int32Array) => {
  const ids: number[] = []
  for (let w = 0; w < mask.length; w++) for (let bits = mask[w]!; bits !== 0; bits &= bits - 1) ids.push(w * 32 + (31 - Math.clz32(bits & -bits)))
  return ids
}
const hex = (mask: Int32Array) => Buffer.from(mask.buffer, mask.byteOffset, mask.byteLength).toString('hex')

const FORMATS: ResponseFormat[] = [
  {
    type: 'json_schema',
    schema: {
      type: 'object',
      properties: { answer: { enum: ['yes', 'no', 'maybe'] }, sure: { type: 'boolean' }, n: { type: 'integer', minimum: 0, maximum: 99 } },
      required: ['answer', 'sure', 'n'],
      additionalProperties: false,
    },
  },
  {
    type: 'json_schema',
    schema: { type: 'object', properties: { name: { type: 'string', maxLength: 6 }, tags: { type: 'array', items: { enum: ['a', 'bc'] }, maxItems: 3 } }, required: ['name', 'tags'] },
  },
  { type: 'json_object' },
  { type: 'choice', choices: ['alpha', 'beta gamma', 'δ'] },
  { type: 'regex', pattern: '[0-9]{1,3}(\\.[0-9]{1,2})?' },
]

/**
 * Drives every pair [in this thread, in a worker] of constraints in lockstep, all masks of a step
 * asked for at once: each pair's masks must be the same bits and say the same of `finished`; the
 * token (seeded, among those the mask allows, a stop token as soon as one is) is accepted by both.
 * Returns how many pairs ended with a stop token.
 */
async function lockstep(pairs: [TokenConstraint, TokenConstraint][], eos: readonly number[], seed: number, maxTokens = 60): Promise<number> {
  const rand = mulberry32(seed)
  const open = new Set(pairs.keys())
  let ended = 0
  for (let step = 0; step < maxTokens && open.size; step++) {
    const live = [...open]
    const masks = await Promise.all(live.map((i) => Promise.all(pairs[i]!.map((c) => c.mask()))))
    for (const [k, i] of live.entries()) {
      const [mine, theirs] = masks[k]!
      const [a, b] = pairs[i]!
      expect(theirs!.length, `pair ${i} step ${step}`).toBe(mine!.length)
      expect(hex(theirs!), `pair ${i} step ${step}`).toBe(hex(mine!))
      expect(b.finished, `pair ${i} step ${step}`).toBe(a.finished)
      const ids = allowedIds(mine!)
      const stop = ids.find((id) => eos.includes(id))
      const token = stop ?? ids[Math.floor(rand() * ids.length)]!
      a.accept(token)
      b.accept(token)
      expect(b.finished).toBe(a.finished)
      if (stop !== undefined) {
        expect(a.finished).toBe(true)
        await expect(b.mask()).rejects.toThrow('a stop token was accepted')
        open.delete(i)
        ended++
      }
    }
  }
  return ended
}

describe('grammar constraints in worker threads', () => {
  it('masks are the bits of this thread\'s along whole generations, over this thread and 3 workers, at 151,936 tokens and at a vocab_size no multiple of 32', async () => {
    for (const [tokenizer, vocabSize] of [
      [big, V_QWEN],
      [t, t.vocabSize + 45],
    ] as const) {
      const here = new GrammarEngine(tokenizer, vocabSize, { workers: 0 })
      const there = new GrammarEngine(tokenizer, vocabSize, { workers: 3 })
      expect(there.workers).toBe(3)
      try {
        // Two of each format, asked for at once: they spread over this thread and the workers.
        const formats = [...FORMATS, ...FORMATS]
        const mine = await Promise.all(formats.map((f) => here.constrain(f)))
        const theirs = await Promise.all(formats.map((f) => there.constrain(f)))
        expect(mine.every((c) => !inWorker(c!))).toBe(true)
        const workers = new Set(theirs.map((c) => workerOf(c!)))
        expect(theirs.filter((c) => !inWorker(c!)).length).toBeGreaterThanOrEqual(2)
        expect(workers.size).toBe(4) // this thread (null) and the 3 workers
        expect(theirs.filter((c) => inWorker(c!)).length).toBeGreaterThanOrEqual(6)
        for (const w of poolOf(there).workers) expect(w!.constraints).toBeGreaterThanOrEqual(2)
        const pairs = mine.map((c, i): [TokenConstraint, TokenConstraint] => [c!, theirs[i]!])
        const ended = await lockstep(pairs, tokenizer.eosTokenIds, vocabSize)
        // The grammars of bounded texts end with a stop token (a JSON object may go on).
        expect(ended).toBeGreaterThanOrEqual(formats.length - 2)
        for (const c of [...mine, ...theirs]) c!.dispose()
        for (const w of poolOf(there).workers) expect(w!.constraints).toBe(0)
      } finally {
        here.dispose()
        there.dispose()
      }
    }
  })

  it('a token accepted with no mask first is checked at once: refused with the error of this thread, or taken (a stop token ending the constraint)', async () => {
    const engine = new GrammarEngine(t, t.vocabSize, { workers: 1 })
    const here = new GrammarEngine(t, t.vocabSize, { workers: 0 })
    try {
      const format: ResponseFormat = { type: 'choice', choices: ['ab'] }
      // This thread takes the first constraint; the worker the second.
      const [first, c] = await Promise.all([engine.constrain(format), engine.constrain(format)])
      expect(inWorker(first!)).toBe(false)
      expect(inWorker(c!)).toBe(true)
      const ref = (await here.constrain(format))!
      const ids = t.encode('ab', { addSpecialTokens: false })
      const close = t.encode('}', { addSpecialTokens: false })[0]!
      for (const x of [ref, c!]) {
        expect(() => x.accept(close)).toThrow(`Token ${close} is not allowed by the grammar at this position`)
        expect(() => x.accept(t.vocabSize)).toThrow(RangeError)
        for (const id of ids) x.accept(id)
        expect(x.finished).toBe(false)
        x.accept(t.eosTokenIds[0]!)
        expect(x.finished).toBe(true)
        await expect(x.mask()).rejects.toThrow('a stop token was accepted')
        expect(() => x.accept(ids[0]!)).toThrow('has ended')
      }
      // With a mask first, a token it leaves out is refused here, before the worker sees it. (This
      // thread takes the third constraint, at a tie; the worker the fourth.)
      const filler = (await engine.constrain(format))!
      const d = (await engine.constrain(format))!
      expect(inWorker(filler)).toBe(false)
      expect(inWorker(d)).toBe(true)
      const mask = await d.mask()
      expect(allowedIds(mask)).toContain(ids[0])
      expect(() => d.accept(close)).toThrow('(the last mask leaves it out)')
      for (const id of ids) d.accept(id)
      expect(allowedIds(await d.mask())).toEqual(t.eosTokenIds)
      expect(d.finished).toBe(true)
      for (const x of [first!, c!, filler, d, ref]) x.dispose()
    } finally {
      engine.dispose()
      here.dispose()
    }
  })

  it("disposing the engine rejects masks under way with the engine's reason, stops its workers and refuses what comes after; a constraint disposed under its mask rejects it", async () => {
    const engine = new GrammarEngine(big, V_QWEN, { workers: 2 })
    const cs = await Promise.all([0, 1, 2].map(() => engine.constrain({ type: 'json_object' })))
    expect(cs.filter((c) => inWorker(c!)).length).toBe(2)
    // One disposed while its mask is under way.
    const lone = cs.find((c) => inWorker(c!))!
    const lonely = lone.mask()
    lone.dispose()
    await expect(lonely).rejects.toBeInstanceOf(DisposedError)
    const others = cs.filter((c) => c !== lone && inWorker(c!))
    const reason = new DisposedError('model')
    const pending = others.map((c) => c!.mask())
    engine.dispose(reason)
    for (const p of pending) await expect(p).rejects.toBe(reason)
    for (const w of poolOf(engine).workers) if (w) expect(w.failedWith).toBe(reason)
    for (const c of cs) {
      await expect(c!.mask()).rejects.toBeInstanceOf(DisposedError)
      expect(() => c!.accept(0)).toThrow(DisposedError)
      c!.dispose()
    }
    await expect(engine.constrain({ type: 'json_object' })).rejects.toBe(reason)
  })

  it('a worker that exits fails its constraints with an error naming the cause; a new worker takes its place and later constraints work', async () => {
    const engine = new GrammarEngine(big, V_QWEN, { workers: 1 })
    const here = new GrammarEngine(big, V_QWEN, { workers: 0 })
    try {
      const [inThread, c] = await Promise.all([engine.constrain(FORMATS[0]!), engine.constrain(FORMATS[0]!)])
      expect(inWorker(c!)).toBe(true)
      const worker = workerOf(c!)!
      c!.accept(allowedIds(await c!.mask())[0]!)
      const mask = await c!.mask()
      await worker.thread.worker.terminate()
      for (let i = 0; i < 100 && !worker.failedWith; i++) await new Promise((r) => setTimeout(r, 10))
      // A token its last mask allowed, and the next mask: both fail, naming the cause.
      const cause = 'The grammar constraint cannot go on: The grammar worker thread exited before its constraints ended'
      expect(() => c!.accept(allowedIds(mask)[0]!)).toThrow(cause)
      await expect(c!.mask()).rejects.toThrow(cause)
      // The constraint of this thread goes on; the next one for the worker gets a new worker.
      expect((await inThread!.mask()).length).toBe(V_QWEN / 32)
      const next = (await engine.constrain(FORMATS[0]!))!
      expect(inWorker(next)).toBe(true)
      expect(workerOf(next)).not.toBe(worker)
      expect(poolOf(engine).workers[0]).toBe(workerOf(next))
      expect(await lockstep([[(await here.constrain(FORMATS[0]!))!, next]], big.eosTokenIds, 1)).toBe(1)
      c!.dispose()
      inThread!.dispose()
    } finally {
      engine.dispose()
      here.dispose()
    }
  })

  it("an abort in a worker fails that call with xgrammar's reason, and the worker's other constraints with the cause; a request compiled there gets GrammarError", async () => {
    const engine = new GrammarEngine(big, V_QWEN, { workers: 1 })
    try {
      // Two in this thread, two in the worker.
      const cs = await Promise.all([0, 1, 2, 3].map(() => engine.constrain({ type: 'json_object' })))
      const [a, b] = cs.filter((c) => inWorker(c!))
      const worker = workerOf(a!)!
      expect(workerOf(b!)).toBe(worker)
      // The worker's answer to a's mask is an abort (as xgrammar's module prints one).
      worker.thread.post = () => {}
      const failing = a!.mask()
      await Promise.resolve()
      await Promise.resolve()
      const [call] = [...worker.pending.keys()]
      const failure = { message: 'Aborted()', lines: ['[FATAL] /src/cpp/grammar_matcher.cc:12: Check failed: (x) is false: the stack broke', 'Aborted()'], thrown: false, aborted: true }
      worker.onReply({ replies: [{ call, failure }] })
      await expect(failing).rejects.toThrow(/^xgrammar failed: the stack broke$/)
      expect(worker.failedWith?.message).toBe('xgrammar failed in the grammar worker thread: the stack broke')
      await expect(b!.mask()).rejects.toThrow('The grammar constraint cannot go on: xgrammar failed in the grammar worker thread: the stack broke')
      // A compile that aborts in a worker is the request's GrammarError, as in this thread: the
      // new worker (the failed one's place) answers the compile with an abort.
      type Enqueue = (this: WorkerInternals, request: { op: string; call?: number }) => void
      const proto = Object.getPrototypeOf(worker) as { enqueue: Enqueue }
      const enqueue = proto.enqueue
      proto.enqueue = function (request) {
        if (request.op !== 'create') return enqueue.call(this, request)
        const lines = ['[FATAL] /src/cpp/compiler.cc:1: Check failed: (y) is false: no room']
        queueMicrotask(() => this.onReply({ replies: [{ call: request.call, failure: { ...failure, lines } }] }))
      }
      try {
        await expect(engine.constrain({ type: 'json_schema', schema: { type: 'object', properties: { k: { type: 'integer' } } } })).rejects.toThrow(
          new GrammarError('The JSON schema cannot be compiled: no room'),
        )
      } finally {
        proto.enqueue = enqueue
      }
      const fresh = poolOf(engine).workers[0]!
      expect(fresh).not.toBe(worker)
      expect(fresh.failedWith?.message).toBe('xgrammar failed in the grammar worker thread: no room')
      expect(fresh.constraints).toBe(0)
      // The next gets another worker, which works.
      const later = (await engine.constrain({ type: 'json_object' }))!
      expect(inWorker(later)).toBe(true)
      const here = new GrammarEngine(big, V_QWEN, { workers: 0 })
      const ref = (await here.constrain({ type: 'json_object' }))!
      expect(hex(await later.mask())).toBe(hex(await ref.mask()))
      here.dispose()
      for (const c of [...cs, later]) c!.dispose()
    } finally {
      engine.dispose()
    }
  })

  it("a constraint on a worker outlives its grammar being dropped from the worker's cache of 64 (79 other schemas compiled there after it)", async () => {
    const engine = new GrammarEngine(t, t.vocabSize, { workers: 1 })
    const here = new GrammarEngine(t, t.vocabSize, { workers: 0 })
    try {
      const schema = (k: number) => ({ type: 'object', properties: { [`k${k}`]: { type: 'integer' } }, required: [`k${k}`] })
      // This thread holds two constraints all along (it takes those at a tie), so that each of the
      // others goes to the worker.
      const held = (await engine.constrain({ type: 'json_object' }))!
      const first = (await engine.constrain({ type: 'json_schema', schema: schema(0) }))!
      const held2 = (await engine.constrain({ type: 'json_object' }))!
      expect([held, first, held2].map(inWorker)).toEqual([false, true, false])
      for (let k = 1; k < 80; k++) {
        const c = (await engine.constrain({ type: 'json_schema', schema: schema(k) }))!
        expect(inWorker(c)).toBe(true)
        c.dispose()
      }
      // The first schema's grammar was dropped from the worker's cache (disposed there); its matcher
      // still gives this thread's masks to the end, and the schema compiles again there.
      expect(await lockstep([[(await here.constrain({ type: 'json_schema', schema: schema(0) }))!, first]], t.eosTokenIds, 3)).toBe(1)
      const again = (await engine.constrain({ type: 'json_schema', schema: schema(0) }))!
      expect(inWorker(again)).toBe(true)
      expect(await lockstep([[(await here.constrain({ type: 'json_schema', schema: schema(0) }))!, again]], t.eosTokenIds, 4)).toBe(1)
      for (const c of [held, held2, first, again]) c.dispose()
    } finally {
      engine.dispose()
      here.dispose()
    }
  })

  it('a process whose engine has workers holding constraints, and whose schemas were checked, exits on its own, the engine disposed or not', () => {
    for (const dispose of [false, true]) {
      const script = `
        import { GrammarEngine } from './dist/grammar.js'
        import { Tokenizer } from './dist/tokenizer.js'
        const t = await Tokenizer.load('models/default')
        const engine = new GrammarEngine(t, t.vocabSize, { workers: 2 })
        const schema = { type: 'object', properties: { a: { type: 'integer' } } }
        const cs = await Promise.all([0, 1, 2, 3].map(() => engine.constrain({ type: 'json_schema', schema })))
        const masks = await Promise.all(cs.map((c) => c.mask()))
        console.log(cs.map((c) => c.constructor.name).join(' '), masks.map((m) => m.length).join(' '))
        ${dispose ? 'engine.dispose()' : ''}
      `
      expect(runModuleScript(script)).toBe('Constraint WorkerConstraint WorkerConstraint Constraint 128 128 128 128\n')
    }
  })

  it('workers: 0 keeps every matcher in this thread; the default is one less than the cores, at most 4; out of range is refused', async () => {
    const engine = new GrammarEngine(t, t.vocabSize, { workers: 0 })
    const cs = await Promise.all([0, 1, 2, 3].map(() => engine.constrain({ type: 'json_object' })))
    expect(cs.every((c) => !inWorker(c!))).toBe(true)
    expect(engine.workers).toBe(0)
    engine.dispose()
    const { availableParallelism } = await import('node:os')
    expect(defaultGrammarWorkers()).toBe(Math.max(0, Math.min(8, availableParallelism() - 1)))
    const byDefault = new GrammarEngine(t, t.vocabSize)
    expect(byDefault.workers).toBe(defaultGrammarWorkers())
    byDefault.dispose()
    for (const workers of [-1, 1.5, 65, '2' as never]) expect(() => new GrammarEngine(t, t.vocabSize, { workers })).toThrow(/Expected an integer from 0 to 64 for workers/)
  })
})
