// A float64 reference of the four architectures, straight from the definitions (no bf16 rounding
// anywhere), to bound the error of the native forward pass.
import type { TinyModel } from '../helpers/tiny-model.js'

type Matrix = Float64Array[] // rows

function linear(x: Matrix, w: { shape: number[]; values: Float32Array }, bias?: { values: Float32Array }): Matrix {
  const [N, K] = w.shape as [number, number]
  return x.map((row) => {
    const out = new Float64Array(N)
    for (let n = 0; n < N; n++) {
      let acc = bias ? bias.values[n]! : 0
      for (let k = 0; k < K; k++) acc += row[k]! * w.values[n * K + k]!
      out[n] = acc
    }
    return out
  })
}

function rmsnorm(row: Float64Array, w: Float32Array, eps: number, offset = 0, size = row.length): void {
  let ss = 0
  for (let i = 0; i < size; i++) ss += row[offset + i]! ** 2
  const inv = 1 / Math.sqrt(ss / size + eps)
  for (let i = 0; i < size; i++) row[offset + i] = row[offset + i]! * inv * w[i]!
}

function invFreq(config: Record<string, any>, D: number): Float64Array {
  const theta = config['rope_theta'] ?? 10000
  const inv = Float64Array.from({ length: D / 2 }, (_, i) => 1 / Math.pow(theta, (2 * i) / D))
  const s = config['rope_scaling']
  if (!s || (s.rope_type ?? s.type) !== 'llama3') return inv
  const low = s.original_max_position_embeddings / s.low_freq_factor
  const high = s.original_max_position_embeddings / s.high_freq_factor
  return inv.map((f) => {
    const wavelen = (2 * Math.PI) / f
    if (wavelen < high) return f
    if (wavelen > low) return f / s.factor
    const smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    return (1 - smooth) * (f / s.factor) + smooth * f
  })
}

function rope(row: Float64Array, heads: number, D: number, pos: number, inv: Float64Array): void {
  const half = D / 2
  for (let h = 0; h < heads; h++) {
    const o = h * D
    for (let i = 0; i < half; i++) {
      const a = pos * inv[i]!
      const x1 = row[o + i]!
      const x2 = row[o + half + i]!
      row[o + i] = x1 * Math.cos(a) - x2 * Math.sin(a)
      row[o + half + i] = x2 * Math.cos(a) + x1 * Math.sin(a)
    }
  }
}

/** Logits [T, V] of a whole sequence `tokens` (positions 0..T-1), float64. */
export function referenceLogits(model: TinyModel, tokens: number[]): Float64Array[] {
  const c = model.config as Record<string, any>
  const t = (name: string) => model.tensors.get(name)!
  const opt = (name: string) => model.tensors.get(name)
  const H: number = c['hidden_size']
  const heads: number = c['num_attention_heads']
  const kvHeads: number = c['num_key_value_heads']
  const D: number = c['head_dim'] ?? H / heads
  const eps: number = c['rms_norm_eps']
  const inv = invFreq(c, D)
  const embed = t('model.embed_tokens.weight')
  let h: Matrix = tokens.map((id) => Float64Array.from(embed.values.subarray(id * H, (id + 1) * H)))
  const T = tokens.length
  for (let l = 0; l < c['num_hidden_layers']; l++) {
    const p = `model.layers.${l}.`
    const x = h.map((r) => Float64Array.from(r))
    x.forEach((r) => rmsnorm(r, t(`${p}input_layernorm.weight`).values, eps))
    const q = linear(x, t(`${p}self_attn.q_proj.weight`), opt(`${p}self_attn.q_proj.bias`))
    const k = linear(x, t(`${p}self_attn.k_proj.weight`), opt(`${p}self_attn.k_proj.bias`))
    const v = linear(x, t(`${p}self_attn.v_proj.weight`), opt(`${p}self_attn.v_proj.bias`))
    const qn = opt(`${p}self_attn.q_norm.weight`)
    const kn = opt(`${p}self_attn.k_norm.weight`)
    for (let i = 0; i < T; i++) {
      if (qn) for (let hh = 0; hh < heads; hh++) rmsnorm(q[i]!, qn.values, eps, hh * D, D)
      if (kn) for (let hh = 0; hh < kvHeads; hh++) rmsnorm(k[i]!, kn.values, eps, hh * D, D)
      rope(q[i]!, heads, D, i, inv)
      rope(k[i]!, kvHeads, D, i, inv)
    }
    const attn: Matrix = []
    for (let i = 0; i < T; i++) {
      const out = new Float64Array(heads * D)
      for (let hh = 0; hh < heads; hh++) {
        const kvh = Math.floor(hh / (heads / kvHeads))
        const scores = new Float64Array(i + 1)
        let max = -Infinity
        for (let j = 0; j <= i; j++) {
          let s = 0
          for (let d = 0; d < D; d++) s += q[i]![hh * D + d]! * k[j]![kvh * D + d]!
          scores[j] = s / Math.sqrt(D)
          max = Math.max(max, scores[j]!)
        }
        let sum = 0
        for (let j = 0; j <= i; j++) sum += scores[j] = Math.exp(scores[j]! - max)
        for (let j = 0; j <= i; j++)
          for (let d = 0; d < D; d++) out[hh * D + d] = out[hh * D + d]! + (scores[j]! / sum) * v[j]![kvh * D + d]!
      }
      attn.push(out)
    }
    const o = linear(attn, t(`${p}self_attn.o_proj.weight`), opt(`${p}self_attn.o_proj.bias`))
    h = h.map((r, i) => r.map((val, j) => val + o[i]![j]!))
    const y = h.map((r) => Float64Array.from(r))
    y.forEach((r) => rmsnorm(r, t(`${p}post_attention_layernorm.weight`).values, eps))
    const gate = linear(y, t(`${p}mlp.gate_proj.weight`))
    const up = linear(y, t(`${p}mlp.up_proj.weight`))
    const act = gate.map((g, i) => g.map((gv, j) => (gv / (1 + Math.exp(-gv))) * up[i]![j]!))
    const down = linear(act, t(`${p}mlp.down_proj.weight`))
    h = h.map((r, i) => r.map((val, j) => val + down[i]![j]!))
  }
  h.forEach((r) => rmsnorm(r, t('model.norm.weight').values, eps))
  return linear(h, opt('lm_head.weight') ?? embed)
}
