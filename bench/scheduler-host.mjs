#!/usr/bin/env node
// Host time per scheduler step: the JavaScript between two forward passes (packing the batch,
// token-choice parameters, the decode step's input layout, delivering tokens), measured with a
// stand-in model that answers at once, so no device work hides it. With CUDA graphs a decode step
// is one native call, and this is what remains on the host around it.
//
//   node bench/scheduler-host.mjs                    # batches 1, 64 and 256, 2000 tokens each
//   node bench/scheduler-host.mjs --batches 64 --new-tokens 500
//
// Run `npm run build` first.
import { parseArgs } from 'node:util'
import { Scheduler } from '../dist/scheduler.js'
import { layoutDecode } from '../dist/model/step-layout.js'

const { values: args } = parseArgs({
  options: { batches: { type: 'string', default: '1,64,256' }, 'new-tokens': { type: 'string', default: '2000' } },
})
const newTokens = Number(args['new-tokens'])
const blockSize = 16

async function run(batch) {
  let steps = 0
  let layoutMs = 0
  const model = {
    device: 'cpu',
    config: { vocabSize: 151936, maxPositionEmbeddings: 40960 },
    kvBlockSize: blockSize,
    kvBlocks: Math.ceil((batch * (128 + newTokens)) / blockSize) + 16,
    maxBatchTokens: 8192,
    async step(chunks, choices) {
      steps++
      // The decode step's input layout, as the CUDA-graph path builds it (rows padded to the batch).
      if (chunks.every((c) => c.tokens.length === 1)) {
        const t0 = performance.now()
        const maxSeqLen = chunks.reduce((m, c) => Math.max(m, c.startPosition + 1), 0)
        layoutDecode(chunks, chunks.length, Math.ceil(maxSeqLen / blockSize), maxSeqLen, blockSize)
        layoutMs += performance.now() - t0
      }
      const rows = choices.length
      const none = { topN: 0, topIds: new Int32Array(0), topLogprobs: new Float32Array(0) }
      return { ids: new Int32Array(rows).fill(7), logprobs: new Float32Array(rows).fill(-1), ...none }
    },
  }
  const scheduler = new Scheduler(model, { maxBatchSize: batch, prefillChunkSize: 512 })
  const prompt = Array.from({ length: 128 }, (_, i) => 1 + i)
  const sampling = { temperature: 0.7, topK: 0, topP: 0.9, seed: 1 }
  const done = []
  for (let i = 0; i < batch; i++)
    done.push(scheduler.submit({ kind: 'generate', prompt, maxTokens: newTokens, sampling, onToken: () => true }).done)
  const t0 = performance.now()
  await Promise.all(done)
  const ms = performance.now() - t0
  return { batch, steps, usPerStep: (ms / steps) * 1000, layoutUsPerStep: (layoutMs / steps) * 1000 }
}

console.log('batch  steps  host us/step  of which decode layout us')
for (const b of args.batches.split(',').map(Number)) {
  const r = await run(b)
  const cells = [String(r.batch).padStart(5), String(r.steps).padStart(6), r.usPerStep.toFixed(1).padStart(13)]
  console.log(`${cells.join(' ')} ${r.layoutUsPerStep.toFixed(1).padStart(26)}`)
}
