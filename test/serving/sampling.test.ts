// Seeded Gumbel-max sampling: draws follow softmax(logits / temperature) over the kept set, the
// noise is a pure function of (seed, position, token), and top-k / top-p keep the right tokens.
import { describe, expect, it } from 'vitest'
import { gumbelNoise, keptTokens, noiseUniform, sampleToken, type SamplingParams } from '../../lib/sampling.js'
import { randomNormal } from '../helpers/random.js'

function softmax(logits: Float32Array, t: number, keep: (v: number) => boolean): Float64Array {
  const p = new Float64Array(logits.length)
  let max = -Infinity
  for (let v = 0; v < logits.length; v++) if (keep(v)) max = Math.max(max, logits[v]! / t)
  let total = 0
  for (let v = 0; v < logits.length; v++) if (keep(v)) total += p[v] = Math.exp(logits[v]! / t - max)
  return p.map((x) => x / total)
}

/**
 * The kept tokens by the plain definition: a full sort by descending logit (lowest id first on
 * ties), the first top-k, then the prefix whose probability (normalized over the candidates summed
 * in id order, walked in sorted order) reaches top-p.
 */
function plainKept(row: Float32Array, p: SamplingParams): number[] {
  let order = Array.from({ length: row.length }, (_, i) => i).sort((a, b) => row[b]! - row[a]! || a - b)
  if (p.topK > 0) order = order.slice(0, p.topK)
  if (p.topP >= 1) return order
  const byId = [...order].sort((a, b) => a - b)
  const max = Math.max(...byId.map((v) => row[v]! / p.temperature))
  let total = 0
  for (const v of byId) total += Math.exp(row[v]! / p.temperature - max)
  let c = 0
  let n = 0
  while (n < order.length) {
    c += Math.exp(row[order[n]!]! / p.temperature - max) / total
    n++
    if (c >= p.topP) break
  }
  return order.slice(0, n)
}

describe('seeded sampling', () => {
  const logits = randomNormal(12, 5, 1.5)

  it('draws tokens with the softmax probabilities at the temperature (chi-square)', () => {
    for (const temperature of [0.5, 1, 2]) {
      const params = { temperature, topK: 0, topP: 1, seed: 77 }
      const draws = 40_000
      const counts = new Float64Array(logits.length)
      for (let pos = 0; pos < draws; pos++) counts[sampleToken(logits, pos, params)]! += 1
      const p = softmax(logits, temperature, () => true)
      let chi2 = 0
      for (let v = 0; v < logits.length; v++) if (p[v]! * draws >= 5) chi2 += (counts[v]! - p[v]! * draws) ** 2 / (p[v]! * draws)
      // 11 degrees of freedom: the 0.999 quantile is 31.3.
      expect(chi2).toBeLessThan(31.3)
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

  it('top-k keeps the k largest logits, lowest id first on ties', () => {
    const tied = Float32Array.from([1, 3, 2, 3, 0.5])
    expect(Array.from(keptTokens(tied, { temperature: 1, topK: 3, topP: 1, seed: 0 })!)).toEqual([1, 3, 2])
  })

  it('top-p keeps the smallest prefix reaching p, and never draws outside it', () => {
    const params = { temperature: 1, topK: 0, topP: 0.6, seed: 3 }
    const kept = Array.from(keptTokens(logits, params)!)
    const p = softmax(logits, 1, () => true)
    const order = Array.from(p.keys()).sort((a, b) => p[b]! - p[a]! || a - b)
    let n = 0
    let c = 0
    while (c < 0.6) c += p[order[n++]!]!
    expect(kept).toEqual(order.slice(0, n))
    const seen = new Set<number>()
    for (let pos = 0; pos < 5000; pos++) seen.add(sampleToken(logits, pos, params))
    expect([...seen].sort((a, b) => a - b)).toEqual([...kept].sort((a, b) => a - b))
  })

  it('with top-k 1 always draws the argmax', () => {
    let best = 0
    for (let v = 1; v < logits.length; v++) if (logits[v]! > logits[best]!) best = v
    for (let pos = 0; pos < 200; pos++) expect(sampleToken(logits, pos, { temperature: 5, topK: 1, topP: 1, seed: pos })).toBe(best)
  })

  // The shortcuts (quickselect for top-k, sorting only above a cut for top-p, skipping noise that
  // cannot win) must pick exactly what the plain definition picks.
  it('picks exactly what a full sort and a full Gumbel-max pick, on a large vocabulary', () => {
    const vocab = 20_000
    const row = randomNormal(vocab, 31, 2.5)
    const top = row.indexOf(Math.max(...row))
    row[17] = row[top]! // a tie for the most likely token
    const reference = (p: SamplingParams): number => {
      let best = -1
      let bestScore = -Infinity
      for (const v of plainKept(row, p)) {
        const s = row[v]! / p.temperature + gumbelNoise(p.seed, p.temperature * 1000, v)
        if (s > bestScore || (s === bestScore && v < best)) [best, bestScore] = [v, s]
      }
      return best
    }
    let differentFromArgmax = 0
    for (const temperature of [0.3, 1, 3])
      for (const topK of [0, 1, 7, 500])
        for (const topP of [1, 0.95, 0.5, 0.05]) {
          const params = { temperature, topK, topP, seed: 11 + topK }
          const got = sampleToken(row, temperature * 1000, params)
          expect(got, JSON.stringify(params)).toBe(reference(params))
          if (got !== 17) differentFromArgmax++
        }
    expect(differentFromArgmax).toBeGreaterThan(10)
  })

  // The kept set itself, in order, against the plain definition: flat and peaked rows, exact ties
  // and a signed zero.
  it('keeps exactly the tokens of the plain definition, in order', () => {
    const vocab = 30_000
    const flat = Float32Array.from(randomNormal(vocab, 5, 1), (x) => Math.fround(x / 4))
    const peaked = randomNormal(vocab, 6, 3)
    for (const row of [flat, peaked]) {
      row[100] = row[200]! // an exact tie
      row[300] = 0
      row[301] = -0
      for (const temperature of [0.5, 1.3])
        for (const topK of [0, 40, 5000])
          for (const topP of [0.999, 0.9, 0.3]) {
            const params = { temperature, topK, topP, seed: 1 }
            const kept = keptTokens(row, params)
            expect(Array.from(kept ?? []), JSON.stringify(params)).toEqual(plainKept(row, params))
          }
    }
  })
})
