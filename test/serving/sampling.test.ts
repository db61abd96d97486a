// Seeded Gumbel-max sampling through the output head (CPU backend): draws follow
// softmax(logits / temperature) over the kept set, the noise is a pure function of (seed,
// position, token), and top-k / top-p / min-p keep the tokens of the plain definition.
import { describe, expect, it } from 'vitest'
import { chooseOnLogits, type TokenChoice } from '../../lib/model/output-head.js'
import { tensorFrom } from '../../lib/tensor.js'
import { randomNormal } from '../helpers/random.js'
import { noiseUniform, referenceChoice, type SamplingParams } from '../helpers/sampling-reference.js'

/** One draw per position 0..draws-1 of the same row, in one launch. */
async function draws(row: Float32Array, count: number, p: SamplingParams): Promise<Int32Array> {
  const x = new Float32Array(count * row.length)
  for (let i = 0; i < count; i++) x.set(row, i * row.length)
  const choices: TokenChoice[] = Array.from({ length: count }, (_, position) => ({ ...p, position, target: -1 }))
  const logits = tensorFrom('cpu', 'f32', [count, row.length], x)
  try {
    return (await chooseOnLogits(logits, choices, 0)).ids
  } finally {
    logits.dispose()
  }
}

function softmax(logits: Float32Array, t: number, keep: (v: number) => boolean): Float64Array {
  const p = new Float64Array(logits.length)
  let max = -Infinity
  for (let v = 0; v < logits.length; v++) if (keep(v)) max = Math.max(max, logits[v]! / t)
  let total = 0
  for (let v = 0; v < logits.length; v++) if (keep(v)) total += p[v] = Math.exp(logits[v]! / t - max)
  return p.map((x) => x / total)
}

function chiSquare(counts: Float64Array, p: Float64Array, n: number): number {
  let chi2 = 0
  for (let v = 0; v < p.length; v++) if (p[v]! * n >= 5) chi2 += (counts[v]! - p[v]! * n) ** 2 / (p[v]! * n)
  return chi2
}

describe('seeded sampling', () => {
  const logits = randomNormal(12, 5, 1.5)

  it('draws tokens with the softmax probabilities at the temperature (chi-square)', async () => {
    for (const temperature of [0.5, 1, 2]) {
      const n = 40_000
      const ids = await draws(logits, n, { temperature, topK: 0, topP: 1, minP: 0, seed: 77 })
      const counts = new Float64Array(logits.length)
      for (const id of ids) counts[id]! += 1
      // 11 degrees of freedom: the 0.999 quantile is 31.3.
      expect(chiSquare(counts, softmax(logits, temperature, () => true), n)).toBeLessThan(31.3)
    }
  })

  it('noise depends on seed, position and token id alone, and is uniform in (0, 1)', () => {
    const a = noiseUniform(1, 2, 3)
    expect(noiseUniform(1, 2, 3)).toBe(a)
    expect(noiseUniform(2, 2, 3)).not.toBe(a)
    expect(noiseUniform(1, 3, 3)).not.toBe(a)
    expect(noiseUniform(1, 2, 4)).not.toBe(a)
    let sum = 0
    let min = 1
    let max = 0
    for (let i = 0; i < 100_000; i++) {
      const u = noiseUniform(9, i, i % 7)
      sum += u
      min = Math.min(min, u)
      max = Math.max(max, u)
    }
    expect(min).toBeGreaterThan(0)
    expect(max).toBeLessThan(1)
    expect(Math.abs(sum / 100_000 - 0.5)).toBeLessThan(0.005)
  })

  it('top-k, top-p and min-p draw exactly the kept set, with the kept probabilities', async () => {
    const cases: SamplingParams[] = [
      { temperature: 1, topK: 3, topP: 1, minP: 0, seed: 1 },
      { temperature: 1, topK: 0, topP: 0.6, minP: 0, seed: 2 },
      { temperature: 0.7, topK: 6, topP: 0.8, minP: 0, seed: 3 },
      { temperature: 1.3, topK: 0, topP: 1, minP: 0.2, seed: 4 },
    ]
    for (const p of cases) {
      const n = 20_000
      const kept = new Set(referenceChoice(logits, 0, p).kept)
      const ids = await draws(logits, n, p)
      const counts = new Float64Array(logits.length)
      for (const id of ids) counts[id]! += 1
      expect(new Set(Array.from(ids)), JSON.stringify(p)).toEqual(kept)
      // k - 1 degrees of freedom, k <= 12: 31.3 bounds the 0.999 quantile.
      expect(chiSquare(counts, softmax(logits, p.temperature, (v) => kept.has(v)), n), JSON.stringify(p)).toBeLessThan(31.3)
    }
  })

  it('top-k keeps the k largest logits, lowest id first on ties', () => {
    const tied = Float32Array.from([1, 3, 2, 3, 0.5])
    expect(Array.from(referenceChoice(tied, 0, { temperature: 1, topK: 3, topP: 1, minP: 0, seed: 0 }).kept)).toEqual([1, 3, 2])
  })

  it('with top-k 1 always draws the argmax', async () => {
    const best = logits.indexOf(Math.max(...logits))
    const ids = await draws(logits, 200, { temperature: 5, topK: 1, topP: 1, minP: 0, seed: 9 })
    expect(new Set(ids)).toEqual(new Set([best]))
  })
})
