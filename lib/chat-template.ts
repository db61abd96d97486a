// Chat templates come with the model files, and a Jinja template can loop for ever or build a
// string of gigabytes (`{% for i in range(100000000) %}x{% endfor %}` takes Node's heap down).
// So templates render in a worker thread with a heap limit, and the caller waits for the result
// synchronously (Atomics.wait, then receiveMessageOnPort) for at most RENDER_TIMEOUT_MS: past it
// the worker is terminated and the render fails with an error that names the template; range()
// is bounded too. One worker serves the process: it starts (in about 0.1 s, unref'd: it never
// keeps the process alive) when a template is loaded, and it caches parsed templates, so a
// render costs a message round trip (0.1 to 0.5 ms for a ChatML template on 2 busy cores, against
// 0.07 to 0.13 ms in process).
import { createRequire } from 'node:module'
import { MessageChannel, Worker, receiveMessageOnPort, type MessagePort } from 'node:worker_threads'
import { Template } from '@huggingface/jinja'

/** How long one render may take. */
export const RENDER_TIMEOUT_MS = 2000
/** How long the worker may take to start (once per process, or after a timeout). */
const STARTUP_TIMEOUT_MS = 10_000
/** The longest text a template may render, and the most text its variables may carry. */
export const MAX_RENDERED_CHARS = 16 * 2 ** 20
/** The most items range() gives inside a template, and the most a list it builds may hold. */
export const MAX_RANGE_ITEMS = 1_000_000
/** The longest template source: published chat templates are a few KB, the largest some 20 KB. */
export const MAX_TEMPLATE_CHARS = 2 ** 20
/** The longest error message a render passes on (raise_exception's text is the template's). */
const MAX_ERROR_CHARS = 2000
/** The render worker's heap: the variables, the parsed templates and the output fit well inside. */
const WORKER_HEAP_MB = 256

// The worker's code: CommonJS, evaluated (the same text works from lib/*.ts under a test runner
// and from dist/*.js). It renders one request at a time and signals the waiting caller.
const WORKER_SOURCE = `
const { workerData } = require('node:worker_threads')
const { Template, Environment, Interpreter } = require(workerData.jinjaPath)
const { port, signal, maxChars, maxRange, maxErrorChars } = workerData
const flags = new Int32Array(signal)
const templates = new Map()
function range(start, stop, step = 1) {
  if (stop === undefined) { stop = start; start = 0 }
  if ([start, stop, step].some((v) => typeof v !== 'number' || !Number.isFinite(v)))
    throw new Error('range() takes finite numbers')
  const count = step === 0 ? 0 : Math.max(0, Math.ceil((stop - start) / step))
  if (count > maxRange) throw new Error('range() of ' + count + ' items exceeds the limit of ' + maxRange + ' items')
  const out = []
  if (step > 0) for (let i = start; i < stop; i += step) out.push(i)
  else if (step < 0) for (let i = start; i > stop; i += step) out.push(i)
  else throw new Error('range() step must not be zero')
  return out
}
// Every render declares its globals with Environment#set; this one swaps in the bounded range().
const declare = Environment.prototype.set
Environment.prototype.set = function (name, value) {
  if (hasFloatObject(value, 0)) return this.declareVariable(name, withFloats(value))
  return declare.call(this, name, name === 'range' && typeof value === 'function' ? range : value)
}
// Python's str methods strip(), lstrip() and rstrip() take the characters to remove (Qwen3's
// template writes content.lstrip('\\n') and reasoning.strip('\\n')); the library's ignore them and
// remove all whitespace. Without an argument, and in the trim filter, Python's whitespace (which
// has U+001C to U+001F and U+0085, and not U+FEFF) is what goes.
const PY_SPACE = new Set([9, 10, 11, 12, 13, 28, 29, 30, 31, 32, 133, 160, 5760, 8192, 8193, 8194, 8195, 8196, 8197, 8198, 8199, 8200, 8201, 8202, 8232, 8233, 8239, 8287, 12288].map((c) => String.fromCharCode(c)))
function pyStrip(text, chars, left, right) {
  const set = chars === undefined ? PY_SPACE : new Set(Array.from(chars))
  const points = Array.from(text)
  let i = 0
  let j = points.length
  if (left) while (i < j && set.has(points[i])) i++
  if (right) while (j > i && set.has(points[j - 1])) j--
  return points.slice(i, j).join('')
}
function stripChars(name, arg) {
  if (arg === undefined || arg.type === 'NullValue' || arg.type === 'UndefinedValue') return undefined
  if (arg.type !== 'StringValue') throw new Error(name + '() argument must be a string or none')
  return arg.value
}
const scratch = new Environment()
function runtimeValue(value) {
  const converted = declare.call(scratch, 'value', value)
  scratch.variables.delete('value')
  return converted
}
const StringValue = runtimeValue('').constructor
const stringBuiltins = Object.getOwnPropertyDescriptor(StringValue.prototype, 'builtins').get
const pythonStrips = new WeakSet()
Object.defineProperty(StringValue.prototype, 'builtins', {
  configurable: true,
  get() {
    const builtins = stringBuiltins.call(this)
    if (!pythonStrips.has(builtins)) {
      pythonStrips.add(builtins)
      const FunctionValue = builtins.get('strip').constructor
      const text = this.value
      for (const [name, left, right] of [['strip', true, true], ['lstrip', true, false], ['rstrip', false, true]])
        builtins.set(name, new FunctionValue((args) => new StringValue(pyStrip(text, stripChars(name, args[0]), left, right))))
    }
    return builtins
  },
})
// Numbers as Python writes them. JSON's 1.0 is a float in Python and prints as 1.0, where
// JavaScript has only the number 1: the request's JSON keeps such numbers as Number objects
// (parseJsonKeepingFloats), which become the library's floats here. A float prints as Python's
// repr() does (1e-05, 1e+16, 2.0), in the tojson filter and in the text.
const FloatValue = runtimeValue(0.5).constructor
const ArrayValue = runtimeValue([]).constructor
const ObjectValue = runtimeValue({}).constructor
function hasFloatObject(value, depth) {
  if (value instanceof Number) return true
  if (value === null || typeof value !== 'object' || depth > 64) return false
  for (const v of Array.isArray(value) ? value : Object.values(value)) if (hasFloatObject(v, depth + 1)) return true
  return false
}
function withFloats(value) {
  if (value instanceof Number) return new FloatValue(value.valueOf())
  if (Array.isArray(value)) return new ArrayValue(value.map(withFloats))
  if (value !== null && typeof value === 'object') return new ObjectValue(new Map(Object.entries(value).map(([k, v]) => [k, withFloats(v)])))
  return runtimeValue(value)
}
function pyFloat(x, json) {
  if (x !== x) return json ? 'NaN' : 'nan'
  if (x === Infinity || x === -Infinity) return (x < 0 ? '-' : '') + (json ? 'Infinity' : 'inf')
  if (x === 0) return 1 / x < 0 ? '-0.0' : '0.0'
  // The shortest digits that read back as x, as both languages find them; Python's repr() writes
  // an exponent below 1e-4 and from 1e16 on.
  const [mantissa, e] = Math.abs(x).toExponential().split('e')
  const exp = Number(e)
  const digits = mantissa.replace('.', '')
  let text
  if (exp < -4 || exp >= 16)
    text = digits[0] + (digits.length > 1 ? '.' + digits.slice(1) : '') + 'e' + (exp < 0 ? '-' : '+') + String(Math.abs(exp)).padStart(2, '0')
  else if (exp < 0) text = '0.' + '0'.repeat(-exp - 1) + digits
  else if (digits.length > exp + 1) text = digits.slice(0, exp + 1) + '.' + digits.slice(exp + 1)
  else text = digits + '0'.repeat(exp + 1 - digits.length) + '.0'
  return (x < 0 ? '-' : '') + text
}
FloatValue.prototype.toString = function () {
  return pyFloat(this.value, false)
}
// Other values print as Python's str() prints them, in the text, through the string filter and
// with ~: None, True and False, and lists, tuples and dicts as their repr() ([1, 'a', None],
// (1,), {'k': True}), where the library printed nothing for None, JavaScript's true, and JSON.
const BooleanValue = runtimeValue(true).constructor
function pyStringRepr(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'"
  let out = quote
  for (const ch of text) {
    const c = ch.codePointAt(0)
    if (ch === '\\\\' || ch === quote) out += '\\\\' + ch
    else if (ch === '\\n') out += '\\\\n'
    else if (ch === '\\r') out += '\\\\r'
    else if (ch === '\\t') out += '\\\\t'
    else if (ch !== ' ' && /[\\p{Cc}\\p{Cf}\\p{Cs}\\p{Co}\\p{Cn}\\p{Z}]/u.test(ch))
      out += c < 0x100 ? '\\\\x' + c.toString(16).padStart(2, '0') : c < 0x10000 ? '\\\\u' + c.toString(16).padStart(4, '0') : '\\\\U' + c.toString(16).padStart(8, '0')
    else out += ch
  }
  return out + quote
}
function pyRepr(value) {
  switch (value.type) {
    case 'NullValue':
      return 'None'
    case 'UndefinedValue':
      return 'Undefined'
    case 'BooleanValue':
      return value.value ? 'True' : 'False'
    case 'FloatValue':
      return pyFloat(value.value, false)
    case 'StringValue':
      return pyStringRepr(value.value)
    case 'ArrayValue':
      return '[' + value.value.map(pyRepr).join(', ') + ']'
    case 'TupleValue':
      return '(' + value.value.map(pyRepr).join(', ') + (value.value.length === 1 ? ',' : '') + ')'
    case 'ObjectValue':
    case 'KeywordArgumentsValue':
      return '{' + Array.from(value.value.entries(), ([k, v]) => pyStringRepr(k) + ': ' + pyRepr(v)).join(', ') + '}'
    default:
      return value.toString()
  }
}
// str(x): a string is itself; None is None (in ~ and the string filter), an undefined name nothing.
function pyStr(value) {
  if (value.type === 'StringValue') return value.value
  if (value.type === 'UndefinedValue') return ''
  return pyRepr(value)
}
BooleanValue.prototype.toString = function () {
  return pyRepr(this)
}
ArrayValue.prototype.toString = function () {
  return pyRepr(this)
}
ObjectValue.prototype.toString = function () {
  return pyRepr(this)
}
// A block's text: what each of its statements gives, as the library joins it, except that an
// output ({{ ... }}) of None writes None. The library skipped every null value, because the
// statements that write nothing ({% set %}, {% macro %}) give null too; an undefined name still
// writes nothing, as in Python.
const STATEMENTS = new Set(['Program', 'If', 'For', 'Break', 'Continue', 'Set', 'Macro', 'Comment', 'FilterStatement', 'CallStatement'])
Interpreter.prototype.evaluateBlock = function (statements, environment) {
  let text = ''
  for (const statement of statements) {
    const value = this.evaluate(statement, environment)
    if (value.type === 'UndefinedValue') continue
    if (value.type === 'NullValue') text += STATEMENTS.has(statement.type) ? '' : 'None'
    else text += value.toString()
  }
  return new StringValue(text)
}
// Keys sorted as Python sorts strings, by code point.
function codePointOrder(a, b) {
  const x = Array.from(a)
  const y = Array.from(b)
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0)
    if (d !== 0) return d
  }
  return x.length - y.length
}
// transformers' tojson: json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
function jsonOptions(args, kwargs) {
  const arg = (i, name) => kwargs.get(name) ?? args[i]
  const given = (v) => v !== undefined && v.type !== 'NullValue' && v.type !== 'UndefinedValue'
  const indentArg = arg(1, 'indent')
  let indent = null
  if (given(indentArg)) {
    if (indentArg.type === 'IntegerValue') indent = ' '.repeat(Math.max(0, indentArg.value))
    else if (indentArg.type === 'StringValue') indent = indentArg.value
    else throw new Error('tojson: indent must be an integer, a string or none')
  }
  const separators = arg(2, 'separators')
  let itemSeparator = indent === null ? ', ' : ','
  let keySeparator = ': '
  if (given(separators)) {
    const pair = separators.value
    if (!Array.isArray(pair) || pair.length !== 2 || pair.some((p) => p.type !== 'StringValue'))
      throw new Error('tojson: separators must be a pair of strings')
    itemSeparator = pair[0].value
    keySeparator = pair[1].value
  }
  const flag = (v) => given(v) && v.__bool__().value
  return { ensureAscii: flag(arg(0, 'ensure_ascii')), indent, itemSeparator, keySeparator, sortKeys: flag(arg(3, 'sort_keys')) }
}
function pyJson(value, o, level) {
  switch (value.type) {
    case 'NullValue':
    case 'UndefinedValue':
      return 'null'
    case 'BooleanValue':
      return value.value ? 'true' : 'false'
    case 'IntegerValue':
      return String(value.value)
    case 'FloatValue':
      return pyFloat(value.value, true)
    case 'StringValue': {
      const text = JSON.stringify(value.value)
      return o.ensureAscii ? text.replace(/[\\u007f-\\uffff]/g, (c) => '\\\\u' + c.charCodeAt(0).toString(16).padStart(4, '0')) : text
    }
    case 'ArrayValue':
    case 'TupleValue':
    case 'ObjectValue':
    case 'NamespaceValue': {
      const list = value.type === 'ArrayValue' || value.type === 'TupleValue'
      let items
      if (list) items = value.value.map((v) => pyJson(v, o, level + 1))
      else {
        const entries = Array.from(value.value.entries())
        if (o.sortKeys) entries.sort(([a], [b]) => codePointOrder(a, b))
        items = entries.map(([k, v]) => pyJson({ type: 'StringValue', value: k }, o, level + 1) + o.keySeparator + pyJson(v, o, level + 1))
      }
      const [open, close] = list ? ['[', ']'] : ['{', '}']
      if (items.length === 0) return open + close
      if (o.indent === null) return open + items.join(o.itemSeparator) + close
      const inner = '\\n' + o.indent.repeat(level + 1)
      return open + inner + items.join(o.itemSeparator + inner) + '\\n' + o.indent.repeat(level) + close
    }
    default:
      throw new Error('Object of type ' + value.type + ' is not JSON serializable')
  }
}
const applyFilter = Interpreter.prototype.applyFilter
Interpreter.prototype.applyFilter = function (operand, filterNode, environment) {
  const call = filterNode.type === 'CallExpression'
  const name = call ? filterNode.callee.type === 'Identifier' && filterNode.callee.value : filterNode.type === 'Identifier' && filterNode.value
  if (name === 'tojson') {
    const [args, kwargs] = call ? this.evaluateArguments(filterNode.args, environment) : [[], new Map()]
    return new StringValue(pyJson(operand, jsonOptions(args, kwargs), 0))
  }
  if (name === 'string' && !call) return new StringValue(pyStr(operand))
  if (name === 'trim' && operand.type === 'StringValue') {
    const [args, kwargs] = call ? this.evaluateArguments(filterNode.args, environment) : [[], new Map()]
    return new StringValue(pyStrip(operand.value, stripChars('trim', args[0] ?? kwargs.get('chars')), true, true))
  }
  return applyFilter.call(this, operand, filterNode, environment)
}
// Lists and strings a template builds are bounded as range() is: x + x + x + x doubled forty
// times made one allocation past the heap's limit, which ends the whole process, not just the
// worker. Each operand has passed this check, so one operation builds at most twice the bound.
const binary = Interpreter.prototype.evaluateBinaryExpression
Interpreter.prototype.evaluateBinaryExpression = function (node, environment) {
  // ~ joins the operands' str(), as Jinja does (the library threw on None and undefined names).
  const result =
    node.operator.value === '~'
      ? new StringValue(pyStr(this.evaluate(node.left, environment)) + pyStr(this.evaluate(node.right, environment)))
      : binary.call(this, node, environment)
  const value = result && result.value
  if (Array.isArray(value) && value.length > maxRange)
    throw new Error('a list of ' + value.length + ' items exceeds the limit of ' + maxRange + ' items')
  if (typeof value === 'string' && value.length > maxChars)
    throw new Error('a string of ' + value.length + ' characters exceeds the limit of ' + maxChars + ' characters')
  return result
}
function reply(message) {
  port.postMessage(message)
  Atomics.store(flags, 0, 1)
  Atomics.notify(flags, 0)
}
port.on('message', ({ source, variables }) => {
  try {
    let template = templates.get(source)
    if (!template) {
      if (templates.size >= 8) templates.clear()
      template = new Template(source)
      templates.set(source, template)
    }
    const text = template.render(variables)
    if (typeof text !== 'string') reply({ error: 'the template did not render to text' })
    else if (text.length > maxChars) reply({ tooLong: text.length })
    else reply({ text })
  } catch (err) {
    const text = err && err.message ? String(err.message) : String(err)
    reply({ error: text.length > maxErrorChars ? text.slice(0, maxErrorChars) + '... (' + text.length + ' characters)' : text })
  }
})
Atomics.store(flags, 1, 1)
Atomics.notify(flags, 1)
`

interface RenderWorker {
  worker: Worker
  port: MessagePort
  /** [0]: a reply is waiting; [1]: the worker is ready. */
  flags: Int32Array
}

let current: RenderWorker | null = null

function startWorker(): RenderWorker {
  const jinjaPath = createRequire(import.meta.url).resolve('@huggingface/jinja')
  const { port1, port2 } = new MessageChannel()
  const signal = new SharedArrayBuffer(8)
  const worker = new Worker(WORKER_SOURCE, {
    eval: true,
    workerData: { jinjaPath, port: port2, signal, maxChars: MAX_RENDERED_CHARS, maxRange: MAX_RANGE_ITEMS, maxErrorChars: MAX_ERROR_CHARS },
    transferList: [port2],
    resourceLimits: { maxOldGenerationSizeMb: WORKER_HEAP_MB, stackSizeMb: 4 },
    // Not the process's flags: under `node --input-type=module -e`, the worker's CommonJS source was
    // read as an ES module, failed, and the renderer never started.
    execArgv: [],
    stdout: false,
    stderr: false,
  })
  worker.unref()
  // A worker that dies (out of memory, terminated) is replaced at the next render; the caller
  // sees the timeout. Listening keeps its 'error' event from becoming an uncaught exception.
  worker.on('error', () => {})
  port1.unref()
  const started: RenderWorker = { worker, port: port1, flags: new Int32Array(signal) }
  worker.on('exit', () => {
    if (current === started) current = null
  })
  return started
}

/** The running worker, started when a template is created so that it is ready by the first render. */
function renderWorker(): RenderWorker {
  return current ?? (current = startWorker())
}

function waitUntilReady(w: RenderWorker): void {
  if (Atomics.wait(w.flags, 1, 0, STARTUP_TIMEOUT_MS) === 'timed-out') {
    stopWorker(w)
    throw new Error(`The chat template renderer (a worker thread) did not start within ${STARTUP_TIMEOUT_MS / 1000} s`)
  }
}

function stopWorker(w: RenderWorker): void {
  if (current === w) current = null
  w.port.close()
  void w.worker.terminate()
}

/** Rough size of the text a value carries (strings of the messages, mostly). */
function textSize(value: unknown, depth = 0): number {
  if (typeof value === 'string') return value.length
  if (typeof value !== 'object' || value === null || depth > 16) return 0
  let n = 0
  for (const v of Array.isArray(value) ? value : Object.values(value)) n += textSize(v, depth + 1)
  return n
}

/** A string or a number of a JSON text: numbers written with a fraction or an exponent are floats. */
const JSON_STRING_OR_NUMBER = /"(?:[^"\\]|\\.)*"|-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/g

/**
 * JSON.parse, except that a number written as a float with a whole value (1.0, 2e3) comes back as
 * a Number object: Python's json reads it as a float, which a chat template writes as 1.0 (tojson)
 * where a JavaScript number would give 1. The chat template renderer takes such objects as floats.
 */
export function parseJsonKeepingFloats(text: string): unknown {
  const plain: unknown = JSON.parse(text)
  if (!/\d[.eE]/.test(text)) return plain
  const tag = `\u0000float-${Math.random().toString(36).slice(2)}:`
  const marked = text.replace(JSON_STRING_OR_NUMBER, (token) =>
    token.startsWith('"') || !/[.eE]/.test(token) || !Number.isInteger(Number(token)) ? token : JSON.stringify(tag + token),
  )
  return JSON.parse(marked, (_key, value: unknown) =>
    typeof value === 'string' && value.startsWith(tag) ? new Number(Number(value.slice(tag.length))) : value,
  )
}

/** A parsed chat template whose renders are bounded in time, output size and range(). */
export class ChatTemplate {
  /** The source with its line ends made "\n", as Jinja reads a template: a Windows file renders as any other. */
  private readonly text: string

  constructor(
    readonly source: string,
    /** Where it came from, for error messages ("the chat template of <dir>"). */
    readonly origin: string,
  ) {
    // Parsed here, on the caller's thread: a template of megabytes would take seconds and gigabytes.
    if (source.length > MAX_TEMPLATE_CHARS)
      throw new Error(`Expected a template of at most ${MAX_TEMPLATE_CHARS} characters for ${origin} but received ${source.length} characters`)
    this.text = source.replace(/\r\n?/g, '\n')
    try {
      new Template(this.text)
    } catch (err) {
      // The parser's own errors say what is wrong; a TypeError is the parser tripping over
      // input it did not expect (an unterminated tag), whose message would name its internals.
      const reason = err instanceof TypeError ? 'it is not a valid Jinja template (an unterminated or malformed tag?)' : (err as Error).message
      throw new Error(`Could not parse ${origin}: ${reason}`)
    }
    renderWorker()
  }

  /** The origin as the subject of a sentence. */
  private get subject(): string {
    return this.origin.charAt(0).toUpperCase() + this.origin.slice(1)
  }

  /** The template's text for `variables` (plain JSON-like data). */
  render(variables: Record<string, unknown>): string {
    const given = textSize(variables)
    if (given > MAX_RENDERED_CHARS)
      throw new Error(`Expected at most ${MAX_RENDERED_CHARS} characters of messages for ${this.origin} but received ${given} characters`)
    const w = renderWorker()
    waitUntilReady(w)
    Atomics.store(w.flags, 0, 0)
    try {
      w.port.postMessage({ source: this.text, variables })
    } catch (err) {
      throw new Error(`Could not pass the variables to ${this.origin}: ${(err as Error).message}`)
    }
    if (Atomics.wait(w.flags, 0, 0, RENDER_TIMEOUT_MS) === 'timed-out') {
      stopWorker(w)
      throw new Error(
        `${this.subject} did not finish rendering within ${RENDER_TIMEOUT_MS / 1000} s ` +
          `(a loop that runs too long, or output beyond the renderer's ${WORKER_HEAP_MB} MiB of memory)`,
      )
    }
    const reply = receiveMessageOnPort(w.port)?.message as { text?: string; error?: string; tooLong?: number } | undefined
    if (!reply) {
      stopWorker(w)
      throw new Error(`${this.subject}: the renderer signalled a result but sent none`)
    }
    if (reply.tooLong !== undefined)
      throw new Error(`${this.subject} rendered ${reply.tooLong} characters; at most ${MAX_RENDERED_CHARS} are allowed`)
    if (reply.error !== undefined) throw new Error(`${this.subject} failed to render: ${reply.error}`)
    return reply.text!
  }
}
