// The HTTP server of `detinfer serve`: OpenAI's /v1/completions, /v1/chat/completions and
// /v1/models, plus /health and /metrics, over one loaded Model.
//
// Fastify validates every body against lib/server/schemas.ts before a handler runs; every error
// becomes OpenAI's {error: {message, type, param, code}} (lib/server/errors.ts). Each choice of a
// request is one library generation (Model.stream with an AbortSignal), so a request's answer is
// what the library gives that prompt alone, whatever else the server is doing.
import { randomInt, randomUUID, timingSafeEqual } from 'node:crypto'
import cors from '@fastify/cors'
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import { describeValue, GrammarError, LogitProcessorTableError, RequestTooLargeError, isPlainObject } from '../errors.js'
import { EncodeTimeoutError } from '../encode-worker.js'
import { parseJsonKeepingFloats } from '../chat-template.js'
import type { Model } from '../api.js'
import type { ChatMessage, ChatTemplateVariables } from '../tokenizer.js'
import { REQUEST_TEMPLATE_VARIABLES, type GenerateOptions, type StopReason, type StreamPiece } from '../generate.js'
import { ApiError, contextLengthExceeded, invalidRequest, overloaded, toApiError, unavailable } from './errors.js'
import { ServerMetrics } from './metrics.js'
import {
  characters,
  completionResponse,
  streamChunk,
  tokenPieces,
  toolCallChunk,
  usageChunk,
  TokenTexts,
  type Endpoint,
  type FinishReason,
  type FinishedChoice,
  type PromptRecord,
  type ResponseHeader,
  type TokenRecord,
  type Usage,
} from './openai.js'
import {
  chatCompletionBody,
  completionBody,
  detokenizeBody,
  tokenizeBody,
  type ChatCompletionBody,
  type CompletionBody,
  type ResponseFormatBody,
  type StructuredOutputsBody,
  type DetokenizeBody,
  type TokenizeBody,
  type ToolBody,
} from './schemas.js'
import { forcedToolCallSchema, parseToolCalls, strictHermesCallsFormat, strictLlamaCallsFormat, toolCallId, withIds, ToolCallStream, type ForcedToolChoice, type ToolCall, type ToolCallParser, type ToolCallReader } from './tool-calls.js'
import type { SamplingDefaults } from './generation-config.js'

/** Seeds of the sampling noise are 32-bit: a request's seed is taken modulo 2^32. */
const SEEDS = 2 ** 32
/** max_tokens of /v1/completions when the request gives none (OpenAI's default). */
const DEFAULT_COMPLETION_TOKENS = 16
/** OpenAI's default temperature: sampling, with a seed chosen and reported when none is given. */
const DEFAULT_TEMPERATURE = 1

export interface ServerOptions {
  /** The name clients pass as `model` (GET /v1/models lists it). */
  modelName: string
  /** Requests need `Authorization: Bearer <apiKey>` on /v1/* when set. */
  apiKey?: string
  /** Sequences allowed to wait for a place in the running batch; more get 429. */
  maxQueued: number
  /** Largest request body in bytes. */
  bodyLimit: number
  /** Seconds a client is told to wait after a 429. */
  retryAfterSeconds?: number
  /**
   * How chat answers are read for tool calls (`--tool-call-parser`); without it, requests that
   * let the model call tools are refused.
   */
  toolCallParser?: ToolCallParser
  /** Chat template variables of every chat request, under those the request gives (`--default-chat-template-kwargs`). */
  defaultChatTemplateKwargs?: ChatTemplateVariables
  /** Origins whose browser pages may call the server (CORS, `--allowed-origins`), or '*' for any; none when absent. */
  allowedOrigins?: string[] | '*'

  /**
   * What a request that leaves out temperature, top_p, top_k, min_p or repetition_penalty gets
   * instead of OpenAI's defaults, and the most max_tokens any request gets: the model's
   * generation_config.json (`--generation-config auto`).
   */
  samplingDefaults?: SamplingDefaults
}

interface Loaded {
  model: Model
  fingerprint: string
  texts: TokenTexts
  created: number
}

/** What the handlers share: the model once loaded, the sequences in flight, shutdown. */
export class InferenceServer {
  readonly app: FastifyInstance
  readonly metrics = new ServerMetrics()
  private loaded: Loaded | null = null
  private closing = false
  private inFlight = 0
  private readonly shutdownAbort = new AbortController()

  constructor(readonly options: ServerOptions) {
    this.app = Fastify({
      logger: false,
      bodyLimit: options.bodyLimit,
      return503OnClosing: false,
      // On close, idle keep-alive connections go at once; those with a request in flight finish it.
      forceCloseConnections: 'idle',
      // A request (headers and body) must have arrived within this, so that connections holding a
      // half-sent body cannot pin memory or hold up the shutdown; answers may take any time.
      requestTimeout: REQUEST_TIMEOUT_MS,
      // Requests that are not valid HTTP are answered in the API's error format too.
      clientErrorHandler: (err, socket) => {
        if (!socket.writable) return void socket.destroy()
        const tooLarge = (err as NodeJS.ErrnoException).code === 'HPE_HEADER_OVERFLOW'
        const status = tooLarge ? 431 : 400
        const body = JSON.stringify(
          new ApiError(status, `The request is not valid HTTP: ${err.message}`, 'invalid_request_error', null, tooLarge ? 'headers_too_large' : 'bad_http').body(),
        )
        socket.end(
          `HTTP/1.1 ${status} ${tooLarge ? 'Request Header Fields Too Large' : 'Bad Request'}\r\ncontent-type: application/json\r\n` +
            `content-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
        )
      },
      ajv: { customOptions: { removeAdditional: false, coerceTypes: false, useDefaults: false, allErrors: false, verbose: true, allowUnionTypes: true } },
    })
    // Before the CORS plugin adds its OPTIONS route, which keeps the error handler of when it was added.
    this.app.setErrorHandler((err, request, reply) => {
      const e = toApiError(err)
      if (!(err instanceof ApiError) && e.status >= 500) process.stderr.write(`detinfer serve: ${request.method} ${request.url} failed: ${(err as Error)?.stack ?? err}\n`)
      void reply.code(e.status).headers(e.headers).send(e.body())
    })
    // Browsers' cross-origin requests (a web page calling the server), from the origins given only.
    // The CORS hook runs before the server's own (routes() once the plugin has loaded) and sets the
    // headers, so that every answer to an allowed origin, errors included, carries
    // Access-Control-Allow-Origin; the server's hook then answers preflights itself (preflight()).
    if (options.allowedOrigins) {
      void this.app.register(cors, {
        origin: options.allowedOrigins === '*' ? '*' : options.allowedOrigins,
        methods: ['GET', 'POST'],
        // The headers a preflight names are allowed (as vLLM allows any): clients send their own,
        // such as the openai package's x-stainless-*, and a header left out fails the request.
        // Access stays by origin, and the API key is checked on the request itself.
        maxAge: 600,
        // The plugin would answer a preflight (or refuse one in plain text) before the shutdown
        // is checked: it only sets the headers, and preflight() answers.
        preflightContinue: true,
        strictPreflight: false,
      })
      void this.app.after(() => this.routes())
    } else {
      this.routes()
    }
  }

  /** Serves `model` from now on (until then /health answers 503 and /v1/* 503). */
  setModel(model: Model, fingerprint: string): void {
    this.loaded = { model, fingerprint, texts: new TokenTexts(model), created: Math.floor(Date.now() / 1000) }
    this.metrics.attach(model)
    // Prompts are encoded in the tokenizer's worker thread: one text now has it build its
    // tokenizer (a second or so for a 150k-token vocabulary) before the first request.
    model.tokenizeAsync(' ').catch(() => {})
  }

  get sequencesInFlight(): number {
    return this.inFlight
  }

  /**
   * Stops accepting requests, lets those in flight finish for `deadlineMs`, then aborts what is
   * left (a stream ends with an error event) and closes the listener.
   */
  async shutdown(deadlineMs: number): Promise<void> {
    this.closing = true
    // At the deadline the generations end (a stream gets its error event); a moment later every
    // connection still open goes, such as one whose request never finished arriving.
    let closeAll: NodeJS.Timeout | undefined
    const timer = setTimeout(() => {
      this.shutdownAbort.abort(unavailable('The server shut down before the request finished', 'shutting_down'))
      closeAll = setTimeout(() => this.app.server.closeAllConnections(), CLOSE_GRACE_MS)
    }, deadlineMs)
    // A connection whose request finished after close() began stays open as keep-alive: close those as they go idle.
    const sweep = setInterval(() => this.app.server.closeIdleConnections(), 50)
    try {
      await this.app.close()
    } finally {
      clearTimeout(timer)
      clearTimeout(closeAll)
      clearInterval(sweep)
    }
  }

  // -------------------------------------------------------------------------------------------
  // Routes

  private routes(): void {
    const app = this.app
    // A known path asked with another method gets 405 and the methods it takes, as vLLM answers.
    const methods = new Map<string, string[]>()
    app.addHook('onRoute', (route) => {
      if (route.url.includes('*')) return
      for (const m of [route.method].flat()) if (m !== 'HEAD' && m !== 'OPTIONS') methods.set(route.url, [...(methods.get(route.url) ?? []), m])
    })
    app.setNotFoundHandler((request, reply) => {
      const path = request.url.split('?')[0]!
      const allowed = methods.get(path)
      if (allowed) {
        const e = new ApiError(405, `Method ${request.method} is not allowed for ${path}; it takes ${allowed.join(', ')}`, 'invalid_request_error', null, 'method_not_allowed')
        return void reply.code(405).header('allow', allowed.join(', ')).send(e.body())
      }
      const e = new ApiError(404, `No route ${request.method} ${path}`, 'invalid_request_error', null, 'not_found')
      void reply.code(404).send(e.body())
    })
    // JSON bodies through JSON.parse, whose objects take "__proto__" and "constructor" as plain keys,
    // which the schemas then refuse as unknown parameters by name; and no text/plain parser, so
    // that a body of another type gets 415 instead of a string the schemas refuse. A body without
    // a Content-Type (Python's `requests.post(url, data=json.dumps(body))`) is read as JSON, as
    // vLLM's server (FastAPI) reads it. The tools and chat_template_kwargs reach the chat template
    // with their floats kept as floats (1.0 stays 1.0), as Python's json reads them for vLLM.
    app.removeAllContentTypeParsers()
    const parseJson = (body: string, done: (err: Error | null, body?: unknown) => void) => {
      try {
        done(null, keepTemplateFloats(JSON.parse(body), body))
      } catch (err) {
        done(invalidRequest(`Could not parse the request body as JSON: ${(err as Error).message}`, null, 'invalid_json'), undefined)
      }
    }
    app.addContentTypeParser('application/json', { parseAs: 'string' }, (_request, body, done) => parseJson(body as string, done))
    app.addContentTypeParser('*', { parseAs: 'string' }, (request, body, done) => {
      const type = request.headers['content-type']
      if (type === undefined) return parseJson(body as string, done)
      done(
        new ApiError(415, `Expected a request body of type application/json but received ${JSON.stringify(type)}`, 'invalid_request_error', null, 'unsupported_media_type'),
        undefined,
      )
    })
    app.addHook('onRequest', async (request, reply) => {
      if (this.closing) {
        void reply.header('connection', 'close')
        throw unavailable('The server is shutting down', 'shutting_down')
      }
      if (this.options.allowedOrigins && request.method === 'OPTIONS') return this.preflight(request, reply)
      // By the route the router matched, not the raw URL: the router decodes percent-escapes, so
      // /%76%31/models is /v1/models. Every route but the open ones needs the key, unknown ones too.
      if (!OPEN_ROUTES.has(request.routeOptions.url ?? '')) this.authorize(request)
    })
    // (A completion whose client went away is counted by complete(), as 499.)
    app.addHook('onResponse', async (request, reply) => {
      if (reply.statusCode !== 499) this.metrics.requests.inc({ endpoint: request.routeOptions.url ?? 'unknown', status: String(reply.statusCode) })
    })

    app.get('/health', async (_request, reply) => {
      if (!this.loaded) return reply.code(503).send({ status: 'loading' })
      return { status: 'ok', model: this.options.modelName, system_fingerprint: this.loaded.fingerprint }
    })
    app.get('/metrics', async (_request, reply) => {
      void reply.header('content-type', this.metrics.registry.contentType)
      return this.metrics.registry.metrics()
    })
    app.get('/v1/models', async () => ({ object: 'list', data: [this.modelObject()] }))
    // The rest of the path, slashes included: a served name may be "org/model".
    app.get<{ Params: { '*': string } }>('/v1/models/*', async (request) => {
      const model = this.modelObject()
      if (request.params['*'] !== model.id) throw modelNotFound(request.params['*'], model.id)
      return model
    })
    // vLLM's tokenizer routes (lm-evaluation-harness's remote tokenizer uses them): the served
    // model's own tokenization, so that a client counts and builds prompts as the server will.
    app.post('/tokenize', { schema: { body: tokenizeBody } }, async (request) => this.tokenize(request.body as TokenizeBody))
    app.post('/detokenize', { schema: { body: detokenizeBody } }, async (request) => this.detokenize(request.body as DetokenizeBody))
    app.get('/tokenizer_info', async () => this.tokenizerInfo())
    app.post('/v1/completions', { schema: { body: completionBody } }, (request, reply) =>
      this.complete('completions', request, reply),
    )
    app.post('/v1/chat/completions', { schema: { body: chatCompletionBody } }, (request, reply) =>
      this.complete('chat', request, reply),
    )
  }

  private async tokenize(body: TokenizeBody) {
    const loaded = this.ready()
    const { model } = loaded
    if (body.model !== undefined && body.model !== this.options.modelName) throw modelNotFound(body.model, this.options.modelName)
    if ((body.prompt === undefined) === (body.messages === undefined))
      throw invalidRequest(
        `Expected exactly one of prompt (a text) and messages (a conversation) but received ${body.prompt === undefined ? 'neither' : 'both'}`,
        body.prompt === undefined ? 'prompt' : 'messages',
        'invalid_value',
      )
    let tokens: number[]
    if (body.messages !== undefined) {
      // A chat template places its own special tokens; adding BOS on top is not offered.
      if (body.add_special_tokens === true)
        throw invalidRequest('Expected false or null for add_special_tokens with messages (the chat template places its special tokens) but received true', 'add_special_tokens', 'invalid_value')
      const source = this.chatPrompt(
        {
          messages: body.messages,
          chat_template_kwargs: body.chat_template_kwargs ?? null,
          tools: body.tools ?? null,
          add_generation_prompt: body.add_generation_prompt ?? null,
          continue_final_message: body.continue_final_message ?? null,
        },
        loaded,
      )
      tokens = await this.encodeSource(source, 'messages', loaded, undefined)
    } else {
      // What only a conversation uses would be dropped without a word: refused instead.
      for (const key of ['tools', 'chat_template_kwargs', 'add_generation_prompt', 'continue_final_message'] as const)
        if (body[key] !== undefined && body[key] !== null)
          throw invalidRequest(`Unsupported request argument supplied: ${key} (it applies to messages, not to a prompt)`, key, 'unsupported_parameter')
      this.checkTextSize([body.prompt!], 'prompt', loaded)
      const source: TextSource = { text: body.prompt!, name: 'prompt', ...(body.add_special_tokens === false && { addSpecialTokens: false as const }) }
      tokens = await this.encodeSource(source, 'prompt', loaded, undefined)
    }
    return { count: tokens.length, max_model_len: model.contextLength, tokens }
  }

  private detokenize(body: DetokenizeBody) {
    const { model } = this.ready()
    if (body.model !== undefined && body.model !== this.options.modelName) throw modelNotFound(body.model, this.options.modelName)
    const bad = body.tokens.findIndex((id) => id >= model.vocabSize)
    if (bad >= 0)
      throw invalidRequest(`Expected an integer between 0 and ${model.vocabSize - 1} for tokens[${bad}] but received ${body.tokens[bad]} of type number`, 'tokens', 'invalid_value')
    return { prompt: model.detokenize(body.tokens) }
  }

  /** The tokenizer's special tokens and chat template, as vLLM's /tokenizer_info gives them. */
  private tokenizerInfo() {
    const { model } = this.ready()
    const special = model.specialTokens
    return {
      tokenizer_class: 'PreTrainedTokenizerFast',
      bos_token: special['bos_token'] ?? null,
      eos_token: special['eos_token'] ?? null,
      pad_token: special['pad_token'] ?? null,
      unk_token: special['unk_token'] ?? null,
      chat_template: model.chatTemplate,
      model_max_length: model.contextLength,
    }
  }

  /**
   * Answers a CORS preflight (whose headers the plugin set) before the API key is checked: a
   * browser sends no credentials in one.
   */
  private preflight(request: FastifyRequest, reply: FastifyReply): FastifyReply {
    const missing = ['Origin', 'Access-Control-Request-Method'].filter((h) => request.headers[h.toLowerCase()] === undefined)
    if (missing.length)
      throw invalidRequest(`Expected the headers Origin and Access-Control-Request-Method in a CORS preflight (OPTIONS) but received no ${missing.join(' and no ')}`, null, 'invalid_preflight')
    // Safari waits for a body after a 204 without Content-Length.
    return reply.code(204).header('content-length', '0').send()
  }

  private authorize(request: FastifyRequest): void {
    const key = this.options.apiKey
    if (!key) return
    const header = request.headers.authorization ?? ''
    const given = Buffer.from(header.startsWith('Bearer ') ? header.slice(7) : '')
    const wanted = Buffer.from(key)
    if (given.length !== wanted.length || !timingSafeEqual(given, wanted))
      throw new ApiError(
        401,
        header ? 'Incorrect API key provided' : 'Missing API key: send the header Authorization: Bearer <key>',
        'authentication_error',
        null,
        'invalid_api_key',
      )
  }

  /** The served model as GET /v1/models lists it. */
  private modelObject() {
    const { model, created } = this.ready()
    return { id: this.options.modelName, object: 'model', created, owned_by: 'detinfer', max_model_len: model.contextLength }
  }

  private ready(): Loaded {
    if (!this.loaded) throw unavailable('The model is still loading; GET /health answers 200 once it is ready', 'model_loading')
    return this.loaded
  }

  // -------------------------------------------------------------------------------------------
  // Completions

  private async complete(endpoint: Endpoint, request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const arrived = performance.now()
    const loaded = this.ready()
    const body = request.body as CompletionBody | ChatCompletionBody
    const draft = this.draft(endpoint, body, loaded)
    const choices = draft.prompts.length * draft.n
    // The queue: whatever exceeds the running batch waits; beyond maxQueued waiting, refuse.
    const capacity = loaded.model.maxBatchSize + this.options.maxQueued
    if (choices > capacity) {
      const n = draft.n
      throw invalidRequest(
        `Expected at most ${capacity} choices (n times prompts: the sequences that can run or wait at once) but the request ` +
          `asks for ${choices} (${choices / n} prompt${choices / n === 1 ? '' : 's'} times n = ${n})`,
        n > 1 ? 'n' : 'prompt',
        'too_many_choices',
      )
    }
    if (this.inFlight + choices > capacity)
      throw overloaded(
        `The server is at capacity (${this.inFlight} sequences in flight, ${this.options.maxQueued} may wait); retry later`,
        this.options.retryAfterSeconds ?? 1,
      )
    this.inFlight += choices

    // A client that goes away aborts its generations at the next step; so does the shutdown deadline,
    // and so does a failure of one of the request's other choices.
    const disconnect = new AbortController()
    const failed = new AbortController()
    reply.raw.on('close', () => {
      if (!reply.raw.writableFinished) disconnect.abort(new ClientGone())
    })
    const signal = AbortSignal.any([disconnect.signal, this.shutdownAbort.signal, failed.signal])
    const head: ResponseHeader = {
      id: `${endpoint === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID().replace(/-/g, '')}`,
      created: Math.floor(Date.now() / 1000),
      model: this.options.modelName,
      system_fingerprint: loaded.fingerprint,
      ...(draft.seed !== undefined && { seed: draft.seed }),
    }
    const route = endpoint === 'chat' ? '/v1/chat/completions' : '/v1/completions'
    const stopTimer = this.metrics.requestDuration.startTimer({ endpoint: route })
    try {
      const prompts = await this.promptIds(endpoint, draft, loaded, signal)
      // One echo failing ends the others' scoring too (the request's places are freed when it ends).
      const echoes = await Promise.all(prompts.map((ids, p) => (draft.echo ? this.echo(draft, p, ids, loaded, signal) : null))).catch((err) => {
        failed.abort(err)
        throw err
      })
      // A schema the server cannot build a grammar of is refused here, before a stream's headers go
      // out (the grammar is kept: the choices build theirs from it at once). A forced call's
      // grammar comes from the tools (the request may have sent no response_format).
      if (draft.options.responseFormat)
        await loaded.model.checkResponseFormat(draft.options.responseFormat).catch((err: unknown) => {
          if (!(err instanceof GrammarError)) throw err
          if (draft.toolCalls?.format) throw invalidRequest(`The tools' parameters cannot hold a call: ${err.message}`, 'tools', 'invalid_value')
          if (body.structured_outputs) throw invalidRequest(err.message, 'structured_outputs', 'invalid_value')
          throw err
        })
      const plan = this.plan(endpoint, draft, prompts, echoes, loaded)
      // The library checks the options here, before a stream's headers go out.
      const run: ChoiceRun = { loaded, plan, head, signal, failed, arrived, streams: [] }
      run.streams = plan.choices.map((c) => (c.options.maxTokens === 0 ? noPieces() : loaded.model.stream(c.prompt, { ...c.options, signal })))
      if (plan.stream) await this.streamAnswer(endpoint, run, reply)
      else await this.wholeAnswer(endpoint, run, reply)
    } catch (err) {
      throw err instanceof ApiError ? err : this.generationError(err, signal)
    } finally {
      this.inFlight -= choices
      stopTimer()
      // No response reaches a client that went away, so no onResponse counts it.
      if (disconnected(signal)) this.metrics.requests.inc({ endpoint: route, status: '499' })
    }
  }

  /**
   * Checks a validated body against the model, all but its prompts' tokens: those are encoded
   * off the event loop (promptIds) once the request has its place.
   */
  private draft(endpoint: Endpoint, body: CompletionBody | ChatCompletionBody, loaded: Loaded): Draft {
    const { model } = loaded
    if (body.model !== this.options.modelName) throw modelNotFound(body.model, this.options.modelName)
    const prompts = endpoint === 'chat' ? [this.chatPrompt(body as ChatCompletionBody, loaded)] : this.textPrompts(body as CompletionBody, loaded)
    const n = body.n ?? 1
    // OpenAI's API and vLLM refuse it too: without stream, include_usage would be dropped without a word.
    if (body.stream !== true && body.stream_options !== undefined && body.stream_options !== null)
      throw invalidRequest(
        `Expected stream: true with stream_options (it applies to streamed answers only) but received stream: ${JSON.stringify(body.stream ?? null)}`,
        'stream_options',
        'invalid_value',
      )
    const defaults = this.options.samplingDefaults ?? {}
    const temperature = body.temperature ?? defaults.temperature ?? DEFAULT_TEMPERATURE
    // A default top_k past the vocabulary is no limit, as one at its size is.
    const topK = body.top_k ?? Math.min(defaults.topK ?? 0, model.vocabSize)
    const topP = body.top_p ?? defaults.topP
    const minP = body.min_p ?? defaults.minP
    const repetitionPenalty = body.repetition_penalty ?? defaults.repetitionPenalty ?? 1
    const badStop = (body.stop_token_ids ?? []).findIndex((id) => id >= model.vocabSize)
    if (badStop >= 0)
      throw invalidRequest(
        `Expected an integer between 0 and ${model.vocabSize - 1} for stop_token_ids[${badStop}] but received ${body.stop_token_ids![badStop]} of type number`,
        'stop_token_ids',
        'invalid_value',
      )
    if (topK > model.vocabSize) throw invalidRequest(`Expected integer between -1 and ${model.vocabSize} for top_k but received ${topK} of type number`, 'top_k', 'invalid_value')
    // logit_bias: the schema checked the values and the count; the keys must be ids of this vocabulary.
    const logitBias = body.logit_bias ?? {}
    for (const key of Object.keys(logitBias))
      if (!/^(0|[1-9][0-9]*)$/.test(key) || Number(key) >= model.vocabSize)
        throw invalidRequest(
          `Expected token ids between 0 and ${model.vocabSize - 1} as the keys of logit_bias but received ${JSON.stringify(key)}`,
          'logit_bias',
          'invalid_value',
        )
    let seed: number | undefined
    if (temperature > 0) {
      // Any integer a JSON number holds exactly (vLLM takes 64-bit seeds, -1 among them); the
      // noise takes it modulo 2^32 (plan).
      seed = body.seed ?? randomInt(0, SEEDS)
    }
    let logprobs = false
    let topLogprobs = 0
    let toolCalls: ToolCallPlan | null = null
    if (endpoint === 'chat') {
      const chat = body as ChatCompletionBody
      toolCalls = this.toolCallPlan(chat)
      logprobs = chat.logprobs === true
      topLogprobs = chat.top_logprobs ?? 0
      if (topLogprobs > 0 && !logprobs) throw invalidRequest('Expected logprobs: true for logprobs when top_logprobs is given but received ' + String(chat.logprobs ?? 'undefined'), 'logprobs', 'invalid_value')
    } else {
      const lp = (body as CompletionBody).logprobs
      logprobs = lp !== undefined && lp !== null
      topLogprobs = lp ?? 0
    }
    const requested = endpoint === 'chat' ? ((body as ChatCompletionBody).max_completion_tokens ?? body.max_tokens) : body.max_tokens
    const echo = endpoint === 'completions' && (body as CompletionBody).echo === true
    if (requested === 0 && !echo)
      throw invalidRequest('Expected integer of at least 1 or null for max_tokens (0 only with echo: true) but received 0 of type number', 'max_tokens', 'invalid_value')
    // top_p, top_k and min_p only narrow what a sample is drawn from, which always keeps the most
    // likely token: at temperature 0 (greedy) they change nothing and are not passed on.
    const sampled = temperature > 0
    const options: GenerateOptions = {
      ...(sampled && { temperature }),
      ...(sampled && topP !== undefined && topP < 1 && { topP }),
      ...(sampled && topK > 0 && { topK }),
      ...(body.stop !== undefined && body.stop !== null && { stop: body.stop }),
      ...(body.stop_token_ids?.length && { stopTokenIds: body.stop_token_ids }),
      ...(body.ignore_eos === true && { ignoreEos: true }),
      ...(sampled && minP && { minP }),
      ...(topLogprobs > 0 && { topLogprobs }),
      // Penalties and biases apply to greedy choices too (n > 1: each choice counts its own tokens).
      ...(body.frequency_penalty && { frequencyPenalty: body.frequency_penalty }),
      ...(body.presence_penalty && { presencePenalty: body.presence_penalty }),
      ...(repetitionPenalty !== 1 && { repetitionPenalty }),
      ...(Object.keys(logitBias).length > 0 && { logitBias }),
      ...responseFormatOption(body.response_format),
      ...structuredOutputsOption(body),
      ...(toolCalls?.format && { responseFormat: toolCalls.format }),
    }
    if (options.responseFormat && body.ignore_eos === true)
      throw invalidRequest('Expected ignore_eos false or null with a response_format or structured_outputs (a complete text ends at EOS) but received true', 'ignore_eos', 'invalid_value')
    return {
      prompts,
      n,
      requested,
      options,
      logprobs,
      echo,
      stream: body.stream === true,
      includeUsage: body.stream === true && body.stream_options?.include_usage === true,
      toolCalls,
      ...(seed !== undefined && { seed }),
    }
  }

  /**
   * Whether and how the answers are read for tool calls: with tools and tool_choice "auto" (the
   * default with tools), by the server's parser; with "none", the tools are still rendered into
   * the prompt (as vLLM does) and nothing is parsed. A forced call ("required", a named function)
   * needs no parser: a grammar holds the answer to JSON calls (lib/server/tool-calls.ts), as vLLM
   * forces them.
   */
  private toolCallPlan(body: ChatCompletionBody): ToolCallPlan | null {
    const choice = body.tool_choice ?? null
    const forced = forcedChoice(body)
    if (forced) {
      const format = body.response_format?.type ?? 'text'
      if (format !== 'text')
        throw invalidRequest(`Expected response_format text or null with tool_choice ${JSON.stringify(choice)} (a forced call has its own JSON) but received ${format}`, 'response_format', 'invalid_value')
      if (body.structured_outputs)
        throw invalidRequest(`Expected no structured_outputs with tool_choice ${JSON.stringify(choice)} (a forced call has its own JSON)`, 'structured_outputs', 'invalid_value')
      const tools = (body.tools ?? []).map((t) => t.function)
      let schema: Record<string, unknown>
      try {
        schema = forcedToolCallSchema(forced, tools)
      } catch (err) {
        throw invalidRequest((err as Error).message, 'tools', 'invalid_value')
      }
      return { parser: forced, limit: Infinity, format: { type: 'json_schema', schema } }
    }
    if (!body.tools?.length || choice === 'none') return null
    if (!this.options.toolCallParser)
      throw invalidRequest(
        'Tool calling is off on this server: start it with --tool-call-parser (hermes or llama3_json) to have tool calls read from the answers ' +
          '(or send tool_choice: "none" to only show the tools to the model)',
        'tools',
        'unsupported_parameter',
      )
    // parallel_tool_calls: false keeps the first call. The model itself is held to one only with a
    // strict tool (below), whose calls have a grammar.
    const single = body.parallel_tool_calls === false
    const limit = single ? 1 : Infinity
    if (!body.tools.some((t) => t.function.strict === true)) return { parser: this.options.toolCallParser, limit }
    // A strict tool: the calls the model writes are held to the tools' parameters, in the parser's format.
    if ((body.response_format?.type ?? 'text') !== 'text' || body.structured_outputs)
      throw invalidRequest(
        'Expected response_format text or null and no structured_outputs with strict tools (their calls have their own grammar)',
        body.structured_outputs ? 'structured_outputs' : 'response_format',
        'invalid_value',
      )
    const tools = body.tools.map((t) => t.function)
    const format = this.options.toolCallParser === 'hermes' ? strictHermesCallsFormat(tools, single) : strictLlamaCallsFormat(tools, single)
    return { parser: this.options.toolCallParser, limit, format: { type: 'structural_tag', format } }
  }

  /** The draft's prompts as token ids; texts are encoded in the tokenizer's worker thread, in turn with other requests'. */
  private async promptIds(endpoint: Endpoint, draft: Draft, loaded: Loaded, signal: AbortSignal): Promise<number[][]> {
    const ids: number[][] = []
    for (const [i, prompt] of draft.prompts.entries()) {
      if ('ids' in prompt) {
        ids.push(prompt.ids)
        continue
      }
      ids.push(await this.encodeSource(prompt, endpoint === 'chat' ? 'messages' : 'prompt', loaded, signal))
      if (!ids[i]!.length) throw invalidRequest(`Expected text of at least one token for ${prompt.name} but received ""`, 'prompt', 'invalid_value')
    }
    return ids
  }

  /** A text or a conversation as ids, encoded in the tokenizer's worker thread; its failures as the API's errors. */
  private async encodeSource(prompt: TextSource, param: string, loaded: Loaded, signal: AbortSignal | undefined): Promise<number[]> {
    try {
      const options = {
        ...(signal && { signal }),
        ...('variables' in prompt && prompt.variables && { chatTemplateVariables: prompt.variables }),
        ...('continueFinalMessage' in prompt && prompt.continueFinalMessage && { continueFinalMessage: true }),
        ...('addSpecialTokens' in prompt && prompt.addSpecialTokens === false && { addSpecialTokens: false }),
      }
      return await loaded.model.tokenizeAsync('messages' in prompt ? prompt.messages : prompt.text, options)
    } catch (err) {
      if (signal?.aborted) throw signal.reason
      if (err instanceof EncodeTimeoutError) throw invalidRequest(`Could not tokenize ${param}: ${err.message}`, param, 'tokenize_timeout')
      if ('messages' in prompt) throw invalidRequest(`Could not apply the model's chat template to messages: ${(err as Error).message}`, 'messages', 'chat_template')
      throw err
    }
  }

  /** One generation per choice: n for each prompt, each with the room its prompt leaves in the context. */
  private plan(endpoint: Endpoint, draft: Draft, prompts: number[][], echoes: (Echo | null)[], loaded: Loaded): Plan {
    const { n, requested, seed } = draft
    const choices: ChoicePlan[] = []
    prompts.forEach((ids, p) => {
      const room = loaded.model.contextLength - ids.length
      // max_tokens 0 (echo) scores the prompt alone, which may fill the context.
      if (room < (requested === 0 ? 0 : 1))
        throw contextLengthExceeded(
          `This model's maximum context length is ${loaded.model.contextLength} tokens; the prompt has ${ids.length} tokens, which leaves no room for a completion`,
          endpoint === 'chat' ? 'messages' : 'prompt',
        )
      // The sampling defaults' max_tokens (max_new_tokens) is a limit, as in vLLM: the least of
      // the request's (16 for completions, the context's rest for chat), that and the room.
      const limit = this.options.samplingDefaults?.maxTokens ?? Infinity
      const maxTokens = Math.min(requested ?? (endpoint === 'chat' ? room : DEFAULT_COMPLETION_TOKENS), limit, room)
      for (let i = 0; i < n; i++)
        choices.push({
          index: p * n + i,
          prompt: ids,
          echo: echoes[p]!,
          // Choice i samples with seed + i, modulo 2^32 like the seed itself.
          options: { ...draft.options, maxTokens, ...(seed !== undefined && { seed: (((seed % SEEDS) + SEEDS + i) % SEEDS) }) },
        })
    })
    return {
      choices,
      logprobs: draft.logprobs,
      stream: draft.stream,
      includeUsage: draft.includeUsage,
      toolCalls: draft.toolCalls,
      promptTokens: prompts.reduce((a, ids) => a + ids.length, 0),
      ...(seed !== undefined && { seed }),
    }
  }

  /**
   * Prompt p as its answer starts with echo: the text as given (token ids decoded), and with
   * logprobs its tokens, each scored given those before it by the generation's forward pass
   * (Model.score), so the log-probs are those a generation of the same tokens would report.
   */
  private async echo(draft: Draft, p: number, ids: number[], loaded: Loaded, signal: AbortSignal): Promise<Echo> {
    const source = draft.prompts[p]!
    const text = 'text' in source ? source.text : loaded.model.detokenize(ids)
    if (!draft.logprobs) return { text, records: [] }
    const { model } = loaded
    // Each token's text as generated tokens' is counted, so that text_offset points into the text.
    const pieces = tokenPieces(model, ids)
    const records: PromptRecord[] = [{ token: ids[0]!, logprob: null, top: null, text: pieces[0]! }]
    if (ids.length > 1) {
      const scored = await model.score(ids.slice(0, 1), ids.slice(1), { topLogprobs: draft.options.topLogprobs ?? 0, signal })
      scored.tokens.forEach((token, i) => records.push({ token, logprob: scored.logprobs[i]!, top: scored.topLogprobs?.[i] ?? [], text: pieces[i + 1]! }))
    }
    return { text, records }
  }

  private chatPrompt(
    body: Pick<ChatCompletionBody, 'messages' | 'chat_template_kwargs' | 'tools' | 'add_generation_prompt' | 'continue_final_message'>,
    loaded: Loaded,
  ): TextSource {
    // The prompt ends with the assistant's turn to speak, or, with continue_final_message, inside
    // the last message (an assistant's), which the answer then continues.
    const continued = body.continue_final_message === true
    if (continued && body.add_generation_prompt === true)
      throw invalidRequest(
        'Expected false or null for add_generation_prompt with continue_final_message: true (the prompt ends inside the last message) but received true',
        'add_generation_prompt',
        'invalid_value',
      )
    if (body.add_generation_prompt === false && !continued)
      throw invalidRequest(
        "Unsupported value for add_generation_prompt: false without continue_final_message: true (a chat prompt ends with the assistant's turn or inside its last message)",
        'add_generation_prompt',
        'unsupported_parameter',
      )
    if (continued && body.messages.at(-1)!.role !== 'assistant')
      throw invalidRequest(
        `Expected a last message of role 'assistant' (the text to continue) for continue_final_message: true but received one of role '${body.messages.at(-1)!.role}'`,
        'continue_final_message',
        'invalid_value',
      )
    const given = body.chat_template_kwargs ?? undefined
    for (const key of CHAT_REQUEST_VARIABLES)
      if (given && Object.hasOwn(given, key))
        throw invalidRequest(
          `Unsupported request argument supplied: chat_template_kwargs.${key} (${key === 'tools' ? "the request's tools set it" : "the request's messages and its generation prompt set it"})`,
          `chat_template_kwargs.${key}`,
          'unsupported_parameter',
        )
    // The tools as the request gives them: Qwen's and Hermes' templates write each with tojson. An
    // empty list is passed on as vLLM passes it (Llama 3.1's template writes its tool preamble for
    // any list); null or no tools leaves the variable out.
    const tools: readonly ToolBody[] | undefined = body.tools ?? undefined
    // The server's defaults, then the request's variables over them.
    const defaults = this.options.defaultChatTemplateKwargs
    const kwargs = defaults || given ? { ...defaults, ...given } : undefined
    const variables: ChatTemplateVariables | undefined = tools ? { ...kwargs, tools } : kwargs
    const messages: ChatMessage[] = body.messages.map((m, i) => {
      if (m.name !== undefined)
        throw invalidRequest(
          `Unsupported request argument supplied: messages[${i}].name (a chat template has no place for a participant's name)`,
          `messages[${i}].name`,
          'unsupported_parameter',
        )
      // As OpenAI's API and vLLM take it: content may be left out only where calls stand for it.
      if (m.content === undefined && !(m.role === 'assistant' && m.tool_calls?.length))
        throw invalidRequest(
          `Expected string, array of text parts {type: "text", text} or null for messages[${i}].content (it may be left out only of an assistant message with tool_calls) but received undefined`,
          `messages[${i}].content`,
          'missing_parameter',
        )
      if (m.tool_calls !== undefined && m.tool_calls !== null && m.role !== 'assistant')
        throw invalidRequest(
          `Unsupported request argument supplied: messages[${i}].tool_calls (only assistant messages carry tool calls)`,
          `messages[${i}].tool_calls`,
          'unsupported_parameter',
        )
      return {
        // "developer" is OpenAI's newer name for the system role; chat templates know "system".
        role: m.role === 'developer' ? 'system' : m.role,
        // An assistant message with tool calls may have null content, which templates take as ''.
        // Text parts are joined by newlines, as vLLM joins them for templates that take text.
        content: typeof m.content === 'string' ? m.content : (m.content ?? []).map((part) => part.text).join('\n'),
        ...(m.tool_call_id !== undefined && m.tool_call_id !== null && { tool_call_id: m.tool_call_id }),
        // Arguments as an object, as transformers' templates expect them (and vLLM passes them):
        // Llama 3.1's writes them with tojson, Qwen's with tojson unless they are a string.
        ...(m.tool_calls?.length && {
          tool_calls: m.tool_calls.map((c, j) => ({
            id: c.id,
            type: c.type,
            function: { name: c.function.name, arguments: toolArguments(c.function.arguments, `messages[${i}].tool_calls[${j}].function.arguments`) },
          })),
        }),
      }
    })
    const calls = messages.flatMap((m) => (m.tool_calls ?? []).map((c) => `${c.function.name}${JSON.stringify(c.function.arguments)}`))
    this.checkTextSize([...messages.map((m) => m.content), ...calls, ...(tools ? [JSON.stringify(tools)] : [])], 'messages', loaded)
    return { messages, name: 'messages', ...(variables && { variables }), ...(continued && { continueFinalMessage: true as const }) }
  }

  /**
   * Refuses text that has more tokens than the context can hold before tokenizing it, which for
   * megabytes of text would keep the tokenizer from other requests. No token is longer than the
   * vocabulary's longest, and a tokenizer's Unicode normalization (NFC, NFKC) makes text at most
   * 4 times shorter in UTF-8 (NFKC turns the 4-byte mathematical letters into ASCII ones), so the
   * text has at least bytes / (4 * longest) tokens.
   */
  private checkTextSize(texts: string[], param: string, loaded: Loaded): void {
    const bytes = texts.reduce((a, t) => a + Buffer.byteLength(t, 'utf8'), 0)
    const atLeast = Math.ceil(bytes / (4 * loaded.texts.longestTokenBytes))
    if (atLeast >= loaded.model.contextLength)
      throw contextLengthExceeded(
        `This model's maximum context length is ${loaded.model.contextLength} tokens; the prompt's ${bytes} bytes of text ` +
          `are at least ${atLeast} tokens`,
        param,
      )
  }

  private textPrompts(body: CompletionBody, loaded: Loaded): PromptSource[] {
    const { model } = loaded
    const p = body.prompt
    const list: (string | number[])[] = typeof p === 'string' ? [p] : typeof p[0] === 'number' ? [p as number[]] : (p as (string | number[])[])
    return list.map((one, i) => {
      const name = typeof p === 'string' || typeof p[0] === 'number' ? 'prompt' : `prompt[${i}]`
      if (typeof one === 'string') {
        this.checkTextSize([one], 'prompt', loaded)
        return { text: one, name }
      }
      const bad = one.findIndex((id) => id >= model.vocabSize)
      if (bad >= 0)
        throw invalidRequest(`Expected an integer between 0 and ${model.vocabSize - 1} for ${name}[${bad}] but received ${one[bad]} of type number`, 'prompt', 'invalid_value')
      return { ids: one, name }
    })
  }

  // -------------------------------------------------------------------------------------------
  // Running the choices

  /** Runs choice k of a request, handing each token to `onPiece`; a failure aborts the request's other choices. */
  private async runChoice(
    run: ChoiceRun,
    k: number,
    onPiece: (piece: { text: string; record: TokenRecord; finishReason: 'stop' | 'length' | null; stopReason: StopReason }) => void,
  ): Promise<void> {
    let last = 0
    try {
      for await (const piece of run.streams[k]!) {
        const now = performance.now()
        if (last === 0) this.metrics.timeToFirstToken.observe((now - run.arrived) / 1000)
        else this.metrics.interTokenLatency.observe((now - last) / 1000)
        last = now
        this.metrics.completionTokens.inc()
        const record = { token: piece.token, logprob: piece.logprob, top: piece.topLogprobs ?? [], text: piece.text }
        onPiece({ text: piece.text, record, finishReason: piece.finishReason ?? null, stopReason: piece.stopReason ?? null })
      }
    } catch (err) {
      if (!run.signal.aborted) run.failed.abort(err)
      throw err
    }
  }

  private async wholeAnswer(endpoint: Endpoint, run: ChoiceRun, reply: FastifyReply) {
    const { plan } = run
    const finished: FinishedChoice[] = plan.choices.map((c) => ({
      index: c.index,
      text: c.echo?.text ?? '',
      records: [...(c.echo?.records ?? [])],
      finishReason: c.options.maxTokens === 0 ? 'length' : 'stop',
      stopReason: null,
      ...(c.echo && { echoed: { records: c.echo.records.length, textLength: characters(c.echo.text) } }),
    }))
    await Promise.all(
      plan.choices.map((_, k) =>
        this.runChoice(run, k, (p) => {
          const f = finished[k]!
          f.text += p.text
          f.records.push(p.record)
          if (p.finishReason) {
            f.finishReason = p.finishReason
            f.stopReason = p.stopReason
          }
        }),
      ),
    )
    if (plan.toolCalls) for (const [k, f] of finished.entries()) this.readToolCalls(plan.toolCalls, plan.choices[k]!, f)
    this.metrics.promptTokens.inc(plan.promptTokens)
    const generated = finished.map((f, k) => f.records.length - (plan.choices[k]!.echo?.records.length ?? 0))
    await reply.send(completionResponse(endpoint, run.head, finished, plan.logprobs, run.loaded.texts, usageFromCounts(plan, generated)))
  }

  /** A whole chat answer's tool calls, when its text has any: the content becomes the text before them. */
  private readToolCalls(tools: ToolCallPlan, choice: ChoicePlan, f: FinishedChoice): void {
    const parsed = parseToolCalls(tools.parser, f.text)
    if (!parsed) return
    const generated = f.records.map((r) => r.token)
    f.toolCalls = { content: parsed.content, calls: withIds(parsed, tools.limit, (i) => toolCallId(choice.prompt, choice.index, generated, i)) }
    f.finishReason = callsFinishReason(tools, f.finishReason)
  }

  private async streamAnswer(endpoint: Endpoint, run: ChoiceRun, reply: FastifyReply) {
    const { plan, head, loaded } = run
    const res = reply.raw
    reply.hijack()
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' })
    // A client that does not read its stream would have the whole answer buffered here: past
    // MAX_UNREAD_BYTES waiting to be sent, its connection goes (and with it the generation).
    const send = (data: unknown) => {
      if (res.writableEnded || res.destroyed) return
      res.write(`data: ${JSON.stringify(data)}\n\n`)
      if (res.writableLength > MAX_UNREAD_BYTES) res.destroy()
    }
    const counts = plan.choices.map(() => 0)
    const offsets = plan.choices.map(() => 0)
    // With a tool-call parser, content goes out until a call begins; the calls come at the end.
    const toolStreams = plan.toolCalls ? plan.choices.map(() => ({ text: new ToolCallStream(plan.toolCalls!.parser), generated: [] as number[] })) : null
    // An echoed prompt comes first, as one chunk (with max_tokens 0, the last one).
    plan.choices.forEach((choice, k) => {
      if (!choice.echo) return
      const finishReason = choice.options.maxTokens === 0 ? 'length' : null
      const piece = { text: choice.echo.text, records: choice.echo.records, textOffset: 0, first: true, finishReason, stopReason: null } as const
      send(streamChunk(endpoint, head, choice.index, piece, plan.logprobs, loaded.texts, plan.includeUsage))
      offsets[k] = characters(choice.echo.text)
    })
    let failure: unknown = null
    await Promise.all(
      plan.choices.map((choice, k) =>
        this.runChoice(run, k, (p) => {
          let text = p.text
          let calls: { finishReason: FinishReason; list: ToolCall[] } | null = null
          const tools = toolStreams?.[k]
          if (tools) {
            tools.generated.push(p.record.token)
            text = tools.text.push(p.text)
            if (p.finishReason) {
              const end = tools.text.finish()
              text += end.content
              const ids = (i: number) => toolCallId(choice.prompt, choice.index, tools.generated, i)
              if (end.parsed) calls = { finishReason: callsFinishReason(plan.toolCalls!, p.finishReason), list: withIds(end.parsed, plan.toolCalls!.limit, ids) }
            }
          }
          // A token whose text is held back (an incomplete character, or what may be a tool call)
          // is sent with the next one, unless its log-probs were asked for.
          const finishReason = calls ? null : p.finishReason
          if (text || plan.logprobs || finishReason || counts[k] === 0) {
            const piece = { text, records: [p.record], textOffset: offsets[k]!, first: counts[k] === 0, finishReason, stopReason: p.stopReason }
            send(streamChunk(endpoint, head, choice.index, piece, plan.logprobs, loaded.texts, plan.includeUsage))
          }
          counts[k]!++
          offsets[k]! += characters(text)
          // The calls, each whole, then the finish reason.
          if (calls) {
            calls.list.forEach((call, i) => send(toolCallChunk(head, choice.index, { index: i, call }, null, plan.includeUsage)))
            send(toolCallChunk(head, choice.index, null, { finishReason: calls.finishReason, stopReason: p.stopReason }, plan.includeUsage))
          }
        }).catch((err) => {
          failure ??= err
        }),
      ),
    )
    const error = failure ? this.generationError(failure, run.signal) : null
    if (error && !disconnected(run.signal)) send(error.body())
    if (!error) {
      this.metrics.promptTokens.inc(plan.promptTokens)
      if (plan.includeUsage) send(usageChunk(endpoint, head, usageFromCounts(plan, counts)))
    }
    if (!res.writableEnded && !res.destroyed) {
      res.end('data: [DONE]\n\n')
      // An answer the client never takes would stay buffered as long as the connection: it gets
      // UNREAD_TIMEOUT_MS to be read.
      if (res.writableLength > 0) {
        const timer = setTimeout(() => res.destroy(), UNREAD_TIMEOUT_MS)
        res.once('finish', () => clearTimeout(timer)).once('close', () => clearTimeout(timer))
      }
    }
  }

  /** The error a failed generation answers with. */
  private generationError(err: unknown, signal: AbortSignal): ApiError {
    if (signal.aborted && signal.reason instanceof ApiError) return signal.reason
    if (err instanceof ApiError) return err
    if (err instanceof RequestTooLargeError) return contextLengthExceeded(err.message)
    if (err instanceof LogitProcessorTableError) return unavailable(err.message, 'logit_processors_unavailable')
    if (err instanceof GrammarError) return invalidRequest(err.message, 'response_format', 'invalid_value')
    if (err instanceof ClientGone) return new ApiError(499, 'The client closed the connection', 'invalid_request_error', null, 'client_closed')
    if (err instanceof TypeError && /^Expected /.test(err.message)) return invalidRequest(err.message)
    return toApiError(err)
  }
}

/** Time for a request's headers and body to arrive. */
const REQUEST_TIMEOUT_MS = 60_000
/** After the shutdown deadline, time for the streams' error events to go out before every connection is closed. */
const CLOSE_GRACE_MS = 1_000
/** A stream's bytes waiting for a client that does not read, at most. */
const MAX_UNREAD_BYTES = 64 * 2 ** 20
/** Time for a client to take the rest of a finished streamed answer. */
const UNREAD_TIMEOUT_MS = 60_000

/** Chat template variables a chat request sets itself: its messages, its generation prompt and its tools. */
export const CHAT_REQUEST_VARIABLES = [...REQUEST_TEMPLATE_VARIABLES, 'tools'] as const

/** Routes that answer without the API key. */
const OPEN_ROUTES = new Set(['/health', '/metrics'])

const modelNotFound = (asked: string, served: string) =>
  new ApiError(404, `The model ${JSON.stringify(asked)} does not exist; this server serves ${JSON.stringify(served)}`, 'invalid_request_error', 'model', 'model_not_found')

/** The request fields that reach the chat template as they are, where a float must stay a float. */
const TEMPLATE_FIELDS = ['tools', 'chat_template_kwargs'] as const

/**
 * A request body with its tools and chat_template_kwargs read again by parseJsonKeepingFloats
 * when they are there and the text has a number with a fraction or an exponent; the rest of the
 * body keeps plain numbers, which the parameters' checks expect.
 */
function keepTemplateFloats(body: unknown, text: string): unknown {
  if (!isPlainObject(body) || !/\d[.eE]/.test(text)) return body
  const present = TEMPLATE_FIELDS.filter((k) => Object.hasOwn(body, k) && typeof body[k] === 'object' && body[k] !== null)
  if (present.length === 0) return body
  const kept = parseJsonKeepingFloats(text) as Record<string, unknown>
  for (const k of present) body[k] = kept[k]
  return body
}

/** A tool call's arguments as the client sends them (a JSON text of an object; empty for none) as an object. */
function toolArguments(text: string, param: string): Record<string, unknown> {
  if (text.trim() === '') return {}
  let parsed: unknown
  try {
    // Floats stay floats (1.0), as vLLM's json.loads leaves them for the template's tojson.
    parsed = parseJsonKeepingFloats(text)
  } catch {
    parsed = undefined
  }
  // A float alone (`1.0`) comes back from parseJsonKeepingFloats as a boxed Number: an object, not a plain one.
  if (!isPlainObject(parsed))
    throw invalidRequest(`Expected a JSON object as text for ${param} but received ${JSON.stringify(text.length > 80 ? text.slice(0, 80) + '...' : text)}`, param, 'invalid_value')
  return parsed as Record<string, unknown>
}

/** The pieces of a choice that generates nothing (max_tokens 0 with echo). */
async function* noPieces(): AsyncGenerator<StreamPiece> {}

/** The reason a request's generations are aborted when its client goes away. */
class ClientGone extends Error {
  constructor() {
    super('client disconnected')
    this.name = 'ClientGone'
  }
}

/**
 * The library's responseFormat of a body's response_format: OpenAI's json_schema wraps the schema
 * with a name (and description) the grammar does not use; a json_schema without a schema is JSON
 * mode (any JSON object), as json_object; a structural tag (vLLM's) is its format.
 */
function responseFormatOption(format: ResponseFormatBody | null | undefined): Pick<GenerateOptions, 'responseFormat'> {
  if (!format || format.type === 'text') return {}
  if (format.type === 'structural_tag') return { responseFormat: { type: 'structural_tag', format: structuralTagFormat(format, 'response_format', 'response_format') } }
  if (format.type !== 'json_schema') return { responseFormat: { type: 'json_object' } }
  const { schema, strict } = format.json_schema
  if (schema === undefined || schema === null) return { responseFormat: { type: 'json_object' } }
  return { responseFormat: { type: 'json_schema', schema, ...(typeof strict === 'boolean' && { strict }) } }
}

/**
 * The library's responseFormat of vLLM's structured_outputs: exactly one of its fields, and not
 * beside a JSON response_format (a forced tool call refuses response_format on its own).
 */
function structuredOutputsOption(body: CompletionBody | ChatCompletionBody): Pick<GenerateOptions, 'responseFormat'> {
  const so = body.structured_outputs
  if (!so) return {}
  const given = (Object.keys(so) as (keyof StructuredOutputsBody)[]).filter((k) => so[k] !== null && so[k] !== undefined && !(k === 'json_object' && so[k] === false))
  if (given.length !== 1)
    throw invalidRequest(
      `Expected exactly one of json, regex, choice, grammar, structural_tag or json_object: true in structured_outputs but received ${given.length ? given.join(', ') : 'none'}`,
      'structured_outputs',
      'invalid_value',
    )
  if ((body.response_format?.type ?? 'text') !== 'text')
    throw invalidRequest(`Expected response_format text or null with structured_outputs but received ${body.response_format!.type}`, 'response_format', 'invalid_value')
  const key = given[0]!
  if (key === 'regex') return { responseFormat: { type: 'regex', pattern: so.regex! } }
  if (key === 'choice') return { responseFormat: { type: 'choice', choices: so.choice! } }
  if (key === 'grammar') return { responseFormat: { type: 'grammar', grammar: so.grammar! } }
  if (key === 'json_object') return { responseFormat: { type: 'json_object' } }
  if (key === 'structural_tag') {
    let tag: unknown
    try {
      tag = JSON.parse(so.structural_tag!)
    } catch (err) {
      throw invalidRequest(
        `Expected a structural tag as JSON text for structured_outputs.structural_tag but received text that is not JSON: ${(err as Error).message}`,
        'structured_outputs',
        'invalid_value',
      )
    }
    return { responseFormat: { type: 'structural_tag', format: structuralTagFormat(tag, 'structured_outputs.structural_tag', 'structured_outputs') } }
  }
  let schema = so.json!
  if (typeof schema === 'string') {
    try {
      schema = JSON.parse(schema) as Record<string, unknown> | boolean
    } catch (err) {
      throw invalidRequest(`Expected a JSON schema (an object, or its JSON text) for structured_outputs.json but received text that is not JSON: ${(err as Error).message}`, 'structured_outputs', 'invalid_value')
    }
    if (typeof schema !== 'boolean' && !isPlainObject(schema))
      throw invalidRequest('Expected a JSON schema (an object, or its JSON text) for structured_outputs.json', 'structured_outputs', 'invalid_value')
  }
  return { responseFormat: { type: 'json_schema', schema } }
}

/**
 * The format of a structural tag as vLLM takes one (response_format's, or structured_outputs'
 * structural_tag once read from its JSON text): xgrammar's {type: 'structural_tag', format} (type
 * optional), or the older {structures: [{begin, schema, end}], triggers}, which vLLM hands xgrammar
 * as tags whose content follows their schema, in free text until a trigger: its triggered_tags.
 * Errors name the tag's place (`name`) in their message, and `param`. The format itself is checked
 * by the library (the parts xgrammar would not read) and by xgrammar.
 */
function structuralTagFormat(tag: unknown, name: string, param: string): Record<string, unknown> {
  const bad = (what: string, at: string, value: unknown) => invalidRequest(`Expected ${what} for ${at} but received ${describeValue(value)}`, param, 'invalid_value')
  if (!isPlainObject(tag)) throw bad('a structural tag (an object)', name, tag)
  // vLLM takes a tag with structures for the older form.
  const legacy = Object.hasOwn(tag, 'structures')
  const fields = legacy ? ['type', 'structures', 'triggers'] : ['type', 'format']
  const unknown = Object.keys(tag).find((key) => !fields.includes(key))
  if (unknown !== undefined)
    throw invalidRequest(`Unrecognized field supplied: ${name}.${unknown} (a structural tag has ${fields.join(', ')})`, param, 'invalid_value')
  if (tag['type'] !== undefined && tag['type'] !== 'structural_tag') throw bad("'structural_tag'", `${name}.type`, tag['type'])
  if (!legacy) {
    if (!isPlainObject(tag['format'])) throw bad("an object (xgrammar's format)", `${name}.format`, tag['format'])
    return tag['format']
  }
  const { structures, triggers } = tag
  if (!Array.isArray(structures)) throw bad('an array of {begin, schema, end}', `${name}.structures`, structures)
  if (!Array.isArray(triggers) || !triggers.every((t) => typeof t === 'string')) throw bad('an array of strings', `${name}.triggers`, triggers)
  const tags = structures.map((s: unknown, i) => {
    const shaped = isPlainObject(s) && Object.keys(s).every((key) => ['begin', 'schema', 'end'].includes(key))
    if (!shaped || typeof s['begin'] !== 'string' || typeof s['end'] !== 'string' || !isPlainObject(s['schema']))
      throw bad('{begin: string, schema: a JSON schema object, end: string}', `${name}.structures[${i}]`, s)
    return { type: 'tag', begin: s['begin'], content: { type: 'json_schema', json_schema: s['schema'] }, end: s['end'] }
  })
  return { type: 'triggered_tags', triggers, tags }
}

/**
 * tool_choice "required" or a named function, checked against the tools: "required" needs one,
 * and a named function must be one of them.
 */
function forcedChoice(body: ChatCompletionBody): ForcedToolChoice | null {
  const choice = body.tool_choice ?? null
  if (choice === 'required') {
    if (!body.tools?.length) throw invalidRequest('Expected tools (at least one) with tool_choice "required" but received none', 'tools', 'invalid_value')
    return { required: true, parallel: body.parallel_tool_calls !== false }
  }
  if (choice === null || typeof choice !== 'object') return null
  const named = choice as { type?: unknown; function?: { name?: unknown } }
  const name = named.function?.name
  if (named.type !== 'function' || typeof name !== 'string' || Object.keys(choice).some((k) => k !== 'type' && k !== 'function'))
    throw invalidRequest(`Expected a named function {type: 'function', function: {name}} for tool_choice but received ${JSON.stringify(choice)}`, 'tool_choice', 'invalid_value')
  if (!body.tools?.some((t) => t.function.name === name))
    throw invalidRequest(`Expected the name of one of the request's tools for tool_choice.function.name but received ${JSON.stringify(name)}`, 'tool_choice', 'invalid_value')
  return { function: name }
}

/**
 * An answer read as calls ends with "tool_calls" where it stopped by itself; a named function's
 * keeps "stop", as OpenAI and vLLM answer a call the request forced by name.
 */
function callsFinishReason(tools: ToolCallPlan, reason: FinishReason): FinishReason {
  const named = typeof tools.parser !== 'string' && 'function' in tools.parser
  return reason === 'stop' && !named ? 'tool_calls' : reason
}

function disconnected(signal: AbortSignal): boolean {
  return signal.aborted && signal.reason instanceof ClientGone
}

/** One request's generations in progress. */
interface ChoiceRun {
  loaded: Loaded
  plan: Plan
  head: ResponseHeader
  signal: AbortSignal
  failed: AbortController
  arrived: number
  streams: AsyncIterable<StreamPiece>[]
}

interface ChoicePlan {
  index: number
  prompt: number[]
  /** What the answer starts with (completions with echo): the prompt's text and, with logprobs, its tokens. */
  echo: Echo | null
  options: GenerateOptions
}

interface Echo {
  text: string
  records: PromptRecord[]
}

/** A prompt as the request gives it (`name` for messages: "prompt[1]"). */
type PromptSource = { name: string } & ({ ids: number[] } | { text: string } | { messages: ChatMessage[] })
/** A prompt that needs tokenizing. */
type TextSource = { name: string } & (
  | { text: string; addSpecialTokens?: false }
  | { messages: ChatMessage[]; variables?: ChatTemplateVariables; continueFinalMessage?: true }
)

/** A request checked against the model, its prompts not yet tokenized. */
interface Draft {
  prompts: PromptSource[]
  n: number
  /** max_tokens (or max_completion_tokens) as the request gives it. */
  requested: number | null | undefined
  options: GenerateOptions
  logprobs: boolean
  /** completions: the answer starts with the prompt (and its log-probs with logprobs). */
  echo: boolean
  stream: boolean
  includeUsage: boolean
  /** chat: how the answers are read for tool calls (null: they are not). */
  toolCalls: ToolCallPlan | null
  seed?: number
}

interface ToolCallPlan {
  parser: ToolCallReader
  /** Calls kept of an answer (1 with parallel_tool_calls: false). */
  limit: number
  /** A forced call's grammar. */
  format?: GenerateOptions['responseFormat']
}

interface Plan {
  choices: ChoicePlan[]
  logprobs: boolean
  stream: boolean
  includeUsage: boolean
  toolCalls: ToolCallPlan | null
  promptTokens: number
  seed?: number
}

function usageFromCounts(plan: Plan, counts: number[]): Usage {
  const completion = counts.reduce((a, b) => a + b, 0)
  return { prompt_tokens: plan.promptTokens, completion_tokens: completion, total_tokens: plan.promptTokens + completion }
}
