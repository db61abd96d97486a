// RoPE tables computed as Hugging Face transformers computes them, in float32 step by step
// (Math.fround after every operation PyTorch does in float32), so the angles match its table.
import type { ModelConfig } from './config.js'

const f = Math.fround

/** inv_freq[i] = 1 / theta^(2i/D) in float32 (HF _compute_default_rope_parameters). */
export function defaultInvFreq(theta: number, headDim: number): Float32Array {
  const half = headDim / 2
  const out = new Float32Array(half)
  for (let i = 0; i < half; i++) out[i] = f(1 / f(Math.pow(f(theta), f((2 * i) / headDim))))
  return out
}

/** Llama 3's scaling of inv_freq (HF _compute_llama3_parameters), float32 throughout. */
export function llama3InvFreq(
  invFreq: Float32Array,
  s: { factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositionEmbeddings: number },
): Float32Array {
  const factor = f(s.factor)
  const lowWavelen = f(s.originalMaxPositionEmbeddings / s.lowFreqFactor)
  const highWavelen = f(s.originalMaxPositionEmbeddings / s.highFreqFactor)
  const oldContext = f(s.originalMaxPositionEmbeddings)
  const lowFactor = f(s.lowFreqFactor)
  const span = f(s.highFreqFactor - s.lowFreqFactor)
  const twoPi = f(2 * Math.PI)
  const out = new Float32Array(invFreq.length)
  for (let i = 0; i < invFreq.length; i++) {
    const inv = invFreq[i]!
    const wavelen = f(twoPi / inv)
    const scaled = wavelen > lowWavelen ? f(inv / factor) : inv
    const smooth = f(f(f(oldContext / wavelen) - lowFactor) / span)
    const smoothed = f(f(f(f(1 - smooth) * scaled) / factor) + f(smooth * scaled))
    const medium = !(wavelen < highWavelen) && !(wavelen > lowWavelen)
    out[i] = medium ? smoothed : scaled
  }
  return out
}

export function ropeInvFreq(config: ModelConfig): Float32Array {
  const inv = defaultInvFreq(config.ropeTheta, config.headDim)
  return config.ropeScaling ? llama3InvFreq(inv, config.ropeScaling) : inv
}

/**
 * The cos/sin table the rope op reads: f32 [positions, D], row p = cos(p·inv_freq[0..D/2)) then
 * sin(p·inv_freq[0..D/2)), with the angle p·inv_freq rounded to float32 as HF's matmul does.
 */
export function ropeTable(config: ModelConfig, positions: number): Float32Array {
  const inv = ropeInvFreq(config)
  const D = config.headDim
  const half = D / 2
  const table = new Float32Array(positions * D)
  for (let p = 0; p < positions; p++) {
    const row = p * D
    for (let i = 0; i < half; i++) {
      const angle = f(p * inv[i]!)
      table[row + i] = Math.cos(angle)
      table[row + half + i] = Math.sin(angle)
    }
  }
  return table
}
