// The errors detinfer's public API throws, and the one format for a bad argument:
// "Expected <what> for <name> but received <value> of type <type>".

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

export function describeValue(value: unknown): string {
  if (typeof value === 'string') return `${JSON.stringify(value)} of type string`
  if (value === null) return 'null'
  if (value === undefined) return 'undefined'
  if (Array.isArray(value)) return `an array of length ${value.length}`
  if (typeof value === 'object') return `${Object.prototype.toString.call(value)} of type object`
  return `${String(value)} of type ${typeof value}`
}

export function invalidArgument(name: string, expected: string, value: unknown): TypeError {
  return new TypeError(`Expected ${expected} for ${name} but received ${describeValue(value)}`)
}

export function checkInteger(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max)
    throw invalidArgument(name, `integer between ${min} and ${max}`, value)
  return value
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
