// Many prompts served together by continuous batching. Each completion is the same as it would
// be alone: the check below generates the first prompt on its own and compares bit for bit.
//   node examples/batch.mjs [model-dir]
import { defaultModelPath, loadModel } from 'detinfer'

const prompts = ['Once upon a time', 'The weather today', 'In a small village', 'My favourite food is', 'Long ago']
const model = await loadModel(process.argv[2] ?? defaultModelPath, { maxBatchSize: 8 })
try {
  const results = await model.generateBatch(prompts, { maxTokens: 24 })
  for (const [i, r] of results.entries()) console.log(`${i}: ${JSON.stringify(prompts[i] + r.text)}`)

  const alone = await model.generate(prompts[0], { maxTokens: 24 })
  const same = alone.tokens.join() === results[0].tokens.join() && alone.logprobs.every((lp, i) => Object.is(lp, results[0].logprobs[i]))
  console.log(`prompt 0 alone gives the same tokens and log-probs as in the batch: ${same}`)
} finally {
  await model.dispose()
}
