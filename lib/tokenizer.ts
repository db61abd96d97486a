// Text <-> token ids for a Hugging Face model directory: tokenizer.json through
// @huggingface/tokenizers, BOS/EOS and the chat template from tokenizer_config.json and
// generation_config.json, and an incremental decoder for streaming.
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Template } from '@huggingface/jinja'
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers'
import { describeValue, invalidField, readJsonFile } from './model/config.js'

export interface EncodeOptions {
  /** Add the special tokens the model expects around a text (BOS; default true). */
  addSpecialTokens?: boolean
}

export interface DecodeOptions {
  /** Leave special tokens (BOS, EOS, chat markers) out of the text (default true). */
  skipSpecialTokens?: boolean
}

export interface ChatMessage {
  role: string
  content: string
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
  try {
    await readFile(file)
  } catch {
    return null
  }
  const v = await readJsonFile(file)
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw invalidField('a JSON object', 'the file', file, v)
  return v as Json
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
    /** Size of the id space (the largest id + 1). */
    readonly vocabSize: number,
    readonly bosToken: string | null,
    readonly bosTokenId: number | null,
    /** Whether encode() with special tokens starts the ids with BOS. */
    readonly addsBos: boolean,
    /** Ids that end a generation: generation_config.json's eos_token_id, then tokenizer_config's eos_token. */
    readonly eosTokenIds: readonly number[],
    readonly eosToken: string | null,
    private readonly chatTemplate: Template | null,
    private readonly specialTokens: Record<string, string>,
    private readonly cleanUpSpaces: boolean,
    /** Vocabulary pieces spell bytes with GPT-2's printable alphabet (a ByteLevel decoder). */
    private readonly byteLevel: boolean,
  ) {}

  /** Loads tokenizer.json, tokenizer_config.json, and generation_config.json when present, from `dir`. */
  static async load(dir: string): Promise<Tokenizer> {
    const tokenizerFile = join(dir, 'tokenizer.json')
    const configFile = join(dir, 'tokenizer_config.json')
    const tokenizerJson = (await readJsonFile(tokenizerFile)) as Json
    if (typeof tokenizerJson !== 'object' || tokenizerJson === null || typeof tokenizerJson['model'] !== 'object')
      throw invalidField('a tokenizer object with a model', 'the file', tokenizerFile, tokenizerJson)
    const config = (await readOptionalJson(configFile)) ?? {}
    const generation = await readOptionalJson(join(dir, 'generation_config.json'))
    const templateFile = join(dir, 'chat_template.jinja')
    const templateText = await readFile(templateFile, 'utf8').catch(() => null)

    // The library wants special tokens as strings, and unk_token for WordLevel models.
    const model = tokenizerJson['model'] as Json
    const specialTokens: Record<string, string> = {}
    for (const key of ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token']) {
      const content = tokenContent(config[key])
      if (content !== null) specialTokens[key] = content
    }
    if (!specialTokens['unk_token'] && typeof model['unk_token'] === 'string') specialTokens['unk_token'] = model['unk_token']
    const additional = Array.isArray(config['additional_special_tokens'])
      ? config['additional_special_tokens'].map(tokenContent).filter((t): t is string => t !== null)
      : undefined
    let hf: HfTokenizer
    try {
      hf = new HfTokenizer(tokenizerJson, {
        ...config,
        ...specialTokens,
        ...(additional && { additional_special_tokens: additional }),
      })
    } catch (err) {
      throw new Error(`Could not build the tokenizer from ${tokenizerFile}: ${(err as Error).message}`)
    }
    let maxId = -1
    for (const id of hf.get_vocab(true).values()) maxId = Math.max(maxId, id)

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
    const genEos = generation?.['eos_token_id']
    if (genEos !== undefined && genEos !== null) {
      const list = Array.isArray(genEos) ? genEos : [genEos]
      for (const id of list)
        if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id > maxId)
          throw invalidField(`a token id below ${maxId + 1} or an array of them`, 'eos_token_id', join(dir, 'generation_config.json'), genEos)
      eos.push(...(list as number[]))
    }
    const configEos = idOf(eosToken, 'eos_token', configFile)
    if (configEos !== null && !eos.includes(configEos)) eos.push(configEos)

    const templateSource = pickChatTemplate(config['chat_template'], configFile) ?? templateText
    let chatTemplate: Template | null = null
    if (templateSource !== null) {
      try {
        chatTemplate = new Template(templateSource)
      } catch (err) {
        throw new Error(`Could not parse the chat template of ${dir}: ${(err as Error).message}`)
      }
    }
    const cleanUp = config['clean_up_tokenization_spaces']
    return new Tokenizer(
      hf,
      maxId + 1,
      bosToken,
      bosTokenId,
      addsBos,
      eos,
      eosToken,
      chatTemplate,
      specialTokens,
      cleanUp === true,
      decoderHas(tokenizerJson['decoder'], 'ByteLevel'),
    )
  }

  get hasChatTemplate(): boolean {
    return this.chatTemplate !== null
  }

  /** Token ids of `text`; with special tokens (the default) BOS leads when the model expects it. */
  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new TypeError(`Expected a string for text but received ${describeValue(text)}`)
    const addSpecial = options.addSpecialTokens ?? true
    const ids: number[] = this.hf.encode(text, { add_special_tokens: addSpecial }).ids
    const bad = ids.findIndex((id: unknown) => typeof id !== 'number')
    if (bad >= 0)
      throw new Error(`The tokenizer has no id for token ${bad} of the text and no unk_token to stand in for it`)
    if (addSpecial && this.bosTokenId !== null) {
      // tokenizer_config.json's add_bos_token decides, whatever the post-processor does.
      if (this.addsBos && ids[0] !== this.bosTokenId) ids.unshift(this.bosTokenId)
      else if (!this.addsBos && ids[0] === this.bosTokenId && !text.startsWith(this.bosToken!)) ids.shift()
    }
    return ids
  }

  /** The text of `ids`; special tokens are left out unless skipSpecialTokens is false. */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    this.checkIds(ids)
    if (ids.length === 0) return ''
    return this.hf.decode([...ids], {
      skip_special_tokens: options.skipSpecialTokens ?? true,
      clean_up_tokenization_spaces: this.cleanUpSpaces,
    })
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
  encodePrompt(text: string, chat: boolean): number[] {
    if (!chat) return this.encode(text)
    return this.encode(this.applyChatTemplate([{ role: 'user', content: text }]), { addSpecialTokens: false })
  }

  /** Ids of a conversation: the chat template's text (with the generation prompt), which carries its own special tokens. */
  encodeChat(messages: ChatMessage[]): number[] {
    return this.encode(this.applyChatTemplate(messages), { addSpecialTokens: false })
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

  private checkIds(ids: readonly number[]): void {
    if (!Array.isArray(ids)) throw new TypeError(`Expected an array of token ids for ids but received ${describeValue(ids)}`)
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= this.vocabSize)
        throw new RangeError(`Expected an integer between 0 and ${this.vocabSize - 1} for ids[${i}] but received ${describeValue(id)}`)
    }
  }
}

function decoderHas(decoder: unknown, type: string): boolean {
  if (!decoder || typeof decoder !== 'object') return false
  const d = decoder as Json
  if (d['type'] === type) return true
  return Array.isArray(d['decoders']) && d['decoders'].some((x) => decoderHas(x, type))
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
