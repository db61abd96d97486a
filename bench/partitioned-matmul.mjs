// What the fixed K partition of the row-parallel layers costs: the plain matmul against
// matmulPartitioned (8 partitions + the fixed tree) at o_proj and down_proj shapes, and a model's
// decode throughput with tensorParallel unset (unpartitioned), 1 and 2 (emulated).
//   npm run build:ts && node bench/partitioned-matmul.mjs [--device cpu|cuda] [--model DIR]
//     [--shapes 4096x4096,4096x12288] [--rows 1,16,128]
import { parseArgs } from 'node:util'
import { native } from '../dist/native.js'
import { loadModel } from '../dist/api.js'

const { values } = parseArgs({
  options: {
    device: { type: 'string', default: 'cpu' },
    model: { type: 'string' },
    shapes: { type: 'string', default: '4096x4096,4096x12288' },
    rows: { type: 'string', default: '1,16,128' },
  },
})
const n = native()
const device = values.device

function randomBf16(count, seed) {
  const bits = new Uint16Array(count)
  let s = seed >>> 0
  const f = new Float32Array(1)
  const u = new Uint32Array(f.buffer)
  for (let i = 0; i < count; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0
    f[0] = ((s >>> 8) / 2 ** 24 - 0.5) * 0.1
    bits[i] = u[0] >>> 16
  }
  return bits
}

async function time(fn, out) {
  fn()
  await n.download(out)
  let reps = 0
  const start = performance.now()
  while (performance.now() - start < 1500 || reps < 3) {
    fn()
    reps++
  }
  await n.download(out)
  return (performance.now() - start) / reps
}

console.log(`device ${device}`)
console.log('N x K        M     matmul ms   partitioned ms   ratio')
for (const shape of values.shapes.split(',')) {
  const [N, K] = shape.split('x').map(Number)
  const w = n.fromBuffer(device, 'bf16', [N, K], randomBf16(N * K, 2))
  for (const M of values.rows.split(',').map(Number)) {
    const a = n.fromBuffer(device, 'bf16', [M, K], randomBf16(M * K, 1))
    const out = n.empty(device, 'bf16', [M, N])
    const plain = await time(() => n.matmul(out, a, w, null), out)
    const parted = await time(() => n.matmulPartitioned(out, a, w, null), out)
    console.log(`${shape.padEnd(12)} ${String(M).padStart(4)} ${plain.toFixed(2).padStart(12)} ${parted.toFixed(2).padStart(16)} ${(parted / plain).toFixed(3).padStart(7)}`)
    a.dispose()
    out.dispose()
  }
  w.dispose()
}

// A model's greedy decode: 8 prompts of 32 tokens, 64 new tokens each.
console.log('\nmodel decode (8 x 64 new tokens)   tokens/s')
for (const tp of [undefined, 1, 2]) {
  const model = await loadModel(values.model, { device, ...(tp !== undefined && { tensorParallel: tp }) })
  const prompts = Array.from({ length: 8 }, (_, i) => Array.from({ length: 32 }, (_, j) => 10 + ((i * 31 + j * 7) % 200)))
  await model.generateBatch(prompts.slice(0, 1), { maxTokens: 4 })
  const start = performance.now()
  const results = await model.generateBatch(prompts, { maxTokens: 64 })
  const seconds = (performance.now() - start) / 1000
  const tokens = results.reduce((s, r) => s + r.tokens.length, 0)
  console.log(`tensorParallel ${String(tp ?? 'unset').padEnd(6)} ${(tokens / seconds).toFixed(1).padStart(22)}`)
  model.dispose()
}
