// Where a replayed decode step's device time goes: the captured step replayed back to back (no
// host work between replays), once with every op and once per kind of op left out of the capture.
// A kind's row is the step's time with it left out, and `saved` the difference: what that kind
// adds to the chain of dependent kernels, which with programmatic dependent launch is not the sum
// of the kernels' times measured alone. The outputs of a step with ops left out are garbage; only
// the time is read.
//   npm run build:ts && node bench/step-attribution.mjs [--shape qwen3-0.6b] [--model DIR]
//     [--batches 1,8,64] [--keys 101] [--leave-out norm,qkv-rope,attention,qkv,o-proj,gate-up,down,lm-head]
//     [--separate-norms] [--decode-pipeline auto|paired|rotating|paired3] [--shared-weights]
// The norms before q|k|v and gate|up run inside those products (normMatmul), so leaving out qkv
// or gate-up leaves out the norm before it too, and `norm` is the final norm alone. With
// --separate-norms every norm is its own kernel again (addRmsnorm, then the product), as the step
// was before the products took them in, and `norm` leaves out all of them. --decode-pipeline
// forces how decode attention streams K and V (setDecodePipeline; the same bits).
// --shared-weights gives every layer's products the first layer's weights (the LM head keeps its
// own), so that a step's layer weights, 30 MB at Qwen3-0.6B, can stay in L2 from layer to layer
// (with lm-head left out, whose 311 MB would pass through L2 every step): a bound on what
// requesting weights into L2 ahead of their products could take off.
// Development measurement: it wraps the addon's op functions and reads the model's captured
// graphs, neither of which is part of the API.
import { existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { defaultModelPath } from '../dist/api.js'
import { native } from '../dist/native.js'
import { writeRandomModel } from '../scripts/make-random-model.mjs'
import { capturedStep, loadForSteps, productKind } from './replayed-step.mjs'

const KINDS = ['norm', 'qkv-rope', 'attention', 'qkv', 'o-proj', 'gate-up', 'down', 'lm-head']
const { values } = parseArgs({
  options: {
    shape: { type: 'string', default: 'qwen3-0.6b' },
    model: { type: 'string' },
    batches: { type: 'string', default: '1,8,64' },
    'leave-out': { type: 'string', default: KINDS.join(',') },
    replays: { type: 'string', default: '200' },
    keys: { type: 'string', default: '101' },
    'separate-norms': { type: 'boolean', default: false },
    'decode-pipeline': { type: 'string', default: 'auto' },
    'shared-weights': { type: 'boolean', default: false },
  },
})
const batches = values.batches.split(',').map(Number)
const replays = Number(values.replays)
const keys = Number(values.keys)
if (!Number.isInteger(keys) || keys < 1) throw new Error(`--keys: expected a positive integer but received ${values.keys}`)
const leaveOut = values['leave-out'].split(',').filter(Boolean)
for (const kind of leaveOut) if (!KINDS.includes(kind)) throw new Error(`--leave-out: no kind ${kind} (${KINDS.join(', ')})`)
const dir = values.model ?? join(tmpdir(), `detinfer-attribution-${values.shape}`)
if (!existsSync(join(dir, 'config.json'))) {
  console.log(`writing a random ${values.shape} model to ${dir}`)
  writeRandomModel({ shape: values.shape, seed: 1, out: dir, tokenizerDir: defaultModelPath })
}

const n = native()
n.setDecodePipeline(values['decode-pipeline'])
// Every op a decode step launches, by kind; products by their weight's shape.
const ops = Object.fromEntries(
  ['addRmsnorm', 'rmsnorm', 'qkvRopeAppend', 'attention', 'matmul', 'matmulSiluMul', 'normMatmul', 'normMatmulSiluMul'].map((k) => [k, n[k]]),
)
const separate = values['separate-norms']
let skip = new Set()
let config = null
// --shared-weights: the first weight of each shape stands for every later one (set per model)
let firstWeights = new Map()
const weight = (w) => {
  if (!values['shared-weights'] || !config || productKind(config, ...w.shape) === 'lm-head') return w
  const key = w.shape.join('x')
  if (!firstWeights.has(key)) firstWeights.set(key, w)
  return firstWeights.get(key)
}
n.addRmsnorm = (...a) => (skip.has('norm') ? undefined : ops.addRmsnorm.apply(n, a))
n.qkvRopeAppend = (...a) => (skip.has('qkv-rope') ? undefined : ops.qkvRopeAppend.apply(n, a))
n.attention = (...a) => (skip.has('attention') ? undefined : ops.attention.apply(n, a))
n.matmulSiluMul = (out, gateUp, a, w, bias) =>
  skip.has('gate-up') ? undefined : ops.matmulSiluMul.call(n, out, gateUp, a, weight(w), bias)
// Separate norms: the norm in place in residualIn (the stream's values go astray from there, the
// time does not), then the product.
const norm = (normed, residualIn, x, normW, eps) => {
  if (skip.has('norm')) return
  if (x) ops.addRmsnorm.call(n, normed, residualIn, x, normW, eps)
  else ops.rmsnorm.call(n, normed, residualIn, normW, eps)
}
n.normMatmul = (out, normed, residualOut, residualIn, x, normW, eps, w, bias) => {
  if (!separate)
    return skip.has('qkv') ? undefined : ops.normMatmul.call(n, out, normed, residualOut, residualIn, x, normW, eps, weight(w), bias)
  norm(normed, residualIn, x, normW, eps)
  if (!skip.has('qkv')) ops.matmul.call(n, out, normed, weight(w), bias)
}
n.normMatmulSiluMul = (out, gateUp, normed, residualOut, residualIn, x, normW, eps, w, bias) => {
  if (!separate)
    return skip.has('gate-up')
      ? undefined
      : ops.normMatmulSiluMul.call(n, out, gateUp, normed, residualOut, residualIn, x, normW, eps, weight(w), bias)
  norm(normed, residualIn, x, normW, eps)
  if (!skip.has('gate-up')) ops.matmulSiluMul.call(n, out, gateUp, normed, weight(w), bias)
}
n.matmul = (out, a, w, bias) => {
  const [N, K] = w.shape
  // (config is null while the first model loads: its probe's products always run)
  const kind = config && productKind(config, N, K)
  return kind && skip.has(kind) ? undefined : ops.matmul.call(n, out, a, weight(w), bias)
}

/** Median µs of a replayed step at each batch size, with the kinds in `left` left out. */
async function measure(left) {
  skip = new Set(left)
  firstWeights = new Map()
  const model = await loadForSteps(dir, Math.max(...batches), keys)
  config = model.config
  const result = []
  try {
    for (const B of batches) {
      const bucket = await capturedStep(model, B, keys)
      const times = []
      for (let rep = 0; rep < 5; rep++) {
        await n.synchronize('cuda')
        const start = performance.now()
        for (let i = 0; i < replays; i++) bucket.graph.replay()
        await n.synchronize('cuda')
        times.push(((performance.now() - start) / replays) * 1000)
      }
      result.push(times.sort((a, b) => a - b)[2])
    }
  } finally {
    model.dispose()
  }
  return result
}

const all = await measure([])
console.log(
  `${values.model ?? values.shape}, ${keys} keys, ${separate ? 'separate norms' : 'norms in the products'}${values['shared-weights'] ? ', every layer with the first layer\'s weights' : ''}, decode attention ${values['decode-pipeline']}, µs per replayed step (saved: what leaving the kind out takes off)`,
)
console.log(['left out'.padEnd(12), ...batches.map((b) => `batch ${b}`.padStart(18))].join(''))
console.log(['nothing'.padEnd(12), ...all.map((t) => t.toFixed(1).padStart(18))].join(''))
for (const kind of leaveOut) {
  const t = await measure([kind])
  console.log([kind.padEnd(12), ...t.map((v, i) => `${v.toFixed(1)} (${(all[i] - v).toFixed(1)})`.padStart(18))].join(''))
}
