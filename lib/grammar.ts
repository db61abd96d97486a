// Grammar-constrained decoding for OpenAI's response_format (JSON mode and JSON schemas), through
// xgrammar's WebAssembly build (@mlc-ai/web-xgrammar). A GrammarEngine per model turns the
// tokenizer's vocabulary into xgrammar's TokenizerInfo and a grammar compiler (once, at its first
// use); each request gets a TokenConstraint: a matcher that gives the mask of the tokens allowed
// next and advances token by token.
//
// xgrammar's checks abort the WebAssembly module: a schema it cannot read (`{"type": 5}`, a $ref
// to nothing, a pattern that is no regular expression) prints "[FATAL] file:line: Check failed:
// ..." and "Aborted()" through the module's printErr, then throws a RuntimeError, with whatever the
// C++ code had allocated leaked; a structural tag it refuses throws a C++ exception instead, which
// reaches JavaScript as a bare number. So schemas are first tried in a worker thread that holds its
// own instance of the module: the reason it printed (or the exception's message, read out of the
// module's memory) comes back as the GrammarError's message, and a worker whose module aborted or
// threw is stopped (its memory with it) and replaced. Only schemas that passed there are compiled,
// with the model's vocabulary, in this thread, by an instance that prints nowhere; should it abort
// all the same, it is dropped as a whole and the next request builds another. Before any of that,
// keywords xgrammar would silently not enforce are refused, as vLLM refuses them
// (unsupportedKeyword), and so are the parts of a structural tag it would not read
// (unsupportedStructuralTagPart).
//
// Costs (a 151,936-token vocabulary): the first constraint of an engine takes 150-250 ms
// (TokenizerInfo, compiler); compiling a schema 30-120 ms, once (the engine keeps the last 64 compiled); a
// mask 0.02-0.03 ms at a position xgrammar has cached, up to a few ms where many tokens must be
// checked one by one. Checking a schema in the worker takes 60-85 ms for the first (the thread
// starts and initialises its module), then about 1 ms; a schema that passed before is not
// checked again; one that aborts costs about 40 ms more, for the next check's new worker.
//
// The masks of a decode step are on its critical path (a constrained sequence's next mask needs
// the token just read back), and this thread computes them one after another. So an engine may
// also keep grammar worker threads (GrammarEngineOptions.workers; see "Constraints in worker
// threads" below): each holds the matchers of some constraints, with its own instance of the
// module, and a step's masks are computed by the workers and this thread in parallel, the same
// bits (bench/grammar-masks.mjs measures the time they take).
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { availableParallelism } from 'node:os'
import { dirname } from 'node:path'
import type * as XGrammarModule from '@mlc-ai/web-xgrammar'
import { DisposedError, GrammarError, describeValue, isPlainObject } from './errors.js'
import { EvalWorker } from './eval-worker.js'

export { GrammarError }

type XGrammar = typeof XGrammarModule
type CompiledGrammar = XGrammarModule.CompiledGrammar
type GrammarCompiler = XGrammarModule.GrammarCompiler
type GrammarMatcher = XGrammarModule.GrammarMatcher
type TokenizerInfo = XGrammarModule.TokenizerInfo

/** OpenAI's response_format, with a json_schema's schema (and strict) taken out of its json_schema object. */
export type ResponseFormat =
  | { type: 'text' }
  | { type: 'json_object' }
  | {
      type: 'json_schema'
      /** A JSON Schema: an object, or true. */
      schema: unknown
      /**
       * Accepted and not used: as in vLLM, the schema is enforced either way, in xgrammar's strict
       * mode (no properties the schema does not name, unless it allows them).
       */
      strict?: boolean
    }
  /** Text that the regular expression matches whole (vLLM's structured_outputs.regex). */
  | { type: 'regex'; pattern: string }
  /** One of the strings, exactly (vLLM's structured_outputs.choice). */
  | { type: 'choice'; choices: readonly string[] }
  /** Text of an EBNF grammar in xgrammar's syntax, from its rule `root` (vLLM's structured_outputs.grammar). */
  | { type: 'grammar'; grammar: string }
  /** Text of an xgrammar structural tag's format (vLLM's structured_outputs.structural_tag): tags, triggers, JSON inside. */
  | { type: 'structural_tag'; format: Record<string, unknown> }

export interface TokenConstraint {
  /**
   * The tokens allowed next: i32 words, bit v & 31 of word v >> 5 set for token v (vocabSize bits;
   * ids the vocabulary lacks clear); rejects when no token is. The array is the constraint's own,
   * not a copy: callers never write to it (accept() checks the token against it), and read it only
   * until the next mask() or accept().
   */
  mask(): Promise<Int32Array>
  /** Advances past `token`, which the last mask allowed; throws a clear error when it is not allowed. */
  accept(token: number): void
  /** Whether the grammar is complete and only a stop token may follow (or one was accepted). */
  readonly finished: boolean
  /** Frees the matcher (idempotent). */
  dispose(): void
}

/** How xgrammar reads the pieces of a vocabulary: as they are, GPT-2's byte alphabet, or SentencePiece's <0xNN> and ▁. */
export type VocabType = 'raw' | 'byte_level' | 'byte_fallback'

/** A tokenizer's vocabulary as xgrammar's TokenizerInfo takes it (Tokenizer.grammarVocabulary()). */
export interface GrammarVocabulary {
  /** Each id's piece as tokenizer.json spells it; '' for an id no text may produce (special tokens, gaps). */
  pieces: readonly string[]
  vocabType: VocabType
  /** Whether the tokenizer puts a space in front of a text (SentencePiece's ▁). */
  addPrefixSpace: boolean
  /** The ids that end a generation (EOS). */
  stopTokenIds: readonly number[]
}

/** What a GrammarEngine reads the vocabulary from: a Tokenizer. */
export interface GrammarVocabularySource {
  grammarVocabulary(): GrammarVocabulary
}

export interface GrammarEngineOptions {
  /**
   * Worker threads that hold constraints' matchers and compute their masks, in parallel with each
   * other and with this thread (default defaultGrammarWorkers()). 0: every matcher is in this
   * thread, each mask computed there in turn. The masks are the same bits either way.
   */
  workers?: number
}

/** The most worker threads an engine takes. */
export const MAX_GRAMMAR_WORKERS = 64

/** The most grammar worker threads an engine starts by default (defaultGrammarWorkers). */
export const GRAMMAR_WORKERS_DEFAULT_CAP = 8

/**
 * The default number of grammar worker threads: one less than the cores Node may use (this thread
 * takes a share of the constraints too), at most 8. A machine of 2 cores gets 1, one of 16 gets 8.
 * On one 16-core host, 64 JSON-constrained sequences took 15.1 ms of mask work a step on the main
 * thread, 6.2 with 4 workers and 4.4 with 8 (docs/performance.md, "Grammar workers on 16 cores").
 */
export function defaultGrammarWorkers(): number {
  return Math.max(0, Math.min(GRAMMAR_WORKERS_DEFAULT_CAP, availableParallelism() - 1))
}


/** How long a schema may take to be checked before it is refused. */
export const SCHEMA_CHECK_TIMEOUT_MS = 10_000
/** How long the checking worker may take to start. */
const WORKER_STARTUP_TIMEOUT_MS = 60_000
/**
 * Schemas that passed the check are remembered (their JSON text and the text compiled of it, up to
 * this many characters in all) and not checked again.
 */
const CHECKED_SCHEMA_CHARS = 4_000_000
/** Compiled grammars an engine keeps for the schemas that come again. */
const COMPILED_GRAMMARS = 64
/**
 * How schemas are compiled, and checked: no whitespace but ", " and ": " between elements (JSON
 * on one line, as Python's json.dumps writes it), no indent (-1 is xgrammar's "none"; undefined
 * would be 2), and xgrammar's strict mode (no properties the schema does not name, unless it
 * allows them). vLLM's default lets any whitespace through, with which a model can fill its whole
 * answer with newlines between two elements (the shipped model does, and vLLM has a switch
 * against it, disable_any_whitespace); one way of writing leaves no room for that. The JSON of a
 * structural tag is written so too: xgrammar's own json_schema format there lets any whitespace
 * through, so the checking worker turns each into a grammar format holding the EBNF of the
 * schema's JSON written this way (WORKER_SOURCE, compactJsonFormats).
 */
const JSON_SCHEMA_OPTIONS = [false, -1] as const
/** The longest reason a GrammarError quotes from xgrammar. */
const MAX_REASON_CHARS = 1000
/** The lines of output an instance of the module keeps, for the message of an abort. */
const KEPT_LINES = 20

// ---------------------------------------------------------------------------------------------
// Loading the module

/**
 * The package's lib/index.js is a UMD bundle in a package marked "type": "module": imported, Node
 * takes it for an ES module, in which the bundle finds neither `exports` nor `module` and exports
 * nothing. So its text is evaluated as CommonJS, with the CommonJS wrapper's variables, plus a
 * `console` of its own: emscripten binds its print and printErr to console.log and console.error
 * when the module initialises, so everything the module prints goes to `print` instead of the
 * process's output. Each evaluation is a separate instance of the module (its own memory).
 */
function loadXGrammar(print: (line: string) => void): XGrammar {
  const file = xgrammarFile()
  const line = (...args: unknown[]) => print(args.map(String).join(' '))
  const quiet = Object.assign(Object.create(console) as Console, { log: line, error: line, warn: line, info: line, debug: line, trace: line })
  const module = { exports: {} as Record<string, unknown> }
  const evaluate = new Function('exports', 'module', 'require', '__filename', '__dirname', 'console', xgrammarSource())
  evaluate(module.exports, module, createRequire(file), file, dirname(file), quiet)
  return module.exports as unknown as XGrammar
}

function xgrammarFile(): string {
  return createRequire(import.meta.url).resolve('@mlc-ai/web-xgrammar')
}

/**
 * The bundle's one dynamic import, of Node's `module` for createRequire: code made by `new
 * Function` cannot import where its caller was compiled by node:vm (a test runner's modules:
 * "A dynamic import callback was not specified"), so it gets the same module from `require`.
 */
const DYNAMIC_IMPORT = "await import('module')"
const STATIC_REQUIRE = "require('module')"

/**
 * The bundle's emscripten module, which it keeps to itself: the checking worker exports it as
 * `__binding()`, to read the message of a C++ exception in its memory (WORKER_SOURCE).
 */
const BINDING = 'let binding = null;'
const BINDING_EXPORTED = 'let binding = null; exports.__binding = () => binding;'

let source: string | null = null
function xgrammarSource(): string {
  return (source ??= readFileSync(xgrammarFile(), 'utf8').replace(DYNAMIC_IMPORT, STATIC_REQUIRE))
}

/**
 * The reason in what an aborted call printed: its last "[FATAL] file:line: message" line, without
 * the file and line, and without the "Check failed: (condition) is false: " in front of the
 * message ("Type should be a string"); the error's own message when nothing was printed.
 */
export function abortReason(lines: readonly string[], err: unknown): string {
  let fatal: string | undefined
  for (const line of lines) if (line.startsWith('[FATAL]')) fatal = line
  let reason =
    fatal === undefined
      ? err instanceof Error
        ? err.message
        : typeof err === 'number'
          ? 'xgrammar threw a C++ exception'
          : String(err)
      : fatal
          .replace(/^\[FATAL\]\s*(?:\S+?:\d+:\s*)?/, '')
          .replace(/^Check failed: .*? is false:\s*/, '')
          .trim()
  if (reason === '') reason = 'xgrammar stopped without saying why'
  return reason.length > MAX_REASON_CHARS ? `${reason.slice(0, MAX_REASON_CHARS)}... (${reason.length} characters)` : reason
}

/**
 * Whether a call of the module failed in a way that leaves it in a state nothing vouches for: an
 * abort (a RuntimeError), or a C++ exception, which reaches JavaScript as the address of its object
 * (a number) with the C++ frames it crossed never unwound (their memory leaked).
 */
const isAbort = (err: unknown): boolean => typeof err === 'number' || err instanceof WebAssembly.RuntimeError || (err instanceof Error && err.name === 'RuntimeError')

// ---------------------------------------------------------------------------------------------
// response_format

/**
 * What a format compiles from: a JSON schema's text, or a structural tag's (JSON text of
 * {type: 'structural_tag', format}: a regex, a choice of strings, an EBNF grammar); whether it is
 * the request's (checked in the worker first); and what messages call it.
 */
type GrammarSpec = { kind: 'json_schema' | 'structural_tag'; text: string; fromRequest: boolean; what: string }

/** Strings a choice format may list, at most. */
export const MAX_CHOICES = 1024
/** Characters of a regex or a grammar, and of all a choice's strings together, at most. */
export const MAX_GRAMMAR_CHARS = 100_000

/**
 * JSON mode: any JSON object, as vLLM compiles json_object (the schema {"type": "object"}, which
 * xgrammar reads as an object of any properties and values). OpenAI's JSON mode answers with an
 * object; xgrammar's builtin JSON grammar would also allow a top-level array.
 */
const JSON_OBJECT_SCHEMA = '{"type":"object"}'

/** What to compile for a response_format (null: no constraint); a GrammarError for one that is not of OpenAI's shape. */
function grammarSpec(format: unknown): GrammarSpec | null {
  const types = "{ type: 'text' | 'json_object' | 'json_schema', ... }"
  if (!isPlainObject(format)) throw new GrammarError(`Expected an object ${types} for response_format but received ${describeValue(format)}`)
  const type = format['type']
  if (type === 'text') return null
  if (type === 'json_object') return { kind: 'json_schema', text: JSON_OBJECT_SCHEMA, fromRequest: false, what: 'The JSON schema' }
  if (type === 'regex' || type === 'choice' || type === 'grammar' || type === 'structural_tag') return structuralSpec(type, format)
  if (type !== 'json_schema')
    throw new GrammarError(`Expected 'text', 'json_object', 'json_schema', 'regex', 'choice', 'grammar' or 'structural_tag' for response_format.type but received ${describeValue(type)}`)
  const schema = format['schema']
  if (typeof schema !== 'boolean' && !isPlainObject(schema))
    throw new GrammarError(`Expected a JSON Schema (an object, or true) for response_format.schema but received ${describeValue(schema)}`)
  if (schema === false) throw new GrammarError('The JSON schema is false, which no value matches')
  let text: string
  try {
    text = JSON.stringify(schema)
  } catch (err) {
    throw new GrammarError(`The JSON schema cannot be written as JSON: ${(err as Error).message}`)
  }
  const unsupported = unsupportedKeyword(schema)
  if (unsupported !== null) throw new GrammarError(`The JSON schema cannot be used: ${unsupported}`)
  return { kind: 'json_schema', text, fromRequest: true, what: 'The JSON schema' }
}

/** A regex, a choice, a grammar or a structural tag's format, as the structural tag xgrammar compiles. */
function structuralSpec(type: 'regex' | 'choice' | 'grammar' | 'structural_tag', format: Record<string, unknown>): GrammarSpec {
  const text = (name: string, value: unknown): string => {
    if (typeof value !== 'string' || value === '' || value.length > MAX_GRAMMAR_CHARS)
      throw new GrammarError(`Expected a non-empty string of at most ${MAX_GRAMMAR_CHARS} characters for ${name} but received ${describeValue(value)}`)
    return value
  }
  let tag: unknown
  let what: string
  if (type === 'regex') {
    tag = { type: 'regex', pattern: text('response_format.pattern', format['pattern']) }
    what = 'The regular expression'
  } else if (type === 'grammar') {
    tag = { type: 'grammar', grammar: text('response_format.grammar', format['grammar']) }
    what = 'The grammar'
  } else if (type === 'structural_tag') {
    tag = format['format']
    if (!isPlainObject(tag))
      throw new GrammarError(`Expected an object (a structural tag's format) for response_format.format but received ${describeValue(tag)}`)
    const unsupported = unsupportedStructuralTagPart(tag)
    if (unsupported !== null) throw new GrammarError(`The structural tag cannot be used: ${unsupported}`)
    what = 'The structural tag'
  } else {
    const choices = format['choices']
    if (!Array.isArray(choices) || choices.length === 0 || choices.length > MAX_CHOICES)
      throw new GrammarError(`Expected an array of 1 to ${MAX_CHOICES} strings for response_format.choices but received ${describeValue(choices)}`)
    // Every index, holes included.
    const values = Array.from(choices as unknown[], (c, i) => text(`response_format.choices[${i}]`, c))
    if (values.reduce((n, c) => n + c.length, 0) > MAX_GRAMMAR_CHARS)
      throw new GrammarError(`Expected at most ${MAX_GRAMMAR_CHARS} characters in all for response_format.choices`)
    tag = { type: 'or', elements: values.map((value) => ({ type: 'const_string', value })) }
    what = 'The choices'
  }
  let json: string
  try {
    json = JSON.stringify({ type: 'structural_tag', format: tag })
  } catch (err) {
    // Cyclic, or nested past the stack.
    throw new GrammarError(`${what} cannot be written as JSON: ${(err as Error).message}`)
  }
  return { kind: 'structural_tag', text: json, fromRequest: true, what }
}

/**
 * The fields of each format of a structural tag, as the xgrammar build detinfer uses (0.1.27) reads
 * them. It ignores a field it does not know (a newer version's `excludes`, a json_schema's
 * `style`), which would leave that part of the format unenforced without a word, so such a field
 * is refused, and so is a format it does not know (a newer version's optional, plus, token, ...).
 */
const STRUCTURAL_TAG_FORMATS: Readonly<Record<string, readonly string[]>> = {
  any_text: [],
  const_string: ['value'],
  json_schema: ['json_schema'],
  qwen_xml_parameter: ['json_schema'],
  grammar: ['grammar'],
  regex: ['pattern'],
  sequence: ['elements'],
  or: ['elements'],
  tag: ['begin', 'content', 'end'],
  triggered_tags: ['triggers', 'tags', 'at_least_one', 'stop_after_first'],
  tags_with_separator: ['tags', 'separator', 'at_least_one', 'stop_after_first'],
}

/**
 * The first part of a structural tag's format (by its place: "format.elements[1]") that xgrammar
 * would not read, or whose JSON schema has a keyword it would not enforce (unsupportedKeyword);
 * null when there is none. Shapes xgrammar reads but refuses (a missing field, a tag no trigger
 * begins) are left to it: it names them.
 */
function unsupportedStructuralTagPart(format: unknown): string | null {
  // [format, its place, whether it is a tag of a list of tags (whose type may be left out)]
  const pending: [unknown, string, boolean][] = [[format, 'format', false]]
  // A cyclic format is refused when it is written as JSON.
  const seen = new Set<object>()
  while (pending.length) {
    const [node, at, inTags] = pending.pop()!
    if (!isPlainObject(node) || seen.has(node)) continue
    seen.add(node)
    const type = node['type'] ?? (inTags ? 'tag' : undefined)
    if (typeof type !== 'string') continue
    const fields = Object.hasOwn(STRUCTURAL_TAG_FORMATS, type) ? STRUCTURAL_TAG_FORMATS[type]! : null
    if (fields === null)
      return `${at}.type ${JSON.stringify(type)} is not a format xgrammar 0.1.27 knows (${Object.keys(STRUCTURAL_TAG_FORMATS).join(', ')})`
    const unknown = Object.keys(node).find((key) => key !== 'type' && !fields.includes(key))
    if (unknown !== undefined) return `${at}.${unknown} is not a field of a ${type} format in xgrammar 0.1.27, which would not enforce it`
    if (type === 'json_schema' || type === 'qwen_xml_parameter') {
      const found = unsupportedKeyword(node['json_schema'])
      if (found !== null) return `${at}.json_schema: ${found}`
    }
    const children: [unknown, string, boolean][] = []
    const list = (key: string, tags: boolean) => {
      const items = node[key]
      if (Array.isArray(items)) items.forEach((item, i) => children.push([item, `${at}.${key}[${i}]`, tags]))
    }
    if (type === 'sequence' || type === 'or') list('elements', false)
    if (type === 'triggered_tags' || type === 'tags_with_separator') list('tags', true)
    if (type === 'tag') children.push([node['content'], `${at}.content`, false])
    // Depth first, in the order written.
    pending.push(...children.reverse())
  }
  return null
}

/** The string formats xgrammar generates (others it would not enforce). */
const STRING_FORMATS = new Set(['email', 'date', 'time', 'date-time', 'duration', 'ipv4', 'ipv6', 'hostname', 'uuid', 'uri', 'uri-reference', 'uri-template', 'json-pointer', 'relative-json-pointer'])

/**
 * The first keyword of `schema` that xgrammar would not enforce (it builds the grammar without it,
 * and the output may break it), as vLLM refuses them before compiling with xgrammar: multipleOf;
 * uniqueItems and contains (with minContains, maxContains) of arrays; string formats it does not
 * know; a string's minLength or maxLength beside a pattern or format (the bounds are dropped);
 * propertyNames beside properties, patternProperties, additionalProperties or
 * unevaluatedProperties, or with a pattern or format and length bounds; patternProperties beside
 * properties, or more than one. Only where the schema names the type. Null when there is none.
 */
export function unsupportedKeyword(schema: unknown): string | null {
  const pending: [unknown, string][] = [[schema, '#']]
  while (pending.length) {
    const [node, at] = pending.pop()!
    if (Array.isArray(node)) {
      node.forEach((item, i) => pending.push([item, `${at}/${i}`]))
      continue
    }
    if (typeof node !== 'object' || node === null) continue
    const s = node as Record<string, unknown>
    const found = unsupportedHere(s)
    if (found !== null) return `${found} (at ${at}) is not supported: the output could break it`
    for (const [key, value] of Object.entries(s)) if (typeof value === 'object' && value !== null) pending.push([value, `${at}/${key.replace(/~/g, '~0').replace(/\//g, '~1')}`])
  }
  return null
}

function unsupportedHere(s: Record<string, unknown>): string | null {
  const t = s['type']
  const types = new Set(typeof t === 'string' ? [t] : Array.isArray(t) ? t.filter((x) => typeof x === 'string') : [])
  const lengthBeside = (x: Record<string, unknown>) => ('pattern' in x || 'format' in x) && ('minLength' in x || 'maxLength' in x)
  if ((types.has('integer') || types.has('number')) && 'multipleOf' in s) return 'multipleOf'
  if (types.has('array')) for (const key of ['uniqueItems', 'contains', 'minContains', 'maxContains']) if (key in s) return key
  if (types.has('string')) {
    if ('format' in s && !STRING_FORMATS.has(s['format'] as string)) return `format ${JSON.stringify(s['format'])}`
    if (lengthBeside(s)) return 'minLength or maxLength beside pattern or format'
  }
  if (types.has('object')) {
    const names = s['propertyNames']
    if (isPlainObject(names) && lengthBeside(names)) return 'propertyNames with minLength or maxLength beside pattern or format'
    if ('propertyNames' in s && ('properties' in s || 'patternProperties' in s || isPlainObject(s['additionalProperties']) || (s['unevaluatedProperties'] ?? true) !== true))
      return 'propertyNames beside properties, patternProperties, additionalProperties or unevaluatedProperties'
    const patterns = s['patternProperties']
    if (isPlainObject(patterns) && ('properties' in s || Object.keys(patterns).length > 1)) return 'patternProperties beside properties, or more than one'
  }
  return null
}

// ---------------------------------------------------------------------------------------------
// The engine

/** An instance of the module in this thread, with the model's TokenizerInfo and compiler. */
interface Instance {
  xg: XGrammar
  info: TokenizerInfo
  compiler: GrammarCompiler
  /** The last lines the module printed (warnings; the reason of an abort). */
  lines: string[]
  /** The ids that end a generation, as xgrammar was given them. */
  stopTokenIds: readonly number[]
  /** Compiled grammars by schema text, least recently used first (GrammarEngine.compiled). */
  compiled: Map<string, CompiledGrammar>
  /** Compiles not finished yet, by schema text: requests of one grammar (a batch's) wait on one compile. */
  compiling: Map<string, Promise<CompiledGrammar>>
}

/**
 * Grammar-constrained decoding for one model: JSON mode and JSON schemas. Built from the model's
 * tokenizer and vocab_size (the size of its logits, which may exceed the tokenizer's); the
 * vocabulary is handed to xgrammar at the first constrain(), and a worker thread for checking
 * schemas starts at the first schema. dispose() frees it all.
 */
export class GrammarEngine {
  private instance: Promise<Instance> | null = null
  /** What `instance` resolved to. */
  private built: Instance | null = null
  private readonly checker = new SchemaChecker()
  /** Schemas that passed the check, least recently used first, with the text to compile of each, and their characters in all. */
  private readonly checked = new Map<string, string>()
  private checkedChars = 0
  /** Checks in the worker not answered yet, by grammar. */
  private readonly checking = new Map<string, Promise<string>>()
  /** Constraints not disposed yet, of this thread and of the workers. */
  private readonly live = new Set<Constraint | WorkerConstraint>()
  /** Of them, those whose matcher is in this thread. */
  private inThread = 0
  /** The worker threads that hold constraints' matchers (null: all in this thread). */
  private readonly pool: MaskPool | null
  /** What xgrammar is given of the vocabulary, once read. */
  private inputs: VocabularyInputs | null = null
  /** What every call rejects with once dispose() ran. */
  private disposedWith: DisposedError | null = null

  constructor(
    private readonly source: GrammarVocabularySource,
    /** The model's vocab_size: masks have a bit for each id below it. */
    readonly vocabSize: number,
    options: GrammarEngineOptions = {},
  ) {
    if (!Number.isInteger(vocabSize) || vocabSize < 1) throw new TypeError(`Expected an integer >= 1 for vocabSize but received ${describeValue(vocabSize)}`)
    const workers = options.workers ?? defaultGrammarWorkers()
    if (!Number.isInteger(workers) || workers < 0 || workers > MAX_GRAMMAR_WORKERS)
      throw new TypeError(`Expected an integer from 0 to ${MAX_GRAMMAR_WORKERS} for workers but received ${describeValue(workers)}`)
    this.pool = workers === 0 ? null : new MaskPool(workers, () => this.vocabularyInputs())
  }

  /** The worker threads that hold constraints' matchers (0: every matcher is in this thread). */
  get workers(): number {
    return this.pool?.size ?? 0
  }

  /**
   * A constraint for one generation that follows `format` (null for { type: 'text' }), starting
   * at the first token of the output. Rejects with GrammarError when the format cannot be used,
   * naming the problem; the engine goes on serving other requests.
   */
  async constrain(format: ResponseFormat): Promise<TokenConstraint | null> {
    this.checkLive()
    const spec = grammarSpec(format)
    if (spec === null) return null
    const text = spec.fromRequest ? await this.check(spec) : spec.text
    this.checkLive()
    // The thread is chosen now, and counted as holding the constraint while it is made, so that
    // requests that come together spread over the threads.
    const worker = this.pool?.pick(this.inThread) ?? null
    if (worker) return this.constrainOn(worker, spec, text)
    this.inThread++
    let made = false
    try {
      const instance = await this.ready()
      this.checkLive()
      try {
        const compiled = await this.compiled(instance, spec, text)
        this.checkLive()
        const matcher = await instance.xg.GrammarMatcher.createGrammarMatcher(compiled)
        made = true
        const pool = this.pool
        const constraint = new Constraint(
          matcher,
          instance,
          this.vocabSize,
          (c) => {
            this.live.delete(c)
            this.inThread--
          },
          pool && (() => pool.flush()),
        )
        if (this.disposedWith) {
          constraint.dispose()
          throw this.disposedWith
        }
        this.live.add(constraint)
        return constraint
      } catch (err) {
        if (this.disposedWith) throw this.disposedWith
        throw this.failed(instance, err, spec)
      }
    } finally {
      if (!made) this.inThread--
    }
  }

  /**
   * A constraint whose matcher is made and kept by `worker`, which compiles the grammar (or takes
   * it from its own cache of the last COMPILED_GRAMMARS).
   */
  private async constrainOn(worker: MaskWorker, spec: GrammarSpec, text: string): Promise<TokenConstraint> {
    const id = worker.nextConstraintId++
    const mask = new SharedArrayBuffer(Math.ceil(this.vocabSize / 32) * 4)
    worker.constraints++
    try {
      await worker.call({ op: 'create', id, key: `${spec.kind}\n${spec.text}`, kind: spec.kind, text, mask })
    } catch (err) {
      worker.constraints--
      if (this.disposedWith) throw this.disposedWith
      if (!(err instanceof WorkerCallError)) throw err
      const reason = abortReason(err.lines, err.thrown ? 0 : new Error(err.message))
      if (!err.aborted) throw new Error(err.message)
      if (spec.fromRequest) throw new GrammarError(`${spec.what} cannot be compiled: ${reason}`, { cause: err })
      throw new Error(`xgrammar failed to compile the grammar of JSON mode: ${reason}`, { cause: err })
    }
    const { stopTokenIds } = this.vocabularyInputs()
    const constraint = new WorkerConstraint(worker, id, new Int32Array(mask), this.vocabSize, new Set(stopTokenIds), (c) => this.live.delete(c))
    if (this.disposedWith) {
      constraint.dispose()
      throw this.disposedWith
    }
    this.live.add(constraint)
    return constraint
  }

  /**
   * The schema's compiled grammar, from this engine's cache of the last COMPILED_GRAMMARS (most
   * recently used kept), or compiled now from `text` (what the check made of the spec's text).
   * xgrammar's own cache has no bound in its WebAssembly
   * build (a server that met many distinct schemas would grow its memory until the module
   * aborted), so it is off, and this one disposes of what it drops: a matcher keeps what it needs
   * of its grammar.
   */
  private async compiled(instance: Instance, spec: GrammarSpec, text: string): Promise<CompiledGrammar> {
    const key = `${spec.kind}\n${spec.text}`
    const cached = instance.compiled.get(key)
    if (cached) {
      instance.compiled.delete(key)
      instance.compiled.set(key, cached)
      return cached
    }
    let compiling = instance.compiling.get(key)
    if (!compiling) {
      compiling = this.compile(instance, spec, key, text).finally(() => instance.compiling.delete(key))
      instance.compiling.set(key, compiling)
    }
    return compiling
  }

  private async compile(instance: Instance, spec: GrammarSpec, key: string, text: string): Promise<CompiledGrammar> {
    const compiled =
      spec.kind === 'json_schema' ? await instance.compiler.compileJSONSchema(text, ...JSON_SCHEMA_OPTIONS) : await instance.compiler.compileStructuralTag(text)
    instance.compiled.set(key, compiled)
    for (const [key, old] of instance.compiled) {
      if (instance.compiled.size <= COMPILED_GRAMMARS) break
      instance.compiled.delete(key)
      disposeQuietly(old)
    }
    return compiled
  }

  /**
   * Frees the compiler, the TokenizerInfo and every constraint not yet disposed, and stops the
   * worker (idempotent). What waits, and every later call, rejects with `reason`: a model passes
   * its own, so that a request whose grammar was being built fails as its other requests do.
   */
  dispose(reason = new DisposedError('grammar engine')): void {
    if (this.disposedWith) return
    this.disposedWith = reason
    this.checker.close(reason)
    // Masks under way in the workers reject with `reason`; then every constraint is freed.
    this.pool?.close(reason)
    for (const c of [...this.live]) c.dispose()
    const instance = this.instance
    this.instance = null
    this.built = null
    void instance?.then(freeInstance, () => {})
  }

  private checkLive(): void {
    if (this.disposedWith) throw this.disposedWith
  }

  /**
   * Checks a request's grammar in the worker, unless it passed before; the text to compile.
   * Requests of one grammar (a batch's) wait on one check.
   */
  private async check(spec: GrammarSpec): Promise<string> {
    const key = `${spec.kind}\n${spec.text}`
    const known = this.checked.get(key)
    if (known !== undefined) {
      this.checked.delete(key)
      this.checked.set(key, known)
      return known
    }
    let checking = this.checking.get(key)
    if (!checking) {
      checking = this.checker.check(spec).finally(() => this.checking.delete(key))
      this.checking.set(key, checking)
    }
    const text = await checking
    if (this.checked.has(key) || key.length + text.length > CHECKED_SCHEMA_CHARS) return text
    this.checked.set(key, text)
    this.checkedChars += key.length + text.length
    for (const [old, oldText] of this.checked) {
      if (this.checkedChars <= CHECKED_SCHEMA_CHARS) break
      this.checked.delete(old)
      this.checkedChars -= old.length + oldText.length
    }
    return text
  }

  private ready(): Promise<Instance> {
    return (this.instance ??= this.build().then(
      (instance) => (this.built = instance),
      (err: unknown) => {
        this.instance = null
        throw err
      },
    ))
  }

  /** What xgrammar is given of the vocabulary (read once; the workers get it too). */
  private vocabularyInputs(): VocabularyInputs {
    if (this.inputs) return this.inputs
    const vocab = this.source.grammarVocabulary()
    const size = this.vocabSize
    const stopTokenIds = [...new Set(vocab.stopTokenIds)].filter((id) => Number.isInteger(id) && id >= 0 && id < size)
    if (stopTokenIds.length === 0)
      throw new Error(
        `The model's tokenizer has no EOS token id below its vocab_size ${size} (generation_config.json, config.json or tokenizer_config.json), so a generation constrained by a grammar could not end`,
      )
    // Ids at and past the model's vocab_size are left out; a stop token past the tokenizer's
    // pieces gets a place (xgrammar only reads stop tokens among the pieces it is given).
    const length = Math.min(size, Math.max(vocab.pieces.length, ...stopTokenIds.map((id) => id + 1)))
    const pieces = Array.from({ length }, (_, id) => vocab.pieces[id] ?? '')
    return (this.inputs = { pieces, vocabType: vocab.vocabType, addPrefixSpace: vocab.addPrefixSpace, vocabSize: size, stopTokenIds })
  }

  private async build(): Promise<Instance> {
    const { pieces, vocabType, addPrefixSpace, vocabSize: size, stopTokenIds } = this.vocabularyInputs()
    const lines: string[] = []
    const xg = loadXGrammar((line) => keepLine(lines, line))
    let info: TokenizerInfo | undefined
    try {
      info = await xg.TokenizerInfo.createTokenizerInfo(pieces, vocabType, addPrefixSpace, size, stopTokenIds)
      const compiler = await xg.GrammarCompiler.createGrammarCompiler(info, false)
      const instance: Instance = { xg, info, compiler, lines, stopTokenIds, compiled: new Map(), compiling: new Map() }
      if (this.disposedWith) {
        freeInstance(instance)
        throw this.disposedWith
      }
      return instance
    } catch (err) {
      if (err instanceof DisposedError) throw err
      if (!isAbort(err)) info?.dispose()
      throw new Error(`xgrammar could not take the model's vocabulary: ${abortReason(lines, err)}`, { cause: err })
    }
  }

  /**
   * The error for a call of this thread's instance that failed. An abort leaves the instance in a
   * state nothing vouches for: it is dropped (the constraints it made keep it until they are
   * disposed; then the garbage collector takes its memory, leaks and all), and the next request
   * builds another.
   */
  private failed(instance: Instance, err: unknown, spec: GrammarSpec): Error {
    if (err instanceof DisposedError) return err
    if (!isAbort(err)) return err instanceof Error ? err : new Error(String(err))
    if (this.built === instance) {
      this.built = null
      this.instance = null
    }
    const reason = abortReason(instance.lines, err)
    // A grammar that passed the check and fails here is still the request's doing, most likely.
    if (spec.fromRequest) return new GrammarError(`${spec.what} cannot be compiled: ${reason}`, { cause: err })
    return new Error(`xgrammar failed to compile the grammar of JSON mode: ${reason}`, { cause: err })
  }
}

function disposeQuietly(handle: { dispose(): void }): void {
  try {
    handle.dispose()
  } catch {
    // Deleted by an abort or a dispose already.
  }
}

function freeInstance(instance: Instance): void {
  for (const compiled of instance.compiled.values()) disposeQuietly(compiled)
  instance.compiled.clear()
  try {
    instance.compiler.dispose()
    instance.info.dispose()
  } catch {
    // Already deleted.
  }
}

function keepLine(lines: string[], line: string): void {
  lines.push(line)
  if (lines.length > KEPT_LINES) lines.shift()
}

// ---------------------------------------------------------------------------------------------
// A constraint

class Constraint implements TokenConstraint {
  /** The mask of the current position, once mask() has computed it (null after accept). */
  private current: Int32Array | null = null
  private onlyStops = false
  private stopped = false
  private freed = false
  private readonly words: number

  constructor(
    private readonly matcher: GrammarMatcher,
    private readonly instance: Instance,
    private readonly vocabSize: number,
    private readonly release: (c: Constraint) => void,
    /**
     * With grammar workers: posts their requests made so far. A mask of this thread is computed
     * a microtask after mask() is called, after this, so that masks asked for together (a step's)
     * are computed in the workers while this thread computes its own.
     */
    private readonly beforeMask: (() => void) | null = null,
  ) {
    this.words = Math.ceil(vocabSize / 32)
  }

  /**
   * True once a stop token was accepted, and once mask() found that only stop tokens may come at
   * the current position (the grammar is complete). Right after accept() it is not known yet
   * whether the grammar is complete: false until the next mask().
   */
  get finished(): boolean {
    return this.stopped || (this.current !== null && this.onlyStops)
  }

  async mask(): Promise<Int32Array> {
    this.checkLive()
    if (this.stopped) throw new Error('The grammar constraint has ended: a stop token was accepted, and no token may follow it')
    if (this.current) return this.current
    if (this.beforeMask) {
      await null
      this.checkLive()
      if (this.stopped) throw new Error('The grammar constraint has ended: a stop token was accepted, and no token may follow it')
      if (this.current) return this.current
      this.beforeMask()
    }
    let raw: Int32Array
    try {
      raw = await this.matcher.getNextTokenBitmask()
    } catch (err) {
      this.checkLive()
      throw this.fail(err)
    }
    this.checkLive()
    const mask = this.fit(raw)
    const { onlyStops, none } = maskKinds(mask, this.instance.stopTokenIds)
    // A dead end: what the grammar needs next, no token writes (a vocabulary without that
    // character). A mask that allows nothing would fail the whole step on the device.
    if (none) throw new Error('No token of the vocabulary can continue the text here: the grammar needs a character that no token writes')
    this.current = mask
    this.onlyStops = onlyStops
    return mask
  }

  accept(token: number): void {
    this.checkLive()
    if (typeof token !== 'number' || !Number.isInteger(token) || token < 0 || token >= this.vocabSize)
      throw new RangeError(`Expected a token id between 0 and ${this.vocabSize - 1} for token but received ${describeValue(token)}`)
    if (this.stopped) throw new Error(`Token ${token} cannot follow: the grammar constraint has ended with a stop token`)
    if (this.current && ((this.current[token >> 5]! >>> (token & 31)) & 1) === 0)
      throw new Error(`Token ${token} is not allowed by the grammar at this position (the last mask leaves it out)`)
    let ok: boolean
    try {
      ok = this.matcher.acceptToken(token)
    } catch (err) {
      throw this.fail(err)
    }
    if (!ok) throw new Error(`Token ${token} is not allowed by the grammar at this position`)
    this.current = null
    this.stopped = this.matcher.isTerminated()
  }

  dispose(): void {
    if (this.freed) return
    this.freed = true
    this.current = null
    try {
      this.matcher.dispose()
    } catch {
      // Deleted already.
    }
    this.release(this)
  }

  private checkLive(): void {
    if (this.freed) throw new DisposedError('grammar constraint')
  }

  private fail(err: unknown): Error {
    if (!isAbort(err)) return err instanceof Error ? err : new Error(String(err))
    return new Error(`xgrammar failed: ${abortReason(this.instance.lines, err)}`, { cause: err })
  }

  /** xgrammar's mask as exactly ceil(vocabSize / 32) words, the bits at and past vocabSize clear. */
  private fit(raw: Int32Array): Int32Array {
    const mask = raw.length === this.words ? raw : new Int32Array(this.words)
    if (mask !== raw) mask.set(raw.subarray(0, this.words))
    const tail = this.vocabSize & 31
    if (tail !== 0) mask[this.words - 1]! &= (1 << tail) - 1
    return mask
  }
}

/**
 * Whether a mask allows no token but stop tokens, and whether it allows none at all. The grammar
 * workers run this same function (MASK_WORKER_SOURCE takes its source), so a constraint ends on
 * the same masks in either thread.
 */
function maskKinds(mask: Int32Array, stopTokenIds: readonly number[]): { onlyStops: boolean; none: boolean } {
  let others = false
  let any = false
  for (let w = 0; w < mask.length && !others; w++) {
    let bits = mask[w]!
    any ||= bits !== 0
    for (const id of stopTokenIds) if (id >> 5 === w) bits &= ~(1 << (id & 31))
    others = bits !== 0
  }
  return { onlyStops: !others, none: !any }
}

// ---------------------------------------------------------------------------------------------
// Constraints in worker threads
//
// An engine with workers (GrammarEngineOptions.workers) places each new constraint on the thread
// that holds the fewest, this one included (this one first at a tie, so that a lone constraint
// costs no round trip): a constraint's matcher stays on its thread to the end. Each worker has its
// own instance of the module, with the vocabulary's TokenizerInfo (sent once, when it starts), a
// compiler and its own cache of the last COMPILED_GRAMMARS grammars; it compiles a grammar from the
// text the schema check made, as this thread does, so its masks are the same bits. mask() posts a
// request; the worker writes the mask into a buffer it shares with the constraint, which copies it
// into its own array (requests made together go in one message, and their answers come back in
// one: a message costs more than a cached mask). accept() checks the token against the last mask
// here, posts it and goes on (a stop token ends the constraint, as xgrammar's matcher terminates on
// one, and no other token does); the worker advances the matcher before it computes the next mask.
// A token accepted with no mask computed since the last accept is checked by the worker
// synchronously (this thread waits for its answer), so that accept() still throws when xgrammar
// refuses it. A worker whose module aborted, or that exited, is stopped: its constraints fail at
// their next mask() or accept() with an error naming the cause, and a new worker takes its place
// for new constraints. Disposing the engine stops the workers; masks under way reject with the
// engine's reason.

/**
 * The start of a worker thread's code (EvalWorker) that loads its own instance of xgrammar: its
 * console is replaced before the module is loaded and initialised, so that emscripten's printErr,
 * which it binds to console.error then, writes into `lines` (the last KEPT_LINES); `xg` is the
 * module, with its internal binding exported where `exportBinding` says so (the schema check reads
 * it).
 */
function workerPrelude(exportBinding: boolean): string {
  const binding = exportBinding ? `.replace(\"${BINDING}\", \"${BINDING_EXPORTED}\")` : ''
  return `
const { workerData } = require('node:worker_threads')
const { createRequire } = require('node:module')
const { readFileSync } = require('node:fs')
const { dirname } = require('node:path')
const port = workerData.port
let lines = []
const keep = (...args) => {
  lines.push(args.map(String).join(' '))
  if (lines.length > ${KEPT_LINES}) lines.shift()
}
for (const name of ['log', 'error', 'warn', 'info', 'debug', 'trace']) console[name] = keep
const file = workerData.file
const module = { exports: {} }
const text = readFileSync(file, 'utf8').replace(\"${DYNAMIC_IMPORT}\", \"${STATIC_REQUIRE}\")${binding}
new Function('exports', 'module', 'require', '__filename', '__dirname', text)(module.exports, module, createRequire(file), file, dirname(file))`
}

/** What xgrammar is given of the vocabulary: pieces (ids past vocabSize left out), stop tokens. */
interface VocabularyInputs {
  pieces: string[]
  vocabType: VocabType
  addPrefixSpace: boolean
  vocabSize: number
  stopTokenIds: number[]
}

/** How long a synchronous accept (a token accepted with no mask first) waits for its worker. */
const SYNC_ACCEPT_TIMEOUT_MS = 10_000

/** A message to a mask worker. */
type MaskRequest =
  | { op: 'create'; id: number; key: string; kind: GrammarSpec['kind']; text: string; mask: SharedArrayBuffer }
  | { op: 'mask'; id: number }
  | { op: 'accept'; id: number; token: number; answer?: boolean }
  | { op: 'dispose'; id: number }

/** A call's failure in the worker: what xgrammar printed, its message, whether it aborted the module. */
interface WorkerFailure {
  message: string
  lines: string[]
  /** A C++ exception (which reaches JavaScript as a number). */
  thrown: boolean
  aborted: boolean
}

/** A reply of a mask worker: ready (or not: init); the answer to a call. */
interface MaskReply {
  ready?: true
  init?: WorkerFailure
  /** The answers to a batch of requests. */
  replies?: MaskReply[]
  call?: number
  failure?: WorkerFailure
  /**
   * Whether the mask (written into the constraint's shared buffer: ceil(vocabSize / 32) words,
   * bits past vocabSize clear) allows no token but stop tokens; whether it allows none at all.
   */
  onlyStops?: boolean
  none?: boolean
  /** A synchronous accept's answer: whether xgrammar took the token, and whether that ended the matcher. */
  accepted?: boolean
  terminated?: boolean
}

/** A call that failed in the worker (its module's reason, for the caller to word). */
class WorkerCallError extends Error {
  readonly lines: string[]
  readonly thrown: boolean
  readonly aborted: boolean
  constructor(f: WorkerFailure) {
    super(f.message)
    this.lines = f.lines
    this.thrown = f.thrown
    this.aborted = f.aborted
  }
}

const MASK_WORKER_SOURCE = `${workerPrelude(false)}
const xg = module.exports
const JSON_OPTIONS = ${JSON.stringify(JSON_SCHEMA_OPTIONS)}
const { pieces, vocabType, addPrefixSpace, vocabSize, stopTokenIds } = workerData.vocabulary
const words = Math.ceil(vocabSize / 32)
const wake = new Int32Array(workerData.wake)
const compiled = new Map()
const matchers = new Map()
// Each constraint's mask, shared with the main thread.
const shared = new Map()
// Why a matcher cannot go on, from a message that has no answer (a token it refused after the main
// thread took it, checked against the mask): the constraint's next mask fails with it.
const broken = new Map()
let compiler = null
const failure = (err) => {
  const thrown = typeof err === 'number'
  const aborted = thrown || err instanceof WebAssembly.RuntimeError
  return { message: thrown ? 'xgrammar threw a C++ exception' : err && err.message ? String(err.message) : String(err), lines: lines.slice(), thrown, aborted }
}
const ready = (async () => {
  const info = await xg.TokenizerInfo.createTokenizerInfo(pieces, vocabType, addPrefixSpace, vocabSize, stopTokenIds)
  compiler = await xg.GrammarCompiler.createGrammarCompiler(info, false)
})()
async function handle(m) {
  if (m.op === 'create') {
    let grammar = compiled.get(m.key)
    if (grammar) compiled.delete(m.key)
    else grammar = m.kind === 'json_schema' ? await compiler.compileJSONSchema(m.text, ...JSON_OPTIONS) : await compiler.compileStructuralTag(m.text)
    compiled.set(m.key, grammar)
    for (const [key, old] of compiled) {
      if (compiled.size <= ${COMPILED_GRAMMARS}) break
      compiled.delete(key)
      old.dispose()
    }
    matchers.set(m.id, await xg.GrammarMatcher.createGrammarMatcher(grammar))
    shared.set(m.id, new Int32Array(m.mask))
    return {}
  }
  const matcher = matchers.get(m.id)
  if (m.op === 'dispose') {
    matchers.delete(m.id)
    shared.delete(m.id)
    broken.delete(m.id)
    if (matcher) matcher.dispose()
    return null
  }
  if (m.op === 'accept') {
    const accepted = matcher.acceptToken(m.token)
    if (m.answer) return { accepted, terminated: matcher.isTerminated() }
    if (!accepted) broken.set(m.id, 'Token ' + m.token + ' is not allowed by the grammar at this position')
    return null
  }
  if (broken.has(m.id)) throw new Error(broken.get(m.id))
  // As Constraint.mask(): exactly the words of vocabSize bits, those past it clear.
  const raw = await matcher.getNextTokenBitmask()
  const mask = shared.get(m.id)
  if (raw.length >= words) mask.set(raw.subarray(0, words))
  else {
    mask.fill(0)
    mask.set(raw)
  }
  const tail = vocabSize & 31
  if (tail !== 0) mask[words - 1] &= (1 << tail) - 1
  return maskKinds(mask, stopTokenIds)
}
${maskKinds.toString()}
let chain = ready.then(
  () => port.postMessage({ ready: true }),
  (err) => port.postMessage({ ready: true, init: failure(err) }),
)
// Requests come in batches (those the main thread made in one go), in order; the answers of a
// batch go back together.
let aborted = false
port.on('message', (batch) => {
  chain = chain.then(async () => {
    const replies = []
    for (const m of batch) {
      if (aborted) break
      lines = []
      let reply
      try {
        reply = await handle(m)
      } catch (err) {
        reply = { failure: failure(err) }
        // An abort: the main thread stops this worker when it hears of it; nothing more runs here.
        // Another error of a message without an answer fails the constraint's next mask.
        aborted = reply.failure.aborted
        if (m.call === undefined && !aborted) {
          broken.set(m.id, reply.failure.message)
          reply = null
        }
      }
      if (reply === null) continue
      replies.push({ call: m.call, ...reply })
    }
    if (replies.length) port.postMessage({ replies })
    if (batch.some((m) => m.answer)) {
      Atomics.store(wake, 0, 1)
      Atomics.notify(wake, 0)
    }
  })
})
`

/**
 * One worker thread of an engine's pool, with the matchers of its constraints. It starts when it
 * is first picked, holds the process open only while calls are under way, and once it failed
 * (its module aborted, it exited) it takes no more calls.
 */
class MaskWorker {
  private readonly thread: EvalWorker<MaskReply>
  /** Calls posted and not answered yet, by number. */
  private readonly pending = new Map<number, { resolve: (reply: MaskReply) => void; reject: (err: Error) => void }>()
  private nextCall = 0
  /** Requests not posted yet (flush). */
  private outbox: (MaskRequest & { call?: number })[] = []
  /** Set by the worker when it answered a synchronous accept. */
  private readonly wake = new Int32Array(new SharedArrayBuffer(4))
  /** Why it takes no more calls (it failed, or the engine was disposed). */
  failedWith: Error | null = null
  /** Its constraints not disposed yet. */
  constraints = 0
  nextConstraintId = 0

  constructor(vocabulary: VocabularyInputs) {
    this.thread = new EvalWorker<MaskReply>({
      source: MASK_WORKER_SOURCE,
      data: { file: xgrammarFile(), vocabulary, wake: this.wake.buffer },
      name: 'The grammar worker thread',
      exitedBefore: 'its constraints ended',
      startupTimeoutMs: WORKER_STARTUP_TIMEOUT_MS,
      quiet: true,
      onReply: (reply) => this.onReply(reply),
      onFail: (err) => this.fail(err),
    })
    this.thread.idle()
  }

  /** Posts a request; resolves with the worker's answer, rejects with WorkerCallError or the worker's failure. */
  call(request: MaskRequest): Promise<MaskReply> {
    if (this.failedWith) return Promise.reject(this.failedWith)
    return new Promise<MaskReply>((resolve, reject) => {
      const call = this.nextCall++
      this.pending.set(call, { resolve, reject })
      this.enqueue({ ...request, call })
    })
  }

  /** Posts a request that has no answer (a checked accept, a dispose). */
  send(request: MaskRequest): void {
    if (this.failedWith) return
    this.enqueue(request)
  }

  /**
   * Posts the requests made since the last post, as one message (a message costs more than a
   * mask here: the requests of a step go together). Called in a microtask after the first of
   * them, and by this thread's constraints before they compute a mask (GrammarEngine).
   */
  flush(): void {
    if (!this.outbox.length) return
    const batch = this.outbox
    this.outbox = []
    if (this.failedWith) return
    this.thread.post(batch)
    if (this.pending.size === 0) this.thread.idle()
  }

  private enqueue(request: MaskRequest & { call?: number }): void {
    if (!this.outbox.length) queueMicrotask(() => this.flush())
    this.outbox.push(request)
  }

  /**
   * A synchronous accept: posts it and waits here for the worker's answer (the replies posted
   * before it are handled on the way, in order).
   */
  acceptNow(id: number, token: number): { accepted: boolean; terminated: boolean } {
    if (this.failedWith) throw this.failedWith
    let answer: MaskReply | undefined
    let error: Error | undefined
    const call = this.nextCall++
    this.pending.set(call, { resolve: (reply) => (answer = reply), reject: (err) => (error = err) })
    Atomics.store(this.wake, 0, 0)
    this.enqueue({ op: 'accept', id, token, answer: true, call })
    this.flush()
    const deadline = performance.now() + SYNC_ACCEPT_TIMEOUT_MS
    while (answer === undefined && error === undefined) {
      const left = deadline - performance.now()
      if (left <= 0) {
        this.fail(new Error(`The grammar worker thread did not answer within ${SYNC_ACCEPT_TIMEOUT_MS / 1000} s`))
        break
      }
      Atomics.wait(this.wake, 0, 0, Math.min(left, 50))
      for (let reply = this.thread.takePosted(); reply; reply = this.thread.takePosted()) this.onReply(reply)
    }
    if (error ?? !answer) throw error ?? this.failedWith!
    return { accepted: answer.accepted === true, terminated: answer.terminated === true }
  }

  /** Stops the thread; calls under way reject with `reason`, and later ones too. */
  fail(reason: Error): void {
    if (this.failedWith) return
    this.failedWith = reason
    const pending = [...this.pending.values()]
    this.pending.clear()
    this.thread.stop()
    for (const p of pending) p.reject(reason)
  }

  private onReply(reply: MaskReply): void {
    if (this.failedWith) return
    if (reply.replies) {
      for (const r of reply.replies) this.onReply(r)
      return
    }
    if (reply.ready) {
      if (reply.init) {
        const reason = abortReason(reply.init.lines, reply.init.thrown ? 0 : new Error(reply.init.message))
        this.fail(new Error(`xgrammar could not take the model's vocabulary in the grammar worker thread: ${reason}`))
      }
      return
    }
    const p = reply.call === undefined ? undefined : this.pending.get(reply.call)
    if (p) {
      this.pending.delete(reply.call!)
      if (this.pending.size === 0) this.thread.idle()
    }
    if (!reply.failure) return p?.resolve(reply)
    const err = new WorkerCallError(reply.failure)
    p?.reject(err)
    // An abort leaves the worker's module in a state nothing vouches for: its constraints fail.
    if (err.aborted) this.fail(new Error(`xgrammar failed in the grammar worker thread: ${abortReason(err.lines, err.thrown ? 0 : err)}`))
  }
}

/** An engine's worker threads, started at their first use, replaced once they failed. */
class MaskPool {
  private readonly workers: (MaskWorker | null)[]
  private closedWith: Error | null = null

  constructor(
    readonly size: number,
    private readonly vocabulary: () => VocabularyInputs,
  ) {
    this.workers = Array.from({ length: size }, () => null)
  }

  /**
   * The worker for a new constraint: the one that holds the fewest, unless this thread holds no
   * more than that (`inThread`): then null, for this thread.
   */
  pick(inThread: number): MaskWorker | null {
    if (this.closedWith) throw this.closedWith
    let best: MaskWorker | null = null
    for (const [i, w] of this.workers.entries()) {
      const live = w && !w.failedWith ? w : null
      const load = live?.constraints ?? 0
      if (inThread <= load || (best && best.constraints <= load)) continue
      best = live ?? (this.workers[i] = new MaskWorker(this.vocabulary()))
    }
    return best
  }

  /** Posts every worker's requests made so far. */
  flush(): void {
    for (const w of this.workers) w?.flush()
  }

  close(reason: Error): void {
    this.closedWith = reason
    for (const w of this.workers) w?.fail(reason)
  }
}

class WorkerConstraint implements TokenConstraint {
  private current: Int32Array | null = null
  /** What mask() returns: the constraint's own copy of the worker's last mask. */
  private readonly own: Int32Array
  private onlyStops = false
  private stopped = false
  private freed = false

  constructor(
    private readonly worker: MaskWorker,
    private readonly id: number,
    /** Where the worker writes the constraint's masks. */
    private readonly shared: Int32Array,
    private readonly vocabSize: number,
    private readonly stopTokenIds: ReadonlySet<number>,
    private readonly release: (c: WorkerConstraint) => void,
  ) {
    this.own = new Int32Array(shared.length)
  }

  get finished(): boolean {
    return this.stopped || (this.current !== null && this.onlyStops)
  }

  async mask(): Promise<Int32Array> {
    this.checkLive()
    if (this.worker.failedWith) throw this.fail(this.worker.failedWith)
    if (this.stopped) throw new Error('The grammar constraint has ended: a stop token was accepted, and no token may follow it')
    if (this.current) return this.current
    let reply: MaskReply
    try {
      reply = await this.worker.call({ op: 'mask', id: this.id })
    } catch (err) {
      throw this.fail(err)
    }
    this.checkLive()
    if (reply.none) throw new Error('No token of the vocabulary can continue the text here: the grammar needs a character that no token writes')
    this.own.set(this.shared)
    this.current = this.own
    this.onlyStops = reply.onlyStops === true
    return this.current
  }

  accept(token: number): void {
    this.checkLive()
    if (typeof token !== 'number' || !Number.isInteger(token) || token < 0 || token >= this.vocabSize)
      throw new RangeError(`Expected a token id between 0 and ${this.vocabSize - 1} for token but received ${describeValue(token)}`)
    if (this.stopped) throw new Error(`Token ${token} cannot follow: the grammar constraint has ended with a stop token`)
    if (this.worker.failedWith) throw this.fail(this.worker.failedWith)
    if (this.current) {
      if (((this.current[token >> 5]! >>> (token & 31)) & 1) === 0)
        throw new Error(`Token ${token} is not allowed by the grammar at this position (the last mask leaves it out)`)
      this.worker.send({ op: 'accept', id: this.id, token })
      this.current = null
      // A stop token the mask allowed ends the matcher (xgrammar's isTerminated()); no other token does.
      this.stopped = this.stopTokenIds.has(token)
      return
    }
    let answer: { accepted: boolean; terminated: boolean }
    try {
      answer = this.worker.acceptNow(this.id, token)
    } catch (err) {
      throw this.fail(err)
    }
    if (!answer.accepted) throw new Error(`Token ${token} is not allowed by the grammar at this position`)
    this.stopped = answer.terminated
  }

  dispose(): void {
    if (this.freed) return
    this.freed = true
    this.current = null
    this.worker.constraints--
    this.worker.send({ op: 'dispose', id: this.id })
    this.release(this)
  }

  private checkLive(): void {
    if (this.freed) throw new DisposedError('grammar constraint')
  }

  /** The error of a failed call: the engine's reason once disposed; xgrammar's, or the worker's end, named. */
  private fail(err: unknown): Error {
    if (err instanceof DisposedError) return err
    if (err instanceof WorkerCallError) {
      if (!err.aborted) return new Error(err.message)
      return new Error(`xgrammar failed: ${abortReason(err.lines, err.thrown ? 0 : err)}`, { cause: err })
    }
    const message = err instanceof Error ? err.message : String(err)
    return new Error(`The grammar constraint cannot go on: ${message}`, { cause: err })
  }
}

// ---------------------------------------------------------------------------------------------
// Checking schemas in a worker thread

// The worker's code (EvalWorker, workerPrelude); each reply carries the lines the check printed.
const WORKER_SOURCE = `${workerPrelude(true)}
const { Grammar, __binding } = module.exports
const JSON_OPTIONS = ${JSON.stringify(JSON_SCHEMA_OPTIONS)}
// A C++ exception (xgrammar's refusal of a structural tag: "Invalid structural tag error: Format
// type not recognized: foo") reaches JavaScript as the address of its object. xgrammar's errors
// derive from std::runtime_error, whose message libc++ keeps as a C string that the word after
// the object's vtable points to. Null when that does not read as a line of text.
function thrownMessage(address) {
  const binding = typeof __binding === 'function' ? __binding() : null
  if (!binding || !binding.HEAPU8 || !binding.HEAPU32) return null
  const heap = binding.HEAPU8
  const at = binding.HEAPU32[(address >>> 2) + 1]
  if (!at || at >= heap.length) return null
  const end = heap.indexOf(0, at)
  if (end <= at || end - at > ${MAX_REASON_CHARS * 4}) return null
  let message
  try {
    message = new TextDecoder('utf-8', { fatal: true }).decode(heap.subarray(at, end))
  } catch {
    return null
  }
  if (/[\\x00-\\x1f]/.test(message)) return null
  return message.replace(/^Invalid [A-Za-z ]+ error: /, '')
}
// A structural tag with each of its json_schema formats turned into a grammar format holding the
// EBNF of the schema's JSON as JSON_OPTIONS write it (on one line), which xgrammar's own
// json_schema format there does not: it lets any whitespace through.
async function compactJsonFormats(text) {
  const tag = JSON.parse(text)
  const pending = [tag.format]
  while (pending.length) {
    const node = pending.pop()
    if (Array.isArray(node)) pending.push(...node)
    else if (node && typeof node === 'object') {
      if (node.type !== 'json_schema') {
        pending.push(node.elements, node.tags, node.content)
        continue
      }
      const grammar = await Grammar.fromJSONSchema(JSON.stringify(node.json_schema), ...JSON_OPTIONS)
      node.type = 'grammar'
      node.grammar = grammar.toString()
      delete node.json_schema
      grammar.dispose()
    }
  }
  return JSON.stringify(tag)
}
port.on('message', async ({ kind, text }) => {
  lines = []
  try {
    // What the engine compiles: a JSON schema as it is; a structural tag with its JSON compacted.
    const compiled = kind === 'json_schema' ? text : await compactJsonFormats(text)
    const grammar = kind === 'json_schema' ? await Grammar.fromJSONSchema(text, ...JSON_OPTIONS) : await Grammar.fromStructuralTag(compiled)
    grammar.dispose()
    port.postMessage({ ok: true, compiled })
  } catch (err) {
    // A C++ exception leaves the module as an abort does (the frames it crossed never unwound).
    const thrown = typeof err === 'number'
    const aborted = thrown || err instanceof WebAssembly.RuntimeError
    const message = thrown ? (thrownMessage(err) ?? 'xgrammar refused it without saying why') : err && err.message ? String(err.message) : String(err)
    port.postMessage({ lines, message, aborted })
  }
})
port.postMessage({ ready: true })
`

/** A reply of the worker: ready to check; the grammar can be compiled, from `compiled`; or why not. */
type CheckReply = { ready?: true; ok?: true; compiled?: string; lines?: string[]; message?: string; aborted?: boolean }

interface PendingCheck {
  spec: GrammarSpec
  resolve: (compiled: string) => void
  reject: (err: unknown) => void
}

interface CheckWorker {
  thread: EvalWorker<CheckReply>
  ready: boolean
  current: PendingCheck | null
  timer: NodeJS.Timeout | undefined
}

/**
 * One worker thread with its own instance of the module, that turns schemas into grammars (no
 * vocabulary needed) one at a time, in arrival order. It starts at the first schema, holds the
 * process open only while it has work, and is replaced after an abort or a check past its time.
 */
class SchemaChecker {
  private running: CheckWorker | null = null
  private readonly queue: PendingCheck[] = []
  private closedWith: Error | null = null

  /**
   * Resolves with the text to compile when xgrammar can compile the grammar (a structural tag's
   * JSON compacted); rejects with GrammarError naming the problem when it cannot.
   */
  check(spec: GrammarSpec): Promise<string> {
    if (this.closedWith) return Promise.reject(this.closedWith)
    return new Promise<string>((resolve, reject) => {
      this.queue.push({ spec, resolve, reject })
      this.next()
    })
  }

  /** Stops the worker; checks not yet answered reject with `reason`. */
  close(reason: Error): void {
    if (this.closedWith) return
    this.closedWith = reason
    const r = this.running
    if (r?.current) r.current.reject(reason)
    for (const pending of this.queue.splice(0)) pending.reject(reason)
    if (r) this.stop(r)
  }

  private next(): void {
    if (this.closedWith || (!this.queue.length && !this.running)) return
    const r = this.running ?? this.start()
    if (!r.ready || r.current) return
    const pending = this.queue.shift()
    if (!pending) return r.thread.idle()
    r.current = pending
    r.timer = setTimeout(() => {
      // A reply posted in time but not read yet (this thread was busy) still counts.
      const posted = r.thread.takePosted()
      if (posted) return this.onReply(r, posted)
      this.stop(r)
      pending.reject(new GrammarError(`${pending.spec.what} took longer than ${SCHEMA_CHECK_TIMEOUT_MS / 1000} s to compile and was refused`))
      this.next()
    }, SCHEMA_CHECK_TIMEOUT_MS)
    r.thread.post({ kind: pending.spec.kind, text: pending.spec.text })
  }

  private onReply(r: CheckWorker, reply: CheckReply): void {
    if (this.running !== r) return
    if (reply.ready) {
      r.ready = true
      return this.next()
    }
    const pending = r.current!
    clearTimeout(r.timer)
    r.current = null
    if (reply.aborted) this.stop(r) // its module aborted: the next check gets a fresh one
    if (reply.ok) pending.resolve(reply.compiled ?? pending.spec.text)
    else {
      const reason = abortReason(reply.lines ?? [], new Error(reply.message ?? 'unknown error'))
      pending.reject(new GrammarError(`${pending.spec.what} cannot be used: ${reason}`))
    }
    this.next()
  }

  private start(): CheckWorker {
    const thread = new EvalWorker<CheckReply>({
      source: WORKER_SOURCE,
      data: { file: xgrammarFile() },
      name: 'The worker thread that checks JSON schemas',
      exitedBefore: 'it answered',
      startupTimeoutMs: WORKER_STARTUP_TIMEOUT_MS,
      // Whatever the worker would print stays there (its console is replaced; this is for the rest).
      quiet: true,
      onReply: (reply) => this.onReply(r, reply),
      onFail: (err) => this.fail(r, err),
    })
    const r: CheckWorker = { thread, ready: false, current: null, timer: undefined }
    this.running = r
    return r
  }

  /** A worker that died or would not start: its check fails, and so does the queue when it never started. */
  private fail(r: CheckWorker, err: Error): void {
    if (this.running !== r) return
    const pending = r.current
    this.stop(r)
    pending?.reject(err)
    if (!r.ready) for (const waiting of this.queue.splice(0)) waiting.reject(err)
    else this.next()
  }

  private stop(r: CheckWorker): void {
    if (this.running === r) this.running = null
    clearTimeout(r.timer)
    r.current = null
    r.thread.stop()
  }
}
