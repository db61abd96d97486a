// Print a completion as it is generated.
//   node examples/stream.mjs [model-dir]
import { defaultModelPath, loadModel } from 'detinfer'

const model = await loadModel(process.argv[2] ?? defaultModelPath)
try {
  for await (const piece of model.stream('The capital of France is', { maxTokens: 48, stop: '\n\n' }))
    process.stdout.write(piece.text)
  process.stdout.write('\n')
} finally {
  await model.dispose()
}
