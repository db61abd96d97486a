// Parsers of numeric command-line values, shared by the subcommands (commander calls them).
import { InvalidArgumentError } from 'commander'
import { isPlainObject } from '../errors.js'

export function integer(value: string): number {
  const n = Number(value)
  if (value.trim() === '' || !Number.isInteger(n)) throw new InvalidArgumentError(`expected an integer but received "${value}"`)
  return n
}

export function positive(value: string): number {
  const n = Number(value)
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError(`expected a positive integer but received "${value}"`)
  return n
}

export function nonNegative(value: string): number {
  const n = Number(value)
  if (value.trim() === '' || !Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`expected an integer of at least 0 but received "${value}"`)
  return n
}

export function number(value: string): number {
  const n = Number(value)
  if (value.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError(`expected a number but received "${value}"`)
  return n
}

/** Token ids separated by commas, e.g. "12,7,3", or as a JSON array ("[12,7,3]", as generate --json prints them). */
export function ids(value: string): number[] {
  const inner = value.trim().replace(/^\[([^]*)\]$/, '$1')
  const items = inner.split(',').map((s) => s.trim())
  // Decimal digits only: Number('') is 0, so an empty item ("1,,2", a trailing comma) would be token 0.
  if (!items.every((s) => /^[0-9]+$/.test(s) && Number.isSafeInteger(Number(s))))
    throw new InvalidArgumentError(`expected token ids separated by commas (or a JSON array of them) but received "${value}"`)
  return items.map(Number)
}

/** '*', or origins (scheme://host[:port], as browsers send them) separated by commas. */
export function origins(value: string): string[] | '*' {
  if (value.trim() === '*') return '*'
  const list = value.split(',').map((o) => o.trim())
  for (const o of list) {
    let url: URL | null = null
    try {
      url = new URL(o)
    } catch {}
    if (!url || !/^https?:$/.test(url.protocol) || url.origin !== o)
      throw new InvalidArgumentError(`expected '*' or origins such as http://localhost:5173 (scheme, host and port only) but received "${o}"`)
  }
  return list
}

/** A JSON object, e.g. '{"enable_thinking": false}' (chat template variables). */
export function jsonObject(value: string): Record<string, unknown> {
  return parseObject(value, `a JSON object such as '{"enable_thinking": false}'`)
}

/** A JSON object of token ids to biases, e.g. '{"1234": -100, "567": 5}' (OpenAI's logit_bias). */
export function logitBiasJson(value: string): Record<string, unknown> {
  return parseObject(value, `a JSON object of token ids to biases such as '{"1234": -100}'`)
}

/** `value` as a JSON object; anything else (not JSON, or not an object) is refused as not `what`. */
function parseObject(value: string, what: string): Record<string, unknown> {
  let parsed: unknown
  try {
    parsed = JSON.parse(value)
  } catch {
    parsed = undefined
  }
  if (!isPlainObject(parsed)) throw new InvalidArgumentError(`expected ${what} but received "${value}"`)
  return parsed
}

/** --kv-cache-tokens of generate and score: loadModel's kvCacheTokens. */
export const KV_CACHE_TOKENS_HELP =
  "KV-cache capacity in tokens (default: what a quarter of the GPU's memory holds, 1 GiB's worth on the CPU, at most 131,072); fewer also bound the context"
