// Tool calls in generated text, as `detinfer serve --tool-call-parser` reads them.
//
// hermes: the format of Qwen2.5, Qwen3, Hermes 2/3 and others, one block per call:
//
//   <tool_call>
//   {"name": "get_weather", "arguments": {"city": "Paris"}}
//   </tool_call>
//
// The reading follows vLLM's hermes parser: the content is the text before the first <tool_call>;
// every block (a last one left unclosed included) is one call; text between and after blocks is
// dropped; if any block is not {"name": string, "arguments": object} JSON, nothing is a call and the
// whole text is the content.
//
// llama3_json: Llama 3.1's and 3.2's JSON calls, an answer that is nothing but calls, separated
// by ";" (<|python_tag|> before them is a special token, left out of the text):
//
//   {"name": "get_weather", "parameters": {"city": "Paris"}}
//
// An answer whose text (after leading whitespace) starts with "{" is read as calls, "parameters"
// or "arguments" an object; if it is not a sequence of such objects, nothing is a call. This is
// how vLLM's llama3_json parser reads a streamed answer; its whole answers also take JSON from the
// middle of prose, which would make streamed and whole answers differ, so that is not done here.
//
// Both are pure functions of the text, so equal answers give equal calls.
import { createHash } from 'node:crypto'

/** The parsers `--tool-call-parser` takes. */
export const TOOL_CALL_PARSERS = ['hermes', 'llama3_json'] as const
export type ToolCallParser = (typeof TOOL_CALL_PARSERS)[number]

const START = '<tool_call>'
const END = '</tool_call>'

/** One call as the OpenAI API gives it: arguments as a JSON text. */
export interface ToolCall {
  id: string
  type: 'function'
  function: { name: string; arguments: string }
}

export interface ParsedToolCalls {
  /** The text before the first call; null when that is empty or whitespace. */
  content: string | null
  calls: { name: string; arguments: string }[]
}

/** The calls in `text`, or null when it has none (or a block is malformed): then all of it is content. */
export function parseHermesToolCalls(text: string): ParsedToolCalls | null {
  const first = text.indexOf(START)
  if (first < 0) return null
  const calls: ParsedToolCalls['calls'] = []
  for (let at = first; at >= 0; ) {
    const body = at + START.length
    const end = text.indexOf(END, body)
    const call = parseCall(text.slice(body, end < 0 ? text.length : end))
    if (!call) return null
    calls.push(call)
    at = end < 0 ? -1 : text.indexOf(START, end + END.length)
  }
  const content = text.slice(0, first)
  return { content: content.trim() === '' ? null : content, calls }
}

/** The calls in `text` as `parser` reads them, or null when it has none: then all of it is content. */
export function parseToolCalls(parser: ToolCallParser, text: string): ParsedToolCalls | null {
  return parser === 'hermes' ? parseHermesToolCalls(text) : parseLlamaJsonToolCalls(text)
}

/** Llama 3's calls: the whole text (after leading whitespace) JSON objects separated by ";". */
export function parseLlamaJsonToolCalls(text: string): ParsedToolCalls | null {
  const t = text.trimStart()
  if (!t.startsWith('{')) return null
  const calls: ParsedToolCalls['calls'] = []
  for (let at = 0; at < t.length; ) {
    const end = objectEnd(t, at)
    if (end < 0) return null
    const call = parseLlamaCall(t.slice(at, end))
    if (!call) return null
    calls.push(call)
    at = skipSpace(t, end)
    if (at === t.length) break
    if (t[at] !== ';') return null
    at = skipSpace(t, at + 1)
  }
  return { content: null, calls }
}

function parseLlamaCall(json: string): ParsedToolCalls['calls'][number] | null {
  let value: unknown
  try {
    value = JSON.parse(json)
  } catch {
    return null
  }
  if (!isPlainObject(value)) return null
  const { name } = value
  // Llama's prompts say "parameters"; some write "arguments". Both at once is not a call.
  if ('parameters' in value && 'arguments' in value) return null
  const args = 'parameters' in value ? value['parameters'] : value['arguments']
  if (typeof name !== 'string' || name === '' || !isPlainObject(args)) return null
  return { name, arguments: pythonJson(args) }
}

/** The index after the JSON object that starts at `at` (its braces balanced outside strings), or -1. */
function objectEnd(text: string, at: number): number {
  let depth = 0
  let inString = false
  for (let i = at; i < text.length; i++) {
    const c = text[i]
    if (inString) {
      if (c === '\\') i++
      else if (c === '"') inString = false
    } else if (c === '"') inString = true
    else if (c === '{' || c === '[') depth++
    else if (c === '}' || c === ']') {
      depth--
      if (depth === 0) return i + 1
    }
  }
  return -1
}

function skipSpace(text: string, at: number): number {
  while (at < text.length && /\s/.test(text[at]!)) at++
  return at
}

function parseCall(json: string): ParsedToolCalls['calls'][number] | null {
  let value: unknown
  try {
    value = JSON.parse(json)
  } catch {
    return null
  }
  if (!isPlainObject(value)) return null
  const { name, arguments: args } = value
  if (typeof name !== 'string' || name === '' || !isPlainObject(args)) return null
  return { name, arguments: pythonJson(args) }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

/**
 * JSON as Python's json.dumps(value, ensure_ascii=False) writes it (", " and ": " between items),
 * which is how vLLM re-serializes the arguments, and how chat templates' tojson writes the
 * arguments back into the prompt: the text a Qwen or Hermes model was trained to write.
 */
export function pythonJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(pythonJson).join(', ')}]`
  if (isPlainObject(value)) return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pythonJson(v)}`).join(', ')}}`
  return JSON.stringify(value)
}

/**
 * A call's id, derived from what determines the call (the prompt's ids, the choice, the generated
 * ids and the call's place among them), so that equal requests get equal ids, and calls of other
 * turns or choices other ids.
 */
export function toolCallId(prompt: readonly number[], choice: number, generated: readonly number[], call: number): string {
  const hash = createHash('sha256').update(`${prompt.join(',')}|${choice}|${generated.join(',')}|${call}`).digest('hex')
  return `call_${hash.slice(0, 24)}`
}

/** The parsed calls with their ids, the first `limit` of them. */
export function withIds(parsed: ParsedToolCalls, limit: number, id: (call: number) => string): ToolCall[] {
  return parsed.calls.slice(0, limit).map((c, i) => ({ id: id(i), type: 'function', function: { name: c.name, arguments: c.arguments } }))
}

/**
 * One streamed choice's text, split as the whole answer would be: content goes out as it comes
 * until calls begin (hermes: a <tool_call>; llama3_json: an answer starting with "{"); from there
 * the text is held and parsed at the end. Text that may be the start of the tag is held back until
 * it is told apart, and so is leading whitespace, which is no content when calls follow it (so the
 * streamed content equals the whole answer's).
 */
export class ToolCallStream {
  /** Content sent so far: always a prefix of the content the whole text parses to. */
  private sent = ''
  private held = ''
  private inCalls = false
  /** llama3_json: the answer's first character has shown it is content. */
  private content = false

  constructor(private readonly parser: ToolCallParser = 'hermes') {}

  /** Adds generated text; returns the content that can go out now. */
  push(text: string): string {
    this.held += text
    if (this.inCalls) return ''
    let ready: string
    if (this.parser === 'llama3_json') {
      if (!this.content) {
        const start = this.held.trimStart()
        if (start === '') return ''
        if (start.startsWith('{')) {
          this.inCalls = true
          return ''
        }
        this.content = true
      }
      ready = this.held
    } else {
      const at = this.held.indexOf(START)
      if (at >= 0) {
        this.inCalls = true
        ready = this.held.slice(0, at)
      } else {
        ready = this.held.slice(0, this.held.length - partialTagLength(this.held))
      }
      if (this.sent === '' && ready.trim() === '') return ''
    }
    this.held = this.held.slice(ready.length)
    this.sent += ready
    return ready
  }

  /** At the end of the generation: the content still to send, and the calls (null: none, all of it was content). */
  finish(): { content: string; parsed: ParsedToolCalls | null } {
    const text = this.sent + this.held
    const parsed = parseToolCalls(this.parser, text)
    const content = parsed ? (parsed.content ?? '') : text
    return { content: content.slice(this.sent.length), parsed }
  }
}

/** The length of the longest end of `text` that is a beginning of the start tag. */
function partialTagLength(text: string): number {
  for (let n = Math.min(START.length - 1, text.length); n > 0; n--) if (START.startsWith(text.slice(-n))) return n
  return 0
}
