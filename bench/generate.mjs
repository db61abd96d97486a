#!/usr/bin/env node
// End-to-end generation benchmark: the whole stack (forward pass, scheduler, sampling) on one
// model, at several batch sizes, with the invariant kernels and again with the variant ones, so
// the table shows the throughput and what batch invariance costs. Optionally (--baseline, needs
// python3 with torch and transformers on a GPU) Hugging Face transformers' greedy generate() on
// the same checkpoint and the same prompt ids (bench/hf_generate.py).
//
//   node bench/generate.mjs                          # random weights at Qwen3-0.6B's shapes on
//                                                    # CUDA, the small qwen3-tiny shape on the CPU
//   node bench/generate.mjs --model DIR --batches 1,8,64 --prompt-tokens 128 --new-tokens 128
//   node bench/generate.mjs --baseline               # also transformers, same prompts
//   node bench/generate.mjs --samplings greedy,t0.7-p0.9,t0.7-k50   # sampled rows beside greedy
//   node bench/generate.mjs --samplings greedy,f0.5-q0.5-b50,t0.7-p0.9-f0.5  # penalties and logit bias (f, q, b)
//   node bench/generate.mjs --samplings greedy,mask,t0.7-p0.9-mask  # structured output's path (a grammar mask)
//   node bench/generate.mjs --samplings greedy,regex  # with xgrammar's masks of a regular expression
//   node bench/generate.mjs --samplings regex --grammar-workers 0  # masks on the main thread
//   node bench/generate.mjs --prefill-kernel mma.sync # (development) prefill attention with the sm_80-89 kernel
//   node bench/generate.mjs --matmul-kernels mma.sync # (development) every matmul with the sm_80-89 kernels
//   node bench/generate.mjs --split-size 64           # (development) attention splits of 64 keys instead
//                                                    # of the build's 256: other bits, for measuring only
//   node bench/generate.mjs --launch-ahead off        # decode steps one after another (default on:
//                                                    # step n + 1 enqueued before step n is read)
//   node bench/generate.mjs --prefill-chunk 2048      # prompt tokens per prefill step (default 512;
//                                                    # the library's default on CUDA is 2048)
//
// Every request generates exactly --new-tokens tokens (EOS does not end it). --samplings lists
// the token choices to measure (greedy, tT, tT-pP, tT-kK, tT-kK-pP-mM, each with -mask for a grammar mask that
// allows every token, or -regex for xgrammar's masks of the regular expression [a-z ]*, with its
// stop tokens taken out so that the length stays fixed; `regex` alone is greedy; default greedy plus
// temperature 0.7 with top-p 0.9 and with top-k 50 on a GPU), each at every batch size; the
// variant kernels and the baseline run greedy only. Decode throughput and the step time are
// measured while every request of the batch decodes: from the last request's first token (the
// end of the batch's prefill) to the first request's last token, so they are those of pure decode
// steps, which the roofline describes (the window must hold at least 8 steps: at large batches
// the prefill takes batch * prompt / chunk steps, so --new-tokens must exceed that by 8; else '-').
// `span tok/s` is the older measure, each request's tokens after its first over the time between
// them (the slowest request), which also counts the steps that prefill the other requests' prompts.
// Each configuration (batch size, token choice, kernels) runs once untimed, which captures the
// CUDA graphs it needs, then --repeats times (default 3); the row is the timed run of median decode
// throughput, as the first timed run of a process came out up to 14% slower than later ones.
// Prefill throughput is one long prompt's tokens over the time to its first token. Prints a table
// last and writes bench/results/generate.json. Run `npm run build` first.
import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { resolveDevice, setVariantKernels } from '../dist/device.js'
import { native } from '../dist/native.js'
import { defaultModelPath } from '../dist/api.js'
import { Transformer } from '../dist/model/transformer.js'
import { Scheduler } from '../dist/scheduler.js'
import { mulberry32 } from '../dist/determinism-check.js'
import { GrammarEngine } from '../dist/grammar.js'
import { Tokenizer } from '../dist/tokenizer.js'
import { writeRandomModel } from '../scripts/make-random-model.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const { values: args } = parseArgs({
  options: {
    model: { type: 'string' },
    shape: { type: 'string' },
    device: { type: 'string', default: 'auto' },
    batches: { type: 'string' },
    'prompt-tokens': { type: 'string', default: '128' },
    'new-tokens': { type: 'string' },
    'prefill-tokens': { type: 'string' },
    baseline: { type: 'boolean', default: false },
    'no-variant': { type: 'boolean', default: false },
    samplings: { type: 'string' },
    graphs: { type: 'string' },
    'launch-ahead': { type: 'string', default: 'on' },
    repeats: { type: 'string', default: '3' },
    'prefill-kernel': { type: 'string', default: 'auto' },
    'matmul-kernels': { type: 'string', default: 'auto' },
    'prefill-chunk': { type: 'string', default: '512' },
    'split-size': { type: 'string', default: '0' },
    'grammar-workers': { type: 'string' },
  },
})

const device = resolveDevice(args.device)
const onGpu = device === 'cuda'
const positive = (name, value) => {
  const n = Number(value)
  if (!Number.isInteger(n) || n < 1) throw new Error(`Expected a positive integer for --${name} but received ${value}`)
  return n
}
if (args['launch-ahead'] !== 'on' && args['launch-ahead'] !== 'off')
  throw new Error(`Expected on or off for --launch-ahead but received ${args['launch-ahead']}`)
// Decode steps enqueued before the previous one is read back (the scheduler's default), or not.
const launchAhead = args['launch-ahead'] === 'on'
const grammarWorkers = args['grammar-workers'] === undefined ? undefined : Number(args['grammar-workers'])
// Development: the sm_80-89 prefill attention kernel on Hopper too (the same bits, for timing).
if (args['prefill-kernel'] !== 'auto' && args['prefill-kernel'] !== 'mma.sync')
  throw new Error(`Expected auto or mma.sync for --prefill-kernel but received ${args['prefill-kernel']}`)
if (onGpu) native().setPrefillKernel(args['prefill-kernel'])
// Before any model loads: its decode workspace and graphs follow the split size at load.
native().setAttentionSplitSize(Number(args['split-size']))
const splitSize = native().attentionSplitSize()
if (args['matmul-kernels'] !== 'auto' && args['matmul-kernels'] !== 'mma.sync')
  throw new Error(`Expected auto or mma.sync for --matmul-kernels but received ${args['matmul-kernels']}`)
if (onGpu) native().setMatmulKernels(args['matmul-kernels'])
const batches = (args.batches ?? (onGpu ? '1,8,64,256' : '1,4,16')).split(',').map((b) => positive('batches', b))
const promptTokens = positive('prompt-tokens', args['prompt-tokens'])
const newTokens = positive('new-tokens', args['new-tokens'] ?? (onGpu ? '128' : '32'))
const repeats = positive('repeats', args.repeats)
const prefillTokens = positive('prefill-tokens', args['prefill-tokens'] ?? (onGpu ? '2048' : '256'))
const prefillChunk = positive('prefill-chunk', args['prefill-chunk'])

/**
 * "greedy" or "t0.7-p0.9-k50-m0.05" -> the sampling parameters (null: greedy) and the processors
 * (null: none) of a request. Penalties and logit
 * bias may follow, or stand alone for greedy: f (frequency_penalty), q (presence_penalty), b (that
 * many logit_bias entries, ids spread over the vocabulary, biases of +-1), e.g. "f0.5-q0.5-b50".
 */
function parseChoice(name) {
  if (name === 'greedy') return { sampling: null, processors: null, mask: false }
  if (name === 'regex') return { sampling: null, processors: null, mask: 'regex' }
  const p = { temperature: 0, topK: 0, topP: 1, minP: 0, seed: 1 }
  const proc = { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 1, logitBias: [] }
  let sampled = false
  let processed = false
  let mask = false
  for (const part of name.split('-')) {
    if (part === 'mask' || part === 'regex') {
      mask = part === 'mask' ? 'all' : 'regex'
      continue
    }
    const value = Number(part.slice(1))
    const key = { t: 'temperature', p: 'topP', k: 'topK', m: 'minP' }[part[0]]
    const procKey = { f: 'frequencyPenalty', q: 'presencePenalty', b: 'logitBias' }[part[0]]
    if ((!key && !procKey) || !Number.isFinite(value)) throw new Error(`Expected a sampling like greedy, t0.7-p0.9 or f0.5-q0.5-b50 for --samplings but received ${name}`)
    if (key) {
      p[key] = value
      sampled = true
    } else {
      proc[procKey] = procKey === 'logitBias' ? Array.from({ length: value }, (_, i) => [(i * 7919 + 13) % 4096, i % 2 ? -1 : 1]) : value
      processed = true
    }
  }
  if (sampled && !(p.temperature > 0)) throw new Error(`Expected a temperature above 0 (t0.7) in --samplings ${name}`)
  return { sampling: sampled ? p : null, processors: processed ? proc : null, mask }
}

/**
 * "mask" in a sampling: every request carries a grammar constraint (structured output's path: a
 * processor row, the mask's upload and kernel, and no step launched ahead for the sequence) whose
 * mask allows every token, so that the run keeps its fixed length and its tokens are the
 * unconstrained ones; the host's cost of a real grammar's mask (about 0.03 ms, lib/grammar.ts) is
 * not in it.
 */
function allowEverything(vocabSize) {
  const words = new Int32Array(Math.ceil(vocabSize / 32)).fill(-1)
  return { mask: async () => words, accept() {}, finished: false, dispose() {} }
}

/**
 * "regex" in a sampling: xgrammar's masks of [a-z ]* (lib/grammar.ts, on the library's default
 * grammar worker threads unless --grammar-workers), stop tokens cleared from each so that the
 * request never ends early: the host's real cost of a mask, every step.
 */
let grammar = null
async function endlessRegex() {
  if (!grammar) {
    const tokenizer = await Tokenizer.load(modelDir, { modelVocabSize: model.config.vocabSize })
    const engine = new GrammarEngine(tokenizer, model.config.vocabSize, { workers: grammarWorkers })
    grammar = { engine, stops: tokenizer.grammarVocabulary().stopTokenIds }
  }
  const inner = await grammar.engine.constrain({ type: 'regex', pattern: '[a-z ]*' })
  const stops = grammar.stops
  return {
    async mask() {
      const words = (await inner.mask()).slice()
      for (const id of stops) words[id >> 5] &= ~(1 << (id & 31))
      return words
    },
    accept: (token) => inner.accept(token),
    finished: false,
    dispose: () => inner.dispose(),
  }
}
const samplings = (args.samplings ?? (onGpu ? 'greedy,t0.7-p0.9,t0.7-k50' : 'greedy,t0.7-p0.9')).split(',')
samplings.forEach(parseChoice)

let modelDir = args.model
let scratch = null
if (!modelDir) {
  const shape = args.shape ?? (onGpu ? 'qwen3-0.6b' : 'qwen3-tiny')
  scratch = mkdtempSync(join(tmpdir(), 'detinfer-bench-'))
  modelDir = join(scratch, shape)
  process.stderr.write(`writing random weights at ${shape}'s shapes to ${modelDir}\n`)
  writeRandomModel({ shape, seed: 1234, out: modelDir, tokenizerDir: defaultModelPath })
}

// Graphs on and off (GPU), each a model of its own: --graphs on,off (default), on, or off.
const graphModes = onGpu ? (args.graphs ?? 'on,off').split(',').map((g) => {
  if (g !== 'on' && g !== 'off') throw new Error(`Expected on, off or on,off for --graphs but received ${args.graphs}`)
  return g
}) : ['off']

const maxBatch = Math.max(...batches)
const blockSize = 16
const perSequence = Math.ceil((promptTokens + newTokens + 1) / blockSize)
const maxBatchTokens = Math.max(prefillChunk, maxBatch)
const loadWith = (graphs) =>
  Transformer.load(modelDir, {
    device,
    maxBatchTokens,
    maxDecodeRows: maxBatch,
    kvBlocks: perSequence * maxBatch + Math.ceil((prefillTokens + 1) / blockSize),
    kvBlockSize: blockSize,
    cudaGraphs: graphs === 'on',
  })
const models = new Map()
for (const g of graphModes) models.set(g, await loadWith(g))
let model = models.get(graphModes[0])

// The roofline of a decode step: the bytes it must read (every weight once, and the KV cache of
// every sequence) over the copy bandwidth measured here, in this run.
const c = model.config
const weightBytes = 2 * (c.vocabSize * c.hiddenSize * (c.tieWordEmbeddings ? 1 : 2) + c.hiddenSize +
  c.numLayers * (2 * c.hiddenSize + c.hiddenSize * (c.numHeads + 2 * c.numKvHeads) * c.headDim + c.numHeads * c.headDim * c.hiddenSize +
    3 * c.hiddenSize * c.intermediateSize + (c.qkNorm ? 2 * c.headDim : 0)))
const kvBytesPerPosition = c.numLayers * c.numKvHeads * c.headDim * 2 * 2
const copyGBs = onGpu ? await copyBandwidth() : null

async function copyBandwidth() {
  const n = native()
  const elements = 2 ** 29 // 1 GiB of bf16
  const a = n.empty('cuda', 'bf16', [elements])
  const b = n.empty('cuda', 'bf16', [elements])
  try {
    n.copy(b, a)
    await n.synchronize('cuda')
    const times = []
    for (let i = 0; i < 5; i++) {
      const started = performance.now()
      for (let j = 0; j < 4; j++) n.copy(i % 2 ? a : b, i % 2 ? b : a)
      await n.synchronize('cuda')
      times.push((performance.now() - started) / 4)
    }
    times.sort((x, y) => x - y)
    return (2 * 2 * elements) / (times[2] / 1000) / 1e9 // bytes read + written
  } finally {
    a.dispose()
    b.dispose()
  }
}

function roofline(batch) {
  const context = promptTokens + newTokens / 2 // the average position a decode step attends to
  const bytes = weightBytes + batch * context * kvBytesPerPosition
  return copyGBs ? (batch * copyGBs * 1e9) / bytes : null
}
const vocab = Math.min(model.config.vocabSize, 4096)
const rand = mulberry32(7)
const prompts = Array.from({ length: maxBatch }, () => Array.from({ length: promptTokens }, () => 1 + Math.floor(rand() * (vocab - 1))))
const longPrompt = Array.from({ length: prefillTokens }, () => 1 + Math.floor(rand() * (vocab - 1)))

/**
 * Runs `list` together (all submitted at once), each to exactly `tokens` new tokens; `arrivals[i]`
 * holds the times (ms) at which request i's tokens arrived.
 */
async function serve(list, tokens, options, choice = { sampling: null, processors: null, mask: false }) {
  const { sampling, processors, mask } = choice
  const scheduler = new Scheduler(model, { ...options, launchAhead })
  const constraints = mask === 'regex' ? await Promise.all(list.map(() => endlessRegex())) : null
  const arrivals = list.map(() => [])
  const started = performance.now()
  const outcomes = await Promise.all(
    list.map(
      (prompt, i) =>
        scheduler.submit({
          kind: 'generate',
          prompt,
          maxTokens: tokens,
          sampling: sampling && { ...sampling, seed: i },
          processors,
          ...(mask && { constraint: constraints ? constraints[i] : allowEverything(model.config.vocabSize) }),
          onToken: () => {
            arrivals[i].push(performance.now())
            return true
          },
        }).done,
    ),
  )
  const seconds = (performance.now() - started) / 1000
  await scheduler.close(new Error('benchmark done'))
  return { seconds, timings: outcomes.map((o) => o.timings), arrivals }
}

/**
 * The decode steps during which every request decodes: from the last request's first token to
 * the first request's last, and the steps in between (the median over requests of the tokens each
 * received in that window: one per step, give or take the order within a step's delivery). Null
 * when the window holds fewer than 8 steps.
 */
function steadyDecode(arrivals) {
  const start = Math.max(...arrivals.map((a) => a[0]))
  const end = Math.min(...arrivals.map((a) => a[a.length - 1]))
  const counts = arrivals.map((a) => a.filter((t) => t > start && t <= end).length).sort((x, y) => x - y)
  const steps = counts[Math.floor(counts.length / 2)]
  return steps >= 8 ? { steps, stepMs: (end - start) / steps } : null
}

function measure(kernels, samplingNames, graphs) {
  return (async () => {
    setVariantKernels(kernels === 'variant')
    model = models.get(graphs)
    try {
      await serve([prompts[0].slice(0, 8)], 2, { maxBatchSize: 1, prefillChunkSize: prefillChunk }) // warm-up
      const rows = []
      for (const batch of batches)
        for (const sampling of samplingNames) {
        // Warm-up: the timed run once before, so that every decode bucket it reaches is captured
        // before timing. A shorter warm-up does not reach them: the prompts are admitted within
        // 512 tokens a step, decodes first, so a batch of 64 128-token prompts takes over 20 steps
        // to admit, and with 4 new tokens its first requests were done before the last were admitted
        // (no step of 64 decodes, whose bucket the timed run then ran eagerly and captured).
        const timedRun = () => serve(prompts.slice(0, batch), newTokens, { maxBatchSize: batch, prefillChunkSize: prefillChunk }, parseChoice(sampling))
        await timedRun()
        const runs = []
        for (let r = 0; r < repeats; r++) {
          const run = await timedRun()
          const steady = steadyDecode(run.arrivals)
          runs.push({ ...run, steady, rate: steady ? (1000 * batch) / steady.stepMs : (batch * newTokens) / run.seconds })
        }
        runs.sort((x, y) => x.rate - y.rate)
        const { seconds, timings, steady } = runs[Math.floor(runs.length / 2)]
        const spanSeconds = Math.max(...timings.map((t) => t.decodeMs)) / 1000
        const decodeTokensPerSecond = steady ? (1000 * batch) / steady.stepMs : null
        const ceiling = roofline(batch)
        rows.push({
          kernels,
          graphs,
          sampling,
          batch,
          steadySteps: steady?.steps ?? 0,
          stepMs: steady?.stepMs ?? null,
          rooflineTokensPerSecond: ceiling,
          ofRoofline: ceiling && decodeTokensPerSecond ? decodeTokensPerSecond / ceiling : null,
          seconds,
          tokensPerSecond: (batch * newTokens) / seconds,
          decodeTokensPerSecond,
          spanDecodeTokensPerSecond: spanSeconds > 0 ? (batch * (newTokens - 1)) / spanSeconds : 0,
          firstTokenMs: Math.max(...timings.map((t) => t.queuedMs + t.prefillMs)),
        })
      }
      const prefill = await serve([longPrompt], 1, { maxBatchSize: 1, prefillChunkSize: prefillChunk })
      const prefillTokensPerSecond = prefillTokens / ((prefill.timings[0].queuedMs + prefill.timings[0].prefillMs) / 1000)
      return { rows, prefillTokensPerSecond }
    } finally {
      setVariantKernels(false)
    }
  })()
}

const invariant = { rows: [], prefillTokensPerSecond: 0 }
for (const g of graphModes) {
  const r = await measure('invariant', g === graphModes[0] ? samplings : ['greedy'], g)
  invariant.rows.push(...r.rows)
  if (g === graphModes[0]) invariant.prefillTokensPerSecond = r.prefillTokensPerSecond
}
const graphStats = models.get('on')?.graphStats() ?? null
const variant = args['no-variant'] ? null : await measure('variant', ['greedy'], models.has('off') ? 'off' : graphModes[0])
for (const m of models.values()) m.dispose()

let baseline = null
if (args.baseline) {
  const input = join(scratch ?? mkdtempSync(join(tmpdir(), 'detinfer-bench-')), 'prompts.json')
  const output = `${input}.out.json`
  writeFileSync(input, JSON.stringify({ prompts, batches, newTokens, longPrompt }))
  execFileSync('python3', [join(root, 'bench', 'hf_generate.py'), '--model', modelDir, '--input', input, '--out', output], {
    stdio: 'inherit',
    env: { ...process.env, PYTHONUNBUFFERED: '1' },
  })
  baseline = JSON.parse(readFileSync(output, 'utf8'))
}
grammar?.engine.dispose()
if (scratch) rmSync(scratch, { recursive: true, force: true })

const summary = {
  model: args.model ?? `random ${args.shape ?? (onGpu ? 'qwen3-0.6b' : 'qwen3-tiny')} (seed 1234)`,
  device,
  promptTokens,
  newTokens,
  prefillTokens,
  prefillChunk,
  launchAhead,
  grammarWorkers: grammarWorkers ?? null,
  splitSize,
  copyGBs,
  weightBytes,
  graphs: graphStats,
  invariant,
  variant,
  baseline,
}
const resultsDir = join(root, 'bench', 'results')
mkdirSync(resultsDir, { recursive: true })
writeFileSync(join(resultsDir, 'generate.json'), JSON.stringify(summary, null, 2) + '\n')

const pad = (s, w) => String(s).padStart(w)
const f = (v, d = 1) => (v === undefined || v === null ? '-' : v.toFixed(d))
console.log(
  `\ngeneration on ${device}: ${summary.model}, prompts of ${promptTokens} tokens, ${newTokens} new tokens each (EOS ignored), ` +
    `decode steps ${launchAhead ? 'launched ahead' : 'one after another'}` +
    (samplings.some((n) => n.split('-').includes('regex'))
      ? `, grammar workers: ${grammarWorkers ?? 'default'}`
      : '') +
    (splitSize !== 256 ? `, attention splits of ${splitSize} keys (development; the build's are 256)` : ''),
)
console.log(
  ['batch', 'graphs', 'sampling', 'tok/s', 'decode tok/s', 'step ms', 'of roofline', 'of greedy', 'span tok/s', 'first tok ms', 'variant tok/s', 'inv/variant', 'hf tok/s', 'ours/hf']
    .map((h, i) => (i === 2 ? h.padEnd(14) : pad(h, [5, 6, 0, 9, 12, 8, 11, 9, 10, 12, 13, 11, 9, 8][i])))
    .join(' '),
)
for (const r of invariant.rows) {
  const greedy = r.sampling === 'greedy'
  const g = invariant.rows.find((x) => x.batch === r.batch && x.sampling === 'greedy' && x.graphs === r.graphs)
  const v = greedy && r.graphs === 'off' ? variant?.rows.find((x) => x.batch === r.batch) : undefined
  const hf = greedy ? baseline?.rows.find((b) => b.batch === r.batch) : undefined
  console.log(
    [
      pad(r.batch, 5), pad(r.graphs, 6), r.sampling.padEnd(14), pad(f(r.tokensPerSecond), 9), pad(f(r.decodeTokensPerSecond), 12),
      pad(f(r.stepMs, 2), 8), pad(r.ofRoofline === null ? '-' : `${(100 * r.ofRoofline).toFixed(0)}%`, 11),
      pad(g?.decodeTokensPerSecond && r.decodeTokensPerSecond ? f(r.decodeTokensPerSecond / g.decodeTokensPerSecond, 2) : '-', 9),
      pad(f(r.spanDecodeTokensPerSecond), 10), pad(f(r.firstTokenMs), 12),
      pad(f(v?.tokensPerSecond), 13), pad(f(v ? r.tokensPerSecond / v.tokensPerSecond : undefined, 2), 11),
      pad(f(hf?.tokensPerSecond), 9), pad(f(hf ? r.tokensPerSecond / hf.tokensPerSecond : undefined, 2), 8),
    ].join(' '),
  )
}
console.log(
  'decode tok/s and step ms: steps in which every request decodes (the last first token to the first last token); ' +
    'span tok/s: each request from its first token to its last, prefill steps of the other requests included',
)
if (copyGBs) console.log(`roofline: ${(weightBytes / 1e9).toFixed(2)} GB of weights plus the KV cache per decode step, at ${copyGBs.toFixed(0)} GB/s (a 1 GiB device copy, read + written, measured in this run)`)
if (graphStats)
  console.log(
    `CUDA graphs captured: ${graphStats.captured.map((g) => `${g.rows}x${g.context}${g.processors ? ' (penalties)' : ''}`).join(', ')} (${(graphStats.bytes / 2 ** 20).toFixed(1)} MiB)`,
  )
console.log(
  `prefill of ${prefillTokens} tokens in chunks of ${prefillChunk}: ${f(invariant.prefillTokensPerSecond)} tok/s` +
    (variant ? ` (variant ${f(variant.prefillTokensPerSecond)})` : '') +
    (baseline ? ` (hf ${f(baseline.prefillTokensPerSecond)})` : ''),
)
console.log(`\nwrote ${join(resultsDir, 'generate.json')} (invariant/variant below 1: what batch invariance costs)`)
