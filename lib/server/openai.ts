// The OpenAI wire format: response bodies, stream chunks and log-probs of /v1/completions and
// /v1/chat/completions, built from what the library returns.
import type { Model } from '../api.js'
import type { StopReason } from '../generate.js'
import type { ToolCall } from './tool-calls.js'

export type Endpoint = 'completions' | 'chat'

export interface Usage {
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
}

/** One generated token as the server keeps it: the library's piece, reduced. */
export interface TokenRecord {
  token: number
  logprob: number
  /** Most likely alternatives, most likely first (when top log-probs were asked for). */
  top: { token: number; logprob: number }[]
  /** The text this token added to the answer (may be empty while a character is incomplete). */
  text: string
}

/**
 * A token of an echoed prompt (completions with echo): like a generated one, but the first
 * token has no log-prob (nothing comes before it) and no alternatives.
 */
export interface PromptRecord {
  token: number
  logprob: number | null
  top: { token: number; logprob: number }[] | null
  text: string
}

/** Token texts and bytes for log-probs, decoded once per id. */
export class TokenTexts {
  private readonly cache = new Map<number, { text: string; bytes: number[] }>()
  private readonly decoder = new TextDecoder('utf-8', { fatal: false })
  /** The bytes of the vocabulary's longest token (special tokens by their text). */
  readonly longestTokenBytes: number
  constructor(private readonly model: Model) {
    let longest = 1
    for (let id = 0; id < model.vocabSize; id++) longest = Math.max(longest, model.tokenBytes(id).length)
    this.longestTokenBytes = longest
  }

  get(id: number): { text: string; bytes: number[] } {
    let t = this.cache.get(id)
    if (!t) {
      const bytes = this.model.tokenBytes(id)
      t = { text: this.decoder.decode(bytes), bytes: Array.from(bytes) }
      this.cache.set(id, t)
    }
    return t
  }
}

/**
 * The text each of `ids` adds to the text of those before it, as a generation's tokens are
 * decoded (a window of ids decoded less its first part, '' while a character is incomplete), so
 * that an echoed prompt's tokens have text offsets into the text, as generated ones do. A token
 * that is left out of the text (a special one) adds ''. A run of more than MAX_HELD_PIECES ids
 * that never completes a character is given out as it decodes (U+FFFD), so that ids chosen to
 * never complete one cost no more than others.
 */
export function tokenPieces(model: Pick<Model, 'detokenize'>, ids: readonly number[]): string[] {
  const pieces: string[] = []
  let prefix = 0
  let read = 0
  for (let i = 0; i < ids.length; i++) {
    const before = model.detokenize(ids.slice(prefix, read))
    const full = model.detokenize(ids.slice(prefix, i + 1))
    const ready = full.length > before.length && (!full.endsWith('\uFFFD') || i + 1 - read > MAX_HELD_PIECES)
    if (!ready) {
      pieces.push('')
      continue
    }
    pieces.push(full.slice(before.length))
    prefix = read
    read = i + 1
  }
  // What is still held goes with the last token.
  if (read < ids.length) {
    const before = model.detokenize(ids.slice(prefix, read))
    const full = model.detokenize(ids.slice(prefix))
    if (full.length > before.length) pieces[pieces.length - 1] += full.slice(before.length)
  }
  return pieces
}

/** Ids whose text may be held back at most (a UTF-8 character spans at most 4 byte tokens). */
const MAX_HELD_PIECES = 8

/**
 * A text's length as completions' text_offset counts it: in characters (code points), as OpenAI's
 * API and vLLM (Python's len) count them, not in UTF-16 units, so that an offset indexes the text
 * in every client's language (an emoji is one character, two UTF-16 units).
 */
export function characters(text: string): number {
  let n = 0
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    // The second half of a surrogate pair is the same character.
    if (c < 0xdc00 || c > 0xdfff || i === 0 || (text.charCodeAt(i - 1) & 0xfc00) !== 0xd800) n++
  }
  return n
}

/** chat: choices[i].logprobs = {content: [...]} for the given tokens. */
export function chatLogprobs(records: TokenRecord[], texts: TokenTexts) {
  return {
    content: records.map((r) => {
      const t = texts.get(r.token)
      return {
        token: t.text,
        logprob: r.logprob,
        bytes: t.bytes,
        top_logprobs: r.top.map((a) => {
          const at = texts.get(a.token)
          return { token: at.text, logprob: a.logprob, bytes: at.bytes }
        }),
      }
    }),
  }
}

/**
 * completions: choices[i].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}; `offset` is where the tokens' text starts,
 * offsets in characters (code points).
 * An echoed prompt's first token has null for its log-prob and its alternatives, as OpenAI's API gives it.
 */
export function completionLogprobs(records: readonly PromptRecord[], texts: TokenTexts, offset: number) {
  const textOffset: number[] = []
  let at = offset
  for (const r of records) {
    textOffset.push(at)
    at += characters(r.text)
  }
  return {
    tokens: records.map((r) => texts.get(r.token).text),
    token_logprobs: records.map((r) => r.logprob),
    top_logprobs: records.map((r) => (r.top === null ? null : topWithChosen(r, texts))),
    text_offset: textOffset,
  }
}

/**
 * A token's alternatives as completions give them: the most likely first, and the chosen token
 * always among them (OpenAI: "up to logprobs+1 elements"), so `logprobs: 0` gives the chosen
 * one alone, and a token is the most likely exactly when its log-prob is the largest value.
 */
function topWithChosen(r: PromptRecord, texts: TokenTexts): Record<string, number> {
  // Tokens of the same text (byte pieces of one character decode alike) share a key: it holds
  // the first, the most likely, so that the largest value is still the most likely token's.
  const top: Record<string, number> = {}
  for (const a of r.top!) {
    const text = texts.get(a.token).text
    if (!Object.hasOwn(top, text)) top[text] = a.logprob
  }
  const chosen = texts.get(r.token).text
  if (!r.top!.some((a) => a.token === r.token) && !Object.hasOwn(top, chosen)) top[chosen] = r.logprob!
  return top
}

/** A whole completion's log-probs: an echoed prompt's offsets from 0, the generated tokens' from the end of the prompt's text (as streamed). */
function echoedLogprobs(c: FinishedChoice, texts: TokenTexts) {
  if (!c.echoed) return completionLogprobs(c.records, texts, 0)
  const prompt = completionLogprobs(c.records.slice(0, c.echoed.records), texts, 0)
  const generated = completionLogprobs(c.records.slice(c.echoed.records), texts, c.echoed.textLength)
  return {
    tokens: [...prompt.tokens, ...generated.tokens],
    token_logprobs: [...prompt.token_logprobs, ...generated.token_logprobs],
    top_logprobs: [...prompt.top_logprobs, ...generated.top_logprobs],
    text_offset: [...prompt.text_offset, ...generated.text_offset],
  }
}

export interface ResponseHeader {
  id: string
  created: number
  model: string
  system_fingerprint: string
  /** Sampling seed of choice 0 (choice i used seed + i); absent for greedy requests. */
  seed?: number
}

export interface FinishedChoice {
  index: number
  /** The answer's text: the echoed prompt's, then the completion's. */
  text: string
  /** The echoed prompt's tokens (with echo and logprobs), then the completion's. */
  records: PromptRecord[]
  finishReason: FinishReason
  /** vLLM's stop_reason: the stop string or stop_token_ids id that ended the choice; null for EOS and length. */
  stopReason: StopReason
  /** completions with echo: the prompt's records and the length of its text in characters, where the generated text's offsets start. */
  echoed?: { records: number; textLength: number }
  /** chat with a tool-call parser, when the text held calls: the content before them and the calls. */
  toolCalls?: { content: string | null; calls: ToolCall[] }
}

export type FinishReason = 'stop' | 'length' | 'tool_calls'

export function completionResponse(
  endpoint: Endpoint,
  head: ResponseHeader,
  choices: FinishedChoice[],
  logprobs: boolean,
  texts: TokenTexts,
  usage: Usage,
) {
  if (endpoint === 'chat')
    return {
      ...head,
      object: 'chat.completion',
      choices: choices.map((c) => ({
        index: c.index,
        message: c.toolCalls ? { role: 'assistant', content: c.toolCalls.content, tool_calls: c.toolCalls.calls } : { role: 'assistant', content: c.text },
        logprobs: logprobs ? chatLogprobs(c.records as TokenRecord[], texts) : null,
        finish_reason: c.finishReason,
        stop_reason: c.stopReason,
      })),
      usage,
    }
  return {
    ...head,
    object: 'text_completion',
    choices: choices.map((c) => ({
      index: c.index,
      text: c.text,
      logprobs: logprobs ? echoedLogprobs(c, texts) : null,
      finish_reason: c.finishReason,
      stop_reason: c.stopReason,
    })),
    usage,
  }
}

/**
 * One chunk of a streamed answer; `first` adds the assistant role (chat). `stopReason` goes with
 * `finishReason`, as vLLM sends it: on every completions chunk (null until the last), and on the
 * last chat chunk only.
 */
export function streamChunk(
  endpoint: Endpoint,
  head: ResponseHeader,
  index: number,
  piece: { text: string; records: PromptRecord[]; textOffset: number; first: boolean; finishReason: FinishReason | null; stopReason: StopReason },
  logprobs: boolean,
  texts: TokenTexts,
  withUsageField: boolean,
) {
  const usage = withUsageField ? { usage: null } : {}
  if (endpoint === 'chat') {
    const delta = piece.first ? { role: 'assistant', content: piece.text } : piece.text || !piece.finishReason ? { content: piece.text } : {}
    return {
      ...head,
      object: 'chat.completion.chunk',
      choices: [
        {
          index,
          delta,
          logprobs: logprobs && piece.records.length ? chatLogprobs(piece.records as TokenRecord[], texts) : null,
          finish_reason: piece.finishReason,
          ...(piece.finishReason && { stop_reason: piece.stopReason }),
        },
      ],
      ...usage,
    }
  }
  return {
    ...head,
    object: 'text_completion',
    choices: [
      {
        index,
        text: piece.text,
        logprobs: logprobs && piece.records.length ? completionLogprobs(piece.records, texts, piece.textOffset) : null,
        finish_reason: piece.finishReason,
        stop_reason: piece.finishReason ? piece.stopReason : null,
      },
    ],
    ...usage,
  }
}

/**
 * A streamed chat choice's tool call, whole, in OpenAI's delta shape (the openai client's helpers
 * join the deltas of one index); `finish` goes on a chunk with an empty delta.
 */
export function toolCallChunk(
  head: ResponseHeader,
  index: number,
  call: { index: number; call: ToolCall } | null,
  finish: { finishReason: FinishReason; stopReason: StopReason } | null,
  withUsageField: boolean,
) {
  const delta = call ? { tool_calls: [{ index: call.index, ...call.call }] } : {}
  const reasons = finish ? { finish_reason: finish.finishReason, stop_reason: finish.stopReason } : { finish_reason: null }
  return {
    ...head,
    object: 'chat.completion.chunk',
    choices: [{ index, delta, logprobs: null, ...reasons }],
    ...(withUsageField ? { usage: null } : {}),
  }
}

/** The last chunk when stream_options.include_usage is set: no choices, the usage of the whole request. */
export function usageChunk(endpoint: Endpoint, head: ResponseHeader, usage: Usage) {
  return { ...head, object: endpoint === 'chat' ? 'chat.completion.chunk' : 'text_completion', choices: [], usage }
}
