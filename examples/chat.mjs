// A conversation as the prompt (rendered by the model's chat template), streamed, with a time
// limit: the AbortSignal takes the request out of the batch when it fires.
//   node examples/chat.mjs [model-dir]
import { defaultModelPath, loadModel } from 'detinfer'

const model = await loadModel(process.argv[2] ?? defaultModelPath)
const conversation = [
  { role: 'system', content: 'You are a player in a Shakespeare play.' },
  { role: 'user', content: 'Who goes there?' },
]
try {
  for await (const piece of model.stream(conversation, { maxTokens: 48, signal: AbortSignal.timeout(10_000) }))
    process.stdout.write(piece.text)
  process.stdout.write('\n')
} catch (err) {
  if (err?.name !== 'TimeoutError') throw err
  process.stdout.write('\n(stopped after 10 s)\n')
} finally {
  await model.dispose()
}
