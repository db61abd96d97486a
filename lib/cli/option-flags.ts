// The library's errors name its options (maxTokens, responseFormat.pattern); the user of a command
// gave flags (--max-tokens, --regex). A command's action, wrapped by namingFlags, fails with the
// library's message in the flags' names.

/** The flag that sets each library option, in the commands that have that flag. */
export const OPTION_FLAGS = {
  maxTokens: '--max-tokens',
  temperature: '--temperature',
  seed: '--seed',
  topK: '--top-k',
  topP: '--top-p',
  minP: '--min-p',
  frequencyPenalty: '--frequency-penalty',
  presencePenalty: '--presence-penalty',
  repetitionPenalty: '--repetition-penalty',
  logitBias: '--logit-bias',
  topLogprobs: '--top-logprobs',
  stop: '--stop',
  ignoreEos: '--ignore-eos',
  chatTemplateVariables: '--chat-template-kwargs',
  'responseFormat.schema': '--json-schema',
  'responseFormat.pattern': '--regex',
  'responseFormat.choices': '--choice',
  'responseFormat.grammar': '--grammar',
  tensorParallel: '--tensor-parallel',
  kvCacheTokens: '--kv-cache-tokens',
  maxBatchSize: '--max-batch-size',
} as const

export type OptionName = keyof typeof OPTION_FLAGS

/** The flags of `options`, as OPTION_FLAGS names them. */
export function flagsOf(options: readonly OptionName[]): Record<string, string> {
  return Object.fromEntries(options.map((name) => [name, OPTION_FLAGS[name]]))
}

/**
 * `action`, failing with the library's errors as the command's user reads them: each option of
 * `flags` (option name to flag) named by its flag, "for maxTokens" becoming "for --max-tokens".
 */
export function namingFlags<A extends unknown[]>(flags: Record<string, string>, action: (...args: A) => Promise<void>): (...args: A) => Promise<void> {
  // A camelCase name or a path is an option wherever it stands; a plain word (stop, seed,
  // temperature) only where the errors' one format puts a name: "for <name> but received".
  const names = new RegExp(
    Object.keys(flags)
      .map((name) => (/[A-Z.]/.test(name) ? `\\b${name.replace('.', '\\.')}\\b` : `(?<=\\bfor )${name}(?=(?:\\[\\d+\\])? but received )`))
      .join('|'),
    'g',
  )
  const rename = (err: unknown): unknown => {
    if (!(err instanceof Error)) return err
    const message = err.message.replace(names, (name) => flags[name]!)
    return message === err.message ? err : new Error(message, { cause: err })
  }
  return (...args) =>
    action(...args).catch((err: unknown) => {
      throw rename(err)
    })
}
