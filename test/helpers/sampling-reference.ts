// The plain reference of the output head's token choice (csrc/common/token_choice.h): a full
// sort, BigInt masses and float64 noise, written for clarity, not speed. The native op computes
// the noise and weights in float32, so the two can disagree only where the reference's own
// margins are razor thin; each result carries those margins so tests can tell.
export interface SamplingParams {
  temperature: number
  topK: number
  topP: number
  minP: number
  seed: number
}

const SEED_KEY = 0x9e3779b9
const POSITION_MUL = 0x85ebca6b
const TOKEN_MUL = 0xc2b2ae35

function mix32(x: number): number {
  x ^= x >>> 16
  x = Math.imul(x, 0x21f0aaad)
  x ^= x >>> 15
  x = Math.imul(x, 0x735a2d97)
  x ^= x >>> 15
  return x >>> 0
}

// mix32 undone: its xorshifts and odd multipliers (0x333c4925 and 0x97132227 are the inverses of
// 0x21f0aaad and 0x735a2d97 modulo 2^32) in reverse order.
function unmix32(x: number): number {
  x = (x ^ (x >>> 15) ^ (x >>> 30)) >>> 0
  x = Math.imul(x, 0x97132227) >>> 0
  x = (x ^ (x >>> 15) ^ (x >>> 30)) >>> 0
  x = Math.imul(x, 0x333c4925) >>> 0
  return (x ^ (x >>> 16)) >>> 0
}

/** A uniform value in (0, 1), 24 significant bits, determined by (seed, position, tokenId) alone. */
export function noiseUniform(seed: number, position: number, tokenId: number): number {
  let h = mix32((seed ^ SEED_KEY) >>> 0)
  h = mix32((h ^ Math.imul(position, POSITION_MUL)) >>> 0)
  h = mix32((h ^ Math.imul(tokenId + 1, TOKEN_MUL)) >>> 0)
  return (2 * (h >>> 9) + 1) / 2 ** 24
}

/** The seed whose noise hash at (position, tokenId) is all ones: the largest noise there is. */
export function seedWithLargestNoise(position: number, tokenId: number): number {
  const row = (unmix32(0xffffffff) ^ Math.imul(tokenId + 1, TOKEN_MUL)) >>> 0
  const first = (unmix32(row) ^ Math.imul(position, POSITION_MUL)) >>> 0
  return (unmix32(first) ^ SEED_KEY) >>> 0
}

export function gumbelNoise(seed: number, position: number, tokenId: number): number {
  return -Math.log(-Math.log(noiseUniform(seed, position, tokenId)))
}

const f = Math.fround
const MASS_SCALE = 2 ** 40

/** Ids by logit descending, lowest id first on ties (NaN-free rows). */
export function sortedIds(logits: Float32Array): Int32Array {
  return Int32Array.from({ length: logits.length }, (_, i) => i).sort((a, b) => logits[b]! - logits[a]! || a - b)
}

export interface ReferenceChoice {
  token: number
  /** The kept set, in sorted order. */
  kept: Int32Array
  /** Best Gumbel score minus the runner-up's (Infinity with one kept token). */
  scoreMargin: number
  /** Distance of the top-p target from the running masses on either side of the cut, over Z (Infinity without top-p). */
  massMargin: number
}

export function referenceChoice(logits: Float32Array, position: number, p: SamplingParams): ReferenceChoice {
  const V = logits.length
  const order = sortedIds(logits)
  const t = f(p.temperature)
  const max = logits[order[0]!]!
  const e = f(f(Math.LOG2E) / t)
  const scaled = (v: number) => f(logits[v]! / t)
  // exp2((x - max) * E) (csrc/common/token_choice.h), each step rounded to float32.
  const weight = (v: number) => f(2 ** f(f(logits[v]! - max) * e))
  const mass = (v: number) => BigInt(Math.floor(weight(v) * MASS_SCALE))
  let L = p.topK > 0 && p.topK < V ? p.topK : V
  let massMargin = Infinity
  if (p.topP < 1) {
    let z = 0n
    for (let i = 0; i < L; i++) z += mass(order[i]!)
    const prod = f(p.topP) * Number(z)
    let target = BigInt(Math.ceil(prod))
    if (target < 1n) target = 1n
    if (target > z) target = z
    let cum = 0n
    for (let i = 0; i < L; i++) {
      const before = cum
      cum += mass(order[i]!)
      if (cum >= target) {
        massMargin = Math.min(Number(target - before), Number(cum - target) + 1) / Number(z)
        L = i + 1
        break
      }
    }
  }
  const minP = f(p.minP)
  const kept = order.subarray(0, L).filter((v) => minP === 0 || weight(v) >= minP)
  let best = -Infinity
  let second = -Infinity
  let token = kept[0]!
  for (const v of kept) {
    const score = scaled(v) + gumbelNoise(p.seed, position, v)
    if (score > best) {
      second = best
      best = score
      token = v
    } else if (score > second) second = score
  }
  return { token, kept, scoreMargin: best - second, massMargin }
}

/** A completion's penalties and biases as the device holds them (float32 values). */
export interface ProcessorSettings {
  frequencyPenalty: number
  presencePenalty: number
  /** 1: none. */
  repetitionPenalty: number
  logitBias: readonly (readonly [number, number])[]
}

/** A token's u16 word: its count in the low 15 bits, and bit 15 when it is in the prompt. */
export const IN_PROMPT = 0x8000
export const MAX_COUNT = 0x7fff

/** The word after one more choice of its token: the count saturates at 32,767, the prompt bit stays. */
export function countedWord(word: number): number {
  return (word & MAX_COUNT) < MAX_COUNT ? word + 1 : word
}

/**
 * The processed logit of a token whose word is `word` (count and prompt bit), in
 * csrc/common/logit_processors.h's order (before the token mask, which processedRow applies), every step rounded to float32 (Math.fround of a float64
 * sum, difference, product or quotient of float32 values is the float32 operation's result):
 *   seen (in the prompt or counted) and r != 1: x = x > 0 ? x / r : x * r;
 *   count == 0: y = x;  count > 0: y = (x - f * count) - p;  then y + bias for a biased token.
 */
export function processedLogit(x: number, word: number, frequency: number, presence: number, bias?: number, repetition = 1): number {
  const count = word & MAX_COUNT
  let y = f(x)
  const r = f(repetition)
  if (word !== 0 && r !== 1) y = y > 0 ? f(y / r) : f(y * r)
  if (count > 0) y = f(f(y - f(f(frequency) * count)) - f(presence))
  return bias === undefined ? y : f(y + f(bias))
}

/** Whether a token mask (i32 words) allows token v: bit v & 31 of word v >> 5. */
export function tokenAllowed(mask: Int32Array, v: number): boolean {
  return ((mask[v >>> 5]! >>> (v & 31)) & 1) === 1
}

/**
 * A whole processed row: logits x [V], the row's words [V] (zeros for a fresh row) and settings;
 * with a token mask, every token it does not allow at -Infinity, after the penalties and the bias
 * (the allowed ones keep their values).
 */
export function processedRow(x: Float32Array, counts: ArrayLike<number>, s: ProcessorSettings, mask?: Int32Array): Float32Array {
  const y = new Float32Array(x.length)
  const r = s.repetitionPenalty
  for (let v = 0; v < x.length; v++) y[v] = processedLogit(x[v]!, counts[v]!, s.frequencyPenalty, s.presencePenalty, undefined, r)
  for (const [id, bias] of s.logitBias) y[id] = processedLogit(x[id]!, counts[id]!, s.frequencyPenalty, s.presencePenalty, bias, r)
  if (mask) for (let v = 0; v < x.length; v++) if (!tokenAllowed(mask, v)) y[v] = -Infinity
  return y
}

/** The greedy choice: the largest logit, lowest id on ties. */
export function argmaxLowest(x: Float32Array): number {
  let best = 0
  for (let v = 1; v < x.length; v++) if (x[v]! > x[best]!) best = v
  return best
}
