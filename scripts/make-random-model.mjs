#!/usr/bin/env node
// Writes a Hugging Face model directory (config.json, model.safetensors, generation_config.json,
// tokenizer files) with random bf16 weights at a real architecture's shapes, for the determinism
// suite when no real checkpoint is at hand. The weights are a pure function of the seed:
// weight i of tensor t is drawn from a xorshift stream seeded by (seed, t), uniform with the
// standard deviation given below (0.02 for projections and embeddings), norms are 1.
//
//   node scripts/make-random-model.mjs --shape qwen3-0.6b --seed 1234 --out /tmp/qwen3-0.6b-random
//
// Shapes: qwen3-0.6b, qwen3-8b, llama3.1-8b, mistral-7b (the published config.json dimensions;
// the 7B and 8B ones write 14.5-16 GB), and qwen3-tiny for quick runs.
//
// The tokenizer files are copied from the shipped default model (its vocabulary is smaller than
// the model's: prompts use its ids, and generated ids beyond it decode to nothing).
import { closeSync, copyFileSync, existsSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

export const SHAPES = {
  // Qwen/Qwen3-0.6B's config.json dimensions.
  'qwen3-0.6b': {
    architectures: ['Qwen3ForCausalLM'],
    model_type: 'qwen3',
    hidden_size: 1024,
    intermediate_size: 3072,
    num_hidden_layers: 28,
    num_attention_heads: 16,
    num_key_value_heads: 8,
    head_dim: 128,
    vocab_size: 151936,
    max_position_embeddings: 40960,
    rope_theta: 1000000,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: true,
    attention_bias: false,
    hidden_act: 'silu',
    torch_dtype: 'bfloat16',
  },
  // Qwen/Qwen3-8B's config.json dimensions.
  'qwen3-8b': {
    architectures: ['Qwen3ForCausalLM'],
    model_type: 'qwen3',
    hidden_size: 4096,
    intermediate_size: 12288,
    num_hidden_layers: 36,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    head_dim: 128,
    vocab_size: 151936,
    max_position_embeddings: 40960,
    rope_theta: 1000000,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: false,
    attention_bias: false,
    hidden_act: 'silu',
    torch_dtype: 'bfloat16',
  },
  // meta-llama/Llama-3.1-8B's config.json dimensions (head_dim 4096/32 = 128 is implied), with
  // its llama3 RoPE scaling.
  'llama3.1-8b': {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    vocab_size: 128256,
    max_position_embeddings: 131072,
    rope_theta: 500000,
    rope_scaling: {
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
      rope_type: 'llama3',
    },
    rms_norm_eps: 1e-5,
    tie_word_embeddings: false,
    attention_bias: false,
    mlp_bias: false,
    hidden_act: 'silu',
    torch_dtype: 'bfloat16',
  },
  // mistralai/Mistral-7B-v0.3's config.json dimensions: a 32,768-token vocabulary, so an LM head
  // of 32,768 x 4,096 beside gate|up's 28,672 x 4,096 (sliding_window null: full attention).
  'mistral-7b': {
    architectures: ['MistralForCausalLM'],
    model_type: 'mistral',
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    head_dim: 128,
    vocab_size: 32768,
    max_position_embeddings: 32768,
    rope_theta: 1000000,
    sliding_window: null,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: false,
    hidden_act: 'silu',
    torch_dtype: 'bfloat16',
  },
  // A small shape for quick runs.
  'qwen3-tiny': {
    architectures: ['Qwen3ForCausalLM'],
    model_type: 'qwen3',
    hidden_size: 256,
    intermediate_size: 512,
    num_hidden_layers: 4,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 64,
    vocab_size: 4096,
    max_position_embeddings: 4096,
    rope_theta: 1000000,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: true,
    attention_bias: false,
    hidden_act: 'silu',
    torch_dtype: 'bfloat16',
  },
}

/** The tensors of a Qwen3 or Llama model: [name, shape, std] (std 0 means a norm weight of ones). */
export function modelTensors(c) {
  const headDim = c.head_dim ?? c.hidden_size / c.num_attention_heads
  const q = c.num_attention_heads * headDim
  const kv = c.num_key_value_heads * headDim
  const qkNorm = c.model_type === 'qwen3'
  const list = [['model.embed_tokens.weight', [c.vocab_size, c.hidden_size], 0.02]]
  for (let l = 0; l < c.num_hidden_layers; l++) {
    const p = `model.layers.${l}.`
    list.push(
      [p + 'input_layernorm.weight', [c.hidden_size], 0],
      [p + 'self_attn.q_proj.weight', [q, c.hidden_size], 0.02],
      [p + 'self_attn.k_proj.weight', [kv, c.hidden_size], 0.02],
      [p + 'self_attn.v_proj.weight', [kv, c.hidden_size], 0.02],
      [p + 'self_attn.o_proj.weight', [c.hidden_size, q], 0.02],
      ...(qkNorm ? [[p + 'self_attn.q_norm.weight', [headDim], 0], [p + 'self_attn.k_norm.weight', [headDim], 0]] : []),
      [p + 'post_attention_layernorm.weight', [c.hidden_size], 0],
      [p + 'mlp.gate_proj.weight', [c.intermediate_size, c.hidden_size], 0.02],
      [p + 'mlp.up_proj.weight', [c.intermediate_size, c.hidden_size], 0.02],
      [p + 'mlp.down_proj.weight', [c.hidden_size, c.intermediate_size], 0.02],
    )
  }
  list.push(['model.norm.weight', [c.hidden_size], 0])
  if (!c.tie_word_embeddings) list.push(['lm_head.weight', [c.vocab_size, c.hidden_size], 0.02])
  return list
}

const f32 = new Float32Array(1)
const u32 = new Uint32Array(f32.buffer)
function bf16(x) {
  f32[0] = x
  const b = u32[0]
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff
}

function fill(out, seed, index, std) {
  if (std === 0) return out.fill(bf16(1))
  let s = (Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(index + 1, 0xc2b2ae35)) >>> 0 || 1
  const scale = std * Math.sqrt(3) * 2 / 4294967296
  for (let i = 0; i < out.length; i++) {
    s ^= s << 13
    s >>>= 0
    s ^= s >>> 17
    s ^= s << 5
    s >>>= 0
    out[i] = bf16((s - 2147483648) * scale)
  }
  return out
}

/** Writes every byte (a write of a large buffer may write only part of it). */
function writeAll(fd, bytes) {
  for (let at = 0; at < bytes.length; ) at += writeSync(fd, bytes, at, bytes.length - at)
}

export function writeRandomModel({ shape, seed, out, tokenizerDir }) {
  const config = SHAPES[shape]
  if (!config) throw new Error(`Expected one of ${Object.keys(SHAPES).join(', ')} for shape but received ${shape}`)
  mkdirSync(out, { recursive: true })
  const tensors = modelTensors(config)
  const header = {}
  let offset = 0
  for (const [name, dims] of tensors) {
    const bytes = dims.reduce((a, b) => a * b, 1) * 2
    header[name] = { dtype: 'BF16', shape: dims, data_offsets: [offset, offset + bytes] }
    offset += bytes
  }
  header.__metadata__ = { format: 'pt', generator: `detinfer make-random-model ${shape} seed ${seed}` }
  let json = JSON.stringify(header)
  json += ' '.repeat((8 - (json.length % 8)) % 8)
  const fd = openSync(join(out, 'model.safetensors'), 'w')
  try {
    const len = Buffer.alloc(8)
    len.writeBigUInt64LE(BigInt(json.length))
    writeAll(fd, len)
    writeAll(fd, Buffer.from(json, 'utf8'))
    tensors.forEach(([, dims, std], index) => {
      const data = fill(new Uint16Array(dims.reduce((a, b) => a * b, 1)), seed, index, std)
      writeAll(fd, new Uint8Array(data.buffer))
    })
  } finally {
    closeSync(fd)
  }
  writeFileSync(join(out, 'config.json'), JSON.stringify({ ...config, bos_token_id: 0, eos_token_id: 0 }, null, 2))
  writeFileSync(join(out, 'generation_config.json'), JSON.stringify({ eos_token_id: 0, do_sample: false }, null, 2))
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json']) {
    if (existsSync(join(tokenizerDir, f))) copyFileSync(join(tokenizerDir, f), join(out, f))
  }
  return { dir: out, bytes: offset, config }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { values } = parseArgs({
    options: {
      shape: { type: 'string', default: 'qwen3-0.6b' },
      seed: { type: 'string', default: '1234' },
      out: { type: 'string' },
      tokenizer: { type: 'string' },
    },
  })
  if (!values.out) throw new Error('Expected a directory for --out but received nothing')
  const tokenizerDir = values.tokenizer ?? join(import.meta.dirname, '..', 'models', 'default')
  const t0 = Date.now()
  const r = writeRandomModel({ shape: values.shape, seed: Number(values.seed), out: values.out, tokenizerDir })
  console.error(`wrote ${r.dir} (${(r.bytes / 1e9).toFixed(2)} GB of weights) in ${((Date.now() - t0) / 1000).toFixed(1)} s`)
}
