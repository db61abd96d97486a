#!/usr/bin/env node
// Whether a model loads and generates on a smaller GPU than this one: the GPU is filled until
// --free-gib GiB stay free, then loadModel runs with the KV cache its defaults give a GPU of
// --total-gib GiB (a quarter of it), as on such a card, and generates a few tokens. The memory
// check at load (lib/model/load-memory.ts) either passes and the load succeeds, or refuses it
// with its message. Random weights at a shape of scripts/make-random-model.mjs.
//   node bench/fits.mjs --shape qwen3-8b --free-gib 23.5 --total-gib 24
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { defaultModelPath, loadModel } from '../dist/index.js'
import { native } from '../dist/native.js'
import { loadModelConfig } from '../dist/model/config.js'
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
  t = performance.now()
  let model
  try {
    model = await loadModel(dir, { device: 'cuda', kvCacheTokens })
  } catch (err) {
    console.log(`refused (kvCacheTokens ${kvCacheTokens}): ${err.message}`)
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
