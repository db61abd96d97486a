// Where each Hopper matmul of a replayed decode step spends its time, from its blocks' timestamps
// (%globaltimer; csrc/kernels/matmul_sm90_kernel.cuh lists the events): when the blocks start,
// when the wait for the kernels before them releases them, when the first stage is full, when the
// last MMA is done, when they end; and the cycles each block's consumer waited for full stages.
// The gap before a product's release is what the kernels between it and the product before it
// (the q/k norm, RoPE and attention before o_proj) take, handoffs included.
// Development measurement, on a Hopper GPU, with an addon built with the stamps (and rebuilt
// without them afterwards: time the step only in a build without them):
//   npx cmake-js rebuild --CDDETINFER_STAMPS=ON && npm run build:ts
//   node bench/step-stamps.mjs [--shape qwen3-0.6b] [--batch 1] [--keys 200] [--rounds 20] [--dump FILE]
//   npx cmake-js rebuild --CDDETINFER_STAMPS=OFF
// The step's products are the last 4 per layer + 1 (the LM head) matmul launches before the
// capture; each round clears the stamps, replays the step 3 times back to back and reads the
// last replay's. Medians over the layers 2 .. L-2 and the rounds.
import { existsSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { defaultModelPath } from '../dist/api.js'
import { native } from '../dist/native.js'
import { writeRandomModel } from '../scripts/make-random-model.mjs'
import { capturedStep, loadForSteps, productKind } from './replayed-step.mjs'

const { values } = parseArgs({
  options: {
    shape: { type: 'string', default: 'qwen3-0.6b' },
    batch: { type: 'string', default: '1' },
    keys: { type: 'string', default: '200' },
    rounds: { type: 'string', default: '20' },
    dump: { type: 'string' },
  },
})
const positive = (name) => {
  const v = Number(values[name])
  if (!Number.isInteger(v) || v < 1) throw new Error(`--${name}: expected a positive integer but received ${values[name]}`)
  return v
}
const B = positive('batch'), keys = positive('keys'), rounds = positive('rounds')
const n = native()
if (!n.stamps) throw new Error('this addon was built without the stamps: npx cmake-js rebuild --CDDETINFER_STAMPS=ON')
const dir = join(tmpdir(), `detinfer-attribution-${values.shape}`)
if (!existsSync(join(dir, 'config.json'))) writeRandomModel({ shape: values.shape, seed: 1, out: dir, tokenizerDir: defaultModelPath })

const model = await loadForSteps(dir, B, keys)
const EVENTS = 11, BLOCKS = 256 // matmul_sm90_kernel.cuh: stamps::kEvents, stamps::kBlocks
const [START, WAIT_P, WAIT_C, FIRST, MMA, END, SM, WAIT_CYCLES, PHASE_CYCLES, PROLOGUE] = [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]
const sorted = (v) => [...v].sort((a, b) => a - b)
const med = (v) => sorted(v)[v.length >> 1]
try {
  const cfg = model.config
  const bucket = await capturedStep(model, B, keys)
  for (let i = 0; i < 50; i++) bucket.graph.replay()
  const L = 4 * cfg.numLayers + 1
  const kindOf = (r) => (r.gateUp ? 'gate-up' : productKind(cfg, r.N, r.K))
  const fields = {} // kind -> column -> values over layers and rounds
  let resolution = Infinity
  let last = []
  for (let round = 0; round < rounds; round++) {
    n.stamps() // clears them
    for (let i = 0; i < 3; i++) bucket.graph.replay()
    const st = n.stamps()
    const data = new BigUint64Array(st.data)
    const launches = st.records.sort((a, b) => a.seq - b.seq).slice(-L)
    if (launches.length !== L || kindOf(launches[0]) !== 'qkv' || kindOf(launches[L - 1]) !== 'lm-head')
      throw new Error(`the step's products are not the last ${L} launches: ${launches.map(kindOf).join(',')}`)
    let t0 = null, prevEnd = null
    last = launches.map((r, i) => {
      const blocks = []
      for (let b = 0; b < BLOCKS; b++) {
        const o = (r.slot * BLOCKS + b) * EVENTS
        if (data[o] !== 0n) blocks.push(Array.from({ length: EVENTS }, (_, e) => data[o + e]))
      }
      if (!blocks.length) throw new Error(`launch ${i} (${kindOf(r)}) wrote no stamps`)
      t0 ??= blocks.reduce((m, x) => (x[START] < m ? x[START] : m), blocks[0][START])
      const times = sorted(blocks.flatMap((x) => x.slice(0, END + 1)).map(Number))
      for (let j = 1; j < times.length; j++) if (times[j] > times[j - 1]) resolution = Math.min(resolution, times[j] - times[j - 1])
      const us = (e) => sorted(blocks.map((x) => Number(x[e] - t0) / 1000))
      const start = us(START), release = us(WAIT_P), consumer = us(WAIT_C), prologue = us(PROLOGUE)
      const first = us(FIRST), mma = us(MMA), end = us(END)
      const x = {
        i, kind: kindOf(r), tile: r.tile, blocks: blocks.length,
        start: start[0], release: release[0], releaseLast: release.at(-1), consumer: med(consumer), prologue: med(prologue),
        first: med(first), mma: med(mma),
        endMed: med(end), end: end.at(-1),
        waitCycles: med(blocks.map((b) => Number(b[WAIT_CYCLES]))), phaseCycles: med(blocks.map((b) => Number(b[PHASE_CYCLES]))),
        perBlock: blocks.map((b) => ({ sm: Number(b[SM]), start: Number(b[START] - t0) / 1000, end: Number(b[END] - t0) / 1000 })),
      }
      const gap = prevEnd === null ? NaN : x.release - prevEnd
      prevEnd = x.end
      const layer = Math.floor(i / 4)
      if (x.kind === 'lm-head' || (layer >= 2 && layer < cfg.numLayers - 1)) {
        const columns = {
          'last end→release': gap, // the kernels between this product and the one before, handoffs included
          'start→release': x.release - x.start, // how early the blocks start (weights prefetched meanwhile)
          'release spread': x.releaseLast - x.release,
          'release→first': x.first - x.release, // the first stage full: a's copy, or the norm prologue
          'consumer wait': x.consumer - x.release, // the consumer's release past the producer's
          prologue: x.prologue - x.consumer, // the norm prologue (NORM products)
          'first→mma': x.mma - x.first, // the MMAs of all stages
          'mma→end': x.endMed - x.mma, // the epilogue
          'release→end': x.end - x.release,
          'end tail': x.end - x.endMed, // the last block's end past the median block's
          'wait cycles': x.waitCycles, // the consumer's clock64 cycles waiting for full stages
          'phase cycles': x.phaseCycles, // its cycles from the first full stage to the last MMA
          blocks: x.blocks,
        }
        const f = (fields[x.kind] ??= {})
        for (const [k, v] of Object.entries(columns)) (f[k] ??= []).push(v)
      }
      return x
    })
  }
  console.log(
    `${values.shape} batch ${B}, ${keys} keys, ${rounds} rounds of 3 replays, %globaltimer step ${resolution} ns; ` +
      `µs (cycles where named), medians over layers 2..${cfg.numLayers - 2} and the rounds`,
  )
  const names = Object.keys(fields.qkv)
  console.log(['kind'.padEnd(8), ...names.map((f) => f.padStart(17))].join(''))
  for (const [kind, f] of Object.entries(fields)) console.log([kind.padEnd(8), ...names.map((k) => med(f[k]).toFixed(2).padStart(17))].join(''))
  console.log("\nlast round, layers 0 and 1 and the LM head, µs from the step's first stamp (first, mma, end: median block / last block):")
  for (const x of last) {
    if (Math.floor(x.i / 4) > 1 && x.kind !== 'lm-head') continue
    console.log(
      `${String(x.i).padStart(4)} ${x.kind.padEnd(8)} ${x.tile.padEnd(18)} ${String(x.blocks).padStart(3)} blocks  start ${x.start.toFixed(2)}` +
        `  release ${x.release.toFixed(2)}..${x.releaseLast.toFixed(2)}  first ${x.first.toFixed(2)}  mma ${x.mma.toFixed(2)}` +
        `  end ${x.endMed.toFixed(2)} / ${x.end.toFixed(2)}`,
    )
  }
  // SMs that ran two or more of a product's blocks, and how late those blocks end against the
  // median block, beside the blocks alone on their SM (the last round, layers 2 .. L-2).
  console.log('\nlast round, SMs shared by blocks of one product: SMs per launch; end − median end, µs (median / max)')
  for (const kind of ['qkv', 'o-proj', 'gate-up', 'down']) {
    const launches = last.filter((x) => x.kind === kind && x.i >= 8 && Math.floor(x.i / 4) < cfg.numLayers - 1)
    let sharedSms = 0
    const shared = [], alone = []
    for (const x of launches) {
      const bySm = new Map()
      for (const b of x.perBlock) bySm.set(b.sm, [...(bySm.get(b.sm) ?? []), b])
      const endMed = med(x.perBlock.map((b) => b.end))
      for (const blocks of bySm.values()) {
        if (blocks.length > 1) sharedSms++
        for (const b of blocks) (blocks.length > 1 ? shared : alone).push(b.end - endMed)
      }
    }
    const both = (v) => (v.length ? `${med(v).toFixed(2)} / ${Math.max(...v).toFixed(2)}` : '-')
    console.log(
      `${kind.padEnd(8)} ${(sharedSms / launches.length).toFixed(1)} shared SMs per launch, their blocks ${both(shared)}; blocks alone ${both(alone)}`,
    )
  }
  if (values.dump) writeFileSync(values.dump, JSON.stringify(last)) // every launch of the last round, with each block's SM
} finally {
  model.dispose()
}
