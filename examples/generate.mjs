// Greedy completion of one prompt, then a seeded sample: run both twice, get the same text twice.
//   node examples/generate.mjs [model-dir]
import { defaultModelPath, loadModel } from 'detinfer'

const model = await loadModel(process.argv[2] ?? defaultModelPath, { device: 'auto' })
try {
  const greedy = await model.generate('Once upon a time', { maxTokens: 32 })
  console.log(`greedy (${model.device}): ${JSON.stringify(greedy.text)}`)
  console.log(`  ${greedy.tokens.length} tokens, finish: ${greedy.finishReason}, ` +
    `decode ${greedy.timings.decodeTokensPerSecond.toFixed(1)} tokens/s`)

  const sampled = await model.generate('Once upon a time', { maxTokens: 32, temperature: 0.8, topP: 0.95, seed: 42 })
  console.log(`sampled (seed 42): ${JSON.stringify(sampled.text)}`)
} finally {
  await model.dispose()
}
