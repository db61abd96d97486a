// The captured decode step that bench/step-attribution.mjs and bench/step-stamps.mjs replay: B
// sequences of `keys` keys each decoding one token (at position keys - 1), in a cache of 16-key
// blocks that holds exactly them. Development measurement: it reads the model's captured graphs,
// which are not part of the API.
import { Transformer } from '../dist/model/transformer.js'

const BLOCK = 16 // KV cache block size
const blocksPerSequence = (keys) => Math.ceil(keys / BLOCK)

/** The random or given model at `dir` on CUDA with graphs, its cache sized for `maxBatch` sequences of `keys` keys. */
export function loadForSteps(dir, maxBatch, keys) {
  return Transformer.load(dir, {
    device: 'cuda',
    maxBatchTokens: 512,
    maxDecodeRows: Math.min(512, maxBatch),
    kvBlocks: maxBatch * blocksPerSequence(keys) + 8,
    kvBlockSize: BLOCK,
    cudaGraphs: true,
  })
}

/**
 * The plain capture (no logit processors) of the graph bucket of a decode step of B sequences
 * (greedy), captured by running the step three times: its `graph` replays the step.
 */
export async function capturedStep(model, B, keys) {
  const perSequence = blocksPerSequence(keys), position = keys - 1
  const chunks = [], choices = []
  for (let s = 0; s < B; s++) {
    const blockTable = Array.from({ length: perSequence }, (_, i) => s * perSequence + i)
    chunks.push({ tokens: [5 + s], startPosition: position, blockTable, logits: 'last' })
    choices.push({ temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position, target: -1 })
  }
  for (let i = 0; i < 3; i++) await model.step(chunks, choices, 0) // the third step replays the capture
  const bucket = [...model.graphs.buckets.values()].find((b) => b.rows === B && b.plain.graph)
  if (!bucket) throw new Error(`no graph was captured for batch ${B}`)
  return bucket.plain
}

/**
 * The kind of a product in the step by its weight's shape [N, K] (step-attribution's names): the
 * LM head, the q|k|v product, down_proj or o_proj; gate|up is a separate op, named by its caller.
 */
export function productKind(config, N, K) {
  if (N === config.vocabSize) return 'lm-head'
  if (N !== config.hiddenSize) return 'qkv'
  return K === config.intermediateSize ? 'down' : 'o-proj'
}
