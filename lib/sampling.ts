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

/** Ids of the tokens that may be drawn, in descending logit order (lowest id first on ties). */
export function keptTokens(logits: Float32Array, params: SamplingParams): Int32Array {
  const vocab = logits.length
  const limitK = params.topK > 0 && params.topK < vocab
  if (!limitK && params.topP >= 1) return Int32Array.from({ length: vocab }, (_, i) => i)

  const order = Int32Array.from({ length: vocab }, (_, i) => i)
  order.sort((a, b) => logits[b]! - logits[a]! || a - b)
  let kept = limitK ? order.subarray(0, params.topK) : order
  if (params.topP < 1) {
    // Probabilities under the temperature, over the top-k set.
    const t = params.temperature
    const max = logits[kept[0]!]! / t
    let total = 0
    for (let i = 0; i < kept.length; i++) total += Math.exp(logits[kept[i]!]! / t - max)
    let cumulative = 0
    let n = 0
    while (n < kept.length) {
      cumulative += Math.exp(logits[kept[n]!]! / t - max) / total
      n++
      if (cumulative >= params.topP) break
    }
    kept = kept.subarray(0, n)
  }
  return kept
}

/** The sampled token for one logits row of the token at `position`. */
export function sampleToken(logits: Float32Array, position: number, params: SamplingParams): number {
  const kept = keptTokens(logits, params)
  let best = -1
  let bestScore = -Infinity
  for (let i = 0; i < kept.length; i++) {
    const v = kept[i]!
    const score = logits[v]! / params.temperature + gumbelNoise(params.seed, position, v)
    if (score > bestScore || (score === bestScore && v < best)) {
      bestScore = score
      best = v
    }
  }
  // Every kept logit was -Infinity or NaN: fall back to the most likely token.
  return best >= 0 ? best : kept[0]!
}
