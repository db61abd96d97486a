// The output head's token choice (chooseTokens): greedy, seeded sampling with top-k / top-p /
// min-p, scored targets and top-N log-probs, at a 151,936-token vocabulary. Reference tests
// against the plain definition (test/helpers/sampling-reference.ts), bitwise invariance of each
// row alone and among 1, 7 and 255 others with other parameters, the variant twin, and non-finite
// rows. The same suite runs on the CPU backend and on CUDA.
import { describe, expect, it } from 'vitest'
import { chooseOnLogits, type StepTokens, type TokenChoice } from '../../lib/model/output-head.js'
import { native, type DeviceName } from '../../lib/native.js'
import { tensorFrom } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { mulberry32, randomNormal } from '../helpers/random.js'
import { firstDifference } from '../helpers/compare.js'
import { noiseUniform, referenceChoice, seedWithLargestNoise, sortedIds } from '../helpers/sampling-reference.js'
import { expectClose, expectSameBits, refLogsumexp, withVariant } from './reference.js'

const V_QWEN = 151936

async function choose(device: DeviceName, x: Float32Array, V: number, choices: TokenChoice[], topN: number): Promise<StepTokens> {
  const logits = tensorFrom(device, 'f32', [choices.length, V], x)
  try {
    return await chooseOnLogits(logits, choices, topN)
  } finally {
    logits.dispose()
  }
}

/** Rows of several shapes: peaked, flat, with exact ties for the best logit and -infinity entries. */
function logitRows(rows: number, V: number, seed: number): Float32Array {
  const x = new Float32Array(rows * V)
  for (let r = 0; r < rows; r++) {
    const std = [3, 1, 0.3, 6][r % 4]!
    const row = randomNormal(V, seed + r, std)
    if (r % 5 === 1) {
      const best = row.indexOf(Math.max(...row.subarray(0, 4096)))
      row[V - 7] = row[best]! // a tie with the best of the first ids
      row[3] = row[best]!
    }
    if (r % 6 === 2) for (let v = 10; v < V; v += 97) row[v] = -Infinity
    x.set(row, r * V)
  }
  return x
}

function randomChoices(rows: number, seed: number, V: number): TokenChoice[] {
  const rand = mulberry32(seed)
  const pick = <T,>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!
  return Array.from({ length: rows }, (_, r) => {
    const position = Math.floor(rand() * 4000)
    const topLogprobs = 20
    if (r % 7 === 3) return { temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position, target: Math.floor(rand() * V), topLogprobs }
    if (r % 7 === 5) return { temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position, target: -1, topLogprobs }
    return {
      topLogprobs,
      temperature: pick([0.3, 0.7, 1, 1.6]),
      topK: pick([0, 0, 1, 5, 50, 1000]),
      topP: pick([1, 0.95, 0.9, 0.5]),
      minP: pick([0, 0, 0.05]),
      seed: Math.floor(rand() * 2 ** 32),
      position,
      target: -1,
    }
  })
}

function rowOf(out: StepTokens, r: number) {
  return {
    id: out.ids[r]!,
    logprob: out.logprobs.subarray(r, r + 1),
    topIds: out.topIds.subarray(r * out.topN, (r + 1) * out.topN),
    topLogprobs: out.topLogprobs.subarray(r * out.topN, (r + 1) * out.topN),
  }
}

function suite(device: DeviceName) {
  it('chooses what the plain definition chooses, at V = 151936 and V = 1000', async () => {
    for (const V of [1000, V_QWEN]) {
      const rows = V === V_QWEN ? 28 : 140
      const x = logitRows(rows, V, V)
      const choices = randomChoices(rows, V + 1, V)
      const topN = 7
      const out = await choose(device, x, V, choices, topN)
      const lse = refLogsumexp(x, rows, V)
      let sampled = 0
      let checked = 0
      for (let r = 0; r < rows; r++) {
        const row = x.subarray(r * V, (r + 1) * V)
        const c = choices[r]!
        const got = rowOf(out, r)
        const order = sortedIds(row)
        if (c.target >= 0) expect(got.id).toBe(c.target)
        else if (c.temperature === 0) expect(got.id).toBe(order[0])
        else {
          sampled++
          const ref = referenceChoice(row, c.position, c)
          // The native op draws float32 noise; the reference float64. They may differ only where
          // the reference's own decision is a near tie.
          if (ref.scoreMargin > 1e-3 && ref.massMargin > 1e-6) {
            checked++
            expect(got.id, `row ${r} ${JSON.stringify(c)}`).toBe(ref.token)
          } else if (ref.massMargin > 1e-6) {
            expect(ref.kept, `row ${r}`).toContain(got.id)
          }
        }
        expectClose([got.logprob[0]!], [row[got.id]! - lse[r]!], 1e-5, 1e-4, `log-prob of row ${r}`)
        expect(Array.from(got.topIds), `top ids of row ${r}`).toEqual(Array.from(order.subarray(0, topN)))
        expectClose(got.topLogprobs, Array.from(got.topIds, (v) => row[v]! - lse[r]!), 1e-5, 1e-4, `top log-probs of row ${r}`)
      }
      expect(checked).toBeGreaterThanOrEqual(Math.floor(sampled * 0.8))
    }
  })

  // 256 rows: the CUDA bins kernel then takes 4 slices per block, against 1 for the few rows below.
  it('rows are bit-identical alone and among 1, 7 and 255 others with other parameters', async () => {
    const V = V_QWEN
    const rows = 256
    const x = logitRows(rows, V, 5)
    const choices = randomChoices(rows, 6, V)
    const full = await choose(device, x, V, choices, 20)
    const probes = [0, 1, 2, 4, 6, 9, 33, 63, 130, 255]
    for (const r of probes) {
      for (const count of [1, 2, 8]) {
        // Row r first, then `count - 1` others taken from the far end, with other parameters.
        const others = Array.from({ length: count - 1 }, (_, i) => (r + 17 + 11 * i) % rows)
        const pick = [r, ...others]
        const xs = new Float32Array(count * V)
        pick.forEach((p, i) => xs.set(x.subarray(p * V, (p + 1) * V), i * V))
        const topN = count === 1 ? 5 : 20
        const part = await choose(device, xs, V, pick.map((p) => choices[p]!), topN)
        const a = rowOf(part, 0)
        const b = rowOf(full, r)
        expect(a.id, `row ${r} among ${count}`).toBe(b.id)
        expectSameBits(a.logprob, b.logprob, `log-prob of row ${r} among ${count}`)
        expectSameBits(a.topIds, b.topIds.subarray(0, topN), `top ids of row ${r} among ${count}`)
        expectSameBits(a.topLogprobs, b.topLogprobs.subarray(0, topN), `top log-probs of row ${r} among ${count}`)
      }
    }
  })

  it('variant twin: with rows split for small batches, some rows differ alone', async () => {
    const V = V_QWEN
    const rows = 16
    // Narrow rows (std 0.3) with one logit at 12: the other 151,935 add up to about as much as
    // that one, so the sum is near 2 and log(sum) near 0.7, whose last bit follows the sum's. On
    // spread rows the last bit of a logsumexp near 12 moves only now and then.
    const x = new Float32Array(rows * V)
    for (let r = 0; r < rows; r++) {
      const row = randomNormal(V, 9 + r, 0.3)
      row[(r * 7919) % V] = 12
      x.set(row, r * V)
    }
    const choices = randomChoices(rows, 10, V)
    const differing = async () => {
      let differ = 0
      const full = await choose(device, x, V, choices, 0)
      for (let r = 0; r < rows; r++) {
        const alone = await choose(device, x.subarray(r * V, (r + 1) * V), V, [choices[r]!], 0)
        if (alone.ids[0] !== full.ids[r] || firstDifference(alone.logprobs.subarray(0, 1), full.logprobs.subarray(r, r + 1)) >= 0) differ++
      }
      return differ
    }
    // The same rows and the same check: none differs with the invariant kernel, some with the variant.
    expect(await differing()).toBe(0)
    expect(await withVariant(differing)).toBeGreaterThan(0)
  })

  it('a row that asks for fewer top log-probs than the launch holds gets -1 and NaN in the rest', async () => {
    const V = 3000
    const x = logitRows(2, V, 41)
    const choices = randomChoices(2, 42, V).map((c, r) => ({ ...c, topLogprobs: r === 0 ? 2 : 0 }))
    const out = await choose(device, x, V, choices, 4)
    const order = sortedIds(x.subarray(0, V))
    expect(Array.from(rowOf(out, 0).topIds)).toEqual([order[0], order[1], -1, -1])
    expect(Array.from(rowOf(out, 1).topIds)).toEqual([-1, -1, -1, -1])
    expect(Array.from(rowOf(out, 1).topLogprobs).every(Number.isNaN)).toBe(true)
  })

  it('a token outside the kept set is never chosen, even with the largest noise there is', async () => {
    // For each row, the seed that gives one token just past the cut a noise hash of all ones
    // (noise 16.6, so it would win if it were looked at): found by inverting the hash.
    const V = V_QWEN
    const cases = [
      { temperature: 0.7, topK: 5, topP: 1 },
      { temperature: 0.7, topK: 0, topP: 0.5 },
      { temperature: 1, topK: 50, topP: 0.9 },
    ]
    const x = new Float32Array(cases.length * V)
    const choices: TokenChoice[] = []
    const outsiders: number[] = []
    for (const [r, c] of cases.entries()) {
      const row = randomNormal(V, 300 + r, 1)
      x.set(row, r * V)
      const position = 77 + r
      const base = { temperature: c.temperature, topK: c.topK, topP: c.topP, minP: 0, seed: 0, position, target: -1, topLogprobs: 0 }
      const kept = referenceChoice(row, position, base).kept.length
      const v = sortedIds(row)[kept + 3]!
      const seed = seedWithLargestNoise(position, v)
      expect(noiseUniform(seed, position, v)).toBe(1 - 2 ** -24)
      choices.push({ ...base, seed })
      outsiders.push(v)
    }
    const out = await choose(device, x, V, choices, 0)
    for (let r = 0; r < cases.length; r++) {
      const ref = referenceChoice(x.subarray(r * V, (r + 1) * V), choices[r]!.position, choices[r]!)
      expect(out.ids[r], `row ${r}`).not.toBe(outsiders[r])
      expect(Array.from(ref.kept), `row ${r}`).toContain(out.ids[r])
    }
  })

  it('min-p 1 keeps only the most likely token', async () => {
    const V = V_QWEN
    const temperatures = [0.3, 0.7, 1, 1.6]
    const x = new Float32Array(temperatures.length * V)
    for (let r = 0; r < temperatures.length; r++) x.set(randomNormal(V, 500 + r, 2), r * V)
    const choices: TokenChoice[] = temperatures.map((temperature, r) => ({
      temperature, topK: 0, topP: r % 2 ? 0.9 : 1, minP: 1, seed: 1000 + r, position: 5, target: -1, topLogprobs: 0,
    }))
    const out = await choose(device, x, V, choices, 0)
    for (let r = 0; r < temperatures.length; r++) expect(out.ids[r], `row ${r}`).toBe(sortedIds(x.subarray(r * V, (r + 1) * V))[0])
  })

  it('a row with NaN or infinity gives id -1 and leaves the other rows alone', async () => {
    const V = 5000
    const rows = 5
    const x = logitRows(rows, V, 21)
    const choices = randomChoices(rows, 22, V)
    const clean = await choose(device, x, V, choices, 3)
    const bad = Float32Array.from(x)
    bad[1 * V + 17] = NaN
    bad[2 * V + 4000] = Infinity
    bad.fill(-Infinity, 3 * V, 4 * V)
    const out = await choose(device, bad, V, choices, 3)
    for (const r of [1, 2, 3]) {
      expect(out.ids[r]).toBe(-1)
      expect(out.logprobs[r]).toBeNaN()
      expect(Array.from(rowOf(out, r).topIds)).toEqual([-1, -1, -1])
    }
    for (const r of [0, 4]) {
      expect(out.ids[r]).toBe(clean.ids[r])
      expectSameBits(rowOf(out, r).logprob, rowOf(clean, r).logprob, `row ${r}`)
    }
  })
}

describe('chooseTokens on the CPU backend', () => suite('cpu'))

describeGpu('chooseTokens on CUDA', () => {
  suite('cuda')

  it('agrees with the CPU backend on greedy ids, targets and top ids', async () => {
    const V = V_QWEN
    const rows = 32
    const x = logitRows(rows, V, 31)
    const choices = randomChoices(rows, 32, V).map((c) => ({ ...c, temperature: 0 }))
    const [gpu, cpu] = await Promise.all([choose('cuda', x, V, choices, 20), choose('cpu', x, V, choices, 20)])
    expect(Array.from(gpu.ids)).toEqual(Array.from(cpu.ids))
    expect(Array.from(gpu.topIds)).toEqual(Array.from(cpu.topIds))
    expectClose(gpu.logprobs, cpu.logprobs, 1e-5, 1e-5, 'log-probs')
  })
})

describe('chooseTokens arguments', () => {
  it('refuses outputs of the wrong width and params of the wrong shape', () => {
    const n = native()
    const x = tensorFrom('cpu', 'f32', [2, 10], new Float32Array(20).fill(1))
    const params = n.empty('cpu', 'i32', [2, 8])
    expect(() => n.chooseTokens(n.empty('cpu', 'i32', [2, 3]), x, params)).toThrow(/2 \+ 2N columns/)
    expect(() => n.chooseTokens(n.empty('cpu', 'i32', [2, 44]), x, params)).toThrow(/N between 0 and 20/)
    expect(() => n.chooseTokens(n.empty('cpu', 'i32', [2, 2]), x, n.empty('cpu', 'i32', [2, 7]))).toThrow(/params/)
  })
})
