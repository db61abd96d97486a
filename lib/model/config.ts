// Hugging Face config.json -> ModelConfig, for the decoder-only architectures detinfer runs:
// Llama, Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm) and Mistral (full attention only).
import { join } from 'node:path'
import { integerRange, invalidField, isPlainObject } from '../errors.js'
import { readJsonFile } from '../files.js'
import { MAX_VOCAB_SIZE } from '../step.js'

export const SUPPORTED_ARCHITECTURES = [
  'LlamaForCausalLM',
  'Qwen2ForCausalLM',
  'Qwen3ForCausalLM',
  'MistralForCausalLM',
] as const
export type Architecture = (typeof SUPPORTED_ARCHITECTURES)[number]

/** Llama 3's frequency-dependent RoPE scaling (HF rope_type "llama3"). */
export interface Llama3RopeScaling {
  type: 'llama3'
  factor: number
  lowFreqFactor: number
  highFreqFactor: number
  originalMaxPositionEmbeddings: number
}

export interface ModelConfig {
  architecture: Architecture
  hiddenSize: number
  intermediateSize: number
  numLayers: number
  numHeads: number
  numKvHeads: number
  headDim: number
  vocabSize: number
  maxPositionEmbeddings: number
  rmsNormEps: number
  ropeTheta: number
  ropeScaling: Llama3RopeScaling | null
  tieWordEmbeddings: boolean
  /** Biases on q_proj, k_proj, v_proj (Qwen2 always; Llama/Qwen3 with attention_bias). */
  qkvBias: boolean
  /** Bias on o_proj (Llama/Qwen3 with attention_bias). */
  outputBias: boolean
  /** Biases on gate/up/down_proj (Llama with mlp_bias). */
  mlpBias: boolean
  /** Per-head RMSNorm of q and k before RoPE (Qwen3). */
  qkNorm: boolean
  /** torch_dtype / dtype as written (weights are converted to bf16 whatever it says). */
  dtype: string | null
  bosTokenId: number | null
  eosTokenIds: number[]
}

/**
 * Upper bounds on config.json's sizes, far above any released model of the four architectures,
 * so that a corrupt number fails here instead of sizing a list or an allocation.
 */
export const CONFIG_LIMITS = {
  hiddenSize: 65_536,
  intermediateSize: 262_144,
  numLayers: 1024,
  numHeads: 1024,
  headDim: 1024,
  vocabSize: MAX_VOCAB_SIZE,
  maxPositionEmbeddings: 1 << 24,
  /** rope_theta above 1 (a base of 1 or less gives no rotation, or frequencies that grow). */
  ropeTheta: 1e12,
  ropeScalingFactor: 1e6,
} as const

type Json = Record<string, unknown>

/** Reads fields of one JSON object, each check throwing the one message format. */
class FieldReader {
  constructor(
    readonly obj: Json,
    readonly file: string,
    readonly prefix = '',
  ) {}

  has(field: string): boolean {
    return this.obj[field] !== undefined && this.obj[field] !== null
  }

  /** An integer in [min, max]. */
  integer(field: string, min: number, max: number, fallback?: number): number {
    const v = this.obj[field]
    if ((v === undefined || v === null) && fallback !== undefined) return fallback
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max)
      throw invalidField(`an ${integerRange(min, max)}`, this.prefix + field, this.file, v)
    return v
  }

  /** A finite number above `above` and at most `max`. */
  number(field: string, above: number, max: number, fallback?: number): number {
    const v = this.obj[field]
    if ((v === undefined || v === null) && fallback !== undefined) return fallback
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= above || v > max)
      throw invalidField(`a number above ${above} and at most ${max}`, this.prefix + field, this.file, v)
    return v
  }

  boolean(field: string, fallback: boolean): boolean {
    const v = this.obj[field]
    if (v === undefined || v === null) return fallback
    if (typeof v !== 'boolean') throw invalidField('a boolean', this.prefix + field, this.file, v)
    return v
  }

  string(field: string): string | null {
    const v = this.obj[field]
    if (v === undefined || v === null) return null
    if (typeof v !== 'string') throw invalidField('a string', this.prefix + field, this.file, v)
    return v
  }

  /** A token id below `vocabSize`, or an array of them. */
  tokenIds(field: string, vocabSize: number): number[] {
    const v = this.obj[field]
    if (v === undefined || v === null) return []
    const list = Array.isArray(v) ? v : [v]
    for (const id of list)
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= vocabSize)
        throw invalidField(`a token id below ${vocabSize} (the vocab_size) or an array of them`, this.prefix + field, this.file, v)
    return list as number[]
  }
}

function parseRopeScaling(raw: unknown, field: string, file: string): Llama3RopeScaling | null {
  if (raw === undefined || raw === null) return null
  if (typeof raw !== 'object' || Array.isArray(raw)) throw invalidField('an object or null', field, file, raw)
  const r = new FieldReader(raw as Json, file, `${field}.`)
  const type = r.string('rope_type') ?? r.string('type') ?? 'default'
  if (type === 'default') return null
  if (type !== 'llama3')
    throw new Error(
      `RoPE scaling type ${JSON.stringify(type)} (${field} in ${file}) is not supported; supported: "default", "llama3"`,
    )
  const scaling: Llama3RopeScaling = {
    type: 'llama3',
    factor: r.number('factor', 0, CONFIG_LIMITS.ropeScalingFactor),
    lowFreqFactor: r.number('low_freq_factor', 0, CONFIG_LIMITS.ropeScalingFactor),
    highFreqFactor: r.number('high_freq_factor', 0, CONFIG_LIMITS.ropeScalingFactor),
    originalMaxPositionEmbeddings: r.integer('original_max_position_embeddings', 1, CONFIG_LIMITS.maxPositionEmbeddings),
  }
  if (scaling.highFreqFactor <= scaling.lowFreqFactor)
    throw invalidField(
      `a number above low_freq_factor (${scaling.lowFreqFactor})`,
      `${field}.high_freq_factor`,
      file,
      scaling.highFreqFactor,
    )
  return scaling
}

/** Sliding-window attention is not implemented: accept it only where it never bites. */
function checkSlidingWindow(r: FieldReader, architecture: Architecture, maxPositions: number): void {
  const window = r.obj['sliding_window']
  const mistral = architecture === 'MistralForCausalLM'
  // HF's MistralConfig defaults sliding_window to 4096 when the key is absent.
  const effective = mistral ? (window === undefined ? 4096 : window) : window
  const used = mistral || r.boolean('use_sliding_window', false)
  if (!used || effective === null || effective === undefined) return
  if (typeof effective !== 'number' || !Number.isInteger(effective) || effective < 1)
    throw invalidField('a positive integer or null', 'sliding_window', r.file, effective)
  if (effective < maxPositions)
    throw new Error(
      `Sliding-window attention (sliding_window ${effective} < max_position_embeddings ${maxPositions} in ${r.file}) ` +
        `is not supported; detinfer runs full causal attention only (sliding_window null or >= max_position_embeddings)`,
    )
}

/** Validates a parsed config.json; `file` names it in error messages. */
export function parseModelConfig(raw: unknown, file = 'config.json'): ModelConfig {
  if (!isPlainObject(raw)) throw invalidField('a JSON object', 'the configuration', file, raw)
  const r = new FieldReader(raw, file)
  const archs = r.obj['architectures']
  const supported = SUPPORTED_ARCHITECTURES.join(', ')
  if (!Array.isArray(archs) || archs.length === 0 || typeof archs[0] !== 'string')
    throw invalidField(`an array naming one of ${supported}`, 'architectures', file, archs)
  const architecture = archs[0] as string
  if (!(SUPPORTED_ARCHITECTURES as readonly string[]).includes(architecture))
    throw new Error(`Architecture ${architecture} (in ${file}) is not supported; supported architectures: ${supported}`)
  const arch = architecture as Architecture

  const act = r.string('hidden_act') ?? 'silu'
  if (act !== 'silu') throw invalidField('"silu"', 'hidden_act', file, act)

  const L = CONFIG_LIMITS
  const hiddenSize = r.integer('hidden_size', 1, L.hiddenSize)
  const intermediateSize = r.integer('intermediate_size', 1, L.intermediateSize)
  const numLayers = r.integer('num_hidden_layers', 1, L.numLayers)
  const numHeads = r.integer('num_attention_heads', 1, L.numHeads)
  const numKvHeads = r.integer('num_key_value_heads', 1, numHeads, numHeads)
  if (numHeads % numKvHeads !== 0)
    throw invalidField(`a divisor of num_attention_heads (${numHeads})`, 'num_key_value_heads', file, numKvHeads)
  if (!r.has('head_dim') && hiddenSize % numHeads !== 0)
    throw invalidField(`a multiple of num_attention_heads (${numHeads}) when head_dim is absent`, 'hidden_size', file, hiddenSize)
  const headDim = r.integer('head_dim', 2, L.headDim, hiddenSize / numHeads)
  if (headDim % 2 !== 0 || headDim > L.headDim)
    throw invalidField(
      `an even integer between 2 and ${L.headDim}` + (r.has('head_dim') ? '' : ' (hidden_size / num_attention_heads, as head_dim is absent)'),
      r.has('head_dim') ? 'head_dim' : 'hidden_size',
      file,
      r.has('head_dim') ? headDim : hiddenSize,
    )
  const vocabSize = r.integer('vocab_size', 1, L.vocabSize)
  const maxPositionEmbeddings = r.integer('max_position_embeddings', 1, L.maxPositionEmbeddings)
  const rmsNormEps = r.number('rms_norm_eps', 0, 1, 1e-6)

  const ropeParameters = r.obj['rope_parameters']
  let ropeTheta = r.number('rope_theta', 1, L.ropeTheta, 10000)
  if (!r.has('rope_theta') && ropeParameters && typeof ropeParameters === 'object')
    ropeTheta = new FieldReader(ropeParameters as Json, file, 'rope_parameters.').number('rope_theta', 1, L.ropeTheta, 10000)
  const ropeScaling = r.has('rope_scaling')
    ? parseRopeScaling(r.obj['rope_scaling'], 'rope_scaling', file)
    : parseRopeScaling(ropeParameters, 'rope_parameters', file)

  checkSlidingWindow(r, arch, maxPositionEmbeddings)

  const attentionBias = arch === 'MistralForCausalLM' ? false : r.boolean('attention_bias', false)
  const dtype = r.string('torch_dtype') ?? r.string('dtype')
  if (dtype !== null && !['bfloat16', 'float16', 'float32'].includes(dtype))
    throw invalidField('"bfloat16", "float16" or "float32"', r.has('torch_dtype') ? 'torch_dtype' : 'dtype', file, dtype)

  const bosTokenId = r.tokenIds('bos_token_id', vocabSize)[0] ?? null
  const eosTokenIds = r.tokenIds('eos_token_id', vocabSize)
  r.tokenIds('pad_token_id', vocabSize)

  return {
    architecture: arch,
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    vocabSize,
    maxPositionEmbeddings,
    rmsNormEps,
    ropeTheta,
    ropeScaling,
    tieWordEmbeddings: r.boolean('tie_word_embeddings', false),
    qkvBias: arch === 'Qwen2ForCausalLM' || attentionBias,
    outputBias: arch !== 'Qwen2ForCausalLM' && attentionBias,
    mlpBias: arch === 'LlamaForCausalLM' && r.boolean('mlp_bias', false),
    qkNorm: arch === 'Qwen3ForCausalLM',
    dtype,
    bosTokenId,
    eosTokenIds,
  }
}

/** Reads and validates `<dir>/config.json`. */
export async function loadModelConfig(dir: string): Promise<ModelConfig> {
  const file = join(dir, 'config.json')
  return parseModelConfig(await readJsonFile(file), file)
}
