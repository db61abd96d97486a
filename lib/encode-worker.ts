// Encoding text off the calling thread. A tokenizer's normalizer and pre-tokenizer run regular
// expressions from tokenizer.json over the whole text: about 1 µs a character for a byte-level
// BPE, so 0.3 s for a 512 KB prompt, during which the thread does nothing else. On the server that
// thread also feeds the decode steps of every running request, so each of their streams would
// stall for as long. And a pathological expression (nested quantifiers) can take for ever.
//
// So a tokenizer can hand encoding to a worker thread of its own, which builds the same library
// tokenizer from the same tokenizer.json text and options (the same code, hence the same ids):
// callers get a promise, requests are encoded one at a time in arrival order, and one that runs
// longer than its time limit is stopped by terminating the worker (which the next request
// replaces). The worker starts at the first request (about 0.05 s for the shipped tokenizer, more
// for a 150k-token vocabulary) and holds the process open only while it has work.
import { createRequire } from 'node:module'
import { EvalWorker } from './eval-worker.js'

/** How long one text may take to encode, unless the caller says otherwise. */
export const ENCODE_TIMEOUT_MS = 10_000
/** How long the worker may take to build its tokenizer. */
const STARTUP_TIMEOUT_MS = 60_000
/**
 * A text its caller stopped waiting for is abandoned after this long on the worker: the worker
 * is stopped and replaced (0.05 s for the shipped tokenizer, about a second for a 150k-token
 * vocabulary), so that the texts behind it need not wait for it. Shorter ones finish.
 */
const ABANDON_AFTER_MS = 200
/** The longest error message the worker passes on. */
const MAX_ERROR_CHARS = 2000

// The worker's code (EvalWorker). Ids come back as an Int32Array, -1 where the library gave no id.
const WORKER_SOURCE = `
const { workerData } = require('node:worker_threads')
const { Tokenizer } = require(workerData.libraryPath)
const port = workerData.port
const json = JSON.parse(workerData.json)
const tokenizer = new Tokenizer({ ...json, added_tokens: json.added_tokens ?? [] }, workerData.options)
port.on('message', ({ text, addSpecialTokens }) => {
  try {
    const ids = tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids
    const out = new Int32Array(ids.length)
    for (let i = 0; i < ids.length; i++) out[i] = typeof ids[i] === 'number' ? ids[i] : -1
    port.postMessage({ ids: out }, [out.buffer])
  } catch (err) {
    const text = err && err.message ? String(err.message) : String(err)
    port.postMessage({ error: text.length > ${MAX_ERROR_CHARS} ? text.slice(0, ${MAX_ERROR_CHARS}) + '... (' + text.length + ' characters)' : text })
  }
})
port.postMessage({ ready: true })
`

/** What the worker builds its tokenizer from: tokenizer.json's text and the library's options. */
export interface EncoderSource {
  /** tokenizer.json as read (parsed again in the worker). */
  json: string
  /** The second argument of the library's Tokenizer constructor (plain JSON data). */
  options: Record<string, unknown>
  /** The file, for messages. */
  file: string
}

export interface EncodeRequestOptions {
  /** Stop waiting (the promise rejects with the signal's reason; a text not yet started is dropped). */
  signal?: AbortSignal
  /** Milliseconds this text may take to encode once the worker starts on it (default ENCODE_TIMEOUT_MS). */
  timeoutMs?: number
}

/** Encoding took longer than its limit: the text is too long, or the tokenizer's expressions backtrack without end. */
export class EncodeTimeoutError extends Error {
  constructor(file: string, chars: number, ms: number) {
    super(
      `Encoding a text of ${chars} characters took longer than ${ms / 1000} s and was stopped: the text is too long ` +
        `for this limit, or a regular expression of ${file} (normalizer or pre_tokenizer) backtracks without end on it`,
    )
    this.name = 'EncodeTimeoutError'
  }
}

interface Pending {
  text: string
  addSpecialTokens: boolean
  timeoutMs: number
  signal: AbortSignal | undefined
  onAbort: (() => void) | undefined
  settled: boolean
  resolve: (ids: Int32Array) => void
  reject: (err: unknown) => void
}

interface Running {
  thread: EvalWorker<Reply>
  ready: boolean
  /** The request the worker is on, when it went there, and its timer. */
  current: Pending | null
  since: number
  timer: NodeJS.Timeout | undefined
}

type Reply = { ready?: true; ids?: Int32Array; error?: string }

/** One worker thread that encodes texts for one tokenizer, in arrival order. */
export class EncodeWorker {
  private running: Running | null = null
  private readonly queue: Pending[] = []
  private closed = false

  constructor(private readonly source: EncoderSource) {}

  /**
   * The library's ids of `text`, -1 where it gave none. Rejects with EncodeTimeoutError past the
   * time limit, with the signal's reason when aborted, and with the library's error otherwise.
   */
  encode(text: string, addSpecialTokens: boolean, options: EncodeRequestOptions = {}): Promise<Int32Array> {
    if (this.closed) return Promise.reject(new Error('The tokenizer was closed and cannot encode any more'))
    const { signal, timeoutMs = ENCODE_TIMEOUT_MS } = options
    if (signal?.aborted) return Promise.reject(signal.reason)
    return new Promise<Int32Array>((resolve, reject) => {
      const request: Pending = { text, addSpecialTokens, timeoutMs, signal, onAbort: undefined, settled: false, resolve, reject }
      if (signal) {
        request.onAbort = () => {
          const waiting = this.queue.indexOf(request)
          if (waiting >= 0) this.queue.splice(waiting, 1)
          this.settle(request, () => reject(signal.reason))
          // A text the worker has been on for a while is abandoned with its worker; a short one finishes, unread.
          const r = this.running
          if (r?.current === request && performance.now() - r.since > ABANDON_AFTER_MS) {
            this.stop(r)
            this.next()
          }
        }
        signal.addEventListener('abort', request.onAbort, { once: true })
      }
      this.queue.push(request)
      this.next()
    })
  }

  /** Stops the worker; requests not yet answered reject, with `reason` when given. */
  close(reason?: Error): void {
    if (this.closed) return
    this.closed = true
    const err = reason ?? new Error('The tokenizer was closed before the text was encoded')
    const r = this.running
    const current = r?.current
    if (current) this.settle(current, () => current.reject(err))
    for (const request of this.queue.splice(0)) this.settle(request, () => request.reject(err))
    if (r) this.stop(r)
  }

  /** Calls `settle` once for a request, after detaching its abort listener. */
  private settle(request: Pending, done: () => void): void {
    if (request.settled) return
    request.settled = true
    if (request.onAbort) request.signal!.removeEventListener('abort', request.onAbort)
    done()
  }

  private next(): void {
    if (this.closed || (!this.queue.length && !this.running)) return
    const r = this.running ?? this.start()
    if (!r.ready || r.current) return
    const request = this.queue.shift()
    if (!request) return r.thread.idle()
    r.current = request
    r.since = performance.now()
    r.timer = setTimeout(() => {
      // An answer posted before the limit but not yet read (this thread was busy) still counts.
      const posted = r.thread.takePosted()
      if (posted) return this.onReply(r, posted)
      this.stop(r)
      this.settle(request, () => request.reject(new EncodeTimeoutError(this.source.file, request.text.length, request.timeoutMs)))
      this.next()
    }, request.timeoutMs)
    r.thread.post({ text: request.text, addSpecialTokens: request.addSpecialTokens })
  }

  private onReply(r: Running, message: Reply): void {
    // A worker that was stopped (time limit, abandoned text) may have posted an answer before it was.
    if (this.running !== r) return
    if (message.ready) {
      r.ready = true
    } else {
      const request = r.current!
      clearTimeout(r.timer)
      r.current = null
      this.settle(request, () =>
        message.ids ? request.resolve(message.ids) : request.reject(new Error(`${this.source.file} failed to encode the text (the tokenizer library said: ${message.error})`)),
      )
    }
    this.next()
  }

  private start(): Running {
    const libraryPath = createRequire(import.meta.url).resolve('@huggingface/tokenizers')
    const thread = new EvalWorker<Reply>({
      source: WORKER_SOURCE,
      data: { libraryPath, json: this.source.json, options: this.source.options },
      name: "The tokenizer's worker thread",
      exitedBefore: 'the text was encoded',
      startupTimeoutMs: STARTUP_TIMEOUT_MS,
      quiet: false,
      onReply: (reply) => this.onReply(r, reply),
      onFail: (err) => this.fail(r, err),
    })
    const r: Running = { thread, ready: false, current: null, since: 0, timer: undefined }
    this.running = r
    return r
  }

  /** A worker that died or would not start: its request fails, and so does the queue when it never started. */
  private fail(r: Running, err: Error): void {
    if (this.running !== r) return
    const request = r.current
    this.stop(r)
    if (request) this.settle(request, () => request.reject(err))
    // Requests that were waiting for a worker that never became ready would wait for the next one, which would fail alike.
    if (!r.ready) for (const request of this.queue.splice(0)) this.settle(request, () => request.reject(err))
    else if (this.queue.length) this.next()
  }

  private stop(r: Running): void {
    if (this.running === r) this.running = null
    clearTimeout(r.timer)
    r.current = null
    r.thread.stop()
  }
}
