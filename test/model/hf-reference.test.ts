// Against Hugging Face transformers: the checkpoints under test/fixtures/hf (four tiny random
// ones, one per architecture, and the shipped default model) loaded by detinfer's loader give
// logits close to transformers' and the same greedy continuation wherever transformers' top-2
// margin is not a near-tie; the tokenizer gives the Python `tokenizers` library's ids and texts.
// The fixtures and the script that makes them: tools/make_fixtures.py (reference.json describes
// the layout).
import { existsSync, readFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { DeviceName } from '../../lib/native.js'
import { SafetensorsCheckpoint, SafetensorsFile, toBf16Bits } from '../../lib/model/safetensors.js'
import { Transformer } from '../../lib/model/transformer.js'
import { fromBf16, readF32 } from '../../lib/tensor.js'
import { Tokenizer } from '../../lib/tokenizer.js'
import { describeGpu } from '../helpers/gpu.js'
import type { TinyModel } from '../helpers/tiny-model.js'
import { referenceLogits } from './reference-transformer.js'

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')
const fixtures = join(repoRoot, 'test', 'fixtures', 'hf')
const MODELS = ['llama', 'qwen2', 'qwen3', 'mistral', 'default'].filter((m) => existsSync(join(fixtures, m, 'reference.json')))

// Tolerances. transformers ran the checkpoint in bf16 (eager attention) and returned bf16 logits;
// detinfer rounds the same intermediates to bf16 but sums in another order (and keeps fp32
// logits), so an occasional intermediate lands one bf16 step (2^-8 relative) apart and the
// difference travels through the layers. Each pipeline is 0.5-2% (relative, per logit row) from a
// float64 evaluation of the same weights (measured below), so two of them may differ by up to
// about sqrt(2) times that: we bound the relative (Frobenius) difference of each row by 3%, and
// separately its largest absolute difference by 0.15 of the row's standard deviation.
const LOGIT_REL = 0.03
const LOGIT_MAX_ABS_OF_STD = 0.15
// A top-2 margin below this (in logits) is a near-tie: transformers' bf16 logits are rounded to
// 2^-8 of their magnitude, and our error bound above allows differences of this order.
const NEAR_TIE = 0.125

interface PromptMeta {
  text: string
  num_tokens: number
  logits_positions: [number, number]
  greedy_len: number
  min_margin: number | null
}
interface ReferenceMeta {
  model: string
  architecture: string
  checkpoint: string
  vocab_size: number
  prompts: PromptMeta[]
}
interface Reference {
  meta: ReferenceMeta
  modelDir: string
  prompts: { ids: number[]; logits: Float32Array; logitsPos: number[]; greedy: number[]; margin: Float32Array }[]
}

async function readReference(name: string): Promise<Reference> {
  const dir = join(fixtures, name)
  const meta = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as ReferenceMeta
  const file = await SafetensorsFile.open(join(dir, 'reference.safetensors'))
  const read = async (key: string) => {
    const info = file.tensors.get(key)
    if (!info) throw new Error(`reference.safetensors of ${name} has no tensor ${key}`)
    const bytes = await file.read(info)
    const ab = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)
    if (info.dtype === 'I32') return new Int32Array(ab)
    if (info.dtype === 'F32') return new Float32Array(ab)
    throw new Error(`unexpected dtype ${info.dtype} of ${key}`)
  }
  try {
    const prompts = []
    for (let i = 0; i < meta.prompts.length; i++) {
      prompts.push({
        ids: Array.from(await read(`prompt${i}.ids`)),
        logits: (await read(`prompt${i}.logits`)) as Float32Array,
        logitsPos: Array.from(await read(`prompt${i}.logits_pos`)),
        greedy: Array.from(await read(`prompt${i}.greedy`)),
        margin: (await read(`prompt${i}.margin`)) as Float32Array,
      })
    }
    // The tiny checkpoints sit beside their reference; the default model's path is recorded.
    const own = existsSync(join(dir, 'config.json'))
    return { meta, modelDir: own ? dir : resolve(repoRoot, meta.checkpoint), prompts }
  } finally {
    await file.close()
  }
}

/** A checkpoint's config and weights (as the bf16 values detinfer loads) for the float64 reference. */
async function float64Model(dir: string): Promise<TinyModel> {
  const config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>
  const rope = config['rope_parameters'] as Record<string, unknown> | undefined
  if (config['rope_theta'] === undefined && rope) config['rope_theta'] = rope['rope_theta']
  if (config['rope_scaling'] === undefined && rope && rope['rope_type'] !== 'default') config['rope_scaling'] = rope
  const checkpoint = await SafetensorsCheckpoint.open(dir)
  const tensors = new Map<string, { shape: number[]; values: Float32Array }>()
  try {
    for (const info of checkpoint.tensors.values())
      tensors.set(info.name, { shape: info.shape, values: fromBf16(toBf16Bits(info, await checkpoint.read(info))) })
  } finally {
    await checkpoint.close()
  }
  if (config['tie_word_embeddings'] === true) tensors.delete('lm_head.weight')
  return { dir, config, tensors }
}

/** Greedy continuation of `ids`: prefill, then one token at a time, argmax (lowest id on ties). */
async function greedy(model: Transformer, ids: number[], steps: number): Promise<number[]> {
  const table = Array.from({ length: Math.ceil((ids.length + steps) / model.kvBlockSize) }, (_, i) => i)
  const out: number[] = []
  let chunk = { tokens: ids, startPosition: 0, blockTable: table, logits: 'last' as const }
  for (let s = 0; s < steps; s++) {
    const row = await readF32(model.forward([chunk]).logits)
    let best = 0
    for (let v = 1; v < row.length; v++) if (row[v]! > row[best]!) best = v
    out.push(best)
    chunk = { tokens: [best], startPosition: chunk.startPosition + chunk.tokens.length, blockTable: table, logits: 'last' }
  }
  return out
}

function logitErrors(ours: Float32Array, ref: Float32Array): { rel: number; maxAbsOfStd: number } {
  let num = 0
  let den = 0
  let maxAbs = 0
  let mean = 0
  for (let i = 0; i < ref.length; i++) mean += ref[i]! / ref.length
  let variance = 0
  for (let i = 0; i < ref.length; i++) {
    const d = ours[i]! - ref[i]!
    num += d * d
    den += ref[i]! * ref[i]!
    maxAbs = Math.max(maxAbs, Math.abs(d))
    variance += (ref[i]! - mean) ** 2 / ref.length
  }
  return { rel: Math.sqrt(num / den), maxAbsOfStd: maxAbs / Math.sqrt(variance) }
}

function referenceSuite(device: DeviceName): void {
  for (const name of MODELS) {
    describe(`${name}`, () => {
      let ref: Reference
      let model: Transformer

      beforeAll(async () => {
        ref = await readReference(name)
        const longest = Math.max(...ref.prompts.map((p) => p.ids.length + p.greedy.length))
        model = await Transformer.load(ref.modelDir, {
          device,
          maxBatchTokens: longest,
          kvBlocks: Math.ceil(longest / 16) + 1,
        })
      })
      afterAll(() => model?.dispose())

      it(`loads as ${name === 'default' ? 'the shipped default model' : 'its architecture'}`, () => {
        expect(model.config.architecture).toBe(ref.meta.architecture)
        expect(model.config.vocabSize).toBe(ref.meta.vocab_size)
      })

      it('prompt logits are close to transformers', async () => {
        const V = model.config.vocabSize
        for (const [i, p] of ref.prompts.entries()) {
          const table = Array.from({ length: Math.ceil(p.ids.length / 16) }, (_, b) => b)
          const ours = await readF32(model.forward([{ tokens: p.ids, startPosition: 0, blockTable: table, logits: 'all' }]).logits)
          let worstRel = 0
          let worstAbs = 0
          p.logitsPos.forEach((pos, r) => {
            const e = logitErrors(ours.subarray(pos * V, (pos + 1) * V), p.logits.subarray(r * V, (r + 1) * V))
            worstRel = Math.max(worstRel, e.rel)
            worstAbs = Math.max(worstAbs, e.maxAbsOfStd)
          })
          console.log(
            `${device} ${name} prompt${i} (${p.ids.length} tokens): worst relative error ${worstRel.toExponential(2)}, ` +
              `worst max |diff| / std ${worstAbs.toExponential(2)}`,
          )
          expect(worstRel).toBeLessThan(LOGIT_REL)
          expect(worstAbs).toBeLessThan(LOGIT_MAX_ABS_OF_STD)
        }
      })

      // FlashAttention's rule: against a float64 evaluation of the same weights, our error is at
      // most twice that of transformers' own bf16 forward pass (plus a floor for rows where
      // transformers happens to be almost exact).
      it('prompt logits are at most twice as far from float64 as transformers in bf16', async () => {
        const V = model.config.vocabSize
        const exact = await float64Model(ref.modelDir)
        for (const [i, p] of ref.prompts.entries()) {
          const f64 = referenceLogits(exact, p.ids)
          const table = Array.from({ length: Math.ceil(p.ids.length / 16) }, (_, b) => b)
          const ours = await readF32(model.forward([{ tokens: p.ids, startPosition: 0, blockTable: table, logits: 'all' }]).logits)
          let oursErr = 0
          let hfErr = 0
          p.logitsPos.forEach((pos, r) => {
            const truth = f64[pos]!
            const rel = (x: Float32Array) => {
              let num = 0
              let den = 0
              for (let v = 0; v < V; v++) {
                num += (x[v]! - truth[v]!) ** 2
                den += truth[v]! ** 2
              }
              return Math.sqrt(num / den)
            }
            oursErr = Math.max(oursErr, rel(ours.subarray(pos * V, (pos + 1) * V)))
            hfErr = Math.max(hfErr, rel(p.logits.subarray(r * V, (r + 1) * V)))
          })
          console.log(`${device} ${name} prompt${i}: worst relative error vs float64: detinfer ${oursErr.toExponential(2)}, transformers bf16 ${hfErr.toExponential(2)}`)
          expect(oursErr).toBeLessThan(2 * hfErr + 1e-3)
        }
      })

      it('greedy continuations equal transformers up to the first near-tie', async () => {
        for (const [i, p] of ref.prompts.entries()) {
          const ours = await greedy(model, p.ids, p.greedy.length)
          const first = ours.findIndex((t, s) => t !== p.greedy[s])
          if (first >= 0) {
            console.log(`${device} ${name} prompt${i}: diverges at step ${first} where transformers' top-2 margin is ${p.margin[first]}`)
            expect(p.margin[first]!, `prompt${i} step ${first}: ${ours[first]} vs ${p.greedy[first]}`).toBeLessThan(NEAR_TIE)
          }
          const ties = Array.from(p.margin).filter((m) => m < NEAR_TIE).length
          console.log(`${device} ${name} prompt${i}: ${first < 0 ? p.greedy.length : first}/${p.greedy.length} tokens equal (${ties} near-ties)`)
        }
      })
    })
  }
}

describe.skipIf(MODELS.length === 0)('transformers reference logits and greedy tokens (CPU)', () => {
  referenceSuite('cpu')
})

describeGpu('transformers reference logits and greedy tokens (CUDA)', () => {
  if (MODELS.length > 0) referenceSuite('cuda')
})

interface TokenizerCase {
  text: string
  ids: number[]
  ids_add_special: number[]
  decoded: string
  decoded_skip_special: string
}

const casesFile = join(fixtures, 'tokenizer-cases.json')
describe.skipIf(!existsSync(casesFile))('tokenizer against the Python tokenizers library', () => {
  it('gives the same ids and decoded texts for every case', async () => {
    const doc = JSON.parse(readFileSync(casesFile, 'utf8')) as { tokenizer: string; cases: TokenizerCase[] }
    const tokenizer = await Tokenizer.load(dirname(resolve(repoRoot, doc.tokenizer)))
    expect(doc.cases.length).toBeGreaterThan(10)
    for (const c of doc.cases) {
      const label = JSON.stringify(c.text)
      expect(tokenizer.encode(c.text, { addSpecialTokens: false }), `ids of ${label}`).toEqual(c.ids)
      expect(tokenizer.encode(c.text), `ids with special tokens of ${label}`).toEqual(c.ids_add_special)
      expect(tokenizer.decode(c.ids, { skipSpecialTokens: false }), `decode of ${label}`).toBe(c.decoded)
      expect(tokenizer.decode(c.ids, { skipSpecialTokens: true }), `decode without specials of ${label}`).toBe(c.decoded_skip_special)
    }
  })

  it('streams every case, one id at a time, to the same text without broken characters', async () => {
    const doc = JSON.parse(readFileSync(casesFile, 'utf8')) as { tokenizer: string; cases: TokenizerCase[] }
    const tokenizer = await Tokenizer.load(dirname(resolve(repoRoot, doc.tokenizer)))
    let held = 0
    for (const c of doc.cases) {
      const stream = tokenizer.streamDecoder({ skipSpecialTokens: false })
      const pieces = c.ids.map((id) => stream.push(id))
      held += pieces.filter((p) => p === '').length
      const text = pieces.join('') + stream.flush()
      expect(text, JSON.stringify(c.text)).toBe(c.decoded)
      if (!c.decoded.includes('\uFFFD')) expect(pieces.some((p) => p.includes('\uFFFD')), JSON.stringify(c.text)).toBe(false)
    }
    expect(held).toBeGreaterThan(0) // multi-byte characters split across tokens were held back
  })
})
