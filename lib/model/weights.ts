// Hugging Face tensor names -> bf16 device tensors, each shape checked against the config; q/k/v and
// gate/up are concatenated into one tensor each (fusedTensors).
import { native, type DeviceName, type NativeTensor } from '../native.js'
import type { ModelConfig } from './config.js'
import { SafetensorsCheckpoint, toBf16Bits, type TensorInfo } from './safetensors.js'
import { basename, join } from 'node:path'
import { invalidField } from '../errors.js'

export interface LayerWeights {
  inputNorm: NativeTensor // [H]
  /** q_proj, k_proj and v_proj concatenated by rows at load: one product gives [T, q | k | v]. */
  qkvProj: NativeTensor // [(heads + 2*kvHeads)*D, H]
  oProj: NativeTensor // [H, heads*D]
  qkvBias: NativeTensor | null // [(heads + 2*kvHeads)*D]
  oBias: NativeTensor | null // [H]
  qNorm: NativeTensor | null // [D] (Qwen3)
  kNorm: NativeTensor | null // [D] (Qwen3)
  postAttentionNorm: NativeTensor // [H]
  /** gate_proj and up_proj concatenated by rows at load: one product gives [T, gate | up]. */
  gateUpProj: NativeTensor // [2I, H]
  downProj: NativeTensor // [H, I]
  gateUpBias: NativeTensor | null // [2I]
  downBias: NativeTensor | null // [H]
}

export interface ModelWeights {
  embedTokens: NativeTensor // [V, H]
  layers: LayerWeights[]
  norm: NativeTensor // [H]
  /** lm_head.weight, or embed_tokens when the embeddings are tied. */
  lmHead: NativeTensor // [V, H]
}

export interface LoadProgress {
  loadedBytes: number
  totalBytes: number
}

interface Wanted {
  name: string
  shape: number[]
}

/** The tensors a config implies, in the order they are loaded. */
export function expectedTensors(c: ModelConfig): Wanted[] {
  const H = c.hiddenSize
  const I = c.intermediateSize
  const q = c.numHeads * c.headDim
  const kv = c.numKvHeads * c.headDim
  const list: Wanted[] = [{ name: 'model.embed_tokens.weight', shape: [c.vocabSize, H] }]
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}.`
    list.push({ name: `${p}input_layernorm.weight`, shape: [H] })
    list.push({ name: `${p}self_attn.q_proj.weight`, shape: [q, H] })
    list.push({ name: `${p}self_attn.k_proj.weight`, shape: [kv, H] })
    list.push({ name: `${p}self_attn.v_proj.weight`, shape: [kv, H] })
    list.push({ name: `${p}self_attn.o_proj.weight`, shape: [H, q] })
    if (c.qkvBias) {
      list.push({ name: `${p}self_attn.q_proj.bias`, shape: [q] })
      list.push({ name: `${p}self_attn.k_proj.bias`, shape: [kv] })
      list.push({ name: `${p}self_attn.v_proj.bias`, shape: [kv] })
    }
    if (c.outputBias) list.push({ name: `${p}self_attn.o_proj.bias`, shape: [H] })
    if (c.qkNorm) {
      list.push({ name: `${p}self_attn.q_norm.weight`, shape: [c.headDim] })
      list.push({ name: `${p}self_attn.k_norm.weight`, shape: [c.headDim] })
    }
    list.push({ name: `${p}post_attention_layernorm.weight`, shape: [H] })
    list.push({ name: `${p}mlp.gate_proj.weight`, shape: [I, H] })
    list.push({ name: `${p}mlp.up_proj.weight`, shape: [I, H] })
    list.push({ name: `${p}mlp.down_proj.weight`, shape: [H, I] })
    if (c.mlpBias) {
      list.push({ name: `${p}mlp.gate_proj.bias`, shape: [I] })
      list.push({ name: `${p}mlp.up_proj.bias`, shape: [I] })
      list.push({ name: `${p}mlp.down_proj.bias`, shape: [H] })
    }
  }
  list.push({ name: 'model.norm.weight', shape: [H] })
  if (!c.tieWordEmbeddings) list.push({ name: 'lm_head.weight', shape: [c.vocabSize, H] })
  return list
}

/**
 * The weights loaded as one tensor: their rows concatenated in this order (name of the fused
 * tensor -> the checkpoint's tensors). Each output element of a product over the fused weight is
 * the same dot product as over its own weight, so fusing changes launches, not bits.
 */
export function fusedTensors(c: ModelConfig): Map<string, string[]> {
  const groups = new Map<string, string[]>()
  for (let l = 0; l < c.numLayers; l++) {
    const a = `model.layers.${l}.self_attn.`
    const m = `model.layers.${l}.mlp.`
    groups.set(`${a}qkv_proj.weight`, [`${a}q_proj.weight`, `${a}k_proj.weight`, `${a}v_proj.weight`])
    if (c.qkvBias) groups.set(`${a}qkv_proj.bias`, [`${a}q_proj.bias`, `${a}k_proj.bias`, `${a}v_proj.bias`])
    groups.set(`${m}gate_up_proj.weight`, [`${m}gate_proj.weight`, `${m}up_proj.weight`])
    if (c.mlpBias) groups.set(`${m}gate_up_proj.bias`, [`${m}gate_proj.bias`, `${m}up_proj.bias`])
  }
  return groups
}

function shapeText(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`
}

/** Tensors a checkpoint may hold that no architecture reads (buffers older exports saved). */
const IGNORED_TENSOR = /\.rotary_emb\.inv_freq$/

/** Why a tensor the config does not use may be there: the config field that would use it. */
function unusedHint(name: string, c: ModelConfig): string {
  if (/self_attn\.[qk]_norm\.weight$/.test(name)) return `; per-head q/k norms belong to Qwen3ForCausalLM, but architectures names ${c.architecture}`
  if (/self_attn\.[qkv]_proj\.bias$/.test(name)) return '; q/k/v biases belong to Qwen2ForCausalLM, or need attention_bias: true'
  if (/self_attn\.o_proj\.bias$/.test(name)) return '; an o_proj bias needs attention_bias: true (Llama, Qwen3)'
  if (/mlp\.\w+_proj\.bias$/.test(name)) return '; MLP biases need mlp_bias: true (Llama)'
  if (name === 'lm_head.weight') return '; tie_word_embeddings is true, so the output head would be model.embed_tokens.weight'
  return ''
}

/** The layer count the tensor names imply (model.layers.<i>.*), checked against num_hidden_layers before any list is built. */
function checkLayerCount(checkpoint: SafetensorsCheckpoint, config: ModelConfig, configFile: string): void {
  let maxLayer = -1
  const seen = new Set<number>()
  for (const name of checkpoint.tensors.keys()) {
    const m = /^model\.layers\.(\d+)\./.exec(name)
    if (!m) continue
    const l = Number(m[1])
    seen.add(l)
    maxLayer = Math.max(maxLayer, l)
  }
  if (maxLayer + 1 !== config.numLayers && seen.size > 0)
    throw invalidField(
      `the number of layers of the weights in ${checkpoint.dir} (${maxLayer + 1}: model.layers.0 to model.layers.${maxLayer})`,
      'num_hidden_layers',
      configFile,
      config.numLayers,
    )
}

/**
 * Checks the checkpoint against the config before reading any tensor: the layer count, every
 * tensor the config implies present with its shape, and no tensor the config leaves unused (a
 * checkpoint of another architecture or size would otherwise load with part of it ignored).
 */
export function checkTensors(checkpoint: SafetensorsCheckpoint, config: ModelConfig, configFile = 'config.json'): TensorInfo[] {
  checkLayerCount(checkpoint, config, configFile)
  const wanted = expectedTensors(config)
  const infos = wanted.map(({ name, shape }) => {
    const info = checkpoint.tensors.get(name)
    if (!info)
      throw new Error(
        `tensor ${name} is missing from the weights in ${checkpoint.dir} (the ${config.architecture} configuration needs it)`,
      )
    if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i]))
      throw new Error(
        `tensor ${name} in ${basename(info.file)} has shape ${shapeText(info.shape)} but the config implies ${shapeText(shape)}`,
      )
    return info
  })
  const used = new Set(wanted.map((w) => w.name))
  for (const [name, info] of checkpoint.tensors)
    if (!used.has(name) && !IGNORED_TENSOR.test(name))
      throw new Error(
        `tensor ${name} in ${basename(info.file)} is not used by the ${config.architecture} configuration of ${configFile}` +
          `${unusedHint(name, config)}; the weights must match their config.json`,
      )
  return infos
}

/** Index of the first NaN or infinity among bf16 bits, or -1. */
export function firstNonFinite(bits: Uint16Array): number {
  // Two bf16 values per 32-bit word: an exponent of all ones carries into the word's top bit of
  // its half when 0x0080 is added (0x7f80 + 0x0080 = 0x8000); scan words, then find the element.
  if (bits.byteOffset % 4 === 0) {
    const words = new Uint32Array(bits.buffer, bits.byteOffset, bits.length >>> 1)
    let acc = 0
    for (let i = 0; i < words.length; i++) acc |= (words[i]! & 0x7f807f80) + 0x00800080
    if ((acc & 0x80008000) === 0 && (bits.length % 2 === 0 || (bits[bits.length - 1]! & 0x7f80) !== 0x7f80)) return -1
  }
  for (let i = 0; i < bits.length; i++) if ((bits[i]! & 0x7f80) === 0x7f80) return i
  return -1
}

function nonFiniteError(info: TensorInfo, bits: Uint16Array, at: number): Error {
  const value = (bits[at]! & 0x007f) !== 0 ? 'NaN' : bits[at]! & 0x8000 ? '-Infinity' : 'Infinity'
  const index: number[] = []
  let rest = at
  for (let d = info.shape.length - 1; d >= 0; d--) {
    index.unshift(rest % info.shape[d]!)
    rest = Math.floor(rest / info.shape[d]!)
  }
  return new Error(
    `tensor ${info.name} in ${basename(info.file)} holds ${value} at [${index.join(', ')}]` +
      (info.dtype === 'BF16' ? '' : ` (after conversion from ${info.dtype} to bf16)`) +
      '; a model with non-finite weights gives non-finite logits',
  )
}

export interface LoadWeightsOptions {
  onProgress?: (p: LoadProgress) => void
  /**
   * Called with the checkpoint's tensors once their headers are checked against the config, before
   * any is read or uploaded: where a load that cannot fit on the device is refused. A throw ends
   * the load.
   */
  beforeUpload?: (tensors: readonly TensorInfo[]) => void
}

/**
 * Reads every weight of `config` from the checkpoint in `dir` onto `device` as bf16. When an
 * upload fails (out of device memory, say), the tensors uploaded so far are freed and the error
 * names the tensor.
 */
export async function loadWeights(
  dir: string,
  config: ModelConfig,
  device: DeviceName,
  { onProgress, beforeUpload }: LoadWeightsOptions = {},
): Promise<ModelWeights> {
  const checkpoint = await SafetensorsCheckpoint.open(dir)
  const loaded = new Map<string, NativeTensor>()
  // A part of a fused tensor waits on the host until its group is complete, then the group is
  // uploaded as one tensor (the parts are adjacent in expectedTensors' order).
  const groupOf = new Map<string, [string, string[]]>()
  for (const [name, parts] of fusedTensors(config)) for (const part of parts) groupOf.set(part, [name, parts])
  const waiting = new Map<string, { info: TensorInfo; bits: Uint16Array }>()
  const upload = (what: string, shape: number[], bits: Uint16Array): NativeTensor => {
    try {
      return native().fromBuffer(device, 'bf16', shape, bits)
    } catch (err) {
      throw allocationError(`load ${what} onto ${device}`, 'bf16', shape, dir, err)
    }
  }
  // The next tensor is read from disk while this one is scanned and copied to the device.
  let reading: Promise<Buffer> | null = null
  try {
    const infos = checkTensors(checkpoint, config, join(dir, 'config.json'))
    beforeUpload?.(infos)
    const totalBytes = infos.reduce((s, t) => s + t.nbytes, 0)
    let loadedBytes = 0
    onProgress?.({ loadedBytes, totalBytes })
    reading = infos.length > 0 ? checkpoint.read(infos[0]!) : null
    for (let i = 0; i < infos.length; i++) {
      const info = infos[i]!
      const bytes = await reading!
      reading = i + 1 < infos.length ? checkpoint.read(infos[i + 1]!) : null
      const bits = toBf16Bits(info, bytes)
      // A NaN or infinite weight makes every logit downstream of it non-finite; the scan costs
      // about 1 ns per weight, hidden by the read of the next tensor, so it always runs.
      const bad = firstNonFinite(bits)
      if (bad >= 0) throw nonFiniteError(info, bits, bad)
      const group = groupOf.get(info.name)
      if (!group) {
        loaded.set(info.name, upload(`tensor ${info.name}`, info.shape, bits))
      } else {
        waiting.set(info.name, { info, bits })
        const [name, parts] = group
        if (parts.every((p) => waiting.has(p))) {
          const members = parts.map((p) => waiting.get(p)!)
          const what = `tensors ${parts.join(', ')} (concatenated)`
          loaded.set(name, upload(what, concatRows(members.map((m) => m.info.shape)), concatBits(members.map((m) => m.bits))))
          for (const p of parts) waiting.delete(p)
        }
      }
      loadedBytes += info.nbytes
      onProgress?.({ loadedBytes, totalBytes })
    }
  } catch (err) {
    // A read still in flight must settle before its file is closed, and its failure is moot.
    await reading?.catch(() => {})
    for (const t of loaded.values()) t.dispose()
    throw err
  } finally {
    await checkpoint.close()
  }
  return assemble(config, loaded)
}

/**
 * The error of a failed allocation or upload while loading the model in `dir` (`action`: what was
 * being done, naming the tensor), with the native error as its message's end and its cause.
 */
export function allocationError(action: string, dtype: string, shape: readonly number[], dir: string, cause: unknown): Error {
  const reason = cause instanceof Error ? cause.message : String(cause)
  const bytes = shape.reduce((a, b) => a * b, 1) * (dtype === 'bf16' ? 2 : 4)
  const size = bytes >= 2 ** 20 ? `${(bytes / 2 ** 20).toFixed(2)} MiB` : `${bytes} bytes`
  return new Error(`Could not ${action} (${dtype} ${shapeText(shape)}, ${size}) while loading the model in ${dir}: ${reason}`, { cause })
}

/** Shape of tensors stacked along their first dimension. */
function concatRows(shapes: number[][]): number[] {
  return [shapes.reduce((s, d) => s + d[0]!, 0), ...shapes[0]!.slice(1)]
}

function concatBits(parts: Uint16Array[]): Uint16Array {
  const out = new Uint16Array(parts.reduce((s, p) => s + p.length, 0))
  let at = 0
  for (const p of parts) {
    out.set(p, at)
    at += p.length
  }
  return out
}

function assemble(c: ModelConfig, t: Map<string, NativeTensor>): ModelWeights {
  const get = (name: string) => t.get(name)!
  const opt = (name: string) => t.get(name) ?? null
  const layers: LayerWeights[] = []
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}.`
    layers.push({
      inputNorm: get(`${p}input_layernorm.weight`),
      qkvProj: get(`${p}self_attn.qkv_proj.weight`),
      oProj: get(`${p}self_attn.o_proj.weight`),
      qkvBias: opt(`${p}self_attn.qkv_proj.bias`),
      oBias: opt(`${p}self_attn.o_proj.bias`),
      qNorm: opt(`${p}self_attn.q_norm.weight`),
      kNorm: opt(`${p}self_attn.k_norm.weight`),
      postAttentionNorm: get(`${p}post_attention_layernorm.weight`),
      gateUpProj: get(`${p}mlp.gate_up_proj.weight`),
      downProj: get(`${p}mlp.down_proj.weight`),
      gateUpBias: opt(`${p}mlp.gate_up_proj.bias`),
      downBias: opt(`${p}mlp.down_proj.bias`),
    })
  }
  const embedTokens = get('model.embed_tokens.weight')
  return {
    embedTokens,
    layers,
    norm: get('model.norm.weight'),
    lmHead: c.tieWordEmbeddings ? embedTokens : get('lm_head.weight'),
  }
}

/** Frees every tensor of the model (a tied lm_head once). */
export function disposeWeights(w: ModelWeights): void {
  const all = new Set<NativeTensor>([w.embedTokens, w.norm, w.lmHead])
  for (const layer of w.layers) for (const t of Object.values(layer)) if (t) all.add(t)
  for (const t of all) t.dispose()
}
