#!/usr/bin/env node
// Matmul benchmark on the GPU machine: our kernels (csrc/dev/matmul.cu, built with
// -DDETINFER_DEV_HARNESSES=ON into build/dev/dev_matmul) and PyTorch's (bench/torch_matmul.py) on
// the same shapes in the same run, with the ceilings measured there too: a 2 GiB device-to-device
// copy (bytes read + written) and PyTorch's bf16 8192^3 matmul. Prints the table last and writes
// bench/results/matmul.json.   Usage: node bench/matmul.mjs [path/to/dev_matmul] [--mma-sync]
import { execFileSync } from 'node:child_process'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const resultsDir = join(root, 'bench', 'results')
mkdirSync(resultsDir, { recursive: true })
// --mma-sync: the sm_80-89 kernels (mma.sync) on this GPU too, a development switch of the harness
// that measures on a Hopper what Ampere and Ada GPUs run.
const mmaSync = process.argv.includes('--mma-sync')
const harness = process.argv.slice(2).find((a) => !a.startsWith('--')) ?? join(root, 'build', 'dev', 'dev_matmul')
const suffix = mmaSync ? '_mma_sync' : ''
const oursPath = join(resultsDir, `matmul_kernels${suffix}.json`)
const torchPath = join(resultsDir, 'matmul_torch.json')

execFileSync(harness, ['bench', oursPath, ...(mmaSync ? ['--mma-sync'] : [])], { stdio: 'inherit' })
execFileSync('python3', [join(root, 'bench', 'torch_matmul.py'), torchPath], {
  stdio: 'inherit',
  env: { ...process.env, PYTHONUNBUFFERED: '1' },
})

const ours = JSON.parse(readFileSync(oursPath, 'utf8'))
const torch = JSON.parse(readFileSync(torchPath, 'utf8'))
const key = (r) => `${r.N}x${r.K}x${r.M}`
const torchBy = new Map(torch.results.map((r) => [key(r), r]))
const rows = ours.results.map((r) => {
  const t = torchBy.get(key(r))
  return {
    ...r,
    copy_fraction: r.weight_gbs / ours.copy_gbs,
    copy_fraction_back_to_back: (r.N * r.K * 2) / r.us_back_to_back / 1e3 / ours.copy_gbs,
    peak_fraction: r.tflops / torch.peak_tflops,
    torch_us: t?.us,
    torch_tflops: t?.tflops,
    speed_vs_torch: t ? t.us / r.us : undefined,
  }
})
const summary = { device: torch.device, torch: torch.torch, copy_gbs: ours.copy_gbs, peak_tflops: torch.peak_tflops, results: rows }
writeFileSync(join(resultsDir, `matmul${suffix}.json`), JSON.stringify(summary, null, 2) + '\n')

const pad = (s, w) => String(s).padStart(w)
const f = (v, d = 1) => (v === undefined ? '-' : v.toFixed(d))
console.log(`\nmatmul bf16 on ${torch.device}${mmaSync ? ', forced to the mma.sync kernels of sm_80-89' : ''}: copy ceiling ${f(ours.copy_gbs)} GB/s (read+written), torch bf16 8192^3 ${f(torch.peak_tflops)} TFLOP/s`)
console.log(['N', 'K', 'M', 'ours us', 'TFLOP/s', 'W GB/s', '%copy', '%peak', 'torch us', 'torch TF/s', 'torch/ours', 'b2b us', 'b2b %copy'].map((h, i) => pad(h, [7, 6, 5, 9, 8, 8, 6, 6, 9, 10, 10, 8, 9][i])).join(' '))
for (const r of rows)
  console.log(
    [
      pad(r.N, 7), pad(r.K, 6), pad(r.M, 5), pad(f(r.us), 9), pad(f(r.tflops), 8), pad(f(r.weight_gbs, 0), 8),
      pad(f(100 * r.copy_fraction, 0), 6), pad(f(100 * r.peak_fraction, 0), 6), pad(f(r.torch_us), 9),
      pad(f(r.torch_tflops), 10), pad(f(r.speed_vs_torch, 2), 10), pad(f(r.us_back_to_back), 8),
      pad(f(100 * r.copy_fraction_back_to_back, 0), 9),
    ].join(' '),
  )
console.log(`\nwrote ${join(resultsDir, `matmul${suffix}.json`)} (torch/ours > 1: ours is faster; b2b: per call with calls queued back to back)`)
