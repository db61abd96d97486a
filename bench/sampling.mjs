#!/usr/bin/env node
// Token-choice benchmark on the GPU machine: the output head's chooseTokens kernel
// (csrc/dev/sampling.cu, built with -DDETINFER_DEV_HARNESSES=ON into build/dev/dev_sampling) and
// PyTorch's usual eager recipes (bench/torch_sampling.py) on logits f32 [rows, 151936] in the same
// run. Prints the table last and writes bench/results/sampling.json.
// Usage: node bench/sampling.mjs [path/to/dev_sampling]
import { execFileSync } from 'node:child_process'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const resultsDir = join(root, 'bench', 'results')
mkdirSync(resultsDir, { recursive: true })
const harness = process.argv[2] ?? join(root, 'build', 'dev', 'dev_sampling')
const oursPath = join(resultsDir, 'sampling_kernel.json')
const torchPath = join(resultsDir, 'sampling_torch.json')

execFileSync(harness, ['check'], { stdio: 'inherit' })
execFileSync(harness, ['bench', oursPath], { stdio: 'inherit' })
execFileSync('python3', [join(root, 'bench', 'torch_sampling.py'), torchPath], {
  stdio: 'inherit',
  env: { ...process.env, PYTHONUNBUFFERED: '1' },
})

const ours = JSON.parse(readFileSync(oursPath, 'utf8'))
const torch = JSON.parse(readFileSync(torchPath, 'utf8'))
// Our choices against PyTorch's recipe for the same kind of choice.
const torchName = (c) => (c.startsWith('top-k 40') ? 'top-p 0.9' : c)
const torchBy = new Map(torch.results.map((r) => [`${r.rows}/${r.choice}`, r]))
const rows = ours.results.map((r) => {
  const t = torchBy.get(`${r.rows}/${torchName(r.choice)}`)
  return { ...r, torchUs: t?.us ?? null, torchOverOurs: t ? t.us / r.us : null }
})
writeFileSync(join(resultsDir, 'sampling.json'), JSON.stringify({ vocab: ours.vocab, torch: torch.torch, rows }, null, 2))
console.log(`\ntoken choice at V = ${ours.vocab} (CUDA events, medians; ours: one call, and the same call replayed from a CUDA graph as in a decode step; torch ${torch.torch} eager recipes on the same shapes)`)
console.log(`${'rows'.padStart(5)}  ${'choice'.padEnd(32)} ${'ours us'.padStart(9)} ${'graph us'.padStart(9)} ${'torch us'.padStart(9)} ${'torch/ours'.padStart(10)}`)
for (const r of rows)
  console.log(
    `${String(r.rows).padStart(5)}  ${r.choice.padEnd(32)} ${r.us.toFixed(1).padStart(9)} ${(r.graph_us?.toFixed(1) ?? '-').padStart(9)} ${(r.torchUs?.toFixed(1) ?? '-').padStart(9)} ${(r.torchOverOurs?.toFixed(2) ?? '-').padStart(10)}`,
  )
