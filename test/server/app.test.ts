// The server in-process (Fastify's inject, no socket): /health while the model loads, and streamed
// text that never splits a multi-byte character, with a scripted forward pass that makes the
// shipped tokenizer's byte tokens come out one by one.
import { cpSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultModelPath, loadModel, Model } from '../../lib/api.js'
import type { ForwardModel, SequenceChunk, StepTokens, TokenChoice } from '../../lib/scheduler.js'
import { chooseOnLogits } from '../../lib/model/output-head.js'
import { InferenceServer } from '../../lib/server/app.js'
import { systemFingerprint } from '../../lib/server/fingerprint.js'
import { tensorFrom } from '../../lib/tensor.js'
import { Tokenizer } from '../../lib/tokenizer.js'
import type { NativeTensor } from '../../lib/native.js'

/** Logits that make `script[i]` the greedy choice at generated position i (after a prompt of `promptLength` tokens). */
class ScriptedModel implements ForwardModel {
  readonly device = 'cpu' as const
  readonly config: { vocabSize: number; maxPositionEmbeddings: number }
  readonly kvBlockSize = 16
  readonly kvBlocks = 64
  readonly maxBatchTokens = 256
  private last: NativeTensor | null = null

  constructor(
    vocabSize: number,
    private readonly promptLength: number,
    private readonly script: number[],
    private readonly eos: number,
  ) {
    this.config = { vocabSize, maxPositionEmbeddings: 1024 }
  }

  step(chunks: SequenceChunk[], choices: TokenChoice[], topN: number): Promise<StepTokens> {
    return chooseOnLogits(this.logits(chunks), choices, topN)
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
  }
}

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
})

describe('chat_template_kwargs (in-process)', () => {
  it('passes variables to the chat template on /v1/chat/completions and /tokenize, and refuses those the request sets', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'detinfer-kwargs-'))
    cpSync(defaultModelPath, dir, { recursive: true })
    writeFileSync(
      join(dir, 'chat_template.jinja'),
      "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}" +
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}",
    )
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
