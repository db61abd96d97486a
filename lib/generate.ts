// Decoding on top of the scheduler: options and their validation, text assembly (incremental
// detokenization), stop conditions (EOS ids, maxTokens, stop strings) and streaming.
import { type DisposedError, GrammarError, RequestTooLargeError, checkInteger, checkNumber, checkOptionKeys, contextText, invalidArgument, isPlainObject } from './errors.js'
import { MAX_LOGIT_BIAS, type LogitProcessors, type SamplingParams } from './sampling.js'
import { MAX_TOP_LOGPROBS, type TopLogprob } from './model/output-head.js'
import type { FinishReason, GenerationOutcome, GenerationRequest, Scheduled, Scheduler, TokenConstraint } from './scheduler.js'
import type { ChatMessage, ChatRender, ChatTemplateVariables } from './tokenizer.js'
import type { EncodeRequestOptions } from './encode-worker.js'

/** What decoding needs from a tokenizer (lib/api.ts adapts the model's tokenizer to it). */
export interface TextTokenizer {
  /** Ids of a prompt: BOS as the model expects it, the chat template applied when `chat` (rendered as `render` says). */
  encodePrompt(text: string, chat: boolean, render?: ChatRender): number[]
  /** Ids of a conversation rendered by the chat template, ending with the assistant's turn to speak unless `render` says otherwise. */
  encodeChat(messages: ChatMessage[], render?: ChatRender): number[]
  /** Ids of text that continues a prompt (no BOS). */
  encodeContinuation(text: string): number[]
  /** Ids of a text, with or without the special tokens the model expects around it (BOS). */
  encodeText?(text: string, addSpecialTokens: boolean): number[]
  /** encodeText and encodeChat off the calling thread, when the tokenizer can (the same ids). */
  encodeTextAsync?(text: string, addSpecialTokens: boolean, options: EncodeRequestOptions): Promise<number[]>
  encodeChatAsync?(messages: ChatMessage[], options: EncodeRequestOptions & ChatRender): Promise<number[]>
  /** The special tokens by their tokenizer_config.json names (bos_token, eos_token, ...), and the chat template's source. */
  readonly specialTokenTexts?: Readonly<Record<string, string>>
  readonly chatTemplateSource?: string | null
  /** Frees what the tokenizer holds (its encode worker); texts still waiting reject with `reason`. */
  close?(reason?: Error): void
  /** Text of ids, special tokens left out. */
  decode(ids: readonly number[]): string
  /** The bytes one id stands for (decode([id]) as UTF-8 when absent). */
  tokenBytes?(id: number): Uint8Array
  /** An incremental decoder for one completion; `context` (the prompt's ids) gets the first piece's leading space right. */
  streamDecoder(options: { context: readonly number[] }): TextStreamDecoder
  readonly eosTokenIds: readonly number[]
}

export interface TextStreamDecoder {
  /** Adds one id; returns the text it completes. */
  push(id: number): string
  /** Text still held back (an incomplete character). */
  flush(): string
}

/** Tokens generated at most when `maxTokens` is not given (fewer when the context has less room). */
export const DEFAULT_MAX_TOKENS = 128

/**
 * What the completion's text must be, as OpenAI's response_format and vLLM's structured_outputs:
 * free text, a JSON object (`json_object`), JSON that a JSON Schema accepts, or text of a regex, a
 * choice of strings or an EBNF grammar. The model can only choose tokens that keep the text a
 * prefix of such text (a grammar masks the others before each choice), and ends it with EOS once
 * it is complete; a completion cut by maxTokens or a stop string is a prefix.
 */
export type ResponseFormat =
  | { type: 'text' }
  | { type: 'json_object' }
  | { type: 'json_schema'; schema: JsonSchema; strict?: boolean }
  /** Text the regular expression matches whole (vLLM's structured_outputs.regex). */
  | { type: 'regex'; pattern: string }
  /** Exactly one of the strings (vLLM's structured_outputs.choice). */
  | { type: 'choice'; choices: readonly string[] }
  /** Text of an EBNF grammar in xgrammar's syntax, from its rule `root` (vLLM's structured_outputs.grammar). */
  | { type: 'grammar'; grammar: string }
  /**
   * Text of an xgrammar structural tag's `format` (vLLM's structured_outputs.structural_tag): free
   * text with tags whose contents are held to JSON schemas once a trigger appears, say. The formats
   * and fields of xgrammar 0.1.27 are taken; another, which it would ignore, is refused naming its
   * place. The JSON of its json_schema formats is written on one line, as a json_schema format's.
   */
  | { type: 'structural_tag'; format: { readonly [key: string]: unknown } }

/** A JSON Schema: an object (or true / false), as JSON.parse gives it. */
export type JsonSchema = boolean | { readonly [key: string]: unknown }

/** Grammars for constrained completions (lib/grammar.ts builds them from the model's tokenizer). */
export interface ConstraintSource {
  /** A fresh constraint of the format, its grammar checked (a bad schema rejects with a GrammarError); null: none needed. */
  constrain(format: Exclude<ResponseFormat, { type: 'text' }>): Promise<TokenConstraint | null>
  /** What waits, and every later call, rejects with `reason` (the model's DisposedError when the model is disposed). */
  dispose(reason?: DisposedError): void
}

export interface GenerateOptions {
  /** Tokens to generate at most (default DEFAULT_MAX_TOKENS, 128, or fewer when the context has less room). */
  maxTokens?: number
  /** 0 (default): greedy. Else seeded sampling, at 1e-30 (MIN_TEMPERATURE) to 100. */
  temperature?: number
  /** Seed of the sampling noise; the same seed gives the same completion. Chosen at random when omitted (and reported). */
  seed?: number
  /** Sample among the k most likely tokens only (0: no limit). */
  topK?: number
  /** Sample among the most likely tokens whose probabilities add up to topP (1: no limit). */
  topP?: number
  /** Sample only among tokens at least minP times as likely as the most likely one (0: no limit). */
  minP?: number
  /** Report the N most likely tokens and their log-probs at every generated position (0 to 20; default 0). */
  topLogprobs?: number
  /**
   * OpenAI's frequency_penalty, -2 to 2 (default 0): subtracted from a token's logit once per time
   * the completion has chosen it so far. With presencePenalty and logitBias: y = c > 0 ? (x - f·c)
   * - p : x, then y + bias, each step rounded to float32, before temperature and the filters
   * (README, "Penalties and logit bias"). The log-probs reported stay those of the raw logits.
   */
  frequencyPenalty?: number
  /** OpenAI's presence_penalty, -2 to 2 (default 0): subtracted once from the logit of every token the completion has chosen. */
  presencePenalty?: number
  /**
   * vLLM's (and transformers') repetition_penalty, above 0 and at most 2 (default 1: none): the
   * logit of every token of the prompt or chosen so far is divided by it when positive and
   * multiplied by it otherwise, before the frequency and presence penalties (README, "Penalties
   * and logit bias").
   */
  repetitionPenalty?: number
  /**
   * OpenAI's logit_bias: token id -> bias between -100 and 100, added to that token's logit before
   * every choice; at most 300 ids, each in the vocabulary. An object (keys as decimal ids, as JSON
   * gives them) or a Map.
   */
  logitBias?: Record<number, number> | Map<number, number>
  /**
   * The completion as a JSON object (`{ type: 'json_object' }`), as JSON a JSON Schema accepts
   * (`{ type: 'json_schema', schema }`), as text of a regex, a choice or an EBNF grammar, or free
   * text (`{ type: 'text' }`, the default). README, "Structured output".
   */
  responseFormat?: ResponseFormat
  /** Generation ends when the text contains one of these; the text is cut before it. */
  stop?: string | string[]
  /** Generation also ends at these ids (kept in `tokens`, as EOS is; their text left out of `text`). */
  stopTokenIds?: number[]
  /** Go on past the model's EOS ids (to maxTokens or a stop): for fixed-length benchmarks. */
  ignoreEos?: boolean
  /** Wrap the prompt in the model's chat template as one user message. */
  chat?: boolean
  /**
   * Variables for the chat template beside the messages, for chat-message prompts and `chat: true`
   * (Qwen3's `{ enable_thinking: false }`, for instance).
   */
  chatTemplateVariables?: ChatTemplateVariables
  /**
   * With chat messages ending in an assistant message: the prompt ends inside that message's
   * text (no end of turn, no generation prompt), so the completion continues it, as prefilled
   * assistant text ("Sure, here is the JSON: {"). Default false.
   */
  continueFinalMessage?: boolean
  /**
   * Cancels the generation when aborted: the sequence leaves the batch at the next step (its cache
   * blocks freed), generate() rejects with the signal's reason (an AbortError unless given one)
   * and a stream throws it. The other sequences of the batch are not affected, bit for bit.
   */
  signal?: AbortSignal
}

export interface GenerationTimings {
  promptTokens: number
  /** Prompt tokens served from the prefix cache (their KV-cache blocks reused, not computed). */
  cachedTokens: number
  completionTokens: number
  queuedMs: number
  prefillMs: number
  decodeMs: number
  totalMs: number
  /** Completion tokens after the first, per second of decoding. */
  decodeTokensPerSecond: number
}

export interface GenerateResult {
  text: string
  /** Generated ids, including the EOS token or the token that completed a stop string. */
  tokens: number[]
  /** Log-prob of each generated token under the model (log-softmax of the unscaled logits). */
  logprobs: number[]
  /** With topLogprobs > 0: per generated token, the most likely tokens at its position, most likely first. */
  topLogprobs?: TopLogprob[][]
  finishReason: 'stop' | 'length'
  /** What ended a 'stop' (vLLM's stop_reason): the stop string, or the id of `stopTokenIds`; null for the model's EOS and for 'length'. */
  stopReason: StopReason
  /** The sampling seed used (absent for greedy decoding). */
  seed?: number
  timings: GenerationTimings
}

export interface StreamPiece {
  /** New text; may be empty while text that could start a stop string is held back. */
  text: string
  token: number
  logprob: number
  /** With topLogprobs > 0: the most likely tokens at this position. */
  topLogprobs?: TopLogprob[]
  /** Set on the last piece of a completion: why it ended. */
  finishReason?: 'stop' | 'length'
  /** Set on the last piece of a completion, as GenerateResult's. */
  stopReason?: StopReason
}

/** The stop string that ended a completion, the id of `stopTokenIds` that did, or null (EOS, length). */
export type StopReason = string | number | null

export interface ResolvedGenerateOptions {
  maxTokens: number
  sampling: SamplingParams | null
  topLogprobs: number
  /** Penalties and biases; null when none applies (every value neutral), so such a request is a plain one. */
  processors: LogitProcessors | null
  /** The grammar the text follows; null for free text. */
  responseFormat: Exclude<ResponseFormat, { type: 'text' }> | null
  stop: string[]
  stopTokenIds: number[]
  ignoreEos: boolean
  chat: boolean
  chatTemplateVariables?: ChatTemplateVariables
  continueFinalMessage: boolean
  signal?: AbortSignal
}

const MAX_SEED = 0xffffffff

/** A sampling seed for a request that gives none (reported in its result). */
export function randomSeed(): number {
  return Math.floor(Math.random() * (MAX_SEED + 1))
}

export function resolveGenerateOptions(
  options: unknown,
  limits: { contextLength: number; vocabSize: number; maxPositionEmbeddings?: number },
): ResolvedGenerateOptions {
  const o = checkOptionKeys(options === undefined ? {} : options, [
    'maxTokens',
    'temperature',
    'seed',
    'topK',
    'topP',
    'minP',
    'topLogprobs',
    'frequencyPenalty',
    'presencePenalty',
    'repetitionPenalty',
    'logitBias',
    'responseFormat',
    'stop',
    'stopTokenIds',
    'ignoreEos',
    'chat',
    'chatTemplateVariables',
    'continueFinalMessage',
    'signal',
  ])

  // More tokens than the context holds can never be served: a RequestTooLargeError, like every
  // request too large for the model, not a bad argument.
  if (typeof o.maxTokens === 'number' && Number.isInteger(o.maxTokens) && o.maxTokens > limits.contextLength)
    throw new RequestTooLargeError(`maxTokens (${o.maxTokens}) exceeds ${contextText(limits.contextLength, limits.maxPositionEmbeddings ?? limits.contextLength)}`)
  const maxTokens = o.maxTokens === undefined ? Math.min(DEFAULT_MAX_TOKENS, limits.contextLength - 1) : checkInteger('maxTokens', o.maxTokens, 1, limits.contextLength)
  const temperature = o.temperature === undefined ? 0 : checkTemperature(o.temperature)
  const topK = o.topK === undefined ? 0 : checkInteger('topK', o.topK, 0, limits.vocabSize)
  let topP = 1
  if (o.topP !== undefined) {
    if (typeof o.topP !== 'number' || !(o.topP > 0 && o.topP <= 1)) throw invalidArgument('topP', 'number greater than 0 and at most 1', o.topP)
    topP = o.topP
  }
  const minP = o.minP === undefined ? 0 : checkNumber('minP', o.minP, 0, 1)
  const topLogprobs = o.topLogprobs === undefined ? 0 : checkInteger('topLogprobs', o.topLogprobs, 0, MAX_TOP_LOGPROBS)
  const seed = o.seed === undefined ? undefined : checkInteger('seed', o.seed, 0, MAX_SEED)
  const processors = resolveLogitProcessors(o, limits.vocabSize)
  let stop: string[] = []
  if (o.stop !== undefined) {
    if (typeof o.stop === 'string') {
      if (o.stop === '') throw invalidArgument('stop', 'non-empty string or array of non-empty strings', o.stop)
      stop = [o.stop]
    } else {
      if (!Array.isArray(o.stop)) throw invalidArgument('stop', 'non-empty string or array of non-empty strings', o.stop)
      // Every index, holes included (every() skips them).
      stop = Array.from(o.stop as unknown[], (s, i) => {
        if (typeof s !== 'string' || s === '') throw invalidArgument(`stop[${i}]`, 'non-empty string', s)
        return s
      })
    }
    // Half of a surrogate pair matches inside the pair of a character such as an emoji, and would
    // cut the text in front of it: text of whole characters only.
    for (const [i, s] of stop.entries())
      if (LONE_SURROGATE.test(s)) throw invalidArgument(typeof o.stop === 'string' ? 'stop' : `stop[${i}]`, 'string of whole characters (no lone surrogate)', s)
  }
  let stopTokenIds: number[] = []
  if (o.stopTokenIds !== undefined) {
    if (!Array.isArray(o.stopTokenIds)) throw invalidArgument('stopTokenIds', 'array of token ids', o.stopTokenIds)
    // Every index, holes included.
    stopTokenIds = Array.from(o.stopTokenIds, (id, i) => checkInteger(`stopTokenIds[${i}]`, id, 0, limits.vocabSize - 1))
  }
  if (o.ignoreEos !== undefined && typeof o.ignoreEos !== 'boolean') throw invalidArgument('ignoreEos', 'boolean', o.ignoreEos)
  const responseFormat = o.responseFormat === undefined ? null : checkResponseFormat(o.responseFormat)
  // A grammar allows only EOS once its text is complete: going on past EOS has nothing to follow.
  if (responseFormat && o.ignoreEos === true) throw invalidArgument('ignoreEos', `false with responseFormat ${responseFormat.type} (a text the grammar completes ends at EOS)`, o.ignoreEos)
  if (o.chat !== undefined && typeof o.chat !== 'boolean') throw invalidArgument('chat', 'boolean', o.chat)
  if (o.continueFinalMessage !== undefined && typeof o.continueFinalMessage !== 'boolean')
    throw invalidArgument('continueFinalMessage', 'boolean', o.continueFinalMessage)
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw invalidArgument('signal', 'AbortSignal', o.signal)

  const sampling: SamplingParams | null =
    temperature === 0 ? null : { temperature, topK, topP, minP, seed: seed ?? randomSeed() }
  const variables = o.chatTemplateVariables === undefined ? undefined : checkChatTemplateVariables(o.chatTemplateVariables)
  return {
    maxTokens,
    sampling,
    topLogprobs,
    processors,
    responseFormat,
    stop,
    stopTokenIds,
    ignoreEos: o.ignoreEos === true,
    chat: o.chat === true,
    ...(variables && { chatTemplateVariables: variables }),
    continueFinalMessage: o.continueFinalMessage === true,
    ...(o.signal ? { signal: o.signal as AbortSignal } : {}),
  }
}

/**
 * The smallest temperature above 0 (greedy). Sampling divides the logits by the temperature in
 * float32: below about 1e-37 every positive logit overflows to infinity and the lowest such id
 * wins, not the most likely token. At 1e-30 a logit would have to pass 3e8 to overflow.
 */
export const MIN_TEMPERATURE = 1e-30
const MAX_TEMPERATURE = 100

function checkTemperature(value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || !(value === 0 || (value >= MIN_TEMPERATURE && value <= MAX_TEMPERATURE)))
    throw invalidArgument('temperature', `0 (greedy) or a number between ${MIN_TEMPERATURE} and ${MAX_TEMPERATURE}`, value)
  return value
}

/** Half of a surrogate pair with no other half beside it. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/

/** Penalties -2 to 2 (OpenAI's range) and biases -100 to 100 (its range too). */
const MAX_PENALTY = 2
const MAX_BIAS = 100

// The penalties and biases of the options, null when all are neutral: 0 penalties and no bias
// other than 0 change no logit, and such a request then takes the plain path, bit for bit.
function resolveLogitProcessors(o: Record<string, unknown>, vocabSize: number): LogitProcessors | null {
  const frequencyPenalty = o.frequencyPenalty === undefined ? 0 : checkNumber('frequencyPenalty', o.frequencyPenalty, -MAX_PENALTY, MAX_PENALTY)
  const presencePenalty = o.presencePenalty === undefined ? 0 : checkNumber('presencePenalty', o.presencePenalty, -MAX_PENALTY, MAX_PENALTY)
  const r = o.repetitionPenalty
  if (r !== undefined && (typeof r !== 'number' || !(r > 0 && r <= MAX_PENALTY)))
    throw invalidArgument('repetitionPenalty', `number above 0 and at most ${MAX_PENALTY}`, r)
  const repetitionPenalty = r === undefined ? 1 : r
  const logitBias: [number, number][] = []
  if (o.logitBias !== undefined) {
    const given = o.logitBias
    const isMap = given instanceof Map
    if (!isMap && !isPlainObject(given)) throw invalidArgument('logitBias', 'object or Map of token ids to biases', given)
    const entries: [unknown, unknown][] = isMap ? [...(given as Map<unknown, unknown>)] : Object.entries(given as object)
    if (entries.length > MAX_LOGIT_BIAS)
      throw new RangeError(`Expected at most ${MAX_LOGIT_BIAS} token ids for logitBias but received ${entries.length}`)
    const seen = new Set<number>()
    for (const [key, value] of entries) {
      // An object's keys are strings: decimal ids, as JSON's logit_bias gives them.
      const id = checkInteger('a key of logitBias', typeof key === 'string' && /^(0|[1-9][0-9]*)$/.test(key) ? Number(key) : key, 0, vocabSize - 1)
      if (seen.has(id)) throw invalidArgument('logitBias', 'each token id once', given)
      seen.add(id)
      const bias = checkNumber(`logitBias[${id}]`, value, -MAX_BIAS, MAX_BIAS)
      if (bias !== 0) logitBias.push([id, bias])
    }
  }
  if (frequencyPenalty === 0 && presencePenalty === 0 && repetitionPenalty === 1 && logitBias.length === 0) return null
  return { frequencyPenalty, presencePenalty, repetitionPenalty, logitBias }
}

const RESPONSE_FORMATS =
  "{ type: 'text' }, { type: 'json_object' }, { type: 'json_schema', schema, strict? }, { type: 'regex', pattern }, { type: 'choice', choices }, { type: 'grammar', grammar } or { type: 'structural_tag', format }"

// The format's shape; the schema itself is checked when its grammar is built (ConstraintSource).
function checkResponseFormat(value: unknown): Exclude<ResponseFormat, { type: 'text' }> | null {
  if (!isPlainObject(value)) throw invalidArgument('responseFormat', RESPONSE_FORMATS, value)
  const keys = { text: ['type'], json_object: ['type'], json_schema: ['type', 'schema', 'strict'], regex: ['type', 'pattern'], choice: ['type', 'choices'], grammar: ['type', 'grammar'], structural_tag: ['type', 'format'] }[
    value.type as string
  ]
  if (!keys) throw invalidArgument('responseFormat.type', "'text', 'json_object', 'json_schema', 'regex', 'choice', 'grammar' or 'structural_tag'", value.type)
  const extra = Object.keys(value).find((k) => !keys.includes(k))
  if (extra !== undefined)
    throw new TypeError(`Expected only ${keys.map((k) => `'${k}'`).join(', ')} in a responseFormat of type '${value.type as string}' but received the key ${JSON.stringify(extra)}`)
  if (value.type === 'text') return null
  if (value.type === 'json_object') return { type: 'json_object' }
  // Their shapes here; what xgrammar makes of them where the grammar is built (ConstraintSource).
  const nonEmpty = (name: string, v: unknown): string => {
    if (typeof v !== 'string' || v === '') throw invalidArgument(name, 'non-empty string', v)
    return v
  }
  if (value.type === 'regex') return { type: 'regex', pattern: nonEmpty('responseFormat.pattern', value.pattern) }
  if (value.type === 'grammar') return { type: 'grammar', grammar: nonEmpty('responseFormat.grammar', value.grammar) }
  if (value.type === 'structural_tag') {
    if (!isPlainObject(value.format)) throw invalidArgument('responseFormat.format', "object (an xgrammar structural tag's format)", value.format)
    return { type: 'structural_tag', format: value.format }
  }
  if (value.type === 'choice') {
    if (!Array.isArray(value.choices) || value.choices.length === 0) throw invalidArgument('responseFormat.choices', 'non-empty array of non-empty strings', value.choices)
    // Every index, holes included.
    return { type: 'choice', choices: Array.from(value.choices as unknown[], (c, i) => nonEmpty(`responseFormat.choices[${i}]`, c)) }
  }
  const { schema, strict } = value
  if (typeof schema !== 'boolean' && !isPlainObject(schema)) throw invalidArgument('responseFormat.schema', 'JSON Schema (an object, or true or false)', schema)
  if (strict !== undefined && typeof strict !== 'boolean') throw invalidArgument('responseFormat.strict', 'boolean', strict)
  return { type: 'json_schema', schema, ...(strict !== undefined && { strict }) }
}

/** Template variables a request fills itself, which chatTemplateVariables may not set. */
export const REQUEST_TEMPLATE_VARIABLES = ['messages', 'add_generation_prompt'] as const

/** A plain object of template variables, without those of REQUEST_TEMPLATE_VARIABLES. */
export function checkChatTemplateVariables(value: unknown): ChatTemplateVariables {
  if (!isPlainObject(value)) throw invalidArgument('chatTemplateVariables', 'plain object of template variables', value)
  for (const key of REQUEST_TEMPLATE_VARIABLES)
    if (Object.hasOwn(value, key))
      throw invalidArgument(`chatTemplateVariables.${key}`, 'nothing (the messages and the generation prompt are given by the request)', value[key])
  return value as ChatTemplateVariables
}

// ---------------------------------------------------------------------------------------------
// Text assembly

/**
 * Turns generated ids into text as they come (through the tokenizer's incremental decoder), cuts it
 * at the first stop string, and holds back a tail that could still become one.
 */
export class CompletionText {
  text = ''
  /** The stop string the text was cut at, once one appeared. */
  stopString: string | null = null
  private emitted = 0
  private readonly decoder: TextStreamDecoder
  private readonly stop: string[]

  constructor(tokenizer: TextTokenizer, stop: string[], context: readonly number[] = []) {
    this.decoder = tokenizer.streamDecoder({ context })
    this.stop = stop
  }

  get stopped(): boolean {
    return this.stopString !== null
  }

  /** Adds one id; returns the text now safe to show. Sets `stopString` when a stop string appeared. */
  push(id: number, isLast: boolean): string {
    return this.add(this.decoder.push(id) + (isLast ? this.decoder.flush() : ''), isLast)
  }

  /** Ends the text without adding an id (one that ended the generation); returns the rest of it. */
  end(): string {
    return this.add(this.decoder.flush(), true)
  }

  private add(piece: string, isLast: boolean): string {
    if (piece) {
      const searchFrom = Math.max(0, this.text.length - this.longestStop() + 1)
      this.text += piece
      const cut = this.firstStop(searchFrom)
      if (cut) {
        this.text = this.text.slice(0, cut.at)
        this.stopString = cut.stop
      }
    }
    return this.take(isLast || this.stopped)
  }

  /** Text not yet returned, all of it when `all`, else without a tail that may begin a stop string. */
  take(all: boolean): string {
    const end = all ? this.text.length : this.text.length - this.heldBack()
    if (end <= this.emitted) return ''
    const piece = this.text.slice(this.emitted, end)
    this.emitted = end
    return piece
  }

  private longestStop(): number {
    return this.stop.reduce((m, s) => Math.max(m, s.length), 0)
  }

  // The earliest stop string in the text (the first listed of those found at one place).
  private firstStop(from: number): { at: number; stop: string } | null {
    let cut: { at: number; stop: string } | null = null
    for (const s of this.stop) {
      const i = this.text.indexOf(s, from)
      if (i >= 0 && (!cut || i < cut.at)) cut = { at: i, stop: s }
    }
    return cut
  }

  // Length of the longest tail of the text that is a proper prefix of a stop string.
  private heldBack(): number {
    let held = 0
    for (const s of this.stop)
      for (let k = Math.min(s.length - 1, this.text.length); k > held; k--)
        if (this.text.endsWith(s.slice(0, k))) {
          held = k
          break
        }
    return held
  }
}

// ---------------------------------------------------------------------------------------------
// Running one generation

/**
 * Submits one generation and assembles its result; `onPiece` receives each token as it comes.
 * An aborted `options.signal` cancels it (nothing is submitted if it is aborted already) and the
 * result rejects with the signal's reason.
 */
export function runGeneration(
  scheduler: Scheduler,
  tokenizer: TextTokenizer,
  prompt: number[],
  options: ResolvedGenerateOptions,
  onPiece?: (piece: StreamPiece) => void,
  constraint?: TokenConstraint,
): { result: Promise<GenerateResult>; cancel(): void } {
  const { signal } = options
  if (signal?.aborted) {
    constraint?.dispose()
    return { result: Promise.reject(signal.reason), cancel() {} }
  }
  const started = performance.now()
  const text = new CompletionText(tokenizer, options.stop, prompt)
  const tokens: number[] = []
  const logprobs: number[] = []
  const tops: TopLogprob[][] = []
  // The ids that end a generation: the model's EOS (unless ignored) and the caller's.
  const eosIds = new Set(options.ignoreEos ? [] : tokenizer.eosTokenIds)
  const stopIds = new Set([...eosIds, ...options.stopTokenIds])
  let stopReason: StopReason = null
  const request: GenerationRequest = {
    kind: 'generate',
    prompt,
    maxTokens: options.maxTokens,
    sampling: options.sampling,
    topLogprobs: options.topLogprobs,
    processors: options.processors,
    ...(constraint && { constraint }),
    onToken(token, logprob, top) {
      tokens.push(token)
      logprobs.push(logprob)
      if (top) tops.push(top)
      const ends = stopIds.has(token)
      const isLast = ends || tokens.length === options.maxTokens
      // The id that ends the generation adds no text (as vLLM leaves a stop token's text out).
      const piece = ends ? text.end() : text.push(token, isLast)
      const finishReason = ends || text.stopped ? 'stop' : isLast ? 'length' : undefined
      // As vLLM's stop_reason: the stop string, else the caller's stop id; EOS gives null, even when
      // stopTokenIds lists it too (vLLM checks EOS first).
      if (finishReason === 'stop') stopReason = text.stopString ?? (eosIds.has(token) ? null : token)
      onPiece?.({ text: piece, token, logprob, ...(top ? { topLogprobs: top } : {}), ...(finishReason && { finishReason, stopReason }) })
      return !(ends || text.stopped)
    },
  }
  let scheduled: Scheduled<GenerationOutcome>
  try {
    scheduled = scheduler.submit(request)
  } catch (err) {
    constraint?.dispose() // the scheduler owns it only once submitted
    throw err
  }
  const result = settledUnlessAborted(scheduled, signal).then(({ finishReason, timings }) => {
    if (finishReason === 'cancelled' && signal?.aborted) throw signal.reason
    const totalMs = performance.now() - started
    const decoded = Math.max(0, timings.completionTokens - 1)
    return {
      text: text.text,
      tokens,
      logprobs,
      ...(options.topLogprobs > 0 ? { topLogprobs: tops } : {}),
      finishReason: toPublicReason(finishReason),
      stopReason,
      ...(options.sampling ? { seed: options.sampling.seed } : {}),
      timings: {
        ...timings,
        totalMs,
        decodeTokensPerSecond: timings.decodeMs > 0 ? (decoded * 1000) / timings.decodeMs : 0,
      },
    }
  })
  return { result, cancel: scheduled.cancel }
}

/**
 * runGeneration, for a format that needs a grammar first: the grammar is built (a bad schema
 * rejects the result with its GrammarError, before anything is submitted), then the generation
 * runs as runGeneration runs it. An abort or a cancel meanwhile ends it at once.
 */
export function runConstrainedGeneration(
  scheduler: Scheduler,
  tokenizer: TextTokenizer,
  prompt: number[],
  options: ResolvedGenerateOptions,
  grammars: ConstraintSource | undefined,
  onPiece?: (piece: StreamPiece) => void,
): { result: Promise<GenerateResult>; cancel(): void } {
  const format = options.responseFormat
  if (!format) return runGeneration(scheduler, tokenizer, prompt, options, onPiece)
  if (!grammars) return { result: Promise.reject(new GrammarError(`This model cannot constrain a completion to responseFormat ${format.type}: it was built without grammars (ModelParts.grammars)`)), cancel() {} }
  const { signal } = options
  if (signal?.aborted) return { result: Promise.reject(signal.reason), cancel() {} }
  let run: { result: Promise<GenerateResult>; cancel(): void } | null = null
  let cancelled = false
  // A signal that aborts, or a cancel, while the grammar is being built (a new schema can take
  // a while) ends the generation at once; the grammar, when it comes, is disposed of unused.
  let stopEarly!: (reason: unknown) => void
  const early = new Promise<never>((_, reject) => (stopEarly = reject))
  const stopListening = signal ? whenAborted(signal, () => stopEarly(signal.reason)) : () => {}
  const built = grammars.constrain(format).then(
    (constraint) => {
      stopListening()
      if (cancelled || signal?.aborted) {
        constraint?.dispose()
        throw signal?.aborted ? signal.reason : new Error('The generation was cancelled while its grammar was built')
      }
      run = runGeneration(scheduler, tokenizer, prompt, options, onPiece, constraint ?? undefined)
      return run.result
    },
    (err: unknown) => {
      stopListening()
      throw err
    },
  )
  built.catch(() => {}) // when `early` settles the result first
  return {
    result: Promise.race([built, early]),
    cancel() {
      cancelled = true
      if (run) run.cancel()
      else stopEarly(new Error('The generation was cancelled while its grammar was built'))
    },
  }
}

function toPublicReason(reason: FinishReason): 'stop' | 'length' {
  return reason === 'length' ? 'length' : 'stop'
}

// One 'abort' listener per signal, whatever the number of requests that share it (a batch, or
// many calls given one signal): a listener each made Node warn of a leak past ten. The listener
// goes once no request waits on the signal: a signal that keeps a listener stays alive as long as
// its sources (Node keeps AbortSignal.any's signals with listeners), and so would all it holds.
const abortCallbacks = new WeakMap<AbortSignal, { callbacks: Set<() => void>; listener: () => void }>()

/** A scheduled request's outcome, the request cancelled should `signal` abort first. */
export function settledUnlessAborted<T>(scheduled: { done: Promise<T>; cancel(): void }, signal?: AbortSignal): Promise<T> {
  if (!signal) return scheduled.done
  return scheduled.done.finally(whenAborted(signal, () => scheduled.cancel()))
}

/** Calls `fn` once when `signal` aborts; the returned function stops that (call it when done). */
function whenAborted(signal: AbortSignal, fn: () => void): () => void {
  let entry = abortCallbacks.get(signal)
  if (!entry) {
    const callbacks = new Set<() => void>()
    const listener = () => {
      abortCallbacks.delete(signal)
      for (const f of callbacks) f()
    }
    entry = { callbacks, listener }
    abortCallbacks.set(signal, entry)
    signal.addEventListener('abort', listener, { once: true })
  }
  const { callbacks, listener } = entry
  callbacks.add(fn)
  return () => {
    callbacks.delete(fn)
    if (callbacks.size === 0 && abortCallbacks.get(signal)?.callbacks === callbacks) {
      abortCallbacks.delete(signal)
      signal.removeEventListener('abort', listener)
    }
  }
}

/**
 * An async iterable of pieces; leaving the loop early cancels the generation. Like an async
 * generator's, calls of next() that overlap are answered in order, and after the error a failed
 * generation throws once, next() is done.
 */
export function streamGeneration(
  start: (onPiece: (piece: StreamPiece) => void) => { result: Promise<GenerateResult>; cancel(): void },
): AsyncIterable<StreamPiece> {
  return {
    [Symbol.asyncIterator](): AsyncIterator<StreamPiece> {
      const queue: StreamPiece[] = []
      const waiting: (() => void)[] = []
      const wakeAll = () => {
        for (const wake of waiting.splice(0)) wake()
      }
      let finished = false
      let failure: unknown = null
      let thrown = false
      const run = start((piece) => {
        queue.push(piece)
        wakeAll()
      })
      run.result.then(
        () => (finished = true),
        (err) => {
          failure = err ?? new Error('generation failed')
          finished = true
        },
      ).finally(wakeAll)
      return {
        async next(): Promise<IteratorResult<StreamPiece>> {
          // Waiters wake in the order they came, so overlapping calls take the pieces in order.
          while (!queue.length && !finished) await new Promise<void>((r) => waiting.push(r))
          if (queue.length) return { value: queue.shift()!, done: false }
          if (failure && !thrown) {
            thrown = true
            throw failure
          }
          return { value: undefined, done: true }
        },
        async return(): Promise<IteratorResult<StreamPiece>> {
          run.cancel()
          await run.result.catch(() => {})
          return { value: undefined, done: true }
        },
      }
    },
  }
}
