// Child process of fuzz.test.ts: loads each model directory it is sent through the public API (the
// built dist/), generates a few tokens (plainly and through the chat template), and reports what
// happened. It runs apart from the test so that a crash or a hang of one case is seen as such.
import { loadModel } from '../../dist/index.js'

/** An error as the parent judges it: its class, message, and whether it is an Error at all. */
function describe(err) {
  return { isError: err instanceof Error, name: err?.name ?? typeof err, message: String(err?.message ?? err) }
}

async function generateAll(model) {
  const runs = []
  for (const [prompt, options] of [
    ['ROMEO:', { maxTokens: 3 }],
    ['hi', { maxTokens: 2, chat: true }],
  ]) {
    try {
      const r = await model.generate(prompt, options)
      runs.push({ tokens: r.tokens, logprobs: r.logprobs })
    } catch (err) {
      runs.push({ error: describe(err) })
    }
  }
  return runs
}

process.on('message', async ({ id, dir }) => {
  let reply
  try {
    const model = await loadModel(dir, { device: 'cpu', maxBatchSize: 2, kvCacheTokens: 256 })
    try {
      reply = { id, loaded: true, vocabSize: model.vocabSize, runs: await generateAll(model) }
    } finally {
      await model.dispose()
    }
  } catch (err) {
    reply = { id, loaded: false, error: describe(err) }
  }
  process.send(reply)
})
process.send({ ready: true })
