// RoPE tables: float32 as Hugging Face computes them, checked against float64 definitions.
import { describe, expect, it } from 'vitest'
import { parseModelConfig } from '../../lib/model/config.js'
import { defaultInvFreq, llama3InvFreq, ropeTable } from '../../lib/model/rope.js'

const config = (over: Record<string, unknown>) =>
  parseModelConfig({
    architectures: ['LlamaForCausalLM'],
    hidden_size: 256,
    intermediate_size: 512,
    num_hidden_layers: 1,
    num_attention_heads: 2,
    max_position_embeddings: 131072,
    vocab_size: 10,
    ...over,
  })

// Llama 3.1's scaling, in float64, from its definition.
function llama3F64(f: number): number {
  const [factor, low, high, old] = [8, 1, 4, 8192]
  const wavelen = (2 * Math.PI) / f
  if (wavelen < old / high) return f
  if (wavelen > old / low) return f / factor
  const smooth = (old / wavelen - low) / (high - low)
  return (1 - smooth) * (f / factor) + smooth * f
}

describe('rope tables', () => {
  it('inv_freq is 1/theta^(2i/D) rounded to float32', () => {
    const inv = defaultInvFreq(500000, 128)
    expect(inv).toHaveLength(64)
    for (let i = 0; i < 64; i++) {
      const exact = 1 / Math.pow(500000, (2 * i) / 128)
      expect(Math.abs(inv[i]! - exact) / exact).toBeLessThan(4e-7) // a few float32 roundings
    }
    expect(inv[0]).toBe(1)
  })

  it('llama3 scaling keeps high frequencies, divides low ones by the factor and blends between', () => {
    const base = defaultInvFreq(500000, 128)
    const scaled = llama3InvFreq(base, { factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 })
    let kept = 0
    let divided = 0
    let blended = 0
    for (let i = 0; i < 64; i++) {
      const want = llama3F64(base[i]!)
      expect(Math.abs(scaled[i]! - want) / want).toBeLessThan(1e-6)
      if (scaled[i] === base[i]) kept++
      else if (Math.abs(scaled[i]! - base[i]! / 8) / want < 1e-6) divided++
      else blended++
    }
    // All three regimes occur for Llama 3.1's parameters.
    expect([kept > 0, divided > 0, blended > 0]).toEqual([true, true, true])
  })

  it('rows hold cos then sin of position x inv_freq', () => {
    const c = config({ rope_theta: 10000, head_dim: 64 })
    const table = ropeTable(c, 300)
    const inv = defaultInvFreq(10000, 64)
    expect(Array.from(table.subarray(0, 64))).toEqual([...new Array(32).fill(1), ...new Array(32).fill(0)])
    for (const p of [1, 17, 255, 299])
      for (let i = 0; i < 32; i++) {
        const angle = p * inv[i]!
        // Float32 rounding of the angle (HF's float32 matmul) shifts it by at most p·2^-24·inv.
        const tol = angle * 2 ** -23 + 2 ** -23
        expect(Math.abs(table[p * 64 + i]! - Math.cos(angle))).toBeLessThan(tol)
        expect(Math.abs(table[p * 64 + 32 + i]! - Math.sin(angle))).toBeLessThan(tol)
      }
  })

  it('uses the config scaling', () => {
    const plain = ropeTable(config({ rope_theta: 500000, head_dim: 128 }), 2)
    const scaled = ropeTable(
      config({
        rope_theta: 500000,
        head_dim: 128,
        rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
      }),
      2,
    )
    // Row 1 holds sin(inv_freq) from index 64: the highest frequency is unchanged, the lowest divided by 8.
    expect(scaled[128 + 64]).toBe(plain[128 + 64])
    expect(scaled[128 + 127]! / plain[128 + 127]!).toBeCloseTo(1 / 8, 6)
  })
})
