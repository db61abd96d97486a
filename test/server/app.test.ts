// The server in-process (Fastify's inject, or a socket for the openai client): /health while the
// model loads, streamed text that never splits a multi-byte character, and tool calls, with a
// scripted forward pass that makes the shipped tokenizer's tokens come out as the test wants.
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import type { ChatCompletionCreateParamsNonStreaming, ChatCompletionFunctionTool, ChatCompletionMessageParam, ChatCompletionTool } from 'openai/resources/chat/completions'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultModelPath, loadModel, Model } from '../../lib/api.js'
import { LogitProcessorTableError } from '../../lib/errors.js'
import { GrammarEngine } from '../../lib/grammar.js'
import type { ForwardModel, SequenceChunk, StepTokens, TokenChoice } from '../../lib/scheduler.js'
import { chooseOnLogits, OutputHead } from '../../lib/model/output-head.js'
import { InferenceServer } from '../../lib/server/app.js'
import { completionLogprobs, TokenTexts } from '../../lib/server/openai.js'
import { parseLlamaJsonToolCalls, pythonJson, strictLlamaCallsFormat } from '../../lib/server/tool-calls.js'
import { systemFingerprint } from '../../lib/server/fingerprint.js'
import { tensorFrom } from '../../lib/tensor.js'
import { Tokenizer, type ChatMessage } from '../../lib/tokenizer.js'
import type { NativeTensor } from '../../lib/native.js'
import { THINKING_TEMPLATE } from '../helpers/templates.js'

/**
 * Logits that make `script[i]` the greedy choice at generated position i (after a prompt of
 * `promptLength` tokens). With `processorRows`, choices may carry logit processors (a grammar's
 * mask among them), applied as the real output head applies them: where the mask leaves the
 * scripted token out, another is chosen.
 */
class ScriptedModel implements ForwardModel {
  readonly device = 'cpu' as const
  readonly config: { vocabSize: number; maxPositionEmbeddings: number }
  readonly kvBlockSize = 16
  readonly kvBlocks = 64
  readonly maxBatchTokens = 256
  readonly logitProcessorRows: number
  private last: NativeTensor | null = null
  private readonly head: OutputHead | null

  constructor(
    vocabSize: number,
    /** Set before a request whose prompt has another length, or for another script. */
    public promptLength: number,
    public script: number[],
    private readonly eos: number,
    processorRows = 0,
  ) {
    this.config = { vocabSize, maxPositionEmbeddings: 1024 }
    this.logitProcessorRows = processorRows
    this.head = processorRows > 0 ? new OutputHead('cpu', this.maxBatchTokens, { rows: processorRows, vocab: vocabSize }) : null
  }

  step(chunks: SequenceChunk[], choices: TokenChoice[], topN: number): Promise<StepTokens> {
    return this.head ? this.head.choose(this.logits(chunks), choices, topN) : chooseOnLogits(this.logits(chunks), choices, topN)
  }

  private logits(chunks: SequenceChunk[]): NativeTensor {
    const V = this.config.vocabSize
    const rows: Float32Array[] = []
    for (const c of chunks) {
      if (c.logits !== 'last') continue
      const position = c.startPosition + c.tokens.length - 1
      const row = new Float32Array(V)
      row[this.script[position + 1 - this.promptLength] ?? this.eos] = 10
      rows.push(row)
    }
    const logits = new Float32Array(rows.length * V)
    rows.forEach((r, i) => logits.set(r, i * V))
    this.last?.dispose()
    this.last = tensorFrom('cpu', 'f32', [rows.length, V], logits)
    return this.last
  }

  dispose(): void {
    this.last?.dispose()
    this.head?.dispose()
  }
}

describe('completion top_logprobs', () => {
  it('keep the most likely of tokens that decode to the same text under their key', () => {
    // Ids 0 and 1 are bytes of a character split over tokens: both decode to U+FFFD.
    const bytes = [[0xe4], [0xe5], [0x61]]
    const texts = new TokenTexts({ vocabSize: 3, tokenBytes: (id: number) => Uint8Array.from(bytes[id]!) } as never)
    const record = (token: number, logprob: number) => ({
      token,
      logprob,
      top: [
        { token: 0, logprob: -0.5 },
        { token: 1, logprob: -2 },
      ],
      text: '',
    })
    expect(completionLogprobs([record(2, -1)], texts, 0).top_logprobs).toEqual([{ '\uFFFD': -0.5, a: -1 }])
    expect(completionLogprobs([record(1, -2)], texts, 0).top_logprobs).toEqual([{ '\uFFFD': -0.5 }])
  })
})

describe('InferenceServer in-process', () => {
  let tokenizer: Tokenizer
  let server: InferenceServer
  const TEXT = ' naïve 日本 🙂 café'
  const PROMPT = 'Say it:'

  beforeAll(async () => {
    tokenizer = await Tokenizer.load(defaultModelPath)
    server = new InferenceServer({ modelName: 'scripted', maxQueued: 8, bodyLimit: 1 << 20 })
  })
  afterAll(async () => {
    await server.app.close()
  })

  it('answers 503 on /health and /v1/* while the model loads', async () => {
    const health = await server.app.inject({ method: 'GET', url: '/health' })
    expect(health.statusCode).toBe(503)
    expect(health.json()).toEqual({ status: 'loading' })
    const models = await server.app.inject({ method: 'GET', url: '/v1/models' })
    expect(models.statusCode).toBe(503)
    expect(models.json().error).toMatchObject({ type: 'service_unavailable', code: 'model_loading' })
  })

  it('streams whole characters when one character spans several tokens', async () => {
    const prompt = tokenizer.encodePrompt(PROMPT, false)
    const script = tokenizer.encodeContinuation(TEXT)
    // The point of the test: some characters are split over several byte tokens.
    const byteTokens = script.filter((id) => tokenizer.tokenBytes(id).some((b) => b >= 0x80 && b < 0xc0) && tokenizer.tokenBytes(id).length === 1)
    expect(byteTokens.length).toBeGreaterThan(3)
    const eos = tokenizer.eosTokenIds[0]!
    const model = new Model(
      { forward: new ScriptedModel(4096, prompt.length, script, eos), tokenizer, path: 'scripted' },
      { maxBatchSize: 4, prefillChunkSize: 256 },
    )
    server.setModel(model, 'fp_scripted')
    const res = await server.app.inject({
      method: 'POST',
      url: '/v1/completions',
      payload: { model: 'scripted', prompt: PROMPT, max_tokens: script.length + 1, temperature: 0, stream: true, logprobs: 0 },
    })
    expect(res.statusCode).toBe(200)
    expect(res.headers['content-type']).toContain('text/event-stream')
    const events = res.body.split('\n\n').filter((e) => e.startsWith('data: '))
    expect(events.at(-1)).toBe('data: [DONE]')
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e.slice(6)))
    const deltas: string[] = chunks.map((c) => c.choices[0].text)
    expect(deltas.join('')).toBe(TEXT)
    for (const d of deltas) {
      expect(d).not.toContain('\uFFFD')
      expect(d).not.toMatch(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/)
    }
    // Tokens whose bytes end inside a character come with empty text and their log-probs.
    expect(deltas.filter((d) => d === '').length).toBeGreaterThan(0)
    expect(deltas.some((d) => d.includes('日'))).toBe(true)
    expect(deltas.some((d) => d.includes('🙂'))).toBe(true)
    const tokens = chunks.flatMap((c) => c.choices[0].logprobs.tokens)
    expect(tokens.length).toBe(script.length + 1) // and the EOS
    expect(chunks.at(-1).choices[0].finish_reason).toBe('stop')
    await model.dispose()
  })

  it("stop_reason is null when the model's EOS ends a choice (whole and streamed, both endpoints), and EOS's id when stop_token_ids ends it under ignore_eos", async () => {
    // A tokenizer of its own: disposing a model closes its tokenizer.
    const own = await Tokenizer.load(defaultModelPath)
    const script = own.encodeContinuation(' to be or not')
    const eos = own.eosTokenIds[0]!
    const scripted = new ScriptedModel(4096, 0, script, eos)
    const model = new Model({ forward: scripted, tokenizer: own, path: 'scripted' }, { maxBatchSize: 4, prefillChunkSize: 256 })
    server.setModel(model, 'fp_scripted')
    try {
      const messages = [{ role: 'user' as const, content: PROMPT }]
      for (const [url, prompt, length] of [
        ['/v1/completions', { prompt: PROMPT }, model.tokenize(PROMPT).length],
        ['/v1/chat/completions', { messages }, model.tokenize(messages).length],
      ] as const) {
        scripted.promptLength = length
        // Room for more than the script and its EOS: nothing but EOS ends the choice.
        const body = { model: 'scripted', ...prompt, max_tokens: script.length + 4, temperature: 0 }
        for (const [extra, expected] of [
          [{}, null],
          [{ stop_token_ids: [eos] }, null],
          [{ stop_token_ids: [eos], ignore_eos: true }, eos],
        ] as const) {
          const whole = await server.app.inject({ method: 'POST', url, payload: { ...body, ...extra } })
          expect(whole.statusCode).toBe(200)
          const streamed = sseChunks((await server.app.inject({ method: 'POST', url, payload: { ...body, ...extra, stream: true } })).body)
          for (const choice of [whole.json().choices[0], streamed.at(-1).choices[0]]) {
            expect(choice.finish_reason, `${url} ${JSON.stringify(extra)}`).toBe('stop')
            expect(choice, `${url} ${JSON.stringify(extra)}`).toHaveProperty('stop_reason', expected)
          }
          expect(whole.json().usage.completion_tokens).toBe(script.length + 1)
        }
      }
    } finally {
      await model.dispose()
    }
  })

  it('answers 503 with the reason when the table of penalties and logit bias cannot be allocated, and serves the rest', async () => {
    const own = await Tokenizer.load(defaultModelPath)
    const script = own.encodeContinuation(' to be')
    /** A scripted model with rows for penalties whose table never fits. */
    class NoRoom extends ScriptedModel {
      readonly logitProcessorRows = 4
      reserveLogitProcessors(): void {
        throw new LogitProcessorTableError('Could not allocate the table of penalties and logit bias (3.5 MiB for 4 sequences at 4096 tokens) on cuda: out of memory (a stand-in)')
      }
    }
    const scripted = new NoRoom(4096, 0, script, own.eosTokenIds[0]!)
    const model = new Model({ forward: scripted, tokenizer: own, path: 'scripted' }, { maxBatchSize: 4, prefillChunkSize: 256 })
    server.setModel(model, 'fp_scripted')
    try {
      scripted.promptLength = model.tokenize(PROMPT).length
      const body = { model: 'scripted', prompt: PROMPT, max_tokens: script.length, temperature: 0 }
      const reason = {
        type: 'service_unavailable',
        code: 'logit_processors_unavailable',
        message: expect.stringContaining('Could not allocate the table of penalties and logit bias (3.5 MiB'),
      }
      const refused = await server.app.inject({ method: 'POST', url: '/v1/completions', payload: { ...body, presence_penalty: 1 } })
      expect(refused.statusCode).toBe(503)
      expect(refused.json().error).toMatchObject(reason)
      // Streamed, the answer has begun: the reason comes as the stream's error event.
      const streamed = await server.app.inject({ method: 'POST', url: '/v1/completions', payload: { ...body, stream: true, presence_penalty: 1 } })
      expect(sseChunks(streamed.body).at(-1).error).toMatchObject(reason)
      const plain = await server.app.inject({ method: 'POST', url: '/v1/completions', payload: body })
      expect(plain.statusCode).toBe(200)
      expect(plain.json().choices[0].text).toBe(' to be')
    } finally {
      await model.dispose()
    }
  })
})

describe('chat_template_kwargs (in-process)', () => {
  it('passes variables to the chat template on /v1/chat/completions and /tokenize, and refuses those the request sets', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'detinfer-kwargs-'))
    cpSync(defaultModelPath, dir, { recursive: true })
    writeFileSync(join(dir, 'chat_template.jinja'), THINKING_TEMPLATE)
    const model = await loadModel(dir, { device: 'cpu' })
    const server = new InferenceServer({ modelName: 'kw', maxQueued: 8, bodyLimit: 1 << 20 })
    try {
      server.setModel(model, 'fp_kw')
      const messages = [{ role: 'user', content: 'Who art thou?' }]
      const kwargs = { enable_thinking: false }
      const ids = model.tokenize(messages, { chatTemplateVariables: kwargs })
      expect(ids.length).toBeGreaterThan(model.tokenize(messages).length)
      const chat = await server.app.inject({
        method: 'POST',
        url: '/v1/chat/completions',
        payload: { model: 'kw', messages, chat_template_kwargs: kwargs, max_tokens: 4, temperature: 0 },
      })
      expect(chat.statusCode).toBe(200)
      expect(chat.json().usage.prompt_tokens).toBe(ids.length)
      expect(chat.json().choices[0].message.content).toBe((await model.generate(ids, { maxTokens: 4 })).text)
      const tokenized = await server.app.inject({ method: 'POST', url: '/tokenize', payload: { messages, chat_template_kwargs: kwargs } })
      expect(tokenized.json().tokens).toEqual(ids)
      const reserved = await server.app.inject({
        method: 'POST',
        url: '/v1/chat/completions',
        payload: { model: 'kw', messages, chat_template_kwargs: { add_generation_prompt: false }, max_tokens: 4 },
      })
      expect(reserved.statusCode).toBe(400)
      expect(reserved.json().error).toEqual({
        message: "Unsupported request argument supplied: chat_template_kwargs.add_generation_prompt (the request's messages and its generation prompt set it)",
        type: 'invalid_request_error',
        param: 'chat_template_kwargs.add_generation_prompt',
        code: 'unsupported_parameter',
      })
      const wrong = await server.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: { model: 'kw', messages, chat_template_kwargs: [1] } })
      expect(wrong.statusCode).toBe(400)
      expect(wrong.json().error.message).toBe('Expected object of chat template variables or null for chat_template_kwargs but received [1] of type array')
    } finally {
      await server.app.close()
      await model.dispose()
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

describe('an empty list of tools (in-process)', () => {
  it('reaches the chat template as an empty list, as vLLM passes it: Llama 3.1 writes its tool preamble for one', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'detinfer-no-tools-'))
    cpSync(defaultModelPath, dir, { recursive: true })
    // Llama 3.1's test: tools that are not none, however many.
    const template =
      '{%- if not tools is defined %}{%- set tools = none %}{%- endif %}{%- if tools is not none %}[{{ tools | length }} tools]{%- endif %}' +
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    writeFileSync(join(dir, 'chat_template.jinja'), template)
    const model = await loadModel(dir, { device: 'cpu' })
    const server = new InferenceServer({ modelName: 'none', maxQueued: 8, bodyLimit: 1 << 20 })
    try {
      server.setModel(model, 'fp_none')
      const messages = [{ role: 'user', content: 'Hi' }]
      const tokens = async (extra: object) => (await server.app.inject({ method: 'POST', url: '/tokenize', payload: { messages, ...extra } })).json().tokens
      const plain = model.tokenize(messages)
      expect(await tokens({})).toEqual(plain)
      expect(await tokens({ tools: null })).toEqual(plain)
      expect(await tokens({ tools: [] })).toEqual(model.tokenize(messages, { chatTemplateVariables: { tools: [] } }))
      expect(model.detokenize(await tokens({ tools: [] }))).toBe('[0 tools]user\nHi\nassistant')
    } finally {
      await server.app.close()
      await model.dispose()
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

describe('system_fingerprint', () => {
  it('tells the tensor-parallel setting apart (unset gives other bits than any degree) and nothing else of the same domain', () => {
    const unset = systemFingerprint('ab', '1.0.0', 'cpu')
    expect(unset).toMatch(/^fp_[0-9a-f]{16}$/)
    expect(systemFingerprint('ab', '1.0.0', 'cpu')).toBe(unset)
    // Every degree gives the same bits, so one fingerprint; unset gives others.
    const tp = [1, 2, 4, 8].map((n) => systemFingerprint('ab', '1.0.0', 'cpu', n))
    expect(new Set(tp).size).toBe(1)
    expect(tp[0]).not.toBe(unset)
    expect(systemFingerprint('ac', '1.0.0', 'cpu')).not.toBe(unset)
    expect(systemFingerprint('ab', '1.0.1', 'cpu')).not.toBe(unset)
  })
})

// Tool calls. The shipped tokenizer gets <tool_call> and </tool_call> as added tokens that are not
// special (as in Qwen's tokenizer.json, where skip_special_tokens keeps them in the text), and a
// chat template that renders tools, an assistant's tool calls (their arguments, objects by then,
// through tojson, as Qwen's template writes them: printed alone they would be Python's repr) and a
// tool message's call id.
const TOOL_TAG_IDS = [4094, 4095]
const TOOL_TEMPLATE =
  // (A newline right after a block tag is dropped, as Hugging Face renders templates: hence {{ '\n' }}.)
  "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools><|im_end|>\n{% endif %}" +
  "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}" +
  '{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}{% endif %}' +
  "{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}<|im_end|>\n{% endfor %}" +
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

function toolModelDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'detinfer-tools-'))
  cpSync(defaultModelPath, dir, { recursive: true })
  const file = join(dir, 'tokenizer.json')
  const t = JSON.parse(readFileSync(file, 'utf8'))
  const vocab = t.model.vocab as Record<string, number>
  // The tags take the places of the vocabulary's last two pieces, and of the merges that make them.
  const gone = new Set(Object.keys(vocab).filter((piece) => TOOL_TAG_IDS.includes(vocab[piece]!)))
  for (const piece of gone) delete vocab[piece]
  t.model.merges = (t.model.merges as (string | string[])[]).filter((m) => {
    const [a, b] = typeof m === 'string' ? m.split(' ') : m
    return !gone.has(a! + b!) && !gone.has(a!) && !gone.has(b!)
  })
  t.added_tokens.push(
    ...['<tool_call>', '</tool_call>'].map((content, i) => ({ id: TOOL_TAG_IDS[i], content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: false })),
  )
  writeFileSync(file, JSON.stringify(t))
  writeFileSync(join(dir, 'chat_template.jinja'), TOOL_TEMPLATE)
  return dir
}

const TOOLS: ChatCompletionTool[] = [
  {
    type: 'function',
    function: {
      name: 'get_weather',
      description: 'The weather in a city',
      parameters: { type: 'object', properties: { city: { type: 'string' }, unit: { enum: ['celsius', 'fahrenheit'] } }, required: ['city'] },
    },
  },
  { type: 'function', function: { name: 'get_time', parameters: { type: 'object', properties: { zone: { type: 'string' } } } } },
]
const WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
const TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>'
const ONE_CALL = `Let me look.\n${WEATHER}`
const TWO_CALLS = `${WEATHER}\n${TIME}`
const MALFORMED = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
const ID = expect.stringMatching(/^call_[0-9a-f]{24}$/)
const weatherCall = { id: ID, type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris", "unit": "celsius"}' } }
const timeCall = { id: ID, type: 'function', function: { name: 'get_time', arguments: '{"zone": "Europe/Paris"}' } }

/** The server's SSE body as chunks. */
function sseChunks(body: string): any[] {
  const events = body.split('\n\n').filter((e) => e.startsWith('data: '))
  expect(events.at(-1)).toBe('data: [DONE]')
  return events.slice(0, -1).map((e) => JSON.parse(e.slice(6)))
}

describe('tool calls (--tool-call-parser hermes, in-process, the openai client)', () => {
  let dir: string
  let tokenizer: Tokenizer
  let scripted: ScriptedModel
  let model: Model
  let server: InferenceServer
  let client: OpenAI
  const messages: ChatCompletionMessageParam[] = [{ role: 'user', content: 'Weather in Paris?' }]

  beforeAll(async () => {
    dir = toolModelDir()
    tokenizer = await Tokenizer.load(dir)
    scripted = new ScriptedModel(4096, 0, [], tokenizer.eosTokenIds[0]!)
    model = new Model({ forward: scripted, tokenizer, path: 'scripted' }, { maxBatchSize: 4, prefillChunkSize: 256 })
    server = new InferenceServer({ modelName: 'tools', maxQueued: 8, bodyLimit: 1 << 20, toolCallParser: 'hermes' })
    server.setModel(model, 'fp_tools')
    const address = await server.app.listen({ host: '127.0.0.1', port: 0 })
    client = new OpenAI({ baseURL: `${address}/v1`, apiKey: 'unused', maxRetries: 0 })
  })
  afterAll(async () => {
    await server?.app.close()
    await model?.dispose()
    rmSync(dir, { recursive: true, force: true })
  })

  /** Has the model answer `text` to `conversation` with TOOLS. */
  function answer(text: string, conversation = messages) {
    // The calls' arguments as objects, as the server hands them to the template (as vLLM does).
    const chat = conversation.map((m) => ({
      ...m,
      content: m.content ?? '',
      ...('tool_calls' in m &&
        m.tool_calls && {
          tool_calls: m.tool_calls.map((c) => (c.type === 'function' ? { ...c, function: { ...c.function, arguments: JSON.parse(c.function.arguments) } } : c)),
        }),
    })) as ChatMessage[]
    scripted.promptLength = model.tokenize(chat, { chatTemplateVariables: { tools: TOOLS } }).length
    scripted.script = tokenizer.encodeContinuation(text)
  }

  /** The same request whole, twice, and streamed through the client's helper: the three agree. */
  async function wholeAndStreamed(body: ChatCompletionCreateParamsNonStreaming) {
    const whole = await client.chat.completions.create(body)
    expect((await client.chat.completions.create(body)).choices).toEqual(whole.choices)
    const streamed = await client.chat.completions.stream({ ...body, stream: true }).finalChatCompletion()
    const [w, s] = [whole.choices[0]!, streamed.choices[0]!]
    expect(s.message.content).toBe(w.message.content)
    expect(s.message.tool_calls).toEqual(w.message.tool_calls)
    expect(s.finish_reason).toBe(w.finish_reason)
    // (Streamed log-probs are compared chunk by chunk below: the client's helper counts the first chunk's twice.)
    return { whole, streamed }
  }

  it('the tags are single tokens that stay in the decoded text', () => {
    expect(tokenizer.encodeContinuation('<tool_call>\n</tool_call>')).toEqual([TOOL_TAG_IDS[0], tokenizer.encodeContinuation('\n')[0], TOOL_TAG_IDS[1]])
    expect(tokenizer.decode(tokenizer.encodeContinuation(WEATHER))).toBe(WEATHER)
  })

  it('text and one call: content before the call, the call with its arguments as JSON text, finish_reason tool_calls', async () => {
    answer(ONE_CALL)
    expect(scripted.script).toContain(TOOL_TAG_IDS[0])
    const { whole, streamed } = await wholeAndStreamed({ model: 'tools', messages, tools: TOOLS, temperature: 0, logprobs: true })
    expect(whole.choices[0]!.message).toEqual({ role: 'assistant', content: 'Let me look.\n', tool_calls: [weatherCall] })
    expect(whole.choices[0]!.finish_reason).toBe('tool_calls')
    // Log-probs stay per token, the tags' and the calls' included.
    expect(whole.choices[0]!.logprobs!.content!.map((t) => t.token).join('')).toBe(ONE_CALL + tokenizer.eosToken)
    expect(whole.usage).toEqual({ prompt_tokens: scripted.promptLength, completion_tokens: scripted.script.length + 1, total_tokens: scripted.promptLength + scripted.script.length + 1 })
    expect(streamed.system_fingerprint).toBe('fp_tools')
  })

  it('streamed: content deltas until the call, then the call whole in OpenAI\'s delta shape, then finish_reason', async () => {
    answer(ONE_CALL)
    const body = { model: 'tools', messages, tools: TOOLS, temperature: 0, logprobs: true }
    const res = await server.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: { ...body, stream: true } })
    const chunks = sseChunks(res.body)
    const content = chunks.map((c) => c.choices[0].delta.content ?? '').join('')
    expect(content).toBe('Let me look.\n')
    const calls = chunks.filter((c) => c.choices[0].delta.tool_calls)
    expect(calls.map((c) => c.choices[0])).toEqual([{ index: 0, delta: { tool_calls: [{ index: 0, ...weatherCall }] }, logprobs: null, finish_reason: null }])
    expect(chunks.at(-1).choices[0]).toEqual({ index: 0, delta: {}, logprobs: null, finish_reason: 'tool_calls', stop_reason: null })
    expect(chunks.filter((c) => c.choices[0].finish_reason).length).toBe(1)
    const whole = (await server.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: body })).json()
    expect(calls[0].choices[0].delta.tool_calls[0].id).toBe(whole.choices[0].message.tool_calls[0].id)
    // Log-probs per token, as without tools: one chunk per token, the held ones with empty content.
    expect(chunks.flatMap((c) => c.choices[0].logprobs?.content ?? [])).toEqual(whole.choices[0].logprobs.content)
  })

  it('two calls and no text: content null, both calls with their own ids; parallel_tool_calls false keeps the first', async () => {
    answer(TWO_CALLS)
    const { whole, streamed } = await wholeAndStreamed({ model: 'tools', messages, tools: TOOLS, temperature: 0 })
    expect(whole.choices[0]!.message).toEqual({ role: 'assistant', content: null, tool_calls: [weatherCall, timeCall] })
    expect(streamed.choices[0]!.message.content).toBe(null)
    const [a, b] = whole.choices[0]!.message.tool_calls!
    expect(a!.id).not.toBe(b!.id)
    const one = await wholeAndStreamed({ model: 'tools', messages, tools: TOOLS, temperature: 0, parallel_tool_calls: false })
    expect(one.whole.choices[0]!.message.tool_calls).toEqual([{ ...weatherCall, id: a!.id }])
    expect(one.whole.choices[0]!.finish_reason).toBe('tool_calls')
  })

  it('a malformed call: the whole text is the content, finish_reason stop', async () => {
    answer(MALFORMED)
    const { whole } = await wholeAndStreamed({ model: 'tools', messages, tools: TOOLS, temperature: 0 })
    expect(whole.choices[0]!.message).toEqual({ role: 'assistant', content: MALFORMED })
    expect(whole.choices[0]!.finish_reason).toBe('stop')
  })

  it('tool_choice none: the tools are rendered, nothing is parsed', async () => {
    answer(TWO_CALLS)
    const { whole } = await wholeAndStreamed({ model: 'tools', messages, tools: TOOLS, tool_choice: 'none', temperature: 0 })
    expect(whole.choices[0]!.message).toEqual({ role: 'assistant', content: TWO_CALLS })
    expect(whole.choices[0]!.finish_reason).toBe('stop')
    expect(whole.usage!.prompt_tokens).toBe(scripted.promptLength)
  })

  it('the tools reach the template as sent; an assistant message with calls and the tool messages too', async () => {
    const tools = tokenizer.encode(
      `<|im_start|>system\n<tools>\n${pythonJson(TOOLS[0])}\n${pythonJson(TOOLS[1])}\n</tools><|im_end|>\n` +
        '<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n',
      { addSpecialTokens: false },
    )
    const tokenized = await server.app.inject({ method: 'POST', url: '/tokenize', payload: { messages, tools: TOOLS } })
    expect(tokenized.json().tokens).toEqual(tools)
    // The next turn, as an agent sends it: the helper's assistant message as it is, then the results.
    answer(TWO_CALLS)
    const streamed = await client.chat.completions.stream({ model: 'tools', messages, tools: TOOLS, temperature: 0, stream: true }).finalChatCompletion()
    const message = streamed.choices[0]!.message
    const [a, b] = message.tool_calls!
    const turn: ChatCompletionMessageParam[] = [
      ...messages,
      message as ChatCompletionMessageParam,
      { role: 'tool', tool_call_id: a!.id, content: '18 C' },
      { role: 'tool', tool_call_id: b!.id, content: '14:05' },
    ]
    const expected = tokenizer.encode(
      `<|im_start|>system\n<tools>\n${pythonJson(TOOLS[0])}\n${pythonJson(TOOLS[1])}\n</tools><|im_end|>\n` +
        '<|im_start|>user\nWeather in Paris?<|im_end|>\n' +
        `<|im_start|>assistant\n${WEATHER}${TIME}<|im_end|>\n` +
        `<|im_start|>tool\n18 C [${a!.id}]<|im_end|>\n<|im_start|>tool\n14:05 [${b!.id}]<|im_end|>\n<|im_start|>assistant\n`,
      { addSpecialTokens: false },
    )
    expect((await server.app.inject({ method: 'POST', url: '/tokenize', payload: { messages: turn, tools: TOOLS } })).json().tokens).toEqual(expected)
    answer('It is 18 C.', turn)
    const next = await client.chat.completions.create({ model: 'tools', messages: turn, tools: TOOLS, temperature: 0 })
    expect(next.usage!.prompt_tokens).toBe(expected.length)
    expect(next.choices[0]!.message).toEqual({ role: 'assistant', content: 'It is 18 C.' })
    expect(next.choices[0]!.finish_reason).toBe('stop')
  })

  it('floats of the tools reach the template as floats (1.0 stays 1.0), as vLLM reads them with Python', async () => {
    const tool = '{"type": "function", "function": {"name": "set_heat", "parameters": {"type": "object", "properties": {"t": {"type": "number", "minimum": 0.0, "maximum": 1e2, "default": 0.5}}}}}'
    const payload = `{"messages": [{"role": "user", "content": "Warmer?"}], "tools": [${tool}]}`
    const res = await server.app.inject({ method: 'POST', url: '/tokenize', headers: { 'content-type': 'application/json' }, payload })
    const written = tool.replace('1e2', '100.0')
    const expected = `<|im_start|>system\n<tools>\n${written}\n</tools><|im_end|>\n<|im_start|>user\nWarmer?<|im_end|>\n<|im_start|>assistant\n`
    expect(res.json().tokens).toEqual(tokenizer.encode(expected, { addSpecialTokens: false }))
  })

  it.each([
    [{ tool_choice: 'required', tools: [] }, 'tools', 'Expected tools (at least one) with tool_choice "required" but received none', 'invalid_value'],
    [{ tool_choice: { type: 'function', function: { name: 'get_news' } } }, 'tool_choice', `Expected the name of one of the request's tools for tool_choice.function.name but received "get_news"`, 'invalid_value'],
    [{ tool_choice: { type: 'function', function: { name: 'get_weather' } }, response_format: { type: 'json_object' } }, 'response_format', 'Expected response_format text or null with tool_choice {"type":"function","function":{"name":"get_weather"}} (a forced call has its own JSON) but received json_object', 'invalid_value'],
    [{ tool_choice: 'required' }, 'tools', "The tools' parameters cannot hold a call: This model cannot constrain a completion to responseFormat json_schema: it was built without grammars (ModelParts.grammars)", 'invalid_value'],
    [
      {
        tool_choice: 'required',
        tools: ['a', 'b'].map((name, i) => ({ type: 'function', function: { name, parameters: { $defs: { City: { type: i ? 'integer' : 'string' } }, type: 'object' } } })),
      },
      'tools',
      "Expected one schema for the tools' $defs.City but the tools define it differently (b and an earlier tool)",
      'invalid_value',
    ],
    [{ tool_choice: 'sometimes' }, 'tool_choice', `Expected 'none', 'auto', 'required', a named function {type: 'function', function: {name}} or null for tool_choice but received "sometimes" of type string`, 'invalid_value'],
    [{ chat_template_kwargs: { tools: [] } }, 'chat_template_kwargs.tools', "Unsupported request argument supplied: chat_template_kwargs.tools (the request's tools set it)", 'unsupported_parameter'],
    [{ tools: [{ type: 'function', function: { name: 'get weather' } }] }, 'tools[0].function.name', 'Expected name of 1 to 64 letters, digits, underscores and dashes for tools[0].function.name but received "get weather" of type string', 'invalid_value'],
    [{ tools: [{ type: 'function', function: { name: 'f', strict: true } }], response_format: { type: 'json_object' } }, 'response_format', 'Expected response_format text or null and no structured_outputs with strict tools (their calls have their own grammar)', 'invalid_value'],
    [{ tools: [{ type: 'retrieval', function: { name: 'f' } }] }, 'tools[0].type', `Expected 'function' for tools[0].type but received "retrieval" of type string`, 'invalid_value'],
    [{ messages: [{ role: 'user', content: 'x', tool_calls: [] }] }, 'messages[0].tool_calls', 'Unsupported request argument supplied: messages[0].tool_calls (only assistant messages carry tool calls)', 'unsupported_parameter'],
    [
      { messages: [{ role: 'user', content: 'x' }, { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city": Paris}' } }] }] },
      'messages[1].tool_calls[0].function.arguments',
      'Expected a JSON object as text for messages[1].tool_calls[0].function.arguments but received "{\\"city\\": Paris}"',
      'invalid_value',
    ],
    [
      { messages: [{ role: 'user', content: 'x' }, { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '1.0' } }] }] },
      'messages[1].tool_calls[0].function.arguments',
      'Expected a JSON object as text for messages[1].tool_calls[0].function.arguments but received "1.0"',
      'invalid_value',
    ],
  ])('refuses %j', async (extra, param, message, code) => {
    const res = await server.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: { model: 'tools', messages, tools: TOOLS, ...extra } })
    expect(res.statusCode).toBe(400)
    expect(res.json().error).toEqual({ message, type: 'invalid_request_error', param, code })
  })
})

describe('tool calls (--tool-call-parser llama3_json, in-process, the openai client)', () => {
  it("reads an answer of JSON calls, whole and streamed alike, and leaves prose as content; strict tools' calls are held to their parameters", async () => {
    const dir = toolModelDir()
    const tokenizer = await Tokenizer.load(dir)
    const scripted = new ScriptedModel(4096, 0, [], tokenizer.eosTokenIds[0]!, 4)
    const grammars = new GrammarEngine(tokenizer, 4096)
    const model = new Model({ forward: scripted, tokenizer, path: 'scripted', grammars }, { maxBatchSize: 4, prefillChunkSize: 256 })
    const server = new InferenceServer({ modelName: 'llama', maxQueued: 8, bodyLimit: 1 << 20, toolCallParser: 'llama3_json' })
    try {
      server.setModel(model, 'fp_llama')
      const client = new OpenAI({ baseURL: `${await server.app.listen({ host: '127.0.0.1', port: 0 })}/v1`, apiKey: 'unused', maxRetries: 0 })
      const messages: ChatCompletionMessageParam[] = [{ role: 'user', content: 'Weather in Paris?' }]
      /** Has the model answer `text` to the request with `tools` (rendered into its prompt). */
      const say = (text: string, tools: readonly ChatCompletionTool[] = TOOLS) => {
        scripted.promptLength = model.tokenize(messages as ChatMessage[], { chatTemplateVariables: { tools } }).length
        scripted.script = tokenizer.encodeContinuation(text)
      }
      const body = { model: 'llama', messages, tools: TOOLS, temperature: 0, max_tokens: 400 }
      say('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; {"name": "get_time", "parameters": {"zone": "Europe/Paris"}}')
      const whole = await client.chat.completions.create(body)
      expect(whole.choices[0]!.message.content).toBe(null)
      expect(whole.choices[0]!.message.tool_calls).toEqual([weatherCall, timeCall])
      expect(whole.choices[0]!.finish_reason).toBe('tool_calls')
      const streamed = await client.chat.completions.stream({ ...body, stream: true }).finalChatCompletion()
      expect(streamed.choices[0]!.message.tool_calls).toEqual(whole.choices[0]!.message.tool_calls)
      expect(streamed.choices[0]!.message.content ?? null).toBe(null)
      expect(streamed.choices[0]!.finish_reason).toBe('tool_calls')
      say('It is sunny in Paris.')
      const prose = await client.chat.completions.create(body)
      expect(prose.choices[0]!.message.content).toBe('It is sunny in Paris.')
      expect(prose.choices[0]!.message.tool_calls ?? []).toEqual([])
      expect(prose.choices[0]!.finish_reason).toBe('stop')
      // Strict tools: a call the model writes is held to the tool's parameters (a structural tag,
      // strictLlamaCallsFormat). Calls and prose that keep to it come through as they are.
      const strictTools = (TOOLS as ChatCompletionFunctionTool[]).map((t) => ({ ...t, function: { ...t.function, strict: true } }))
      const strictBody = { ...body, tools: strictTools }
      say('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; {"name": "get_time", "parameters": {"zone": "Europe/Paris"}}', strictTools)
      const strictWhole = await client.chat.completions.create(strictBody)
      expect(strictWhole.choices[0]!.message.tool_calls).toEqual([weatherCall, timeCall])
      const strictStreamed = await client.chat.completions.stream({ ...strictBody, stream: true }).finalChatCompletion()
      // (The client's helper adds parsed_arguments to a strict tool's calls.)
      expect(strictStreamed.choices[0]!.message.tool_calls).toMatchObject(strictWhole.choices[0]!.message.tool_calls!)
      say('It is sunny in Paris.', strictTools)
      expect((await client.chat.completions.create(strictBody)).choices[0]!.message.content).toBe('It is sunny in Paris.')
      // parallel_tool_calls false: the reader keeps the first call; with strict tools the tag also
      // ends the answer there, so the model, which would write a second, writes no more tokens.
      const first = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
      for (const strict of [false, true]) {
        const tools = strict ? strictTools : TOOLS
        say(`${first}; {"name": "get_time", "parameters": {"zone": "Europe/Paris"}}`, tools)
        const single = await client.chat.completions.create({ ...body, tools, parallel_tool_calls: false })
        expect(single.choices[0]!.message.tool_calls).toEqual([weatherCall])
        expect(single.choices[0]!.finish_reason).toBe('tool_calls')
        expect(single.usage!.completion_tokens).toBe(strict ? tokenizer.encodeContinuation(first).length + 1 : scripted.script.length + 1)
      }
      // A city that is a number: without strict it is read as a call as written; with strict the
      // grammar leaves the number out, and the model (which knows nothing else) writes a string.
      const numbered = '{"name": "get_weather", "parameters": {"city": 5}}'
      say(numbered)
      const loose = await client.chat.completions.create(body)
      expect(loose.choices[0]!.message.tool_calls).toEqual([{ id: ID, type: 'function', function: { name: 'get_weather', arguments: '{"city": 5}' } }])
      say(numbered, strictTools)
      const held = await client.chat.completions.create(strictBody)
      const text = held.choices[0]!.message.content ?? ''
      expect(text.startsWith('{"name": "get_weather", "parameters": {"city": "'), text).toBe(true)
      for (const call of held.choices[0]!.message.tool_calls ?? []) expect(typeof JSON.parse((call as { function: { arguments: string } }).function.arguments).city).toBe('string')
    } finally {
      await server.app.close()
      await model.dispose()
      rmSync(dir, { recursive: true, force: true })
    }
  })

  it("strict tools with the shipped model: each answer is the library's under the same structural tag, read as the parser reads it", async () => {
    const dir = toolModelDir()
    const model = await loadModel(dir, { device: 'cpu' })
    const server = new InferenceServer({ modelName: 'llama', maxQueued: 8, bodyLimit: 1 << 20, toolCallParser: 'llama3_json' })
    try {
      server.setModel(model, 'fp_llama')
      const messages: ChatMessage[] = [{ role: 'user', content: 'Weather in Paris or Rome?' }]
      const place = { type: 'object', properties: { city: { enum: ['Paris', 'Rome'] } }, required: ['city'], additionalProperties: false }
      const tools = [
        { type: 'function' as const, function: { name: 'get_weather', parameters: place, strict: true } },
        { type: 'function' as const, function: { name: 'get_time', parameters: place, strict: true } },
      ]
      const ids = model.tokenize(messages, { chatTemplateVariables: { tools } })
      const format = strictLlamaCallsFormat(tools.map((t) => t.function))
      // The shipped model writes prose. A bias for "{" has it write calls instead, which the tag
      // holds to the tools' parameters, one after another: the stop string "; " ends the answer
      // after the first.
      const brace = model.tokenize('{', { addSpecialTokens: false })
      expect(brace.length).toBe(1)
      const calling = { logit_bias: { [brace[0]!]: 100 }, stop: ['; '] }
      for (const extra of [{}, calling]) {
        const body = { model: 'llama', messages, tools, max_tokens: 80, temperature: 0.7, seed: 3, n: 3, ...extra }
        const r = await server.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: body })
        expect(r.statusCode, r.body).toBe(200)
        for (const [i, choice] of r.json().choices.entries()) {
          const lib = await model.generate(ids, {
            maxTokens: 80,
            temperature: 0.7,
            seed: 3 + i,
            ...(extra === calling && { logitBias: calling.logit_bias, stop: calling.stop }),
            responseFormat: { type: 'structural_tag', format },
          })
          const parsed = parseLlamaJsonToolCalls(lib.text)
          expect(choice.message.content).toBe(parsed ? null : lib.text)
          expect((choice.message.tool_calls ?? []).map((c: { function: object }) => c.function)).toEqual(parsed?.calls ?? [])
          if (extra !== calling) continue
          expect(choice.finish_reason).toBe('tool_calls')
          expect(parsed!.calls).toHaveLength(1)
          expect(['get_weather', 'get_time']).toContain(parsed!.calls[0]!.name)
          expect(['{"city": "Paris"}', '{"city": "Rome"}']).toContain(parsed!.calls[0]!.arguments)
        }
      }
    } finally {
      await server.app.close()
      await model.dispose()
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

describe('tool calls without --tool-call-parser (in-process)', () => {
  it('refuses requests that let the model call tools, naming the flag; tool_choice none only shows them', async () => {
    const dir = toolModelDir()
    const model = await loadModel(dir, { device: 'cpu' })
    const server = new InferenceServer({ modelName: 'plain', maxQueued: 8, bodyLimit: 1 << 20 })
    try {
      server.setModel(model, 'fp_plain')
      const messages = [{ role: 'user', content: 'Weather in Paris?' }]
      const refused = await server.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: { model: 'plain', messages, tools: TOOLS, max_tokens: 2 } })
      expect(refused.statusCode).toBe(400)
      expect(refused.json().error).toEqual({
        message:
          'Tool calling is off on this server: start it with --tool-call-parser (hermes or llama3_json) to have tool calls read from the answers ' +
          '(or send tool_choice: "none" to only show the tools to the model)',
        type: 'invalid_request_error',
        param: 'tools',
        code: 'unsupported_parameter',
      })
      const shown = await server.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: { model: 'plain', messages, tools: TOOLS, tool_choice: 'none', max_tokens: 2, temperature: 0 } })
      expect(shown.statusCode).toBe(200)
      expect(shown.json().usage.prompt_tokens).toBe(model.tokenize(messages, { chatTemplateVariables: { tools: TOOLS } }).length)
      expect(shown.json().usage.prompt_tokens).toBeGreaterThan(model.tokenize(messages).length)
      // No tools (or none given): nothing to call, nothing refused.
      for (const extra of [{ tools: [] }, { tool_choice: 'auto' }, { parallel_tool_calls: false }]) {
        const res = await server.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: { model: 'plain', messages, max_tokens: 2, ...extra } })
        expect(res.statusCode).toBe(200)
      }
    } finally {
      await server.app.close()
      await model.dispose()
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

describe('echo (in-process, the shipped model)', () => {
  it('text_offset points into the text, whole and streamed alike, for a token-id prompt with special tokens and characters split over byte tokens', async () => {
    const model = await loadModel(defaultModelPath, { device: 'cpu' })
    const server = new InferenceServer({ modelName: 'echo', maxQueued: 8, bodyLimit: 1 << 20 })
    try {
      server.setModel(model, 'fp_echo')
      const ids = model.tokenize([{ role: 'user', content: 'hé 😀' }], { chatTemplateVariables: {} })
      // The point of the test: special tokens, which the text leaves out, and characters of several byte tokens.
      expect(ids.filter((id) => model.detokenize([id]) === '').length).toBeGreaterThan(1)
      expect(ids.filter((id) => model.tokenBytes(id).length === 1 && model.tokenBytes(id)[0]! >= 0x80).length).toBeGreaterThan(3)
      const body = { model: 'echo', prompt: ids, max_tokens: 3, temperature: 0, logprobs: 1, echo: true }
      const whole = (await server.app.inject({ method: 'POST', url: '/v1/completions', payload: body })).json().choices[0]
      const text = model.detokenize(ids)
      expect(whole.text.startsWith(text)).toBe(true)
      const offsets: number[] = whole.logprobs.text_offset
      expect(offsets.length).toBe(ids.length + 3)
      // Each token's offset is where the text it completes ends up: the generated ones start after the prompt.
      // Offsets count characters (code points), as OpenAI's API and vLLM (Python's len) count them:
      // the emoji is one character, two UTF-16 units.
      const chars = [...text]
      expect(chars.length).toBeLessThan(text.length)
      expect(offsets[ids.length]).toBe(chars.length)
      expect(offsets.slice(0, ids.length).every((o) => o <= chars.length)).toBe(true)
      expect(offsets.every((o, i) => i === 0 || o >= offsets[i - 1]!)).toBe(true)
      expect(offsets[ids.indexOf(model.tokenize('h', { addSpecialTokens: false })[0]!)]).toBe(chars.indexOf('h'))
      // A generated token's offset indexes the answer's text by characters, as a Python client slices it.
      const answer = [...whole.text]
      for (let i = ids.length; i < offsets.length; i++) {
        const token: string = whole.logprobs.tokens[i]
        if (!token.includes('\uFFFD')) expect(answer.slice(offsets[i]!, offsets[i]! + [...token].length).join('')).toBe(token)
      }
      const res = await server.app.inject({ method: 'POST', url: '/v1/completions', payload: { ...body, stream: true } })
      const chunks = sseChunks(res.body)
      expect(chunks.map((c) => c.choices[0].text).join('')).toBe(whole.text)
      expect(chunks.flatMap((c) => c.choices[0].logprobs.text_offset)).toEqual(offsets)
      expect(chunks.flatMap((c) => c.choices[0].logprobs.token_logprobs)).toEqual(whole.logprobs.token_logprobs)
    } finally {
      await server.app.close()
      await model.dispose()
    }
  })
})

describe('/tokenize (in-process)', () => {
  it('refuses with a prompt what applies to messages alone, instead of dropping it', async () => {
    const model = await loadModel(defaultModelPath, { device: 'cpu' })
    const server = new InferenceServer({ modelName: 'tok', maxQueued: 8, bodyLimit: 1 << 20 })
    try {
      server.setModel(model, 'fp_tok')
      const tools = [{ type: 'function', function: { name: 'f' } }]
      for (const [key, value] of [['tools', tools], ['chat_template_kwargs', { enable_thinking: false }], ['add_generation_prompt', true]] as const) {
        const res = await server.app.inject({ method: 'POST', url: '/tokenize', payload: { prompt: 'Hi', [key]: value } })
        expect(res.statusCode).toBe(400)
        expect(res.json()).toEqual({
          error: { message: `Unsupported request argument supplied: ${key} (it applies to messages, not to a prompt)`, type: 'invalid_request_error', param: key, code: 'unsupported_parameter' },
        })
      }
      const plain = await server.app.inject({ method: 'POST', url: '/tokenize', payload: { prompt: 'Hi', tools: null, chat_template_kwargs: null } })
      expect(plain.json().tokens).toEqual(model.tokenize('Hi'))
    } finally {
      await server.app.close()
      await model.dispose()
    }
  })
})

describe('chat messages and stream_options as clients send them (in-process, the shipped model)', () => {
  let model: Model
  let server: InferenceServer
  beforeAll(async () => {
    model = await loadModel(defaultModelPath, { device: 'cpu' })
    server = new InferenceServer({ modelName: 'msgs', maxQueued: 8, bodyLimit: 1 << 20 })
    server.setModel(model, 'fp_msgs')
  })
  afterAll(async () => {
    await server.app.close()
    await model.dispose()
  })
  const chat = (payload: object) => server.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: { model: 'msgs', max_tokens: 2, temperature: 0, ...payload } })
  const user = { role: 'user', content: 'Who goes there?' }
  const call = { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Verona"}' } }

  it("an assistant message with tool_calls may leave content out, as OpenAI's API and vLLM take it; other messages may not", async () => {
    const withNull = await chat({ messages: [user, { role: 'assistant', content: null, tool_calls: [call] }, { role: 'tool', tool_call_id: 'call_1', content: 'rain' }] })
    expect(withNull.statusCode).toBe(200)
    const without = await chat({ messages: [user, { role: 'assistant', tool_calls: [call] }, { role: 'tool', tool_call_id: 'call_1', content: 'rain' }] })
    expect(without.statusCode).toBe(200)
    // The same prompt as with content null.
    expect(without.json().usage).toEqual(withNull.json().usage)
    expect(without.json().choices[0].message).toEqual(withNull.json().choices[0].message)
    for (const [messages, i] of [
      [[{ role: 'user' }], 0],
      [[user, { role: 'assistant' }, user], 1],
      [[user, { role: 'assistant', tool_calls: [] }, user], 1],
      [[user, { role: 'assistant', tool_calls: null }, user], 1],
    ] as const) {
      const r = await chat({ messages })
      expect(r.statusCode, JSON.stringify(messages)).toBe(400)
      expect(r.json().error).toMatchObject({ type: 'invalid_request_error', param: `messages[${i}].content`, code: 'missing_parameter' })
    }
  })

  it("takes an assistant message as the Python client's message.model_dump() gives it back (nulls for what it lacks)", async () => {
    const dumped = { content: 'Nay, answer me.', refusal: null, role: 'assistant', annotations: null, audio: null, function_call: null, tool_calls: null }
    const r = await chat({ messages: [user, dumped, user], user: null })
    expect(r.statusCode).toBe(200)
    const plain = await chat({ messages: [user, { role: 'assistant', content: 'Nay, answer me.' }, user] })
    expect(r.json().choices[0].message).toEqual(plain.json().choices[0].message)
    expect(r.json().usage).toEqual(plain.json().usage)
    expect((await chat({ messages: [user, { ...dumped, annotations: [] }, user] })).statusCode).toBe(200)
    // Only at their neutral values.
    for (const [key, value] of [['function_call', { name: 'f', arguments: '{}' }], ['audio', { id: 'a' }], ['annotations', [{ type: 'url_citation' }]]] as const) {
      const refused = await chat({ messages: [user, { ...dumped, [key]: value }, user] })
      expect(refused.statusCode, key).toBe(400)
      expect(refused.json().error.param).toBe(`messages[1].${key}`)
    }
    // A tool message's call id and a tool's description and parameters may be null too (vLLM's Optional fields).
    const tools = [{ type: 'function', function: { name: 'f', description: null, parameters: null } }]
    expect((await chat({ messages: [user, { role: 'tool', tool_call_id: null, content: 'x' }], tools, tool_choice: 'none' })).statusCode).toBe(200)
  })

  it('stream_options without stream is refused, as OpenAI and vLLM refuse it, instead of dropped; include_usage may be null', async () => {
    for (const stream of [undefined, false, null]) {
      for (const url of ['/v1/chat/completions', '/v1/completions']) {
        const body = url === '/v1/completions' ? { model: 'msgs', prompt: 'Hi', max_tokens: 1 } : { model: 'msgs', messages: [user], max_tokens: 1 }
        const r = await server.app.inject({ method: 'POST', url, payload: { ...body, ...(stream !== undefined && { stream }), stream_options: { include_usage: true } } })
        expect(r.statusCode).toBe(400)
        expect(r.json().error).toMatchObject({ type: 'invalid_request_error', param: 'stream_options', code: 'invalid_value' })
      }
    }
    expect((await chat({ messages: [user], stream_options: null })).statusCode).toBe(200)
    const streamed = await chat({ messages: [user], stream: true, stream_options: { include_usage: null } })
    expect(streamed.statusCode).toBe(200)
    expect(streamed.body).not.toContain('"usage"')
  })
})

describe("structural tags: vLLM's structured_outputs.structural_tag and response_format structural_tag (in-process, the shipped model)", () => {
  let model: Model
  let server: InferenceServer
  beforeAll(async () => {
    model = await loadModel(defaultModelPath, { device: 'cpu' })
    server = new InferenceServer({ modelName: 'tags', maxQueued: 8, bodyLimit: 1 << 20 })
    server.setModel(model, 'fp_tags')
  })
  afterAll(async () => {
    await server.app.close()
    await model.dispose()
  })
  const post = (url: string, payload: object) => server.app.inject({ method: 'POST', url, payload: { model: 'tags', ...payload } })
  const messages = [{ role: 'user', content: 'How is the sea tonight?' }]
  const mood = { type: 'object', properties: { mood: { enum: ['merry', 'sad'] }, loud: { type: 'boolean' } }, required: ['mood', 'loud'], additionalProperties: false }
  /** "Mood: " then a <mood> tag around JSON the schema accepts: the whole answer. */
  const format = { type: 'sequence', elements: [{ type: 'const_string', value: 'Mood: ' }, { type: 'tag', begin: '<mood>', content: { type: 'json_schema', json_schema: mood }, end: '</mood>' }] }

  it('holds the answer to the tag (its JSON parses and matches the schema), whole and streamed, as the library answers the same request', async () => {
    const body = { messages, max_tokens: 80, temperature: 0, structured_outputs: { structural_tag: JSON.stringify({ type: 'structural_tag', format }) } }
    const whole = await post('/v1/chat/completions', body)
    expect(whole.statusCode, whole.body).toBe(200)
    const text: string = whole.json().choices[0].message.content
    expect(whole.json().choices[0].finish_reason, JSON.stringify(text)).toBe('stop')
    const tagged = /^Mood: <mood>([^]*)<\/mood>$/.exec(text)
    expect(tagged, text).not.toBeNull()
    const value = JSON.parse(tagged![1]!)
    expect(Object.keys(value)).toEqual(['mood', 'loud'])
    expect(['merry', 'sad']).toContain(value.mood)
    expect(typeof value.loud).toBe('boolean')
    const lib = await model.generate(model.tokenize(messages, { chatTemplateVariables: {} }), { maxTokens: 80, responseFormat: { type: 'structural_tag', format } })
    expect(text).toBe(lib.text)
    const streamed = await post('/v1/chat/completions', { ...body, stream: true })
    const chunks = streamed.body.split('\n\n').filter((e) => e.startsWith('data: {')).map((e) => JSON.parse(e.slice(6)))
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe(text)
    // The type may be left out of the JSON text, as xgrammar reads it; response_format takes the
    // same tag, on /v1/completions too (sampled, n = 2: each choice the library's with its seed).
    const untyped = await post('/v1/chat/completions', { ...body, structured_outputs: { structural_tag: JSON.stringify({ format }) } })
    expect(untyped.json().choices[0].message.content).toBe(text)
    const viaResponseFormat = await post('/v1/chat/completions', { messages, max_tokens: 80, temperature: 0, response_format: { type: 'structural_tag', format } })
    expect(viaResponseFormat.json().choices[0].message.content).toBe(text)
    const completions = await post('/v1/completions', { prompt: 'The keeper wrote:', max_tokens: 80, temperature: 0.9, seed: 5, n: 2, response_format: { type: 'structural_tag', format } })
    expect(completions.statusCode, completions.body).toBe(200)
    for (const [i, choice] of completions.json().choices.entries()) {
      const sampled = await model.generate('The keeper wrote:', { maxTokens: 80, temperature: 0.9, seed: 5 + i, responseFormat: { type: 'structural_tag', format } })
      expect(choice.text).toBe(sampled.text)
      expect(choice.text).toMatch(/^Mood: <mood>/)
    }
  })

  it("the older {structures, triggers} form is xgrammar's triggered tags: free text, and JSON the schema accepts from each trigger on", async () => {
    const legacy = { type: 'structural_tag', structures: [{ begin: '<mood>', schema: mood, end: '</mood>' }], triggers: ['<mood'] }
    const triggered = { type: 'triggered_tags', triggers: ['<mood'], tags: [{ type: 'tag', begin: '<mood>', content: { type: 'json_schema', json_schema: mood }, end: '</mood>' }] }
    const ids = model.tokenize(messages, { chatTemplateVariables: {} })
    const lib = await model.generate(ids, { maxTokens: 24, temperature: 0.7, seed: 2, responseFormat: { type: 'structural_tag', format: triggered } })
    for (const request of [{ response_format: legacy }, { structured_outputs: { structural_tag: JSON.stringify(legacy) } }, { structured_outputs: { structural_tag: JSON.stringify({ structures: legacy.structures, triggers: legacy.triggers }) } }]) {
      const r = await post('/v1/chat/completions', { messages, max_tokens: 24, temperature: 0.7, seed: 2, ...request })
      expect(r.statusCode, r.body).toBe(200)
      expect(r.json().choices[0].message.content).toBe(lib.text)
    }
  })

  const tag = (t: object) => ({ structured_outputs: { structural_tag: JSON.stringify(t) } })
  it.each([
    [tag({ format: { type: 'tag', begin: '<a>', content: { type: 'any_text' }, end: '' } }), 'structured_outputs', 'The structural tag cannot be used: When the content is unlimited, the end of the tag format cannot be empty'],
    [tag({ format: { type: 'optional', content: { type: 'const_string', value: 'a' } } }), 'structured_outputs', 'The structural tag cannot be used: format.type "optional" is not a format xgrammar 0.1.27 knows'],
    [tag({ format: { type: 'triggered_tags', triggers: ['<a'], tags: [{ begin: '<a>', content: { type: 'any_text' }, end: '</a>' }], excludes: ['x'] } }), 'structured_outputs', 'The structural tag cannot be used: format.excludes is not a field of a triggered_tags format in xgrammar 0.1.27'],
    [tag({ structures: [{ begin: '<a>', schema: { type: 'integer', multipleOf: 2 }, end: '</a>' }], triggers: ['<a'] }), 'structured_outputs', 'The structural tag cannot be used: format.tags[0].content.json_schema: multipleOf (at #) is not supported'],
    [{ structured_outputs: { structural_tag: '{"format": ' } }, 'structured_outputs', 'Expected a structural tag as JSON text for structured_outputs.structural_tag but received text that is not JSON: '],
    [tag([1]), 'structured_outputs', 'Expected a structural tag (an object) for structured_outputs.structural_tag but received [1] of type array'],
    [tag({ type: 'structural_tag' }), 'structured_outputs', "Expected an object (xgrammar's format) for structured_outputs.structural_tag.format but received undefined"],
    [tag({ type: 'grammar', format: { type: 'any_text' } }), 'structured_outputs', "Expected 'structural_tag' for structured_outputs.structural_tag.type but received \"grammar\" of type string"],
    [tag({ format: { type: 'any_text' }, triggers: [] }), 'structured_outputs', 'Unrecognized field supplied: structured_outputs.structural_tag.triggers (a structural tag has type, format)'],
    [tag({ structures: [{ begin: '<a>', end: '</a>' }], triggers: ['<a'] }), 'structured_outputs', 'Expected {begin: string, schema: a JSON schema object, end: string} for structured_outputs.structural_tag.structures[0] but received'],
    [tag({ structures: [], triggers: '<a' }), 'structured_outputs', 'Expected an array of strings for structured_outputs.structural_tag.triggers but received "<a" of type string'],
    [{ structured_outputs: { structural_tag: { format: { type: 'any_text' } } } }, 'structured_outputs.structural_tag', 'Expected JSON text of a structural tag'],
    [{ structured_outputs: { structural_tag: '{"format": {"type": "any_text"}}', regex: 'a' } }, 'structured_outputs', 'Expected exactly one of json, regex, choice, grammar, structural_tag or json_object: true in structured_outputs but received structural_tag, regex'],
    [{ response_format: { type: 'structural_tag', structures: [{ begin: '<a>', schema: {}, end: '</a>' }], triggers: ['<b'] } }, 'response_format', 'The structural tag cannot be used: One tag does not match any trigger in a triggered tags format'],
    [{ response_format: { type: 'structural_tag', format: { type: 'regex', pattern: '[a-' } } }, 'response_format', "The structural tag cannot be used: Regex parsing error at position 4: Unclosed '['"],
    [{ response_format: { type: 'structural_tag', structures: [{ begin: '<a>', schema: {}, end: '</a>', extra: 1 }], triggers: ['<a'] } }, 'response_format', "Expected {type: 'text'}, {type: 'json_object'},"],
    [{ response_format: { type: 'structural_tag', format: { type: 'any_text' } }, structured_outputs: { regex: 'a' } }, 'response_format', 'Expected response_format text or null with structured_outputs but received structural_tag'],
  ])('refuses %j with 400 before a stream starts', async (extra, param, message) => {
    for (const stream of [false, true]) {
      const r = await post('/v1/chat/completions', { messages, max_tokens: 4, stream, ...extra })
      expect(r.statusCode, r.body).toBe(400)
      expect(r.headers['content-type']).toMatch(/^application\/json/)
      expect(r.json().error).toMatchObject({ type: 'invalid_request_error', param, code: 'invalid_value' })
      expect(r.json().error.message).toContain(message)
    }
  })
})

describe('CORS (--allowed-origins)', () => {
  const preflight = (server: InferenceServer, origin: string) =>
    server.app.inject({
      method: 'OPTIONS',
      url: '/v1/chat/completions',
      headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization,content-type' },
    })

  it('answers the allowed origins, preflights before the API key, and errors with the header too', async () => {
    const server = new InferenceServer({ modelName: 'web', maxQueued: 8, bodyLimit: 1 << 20, apiKey: 'sesame', allowedOrigins: ['http://localhost:5173'] })
    try {
      const ok = await preflight(server, 'http://localhost:5173')
      expect(ok.statusCode).toBe(204)
      expect(ok.headers['access-control-allow-origin']).toBe('http://localhost:5173')
      expect(ok.headers['access-control-allow-methods']).toBe('GET, POST')
      expect(ok.headers['access-control-allow-headers']).toBe('authorization,content-type')
      // The openai package in a browser sends its own headers (x-stainless-*): a preflight that
      // names them must allow them, or the browser never sends the request.
      const sdk = 'accept,authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-os,x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version'
      const fromSdk = await server.app.inject({
        method: 'OPTIONS',
        url: '/v1/chat/completions',
        headers: { origin: 'http://localhost:5173', 'access-control-request-method': 'POST', 'access-control-request-headers': sdk },
      })
      expect(fromSdk.statusCode).toBe(204)
      expect(fromSdk.headers['access-control-allow-headers']).toBe(sdk)
      // Another origin: no Access-Control-Allow-Origin, so its browser keeps the answer from the page.
      expect((await preflight(server, 'http://evil.example')).headers['access-control-allow-origin']).toBeUndefined()
      // The request itself still needs the key; its 401 carries the header, so the page can read why.
      const refused = await server.app.inject({ method: 'GET', url: '/v1/models', headers: { origin: 'http://localhost:5173' } })
      expect(refused.statusCode).toBe(401)
      expect(refused.headers['access-control-allow-origin']).toBe('http://localhost:5173')
      const loading = await server.app.inject({ method: 'GET', url: '/v1/models', headers: { origin: 'http://localhost:5173', authorization: 'Bearer sesame' } })
      expect(loading.statusCode).toBe(503)
      expect(loading.headers['access-control-allow-origin']).toBe('http://localhost:5173')
    } finally {
      await server.app.close()
    }
  })

  it('a preflight while the server shuts down gets 503 as every other request; an OPTIONS without Origin gets a JSON 400', async () => {
    const server = new InferenceServer({ modelName: 'web', maxQueued: 8, bodyLimit: 1 << 20, apiKey: 'sesame', allowedOrigins: ['http://localhost:5173'] })
    try {
      const bare = await server.app.inject({ method: 'OPTIONS', url: '/v1/chat/completions', headers: { 'access-control-request-method': 'POST' } })
      expect(bare.statusCode).toBe(400)
      expect(bare.json()).toEqual({
        error: {
          message: 'Expected the headers Origin and Access-Control-Request-Method in a CORS preflight (OPTIONS) but received no Origin',
          type: 'invalid_request_error',
          param: null,
          code: 'invalid_preflight',
        },
      })
      const noMethod = await server.app.inject({ method: 'OPTIONS', url: '/v1/chat/completions', headers: { origin: 'http://localhost:5173' } })
      expect(noMethod.statusCode).toBe(400)
      expect(noMethod.json().error.message).toMatch(/but received no Access-Control-Request-Method$/)
      expect(noMethod.headers['access-control-allow-origin']).toBe('http://localhost:5173')

      // Requests injected in the tick that begins the shutdown arrive after it began.
      await server.app.ready()
      const closing = server.shutdown(1000)
      const during = await Promise.all([preflight(server, 'http://localhost:5173'), server.app.inject({ method: 'GET', url: '/health', headers: { origin: 'http://localhost:5173' } })])
      for (const r of during) {
        expect(r.statusCode).toBe(503)
        expect(r.json().error).toMatchObject({ type: 'service_unavailable', code: 'shutting_down' })
        expect(r.headers['access-control-allow-origin']).toBe('http://localhost:5173')
        expect(r.headers.connection).toBe('close')
      }
      await closing
    } finally {
      await server.app.close()
    }
  })

  it("'*' allows any origin; without the option there is no CORS at all", async () => {
    const any = new InferenceServer({ modelName: 'web', maxQueued: 8, bodyLimit: 1 << 20, allowedOrigins: '*' })
    const none = new InferenceServer({ modelName: 'web', maxQueued: 8, bodyLimit: 1 << 20, apiKey: 'sesame' })
    try {
      expect((await preflight(any, 'http://anywhere.example')).headers['access-control-allow-origin']).toBe('*')
      const plain = await preflight(none, 'http://localhost:5173')
      expect(plain.statusCode).toBe(401)
      expect(plain.headers['access-control-allow-origin']).toBeUndefined()
      const health = await none.app.inject({ method: 'GET', url: '/health', headers: { origin: 'http://localhost:5173' } })
      expect(health.headers['access-control-allow-origin']).toBeUndefined()
    } finally {
      await any.app.close()
      await none.app.close()
    }
  })
})

describe('routes', () => {
  it('a known path asked with another method gets 405 and its methods; an unknown one 404', async () => {
    const server = new InferenceServer({ modelName: 'routes', maxQueued: 8, bodyLimit: 1 << 20 })
    try {
      const get = await server.app.inject({ method: 'GET', url: '/v1/completions?x=1' })
      expect(get.statusCode).toBe(405)
      expect(get.headers.allow).toBe('POST')
      expect(get.json()).toEqual({
        error: { message: 'Method GET is not allowed for /v1/completions; it takes POST', type: 'invalid_request_error', param: null, code: 'method_not_allowed' },
      })
      const post = await server.app.inject({ method: 'POST', url: '/v1/models', payload: {} })
      expect(post.statusCode).toBe(405)
      expect(post.headers.allow).toBe('GET')
      const unknown = await server.app.inject({ method: 'GET', url: '/v1/engines' })
      expect(unknown.statusCode).toBe(404)
      expect(unknown.json().error.code).toBe('not_found')
    } finally {
      await server.app.close()
    }
  })
})

describe('max_new_tokens of the sampling defaults (--generation-config)', () => {
  it("caps max_tokens as vLLM's server limit: the request's, 16 for completions, the context's rest for chat", async () => {
    const tokenizer = await Tokenizer.load(defaultModelPath)
    const prompt = tokenizer.encodePrompt('Count:', false)
    const script = Array.from({ length: 60 }, (_, i) => 1000 + i)
    const eos = tokenizer.eosTokenIds[0]!
    const model = new Model({ forward: new ScriptedModel(4096, prompt.length, script, eos), tokenizer, path: 'capped' }, { maxBatchSize: 4, prefillChunkSize: 256 })
    const tokens = async (maxTokens: number, payload: object, url = '/v1/completions') => {
      const server = new InferenceServer({ modelName: 'capped', maxQueued: 8, bodyLimit: 1 << 20, samplingDefaults: { maxTokens } })
      server.setModel(model, 'fp_capped')
      try {
        const res = await server.app.inject({ method: 'POST', url, payload: { model: 'capped', temperature: 0, ...payload } })
        expect(res.statusCode, res.body).toBe(200)
        return res.json().usage.completion_tokens as number
      } finally {
        await server.app.close()
      }
    }
    expect(await tokens(5, { prompt: prompt })).toBe(5)
    expect(await tokens(30, { prompt: prompt })).toBe(16)
    expect(await tokens(5, { prompt: prompt, max_tokens: 20 })).toBe(5)
    expect(await tokens(30, { prompt: prompt, max_tokens: 20 })).toBe(20)
    // Chat: the prompt is the template's, so the script is cut at the cap, whatever the prompt's length.
    expect(await tokens(7, { messages: [{ role: 'user', content: 'Count:' }] }, '/v1/chat/completions')).toBe(7)
    expect(await tokens(7, { messages: [{ role: 'user', content: 'Count:' }], max_completion_tokens: 9 }, '/v1/chat/completions')).toBe(7)
    await model.dispose()
  })
})
