// Grammar-constrained generations in the scheduler (GenerationRequest.constraint), on a stand-in
// model that applies masks: every token is one the grammar allowed, a constrained sequence never
// rides in a step launched ahead (its mask needs the token in flight) while the others still do,
// each request gets the tokens it gets alone, and the constraint is disposed of however the
// request ends. The masks of a step are asked for all at once (grammar worker threads compute
// them in parallel), and one that fails among them ends its own request only.
import { describe, expect, it } from 'vitest'
import { GrammarEngine } from '../../lib/grammar.js'
import { Scheduler, type TokenConstraint } from '../../lib/scheduler.js'
import { LaunchingModel } from './launching-model.js'

const V = 40
const WORDS = Math.ceil(V / 32)
const tick = () => new Promise((r) => setTimeout(r, 0))

/** A toy grammar: the k-th token must be congruent to k modulo 3 (and not 0). */
class ModuloGrammar implements TokenConstraint {
  accepted: number[] = []
  masks = 0
  disposed = 0
  failMaskAt = -1
  async mask(): Promise<Int32Array> {
    if (this.disposed) throw new Error('mask() after dispose()')
    if (this.masks++ === this.failMaskAt) throw new Error('the grammar failed')
    await Promise.resolve()
    const words = new Int32Array(WORDS)
    for (let v = 1; v < V; v++) if (this.allows(v)) words[v >> 5]! |= 1 << (v & 31)
    return words
  }
  allows(v: number): boolean {
    return v > 0 && v % 3 === this.accepted.length % 3
  }
  accept(token: number): void {
    if (this.disposed) throw new Error('accept() after dispose()')
    if (!this.allows(token)) throw new Error(`token ${token} is not allowed`)
    this.accepted.push(token)
  }
  get finished(): boolean {
    return false
  }
  dispose(): void {
    this.disposed++
  }
}

const ids = (n: number, from = 0) => Array.from({ length: n }, (_, i) => ((i + from) % 30) + 1)

function make(launchAhead = true, kvBlocks = 40) {
  const model = new LaunchingModel({ kvBlocks, kvBlockSize: 4, maxBatchTokens: 16, processorRows: 4, vocab: V })
  return { model, s: new Scheduler(model, { maxBatchSize: 4, prefillChunkSize: 4, launchAhead }) }
}

function run(s: Scheduler, prompt: number[], maxTokens: number, constraint?: TokenConstraint) {
  const tokens: number[] = []
  const scheduled = s.submit({ kind: 'generate', prompt, maxTokens, sampling: null, ...(constraint && { constraint }), onToken: (t) => (tokens.push(t), true) })
  return { tokens, cancel: scheduled.cancel, done: scheduled.done.then((o) => o.finishReason as string, (e: Error) => `error: ${e.message}`) }
}

describe('constrained generations in the scheduler', () => {
  it('every token is allowed; alone and beside unconstrained requests, the same tokens; only the others launch ahead', async () => {
    const alone = make()
    const grammar = new ModuloGrammar()
    const a = run(alone.s, ids(6), 12, grammar)
    expect(await a.done).toBe('length')
    expect(a.tokens).toEqual(grammar.accepted)
    a.tokens.forEach((t, k) => expect(t % 3).toBe(k % 3))
    expect(grammar.masks).toBe(12)
    expect(grammar.disposed).toBe(1)

    const plainAlone = await (async () => {
      const { s } = make()
      const p = run(s, ids(5, 7), 16)
      await p.done
      return p.tokens
    })()

    for (const launchAhead of [true, false]) {
      const { model, s } = make(launchAhead)
      const g = new ModuloGrammar()
      const c = run(s, ids(6), 12, g)
      const p = run(s, ids(5, 7), 16)
      expect(await Promise.all([c.done, p.done])).toEqual(['length', 'length'])
      expect(c.tokens).toEqual(a.tokens)
      expect(p.tokens).toEqual(plainAlone)
      expect(g.disposed).toBe(1)
      // The block tables of the chunks whose rows carry a mask, launch by launch.
      const masked = model.launches.map((l) => {
        const tables: string[] = []
        let r = 0
        for (const ch of l.chunks) {
          const rows = ch.logits === 'none' ? 0 : ch.logits === 'last' ? 1 : ch.tokens.length
          for (let k = 0; k < rows; k++, r++) if (l.choices[r]?.processors?.mask) tables.push(ch.blockTable.join())
        }
        return tables
      })
      const constrainedTable = masked.flat()[0]!
      expect(new Set(masked.flat())).toEqual(new Set([constrainedTable]))
      // Every launch that ran the constrained sequence gave it its mask, and none was launched ahead.
      model.launches.forEach((l, i) => {
        const ran = l.chunks.some((ch) => ch.blockTable.join() === constrainedTable && ch.logits !== 'none')
        expect(masked[i]!.includes(constrainedTable)).toBe(ran)
        if (l.after) expect(ran).toBe(false)
      })
      // The unconstrained request still has steps launched ahead of their predecessor's results.
      expect(model.launches.some((l) => l.after)).toBe(launchAhead)
    }
  })

  it('disposed of however the request ends: cancelled waiting or running, a failed step, closed, a failing grammar', async () => {
    // Cancelled while waiting for cache blocks, and while running.
    {
      const { model, s } = make(true, 6)
      const big = run(s, ids(16), 8)
      const waiting = new ModuloGrammar()
      const w = run(s, ids(10), 10, waiting)
      const g = new ModuloGrammar()
      model.hold = true
      await tick()
      w.cancel()
      model.hold = false
      while (model.release()) await tick()
      await big.done
      expect(await w.done).toBe('cancelled')
      expect(waiting.disposed).toBe(1)
      const r = run(s, ids(3), 20, g)
      for (let k = 0; k < 4; k++) await tick()
      r.cancel()
      expect(await r.done).toBe('cancelled')
      expect(g.disposed).toBe(1)
    }
    // A failed step fails every request; the scheduler closed mid-flight.
    for (const how of ['fail', 'close'] as const) {
      const { model, s } = make()
      const g = new ModuloGrammar()
      if (how === 'fail') model.failAt.add(3)
      const r = run(s, ids(3), 20, g)
      if (how === 'close') {
        await tick()
        await s.close(new Error('closed'))
      }
      expect(await r.done).toMatch(/^error: /)
      expect(g.disposed).toBe(1)
    }
    // A grammar whose mask fails ends its own request only.
    {
      const { s } = make()
      const bad = new ModuloGrammar()
      bad.failMaskAt = 3
      const other = run(s, ids(4, 2), 10)
      const r = run(s, ids(3), 10, bad)
      expect(await r.done).toBe('error: the grammar failed')
      expect(bad.disposed).toBe(1)
      expect(await other.done).toBe('length')
      expect(other.tokens).toHaveLength(10)
    }
  })

  it("asks every constrained sequence for its mask at once, then awaits them all; one failing among them ends its own request only", async () => {
    /** A grammar whose masks take a timer's turn, counting those under way together. */
    let underWay = 0
    let most = 0
    class SlowGrammar extends ModuloGrammar {
      override async mask(): Promise<Int32Array> {
        underWay++
        most = Math.max(most, underWay)
        try {
          await new Promise((r) => setTimeout(r, 1))
          return await super.mask()
        } finally {
          underWay--
        }
      }
    }
    const { s } = make(false)
    const grammars = [0, 1, 2, 3].map(() => new SlowGrammar())
    grammars[2]!.failMaskAt = 4
    const runs = grammars.map((g, i) => run(s, ids(3, i), 8, g))
    const done = await Promise.all(runs.map((r) => r.done))
    expect(done).toEqual(['length', 'length', 'error: the grammar failed', 'length'])
    expect(most).toBe(4)
    // The same tokens as each request alone.
    for (const [i, r] of runs.entries()) {
      if (i === 2) continue
      const alone = make(false)
      const solo = run(alone.s, ids(3, i), 8, new ModuloGrammar())
      expect(await solo.done).toBe('length')
      expect(r.tokens).toEqual(solo.tokens)
    }
  })

  it('load counts the steps read back and the time the batch waited for grammar masks', async () => {
    class SlowGrammar extends ModuloGrammar {
      override async mask(): Promise<Int32Array> {
        await new Promise((r) => setTimeout(r, 5))
        return super.mask()
      }
    }
    const { model, s } = make(false)
    const plain = run(s, ids(4, 2), 6)
    expect(await plain.done).toBe('length')
    expect(s.load.steps).toBe(model.launches.length)
    expect(s.load.maskWaitMs).toBe(0)
    const before = model.launches.length
    const r = run(s, ids(3), 6, new SlowGrammar())
    expect(await r.done).toBe('length')
    // Six masks of at least 5 ms each, one before each step of the request.
    expect(s.load.steps - before).toBe(6)
    expect(s.load.steps).toBe(model.launches.length)
    expect(s.load.maskWaitMs).toBeGreaterThanOrEqual(6 * 4.5)
  })

  it('a grammar that fails for the only running sequence ends that request alone: the one waiting runs next', async () => {
    for (const launchAhead of [true, false]) {
      const model = new LaunchingModel({ kvBlocks: 40, kvBlockSize: 4, maxBatchTokens: 16, processorRows: 4, vocab: V })
      const s = new Scheduler(model, { maxBatchSize: 1, prefillChunkSize: 4, launchAhead })
      const bad = new ModuloGrammar()
      bad.failMaskAt = 0
      const r = run(s, ids(3), 6, bad)
      const waiting = run(s, ids(4, 2), 6)
      expect(await r.done).toBe('error: the grammar failed')
      expect(bad.disposed).toBe(1)
      expect(await waiting.done).toBe('length')
      expect(waiting.tokens).toHaveLength(6)
    }
  })

  it("a grammar's dead end (a vocabulary that cannot write what it needs) ends that request alone", async () => {
    // xgrammar over raw pieces without a space: `{"a": ` cannot be written past the colon.
    const pieces = ['', '{', '}', '"', 'a', ':', '1', ',']
    const engine = new GrammarEngine({ grammarVocabulary: () => ({ pieces, vocabType: 'raw', addPrefixSpace: false, stopTokenIds: [0] }) }, V)
    try {
      const { s } = make()
      const other = run(s, ids(4, 2), 10)
      const constraint = (await engine.constrain({ type: 'json_schema', schema: { type: 'object', properties: { a: { type: 'integer' } }, required: ['a'] } }))!
      const r = run(s, ids(3), 10, constraint)
      expect(await r.done).toMatch(/^error: No token of the vocabulary can continue the text/)
      expect(r.tokens).toEqual([1, 3, 4, 3, 5])
      expect(await other.done).toBe('length')
    } finally {
      engine.dispose()
    }
  })

  it('disposed of when the logit processor table cannot be allocated for it', async () => {
    const { model, s } = make()
    model.reserveLogitProcessors = () => {
      throw new Error('no room for the table')
    }
    const g = new ModuloGrammar()
    const r = run(s, ids(3), 4, g)
    expect(await r.done).toBe('error: no room for the table')
    expect(g.disposed).toBe(1)
  })

  it('a model without processor rows refuses a constrained request', () => {
    const model = new LaunchingModel({ kvBlocks: 8, kvBlockSize: 4, vocab: V })
    const s = new Scheduler(model, { maxBatchSize: 2, prefillChunkSize: 4 })
    expect(() => s.submit({ kind: 'generate', prompt: [1, 2], maxTokens: 2, sampling: null, constraint: new ModuloGrammar(), onToken: () => true })).toThrow(/cannot apply penalties, logit bias or a grammar/)
  })
})
