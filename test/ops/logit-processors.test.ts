// Logit processors (frequency and presence penalties, logit bias) at a 151,936-token vocabulary:
// the processed logits against the float32 reference of csrc/common/logit_processors.h's order,
// bit for bit; the output head's choice on them (greedy: the reference's argmax; sampled: the
// plain choice on the reference's logits) with the raw log-probs (those of scoring the chosen
// token), in launches that mix rows with and without processors; each processed row alone and
// among others, bit for bit, with its variant twin; and the counts: zeroed when a sequence takes
// its row, one more per choice, saturating. Token masks (grammar-constrained rows): the forbidden
// tokens at -Infinity after the penalties and biases, the allowed ones' values untouched, the
// choice always an allowed token, and a masked row's bits independent of the rest of the launch.
// The same suite runs on the CPU backend and on CUDA.
import { describe, expect, it } from 'vitest'
import { maskWords, packSettings } from '../../lib/model/logit-processors.js'
import { OutputHead, chooseOnLogits, packChoices, type StepTokens, type TokenChoice } from '../../lib/model/output-head.js'
import { native, type DeviceName, type NativeTensor } from '../../lib/native.js'
import { readBytes, readF32, readI32, tensorFrom } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { concatRows, mulberry32, randomNormal } from '../helpers/random.js'
import { firstDifference } from '../helpers/compare.js'
import { argmaxLowest, countedWord, IN_PROMPT, processedRow, referenceChoice, tokenAllowed, type ProcessorSettings } from '../helpers/sampling-reference.js'
import { expectClose, expectSameBits, refLogsumexp, withVariant } from './reference.js'

const V_QWEN = 151936
const SETTINGS = 604 // processors::kSettings
const PLAN_FIELDS = 4 // processors::kPlanFields

/** Logits rows of several spreads (none exactly zero), from seeds no other test uses. */
function logitRows(rows: number, V: number, seed: number): Float32Array {
  const x = new Float32Array(rows * V)
  for (let r = 0; r < rows; r++) x.set(randomNormal(V, seed + 7 * r, [2, 1, 0.5, 4][r % 4]!), r * V)
  return x
}

/**
 * The words of a row as a completion leaves them: most tokens never chosen, some chosen a few
 * times, some in the prompt (bit 15), chosen or not, and a few at 20,000, 32,766 and 32,767 (the
 * saturation), with and without the prompt bit.
 */
function countsRow(V: number, seed: number): Uint16Array {
  const rand = mulberry32(seed)
  const c = new Uint16Array(V)
  for (let v = 0; v < V; v++) {
    const u = rand()
    const count = u < 0.7 ? 0 : u < 0.98 ? 1 + Math.floor(rand() * 6) : Math.floor(rand() * 200)
    c[v] = count | (rand() < 0.1 ? IN_PROMPT : 0)
  }
  for (const [v, n] of [[3, 20000], [V - 1, 32767], [8191, 32766 | IN_PROMPT], [8192, 32767 | IN_PROMPT], [5, IN_PROMPT]] as const) c[v] = n
  return c
}

/** Penalties and up to `biases` biases (distinct ids, some on slice and block edges), from a seed. */
function settings(seed: number, V: number, frequencyPenalty: number, presencePenalty: number, biases: number, repetitionPenalty = 1): ProcessorSettings {
  const rand = mulberry32(seed)
  const ids = new Set<number>([0, V - 1, 2047, 2048, 8191, 8192].slice(0, biases))
  while (ids.size < biases) ids.add(Math.floor(rand() * V))
  const logitBias = [...ids].map((id) => [id, Math.fround((rand() * 2 - 1) * (rand() < 0.2 ? 100 : 7.3))] as const)
  return { frequencyPenalty, presencePenalty, repetitionPenalty, logitBias }
}

/** The settings of a table; the first rows as the suite uses them. */
function tableSettings(V: number, rows: number, seed: number): ProcessorSettings[] {
  const base = [
    settings(seed, V, 0.5, 0.25, 3),
    settings(seed + 1, V, -1.3, 2, 300), // the most biases there may be
    settings(seed + 2, V, 0, -0.7, 0),
    settings(seed + 3, V, 2, -2, 10),
    settings(seed + 4, V, 0, 0, 40, 1.3), // biases, and a repetition penalty
    settings(seed + 5, V, 0.1, 1.7, 1, 0.7),
    settings(seed + 6, V, 0, 0, 0, 2), // a repetition penalty alone
  ]
  return Array.from({ length: rows }, (_, k) => base[k % base.length]!)
}

/** Sets whether `mask` allows token v (bit v & 31 of word v >> 5). */
function setAllowed(mask: Int32Array, v: number, allowed: boolean): void {
  const bit = 1 << (v & 31)
  mask[v >>> 5] = allowed ? mask[v >>> 5]! | bit : mask[v >>> 5]! & ~bit
}

/** A mask of V tokens that allows exactly `ids`. */
function maskOf(V: number, ids: Iterable<number>): Int32Array {
  const mask = new Int32Array(maskWords(V))
  for (const v of ids) setAllowed(mask, v, true)
  return mask
}

/**
 * A fresh mask of V tokens from a seed: each token allowed with probability `density`, never none
 * (one token is allowed when the draw allows none), and the last word's bits past V all set (they
 * are ignored).
 */
function randomMask(V: number, seed: number, density: number): Int32Array {
  const rand = mulberry32(seed)
  const mask = new Int32Array(maskWords(V))
  for (let v = 0; v < V; v++) if (rand() < density) setAllowed(mask, v, true)
  if (mask.every((w) => w === 0)) setAllowed(mask, Math.floor(rand() * V), true)
  if (V % 32 !== 0) mask[mask.length - 1] = mask[mask.length - 1]! | (-1 << (V % 32))
  return mask
}

function rowOf(out: StepTokens, r: number) {
  return {
    id: out.ids[r]!,
    logprob: out.logprobs.subarray(r, r + 1),
    topIds: out.topIds.subarray(r * out.topN, (r + 1) * out.topN),
    topLogprobs: out.topLogprobs.subarray(r * out.topN, (r + 1) * out.topN),
  }
}

function expectSameRow(a: StepTokens, ra: number, b: StepTokens, rb: number, what: string) {
  const x = rowOf(a, ra)
  const y = rowOf(b, rb)
  expect(x.id, `id of ${what}`).toBe(y.id)
  expectSameBits(x.logprob, y.logprob, `log-prob of ${what}`)
  expectSameBits(x.topIds, y.topIds, `top ids of ${what}`)
  expectSameBits(x.topLogprobs, y.topLogprobs, `top log-probs of ${what}`)
}

/** An output head with a processor table whose counts and settings are set as given. */
async function headWith(device: DeviceName, rows: number, V: number, counts: Uint16Array[], table: ProcessorSettings[]): Promise<OutputHead> {
  const n = native()
  const head = new OutputHead(device, rows, { rows: table.length, vocab: V })
  const t = head.processorTable()
  const all = new Uint16Array(table.length * V)
  counts.forEach((c, k) => all.set(c, k * V))
  n.upload(t.counts, all)
  table.forEach((s, k) => n.upload(n.narrow(t.settings, k, 1), packSettings(s)))
  return head
}

async function countsOf(head: OutputHead, V: number): Promise<Uint16Array[]> {
  const bytes = await readBytes(head.processorTable().counts)
  const all = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2)
  return Array.from({ length: all.length / V }, (_, k) => all.slice(k * V, (k + 1) * V))
}

async function chooseOn(device: DeviceName, x: Float32Array, V: number, choices: TokenChoice[], topN: number): Promise<StepTokens> {
  const logits = tensorFrom(device, 'f32', [choices.length, V], x)
  try {
    return await chooseOnLogits(logits, choices, topN)
  } finally {
    logits.dispose()
  }
}

/** The choice of a processed row with its processors left out (the plain op, on logits given). */
function plain(c: TokenChoice): TokenChoice {
  const { processors: _, ...rest } = c
  return rest
}

function suite(device: DeviceName) {
  it('processed logits equal the float32 reference bit for bit; only the plan\'s rows are written', async () => {
    const n = native()
    const V = V_QWEN
    const R = 7
    const S = 5
    const J = 5
    const K = 4
    const x = logitRows(R, V, 90_001)
    const table = tableSettings(V, S, 90_100)
    const counts = Array.from({ length: S }, (_, k) => countsRow(V, 90_200 + k))
    const choices = Array.from({ length: R }, (_, r): TokenChoice => ({ temperature: 0.5 + r / 10, topK: r, topP: 1, minP: 0, seed: r, position: 100 + r, target: -1 }))
    // (logits row, table row, fresh, mask row; -1 none): out of order, one fresh, and a fifth entry past K.
    const entries = [[5, 1, 0, -1], [0, 3, 1, -1], [2, 0, 0, -1], [6, 4, 0, -1], [1, 2, 0, -1]] as const
    const plan = tensorFrom(device, 'i32', [1 + PLAN_FIELDS * J], [K, ...entries.flat()])
    const sentinel = new Float32Array(J * V).fill(12345.5)
    const adjusted = tensorFrom(device, 'f32', [J, V], sentinel)
    const adjustedParams = tensorFrom(device, 'i32', [J, 8], new Int32Array(J * 8).fill(-7))
    const countsT = tensorFrom(device, 'u16', [S, V], Uint16Array.from(counts.flatMap((c) => Array.from(c))))
    const settingsT = tensorFrom(device, 'i32', [S, SETTINGS], Int32Array.from(table.flatMap((s) => Array.from(packSettings(s)))))
    const logits = tensorFrom(device, 'f32', [R, V], x)
    const params = tensorFrom(device, 'i32', [R, 8], packChoices(choices))
    // No row is masked: the table's mask words (none allowed) are not read.
    const maskT = tensorFrom(device, 'i32', [S, maskWords(V)], new Int32Array(S * maskWords(V)))
    try {
      n.applyLogitProcessors(adjusted, adjustedParams, countsT, logits, params, plan, settingsT, maskT)
      const got = await readF32(adjusted)
      const gotParams = await readI32(adjustedParams)
      const after = await readBytes(countsT)
      const afterCounts = new Uint16Array(after.buffer, after.byteOffset, after.byteLength / 2)
      const packed = packChoices(choices)
      for (let j = 0; j < K; j++) {
        const [r, k, fresh] = entries[j]!
        const want = processedRow(x.subarray(r * V, (r + 1) * V), fresh ? new Uint16Array(V) : counts[k]!, table[k]!)
        expectSameBits(got.subarray(j * V, (j + 1) * V), want, `processed row ${j} (logits row ${r}, table row ${k})`)
        expect(Array.from(gotParams.subarray(j * 8, (j + 1) * 8))).toEqual(Array.from(packed.subarray(r * 8, (r + 1) * 8)))
        // A fresh row's counts are zeroed; the others' are only read.
        expectSameBits(afterCounts.subarray(k * V, (k + 1) * V), fresh ? new Uint16Array(V) : counts[k]!, `counts of table row ${k}`)
      }
      // Plan rows past K are left as they were, and so is the table row only they name.
      expectSameBits(got.subarray(K * V), sentinel.subarray(K * V), 'rows past K')
      expect(Array.from(gotParams.subarray(K * 8))).toEqual(new Array(8).fill(-7))
      expectSameBits(afterCounts.subarray(2 * V, 3 * V), counts[2]!, 'counts of table row 2')
    } finally {
      for (const t of [plan, adjusted, adjustedParams, countsT, settingsT, logits, params, maskT]) t.dispose()
    }
  })

  it('chooses from the processed logits and reports the raw log-probs, with rows without processors in the same launch', async () => {
    const V = V_QWEN
    const rows = 12
    const S = 6
    const x = logitRows(rows, V, 91_001)
    const table = tableSettings(V, S, 91_100)
    const counts = Array.from({ length: S }, (_, k) => countsRow(V, 91_200 + k))
    const rand = mulberry32(91_300)
    const position = () => 50 + Math.floor(rand() * 3000)
    const seed = () => Math.floor(rand() * 2 ** 32)
    const greedy = (topLogprobs: number): TokenChoice => ({ temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: position(), target: -1, topLogprobs })
    const sampled = (temperature: number, topK: number, topP: number, minP: number, topLogprobs = 0): TokenChoice => ({
      temperature, topK, topP, minP, seed: seed(), position: position(), target: -1, topLogprobs,
    })
    const withRow = (c: TokenChoice, row: number, first = false): TokenChoice => ({ ...c, processors: { row, first, settings: table[row]! } })
    const choices: TokenChoice[] = [
      withRow(greedy(5), 0),
      greedy(5),
      withRow(sampled(0.8, 0, 0.9, 0), 1),
      sampled(1, 0, 1, 0, 2),
      withRow(greedy(0), 2, true), // a sequence's first choice: its counts start from zero
      { ...greedy(4), target: 777 }, // scoring
      withRow(sampled(1.2, 50, 1, 0.05, 3), 3),
      withRow(greedy(1), 4),
      sampled(0.7, 5, 0.95, 0),
      withRow(sampled(0.7, 0, 1, 0), 5),
      greedy(0),
      sampled(1.6, 1000, 0.5, 0, 5),
    ]
    const head = await headWith(device, rows, V, counts, table)
    const logits = tensorFrom(device, 'f32', [rows, V], x)
    try {
      const out = await head.choose(logits, choices, 5)
      const after = await countsOf(head, V)
      const processed = choices.flatMap((c, r) => (c.processors ? [r] : []))
      const adjusted = processed.map((r) => {
        const k = choices[r]!.processors!.row
        const fresh = choices[r]!.processors!.first
        return processedRow(x.subarray(r * V, (r + 1) * V), fresh ? new Uint16Array(V) : counts[k]!, table[k]!)
      })
      // The choice is the plain choice on the reference's processed logits, bit for bit.
      const onAdjusted = await chooseOn(device, concatRows(adjusted), V, processed.map((r) => plain(choices[r]!)), 0)
      let checked = 0
      processed.forEach((r, i) => {
        const c = choices[r]!
        expect(out.ids[r], `row ${r}`).toBe(onAdjusted.ids[i])
        if (c.temperature === 0) expect(out.ids[r], `greedy row ${r}`).toBe(argmaxLowest(adjusted[i]!))
        else {
          const ref = referenceChoice(adjusted[i]!, c.position, c)
          if (ref.scoreMargin > 1e-3 && ref.massMargin > 1e-6) {
            checked++
            expect(out.ids[r], `sampled row ${r}`).toBe(ref.token)
          }
        }
      })
      expect(checked).toBeGreaterThan(0)
      // Penalties and biases moved the choice away from the raw logits' at some rows: not a no-op.
      expect(processed.some((r, i) => argmaxLowest(x.subarray(r * V, (r + 1) * V)) !== argmaxLowest(adjusted[i]!))).toBe(true)
      // The log-probs are the raw ones: those of scoring the chosen token, and the raw top-N; the
      // rows without processors are what the plain op gives them.
      const scored = await chooseOn(device, x, V, choices.map((c, r) => (c.processors ? { ...plain(c), target: out.ids[r]! } : c)), 5)
      for (let r = 0; r < rows; r++) expectSameRow(out, r, scored, r, `row ${r}`)
      const lse = refLogsumexp(x, rows, V)
      for (const r of processed)
        expectClose([out.logprobs[r]!], [x[r * V + out.ids[r]!]! - lse[r]!], 1e-5, 1e-4, `raw log-prob of row ${r}`)
      // One more count for each chosen token, in its row; the fresh row starts from zero.
      for (const r of processed) {
        const { row: k, first } = choices[r]!.processors!
        const want = first ? new Uint16Array(V) : Uint16Array.from(counts[k]!)
        want[out.ids[r]!] = countedWord(want[out.ids[r]!]!)
        expectSameBits(after[k]!, want, `counts of table row ${k}`)
      }
    } finally {
      logits.dispose()
      head.dispose()
    }
  })

  it('masked rows equal the float32 reference bit for bit: forbidden tokens at -Infinity, biased ones too; unmasked rows unchanged', async () => {
    const n = native()
    // 50,003: a last mask word with 13 bits in use, the others set (ignored).
    for (const V of [V_QWEN, 50_003]) {
      const R = 6
      const S = 6
      const J = 6
      const K = 5
      const x = logitRows(R, V, 97_001)
      const table = tableSettings(V, S, 97_100)
      const counts = Array.from({ length: S }, (_, k) => countsRow(V, 97_200 + k))
      const masks = [0.5, 0.5, 0.02, 0.9, 0.001, 0.3].map((density, k) => randomMask(V, 97_300 + k, density))
      // Table row 1 (300 biases, up to +100) forbids every other biased id; table row 4 allows one token.
      table[1]!.logitBias.forEach(([id], i) => setAllowed(masks[1]!, id, i % 2 === 0))
      masks[4] = maskOf(V, [V - 1])
      // (logits row, table row, fresh, mask row; -1 none): masked rows fresh and not, each mask in
      // a row of the mask table other than its table row (as the step's masks are uploaded: in the
      // plan's order), an unmasked row (table row 3), and a sixth entry past K.
      const entries = [[2, 1, 0, 3], [0, 3, 0, -1], [5, 0, 1, 0], [1, 4, 0, 2], [4, 2, 0, 1], [3, 5, 0, 4]] as const
      const plan = tensorFrom(device, 'i32', [1 + PLAN_FIELDS * J], [K, ...entries.flat()])
      // Mask row m holds the mask of the table row whose entry names m; row 5 allows nothing and is never named.
      const maskRows = Array.from({ length: S }, (_, m) => {
        const entry = entries.find((e) => e[3] === m)
        return entry ? masks[entry[1]]! : new Int32Array(maskWords(V))
      })
      const sentinel = new Float32Array(J * V).fill(12345.5)
      const adjusted = tensorFrom(device, 'f32', [J, V], sentinel)
      const adjustedParams = n.empty(device, 'i32', [J, 8])
      const countsT = tensorFrom(device, 'u16', [S, V], Uint16Array.from(counts.flatMap((c) => Array.from(c))))
      const settingsT = tensorFrom(device, 'i32', [S, SETTINGS], Int32Array.from(table.flatMap((s) => Array.from(packSettings(s)))))
      const maskT = tensorFrom(device, 'i32', [S, maskWords(V)], Int32Array.from(maskRows.flatMap((m) => Array.from(m))))
      const logits = tensorFrom(device, 'f32', [R, V], x)
      const params = tensorFrom(device, 'i32', [R, 8], packChoices(Array.from({ length: R }, (_, r) => ({ temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: r, target: -1 }))))
      try {
        n.applyLogitProcessors(adjusted, adjustedParams, countsT, logits, params, plan, settingsT, maskT)
        const got = await readF32(adjusted)
        const rowJ = (j: number) => got.subarray(j * V, (j + 1) * V)
        for (let j = 0; j < K; j++) {
          const [r, k, fresh, m] = entries[j]!
          const masked = m >= 0
          const xr = x.subarray(r * V, (r + 1) * V)
          const words = fresh ? new Uint16Array(V) : counts[k]!
          const want = processedRow(xr, words, table[k]!, masked ? masks[k] : undefined)
          expectSameBits(rowJ(j), want, `row ${j} at V = ${V} (logits row ${r}, table row ${k}, masked ${masked})`)
          // Allowed tokens keep exactly the unmasked value; forbidden ones are -Infinity.
          const unmasked = processedRow(xr, words, table[k]!)
          if (masked) {
            let forbidden = 0
            let finite = 0
            for (let v = 0; v < V; v++) {
              if (tokenAllowed(masks[k]!, v)) continue
              forbidden++
              if (rowJ(j)[v] !== -Infinity) finite++
            }
            expect(forbidden, `forbidden tokens of row ${j}`).toBeGreaterThan(0)
            expect(finite, `forbidden tokens of row ${j} not at -Infinity`).toBe(0)
          } else {
            expectSameBits(rowJ(j), unmasked, `unmasked row ${j}`)
            expect(rowJ(j).every(Number.isFinite)).toBe(true)
          }
        }
        // A bias cannot revive a forbidden token, however large: table row 1's odd-indexed biased ids.
        const revived = table[1]!.logitBias.filter((_, i) => i % 2 === 1)
        expect(revived.some(([, b]) => b > 50)).toBe(true)
        for (const [id] of revived) expect(rowJ(0)[id], `biased token ${id}`).toBe(-Infinity)
        for (const [id, b] of table[1]!.logitBias.filter((_, i) => i % 2 === 0))
          expect(rowJ(0)[id]).toBe(processedRow(x.subarray(2 * V, 3 * V), counts[1]!, { ...table[1]!, logitBias: [[id, b]] })[id])
        // The one allowed token is the only finite value of its row.
        expect(rowJ(3).findIndex(Number.isFinite)).toBe(V - 1)
        expect(rowJ(3).filter(Number.isFinite).length).toBe(1)
        expectSameBits(got.subarray(K * V), sentinel.subarray(K * V), 'the row past K')
      } finally {
        for (const t of [plan, adjusted, adjustedParams, countsT, settingsT, maskT, logits, params]) t.dispose()
      }
    }
  })

  it('masked rows choose only allowed tokens, greedy and sampled (temperature, top-k, top-p, min-p); one allowed token is chosen', async () => {
    const V = V_QWEN
    const rows = 20
    const x = logitRows(rows, V, 98_001)
    const table = tableSettings(V, rows, 98_100)
    const counts = Array.from({ length: rows }, (_, k) => countsRow(V, 98_200 + k))
    const rand = mulberry32(98_300)
    const position = () => 50 + Math.floor(rand() * 3000)
    const seed = () => Math.floor(rand() * 2 ** 32)
    const mode = (temperature: number, topK: number, topP: number, minP: number, topLogprobs = 0): TokenChoice => ({
      temperature, topK, topP, minP, seed: seed(), position: position(), target: -1, topLogprobs,
    })
    const modes = [mode(0, 0, 1, 0, 3), mode(0.8, 0, 1, 0), mode(1.5, 40, 1, 0, 2), mode(1, 0, 0.9, 0), mode(1.2, 0, 1, 0.1), mode(2, 1000, 0.95, 0.02, 5)]
    const densities = [0.5, 0.01, 0.0005]
    const masks: (Int32Array | undefined)[] = []
    const choices: TokenChoice[] = []
    // Rows 0-17: every mode under masks of three densities; rows 18 and 19: processors without a mask, and none.
    for (const [i, density] of densities.entries())
      for (const [m, c] of modes.entries()) {
        const r = choices.length
        masks.push(randomMask(V, 98_400 + r, density))
        const first = (i + m) % 4 === 0 && table[r]!.repetitionPenalty === 1 // (a repetition penalty's first choice needs the prompt)
        choices.push({ ...c, processors: { row: r, first, settings: table[r]!, mask: masks[r]! } })
      }
    masks.push(undefined, undefined)
    choices.push({ ...modes[1]!, processors: { row: 18, first: false, settings: table[18]! } }, modes[3]!)
    const head = await headWith(device, rows, V, counts, table)
    const logits = tensorFrom(device, 'f32', [rows, V], x)
    try {
      const out = await head.choose(logits, choices, 5)
      const processed = choices.flatMap((c, r) => (c.processors ? [r] : []))
      const adjusted = processed.map((r) => {
        const { row: k, first } = choices[r]!.processors!
        return processedRow(x.subarray(r * V, (r + 1) * V), first ? new Uint16Array(V) : counts[k]!, table[k]!, masks[r])
      })
      const onAdjusted = await chooseOn(device, concatRows(adjusted), V, processed.map((r) => plain(choices[r]!)), 0)
      let moved = 0
      processed.forEach((r, i) => {
        const c = choices[r]!
        expect(out.ids[r], `row ${r}`).toBe(onAdjusted.ids[i])
        if (c.temperature === 0) expect(out.ids[r], `greedy row ${r}`).toBe(argmaxLowest(adjusted[i]!))
        if (masks[r]) {
          expect(tokenAllowed(masks[r]!, out.ids[r]!), `row ${r} chose ${out.ids[r]}, which its mask forbids`).toBe(true)
          const unmasked = processedRow(x.subarray(r * V, (r + 1) * V), c.processors!.first ? new Uint16Array(V) : counts[r]!, table[r]!)
          if (c.temperature === 0 && !tokenAllowed(masks[r]!, argmaxLowest(unmasked))) moved++
        }
      })
      // The masks moved some greedy choices away from the unmasked ones' (not a no-op).
      expect(moved).toBeGreaterThan(0)
      // The log-probs are the raw ones: those of scoring the chosen token, and the raw top-N.
      const scored = await chooseOn(device, x, V, choices.map((c, r) => (c.processors ? { ...plain(c), target: out.ids[r]! } : c)), 5)
      for (let r = 0; r < rows; r++) expectSameRow(out, r, scored, r, `row ${r}`)

      // One allowed token, the row's least likely, under every mode (top-k 1, top-p 0.1 and min-p 0.9 too).
      const single = [...modes, mode(1, 1, 1, 0), mode(0.5, 0, 0.1, 0), mode(3, 0, 1, 0.9)].slice(0, rows)
      const least = (r: number) => argmaxLowest(x.subarray(r * V, (r + 1) * V).map((v) => -v))
      const onlyOne = single.map((c, r): TokenChoice => ({ ...c, processors: { row: r, first: false, settings: table[r]!, mask: maskOf(V, [least(r)]) } }))
      const one = await head.choose(native().narrow(logits, 0, single.length), onlyOne, 0)
      for (let r = 0; r < single.length; r++) expect(one.ids[r], `row ${r} with one allowed token`).toBe(least(r))
    } finally {
      logits.dispose()
      head.dispose()
    }
  })

  it('sampled masked rows spread over the allowed tokens and never leave them, seed after seed', async () => {
    const V = V_QWEN
    const rows = 64
    const x = logitRows(1, V, 99_001)
    const neutral: ProcessorSettings = { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 1, logitBias: [] }
    const mask = randomMask(V, 99_100, 0.001)
    const head = await headWith(device, rows, V, [], Array.from({ length: rows }, () => neutral))
    const logits = tensorFrom(device, 'f32', [rows, V], concatRows(Array.from({ length: rows }, () => x)))
    try {
      const choices = Array.from({ length: rows }, (_, r): TokenChoice => ({
        temperature: [1, 2, 5][r % 3]!, topK: r % 4 === 0 ? 20 : 0, topP: r % 5 === 0 ? 0.9 : 1, minP: r % 7 === 0 ? 0.01 : 0,
        seed: 1000 + r, position: 77, target: -1, processors: { row: r, first: true, settings: neutral, mask },
      }))
      const out = await head.choose(logits, choices, 0)
      for (let r = 0; r < rows; r++) expect(tokenAllowed(mask, out.ids[r]!), `row ${r} chose ${out.ids[r]}`).toBe(true)
      expect(new Set(out.ids).size).toBeGreaterThan(5)
    } finally {
      logits.dispose()
      head.dispose()
    }
  })

  for (const masked of [false, true])
    it(`a processed row${masked ? ', masked,' : ''} gives the same bits alone and among 3 and 39 others, with and without processors`, async () => {
      const V = V_QWEN
      const rows = 40
      const x = logitRows(rows, V, 92_001)
      const table = tableSettings(V, rows, 92_100)
      const counts = Array.from({ length: rows }, (_, k) => countsRow(V, 92_200 + k))
      const rand = mulberry32(92_300)
      // Masked: each processed row's own mask, of one of three densities.
      const mask = (r: number) => (masked ? { mask: randomMask(V, 92_400 + r, [0.5, 0.01, 0.0005][r % 3]!) } : {})
      // Row r uses table row r when r % 3 != 2 (the others have no processors).
      const choices = Array.from({ length: rows }, (_, r): TokenChoice => {
        const sampledRow = r % 2 === 1
        const c: TokenChoice = {
          temperature: sampledRow ? [0.6, 1, 1.4][r % 3]! : 0,
          topK: sampledRow && r % 5 === 1 ? 40 : 0,
          topP: sampledRow && r % 7 === 3 ? 0.9 : 1,
          minP: 0,
          seed: Math.floor(rand() * 2 ** 32),
          position: 10 + r,
          target: -1,
          topLogprobs: r % 4 === 0 ? 20 : 3,
        }
        return r % 3 === 2 ? c : { ...c, processors: { row: r, first: false, settings: table[r]!, ...mask(r) } }
      })
      const launch = async (pick: number[]) => {
        // The same counts before every launch (a launch adds to them).
        const head = await headWith(device, pick.length, V, counts, table)
        const xs = concatRows(pick.map((r) => x.subarray(r * V, (r + 1) * V)))
        const logits = tensorFrom(device, 'f32', [pick.length, V], xs)
        try {
          return await head.choose(logits, pick.map((r) => choices[r]!), 20)
        } finally {
          logits.dispose()
          head.dispose()
        }
      }
      const all = Array.from({ length: rows }, (_, r) => r)
      const full = await launch(all)
      for (const r of [0, 1, 4, 9, 13, 22, 39]) {
        expect(choices[r]!.processors, `row ${r}`).toBeDefined()
        for (const count of [1, 4]) {
          const pick = [r, ...Array.from({ length: count - 1 }, (_, i) => (r + 11 + 5 * i) % rows)]
          const part = await launch(pick)
          expectSameRow(part, 0, full, r, `row ${r} among ${count}`)
        }
        const m = choices[r]!.processors!.mask
        if (m) expect(tokenAllowed(m, full.ids[r]!), `row ${r} chose a token its mask forbids`).toBe(true)
      }
    })

  for (const masked of [false, true])
    it(`variant twin: with rows split for small batches, some processed rows${masked ? ', masked,' : ''} differ alone`, async () => {
      // As in choose-tokens.test.ts: narrow rows with one logit at 12, whose log-sum-exp's last bit
      // follows the sum's order; every row has processors (masked: half the tokens allowed, the 12 among them).
      const V = V_QWEN
      const rows = 16
      const x = new Float32Array(rows * V)
      for (let r = 0; r < rows; r++) {
        const row = randomNormal(V, 93_001 + r, 0.3)
        row[(r * 7919) % V] = 12
        x.set(row, r * V)
      }
      const table = tableSettings(V, rows, 93_100)
      const counts = Array.from({ length: rows }, (_, k) => countsRow(V, 93_200 + k))
      const mask = (r: number) => {
        if (!masked) return {}
        const m = randomMask(V, 93_300 + r, 0.5)
        setAllowed(m, (r * 7919) % V, true)
        return { mask: m }
      }
      const choices = Array.from({ length: rows }, (_, r): TokenChoice => ({
        temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: r, target: -1, processors: { row: r, first: false, settings: table[r]!, ...mask(r) },
      }))
      const launch = async (pick: number[]) => {
        const head = await headWith(device, pick.length, V, counts, table)
        const logits = tensorFrom(device, 'f32', [pick.length, V], concatRows(pick.map((r) => x.subarray(r * V, (r + 1) * V))))
        try {
          return await head.choose(logits, pick.map((r) => choices[r]!), 0)
        } finally {
          logits.dispose()
          head.dispose()
        }
      }
      const differing = async () => {
        const full = await launch(Array.from({ length: rows }, (_, r) => r))
        let differ = 0
        for (let r = 0; r < rows; r++) {
          const alone = await launch([r])
          if (alone.ids[0] !== full.ids[r] || firstDifference(alone.logprobs.subarray(0, 1), full.logprobs.subarray(r, r + 1)) >= 0) differ++
        }
        return differ
      }
      expect(await differing()).toBe(0)
      expect(await withVariant(differing)).toBeGreaterThan(0)
    })

  it("a repetition penalty's first choice marks the prompt's tokens in a reset row, and penalizes them with the chosen ones", async () => {
    const V = V_QWEN
    const x = logitRows(2, V, 96_001)
    const table: ProcessorSettings[] = [settings(96_100, V, 0.4, 0.2, 5, 1.5), settings(96_101, V, 0, 0, 0, 0.8)]
    // The last owner's words: anything (prompt bits included) must go.
    const old = [countsRow(V, 96_200), countsRow(V, 96_201)]
    const rand = mulberry32(96_300)
    // Prompts with repeated ids, ids on the row's edges, and a biased id.
    const prompts = [0, 1].map((k) => [0, V - 1, table[k]!.logitBias[0]?.[0] ?? 17, ...Array.from({ length: 700 }, () => Math.floor(rand() * V)), 5, 5])
    const head = await headWith(device, 2, V, old, table)
    const logits = tensorFrom(device, 'f32', [2, V], x)
    const choice = (row: number, first: boolean, temperature: number): TokenChoice => ({
      temperature, topK: 0, topP: 1, minP: 0, seed: 11 + row, position: 900, target: -1,
      processors: { row, first, settings: table[row]!, ...(first && { prompt: prompts[row]! }) },
    })
    try {
      const marked = prompts.map((p) => {
        const w = new Uint16Array(V)
        for (const id of p) w[id] = IN_PROMPT
        return w
      })
      const out = await head.choose(logits, [choice(0, true, 0), choice(1, true, 0.9)], 0)
      const adjusted = [0, 1].map((k) => processedRow(x.subarray(k * V, (k + 1) * V), marked[k]!, table[k]!))
      expect(out.ids[0]).toBe(argmaxLowest(adjusted[0]!))
      const onAdjusted = await chooseOn(device, concatRows(adjusted), V, [0, 1].map((k) => plain(choice(k, false, k === 0 ? 0 : 0.9))), 0)
      expect(Array.from(out.ids)).toEqual(Array.from(onAdjusted.ids))
      // The penalty moved some prompt token's logit: the processed row is not the raw one.
      expect(firstDifference(adjusted[1]!, x.subarray(V, 2 * V))).toBeGreaterThanOrEqual(0)
      const after = await countsOf(head, V)
      for (const k of [0, 1]) {
        const want = Uint16Array.from(marked[k]!)
        want[out.ids[k]!] = countedWord(want[out.ids[k]!]!)
        expectSameBits(after[k]!, want, `words of table row ${k}`)
      }
      // The next choice reads the marks and the count (not zeroed again).
      const next = await head.choose(logits, [choice(0, false, 0), choice(1, false, 0.9)], 0)
      const again = [0, 1].map((k) => processedRow(x.subarray(k * V, (k + 1) * V), after[k]!, table[k]!))
      expect(next.ids[0]).toBe(argmaxLowest(again[0]!))
    } finally {
      logits.dispose()
      head.dispose()
    }
  })

  it('resetLogitRow zeroes the row and marks the ids given, whatever the row held', async () => {
    const n = native()
    const V = 5000
    const counts = tensorFrom(device, 'u16', [3, V], Uint16Array.from({ length: 3 * V }, (_, i) => (i * 7919) % 65536))
    const before = await readBytes(counts)
    const ids = tensorFrom(device, 'i32', [6], [4999, 0, 17, 17, 2500, 3])
    try {
      n.resetLogitRow(counts, 1, ids)
      const bytes = await readBytes(counts)
      const words = new Uint16Array(bytes.buffer, bytes.byteOffset, 3 * V)
      const want = new Uint16Array(V)
      for (const id of [4999, 0, 17, 2500, 3]) want[id] = IN_PROMPT
      expectSameBits(words.subarray(V, 2 * V), want, 'the reset row')
      const was = new Uint16Array(before.buffer, before.byteOffset, 3 * V)
      expectSameBits(words.subarray(0, V), was.subarray(0, V), 'row 0')
      expectSameBits(words.subarray(2 * V), was.subarray(2 * V), 'row 2')
    } finally {
      counts.dispose()
      ids.dispose()
    }
  })

  it('counts start from zero when a sequence takes its row, count each choice and saturate at 32,767, the prompt bit kept', async () => {
    const V = 3000
    const table: ProcessorSettings[] = [
      { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 1, logitBias: [[7, 100]] },
      { frequencyPenalty: 0, presencePenalty: 0, repetitionPenalty: 1, logitBias: [[9, 100]] },
    ]
    const garbage = Uint16Array.from({ length: V }, (_, v) => (v * 37) % 5)
    const nearFull = new Uint16Array(V)
    nearFull[9] = 32766 | IN_PROMPT // 65534: one short of the saturation, in the prompt
    const head = await headWith(device, 2, V, [garbage, nearFull], table)
    const logits = tensorFrom(device, 'f32', [2, V], logitRows(2, V, 94_001))
    const choice = (row: number, first: boolean): TokenChoice => ({
      temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: 3, target: -1, processors: { row, first, settings: table[row]! },
    })
    try {
      for (const step of [0, 1, 2]) {
        const out = await head.choose(logits, [choice(0, step === 0), choice(1, false)], 0)
        expect(Array.from(out.ids)).toEqual([7, 9])
        const [c0, c1] = await countsOf(head, V)
        const want0 = new Uint16Array(V)
        want0[7] = step + 1
        expectSameBits(c0!, want0, `counts of the row taken at step 0, after step ${step}`)
        expect(c1![9]).toBe(32767 | IN_PROMPT)
        expect(c1!.reduce((a, b) => a + b, 0)).toBe(65535)
      }
      // Taken again: zero again, whatever the last owner left.
      const out = await head.choose(native().narrow(logits, 0, 1), [choice(0, true)], 0)
      expect(out.ids[0]).toBe(7)
      expect((await countsOf(head, V))[0]![7]).toBe(1)
    } finally {
      logits.dispose()
      head.dispose()
    }
  })
}

describe('logit processors on the CPU backend', () => suite('cpu'))

describeGpu('logit processors on CUDA', () => {
  suite('cuda')

  it('agree with the CPU backend: processed logits bit for bit, masked rows too, and the greedy choices', async () => {
    const V = V_QWEN
    const rows = 6
    const x = logitRows(rows, V, 95_001)
    const table = tableSettings(V, rows, 95_100)
    const counts = Array.from({ length: rows }, (_, k) => countsRow(V, 95_200 + k))
    // Even rows masked (table row 0 forbids its biased ids); the odd rows' mask words are not read.
    const masks = Array.from({ length: rows }, (_, k) => randomMask(V, 95_300 + k, [0.5, 0.01, 0.3][k % 3]!))
    for (const [id] of table[0]!.logitBias) setAllowed(masks[0]!, id, false)
    const masked = (r: number) => r % 2 === 0
    const choices = Array.from({ length: rows }, (_, r): TokenChoice => ({
      temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: r, target: -1, topLogprobs: 20,
      processors: { row: r, first: r === 2, settings: table[r]!, ...(masked(r) && { mask: masks[r]! }) },
    }))
    const run = async (device: DeviceName) => {
      const head = await headWith(device, rows, V, counts, table)
      const logits = tensorFrom(device, 'f32', [rows, V], x)
      try {
        return { out: await head.choose(logits, choices, 20), counts: await countsOf(head, V) }
      } finally {
        logits.dispose()
        head.dispose()
      }
    }
    const [gpu, cpu] = [await run('cuda'), await run('cpu')]
    expect(Array.from(gpu.out.ids)).toEqual(Array.from(cpu.out.ids))
    for (let r = 0; r < rows; r += 2) expect(tokenAllowed(masks[r]!, gpu.out.ids[r]!), `row ${r}`).toBe(true)
    expect(Array.from(gpu.out.topIds)).toEqual(Array.from(cpu.out.topIds))
    expectClose(gpu.out.logprobs, cpu.out.logprobs, 1e-5, 1e-5, 'log-probs')
    for (let k = 0; k < rows; k++) expectSameBits(gpu.counts[k]!, cpu.counts[k]!, `counts of table row ${k}`)
    // The processed logits themselves: the op on both devices.
    const processedOn = async (device: DeviceName) => {
      const n = native()
      const plan = tensorFrom(device, 'i32', [1 + PLAN_FIELDS * rows], [rows, ...Array.from({ length: rows }, (_, r) => [r, r, r === 2 ? 1 : 0, masked(r) ? r : -1]).flat()])
      const maskT = tensorFrom(device, 'i32', [rows, maskWords(V)], Int32Array.from(masks.flatMap((m) => Array.from(m))))
      const adjusted = n.empty(device, 'f32', [rows, V])
      const adjustedParams = n.empty(device, 'i32', [rows, 8])
      const countsT = tensorFrom(device, 'u16', [rows, V], Uint16Array.from(counts.flatMap((c) => Array.from(c))))
      const settingsT = tensorFrom(device, 'i32', [rows, SETTINGS], Int32Array.from(table.flatMap((s) => Array.from(packSettings(s)))))
      const logits = tensorFrom(device, 'f32', [rows, V], x)
      const params = tensorFrom(device, 'i32', [rows, 8], packChoices(choices))
      const held: NativeTensor[] = [plan, maskT, adjusted, adjustedParams, countsT, settingsT, logits, params]
      try {
        n.applyLogitProcessors(adjusted, adjustedParams, countsT, logits, params, plan, settingsT, maskT)
        return await readF32(adjusted)
      } finally {
        for (const t of held) t.dispose()
      }
    }
    const processed = await processedOn('cuda')
    expectSameBits(processed, await processedOn('cpu'), 'processed logits, CUDA against the CPU')
    // And the reference: masked rows' forbidden tokens at -Infinity, biased ones among them.
    for (let r = 0; r < rows; r++) {
      const want = processedRow(x.subarray(r * V, (r + 1) * V), r === 2 ? new Uint16Array(V) : counts[r]!, table[r]!, masked(r) ? masks[r] : undefined)
      expectSameBits(processed.subarray(r * V, (r + 1) * V), want, `row ${r} against the reference`)
    }
  })
})

describe('logit processor op arguments', () => {
  it('refuse tensors of the wrong dtype or shape, and (on the CPU) plans that name rows outside the tensors', () => {
    const n = native()
    const V = 10
    const x = tensorFrom('cpu', 'f32', [2, V], new Float32Array(2 * V).fill(1))
    const params = n.empty('cpu', 'i32', [2, 8])
    const adjusted = n.empty('cpu', 'f32', [1, V])
    const adjustedParams = n.empty('cpu', 'i32', [1, 8])
    const counts = tensorFrom('cpu', 'u16', [1, V], new Uint16Array(V))
    const settings = tensorFrom('cpu', 'i32', [1, SETTINGS], new Int32Array(SETTINGS))
    const mask = tensorFrom('cpu', 'i32', [1, 1], [-1])
    const plan = (entries: number[]) => tensorFrom('cpu', 'i32', [entries.length], entries)
    expect(() => n.applyLogitProcessors(adjusted, adjustedParams, n.empty('cpu', 'i32', [1, V]), x, params, plan([1, 0, 0, 0, 0]), settings, mask)).toThrow(
      /expected counts to be u16/,
    )
    expect(() => n.applyLogitProcessors(adjusted, adjustedParams, counts, x, params, plan([1, 0, 0, 0]), settings, mask)).toThrow(/plan to be i32 \[1 \+ 4J\]/)
    expect(() => n.applyLogitProcessors(adjusted, adjustedParams, counts, x, params, plan([1, 0, 0, 0, 0]), n.empty('cpu', 'i32', [1, 8]), mask)).toThrow(
      /settings/,
    )
    expect(() => n.applyLogitProcessors(adjusted, adjustedParams, counts, x, params, plan([1, 2, 0, 0, 0]), settings, mask)).toThrow(/names logits row 2/)
    expect(() => n.applyLogitProcessors(adjusted, adjustedParams, counts, x, params, plan([1, 0, 1, 0, 0]), settings, mask)).toThrow(/names table row 1/)
    expect(() => n.applyLogitProcessors(adjusted, adjustedParams, counts, x, params, plan([1, 0, 0, 0, 1]), settings, mask)).toThrow(
      'apply_logit_processors: plan row 0 names mask row 1, outside [-1, 1)',
    )
    expect(() => n.applyLogitProcessors(adjusted, adjustedParams, counts, x, params, plan([1, 0, 0, 0, -2]), settings, mask)).toThrow(/names mask row -2/)
    expect(() => n.recordLogitChoices(params, counts, n.empty('cpu', 'i32', [1, 1]), plan([1, 0, 0, 0, 0]))).toThrow(/at least 2 columns/)
    expect(() => n.resetLogitRow(counts, 1, tensorFrom('cpu', 'i32', [1], [0]))).toThrow('reset_logit_row: expected a row between 0 and 0 but received 1')
    expect(() => n.resetLogitRow(counts, 0, tensorFrom('cpu', 'i32', [2], [3, V]))).toThrow(`reset_logit_row: prompt id 1 is ${V}, outside [0, ${V})`)
    expect(() => n.resetLogitRow(counts, 0, tensorFrom('cpu', 'f32', [1], [0]))).toThrow(/expected prompt to be i32/)
    expect(() => n.chooseTokens(n.empty('cpu', 'i32', [2, 2]), x, params, n.empty('cpu', 'i32', [0]))).toThrow(/live/)
  })

  it('refuse a mask table that is missing, not i32, not 2-D, or not [rows of counts, ceil(V / 32)]', () => {
    const n = native()
    const V = 40 // two mask words
    const x = tensorFrom('cpu', 'f32', [1, V], new Float32Array(V).fill(1))
    const params = n.empty('cpu', 'i32', [1, 8])
    const adjusted = n.empty('cpu', 'f32', [1, V])
    const adjustedParams = n.empty('cpu', 'i32', [1, 8])
    const counts = tensorFrom('cpu', 'u16', [2, V], new Uint16Array(2 * V))
    const settings = tensorFrom('cpu', 'i32', [2, SETTINGS], new Int32Array(2 * SETTINGS))
    const plan = tensorFrom('cpu', 'i32', [1 + PLAN_FIELDS], [1, 0, 1, 0, 1])
    const apply = (mask: unknown) => () =>
      n.applyLogitProcessors(adjusted, adjustedParams, counts, x, params, plan, settings, mask as NativeTensor)
    expect(apply(undefined)).toThrow('applyLogitProcessors: expected a Tensor for mask but received undefined')
    expect(apply(n.empty('cpu', 'u16', [2, 2]))).toThrow('apply_logit_processors: expected mask to be i32 but received u16[2,2] on cpu')
    expect(apply(n.empty('cpu', 'f32', [2, 2]))).toThrow(/expected mask to be i32 but received f32/)
    expect(apply(n.empty('cpu', 'i32', [4]))).toThrow('apply_logit_processors: expected mask to have 2 dimensions but received i32[4] on cpu')
    expect(apply(n.empty('cpu', 'i32', [1, 2]))).toThrow('apply_logit_processors: expected dimension 0 of mask to be 2 (rows of counts) but received i32[1,2] on cpu')
    expect(apply(n.empty('cpu', 'i32', [2, 1]))).toThrow(/expected dimension 1 of mask to be 2 \(ceil\(V \/ 32\) words, V the columns of x\) but received i32\[2,1\] on cpu/)
    expect(apply(n.empty('cpu', 'i32', [2, V]))).toThrow(/expected dimension 1 of mask to be 2/)
    // The right shape runs: row 0 of x through table row 1 and mask row 1, which allows tokens 0 and 33.
    const mask = tensorFrom('cpu', 'i32', [2, 2], [0, 0, 1, 2])
    apply(mask)()
    return readF32(adjusted).then((y) => {
      expect(Array.from(y).map((v, i) => (v === -Infinity ? -1 : i)).filter((i) => i >= 0)).toEqual([0, 33])
    })
  })
})
