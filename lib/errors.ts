// The errors detinfer's public API throws, and the one format for bad input:
//   "Expected <what> for <name> but received <value> of type <type>"
// and, for a field of a model file, "Expected <what> for <field> in <file> but received <value> of type <type>".
//
// Which layer checks what (sharp's rule: the outer layer checks, the inner one trusts):
// - lib/api.ts (the public Model and loadModel) checks every argument a user passes: prompts,
//   token ids against the model's vocabulary, options, and the context length.
// - lib/generate.ts checks the generation options (resolveGenerateOptions).
// - lib/model/config.ts checks every field of config.json (types and sane bounds) before anything
//   is sized from it; lib/model/safetensors.ts checks the weight files' headers against their
//   sizes; lib/model/weights.ts checks the tensors against the config (missing, extra, shapes,
//   non-finite values); lib/tokenizer.ts checks tokenizer.json, tokenizer_config.json,
//   generation_config.json and the chat template (ids against the model's vocabulary, special
//   tokens, rendering bounded in time and size). Each names the file and the field or tensor.
// - lib/model/load-memory.ts checks, before the first weight is uploaded to a GPU, that the load
//   fits in the device's free memory (DeviceMemoryError).
// - lib/model/transformer.ts checks the chunks of a step, in internal terms (chunks[i].tokens):
//   a message from there means a caller above let something through.
// - The native ops (csrc/binding) check dtypes, shapes and devices of their tensor arguments and
//   throw; they never see a user's input unchecked and never abort the process.

/** Thrown by a Model (or anything it handed out) used after `dispose()`. */
export class DisposedError extends Error {
  constructor(what = 'model') {
    super(`The ${what} was disposed and cannot be used any more`)
    this.name = 'DisposedError'
  }
}

/** A request that can never be served with this model's KV cache or context length. */
export class RequestTooLargeError extends Error {
  constructor(message: string) {
    super(message)
    this.name = 'RequestTooLargeError'
  }
}

/** The model produced a logits row with NaN or infinity: its weights or config are broken. */
export class NonFiniteLogitsError extends Error {
  constructor(position: number) {
    super(
      `The model produced logits that are not finite (NaN or infinity) at position ${position}; ` +
        `its weights or config.json (for example rope_theta or rms_norm_eps) are likely corrupt`,
    )
    this.name = 'NonFiniteLogitsError'
  }
}

/** Bytes a load needs on its GPU (by part), the margin the check keeps, and what the device has. */
export interface DeviceMemoryNeeds {
  weights: number
  kvCache: number
  other: number
  margin: number
  free: number
  total: number
}

/**
 * Loading a model on a GPU whose free memory cannot hold its weights, KV cache and step buffers,
 * found before the first weight is uploaded (lib/model/load-memory.ts).
 */
/**
 * The device had no room for the table of penalties and logit bias when the first request that
 * uses them came: that request is refused (the others go on); a later one tries again.
 */
export class LogitProcessorTableError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'LogitProcessorTableError'
  }
}

/**
 * A responseFormat whose grammar cannot be built: a JSON Schema that is not valid, or that uses
 * what the grammar compiler does not support. The message names the problem.
 */
export class GrammarError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'GrammarError'
  }
}

export class DeviceMemoryError extends Error {
  constructor(
    message: string,
    readonly needs: DeviceMemoryNeeds,
  ) {
    super(message)
    this.name = 'DeviceMemoryError'
  }
}

const PREVIEW_CHARS = 80

/** A short, JSON-like text of a value; unlike JSON, Infinity, NaN and bigints stay what they are. */
function preview(value: unknown, budget: number): string {
  switch (typeof value) {
    case 'string':
      return JSON.stringify(value.length > budget ? value.slice(0, budget) : value)
    case 'number':
      return Object.is(value, -0) ? '-0' : String(value)
    case 'bigint':
      return `${value}n`
    case 'boolean':
      return String(value)
    case 'undefined':
      return 'undefined'
    case 'function':
      return 'a function'
    case 'symbol':
      return value.toString()
  }
  if (value === null) return 'null'
  const parts: string[] = []
  let used = 2
  const add = (text: string) => {
    parts.push(text)
    used += text.length + 1
  }
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length && used < budget; i++) add(preview(value[i], budget - used))
    if (parts.length < value.length) parts.push('...')
    return `[${parts.join(',')}]`
  }
  if (!isPlainObject(value)) return Object.prototype.toString.call(value)
  const keys = Object.keys(value)
  for (const key of keys) {
    if (used >= budget) break
    add(`${JSON.stringify(key)}:${preview(value[key], budget - used)}`)
  }
  if (parts.length < keys.length) parts.push('...')
  return `{${parts.join(',')}}`
}

/**
 * "the model's context of N tokens", and when the KV cache the model was loaded with holds fewer
 * positions than its config's max_position_embeddings, which of the two limits that is.
 */
export function contextText(context: number, maxPositionEmbeddings: number): string {
  const base = `the model's context of ${context} tokens`
  return context < maxPositionEmbeddings
    ? `${base} (the positions its KV cache holds as loaded; max_position_embeddings is ${maxPositionEmbeddings})`
    : base
}

/**
 * An object as a literal or JSON.parse makes it: not null, not an array, and of Object.prototype
 * (or of none). Class instances, Maps and boxed numbers are not; for parsed JSON this is simply
 * "a JSON object".
 */
export function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false
  const proto = Object.getPrototypeOf(value)
  return proto === Object.prototype || proto === null
}

/** Formats a received value the one way every validation message does: `4 of type number`, `[1,2] of type array`. */
export function describeValue(value: unknown): string {
  if (value === undefined) return 'undefined'
  if (value === null) return 'null'
  let text = preview(value, PREVIEW_CHARS)
  if (text.length > PREVIEW_CHARS) text = text.slice(0, PREVIEW_CHARS - 3) + '...'
  const type = Array.isArray(value) ? 'array' : typeof value
  return `${text} of type ${type}`
}

/** "Expected <expected> for <name> but received <value> of type <type>" */
export function invalidArgument(name: string, expected: string, value: unknown): TypeError {
  return new TypeError(`Expected ${expected} for ${name} but received ${describeValue(value)}`)
}

/** "Expected <expected> for <field> in <file> but received <value> of type <type>": a field of a model file. */
export function invalidField(expected: string, field: string, file: string, value: unknown): Error {
  return new Error(`Expected ${expected} for ${field} in ${file} but received ${describeValue(value)}`)
}

/**
 * `options` as a record, refused unless it is a plain object of only `keys`: a misspelt key must
 * fail, not leave the default it meant to change.
 */
export function checkOptionKeys(options: unknown, keys: readonly string[]): Record<string, unknown> {
  if (typeof options !== 'object' || options === null || Array.isArray(options)) throw invalidArgument('options', 'object', options)
  for (const key of Object.keys(options)) if (!keys.includes(key)) throw invalidArgument('options', `only the keys ${keys.join(', ')}`, key)
  return options as Record<string, unknown>
}

/** An integer in [min, max]; the message leaves out a max of Infinity. */
export function checkInteger(name: string, value: unknown, min: number, max = Infinity): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max)
    throw invalidArgument(name, integerRange(min, max), value)
  return value
}

/** "integer between 1 and 4096", or "integer >= 1" without an upper bound. */
export function integerRange(min: number, max: number): string {
  return max === Infinity ? `integer >= ${min}` : `integer between ${min} and ${max}`
}

export function checkNumber(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max)
    throw invalidArgument(name, `number between ${min} and ${max}`, value)
  return value
}

export function checkString(name: string, value: unknown): string {
  if (typeof value !== 'string') throw invalidArgument(name, 'string', value)
  return value
}

export function checkOneOf<T extends string>(name: string, value: unknown, allowed: readonly T[]): T {
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value))
    throw invalidArgument(name, `one of ${allowed.map((a) => `'${a}'`).join(', ')}`, value)
  return value as T
}
