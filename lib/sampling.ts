// Seeded sampling: temperature, top-k and top-p, drawn by Gumbel-max with noise that is a pure
// function of (seed, position, token id). There is no generator state shared between sequences or
// steps, so a sampled token depends only on its sequence's seed, its position and its logits row:
// whatever else shares the batch, the same seed gives the same completion.
//
//   token = argmax over kept v of  logits[v] / temperature + gumbel(hash(seed, position, v))
//
// which draws v with probability softmax(logits / temperature) restricted to the kept set. The
// kept set is the top-k tokens, then the smallest prefix (by descending probability, lowest id
// first on ties) whose probability reaches top-p. Everything is float64 with a fixed loop order.

export interface SamplingParams {
  temperature: number // > 0
  topK: number // 0: no limit
  topP: number // in (0, 1]; 1: no limit
  seed: number // uint32
}

// Counter-based 32-bit hash: "lowbias32" (a murmur3-style finalizer with better constants).
function mix32(x: number): number {
  x ^= x >>> 16
  x = Math.imul(x, 0x21f0aaad)
  x ^= x >>> 15
  x = Math.imul(x, 0x735a2d97)
  x ^= x >>> 15
  return x >>> 0
}

/** A uniform value in (0, 1) determined by (seed, position, tokenId) alone. */
export function noiseUniform(seed: number, position: number, tokenId: number): number {
  let h = mix32((seed ^ 0x9e3779b9) >>> 0)
  h = mix32((h ^ Math.imul(position, 0x85ebca6b)) >>> 0)
  h = mix32((h ^ Math.imul(tokenId + 1, 0xc2b2ae35)) >>> 0)
  return (h + 0.5) / 4294967296
}

export function gumbelNoise(seed: number, position: number, tokenId: number): number {
  return -Math.log(-Math.log(noiseUniform(seed, position, tokenId)))
}

// The noise is bounded: u <= 1 - 2^-33, so -log(-log(u)) < 22.9. A token whose scaled logit is
// this far below the best score so far cannot win, and its noise need not be computed.
const GUMBEL_MAX = 23

/** Ids of the tokens that may be drawn, in descending logit order (lowest id first on ties); null: all of them. */
export function keptTokens(logits: Float32Array, params: SamplingParams): Int32Array | null {
  const vocab = logits.length
  let kept: Int32Array | null = params.topK > 0 && params.topK < vocab ? topK(logits, params.topK) : null
  if (params.topP < 1) kept = topP(logits, kept, params)
  return kept
}

// Sorts ids by descending logit, lowest id first on ties, with a numeric sort of exact keys:
// key = rank of the logit (its float32 bits made order-preserving, inverted) * 2^21 + id, below
// 2^53, so every key is an exact double. NaN ranks as -Infinity, -0 as +0.
const ID_BITS = 2 ** 21
function byLogitDescending(logits: Float32Array, ids: Int32Array): Int32Array {
  if (logits.length > ID_BITS) return Int32Array.from(ids).sort((a, b) => ordered(logits[b]!) - ordered(logits[a]!) || a - b)
  const values = new Float32Array(ids.length)
  const bitsOf = new Uint32Array(values.buffer)
  for (let i = 0; i < ids.length; i++) values[i] = ordered(logits[ids[i]!]!) + 0
  const keys = new Float64Array(ids.length)
  for (let i = 0; i < ids.length; i++) {
    const bits = bitsOf[i]!
    const ascending = bits & 0x80000000 ? ~bits >>> 0 : (bits | 0x80000000) >>> 0 // order-preserving
    keys[i] = (0xffffffff - ascending) * ID_BITS + ids[i]!
  }
  keys.sort()
  const out = new Int32Array(ids.length)
  for (let i = 0; i < ids.length; i++) out[i] = keys[i]! % ID_BITS
  return out
}

function ordered(x: number): number {
  return Number.isNaN(x) ? -Infinity : x
}

/** The k highest logits' ids, sorted: a threshold by quickselect, then a sort of k ids only. */
function topK(logits: Float32Array, k: number): Int32Array {
  const values = new Float64Array(logits.length)
  for (let v = 0; v < logits.length; v++) values[v] = ordered(logits[v]!)
  const threshold = kthLargest(values, k)
  const ids: number[] = []
  for (let v = 0; v < logits.length; v++) if (ordered(logits[v]!) > threshold) ids.push(v)
  for (let v = 0; v < logits.length && ids.length < k; v++) if (ordered(logits[v]!) === threshold) ids.push(v)
  const kept = Int32Array.from(ids)
  kept.sort((a, b) => ordered(logits[b]!) - ordered(logits[a]!) || a - b)
  return kept
}

// Hoare quickselect (middle pivot) for the k-th largest value; reorders `a`.
function kthLargest(a: Float64Array, k: number): number {
  let lo = 0
  let hi = a.length - 1
  const target = k - 1
  while (lo < hi) {
    const pivot = a[(lo + hi) >>> 1]!
    let i = lo
    let j = hi
    while (i <= j) {
      while (a[i]! > pivot) i++
      while (a[j]! < pivot) j--
      if (i <= j) {
        const t = a[i]!
        a[i] = a[j]!
        a[j] = t
        i++
        j--
      }
    }
    if (target <= j) hi = j
    else if (target >= i) lo = i
    else break
  }
  return a[target]!
}

/**
 * The smallest prefix of the candidates (by descending probability) whose probability reaches topP.
 * Probabilities are normalized over the candidates summed in id order. Only the candidates above a
 * cut that already holds the mass are sorted; the prefix is the same as with a full sort.
 */
function topP(logits: Float32Array, candidates: Int32Array | null, params: SamplingParams): Int32Array {
  const t = params.temperature
  const count = candidates ? candidates.length : logits.length
  const byId = candidates ? Int32Array.from(candidates).sort() : null // null: 0..count-1
  const idAt = (i: number) => (byId ? byId[i]! : i)
  // Each candidate's scaled logit and weight once (position i in id order); sums go in id order.
  const scaled = new Float64Array(count)
  let max = -Infinity
  for (let i = 0; i < count; i++) {
    scaled[i] = ordered(logits[idAt(i)]!) / t
    max = Math.max(max, scaled[i]!)
  }
  if (max === -Infinity) return candidates ?? Int32Array.from({ length: count }, (_, i) => i)
  const weights = new Float64Array(count)
  let total = 0
  for (let i = 0; i < count; i++) {
    weights[i] = Math.exp(scaled[i]! - max)
    total += weights[i]!
  }

  let sorted: Int32Array | null = candidates // top-k's candidates come sorted already
  for (let gap = 8; !sorted && gap <= 64; gap *= 2) {
    let mass = 0
    let above = 0
    for (let i = 0; i < count; i++)
      if (scaled[i]! >= max - gap) {
        above++
        mass += weights[i]!
      }
    // The margin keeps rounding in the two sums from ever deciding the outcome.
    if (mass / total >= params.topP + 1e-6) {
      const picked = new Int32Array(above)
      for (let i = 0, n = 0; i < count; i++) if (scaled[i]! >= max - gap) picked[n++] = idAt(i)
      sorted = byLogitDescending(logits, picked)
    }
  }
  sorted ??= byLogitDescending(logits, Int32Array.from({ length: count }, (_, i) => i))

  // Weights by id for the walk down the sorted prefix.
  const weightOf = new Map<number, number>()
  if (byId) for (let i = 0; i < count; i++) weightOf.set(byId[i]!, weights[i]!)
  const weight = (v: number) => (byId ? weightOf.get(v)! : weights[v]!)
  let cumulative = 0
  let n = 0
  while (n < sorted.length) {
    cumulative += weight(sorted[n]!) / total
    n++
    if (cumulative >= params.topP) break
  }
  return sorted.subarray(0, n)
}

/** The sampled token for one logits row of the token at `position`. */
export function sampleToken(logits: Float32Array, position: number, params: SamplingParams): number {
  const kept = keptTokens(logits, params)
  const count = kept ? kept.length : logits.length
  const t = params.temperature
  // Start from the most likely kept token, so most others are ruled out without computing noise.
  let best = kept ? kept[0]! : 0
  if (!kept) for (let v = 1; v < count; v++) if (ordered(logits[v]!) > ordered(logits[best]!)) best = v
  let bestScore = ordered(logits[best]!) / t + gumbelNoise(params.seed, position, best)
  for (let i = 0; i < count; i++) {
    const v = kept ? kept[i]! : i
    const scaled = ordered(logits[v]!) / t
    if (v === best || scaled + GUMBEL_MAX < bestScore) continue
    const score = scaled + gumbelNoise(params.seed, position, v)
    if (score > bestScore || (score === bestScore && v < best)) {
      bestScore = score
      best = v
    }
  }
  return best
}
