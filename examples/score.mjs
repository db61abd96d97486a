// Score a completion: the log-probs equal, bit for bit, those reported while generating it.
//   node examples/score.mjs [model-dir]
import { defaultModelPath, loadModel } from 'detinfer'

const model = await loadModel(process.argv[2] ?? defaultModelPath)
try {
  const prompt = 'Once upon a time'
  const generated = await model.generate(prompt, { maxTokens: 16 })
  const scored = await model.score(prompt, generated.tokens)
  const total = scored.logprobs.reduce((a, b) => a + b, 0)
  console.log(`completion: ${JSON.stringify(generated.text)}`)
  console.log(`sum of log-probs: ${total.toFixed(4)} over ${scored.tokens.length} tokens`)
  const equal = scored.logprobs.every((lp, i) => Object.is(lp, generated.logprobs[i]))
  console.log(`scored log-probs equal the generated ones bit for bit: ${equal}`)

  // Any text can be scored; here a completion the model did not write.
  const other = await model.score(prompt, ' there was a dragon')
  console.log(`" there was a dragon": ${other.logprobs.map((x) => x.toFixed(2)).join(' ')}`)
} finally {
  await model.dispose()
}
