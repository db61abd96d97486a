// Structured output: a completion held to JSON that a JSON Schema accepts, greedy and sampled, and
// the same completion again beside other requests.
//   node examples/structured.mjs [model-dir]
import { defaultModelPath, loadModel } from 'detinfer'

const schema = {
  type: 'object',
  properties: { mood: { enum: ['merry', 'sad', 'angry'] }, loud: { type: 'boolean' } },
  required: ['mood', 'loud'],
  additionalProperties: false,
}
const responseFormat = { type: 'json_schema', schema }

const model = await loadModel(process.argv[2] ?? defaultModelPath, { device: 'auto' })
try {
  const prompt = 'ROMEO: How fares my lady?'
  const greedy = await model.generate(prompt, { maxTokens: 40, responseFormat })
  console.log(`greedy (${model.device}): ${greedy.text} (finish: ${greedy.finishReason})`)
  console.log('  parsed:', JSON.parse(greedy.text))

  const sampled = await model.generate(prompt, { maxTokens: 40, responseFormat, temperature: 1, seed: 7 })
  console.log(`sampled (seed 7): ${sampled.text}`)

  // The same request beside free-text requests gives the same tokens and log-probs.
  const [again] = await Promise.all([
    model.generate(prompt, { maxTokens: 40, responseFormat, temperature: 1, seed: 7 }),
    model.generate('JULIET: Wherefore art thou', { maxTokens: 24 }),
    model.generate('KING:', { maxTokens: 24, temperature: 0.8, seed: 1 }),
  ])
  const same = again.tokens.join() === sampled.tokens.join() && again.logprobs.every((l, i) => Object.is(l, sampled.logprobs[i]))
  console.log(`the sampled request beside others gives the same tokens and log-probs: ${same}`)
} finally {
  await model.dispose()
}
