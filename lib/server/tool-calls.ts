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
// An answer whose text (after leading whitespace, JSON's: spaces, tabs, newlines and carriage
// returns) starts with "{" is read as calls, "parameters" or "arguments" an object; if it is not a
// sequence of such objects, nothing is a call. This is how vLLM's llama3_json parser reads a
// streamed answer; its whole answers also take JSON from the middle of prose, which would make
// streamed and whole answers differ, so that is not done here. (Only JSON's whitespace, so that
// the grammar of strict calls, strictLlamaCallsFormat, can tell content from calls exactly as this
// reading does: xgrammar cannot exclude the other Unicode spaces from a character class.)
//
// Forced calls (tool_choice "required" or a named function, as vLLM serves them): the answer is
// held to JSON by a grammar (the request's responseFormat, forcedToolCallFormat), whatever the
// model's own format: for a named function, the arguments object itself; for "required", an array
// of at least one {"name", "parameters"} object naming one of the tools:
//
//   [{"name": "get_weather", "parameters": {"city": "Paris"}}]
//
// Read back by parseForcedToolCalls; an answer cut short (max_tokens) is not JSON and stays content.
//
// All of them are pure functions of the text, so equal answers give equal calls.
import { createHash } from 'node:crypto'
import { isPlainObject } from '../errors.js'

/** The parsers `--tool-call-parser` takes. */
export const TOOL_CALL_PARSERS = ['hermes', 'llama3_json'] as const
export type ToolCallParser = (typeof TOOL_CALL_PARSERS)[number]

/** A forced call: tool_choice naming a function, or "required". */
export type ForcedToolChoice = { function: string } | { required: true; parallel: boolean }

/** How an answer's calls are read: a model's own format (`--tool-call-parser`) or a forced call. */
export type ToolCallReader = ToolCallParser | ForcedToolChoice

/** The tools of a request as the grammar of a forced call needs them. */
export interface ToolDefinition {
  name: string
  parameters?: Record<string, unknown> | null
}

/** A function without parameters takes an object, as vLLM's schema for it says. */
const NO_PARAMETERS = { type: 'object', properties: {} }

/** A tool's parameters as a forced call's grammar takes them: none, or {} (which would allow any JSON value, not a call), is NO_PARAMETERS, as vLLM reads them. */
function parametersOf(t: ToolDefinition): Record<string, unknown> {
  return t.parameters && Object.keys(t.parameters).length > 0 ? t.parameters : NO_PARAMETERS
}

/**
 * The JSON Schema a forced call's answer follows: the named function's parameters, or for
 * "required" an array of calls of the tools (one at most without parallel calls), as vLLM builds it.
 */
export function forcedToolCallSchema(choice: ForcedToolChoice, tools: readonly ToolDefinition[]): Record<string, unknown> {
  if ('function' in choice) {
    const tool = tools.find((t) => t.name === choice.function)
    return tool ? parametersOf(tool) : NO_PARAMETERS
  }
  const call = (t: ToolDefinition) => ({
    type: 'object',
    properties: { name: { type: 'string', enum: [t.name] }, parameters: parametersOf(t) },
    required: ['name', 'parameters'],
  })
  return { type: 'array', minItems: 1, ...(!choice.parallel && { maxItems: 1 }), items: { type: 'object', anyOf: tools.map(call) }, ...definitionsOf(tools) }
}

/** Where a schema keeps the subschemas its $refs name ("#/$defs/Name"): $defs, and draft 7's definitions. */
const DEFINITIONS = ['$defs', 'definitions'] as const

/**
 * The tools' definitions, for the root of the "required" schema: a $ref in a tool's parameters
 * ("#/$defs/City", as pydantic writes nested models) points at the root of the document, which is
 * no longer the parameters once they are inside the list of calls; vLLM moves them there too. A
 * name two tools define differently is refused (throws).
 */
function definitionsOf(tools: readonly ToolDefinition[]): Record<string, unknown> {
  const found: Record<string, Record<string, unknown>> = {}
  for (const key of DEFINITIONS) {
    const defs = new Map<string, unknown>()
    for (const t of tools) {
      const own = parametersOf(t)[key]
      if (!isPlainObject(own)) continue
      for (const [name, schema] of Object.entries(own)) {
        if (defs.has(name) && JSON.stringify(defs.get(name)) !== JSON.stringify(schema))
          throw new Error(`Expected one schema for the tools' ${key}.${name} but the tools define it differently (${t.name} and an earlier tool)`)
        defs.set(name, schema)
      }
    }
    if (defs.size) found[key] = Object.fromEntries(defs)
  }
  return found
}

/**
 * The structural tag (xgrammar's) that holds the hermes calls of an answer to the tools'
 * parameters when a tool is marked `strict` (tool_choice "auto"): text is free, and from each
 * <tool_call> on, the call must be `<tool_call>\n{"name": <a tool>, "arguments": <object>}\n</tool_call>`
 * (Qwen's and Hermes' format) with arguments the tool's parameters accept (any object for a tool
 * not marked strict); after the closing tag, text is free again. With `single` (parallel_tool_calls
 * false) the answer ends with its first call.
 */
export function strictHermesCallsFormat(tools: readonly (ToolDefinition & { strict?: boolean | null })[], single = false): Record<string, unknown> {
  return {
    type: 'triggered_tags',
    ...(single && { stop_after_first: true }),
    triggers: [START],
    tags: tools.map((t) => ({
      type: 'tag',
      begin: `${START}\n{"name": ${JSON.stringify(t.name)}, "arguments": `,
      content: { type: 'json_schema', json_schema: t.strict === true ? parametersOf(t) : { type: 'object' } },
      end: `}\n${END}`,
    })),
  }
}

/** JSON's whitespace, as a regular expression's character class writes it: what may come before llama3_json calls. */
const JSON_SPACE = ' \\t\\n\\r'
/** Between llama3_json calls in a strict answer (the reading takes any whitespace around ";"). */
const LLAMA_SEPARATOR = '; '

/**
 * The structural tag that holds the llama3_json calls of an answer to the tools' parameters when a
 * tool is marked `strict` (tool_choice "auto"). The answer is read as calls when it starts with
 * "{" after JSON whitespace (parseLlamaJsonToolCalls), so the tag lets through exactly two kinds
 * of answer: content, whose first character after that whitespace is anything but "{" (free text
 * from there, "{" included), or calls, `{"name": <a tool>, "parameters": <object>}` separated by
 * "; " (Llama 3.1's format), with parameters the tool's `parameters` accept (any object for a tool
 * not marked strict), and nothing after the last; with `single` (parallel_tool_calls false), one call
 * at most. Whitespace alone, or nothing, is content too. (<|python_tag|>, which Llama may write before its calls, is a special token: no constrained
 * answer has one.)
 */
export function strictLlamaCallsFormat(tools: readonly (ToolDefinition & { strict?: boolean | null })[], single = false): Record<string, unknown> {
  const call = (t: ToolDefinition & { strict?: boolean | null }) => ({
    type: 'tag',
    begin: `{"name": ${JSON.stringify(t.name)}, "parameters": `,
    content: { type: 'json_schema', json_schema: t.strict === true ? parametersOf(t) : { type: 'object' } },
    end: '}',
  })
  const content = { type: 'sequence', elements: [{ type: 'regex', pattern: `[^{${JSON_SPACE}]` }, { type: 'any_text' }] }
  const calls = { type: 'tags_with_separator', tags: tools.map(call), separator: LLAMA_SEPARATOR, ...(single && { stop_after_first: true }) }
  return { type: 'sequence', elements: [{ type: 'regex', pattern: `[${JSON_SPACE}]*` }, { type: 'or', elements: [content, calls] }] }
}

/** The calls of a forced answer, or null when it is not the JSON its grammar allows (cut short): then it is content. */
export function parseForcedToolCalls(choice: ForcedToolChoice, text: string): ParsedToolCalls | null {
  const value = readJson(text)
  if ('function' in choice) return value instanceof Map ? { content: null, calls: [{ name: choice.function, arguments: pythonJson(value) }] } : null
  if (!Array.isArray(value) || value.length === 0) return null
  const calls: ParsedToolCalls['calls'] = []
  for (const item of value) {
    const name = item instanceof Map ? item.get('name') : undefined
    const args = item instanceof Map ? item.get('parameters') : undefined
    if (typeof name !== 'string' || !(args instanceof Map)) return null
    calls.push({ name, arguments: pythonJson(args) })
  }
  return { content: null, calls }
}

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

/** The calls in `text` as `reader` reads them, or null when it has none: then all of it is content. */
export function parseToolCalls(reader: ToolCallReader, text: string): ParsedToolCalls | null {
  if (typeof reader !== 'string') return parseForcedToolCalls(reader, text)
  return reader === 'hermes' ? parseHermesToolCalls(text) : parseLlamaJsonToolCalls(text)
}

/** Llama 3's calls: the whole text (after leading JSON whitespace) JSON objects separated by ";". */
export function parseLlamaJsonToolCalls(text: string): ParsedToolCalls | null {
  const t = trimJsonSpace(text)
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
  const value = readJson(json)
  if (!(value instanceof Map)) return null
  const name = value.get('name')
  // Llama's prompts say "parameters"; some write "arguments". Both at once is not a call.
  if (value.has('parameters') && value.has('arguments')) return null
  const args = value.has('parameters') ? value.get('parameters') : value.get('arguments')
  if (typeof name !== 'string' || name === '' || !(args instanceof Map)) return null
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
  while (at < text.length && isJsonSpace(text[at]!)) at++
  return at
}

const isJsonSpace = (c: string) => c === ' ' || c === '\t' || c === '\n' || c === '\r'

/** `text` without its leading JSON whitespace. */
function trimJsonSpace(text: string): string {
  return text.slice(skipSpace(text, 0))
}

function parseCall(json: string): ParsedToolCalls['calls'][number] | null {
  const value = readJson(json)
  if (!(value instanceof Map)) return null
  const name = value.get('name')
  const args = value.get('arguments')
  if (typeof name !== 'string' || name === '' || !(args instanceof Map)) return null
  return { name, arguments: pythonJson(args) }
}

/**
 * A JSON value as Python's json.loads reads it, for arguments to be written back as vLLM writes
 * them: an object is a Map (its keys in the order written, a repeated key's last value in its
 * first place, as a dict keeps them; a JS object would put "2" before "a"), a number keeps its
 * text (a JS number would turn 12345678901234567890 into another integer).
 */
type JsonValue = null | boolean | string | JsonNumber | JsonValue[] | Map<string, JsonValue>

class JsonNumber {
  constructor(readonly text: string) {}
}

/** `json` read as a JsonValue, or undefined when it is not JSON. */
function readJson(json: string): JsonValue | undefined {
  try {
    JSON.parse(json) // the syntax is checked here; the reading below trusts it
  } catch {
    return undefined
  }
  let at = 0
  const match = (pattern: RegExp): string => {
    pattern.lastIndex = at
    const found = pattern.exec(json)![0]
    at += found.length
    return found
  }
  const value = (): JsonValue => {
    match(SPACE)
    const c = json[at]
    if (c === '"') return JSON.parse(match(STRING)) as string
    if (c === '{' || c === '[') {
      at++
      const items: [string, JsonValue][] = []
      const list: JsonValue[] = []
      match(SPACE)
      while (json[at] !== (c === '{' ? '}' : ']')) {
        if (c === '{') {
          match(SPACE)
          const key = JSON.parse(match(STRING)) as string
          match(SPACE)
          at++ // ':'
          items.push([key, value()])
        } else list.push(value())
        match(SPACE)
        if (json[at] === ',') at++
      }
      at++
      return c === '{' ? new Map(items) : list
    }
    const word = match(WORD)
    return word === 'null' ? null : word === 'true' ? true : word === 'false' ? false : new JsonNumber(word)
  }
  return value()
}

const SPACE = /[ \t\n\r]*/y
const STRING = /"(?:[^"\\]|\\.)*"/y
const WORD = /[-+.\w]+/y

/** A JSON number as Python writes the value json.loads reads from it: an int as it is, a float as repr(). */
function pythonNumber(text: string): string {
  if (!/[.eE]/.test(text)) return text === '-0' ? '0' : text
  const x = Number(text)
  if (!Number.isFinite(x)) return x > 0 ? 'Infinity' : '-Infinity'
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0'
  // repr: the shortest digits that read back as x (as toExponential gives them), in positional
  // notation from 1e-4 up to 1e16 (with '.0' when whole) and in e-notation outside it.
  const [mantissa, e] = x.toExponential().split('e') as [string, string]
  const exp = Number(e)
  const sign = x < 0 ? '-' : ''
  const digits = mantissa.replace('-', '').replace('.', '')
  if (exp < -4 || exp >= 16) return `${sign}${digits[0]}${digits.length > 1 ? `.${digits.slice(1)}` : ''}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`
  if (exp < 0) return `${sign}0.${'0'.repeat(-exp - 1)}${digits}`
  return `${sign}${digits.slice(0, exp + 1).padEnd(exp + 1, '0')}.${digits.slice(exp + 1) || '0'}`
}

/**
 * JSON as Python's json.dumps(value, ensure_ascii=False) writes it (", " and ": " between items),
 * which is how vLLM re-serializes the arguments, and how chat templates' tojson writes the
 * arguments back into the prompt: the text a Qwen or Hermes model was trained to write.
 */
export function pythonJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(pythonJson).join(', ')}]`
  if (value instanceof JsonNumber) return pythonNumber(value.text)
  const entries = value instanceof Map ? [...value] : isPlainObject(value) ? Object.entries(value) : null
  if (entries) return `{${entries.map(([k, v]) => `${JSON.stringify(k)}: ${pythonJson(v)}`).join(', ')}}`
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
 * streamed content equals the whole answer's). A forced call's answer is held whole.
 */
export class ToolCallStream {
  /** Content sent so far: always a prefix of the content the whole text parses to. */
  private sent = ''
  private held = ''
  private inCalls = false
  /** llama3_json: the answer's first character has shown it is content. */
  private content = false

  constructor(private readonly parser: ToolCallReader = 'hermes') {
    this.inCalls = typeof parser !== 'string'
  }

  /** Adds generated text; returns the content that can go out now. */
  push(text: string): string {
    this.held += text
    if (this.inCalls) return ''
    let ready: string
    if (this.parser === 'llama3_json') {
      if (!this.content) {
        const start = trimJsonSpace(this.held)
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
