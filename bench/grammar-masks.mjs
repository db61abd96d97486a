#!/usr/bin/env node
// Host time of the scheduler's grammar work per decode step, at a 151,936-token vocabulary, with
// the matchers in this thread (--workers 0) and on grammar worker threads: from the step's tokens
// read back to the next step's masks ready, that is every constrained sequence's accept(token)
// (the read-back path) and then Scheduler.prepareMasks (every mask asked for at once, then all
// awaited). With workers, the accepts only post the tokens and the workers advance their matchers
// before computing the masks, so the masks' wait holds both. Each sequence follows one of a few
// JSON schemas, taking a token its mask allows (seeded, chosen outside the timing), and starts
// again after 48 tokens or at the end of its text; the first steps (workers starting, grammars
// compiling) are left out. Prints the median, mean and 90th percentile of the steps, in ms.
//
// Two vocabularies: --vocab-kind padded (default), the shipped model's tokenizer with its ids
// padded to 151,936 by pieces no text writes, as test/serving/large-vocab.test.ts serves it (cheap
// masks: few pieces); --vocab-kind words, 151,936 distinct pieces (printable ASCII, JSON
// punctuation, then seeded random words with and without a leading space, and numbers), where
// a mask costs far more.
//
//   node bench/grammar-masks.mjs                                  # 1, 8 and 64 sequences; 0, 1 and 4 workers
//   node bench/grammar-masks.mjs --vocab-kind words --sequences 64 --workers 0,2 --steps 400
//
// Run `npm run build:ts` first.
import { parseArgs } from 'node:util'
import { availableParallelism } from 'node:os'
import { join } from 'node:path'
import { mulberry32 } from '../dist/determinism-check.js'
import { GrammarEngine } from '../dist/grammar.js'
import { Tokenizer } from '../dist/tokenizer.js'

const { values: args } = parseArgs({
  options: {
    sequences: { type: 'string', default: '1,8,64' },
    workers: { type: 'string', default: '0,1,4' },
    steps: { type: 'string', default: '300' },
    vocab: { type: 'string', default: '151936' },
    'vocab-kind': { type: 'string', default: 'padded' },
  },
})
const V = Number(args.vocab)
const STEPS = Number(args.steps)
const WARMUP = 20

/** Byte-like single characters, then distinct random pieces; the last id is EOS (no text). */
function vocabulary() {
  const rand = mulberry32(1)
  const pieces = []
  const seen = new Set()
  const add = (p) => {
    if (seen.has(p)) return false
    seen.add(p)
    pieces.push(p)
    return true
  }
  for (let c = 32; c < 127; c++) add(String.fromCharCode(c))
  for (const p of ['{"', '"}', '":', '",', '", "', '": ', '": "', '[', ']', '{}', '[]', ' {', ' [', 'true', 'false', 'null', ' true', ' false', ' null']) add(p)
  const letters = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
  while (pieces.length < V - 1) {
    const r = rand()
    let p
    if (r < 0.1) p = String(Math.floor(rand() * 100000))
    else {
      const n = 1 + Math.floor(rand() * 9)
      p = r < 0.55 ? ' ' : ''
      for (let i = 0; i < n; i++) p += letters[Math.floor(rand() * letters.length)]
      if (rand() < 0.05) p += ['"', '",', '.', ',', ':'][Math.floor(rand() * 5)]
    }
    add(p)
  }
  pieces.push('')
  return { pieces, vocabType: 'raw', addPrefixSpace: false, stopTokenIds: [V - 1] }
}

const SCHEMAS = [
  { type: 'object', properties: { name: { type: 'string' }, age: { type: 'integer' }, tags: { type: 'array', items: { type: 'string' } } }, required: ['name', 'age', 'tags'] },
  { type: 'object', properties: { answer: { enum: ['yes', 'no', 'maybe'] }, sure: { type: 'boolean' }, score: { type: 'number' } }, required: ['answer', 'sure', 'score'] },
  { type: 'object', properties: { city: { type: 'string' }, days: { type: 'integer' }, items: { type: 'array', items: { type: 'object', properties: { id: { type: 'integer' }, note: { type: 'string' } }, required: ['id'] } } }, required: ['city', 'days', 'items'] },
]
/** Tokens a sequence writes before it starts again (inside a string, nearly any token is allowed). */
const MAX_TOKENS = 48

const allowedIds = (mask) => {
  const ids = []
  for (let w = 0; w < mask.length; w++) for (let bits = mask[w]; bits !== 0; bits &= bits - 1) ids.push(w * 32 + (31 - Math.clz32(bits & -bits)))
  return ids
}

const kind = args['vocab-kind']
if (kind !== 'padded' && kind !== 'words') throw new Error(`Expected padded or words for --vocab-kind but received ${kind}`)
const tokenizer = kind === 'padded' ? await Tokenizer.load(join(import.meta.dirname, '..', 'models', 'default'), { modelVocabSize: V }) : null
const words = kind === 'words' ? vocabulary() : null
const source = tokenizer ?? { grammarVocabulary: () => words }
const EOS = tokenizer ? tokenizer.eosTokenIds : [V - 1]
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const p90 = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length * 0.9)]

async function run(sequences, workers) {
  const engine = new GrammarEngine(source, V, { workers })
  const rand = mulberry32(7)
  const seqs = []
  const start = async (i) => ({ c: await engine.constrain({ type: 'json_schema', schema: SCHEMAS[i % SCHEMAS.length] }), n: 0 })
  for (let i = 0; i < sequences; i++) seqs.push(await start(i))
  const times = []
  /** The token each sequence takes next (null: none yet, or it starts again). */
  let tokens = seqs.map(() => null)
  for (let step = 0; step < WARMUP + STEPS; step++) {
    const t0 = performance.now()
    for (const [i, s] of seqs.entries()) if (tokens[i] !== null) s.c.accept(tokens[i])
    const masks = await Promise.all(seqs.map(async (s) => s.c.mask()))
    const ms = performance.now() - t0
    if (step >= WARMUP) times.push(ms)
    tokens = []
    for (const [i, s] of seqs.entries()) {
      const text = allowedIds(masks[i]).filter((id) => !EOS.includes(id))
      const token = s.n >= MAX_TOKENS || text.length === 0 ? null : text[Math.floor(rand() * text.length)]
      tokens.push(token)
      if (token === null) {
        s.c.dispose()
        seqs[i] = await start(i)
      } else s.n++
    }
  }
  engine.dispose()
  return { median: median(times), mean: mean(times), p90: p90(times) }
}

console.log(`${V}-token vocabulary (${kind}), ${availableParallelism()} cores (availableParallelism), ${STEPS} steps each`)
console.log('sequences  workers  median ms/step  mean ms/step  p90 ms/step')
for (const n of args.sequences.split(',').map(Number))
  for (const w of args.workers.split(',').map(Number)) {
    const r = await run(n, w)
    console.log(`${String(n).padStart(9)} ${String(w).padStart(8)} ${r.median.toFixed(3).padStart(15)} ${r.mean.toFixed(3).padStart(13)} ${r.p90.toFixed(3).padStart(12)}`)
  }
tokenizer?.close()
