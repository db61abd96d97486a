// Text <-> token ids for a Hugging Face model directory: tokenizer.json through
// @huggingface/tokenizers, BOS/EOS and the chat template from tokenizer_config.json and
// generation_config.json, and an incremental decoder for streaming.
import { join } from 'node:path'
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers'
import { ChatTemplate } from './chat-template.js'
import { EncodeWorker, type EncodeRequestOptions } from './encode-worker.js'
import { describeValue, invalidField, isPlainObject } from './errors.js'
import { pathExists, readJsonFile, readTextFile } from './files.js'
import type { GrammarVocabulary, VocabType } from './grammar.js'
import { MAX_VOCAB_SIZE } from './step.js'

export interface EncodeOptions {
  /** Add the special tokens the model expects around a text (BOS; default true). */
  addSpecialTokens?: boolean
}

export interface DecodeOptions {
  /** Leave special tokens (BOS, EOS, chat markers) out of the text (default true). */
  skipSpecialTokens?: boolean
}

/** Variables a chat template reads besides the messages (Qwen3's enable_thinking, a date, tools, ...). */
export type ChatTemplateVariables = Readonly<Record<string, unknown>>

/** How a conversation is rendered: the template's variables, and how it ends. */
export interface ChatRender {
  variables?: ChatTemplateVariables
  /** End with the assistant's turn to speak (default true). */
  addGenerationPrompt?: boolean
  /** End inside the last message, an assistant's, so that the model continues its text (default false). */
  continueFinalMessage?: boolean
}

export interface ChatMessage {
  role: string
  content: string
  /** A tool message's call id, handed to the chat template like the rest of the message. */
  tool_call_id?: string
  /** An assistant message's tool calls, in the OpenAI API's shape, as tool-use chat templates read them. */
  tool_calls?: ChatToolCall[]
}

/**
 * A call an assistant message made. Templates read `function.name` and `function.arguments`:
 * Qwen's and Hermes' write a string of arguments as it is and an object through tojson.
 */
export interface ChatToolCall {
  id?: string
  type?: 'function'
  function: { name: string; arguments: string | Record<string, unknown> }
}

type Json = Record<string, unknown>

/** A special token as tokenizer_config.json writes it: a string or an AddedToken object. */
function tokenContent(value: unknown): string | null {
  if (typeof value === 'string') return value
  if (value && typeof value === 'object' && typeof (value as Json)['content'] === 'string')
    return (value as Json)['content'] as string
  return null
}

async function readOptionalJson(file: string): Promise<Json | null> {
  if (!(await pathExists(file))) return null
  const v = await readJsonFile(file)
  if (!isPlainObject(v)) throw invalidField('a JSON object', 'the file', file, v)
  return v
}

/** The first post-processor step that adds a special token in front of a single text, if any. */
function leadingTemplateToken(postProcessor: unknown): string | null {
  if (!postProcessor || typeof postProcessor !== 'object') return null
  const p = postProcessor as Json
  if (p['type'] === 'Sequence' && Array.isArray(p['processors'])) {
    for (const inner of p['processors']) {
      const t = leadingTemplateToken(inner)
      if (t !== null) return t
    }
    return null
  }
  if (p['type'] !== 'TemplateProcessing' || !Array.isArray(p['single'])) return null
  const first = p['single'][0] as Json | undefined
  const special = first?.['SpecialToken'] as Json | undefined
  return typeof special?.['id'] === 'string' ? (special['id'] as string) : null
}

export interface TokenizerLoadOptions {
  /** The model's vocab_size: every id of the tokenizer must be below it. */
  modelVocabSize?: number
  /** The file that gave modelVocabSize, for messages (default "config.json"). */
  modelConfigFile?: string
  /**
   * config.json's eos_token_id: the ids that end a generation when generation_config.json gives
   * none (as Hugging Face derives a model's generation config from its config).
   */
  modelEosTokenIds?: readonly number[]
  /** A chat template to use instead of the model's, and where it came from (for messages: "from --chat-template x.jinja"). */
  chatTemplate?: { source: string; origin: string }
}

/** The bound every token id of the tokenizer files is checked against, and where it comes from. */
interface IdLimit {
  size: number
  what: string
}

function checkId(id: unknown, limit: IdLimit, field: string, file: string): number {
  if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= limit.size)
    throw invalidField(`a token id below ${limit.size} (${limit.what})`, field, file, id)
  return id
}

/**
 * Checks tokenizer.json's model and added tokens before the tokenizer library sees them: the
 * library sizes arrays by the largest id, so one id of 2e9 would stall the process.
 */
function checkTokenizerJson(json: unknown, file: string, limit: IdLimit): Json {
  if (!isPlainObject(json)) throw invalidField('a JSON object', 'the tokenizer', file, json)
  const model = json['model']
  if (!isPlainObject(model)) throw invalidField('an object describing the tokenizer model ({type, vocab, ...})', 'model', file, model)
  const vocab = model['vocab']
  if (Array.isArray(vocab)) {
    // Unigram: [[piece, score], ...], ids are the positions.
    if (vocab.length > limit.size)
      throw invalidField(`at most ${limit.size} entries (${limit.what})`, 'model.vocab', file, vocab)
    vocab.forEach((entry, i) => {
      if (!Array.isArray(entry) || typeof entry[0] !== 'string' || typeof entry[1] !== 'number')
        throw invalidField('a [piece, score] pair', `model.vocab[${i}]`, file, entry)
    })
    const unk = model['unk_id']
    if (unk !== undefined && unk !== null) checkId(unk, { size: vocab.length, what: 'the size of model.vocab' }, 'model.unk_id', file)
  } else if (isPlainObject(vocab)) {
    for (const [token, id] of Object.entries(vocab)) checkId(id, limit, `model.vocab[${JSON.stringify(token)}]`, file)
  } else {
    throw invalidField('an object of token ids (or a Unigram list of [piece, score])', 'model.vocab', file, vocab)
  }
  const merges = model['merges']
  if (merges !== undefined && merges !== null) {
    if (!Array.isArray(merges)) throw invalidField('an array of merges ("a b" or ["a", "b"])', 'model.merges', file, merges)
    merges.forEach((m: unknown, i) => {
      const pair = typeof m === 'string' ? m.split(' ') : m
      if (!Array.isArray(pair) || pair.length !== 2 || !pair.every((p) => typeof p === 'string'))
        throw invalidField('a merge "a b" or ["a", "b"]', `model.merges[${i}]`, file, m)
    })
  }
  const added = json['added_tokens'] ?? []
  if (!Array.isArray(added)) throw invalidField('an array of {id, content}', 'added_tokens', file, added)
  added.forEach((entry: unknown, i) => {
    if (!isPlainObject(entry) || typeof entry['content'] !== 'string')
      throw invalidField('an object {id, content} with a string content', `added_tokens[${i}]`, file, entry)
    checkId(entry['id'], limit, `added_tokens[${i}].id`, file)
  })
  return { ...json, added_tokens: added }
}

/** Token ids in a JSON file of special tokens (generation_config.json, tokenizer_config.json): each below the limit. */
function checkSpecialIds(json: Json, file: string, limit: IdLimit, fields: string[]): void {
  for (const field of fields) {
    const v = json[field]
    if (v === undefined || v === null) continue
    const list = Array.isArray(v) ? v : [v]
    for (const id of list)
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= limit.size)
        throw invalidField(`a token id below ${limit.size} or an array of them (${limit.what})`, field, file, v)
  }
}

/** Text that passes through every kind of tokenizer component: words, digits, punctuation, accents, an emoji. */
const PROBE_TEXT = 'Hello, world! 12 345 caf\u00e9 \u{1F600}\n\tend'

/** An error of the tokenizer library, told as what failed, with the library's words quoted. */
function libraryError(what: string, err: unknown): Error {
  return new Error(`${what} (the tokenizer library said: ${err instanceof Error ? err.message : String(err)})`)
}

function pickChatTemplate(raw: unknown, file: string): string | null {
  if (raw === undefined || raw === null) return null
  if (typeof raw === 'string') return raw
  if (Array.isArray(raw)) {
    const named = raw.find((t) => t && typeof t === 'object' && (t as Json)['name'] === 'default') ?? raw[0]
    const template = (named as Json | undefined)?.['template']
    if (typeof template === 'string') return template
  }
  throw invalidField('a template string or a list of {name, template}', 'chat_template', file, raw)
}

export class Tokenizer {
  private constructor(
    private readonly hf: HfTokenizer,
    /** The same tokenizer in a worker thread, for encodeAsync (started at its first text). */
    private readonly encoder: EncodeWorker,
    /** Size of the id space (the largest id + 1). */
    readonly vocabSize: number,
    readonly bosToken: string | null,
    readonly bosTokenId: number | null,
    /** Whether encode() with special tokens starts the ids with BOS. */
    readonly addsBos: boolean,
    /** Ids that end a generation: generation_config.json's eos_token_id, then tokenizer_config's eos_token. */
    readonly eosTokenIds: readonly number[],
    readonly eosToken: string | null,
    private readonly chatTemplate: ChatTemplate | null,
    /** The model directory, for messages. */
    private readonly dir: string,
    private readonly specialTokens: Record<string, string>,
    private readonly cleanUpSpaces: boolean,
    /** Vocabulary pieces spell bytes with GPT-2's printable alphabet (a ByteLevel decoder). */
    private readonly byteLevel: boolean,
    /** What grammarVocabulary() needs besides the pieces (read from tokenizer.json at load). */
    private readonly grammarFacts: GrammarFacts,
  ) {}

  /**
   * Loads tokenizer.json, tokenizer_config.json, and generation_config.json when present, from
   * `dir`. With `modelVocabSize`, every token id must be below it (a tokenizer larger than its
   * model fails here, not at the first request).
   */
  static async load(dir: string, options: TokenizerLoadOptions = {}): Promise<Tokenizer> {
    const tokenizerFile = join(dir, 'tokenizer.json')
    const configFile = join(dir, 'tokenizer_config.json')
    const generationFile = join(dir, 'generation_config.json')
    const limit: IdLimit =
      options.modelVocabSize !== undefined
        ? { size: options.modelVocabSize, what: `vocab_size in ${options.modelConfigFile ?? 'config.json'}` }
        : { size: MAX_VOCAB_SIZE, what: 'the largest vocabulary detinfer loads' }
    const tokenizerText = await readTextFile(tokenizerFile)
    let parsed: unknown
    try {
      parsed = JSON.parse(tokenizerText)
    } catch (err) {
      throw new Error(`${tokenizerFile} is not valid JSON: ${(err as Error).message}`)
    }
    const tokenizerJson = checkTokenizerJson(parsed, tokenizerFile, limit)
    const config = (await readOptionalJson(configFile)) ?? {}
    const generation = await readOptionalJson(generationFile)
    const templateFile = join(dir, 'chat_template.jinja')
    const templateText = (await pathExists(templateFile)) ? await readTextFile(templateFile) : null
    checkSpecialIds(config, configFile, limit, ['bos_token_id', 'eos_token_id', 'pad_token_id'])
    const decoderIds = config['added_tokens_decoder']
    if (decoderIds && typeof decoderIds === 'object')
      for (const key of Object.keys(decoderIds))
        checkId(/^\d+$/.test(key) ? Number(key) : key, limit, `the key ${JSON.stringify(key)} of added_tokens_decoder`, configFile)

    // The library wants special tokens as strings, and unk_token for WordLevel models.
    const model = tokenizerJson['model'] as Json
    const specialTokens: Record<string, string> = {}
    for (const key of ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token']) {
      const content = tokenContent(config[key])
      if (content !== null) specialTokens[key] = content
    }
    if (!specialTokens['unk_token'] && typeof model['unk_token'] === 'string') specialTokens['unk_token'] = model['unk_token']
    const extra = config['additional_special_tokens']
    if (extra !== undefined && extra !== null && !(Array.isArray(extra) && extra.every((t) => tokenContent(t) !== null)))
      throw invalidField('an array of tokens (strings or {content})', 'additional_special_tokens', configFile, extra)
    const additional = Array.isArray(extra) ? extra.map(tokenContent).filter((t): t is string => t !== null) : undefined
    // The encode worker builds its tokenizer from the same text and options.
    const libraryOptions = { ...config, ...specialTokens, ...(additional && { additional_special_tokens: additional }) }
    let hf: HfTokenizer
    try {
      hf = new HfTokenizer(tokenizerJson, libraryOptions)
    } catch (err) {
      throw libraryError(`Could not build the tokenizer from ${tokenizerFile}`, err)
    }
    let maxId = -1
    for (const id of hf.get_vocab(true).values()) maxId = Math.max(maxId, id)
    // The normalizer, pre-tokenizer, post-processor and decoder are only run at encode and
    // decode: try them once here, so that a broken one fails the load, naming the file.
    try {
      const probe = hf.encode(PROBE_TEXT, { add_special_tokens: true }).ids.filter((id: unknown) => typeof id === 'number')
      hf.decode(probe, { skip_special_tokens: false })
    } catch (err) {
      throw libraryError(`${tokenizerFile} does not work: encoding and decoding a test text failed; check its normalizer, pre_tokenizer, post_processor and decoder`, err)
    }

    const idOf = (token: string | null, field: string, file: string): number | null => {
      if (token === null) return null
      const id = hf.token_to_id(token)
      if (id === undefined) throw invalidField('a token of the vocabulary', field, file, token)
      return id
    }
    const bosToken = specialTokens['bos_token'] ?? null
    const bosTokenId = idOf(bosToken, 'bos_token', configFile)
    const eosToken = specialTokens['eos_token'] ?? null
    const addBos = config['add_bos_token']
    if (addBos !== undefined && addBos !== null && typeof addBos !== 'boolean')
      throw invalidField('a boolean', 'add_bos_token', configFile, addBos)
    const templateBos = leadingTemplateToken(tokenizerJson['post_processor'])
    const addsBos = bosTokenId !== null && (typeof addBos === 'boolean' ? addBos : templateBos === bosToken)

    const eos: number[] = []
    if (generation) {
      checkSpecialIds(generation, generationFile, limit, ['bos_token_id', 'eos_token_id', 'pad_token_id', 'decoder_start_token_id'])
      const genEos = generation['eos_token_id']
      if (genEos !== undefined && genEos !== null) for (const id of Array.isArray(genEos) ? genEos : [genEos]) eos.push(id as number)
    }
    // Without an eos_token_id from generation_config.json, config.json's (checked by its parser).
    if (!eos.length && options.modelEosTokenIds) for (const id of options.modelEosTokenIds) eos.push(id)
    const configEos = idOf(eosToken, 'eos_token', configFile)
    if (configEos !== null && !eos.includes(configEos)) eos.push(configEos)

    // A template given by the caller; else chat_template.jinja, as Hugging Face transformers reads
    // them (it saves the template there), then tokenizer_config.json's chat_template.
    let chatTemplate: ChatTemplate | null
    if (options.chatTemplate !== undefined) {
      chatTemplate = new ChatTemplate(options.chatTemplate.source, `the chat template ${options.chatTemplate.origin}`)
    } else {
      const fromConfig = templateText === null ? pickChatTemplate(config['chat_template'], configFile) : null
      const templateSource = templateText ?? fromConfig
      chatTemplate =
        templateSource === null
          ? null
          : new ChatTemplate(templateSource, `the chat template of ${dir} (${templateText !== null ? 'chat_template.jinja' : 'chat_template in tokenizer_config.json'})`)
    }
    const cleanUp = config['clean_up_tokenization_spaces']
    return new Tokenizer(
      hf,
      new EncodeWorker({ json: tokenizerText, options: libraryOptions, file: tokenizerFile }),
      maxId + 1,
      bosToken,
      bosTokenId,
      addsBos,
      eos,
      eosToken,
      chatTemplate,
      dir,
      specialTokens,
      cleanUp === true,
      decoderHas(tokenizerJson['decoder'], 'ByteLevel'),
      {
        vocabType: grammarVocabType(tokenizerJson['decoder']),
        addPrefixSpace: grammarAddsPrefixSpace(tokenizerJson),
        specialIds: specialTokenIds(tokenizerJson['added_tokens'] as unknown[], [...Object.values(specialTokens), ...(additional ?? [])], hf),
      },
    )
  }

  get hasChatTemplate(): boolean {
    return this.chatTemplate !== null
  }

  /** The chat template's source (chat_template.jinja, or tokenizer_config.json's), or null. */
  get chatTemplateSource(): string | null {
    return this.chatTemplate?.source ?? null
  }

  /** The special tokens by their tokenizer_config.json names (bos_token, eos_token, pad_token, ...), as text. */
  get specialTokenTexts(): Readonly<Record<string, string>> {
    return { ...this.specialTokens }
  }

  /** Token ids of `text`; with special tokens (the default) BOS leads when the model expects it. */
  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new TypeError(`Expected a string for text but received ${describeValue(text)}`)
    const addSpecial = options.addSpecialTokens ?? true
    let ids: (number | undefined)[]
    try {
      ids = this.hf.encode(text, { add_special_tokens: addSpecial }).ids
    } catch (err) {
      throw libraryError(`The tokenizer of ${join(this.dir, 'tokenizer.json')} failed to encode the text`, err)
    }
    return this.finishEncode(text, ids, addSpecial)
  }

  /**
   * encode() in a worker thread: the same ids, while the calling thread goes on with other work.
   * Texts are encoded one at a time in arrival order; one that takes longer than `timeoutMs`
   * (default 10 s) rejects with EncodeTimeoutError.
   */
  async encodeAsync(text: string, options: EncodeOptions & EncodeRequestOptions = {}): Promise<number[]> {
    if (typeof text !== 'string') throw new TypeError(`Expected a string for text but received ${describeValue(text)}`)
    const addSpecial = options.addSpecialTokens ?? true
    const raw = await this.encoder.encode(text, addSpecial, options)
    return this.finishEncode(text, Array.from(raw, (id) => (id < 0 ? undefined : id)), addSpecial)
  }

  /** The library's ids of `text`, checked, with BOS as the model expects. */
  private finishEncode(text: string, raw: (number | undefined)[], addSpecial: boolean): number[] {
    const bad = raw.findIndex((id) => typeof id !== 'number')
    if (bad >= 0)
      throw new Error(`The tokenizer has no id for token ${bad} of the text and no unk_token to stand in for it`)
    const ids = raw as number[]
    if (addSpecial && this.bosTokenId !== null) {
      // tokenizer_config.json's add_bos_token decides, whatever the post-processor does.
      if (this.addsBos && ids[0] !== this.bosTokenId) ids.unshift(this.bosTokenId)
      else if (!this.addsBos && ids[0] === this.bosTokenId && !text.startsWith(this.bosToken!)) ids.shift()
    }
    return ids
  }

  /** Stops the encode worker, if it started; encodeAsync rejects from then on (what waits, with `reason` when given). */
  close(reason?: Error): void {
    this.encoder.close(reason)
  }

  /** The text of `ids`; special tokens are left out unless skipSpecialTokens is false. */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    this.checkIds(ids)
    if (ids.length === 0) return ''
    try {
      return this.hf.decode([...ids], {
        skip_special_tokens: options.skipSpecialTokens ?? true,
        clean_up_tokenization_spaces: this.cleanUpSpaces,
      })
    } catch (err) {
      throw libraryError(`The tokenizer of ${join(this.dir, 'tokenizer.json')} failed to decode ${ids.length} ids`, err)
    }
  }

  /** Renders the chat template (with the generation prompt by default). Throws when the model has none. */
  applyChatTemplate(messages: ChatMessage[], options: { addGenerationPrompt?: boolean; [variable: string]: unknown } = {}): string {
    if (!this.chatTemplate) throw new Error('This model has no chat template (chat_template in tokenizer_config.json or chat_template.jinja)')
    if (!Array.isArray(messages)) throw new TypeError(`Expected an array of {role, content} for messages but received ${describeValue(messages)}`)
    const { addGenerationPrompt = true, ...variables } = options
    return this.chatTemplate.render({
      ...this.specialTokens,
      ...variables,
      messages,
      add_generation_prompt: addGenerationPrompt,
    })
  }

  /** Ids of a prompt: the chat template around it when `chat` (whose text carries its own special tokens), else encode(). */
  encodePrompt(text: string, chat: boolean, render?: ChatRender): number[] {
    if (!chat) return this.encode(text)
    return this.encodeChat([{ role: 'user', content: text }], render)
  }

  /**
   * Ids of a conversation: the chat template's text, which carries its own special tokens, with
   * the generation prompt unless `render` says otherwise (see ChatRender).
   */
  encodeChat(messages: ChatMessage[], render?: ChatRender): number[] {
    return this.checkChatIds(this.encode(this.renderChat(messages, render), { addSpecialTokens: false }), messages)
  }

  /** encodeChat() with the text encoded in the worker thread. */
  async encodeChatAsync(messages: ChatMessage[], options: EncodeRequestOptions & ChatRender = {}): Promise<number[]> {
    const { variables, addGenerationPrompt, continueFinalMessage, ...encode } = options
    const text = this.renderChat(messages, { ...(variables && { variables }), ...(addGenerationPrompt !== undefined && { addGenerationPrompt }), ...(continueFinalMessage !== undefined && { continueFinalMessage }) })
    return this.checkChatIds(await this.encodeAsync(text, { ...encode, addSpecialTokens: false }), messages)
  }

  /**
   * The conversation's text. With continueFinalMessage, the text ends with the last (assistant)
   * message's own text, as transformers cuts it: the template renders without the generation
   * prompt, and what follows the last occurrence of the message's trimmed text (its end-of-turn
   * marker) is left out; the message's trailing whitespace stays where the template wrote it.
   * The trimmed text is what is looked for, as a template that trims the message writes it; the
   * text as given may still be found earlier, in another message, which is not the one continued.
   */
  private renderChat(messages: ChatMessage[], render: ChatRender = {}): string {
    const continued = render.continueFinalMessage === true
    const variables = { ...render.variables, addGenerationPrompt: continued ? false : (render.addGenerationPrompt ?? true) }
    const rendered = this.applyChatTemplate(messages, variables)
    if (!continued) return rendered
    // The message is looked for before what the template writes after it, so that a text that
    // also occurs in the end-of-turn marker ("m" in "<|im_end|>", "\n") or no text at all is
    // found where the message is. That end is what the text shares with renderings of other
    // final texts; two that end differently, so that no end of the message's own text is taken.
    const last = messages.at(-1)!
    const others = ['a', 'b'].map((probe) => this.applyChatTemplate([...messages.slice(0, -1), { ...last, content: probe }], variables))
    const text = rendered.slice(0, rendered.length - Math.min(...others.map((o) => commonSuffixLength(rendered, o))))
    const final = last.content
    const trimmed = final.trim()
    const at = text.lastIndexOf(trimmed)
    if (at >= 0) {
      const kept = final.trimStart()
      return text.slice(0, at + (text.startsWith(kept, at) ? kept.length : trimmed.length))
    }
    throw new Error(
      `The chat template of ${this.dir} does not write the last message's text as it is (it changes it), so the message cannot be continued`,
    )
  }

  private checkChatIds(ids: number[], messages: ChatMessage[]): number[] {
    if (ids.length === 0)
      throw new Error(`The chat template of ${this.dir} rendered an empty prompt for ${messages.length} message(s); a prompt needs at least one token`)
    return ids
  }

  /** Ids of text that continues a prompt: no special tokens added. */
  encodeContinuation(text: string): number[] {
    return this.encode(text, { addSpecialTokens: false })
  }

  /** An incremental decoder for one sequence: push ids, get the new complete text. */
  streamDecoder(options: DecodeOptions & { context?: readonly number[] } = {}): StreamDecoder {
    return new StreamDecoder(this, options)
  }

  /** The bytes one token stands for (a token may hold part of a UTF-8 character); special tokens give their text. */
  tokenBytes(id: number): Uint8Array {
    this.checkIds([id])
    const piece = this.hf.id_to_token(id)
    if (piece === undefined) return new Uint8Array(0)
    if (this.byteLevel) {
      const bytes = [...piece].map((ch) => byteOfPrintable().get(ch))
      if (bytes.every((b) => b !== undefined)) return Uint8Array.from(bytes as number[])
      return new TextEncoder().encode(piece) // an added token, spelled as plain text
    }
    const fallback = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece)
    if (fallback) return Uint8Array.of(parseInt(fallback[1]!, 16))
    return new TextEncoder().encode(piece.replace(/\u2581/g, ' ')) // SentencePiece's word marker is a space
  }

  /**
   * The vocabulary as xgrammar's TokenizerInfo takes it (lib/grammar.ts), built as its Python
   * TokenizerInfo.from_huggingface builds it for a fast tokenizer: each id's piece as
   * tokenizer.json spells it (xgrammar decodes the pieces itself, by the vocabulary type), the
   * type and prefix space read from tokenizer.json as xgrammar reads them, and the EOS ids as the
   * stop tokens. One difference: special tokens (added tokens marked special, and those
   * tokenizer_config.json names) are given as '', which xgrammar treats as a token that no text
   * matches, where xgrammar's Python gives their text: `<|im_end|>` would otherwise be allowed
   * inside a JSON string as the ten characters it is spelled with, and the model would end its
   * turn there. Ids no piece has are '' too (never allowed).
   */
  grammarVocabulary(): GrammarVocabulary {
    const pieces: string[] = new Array<string>(this.vocabSize).fill('')
    for (const [piece, id] of this.hf.get_vocab(true)) if (!this.grammarFacts.specialIds.has(id)) pieces[id] = piece
    return {
      pieces,
      vocabType: this.grammarFacts.vocabType,
      addPrefixSpace: this.grammarFacts.addPrefixSpace,
      stopTokenIds: [...this.eosTokenIds],
    }
  }

  private checkIds(ids: readonly number[]): void {
    if (!Array.isArray(ids)) throw new TypeError(`Expected an array of token ids for ids but received ${describeValue(ids)}`)
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= this.vocabSize)
        throw new RangeError(`Expected an integer between 0 and ${this.vocabSize - 1} for ids[${i}] but received ${describeValue(id)}`)
    }
  }
}

// Whether a decoder, or one nested in a Sequence of them, is of `type`; walked without recursion
// (a file can nest them a million deep), and only where a Sequence's decoders are.
function decoderHas(decoder: unknown, type: string): boolean {
  const pending: unknown[] = [decoder]
  while (pending.length) {
    const d = pending.pop()
    if (!d || typeof d !== 'object') continue
    if ((d as Json)['type'] === type) return true
    const inner = (d as Json)['decoders']
    if ((d as Json)['type'] === 'Sequence' && Array.isArray(inner)) for (const x of inner) pending.push(x)
  }
  return false
}

/** What a tokenizer's grammar vocabulary needs besides its pieces. */
interface GrammarFacts {
  vocabType: VocabType
  addPrefixSpace: boolean
  /** Ids of special tokens: left out of the grammar's vocabulary (see grammarVocabulary). */
  specialIds: ReadonlySet<number>
}

/**
 * The vocabulary type as xgrammar detects it from tokenizer.json (HFTokenizerAnalyzer::
 * DetectVocabType in its cpp/tokenizer_info.cc): the decoder, or the decoders of a Sequence (one
 * level), in order; the first ByteLevel makes it byte_level (GPT-2, Llama 3, Qwen), the first
 * ByteFallback byte_fallback (SentencePiece-style BPE with <0xNN> pieces and ▁ for spaces: Llama 2,
 * Mistral); anything else, or a decoder it cannot read, raw.
 */
function grammarVocabType(decoder: unknown): VocabType {
  if (!isPlainObject(decoder) || typeof decoder['type'] !== 'string') return 'raw'
  let decoders: unknown[] = [decoder]
  if (decoder['type'] === 'Sequence') {
    if (!Array.isArray(decoder['decoders'])) return 'raw'
    decoders = decoder['decoders']
  }
  for (const d of decoders) {
    if (!isPlainObject(d) || typeof d['type'] !== 'string') return 'raw'
    if (d['type'] === 'ByteLevel') return 'byte_level'
    if (d['type'] === 'ByteFallback') return 'byte_fallback'
  }
  return 'raw'
}

/**
 * Whether the tokenizer puts a space in front of a text, as xgrammar detects it
 * (HFTokenizerAnalyzer::DetectAddPrefixSpace): a Prepend normalizer of "▁" (alone or in a
 * Sequence), or a Metaspace pre-tokenizer whose prepend_scheme is "always" or "first".
 */
function grammarAddsPrefixSpace(json: Json): boolean {
  const normalizer = json['normalizer']
  if (isPlainObject(normalizer)) {
    const list = normalizer['type'] === 'Sequence' ? normalizer['normalizers'] : [normalizer]
    if (Array.isArray(list) && list.some((n) => isPlainObject(n) && n['type'] === 'Prepend' && n['prepend'] === '\u2581')) return true
  }
  const pre = json['pre_tokenizer']
  return isPlainObject(pre) && pre['type'] === 'Metaspace' && (pre['prepend_scheme'] === 'always' || pre['prepend_scheme'] === 'first')
}

/** Ids of the added tokens marked special, and of the special tokens tokenizer_config.json names. */
function specialTokenIds(added: readonly unknown[], named: readonly string[], hf: HfTokenizer): Set<number> {
  const ids = new Set<number>()
  for (const entry of added) if (isPlainObject(entry) && entry['special'] === true && typeof entry['id'] === 'number') ids.add(entry['id'])
  for (const token of named) {
    const id = hf.token_to_id(token)
    if (id !== undefined) ids.add(id)
  }
  return ids
}

let printableToByte: Map<string, number> | null = null

/** GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte. */
function byteOfPrintable(): Map<string, number> {
  if (printableToByte) return printableToByte
  const map = new Map<string, number>()
  let extra = 0
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)
    map.set(String.fromCodePoint(printable ? b : 256 + extra++), b)
  }
  return (printableToByte = map)
}

/**
 * Streaming detokenization. Decoding a window of ids and subtracting the decoding of its first
 * part keeps the spaces that tokenizers attach to a token's neighbour; text is held back while it
 * ends in U+FFFD (a UTF-8 sequence split across tokens), so only complete characters come out.
 */
export class StreamDecoder {
  private readonly ids: number[]
  private prefixOffset: number
  private readOffset: number
  private readonly options: DecodeOptions

  constructor(
    private readonly tokenizer: Tokenizer,
    options: DecodeOptions & { context?: readonly number[] } = {},
  ) {
    this.options = { skipSpecialTokens: options.skipSpecialTokens ?? true }
    // A few context ids (the prompt's tail) let the first new token decode with its leading space.
    this.ids = [...(options.context ?? []).slice(-6)]
    this.prefixOffset = 0
    this.readOffset = this.ids.length
  }

  /** Adds one id; returns the text it completes ('' while a character is still incomplete). */
  push(id: number): string {
    this.ids.push(id)
    const prefix = this.tokenizer.decode(this.ids.slice(this.prefixOffset, this.readOffset), this.options)
    const full = this.tokenizer.decode(this.ids.slice(this.prefixOffset), this.options)
    if (full.length <= prefix.length || full.endsWith('\uFFFD')) return ''
    this.prefixOffset = this.readOffset
    this.readOffset = this.ids.length
    return full.slice(prefix.length)
  }

  /** Whatever is still held back (an incomplete character comes out as U+FFFD). */
  flush(): string {
    const prefix = this.tokenizer.decode(this.ids.slice(this.prefixOffset, this.readOffset), this.options)
    const full = this.tokenizer.decode(this.ids.slice(this.prefixOffset), this.options)
    this.prefixOffset = this.readOffset = this.ids.length
    return full.length > prefix.length ? full.slice(prefix.length) : ''
  }
}

/** How many characters `a` and `b` share at their ends. */
function commonSuffixLength(a: string, b: string): number {
  let n = 0
  while (n < a.length && n < b.length && a[a.length - 1 - n] === b[b.length - 1 - n]) n++
  return n
}
