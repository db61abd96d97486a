// The public Model: a loaded transformer, its tokenizer and the scheduler that serves requests to
// it. Every method validates its arguments here; the layers below trust them.
import { existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { cudaStatus, resolveDevice, type DeviceOption } from './device.js'
import { DisposedError, GrammarError, RequestTooLargeError, checkInteger, checkOptionKeys, contextText, invalidArgument } from './errors.js'
import {
  checkChatTemplateVariables,
  randomSeed,
  resolveGenerateOptions,
  runConstrainedGeneration,
  settledUnlessAborted,
  streamGeneration,
  type ConstraintSource,
  type GenerateOptions,
  type GenerateResult,
  type ResolvedGenerateOptions,
  type ResponseFormat,
  type StreamPiece,
  type TextTokenizer,
} from './generate.js'
import { GrammarEngine, MAX_GRAMMAR_WORKERS } from './grammar.js'
import { hubSnapshotDir, parseRepoId } from './hub-cache.js'
import type { DeviceName } from './native.js'
import { Scheduler, type ForwardModel, type SchedulerLoad } from './scheduler.js'
import { loadModelConfig, type ModelConfig } from './model/config.js'
import { Transformer } from './model/transformer.js'
import { MAX_LOGIT_PROCESSOR_ROWS } from './model/logit-processors.js'
import type { DeviceMemory } from './model/load-memory.js'
import type { LoadProgress } from './model/weights.js'
import { MAX_TOP_LOGPROBS, type TopLogprob } from './model/output-head.js'
import { Tokenizer, type ChatMessage, type ChatRender, type ChatTemplateVariables, type ChatToolCall } from './tokenizer.js'
import type { EncodeRequestOptions } from './encode-worker.js'

/** Directory name of the model shipped under models/. */
const DEFAULT_MODEL_NAME = 'default'
/** Positions per KV-cache block. */
const KV_BLOCK_SIZE = 16

export interface ScoreResult {
  /** The completion's ids, as scored (after the prompt's). */
  tokens: number[]
  /** Log-prob of each completion token given everything before it. */
  logprobs: number[]
  /** With topLogprobs > 0: per completion token, the most likely tokens at its position. */
  topLogprobs?: TopLogprob[][]
}

export interface ScoreOptions {
  /** Wrap the prompt in the model's chat template as one user message. */
  chat?: boolean
  /** Variables for the chat template beside the messages (with chat messages or `chat: true`). */
  chatTemplateVariables?: ChatTemplateVariables
  /** Chat messages whose last is an assistant's: end the prompt inside its text, to be continued (default false). */
  continueFinalMessage?: boolean
  /** Report the N most likely tokens at every scored position (0 to 20; default 0). */
  topLogprobs?: number
  /** Aborting it takes the request out of the batch at the next step and rejects with its reason. */
  signal?: AbortSignal
}

export interface ServingOptions {
  /** Sequences decoded together at most. */
  maxBatchSize: number
  /** Prompt tokens of one sequence fed per step at most. */
  prefillChunkSize: number
  /** Reuse KV-cache blocks of shared prompt prefixes (default false here; loadModel's default is true). */
  prefixCache?: boolean
}

export interface TokenizeOptions {
  /** Wrap a text in the chat template as one user message (default false). */
  chat?: boolean
  /** Variables for the chat template beside the messages (with chat messages or `chat: true`). */
  chatTemplateVariables?: ChatTemplateVariables
  /** Chat messages whose last is an assistant's: end the prompt inside its text, to be continued (default false). */
  continueFinalMessage?: boolean
  /** A text (without chat) with the special tokens the model expects around it, BOS (default true). */
  addSpecialTokens?: boolean
}

export interface TokenizeAsyncOptions extends TokenizeOptions {
  /** Stop waiting: the promise rejects with the signal's reason. */
  signal?: AbortSignal
  /** Milliseconds the text may take to encode once its turn comes (default 10,000). */
  timeoutMs?: number
}

/** The pieces a Model serves from; `loadModel` builds them from a model directory. */
export interface ModelParts {
  forward: ForwardModel & { dispose(): void }
  tokenizer: TextTokenizer
  path: string
  /** Grammars for responseFormat (absent: a request with one is refused). */
  grammars?: ConstraintSource
}

export class Model {
  /** The model directory it was loaded from: for a repo id, its snapshot directory in the Hugging Face cache. */
  readonly path: string
  readonly device: DeviceName
  readonly maxBatchSize: number
  readonly prefillChunkSize: number
  private readonly parts: ModelParts
  private readonly scheduler: Scheduler
  private disposing: Promise<void> | null = null

  constructor(parts: ModelParts, serving: ServingOptions) {
    this.parts = parts
    this.path = parts.path
    this.device = parts.forward.device
    this.scheduler = new Scheduler(parts.forward, serving)
    this.maxBatchSize = this.scheduler.maxBatchSize
    this.prefillChunkSize = this.scheduler.prefillChunkSize
  }

  /** Tokens of context (prompt plus completion) the model accepts. */
  get contextLength(): number {
    return this.parts.forward.maxPositions ?? this.parts.forward.config.maxPositionEmbeddings
  }

  get vocabSize(): number {
    return this.parts.forward.config.vocabSize
  }

  get disposed(): boolean {
    return this.disposing !== null
  }

  /**
   * Prompt ids as generate() would feed them: of a text, or of a conversation through the chat
   * template. `addSpecialTokens: false` leaves out of a text the special tokens the model expects
   * around it (BOS); a chat template's text carries its own.
   */
  tokenize(text: string | ChatMessage[], options: TokenizeOptions = {}): number[] {
    this.checkOpen()
    const o = checkOptions(options, { chat: 'boolean', chatTemplateVariables: 'checked', continueFinalMessage: 'boolean', addSpecialTokens: 'boolean' })
    const chat = o.chat === true
    if (Array.isArray(text) || chat) checkNoSpecialTokensOption(o)
    if (Array.isArray(text)) checkConversation('text', text)
    else if (typeof text !== 'string') throw invalidArgument('text', 'string or array of chat messages', text)
    const render = chatRender(o, text, chat)
    const t = this.parts.tokenizer
    if (Array.isArray(text)) return this.checkTokenizerIds('text', t.encodeChat(text, render))
    if (o.addSpecialTokens === false) return t.encodeText ? t.encodeText(text, false) : t.encodeContinuation(text)
    return t.encodePrompt(text, chat, render)
  }

  /**
   * tokenize() with the text encoded in a worker thread: the same ids, while this thread goes on
   * serving (a 512 KB prompt takes about 0.3 s to encode). Texts are encoded one at a time in
   * arrival order; one that takes longer than `timeoutMs` (default 10 s) rejects with an
   * EncodeTimeoutError, and `signal` stops waiting for one.
   */
  async tokenizeAsync(text: string | ChatMessage[], options: TokenizeAsyncOptions = {}): Promise<number[]> {
    this.checkOpen()
    const o = checkOptions(options, {
      chat: 'boolean',
      chatTemplateVariables: 'checked',
      continueFinalMessage: 'boolean',
      addSpecialTokens: 'boolean',
      signal: 'AbortSignal',
      timeoutMs: 'number',
    })
    const chat = o.chat === true
    if (Array.isArray(text) || chat) checkNoSpecialTokensOption(o)
    if (Array.isArray(text)) checkConversation('text', text)
    else if (typeof text !== 'string') throw invalidArgument('text', 'string or array of chat messages', text)
    const render = chatRender(o, text, chat)
    const encode: EncodeRequestOptions = {
      ...(options.signal && { signal: options.signal }),
      ...(options.timeoutMs !== undefined && { timeoutMs: checkInteger('timeoutMs', options.timeoutMs, 1, 2 ** 31 - 1) }),
    }
    const t = this.parts.tokenizer
    const encodeChat = (messages: ChatMessage[]) =>
      t.encodeChatAsync ? t.encodeChatAsync(messages, { ...encode, ...render }) : Promise.resolve(t.encodeChat(messages, render))
    if (Array.isArray(text)) return this.checkTokenizerIds('text', await encodeChat(text))
    if (chat) return encodeChat([{ role: 'user', content: text }])
    const special = o.addSpecialTokens !== false
    if (t.encodeTextAsync) return t.encodeTextAsync(text, special, encode)
    return special ? t.encodePrompt(text, false) : t.encodeContinuation(text)
  }

  /** The special tokens by their tokenizer_config.json names (bos_token, eos_token, pad_token, ...), as text. */
  get specialTokens(): Readonly<Record<string, string>> {
    return this.parts.tokenizer.specialTokenTexts ?? {}
  }

  /** The chat template's source (chat_template.jinja, or tokenizer_config.json's chat_template), or null. */
  get chatTemplate(): string | null {
    return this.parts.tokenizer.chatTemplateSource ?? null
  }

  /** The bytes token `id` stands for (part of a UTF-8 character, possibly). */
  tokenBytes(id: number): Uint8Array {
    this.checkOpen()
    checkInteger('id', id, 0, this.vocabSize - 1)
    const t = this.parts.tokenizer
    return t.tokenBytes ? t.tokenBytes(id) : new TextEncoder().encode(t.decode([id]))
  }

  /** Sequences running and waiting, KV-cache blocks in use, steps and the wait for grammar masks (for monitoring). */
  get load(): SchedulerLoad {
    return this.scheduler.load
  }

  detokenize(tokens: readonly number[]): string {
    this.checkOpen()
    return this.parts.tokenizer.decode(this.checkTokens('tokens', tokens))
  }

  /** One completion. Greedy unless `temperature` > 0; sampling with a `seed` is just as reproducible. */
  async generate(prompt: Prompt, options?: GenerateOptions): Promise<GenerateResult> {
    this.checkOpen()
    const resolved = this.resolveOptions(options)
    const ids = this.promptIds(prompt, resolved.chat, 'prompt', resolved)
    return runConstrainedGeneration(this.scheduler, this.parts.tokenizer, ids, this.fitted(resolved, options, ids), this.parts.grammars).result
  }

  /**
   * Completions of many prompts, served together; result i belongs to prompt i. Every prompt is
   * checked before any is submitted, and when one generation fails the others are cancelled.
   * Sampling without a `seed` draws a seed for each prompt (each result reports its own).
   */
  async generateBatch(prompts: Prompt[], options?: GenerateOptions): Promise<GenerateResult[]> {
    this.checkOpen()
    if (!Array.isArray(prompts)) throw invalidArgument('prompts', 'array of prompts', prompts)
    const resolved = this.resolveOptions(options)
    // Without a seed, each prompt samples with a seed of its own, as separate generate() calls
    // would: one shared random seed would give equal prompts the same completion.
    const seeded = (i: number): ResolvedGenerateOptions =>
      i === 0 || !resolved.sampling || options?.seed !== undefined ? resolved : { ...resolved, sampling: { ...resolved.sampling, seed: randomSeed() } }
    // Every index, holes included (map and forEach skip them).
    const planned = Array.from(prompts, (p, i) => {
      const ids = this.promptIds(p, resolved.chat, `prompts[${i}]`, resolved)
      return { ids, options: this.fitted(seeded(i), options, ids) }
    })
    const runs = planned.map((p) => runConstrainedGeneration(this.scheduler, this.parts.tokenizer, p.ids, p.options, this.parts.grammars))
    try {
      return await Promise.all(runs.map((r) => r.result))
    } catch (err) {
      for (const r of runs) r.cancel()
      throw err
    }
  }

  /**
   * Builds the grammar of a responseFormat, as generate() would, and rejects with its GrammarError
   * when it cannot: a server checks a request's schema before its answer starts. The grammar is
   * kept for the generations that follow.
   */
  async checkResponseFormat(format: ResponseFormat): Promise<void> {
    this.checkOpen()
    const { responseFormat } = this.resolveOptions({ responseFormat: format })
    if (!responseFormat) return
    if (!this.parts.grammars) throw new GrammarError(`This model cannot constrain a completion to responseFormat ${responseFormat.type}: it was built without grammars (ModelParts.grammars)`)
    const constraint = await this.parts.grammars.constrain(responseFormat)
    constraint?.dispose()
  }

  /** The completion piece by piece; breaking out of the loop stops the generation. */
  stream(prompt: Prompt, options?: GenerateOptions): AsyncIterable<StreamPiece> {
    this.checkOpen()
    const resolved = this.resolveOptions(options)
    const ids = this.promptIds(prompt, resolved.chat, 'prompt', resolved)
    const fitted = this.fitted(resolved, options, ids) // a request too large throws here, not when iterated
    return streamGeneration((onPiece) => runConstrainedGeneration(this.scheduler, this.parts.tokenizer, ids, fitted, this.parts.grammars, onPiece))
  }

  /**
   * Log-probs of `completion` following `prompt`, computed by the same forward pass as generation:
   * for a completion generate() produced (pass its `tokens`), they equal its `logprobs` bit for bit.
   * A completion given as text is tokenized on its own, which may split it differently than
   * generation did.
   */
  async score(prompt: Prompt, completion: string | number[], options: ScoreOptions = {}): Promise<ScoreResult> {
    this.checkOpen()
    const o = checkOptions(options, { chat: 'boolean', chatTemplateVariables: 'checked', continueFinalMessage: 'boolean', topLogprobs: 'number', signal: 'AbortSignal' })
    const topLogprobs = o.topLogprobs === undefined ? 0 : checkInteger('topLogprobs', o.topLogprobs, 0, MAX_TOP_LOGPROBS)
    const variables = o.chatTemplateVariables === undefined ? undefined : checkChatTemplateVariables(o.chatTemplateVariables)
    const promptIds = this.promptIds(prompt, o.chat === true, 'prompt', {
      ...(variables && { chatTemplateVariables: variables }),
      continueFinalMessage: o.continueFinalMessage === true,
    })
    let tokens: number[]
    if (typeof completion === 'string') {
      const ids = this.parts.tokenizer.encodeContinuation(completion)
      if (ids.length === 0) throw invalidArgument('completion', 'text or ids of at least one token', completion)
      tokens = this.checkTokenizerIds('completion', ids)
    } else {
      tokens = this.checkTokens('completion', completion)
    }
    if (tokens.length === 0) throw invalidArgument('completion', 'text or ids of at least one token', completion)
    const total = promptIds.length + tokens.length
    if (total > this.contextLength)
      throw new RequestTooLargeError(
        `The prompt plus completion is ${total} tokens (${promptIds.length} + ${tokens.length}) but the model's context is ${this.contextLength} tokens`,
      )
    const signal = o.signal as AbortSignal | undefined
    if (signal?.aborted) throw signal.reason
    const scheduled = this.scheduler.submit({ kind: 'score', tokens: [...promptIds, ...tokens], from: promptIds.length, topLogprobs })
    const { logprobs, top } = await settledUnlessAborted(scheduled, signal)
    if (signal?.aborted) throw signal.reason
    return { tokens, logprobs: Array.from(logprobs), ...(top ? { topLogprobs: top } : {}) }
  }

  /** Ends every request (they reject with a DisposedError) and frees the weights and the cache. */
  dispose(): Promise<void> {
    if (!this.disposing)
      this.disposing = this.scheduler.close(new DisposedError()).finally(() => {
        this.parts.tokenizer.close?.(new DisposedError())
        this.parts.grammars?.dispose(new DisposedError())
        this.parts.forward.dispose()
      })
    return this.disposing
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose()
  }

  private checkOpen(): void {
    if (this.disposing) throw new DisposedError()
  }

  private resolveOptions(options: GenerateOptions | undefined) {
    return resolveGenerateOptions(options, {
      contextLength: this.contextLength,
      vocabSize: this.vocabSize,
      maxPositionEmbeddings: this.parts.forward.config.maxPositionEmbeddings,
    })
  }

  // The default maxTokens shrinks to what the context leaves after the prompt; an explicit one does
  // not. A prompt that leaves no room at all is named as what does not fit. Then the request is
  // checked against the context and the KV cache as the scheduler will check it.
  private fitted(resolved: ResolvedGenerateOptions, options: GenerateOptions | undefined, prompt: number[]) {
    let fit = resolved
    if (options?.maxTokens === undefined) {
      if (prompt.length >= this.contextLength)
        throw new RequestTooLargeError(
          `The prompt (${prompt.length} tokens) leaves no room for a completion in ` +
            contextText(this.contextLength, this.parts.forward.config.maxPositionEmbeddings),
        )
      fit = { ...resolved, maxTokens: Math.min(resolved.maxTokens, this.contextLength - prompt.length) }
    }
    this.scheduler.checkGeneration(prompt.length, fit.maxTokens)
    return fit
  }

  private promptIds(
    prompt: unknown,
    chat: boolean,
    name = 'prompt',
    options: { chatTemplateVariables?: ChatTemplateVariables; continueFinalMessage?: boolean } = {},
  ): number[] {
    const messages = Array.isArray(prompt) && prompt.length > 0 && typeof prompt[0] === 'object' && prompt[0] !== null
    if (messages) checkMessages(name, prompt)
    const render = chatRender(options, messages ? (prompt as ChatMessage[]) : '', chat)
    if (typeof prompt === 'string') {
      const ids = this.parts.tokenizer.encodePrompt(prompt, chat, render)
      if (ids.length === 0) throw invalidArgument(name, 'text of at least one token', prompt)
      return this.checkTokenizerIds(name, ids)
    }
    if (!Array.isArray(prompt)) throw invalidArgument(name, 'string, array of token ids or array of chat messages', prompt)
    if (messages) return this.checkTokenizerIds(name, this.parts.tokenizer.encodeChat(prompt as ChatMessage[], render))
    if (chat) throw invalidArgument('chat', 'false or absent when the prompt is given as token ids', chat)
    if (prompt.length === 0) throw invalidArgument(name, 'at least one token id', prompt)
    return this.checkTokens(name, prompt)
  }

  /** Ids the tokenizer gave for `name`: a tokenizer that does not match the model is named as the cause. */
  private checkTokenizerIds(name: string, ids: number[]): number[] {
    const V = this.vocabSize
    const bad = ids.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= V)
    if (bad >= 0)
      throw new RangeError(
        `Expected token ids between 0 and ${V - 1} (the model's vocabulary) from the tokenizer for ${name} but received ${ids[bad]} at token ${bad}; the tokenizer does not match the model`,
      )
    if (ids.length === 0) throw new Error(`The tokenizer gave no tokens for ${name}`)
    return ids
  }

  private checkTokens(name: string, tokens: unknown): number[] {
    if (!Array.isArray(tokens)) throw invalidArgument(name, 'array of token ids', tokens)
    // Every index, holes included (forEach skips them).
    for (let i = 0; i < tokens.length; i++) checkInteger(`${name}[${i}]`, tokens[i], 0, this.vocabSize - 1)
    return tokens as number[]
  }
}

/**
 * How a prompt's conversation is rendered, from options checked already: template variables and
 * continueFinalMessage apply to chat messages (and variables to chat: true); continueFinalMessage
 * needs a last message of the assistant's to continue.
 */
function chatRender(o: { chatTemplateVariables?: unknown; continueFinalMessage?: unknown }, prompt: string | ChatMessage[], chat: boolean): ChatRender | undefined {
  const messages = Array.isArray(prompt)
  const variables = o.chatTemplateVariables === undefined ? undefined : checkChatTemplateVariables(o.chatTemplateVariables)
  if (variables && !chat && !messages) throw invalidArgument('chatTemplateVariables', 'nothing unless the prompt is chat messages or chat is true', variables)
  const continued = o.continueFinalMessage === true
  if (continued && (!messages || prompt.at(-1)?.role !== 'assistant'))
    throw invalidArgument('continueFinalMessage', "true only for chat messages whose last is the assistant's (the text to continue)", true)
  if (!variables && !continued) return undefined
  return { ...(variables && { variables }), ...(continued && { continueFinalMessage: true }) }
}

/** addSpecialTokens is for a text without chat: a chat template's text carries its own special tokens. */
function checkNoSpecialTokensOption(o: Record<string, unknown>): void {
  if (o.addSpecialTokens !== undefined)
    throw invalidArgument('addSpecialTokens', 'nothing (with chat messages or chat: true, the chat template places its own special tokens)', o.addSpecialTokens)
}

/** A conversation to tokenize: at least one chat message, each checked. */
function checkConversation(name: string, messages: unknown[]): asserts messages is ChatMessage[] {
  if (messages.length === 0) throw invalidArgument(name, 'string or non-empty array of chat messages', messages)
  checkMessages(name, messages)
}

/** Each item of `messages` a chat message {role, content} with string values; holes included. */
function checkMessages(name: string, messages: unknown[]): asserts messages is ChatMessage[] {
  for (let i = 0; i < messages.length; i++) {
    const m = messages[i] as ChatMessage | undefined // a hole reads as undefined
    if (typeof m !== 'object' || m === null || typeof m.role !== 'string' || typeof m.content !== 'string')
      throw invalidArgument(`${name}[${i}]`, 'chat message {role, content} with string values', m)
    if (m.tool_calls !== undefined) checkToolCalls(`${name}[${i}].tool_calls`, m.tool_calls)
  }
}

function checkToolCalls(name: string, calls: unknown): void {
  if (!Array.isArray(calls)) throw invalidArgument(name, 'array of tool calls {function: {name, arguments}}', calls)
  // Every index, holes included (forEach skips them).
  for (let j = 0; j < calls.length; j++) {
    const call: unknown = calls[j]
    const f = (call as ChatToolCall | null | undefined)?.function
    const args = f?.arguments
    if (typeof f?.name !== 'string' || (typeof args !== 'string' && (typeof args !== 'object' || args === null || Array.isArray(args))))
      throw invalidArgument(`${name}[${j}]`, 'tool call {function: {name, arguments}} with a string name and arguments a JSON string or an object', call)
  }
}

/** `options` as an object of only the given keys, each of its type when present ('checked' ones the caller checks). */
function checkOptions(options: unknown, keys: Record<string, 'boolean' | 'number' | 'AbortSignal' | 'checked'>): Record<string, unknown> {
  const o = checkOptionKeys(options, Object.keys(keys))
  for (const [key, value] of Object.entries(o)) {
    const type = keys[key]!
    if (value === undefined || type === 'checked') continue
    const ok = type === 'AbortSignal' ? value instanceof AbortSignal : typeof value === type
    if (!ok) throw invalidArgument(key, type, value)
  }
  return o
}

// ---------------------------------------------------------------------------------------------
// Loading

export type { LoadProgress }

/**
 * What to complete: text (encoded as the model expects, or wrapped in its chat template as one
 * user message with `chat: true`), token ids as they are, or a conversation of chat messages
 * rendered by the model's chat template up to the assistant's turn.
 */
export type Prompt = string | number[] | ChatMessage[]

export interface LoadModelOptions {
  /** 'auto' (default): CUDA when a usable GPU is there, else the CPU. */
  device?: DeviceOption
  /** Tokens (decodes plus prompt chunks) in one forward pass at most. */
  maxBatchTokens?: number
  /** Sequences decoded together at most. */
  maxBatchSize?: number
  /** Prompt tokens of one sequence per forward pass at most (longer prompts are fed in chunks). */
  prefillChunkSize?: number
  /** KV-cache capacity in tokens, shared by all running sequences (or give kvBlocks). */
  kvCacheTokens?: number
  /** KV-cache capacity in blocks of the model's block size. */
  kvBlocks?: number
  /**
   * Keep the KV-cache blocks of block-aligned prompt prefixes after their request ends and reuse
   * them for later requests that start with the same tokens (default true). The answers are the
   * same bits either way; only the work differs.
   */
  prefixCache?: boolean
  /**
   * Replay decode steps as CUDA graphs (default true on CUDA; ignored on the CPU). The bits are
   * the same either way; graphs take the host's launch work out of each decode step.
   */
  cudaGraphs?: boolean
  /**
   * Tensor parallelism, emulated in one process: 1, 2, 4 or 8 ranks, every degree giving the
   * same bits (README "Tensor parallelism (emulated)"). Unset: no partition of the row-parallel
   * products (today's bits, which differ from every degree's). Above 1 on the CPU only.
   */
  tensorParallel?: number
  /**
   * A chat template (Jinja source) to use instead of the model's (chat_template.jinja or
   * tokenizer_config.json's chat_template), for a model without one or to change how
   * conversations are written.
   */
  chatTemplate?: string
  /**
   * Worker threads that compute the grammar masks of structured output (responseFormat) in
   * parallel with each other and with the main thread, from 0 (every mask on the main thread,
   * one after another) to 64. Default: one less than the cores Node may use, at most 8. The
   * masks, and so the completions, are the same bits either way.
   */
  grammarWorkers?: number
  onProgress?: (progress: LoadProgress) => void
}

// Every key of LoadModelOptions (a key added there and not here fails to compile).
const LOAD_OPTION_KEYS = Object.keys({
  device: true,
  maxBatchTokens: true,
  maxBatchSize: true,
  prefillChunkSize: true,
  kvCacheTokens: true,
  kvBlocks: true,
  prefixCache: true,
  cudaGraphs: true,
  tensorParallel: true,
  chatTemplate: true,
  grammarWorkers: true,
  onProgress: true,
} satisfies Record<keyof LoadModelOptions, true>)

const DEFAULTS = {
  cpu: { maxBatchTokens: 256, maxBatchSize: 16 },
  cuda: { maxBatchTokens: 2048, maxBatchSize: 64 },
} as const

const GiB = 2 ** 30

/** Default KV-cache size: a quarter of the GPU's memory (1 GiB on the CPU), at most 128k positions. */
function defaultKvCacheTokens(config: ModelConfig, device: DeviceName): number {
  const bytesPerPosition = config.numLayers * config.numKvHeads * config.headDim * 2 * 2 // k and v, bf16
  const budget = device === 'cuda' ? (cudaStatus().devices[0]?.totalMemory ?? 8 * GiB) / 4 : GiB
  return Math.max(KV_BLOCK_SIZE, Math.min(131_072, Math.floor(budget / bytesPerPosition)))
}

/**
 * The directory of the small model that ships with the package (models/default: a 3.4 M-parameter
 * Qwen3-architecture model trained on Shakespeare); `loadModel()` without a directory loads it.
 */
export const defaultModelPath = join(dirname(fileURLToPath(import.meta.url)), '..', 'models', DEFAULT_MODEL_NAME)

/**
 * The directory `model` names: a model directory (an existing path always is one), or else a
 * Hugging Face repo id `owner/name[@revision]` found in the local Hugging Face cache (never
 * downloaded; lib/hub-cache.ts). Throws the one "No model at …" error unless the directory
 * holds a config.json.
 */
export function resolveModelDir(model: unknown): { path: string; repoId?: string } {
  if (typeof model !== 'string' || model === '') throw invalidArgument('dir', 'path of a model directory or a Hugging Face repo id', model)
  if (existsSync(join(model, 'config.json'))) return { path: model }
  const ref = existsSync(model) ? null : parseRepoId(model)
  if (ref) return { path: hubSnapshotDir(model, ref), repoId: ref.repoId }
  throw new Error(`No model at ${model}: expected a Hugging Face model directory with config.json, weights and tokenizer.json`)
}

/** The directory `model` names (resolveModelDir), or the one "No model at …" error. */
export function checkModelDir(model: unknown): string {
  return resolveModelDir(model).path
}

/**
 * Loads a Hugging Face model: a model directory (config.json, safetensors weights,
 * tokenizer.json), or a repo id `owner/name[@revision]` already in the local Hugging Face cache;
 * without one (`loadModel()`, `loadModel(undefined, options)`), the shipped model at `defaultModelPath`.
 */
export async function loadModel(dir: string = defaultModelPath, options: LoadModelOptions = {}): Promise<Model> {
  return loadFrom(checkModelDir(dir), null, options)
}

/**
 * @internal A model directory with its config.json parsed, and optionally the device once resolved
 * and the tokenizer once loaded: the CLI checks its options against them, then loads from them
 * (loadModelFrom) without reading or resolving again.
 */
export interface ModelSource {
  readonly path: string
  /** The Hugging Face repo id when `path` is its snapshot in the cache: the model's name. */
  readonly repoId?: string
  readonly config: ModelConfig
  readonly device?: DeviceName
  readonly tokenizer?: Tokenizer
}

/** @internal Resolves `dir` like loadModel and parses its config.json. */
export async function readModelDir(dir: unknown): Promise<ModelSource> {
  const { path, repoId } = resolveModelDir(dir)
  return { path, ...(repoId !== undefined && { repoId }), config: await loadModelConfig(path) }
}

/**
 * @internal The tokenizer of a model directory, as loadModel loads it (every id below the
 * config's vocab_size), with `chatTemplate` (and where it came from) instead of the model's.
 */
export function loadTokenizer(source: ModelSource, chatTemplate?: { source: string; origin: string }): Promise<Tokenizer> {
  return Tokenizer.load(source.path, {
    modelVocabSize: source.config.vocabSize,
    modelConfigFile: join(source.path, 'config.json'),
    modelEosTokenIds: source.config.eosTokenIds,
    ...(chatTemplate && { chatTemplate }),
  })
}

/**
 * @internal loadModel from a source read already; `source.device`, when given, overrides
 * options.device. `deviceMemory`, when given, is the CUDA memory reading of the check before the
 * weights upload (TransformerOptions.deviceMemory): bench/fits.mjs gives a smaller card's total.
 */
export function loadModelFrom(source: ModelSource, options: LoadModelOptions = {}, deviceMemory?: () => DeviceMemory): Promise<Model> {
  return loadFrom(source.path, source, options, deviceMemory)
}

async function loadFrom(dir: string, source: ModelSource | null, options: LoadModelOptions, deviceMemory?: () => DeviceMemory): Promise<Model> {
  checkOptionKeys(options, LOAD_OPTION_KEYS) // devic: 'cuda' must fail, not load on the CPU
  const device = source?.device ?? resolveDevice(options.device ?? 'auto')
  const defaults = DEFAULTS[device]
  const maxBatchTokens = options.maxBatchTokens === undefined ? defaults.maxBatchTokens : checkInteger('maxBatchTokens', options.maxBatchTokens, 1, 1 << 20)
  const maxBatchSize = options.maxBatchSize === undefined ? Math.min(defaults.maxBatchSize, maxBatchTokens) : checkInteger('maxBatchSize', options.maxBatchSize, 1, maxBatchTokens)
  const prefillChunkSize = options.prefillChunkSize === undefined ? maxBatchTokens : checkInteger('prefillChunkSize', options.prefillChunkSize, 1, maxBatchTokens)
  if (options.kvBlocks !== undefined && options.kvCacheTokens !== undefined)
    throw new TypeError('Expected kvBlocks or kvCacheTokens for the KV-cache size but received both')
  if (options.kvCacheTokens !== undefined) checkInteger('kvCacheTokens', options.kvCacheTokens, 1, 1 << 30)
  if (options.kvBlocks !== undefined) checkInteger('kvBlocks', options.kvBlocks, 1, 1 << 26)
  if (options.prefixCache !== undefined && typeof options.prefixCache !== 'boolean')
    throw invalidArgument('prefixCache', 'boolean', options.prefixCache)
  if (options.cudaGraphs !== undefined && typeof options.cudaGraphs !== 'boolean')
    throw invalidArgument('cudaGraphs', 'boolean', options.cudaGraphs)
  if (options.onProgress !== undefined && typeof options.onProgress !== 'function')
    throw invalidArgument('onProgress', 'function', options.onProgress)
  if (options.grammarWorkers !== undefined) checkInteger('grammarWorkers', options.grammarWorkers, 0, MAX_GRAMMAR_WORKERS)

  const config = source?.config ?? (await loadModelConfig(dir))
  const kvCacheTokens = options.kvCacheTokens ?? defaultKvCacheTokens(config, device)
  const kvBlocks = options.kvBlocks ?? Math.ceil(kvCacheTokens / KV_BLOCK_SIZE)
  if (options.chatTemplate !== undefined && typeof options.chatTemplate !== 'string')
    throw invalidArgument('chatTemplate', 'string (the Jinja source of a chat template)', options.chatTemplate)
  if (source?.tokenizer && options.chatTemplate !== undefined) throw new TypeError('Expected no chatTemplate for a model source whose tokenizer is loaded already')
  const template = options.chatTemplate === undefined ? undefined : { source: options.chatTemplate, origin: 'given to loadModel' }
  const tokenizer = source?.tokenizer ?? (await loadTokenizer({ path: dir, config }, template))
  const forward = await Transformer.load(dir, {
    device,
    config,
    maxBatchTokens,
    kvBlocks,
    kvBlockSize: KV_BLOCK_SIZE,
    // Logits are f32 [rows, vocab]: rows for every decoding sequence, and scored chunks up to 512 tokens.
    maxLogitRows: Math.max(maxBatchSize, Math.min(maxBatchTokens, 512)),
    // Decode steps of up to maxBatchSize sequences (the scheduler's most) replay CUDA graphs, and
    // decode attention's workspace is sized for them.
    maxDecodeRows: maxBatchSize,
    // A row of the penalties' and logit bias' table per sequence of the batch (allocated when the
    // first request that uses them is admitted).
    logitProcessorRows: Math.min(maxBatchSize, MAX_LOGIT_PROCESSOR_ROWS),
    cudaGraphs: device === 'cuda' && options.cudaGraphs !== false,
    ...(options.tensorParallel !== undefined && { tensorParallel: options.tensorParallel }),
    ...(deviceMemory && { deviceMemory }),
    ...(options.onProgress && { onProgress: options.onProgress }),
  })
  const serving = { maxBatchSize, prefillChunkSize, prefixCache: options.prefixCache ?? true }
  // Grammars for responseFormat: nothing is built until the first request that has one.
  const grammars = new GrammarEngine(tokenizer, config.vocabSize, { workers: options.grammarWorkers })
  return new Model({ forward, tokenizer: servingTokenizer(tokenizer), path: dir, grammars }, serving)
}

/**
 * @internal The forward pass a Model serves from, for `detinfer check`: the determinism check
 * drives it with schedulers of its own to vary the batch size and the prefill chunk size between
 * phases. The Model must serve nothing else meanwhile (they share its KV cache).
 */
export function forwardOf(model: Model): ForwardModel {
  return model['parts'].forward
}

// Models often pad their vocabulary past the tokenizer's last id; such ids decode to nothing.
function servingTokenizer(t: Tokenizer): TextTokenizer {
  const known = (ids: readonly number[]) => ids.filter((id) => id < t.vocabSize)
  return {
    encodePrompt: (text, chat, render) => t.encodePrompt(text, chat, render),
    encodeChat: (messages, render) => t.encodeChat(messages, render),
    encodeContinuation: (text) => t.encodeContinuation(text),
    encodeText: (text, addSpecialTokens) => t.encode(text, { addSpecialTokens }),
    encodeTextAsync: (text, addSpecialTokens, options) => t.encodeAsync(text, { ...options, addSpecialTokens }),
    encodeChatAsync: (messages, options) => t.encodeChatAsync(messages, options),
    specialTokenTexts: t.specialTokenTexts,
    chatTemplateSource: t.chatTemplateSource,
    close: (reason) => t.close(reason),
    decode: (ids) => t.decode(known(ids)),
    tokenBytes: (id) => (id < t.vocabSize ? t.tokenBytes(id) : new Uint8Array(0)),
    streamDecoder: ({ context }) => {
      const decoder = t.streamDecoder({ context: known(context) })
      return { push: (id) => (id < t.vocabSize ? decoder.push(id) : ''), flush: () => decoder.flush() }
    },
    eosTokenIds: t.eosTokenIds,
  }
}
