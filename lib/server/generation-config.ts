// The sampling defaults a model's generation_config.json recommends, as `detinfer serve
// --generation-config auto` (the default) applies them to requests that leave a parameter out,
// the way vLLM's server does (its `--generation-config auto`): temperature, top_p, top_k, min_p,
// repetition_penalty, and max_new_tokens as a limit of every request's max_tokens. As there, a
// value equal to transformers' own default (GenerationConfig: temperature 1, top_p 1, top_k 50,
// repetition_penalty 1) counts as not set, since transformers leaves it out of the config's
// differences from the defaults, which is what vLLM reads; do_sample is not read.
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { isPlainObject } from '../errors.js'
import { readTextFile } from '../files.js'

/** Defaults for what a request leaves out (each absent when the model does not set it). */
export interface SamplingDefaults {
  temperature?: number
  topP?: number
  topK?: number
  minP?: number
  repetitionPenalty?: number
  maxTokens?: number
}

export interface GenerationDefaults {
  sampling: SamplingDefaults
  /** The file they came from, or null when there is none. */
  file: string | null
}

/** transformers' GenerationConfig defaults: a value equal to one of them is not a difference. */
const TRANSFORMERS_DEFAULTS: Record<string, number> = { temperature: 1, top_p: 1, top_k: 50, repetition_penalty: 1 }

/**
 * The sampling defaults of `dir`/generation_config.json (none when the file does not exist,
 * unless `required`).
 * A value the server could not take from a request (temperature above 2, say) is an error that
 * names the file, so that the server does not start with defaults it would refuse.
 */
export async function readGenerationDefaults(dir: string, { required = false } = {}): Promise<GenerationDefaults> {
  const file = join(dir, 'generation_config.json')
  if (!required && !existsSync(file)) return { sampling: {}, file: null }
  const text = await readTextFile(file, 'generation_config.json')
  let config: unknown
  try {
    config = JSON.parse(text)
  } catch (err) {
    throw new Error(`Could not read the sampling defaults of ${file}: ${(err as Error).message}`)
  }
  if (!isPlainObject(config)) throw new Error(`Expected a JSON object in ${file} but received ${Array.isArray(config) ? 'an array' : String(config)}`)
  const c = config
  const set = (key: string): number | undefined => {
    const v = c[key]
    if (v === undefined || v === null) return undefined
    if (typeof v !== 'number' || !Number.isFinite(v)) throw badValue(file, key, 'a number', v)
    return v === TRANSFORMERS_DEFAULTS[key] ? undefined : v
  }
  const sampling: SamplingDefaults = {}
  const temperature = set('temperature')
  if (temperature !== undefined) {
    if (temperature < 0 || temperature > 2) throw badValue(file, 'temperature', 'a number between 0 and 2', temperature)
    sampling.temperature = temperature
  }
  const topP = set('top_p')
  if (topP !== undefined) {
    if (!(topP > 0 && topP <= 1)) throw badValue(file, 'top_p', 'a number above 0 and at most 1', topP)
    sampling.topP = topP
  }
  const topK = set('top_k')
  if (topK !== undefined) {
    // -1 and 0 are no limit, as for a request's top_k (vLLM's -1 among them).
    if (!Number.isInteger(topK) || topK < -1) throw badValue(file, 'top_k', 'an integer of at least -1 (-1 or 0: no limit)', topK)
    if (topK > 0) sampling.topK = topK
  }
  const minP = set('min_p')
  if (minP !== undefined) {
    if (minP < 0 || minP > 1) throw badValue(file, 'min_p', 'a number between 0 and 1', minP)
    if (minP > 0) sampling.minP = minP
  }
  const maxNewTokens = set('max_new_tokens')
  if (maxNewTokens !== undefined) {
    if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) throw badValue(file, 'max_new_tokens', 'an integer of at least 1', maxNewTokens)
    sampling.maxTokens = maxNewTokens
  }
  const repetition = set('repetition_penalty')
  if (repetition !== undefined) {
    if (!(repetition > 0 && repetition <= 2)) throw badValue(file, 'repetition_penalty', 'a number above 0 and at most 2', repetition)
    sampling.repetitionPenalty = repetition
  }
  return { sampling, file }
}

/** The defaults as a log line or a fingerprint's input: `temperature 0.6, top_p 0.95, top_k 20`. */
export function describeSamplingDefaults(s: SamplingDefaults): string {
  const parts = [
    s.temperature !== undefined && `temperature ${s.temperature}`,
    s.topP !== undefined && `top_p ${s.topP}`,
    s.topK !== undefined && `top_k ${s.topK}`,
    s.minP !== undefined && `min_p ${s.minP}`,
    s.repetitionPenalty !== undefined && `repetition_penalty ${s.repetitionPenalty}`,
    s.maxTokens !== undefined && `max_tokens ${s.maxTokens}`,
  ].filter((p): p is string => typeof p === 'string')
  return parts.join(', ')
}

function badValue(file: string, key: string, expected: string, value: unknown): Error {
  return new Error(
    `Expected ${expected} for ${key} in ${file} but received ${JSON.stringify(value)}; ` +
      '`--generation-config none` serves without the file\'s sampling defaults',
  )
}
