// Tiny random models written in the real Hugging Face format (config.json, model.safetensors or
// shards with model.safetensors.index.json, tokenizer.json, tokenizer_config.json,
// generation_config.json), for tests of the loader, the tokenizer and the forward pass.
// Weight values are bf16 numbers of magnitude >= 2^-14, so F16 and F32 files hold them exactly
// and every file dtype loads to the same bf16 bits.
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { roundBf16 } from '../../lib/tensor.js'
import { randomNormal } from './random.js'

export type TinyArchitecture = 'LlamaForCausalLM' | 'Qwen2ForCausalLM' | 'Qwen3ForCausalLM' | 'MistralForCausalLM'
export type FileDType = 'BF16' | 'F16' | 'F32'

export interface TinyModelSpec {
  architecture: TinyArchitecture
  hiddenSize?: number
  intermediateSize?: number
  numLayers?: number
  numHeads?: number
  numKvHeads?: number
  /** Written as head_dim when set; otherwise hidden/heads is implied. */
  headDim?: number
  /** vocab_size (default: the tokenizer's 270 ids plus 3 of padding); larger pads further. */
  vocabSize?: number
  maxPositions?: number
  ropeTheta?: number
  ropeScaling?: Record<string, unknown>
  tieWordEmbeddings?: boolean
  attentionBias?: boolean
  dtype?: FileDType
  /** Number of safetensors shards (1: a single model.safetensors). */
  shards?: number
  seed?: number
  /** Extra or replaced config.json fields. */
  configOverrides?: Record<string, unknown>
  addBosToken?: boolean
}

export interface TinyModel {
  dir: string
  config: Record<string, unknown>
  /** Every tensor as written (float values, exactly representable in bf16). */
  tensors: Map<string, { shape: number[]; values: Float32Array }>
}

// ---------------------------------------------------------------------------------------------
// A byte-level BPE tokenizer: the 256 byte symbols, a few merges, special tokens.

/** GPT-2's byte -> printable character map (the ByteLevel convention). */
export function byteSymbols(): string[] {
  const keep: number[] = []
  for (let b = 33; b <= 126; b++) keep.push(b)
  for (let b = 161; b <= 172; b++) keep.push(b)
  for (let b = 174; b <= 255; b++) keep.push(b)
  const symbols: string[] = new Array(256)
  let extra = 0
  for (let b = 0; b < 256; b++) symbols[b] = keep.includes(b) ? String.fromCharCode(b) : String.fromCharCode(256 + extra++)
  return symbols
}

const MERGES: [string, string][] = [
  ['Ġ', 't'], ['h', 'e'], ['Ġt', 'he'], ['Ġ', 'a'], ['i', 'n'], ['o', 'u'], ['e', 'r'], ['Ġ', 's'], ['Ã', '©'],
]
export const SPECIAL_TOKENS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<s>', '</s>']

export function tinyTokenizerJson(): { json: Record<string, unknown>; size: number } {
  const vocab: Record<string, number> = {}
  byteSymbols().forEach((s, i) => (vocab[s] = i))
  let next = 256
  for (const [a, b] of MERGES) vocab[a + b] = next++
  const added = SPECIAL_TOKENS.map((content) => ({
    id: next++,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }))
  const json = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: true },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: MERGES.map(([a, b]) => `${a} ${b}`),
    },
  }
  return { json, size: next }
}

export const CHAT_TEMPLATE =
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

// ---------------------------------------------------------------------------------------------
// safetensors writing

const f32 = new Float32Array(1)
const u32 = new Uint32Array(f32.buffer)

/** f16 bits of a value that f16 holds exactly (normal range). */
function f16Bits(v: number): number {
  f32[0] = v
  const bits = u32[0]!
  const sign = (bits >>> 16) & 0x8000
  if ((bits & 0x7fffffff) === 0) return sign
  const exp = ((bits >>> 23) & 0xff) - 127 + 15
  if (exp <= 0 || exp >= 31 || (bits & 0x1fff) !== 0) throw new Error(`f16 cannot hold ${v} exactly`)
  return sign | (exp << 10) | ((bits >>> 13) & 0x3ff)
}

export function encodeTensor(values: Float32Array, dtype: FileDType): Buffer {
  if (dtype === 'F32') return Buffer.from(values.buffer, values.byteOffset, values.byteLength)
  const out = new Uint16Array(values.length)
  for (let i = 0; i < values.length; i++) {
    if (dtype === 'BF16') {
      f32[0] = values[i]!
      out[i] = u32[0]! >>> 16
    } else {
      out[i] = f16Bits(values[i]!)
    }
  }
  return Buffer.from(out.buffer)
}

/** Bytes of a safetensors file holding `tensors` (raw, already encoded). */
export function safetensorsBytes(
  tensors: { name: string; dtype: string; shape: number[]; data: Buffer }[],
  metadata?: Record<string, string>,
): Buffer {
  const header: Record<string, unknown> = {}
  if (metadata) header['__metadata__'] = metadata
  let offset = 0
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.length] }
    offset += t.data.length
  }
  let json = JSON.stringify(header)
  while ((8 + Buffer.byteLength(json)) % 8 !== 0) json += ' '
  const head = Buffer.alloc(8)
  head.writeBigUInt64LE(BigInt(Buffer.byteLength(json)))
  return Buffer.concat([head, Buffer.from(json), ...tensors.map((t) => t.data)])
}

// ---------------------------------------------------------------------------------------------
// The model

/** Random values rounded to bf16, none smaller in magnitude than 2^-14 (f16's normal range). */
function weightValues(n: number, seed: number, std: number, mean = 0): Float32Array {
  const v = randomNormal(n, seed, std)
  for (let i = 0; i < n; i++) v[i] = v[i]! + mean
  const r = roundBf16(v)
  for (let i = 0; i < n; i++) if (Math.abs(r[i]!) < 2 ** -14) r[i] = r[i]! < 0 ? -(2 ** -14) : 2 ** -14
  return r
}

export function writeTinyModel(dir: string, spec: TinyModelSpec): TinyModel {
  const H = spec.hiddenSize ?? 64
  const I = spec.intermediateSize ?? 96
  const L = spec.numLayers ?? 2
  const heads = spec.numHeads ?? 4
  const kvHeads = spec.numKvHeads ?? 2
  const D = spec.headDim ?? H / heads
  const { json: tokenizerJson, size: tokenizerSize } = tinyTokenizerJson()
  const V = spec.vocabSize ?? tokenizerSize + 3 // padded like real checkpoints
  const arch = spec.architecture
  const qkvBias = arch === 'Qwen2ForCausalLM' || spec.attentionBias === true
  const oBias = arch !== 'Qwen2ForCausalLM' && spec.attentionBias === true
  const tied = spec.tieWordEmbeddings ?? false
  const dtype = spec.dtype ?? 'BF16'
  const eosId = tokenizerSize - SPECIAL_TOKENS.length // <|endoftext|>
  const bosId = tokenizerSize - 2 // <s>
  const modelType = { LlamaForCausalLM: 'llama', Qwen2ForCausalLM: 'qwen2', Qwen3ForCausalLM: 'qwen3', MistralForCausalLM: 'mistral' }[arch]

  const config: Record<string, unknown> = {
    architectures: [arch],
    model_type: modelType,
    hidden_size: H,
    intermediate_size: I,
    num_hidden_layers: L,
    num_attention_heads: heads,
    num_key_value_heads: kvHeads,
    ...(spec.headDim !== undefined && { head_dim: spec.headDim }),
    hidden_act: 'silu',
    max_position_embeddings: spec.maxPositions ?? 512,
    rms_norm_eps: 1e-6,
    rope_theta: spec.ropeTheta ?? 10000,
    rope_scaling: spec.ropeScaling ?? null,
    tie_word_embeddings: tied,
    vocab_size: V,
    torch_dtype: { BF16: 'bfloat16', F16: 'float16', F32: 'float32' }[dtype],
    bos_token_id: bosId,
    eos_token_id: eosId,
    ...(arch === 'MistralForCausalLM' && { sliding_window: null }),
    ...(arch !== 'MistralForCausalLM' && arch !== 'Qwen2ForCausalLM' && { attention_bias: spec.attentionBias ?? false }),
    ...(arch.startsWith('Qwen') && { use_sliding_window: false }),
    ...spec.configOverrides,
  }

  let seed = spec.seed ?? 1
  const tensors = new Map<string, { shape: number[]; values: Float32Array }>()
  const add = (name: string, shape: number[], std: number, mean = 0) =>
    tensors.set(name, { shape, values: weightValues(shape.reduce((a, b) => a * b, 1), seed++, std, mean) })
  add('model.embed_tokens.weight', [V, H], 1)
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.`
    add(`${p}input_layernorm.weight`, [H], 0.1, 1)
    add(`${p}self_attn.q_proj.weight`, [heads * D, H], 1 / Math.sqrt(H))
    add(`${p}self_attn.k_proj.weight`, [kvHeads * D, H], 1 / Math.sqrt(H))
    add(`${p}self_attn.v_proj.weight`, [kvHeads * D, H], 1 / Math.sqrt(H))
    add(`${p}self_attn.o_proj.weight`, [H, heads * D], 1 / Math.sqrt(heads * D))
    if (qkvBias) {
      add(`${p}self_attn.q_proj.bias`, [heads * D], 0.1)
      add(`${p}self_attn.k_proj.bias`, [kvHeads * D], 0.1)
      add(`${p}self_attn.v_proj.bias`, [kvHeads * D], 0.1)
    }
    if (oBias) add(`${p}self_attn.o_proj.bias`, [H], 0.1)
    if (arch === 'Qwen3ForCausalLM') {
      add(`${p}self_attn.q_norm.weight`, [D], 0.1, 1)
      add(`${p}self_attn.k_norm.weight`, [D], 0.1, 1)
    }
    add(`${p}post_attention_layernorm.weight`, [H], 0.1, 1)
    add(`${p}mlp.gate_proj.weight`, [I, H], 1 / Math.sqrt(H))
    add(`${p}mlp.up_proj.weight`, [I, H], 1 / Math.sqrt(H))
    add(`${p}mlp.down_proj.weight`, [H, I], 1 / Math.sqrt(I))
  }
  add('model.norm.weight', [H], 0.1, 1)
  if (!tied) add('lm_head.weight', [V, H], 1 / Math.sqrt(H))

  mkdirSync(dir, { recursive: true })
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config, null, 2))
  const entries = [...tensors].map(([name, t]) => ({ name, dtype, shape: t.shape, data: encodeTensor(t.values, dtype) }))
  const shards = spec.shards ?? 1
  if (shards === 1) {
    writeFileSync(join(dir, 'model.safetensors'), safetensorsBytes(entries, { format: 'pt' }))
  } else {
    const weightMap: Record<string, string> = {}
    const per = Math.ceil(entries.length / shards)
    for (let s = 0; s < shards; s++) {
      const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`
      const part = entries.slice(s * per, (s + 1) * per)
      for (const e of part) weightMap[e.name] = file
      writeFileSync(join(dir, file), safetensorsBytes(part, { format: 'pt' }))
    }
    const total = entries.reduce((a, e) => a + e.data.length, 0)
    writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2))
  }
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(tokenizerJson))
  writeFileSync(
    join(dir, 'tokenizer_config.json'),
    JSON.stringify({
      add_bos_token: spec.addBosToken ?? arch === 'LlamaForCausalLM',
      bos_token: '<s>',
      eos_token: { content: '</s>', special: true },
      unk_token: null,
      clean_up_tokenization_spaces: false,
      chat_template: CHAT_TEMPLATE,
    }),
  )
  writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ bos_token_id: bosId, eos_token_id: [eosId, eosId + 2] }))
  return { dir, config, tensors }
}
