#!/usr/bin/env node
// Whether a model loads and generates on a smaller GPU than this one: the GPU is filled until
// --free-gib GiB stay free, then loadModel runs with the KV cache its defaults give a GPU of
// --total-gib GiB (a quarter of it), as on such a card, and generates a few tokens. The memory
// check at load (lib/model/load-memory.ts) reads this GPU's free memory and a total of
// --total-gib GiB, so that its safety margin (256 MiB and 1% of the total) is the smaller card's,
// not this one's; it either passes and the load succeeds, or refuses it with its message. Random
// weights at a shape of scripts/make-random-model.mjs.
//   node bench/fits.mjs --shape qwen3-8b --free-gib 23.5 --total-gib 24
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { defaultModelPath, loadModelFrom, readModelDir } from '../dist/api.js'
import { native } from '../dist/native.js'
import { loadModelConfig } from '../dist/model/config.js'
import { memoryMargin } from '../dist/model/load-memory.js'
import { writeRandomModel } from '../scripts/make-random-model.mjs'

const { values: args } = parseArgs({
  options: {
    shape: { type: 'string', default: 'qwen3-8b' },
    'free-gib': { type: 'string', default: '23.5' },
    'total-gib': { type: 'string', default: '24' },
    'new-tokens': { type: 'string', default: '16' },
  },
})
const GiB = 2 ** 30
if (!native().cudaStatus().available) throw new Error(`bench/fits.mjs needs a CUDA GPU: ${native().cudaStatus().reason}`)
const free = Number(args['free-gib']) * GiB
const total = Number(args['total-gib']) * GiB
if (!(free > 0 && total >= free)) throw new Error(`Expected 0 < --free-gib <= --total-gib but received ${args['free-gib']} and ${args['total-gib']}`)

const scratch = mkdtempSync(join(tmpdir(), 'detinfer-fits-'))
const fill = []
try {
  const dir = join(scratch, args.shape)
  let t = performance.now()
  writeRandomModel({ shape: args.shape, seed: 7, out: dir, tokenizerDir: defaultModelPath })
  console.log(`wrote ${args.shape} in ${((performance.now() - t) / 1000).toFixed(1)} s`)
  const n = native()
  let now = n.memoryInfo().free
  while (now > free + 64 * 2 ** 20) {
    fill.push(n.empty('cuda', 'bf16', [Math.floor(Math.min(now - free, 8 * GiB) / 2)]))
    now = n.memoryInfo().free
  }
  console.log(`GPU filled: ${(now / GiB).toFixed(3)} GiB free of ${(n.memoryInfo().total / GiB).toFixed(1)}`)
  // loadModel's default KV cache on a GPU of --total-gib: a quarter of it (lib/api.ts).
  const c = await loadModelConfig(dir)
  const kvCacheTokens = Math.min(131_072, Math.floor(total / 4 / (c.numLayers * c.numKvHeads * c.headDim * 4)))
  // The check's reading: this GPU's free memory as it is then, and the smaller card's total.
  const name = `${n.cudaStatus().devices[0]?.name ?? 'GPU 0'} as a ${args['total-gib']} GiB card`
  let read = null
  const deviceMemory = () => (read = { free: n.memoryInfo().free, total, name })
  t = performance.now()
  let model
  let refusal
  try {
    model = await loadModelFrom(await readModelDir(dir), { device: 'cuda', kvCacheTokens }, deviceMemory)
  } catch (err) {
    refusal = err
  }
  if (read)
    console.log(
      `memory check: ${(read.free / GiB).toFixed(3)} GiB free of ${args['total-gib']} GiB, safety margin ${(memoryMargin(read.total) / GiB).toFixed(3)} GiB ` +
        `(this GPU's own total would give ${(memoryMargin(n.memoryInfo().total) / GiB).toFixed(3)} GiB)`,
    )
  if (refusal) {
    console.log(`refused (kvCacheTokens ${kvCacheTokens}): ${refusal.message}`)
    process.exitCode = 1
  }
  if (model) {
    console.log(`loaded in ${((performance.now() - t) / 1000).toFixed(1)} s with kvCacheTokens ${kvCacheTokens}: ${(n.memoryInfo().free / GiB).toFixed(3)} GiB free`)
    const r = await model.generate('The', { maxTokens: Number(args['new-tokens']), ignoreEos: true })
    console.log(`generated ${r.tokens.length} tokens: ${(n.memoryInfo().free / GiB).toFixed(3)} GiB free`)
    await model.dispose()
  }
} finally {
  for (const f of fill) f.dispose()
  rmSync(scratch, { recursive: true, force: true })
}
