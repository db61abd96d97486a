// Hugging Face config.json -> ModelConfig, for the decoder-only architectures detinfer runs:
// Llama, Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm) and Mistral (full attention only).
import { readFile } from 'node:fs/promises'
import { basename, join } from 'node:path'

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

/** Formats a received value the one way every validation message does: `4 of type number`. */
export function describeValue(value: unknown): string {
  if (value === undefined) return 'undefined'
  if (value === null) return 'null'
  let text: string
  try {
    text = JSON.stringify(value) ?? String(value)
  } catch {
    text = String(value)
  }
  if (text.length > 80) text = text.slice(0, 77) + '...'
  return `${text} of type ${Array.isArray(value) ? 'array' : typeof value}`
}

/** "Expected <what> for <field> in <file> but received <value>" */
export function invalidField(what: string, field: string, file: string, value: unknown): Error {
  return new Error(`Expected ${what} for ${field} in ${file} but received ${describeValue(value)}`)
}

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

  integer(field: string, min: number, fallback?: number): number {
    const v = this.obj[field]
    if ((v === undefined || v === null) && fallback !== undefined) return fallback
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min)
      throw invalidField(`an integer >= ${min}`, this.prefix + field, this.file, v)
    return v
  }

  positive(field: string, fallback?: number): number {
    const v = this.obj[field]
    if ((v === undefined || v === null) && fallback !== undefined) return fallback
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0)
      throw invalidField('a positive number', this.prefix + field, this.file, v)
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

  tokenIds(field: string): number[] {
    const v = this.obj[field]
    if (v === undefined || v === null) return []
    const list = Array.isArray(v) ? v : [v]
    for (const id of list)
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0)
        throw invalidField('a token id or an array of token ids', this.prefix + field, this.file, v)
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
    factor: r.positive('factor'),
    lowFreqFactor: r.positive('low_freq_factor'),
    highFreqFactor: r.positive('high_freq_factor'),
    originalMaxPositionEmbeddings: r.integer('original_max_position_embeddings', 1),
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
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw))
    throw invalidField('a JSON object', 'the configuration', file, raw)
  const r = new FieldReader(raw as Json, file)
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

  const hiddenSize = r.integer('hidden_size', 1)
  const numHeads = r.integer('num_attention_heads', 1)
  const numKvHeads = r.integer('num_key_value_heads', 1, numHeads)
  if (numHeads % numKvHeads !== 0)
    throw invalidField(`a divisor of num_attention_heads (${numHeads})`, 'num_key_value_heads', file, numKvHeads)
  if (!r.has('head_dim') && hiddenSize % numHeads !== 0)
    throw invalidField(`a multiple of num_attention_heads (${numHeads}) when head_dim is absent`, 'hidden_size', file, hiddenSize)
  const headDim = r.integer('head_dim', 2, hiddenSize / numHeads)
  if (headDim % 2 !== 0) throw invalidField('an even integer', 'head_dim', file, headDim)
  const maxPositionEmbeddings = r.integer('max_position_embeddings', 1)

  const ropeParameters = r.obj['rope_parameters']
  let ropeTheta = r.positive('rope_theta', 10000)
  if (!r.has('rope_theta') && ropeParameters && typeof ropeParameters === 'object')
    ropeTheta = new FieldReader(ropeParameters as Json, file, 'rope_parameters.').positive('rope_theta', 10000)
  const ropeScaling = r.has('rope_scaling')
    ? parseRopeScaling(r.obj['rope_scaling'], 'rope_scaling', file)
    : parseRopeScaling(ropeParameters, 'rope_parameters', file)

  checkSlidingWindow(r, arch, maxPositionEmbeddings)

  const attentionBias = arch === 'MistralForCausalLM' ? false : r.boolean('attention_bias', false)
  const dtype = r.string('torch_dtype') ?? r.string('dtype')
  if (dtype !== null && !['bfloat16', 'float16', 'float32'].includes(dtype))
    throw invalidField('"bfloat16", "float16" or "float32"', r.has('torch_dtype') ? 'torch_dtype' : 'dtype', file, dtype)

  return {
    architecture: arch,
    hiddenSize,
    intermediateSize: r.integer('intermediate_size', 1),
    numLayers: r.integer('num_hidden_layers', 1),
    numHeads,
    numKvHeads,
    headDim,
    vocabSize: r.integer('vocab_size', 1),
    maxPositionEmbeddings,
    rmsNormEps: r.positive('rms_norm_eps', 1e-6),
    ropeTheta,
    ropeScaling,
    tieWordEmbeddings: r.boolean('tie_word_embeddings', false),
    qkvBias: arch === 'Qwen2ForCausalLM' || attentionBias,
    outputBias: arch !== 'Qwen2ForCausalLM' && attentionBias,
    mlpBias: arch === 'LlamaForCausalLM' && r.boolean('mlp_bias', false),
    qkNorm: arch === 'Qwen3ForCausalLM',
    dtype,
    bosTokenId: r.tokenIds('bos_token_id')[0] ?? null,
    eosTokenIds: r.tokenIds('eos_token_id'),
  }
}

/** Reads and validates `<dir>/config.json`. */
export async function loadModelConfig(dir: string): Promise<ModelConfig> {
  const file = join(dir, 'config.json')
  return parseModelConfig(await readJsonFile(file), file)
}

/** Reads a JSON file with errors that name it (missing, unreadable, not JSON). */
export async function readJsonFile(file: string): Promise<unknown> {
  let text: string
  try {
    text = await readFile(file, 'utf8')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT') throw new Error(`${basename(file)} not found: ${file} does not exist`)
    throw new Error(`Could not read ${file}: ${(err as Error).message}`)
  }
  try {
    return JSON.parse(text)
  } catch (err) {
    throw new Error(`${file} is not valid JSON: ${(err as Error).message}`)
  }
}
