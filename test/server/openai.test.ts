// `detinfer serve` driven by the official `openai` client, as a child process with the shipped
// model, on the CPU (on the GPU when there is one): both endpoints streamed and not, log-probs and usage, answers that do not depend
// on the load (64 concurrent requests, some cancelled, each equal to the same request sent alone),
// every error case, overload, authentication and graceful shutdown. (Whole characters in streamed
// text: test/server/app.test.ts, where a scripted model makes one character span several tokens.)
import { spawnSync } from 'node:child_process'
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { request as httpRequest } from 'node:http'
import { connect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import OpenAI from 'openai'
import type { ChatCompletionChunk } from 'openai/resources/chat/completions'
import type { Completion } from 'openai/resources/completions'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { defaultModelPath, loadModel, type Model } from '../../lib/api.js'
import { ENCODE_TIMEOUT_MS } from '../../lib/encode-worker.js'
import { buildDist, DEVICE, metric, post, startServer, type RunningServer } from '../helpers/server.js'
import { BACKTRACKING_NORMALIZER, THINKING_TEMPLATE } from '../helpers/templates.js'
import { strictHermesCallsFormat } from '../../lib/server/tool-calls.js'

const SYSTEM = 'You are a lighthouse keeper who answers in one short sentence about the sea and the light.'
const QUESTIONS = ['What do you see tonight?', 'Is the storm coming?', 'Who was the last ship?', 'Why do you count the steps?']
const TEXTS = ['Once upon a time', 'The old lighthouse keeper', 'In the harbour the boats']

/** What a client can compare of one choice: text, log-probs and why it ended (finish_reason, and vLLM's stop_reason). */
interface Answer {
  text: string
  tokens: string[]
  logprobs: number[]
  finish: string | null
  stop?: unknown
}

/** vLLM's stop_reason of a choice or chunk (the openai client's types do not have it). */
const stopReason = (choice: object): unknown => (choice as { stop_reason?: unknown }).stop_reason

function expectNoStackTrace(text: string) {
  expect(text).not.toMatch(/^\s+at /m)
  expect(text).not.toMatch(/\.(ts|js):\d+/)
}

function expectErrorBody(json: Record<string, any>, status: number, code: string | null, param?: string | null) {
  expect(Object.keys(json)).toEqual(['error'])
  expect(Object.keys(json.error).sort()).toEqual(['code', 'message', 'param', 'type'])
  expect(typeof json.error.message).toBe('string')
  if (code !== null) expect(json.error.code).toBe(code)
  if (param !== undefined) expect(json.error.param).toBe(param)
  expect(status).toBeGreaterThanOrEqual(400)
}

type Kind = 'chat' | 'completions'

async function ask(
  client: OpenAI,
  kind: Kind,
  body: Record<string, unknown>,
  stream: boolean,
  signal?: AbortSignal,
  onChunk?: (choice: ChatCompletionChunk.Choice | Completion['choices'][number]) => void,
): Promise<Answer> {
  const answer: Answer = { text: '', tokens: [], logprobs: [], finish: null }
  if (kind === 'chat') {
    if (!stream) {
      const r = await client.chat.completions.create({ ...(body as any), stream: false }, { signal })
      const c = r.choices[0]!
      return {
        text: c.message.content ?? '',
        tokens: c.logprobs?.content?.map((t) => t.token) ?? [],
        logprobs: c.logprobs?.content?.map((t) => t.logprob) ?? [],
        finish: c.finish_reason,
        stop: stopReason(c),
      }
    }
    const s = (await client.chat.completions.create({ ...(body as any), stream: true }, { signal })) as unknown as AsyncIterable<ChatCompletionChunk>
    for await (const chunk of s) {
      const c = chunk.choices[0]
      if (!c) continue
      answer.text += c.delta.content ?? ''
      for (const t of c.logprobs?.content ?? []) {
        answer.tokens.push(t.token)
        answer.logprobs.push(t.logprob)
      }
      if (c.finish_reason) {
        answer.finish = c.finish_reason
        answer.stop = stopReason(c)
      }
      onChunk?.(c)
    }
    return answer
  }
  if (!stream) {
    const r = await client.completions.create({ ...(body as any), stream: false }, { signal })
    const c = r.choices[0]!
    return { text: c.text, tokens: c.logprobs?.tokens ?? [], logprobs: (c.logprobs?.token_logprobs ?? []) as number[], finish: c.finish_reason, stop: stopReason(c) }
  }
  const s = (await client.completions.create({ ...(body as any), stream: true }, { signal })) as unknown as AsyncIterable<Completion>
  for await (const chunk of s) {
    const c = chunk.choices[0]
    if (!c) continue
    answer.text += c.text
    answer.tokens.push(...(c.logprobs?.tokens ?? []))
    answer.logprobs.push(...((c.logprobs?.token_logprobs ?? []) as number[]))
    if (c.finish_reason) {
      answer.finish = c.finish_reason
      answer.stop = stopReason(c)
    }
    onChunk?.(c)
  }
  return answer
}

describe(`detinfer serve (openai client, ${DEVICE}, shipped model)`, () => {
  let server: RunningServer
  let client: OpenAI
  let model: Model // the library in this process, for comparison

  beforeAll(async () => {
    buildDist()
    server = await startServer([])
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'not-needed', maxRetries: 0 })
    model = await loadModel(defaultModelPath, { device: DEVICE })
  })
  afterAll(async () => {
    await model?.dispose()
    if (server) expect(await server.stop()).toBe(0)
  })

  it('lists its model and reports health with the system fingerprint', async () => {
    const models = await client.models.list()
    expect(models.data.map((m) => m.id)).toEqual(['default'])
    expect(await client.models.retrieve('default')).toEqual(models.data[0])
    await expect(client.models.retrieve('other')).rejects.toMatchObject({ status: 404, code: 'model_not_found' })
    const health = await (await fetch(`${server.url}/health`)).json()
    expect(health).toMatchObject({ status: 'ok', model: 'default' })
    expect(health.system_fingerprint).toMatch(/^fp_[0-9a-f]{16}$/)
  })

  it('completions: text, log-probs, usage and finish_reason; streamed equals whole; equals the library', async () => {
    const body = { model: 'default', prompt: TEXTS[0]!, max_tokens: 10, temperature: 0, logprobs: 0 }
    const r = await client.completions.create(body)
    const c = r.choices[0]!
    expect(r.object).toBe('text_completion')
    expect(r.system_fingerprint).toMatch(/^fp_/)
    expect(c.finish_reason).toMatch(/^(stop|length)$/)
    const lib = await model.generate(TEXTS[0]!, { maxTokens: 10 })
    expect(c.text).toBe(lib.text)
    expect(c.logprobs!.token_logprobs).toEqual(lib.logprobs)
    expect(c.logprobs!.tokens!.length).toBe(lib.tokens.length)
    expect(c.logprobs!.text_offset![0]).toBe(0)
    expect(r.usage).toEqual({ prompt_tokens: model.tokenize(TEXTS[0]!).length, completion_tokens: lib.tokens.length, total_tokens: model.tokenize(TEXTS[0]!).length + lib.tokens.length })
    const streamed = await ask(client, 'completions', body, true)
    expect(streamed).toEqual({ text: c.text, tokens: c.logprobs!.tokens, logprobs: c.logprobs!.token_logprobs, finish: c.finish_reason, stop: stopReason(c) })
  })

  it('chat: the template, log-probs with bytes, usage; streamed with include_usage equals whole', async () => {
    const messages = [
      { role: 'system' as const, content: SYSTEM },
      { role: 'user' as const, content: QUESTIONS[0]! },
    ]
    const body = { model: 'default', messages, max_tokens: 10, temperature: 0.8, seed: 42, logprobs: true }
    const r = await client.chat.completions.create(body)
    const c = r.choices[0]!
    expect(r.object).toBe('chat.completion')
    expect(c.message.role).toBe('assistant')
    const lib = await model.generate(messages, { maxTokens: 10, temperature: 0.8, seed: 42 })
    expect(c.message.content).toBe(lib.text)
    expect(c.logprobs!.content!.map((t) => t.logprob)).toEqual(lib.logprobs)
    // The bytes of the tokens are the bytes of the text (special tokens aside).
    for (const t of c.logprobs!.content!) expect(Array.isArray(t.bytes)).toBe(true)
    expect(r.usage!.prompt_tokens).toBe(model.tokenize(messages).length)
    expect(r.usage!.completion_tokens).toBe(lib.tokens.length)
    expect((r as unknown as { seed: number }).seed).toBe(42)

    const s = await client.chat.completions.create({ ...body, stream: true, stream_options: { include_usage: true } })
    let text = ''
    const lps: number[] = []
    let usage: unknown = null
    let roles = 0
    for await (const chunk of s) {
      expect(chunk.object).toBe('chat.completion.chunk')
      expect(chunk.system_fingerprint).toBe(r.system_fingerprint)
      if (chunk.usage) usage = chunk.usage
      for (const ch of chunk.choices) {
        if (ch.delta.role) roles++
        text += ch.delta.content ?? ''
        lps.push(...(ch.logprobs?.content ?? []).map((t) => t.logprob))
      }
    }
    expect(roles).toBe(1)
    expect(text).toBe(c.message.content)
    expect(lps).toEqual(lib.logprobs)
    expect(usage).toEqual(r.usage)
  })

  it('top_logprobs: the most likely alternatives, most likely first (chat and completions), and the chosen token among them (completions)', async () => {
    const r = await client.chat.completions.create({
      model: 'default',
      messages: [{ role: 'user', content: QUESTIONS[1]! }],
      max_tokens: 6,
      temperature: 0,
      logprobs: true,
      top_logprobs: 3,
    })
    for (const t of r.choices[0]!.logprobs!.content!) {
      expect(t.top_logprobs.length).toBe(3)
      const lps = t.top_logprobs.map((a) => a.logprob)
      expect([...lps].sort((a, b) => b - a)).toEqual(lps)
      expect(t.logprob).toBe(lps[0]) // greedy: the chosen token is the most likely
    }
    const c = await client.completions.create({ model: 'default', prompt: TEXTS[1]!, max_tokens: 5, temperature: 0, logprobs: 2 })
    for (const alternatives of c.choices[0]!.logprobs!.top_logprobs!) expect(Object.keys(alternatives).length).toBeGreaterThanOrEqual(1)
    // Completions' alternatives always hold the chosen token (OpenAI: up to logprobs + 1 of them), so logprobs: 0 gives it alone.
    const sampled = await client.completions.create({ model: 'default', prompt: TEXTS[1]!, max_tokens: 8, temperature: 1.5, seed: 9, logprobs: 0 })
    const lp = sampled.choices[0]!.logprobs!
    lp.top_logprobs!.forEach((alternatives, k) => expect(alternatives).toEqual({ [lp.tokens![k]!]: lp.token_logprobs![k] }))
    const two = await client.completions.create({ model: 'default', prompt: TEXTS[1]!, max_tokens: 8, temperature: 1.5, seed: 9, logprobs: 2 })
    two.choices[0]!.logprobs!.top_logprobs!.forEach((alternatives, k) => {
      expect(alternatives[lp.tokens![k]!]).toBe(lp.token_logprobs![k])
      expect(Object.keys(alternatives).length).toBeLessThanOrEqual(3)
    })
  })

  it('min_p (an extension) is passed to the sampler', async () => {
    const body = { model: 'default', prompt: TEXTS[2]!, max_tokens: 8, temperature: 1.5, seed: 5, min_p: 0.2 }
    const r = await post(`${server.url}/v1/completions`, body)
    expect(r.status).toBe(200)
    const lib = await model.generate(TEXTS[2]!, { maxTokens: 8, temperature: 1.5, seed: 5, minP: 0.2 } as never)
    expect(r.json.choices[0].text).toBe(lib.text)
  })

  it('n > 1: choice i is the request with seed + i', async () => {
    const body = { model: 'default', prompt: TEXTS[1]!, max_tokens: 8, temperature: 1, seed: 100, logprobs: 0 }
    const r = await client.completions.create({ ...body, n: 3 })
    expect(r.choices.map((c) => c.index)).toEqual([0, 1, 2])
    for (let i = 0; i < 3; i++) {
      const solo = await client.completions.create({ ...body, seed: 100 + i })
      expect(r.choices[i]!.text).toBe(solo.choices[0]!.text)
      expect(r.choices[i]!.logprobs!.token_logprobs).toEqual(solo.choices[0]!.logprobs!.token_logprobs)
    }
    expect(new Set(r.choices.map((c) => c.text)).size).toBeGreaterThan(1)
  })

  it("a seed is any integer JSON holds exactly, as vLLM's are 64-bit: the noise takes it modulo 2^32", async () => {
    const body = { model: 'default', prompt: TEXTS[1]!, max_tokens: 8, temperature: 1, logprobs: 0 }
    const text = async (seed: number, n = 1) => {
      const r = await client.completions.create({ ...body, seed, n })
      expect((r as Completion & { seed?: number }).seed).toBe(seed)
      return r.choices.map((c) => c.text)
    }
    const [top] = await text(2 ** 32 - 1)
    expect(await text(-1)).toEqual([top])
    expect(await text(2 ** 40 - 1)).toEqual([top])
    expect(await text(5)).toEqual(await text(2 ** 32 + 5))
    // Choice i samples with seed + i, wrapping past 2^32 - 1.
    expect(await text(2 ** 32 - 1, 2)).toEqual([top, ...(await text(0))])
    const lib = await model.generate(TEXTS[1]!, { maxTokens: 8, temperature: 1, seed: 2 ** 32 - 1 })
    expect(top).toBe(lib.text)
  })

  it('64 concurrent requests, some cancelled midway: every answer equals the same request sent alone', async () => {
    const requests = Array.from({ length: 64 }, (_, i) => {
      const kind: Kind = i % 2 === 0 ? 'chat' : 'completions'
      const seeded = i % 4 >= 2
      const cancel = i % 8 === 5
      const common = {
        model: 'default',
        max_tokens: cancel ? 400 : 10,
        temperature: seeded ? 0.9 : 0,
        ...(seeded && { seed: 1000 + i, top_p: 0.95 }),
      }
      const body =
        kind === 'chat'
          ? { ...common, logprobs: true, messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: QUESTIONS[i % QUESTIONS.length]! }] }
          : { ...common, logprobs: 0, prompt: `${TEXTS[i % TEXTS.length]!} (${i % 5})` }
      return { kind, body, stream: cancel || i % 3 === 0, cancel }
    })
    const solo: (Answer | null)[] = []
    for (const r of requests) solo.push(r.cancel ? null : await ask(client, r.kind, r.body, r.stream))

    let cancelled = 0
    const together = await Promise.all(
      requests.map(async (r) => {
        if (!r.cancel) return ask(client, r.kind, r.body, r.stream)
        // Cancelled after its first chunk: the client's stream ends early (the openai client ends
        // an aborted stream quietly), without a finish_reason.
        const abort = new AbortController()
        const partial = await ask(client, r.kind, r.body, true, abort.signal, () => abort.abort()).catch(() => null)
        if (partial === null || partial.finish === null) cancelled++
        return null
      }),
    )
    expect(cancelled).toBeGreaterThanOrEqual(4)
    for (let i = 0; i < requests.length; i++) {
      if (requests[i]!.cancel) continue
      expect(together[i], `request ${i}`).toEqual(solo[i])
      expect(solo[i]!.logprobs.length).toBeGreaterThan(0)
    }
    // Cancelled and finished requests alike gave their cache blocks back.
    await expect.poll(() => metric(server.url, 'detinfer_kv_cache_blocks_used'), { timeout: 5000 }).toBe(0)
    expect(await metric(server.url, 'detinfer_batch_size')).toBe(0)
    expect(await metric(server.url, 'detinfer_prefix_cache_hit_tokens_total')).toBeGreaterThan(0)
  })

  it('a client that disconnects mid-stream frees its KV blocks at once, and memory comes back', async () => {
    const body = { model: 'default', prompt: TEXTS[0]!, max_tokens: 400, temperature: 0.7, seed: 1, stream: true }
    const disconnectMany = async (count: number) => {
      await Promise.all(
        Array.from({ length: count }, async (_, i) => {
          const abort = new AbortController()
          const res = await fetch(`${server.url}/v1/completions`, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ ...body, seed: i }),
            signal: abort.signal,
          })
          const reader = res.body!.getReader()
          await reader.read()
          await reader.read()
          abort.abort()
        }),
      )
    }
    const gone = () => metric(server.url, 'detinfer_requests_total{endpoint="/v1/completions",status="499"}').catch(() => 0)
    const goneBefore = await gone()
    await disconnectMany(16)
    await expect.poll(() => metric(server.url, 'detinfer_kv_cache_blocks_used'), { timeout: 5000 }).toBe(0)
    // Requests whose client went away get no response, and are counted as 499.
    await expect.poll(gone, { timeout: 5000 }).toBe(goneBefore + 16)
    const before = await metric(server.url, 'detinfer_process_resident_memory_bytes')
    await disconnectMany(48)
    // Mid-stream: the blocks were in use while the streams ran, and come back once they are gone.
    await expect.poll(() => metric(server.url, 'detinfer_kv_cache_blocks_used'), { timeout: 5000 }).toBe(0)
    expect(await metric(server.url, 'detinfer_batch_size')).toBe(0)
    expect(await metric(server.url, 'detinfer_queue_depth')).toBe(0)
    const after = await metric(server.url, 'detinfer_process_resident_memory_bytes')
    expect(after - before).toBeLessThan(64 * 2 ** 20)
    // A request after all that is served as usual.
    expect((await client.completions.create({ model: 'default', prompt: 'Hi', max_tokens: 2, temperature: 0 })).choices.length).toBe(1)
  })

  it('echo with logprobs, as lm-evaluation-harness asks for log-likelihoods: the prompt scored bit for bit as the library scores it', async () => {
    // local-completions' loglikelihood request: token-id prompts, one greedy token, the prompt echoed with top-1 log-probs.
    const contexts = [model.tokenize('ROMEO: What say'), model.tokenize('The old lighthouse keeper')]
    const continuations = [model.tokenize(' you, my lord', { addSpecialTokens: false }), model.tokenize(' counts the steps', { addSpecialTokens: false })]
    const prompts = contexts.map((c, i) => [...c, ...continuations[i]!])
    const r = await post(`${server.url}/v1/completions`, { model: 'default', prompt: prompts, temperature: 0, max_tokens: 1, logprobs: 1, seed: 1234, echo: true })
    expect(r.status).toBe(200)
    const choices = [...r.json.choices].sort((a: any, b: any) => a.index - b.index)
    expect(choices.length).toBe(2)
    for (const [i, ids] of prompts.entries()) {
      const lp = choices[i].logprobs
      expect(lp.tokens.length).toBe(ids.length + 1)
      expect(lp.token_logprobs[0]).toBeNull()
      expect(lp.top_logprobs[0]).toBeNull()
      const scored = await model.score(ids.slice(0, 1), ids.slice(1), { topLogprobs: 1 })
      expect(lp.token_logprobs.slice(1, -1)).toEqual(scored.logprobs)
      // The harness's is_greedy: a token is the greedy one when its log-prob is the largest of its
      // top_logprobs, which hold the most likely token and the chosen one (OpenAI's logprobs + 1).
      scored.tokens.forEach((token, k) => {
        const top = lp.top_logprobs[k + 1] as Record<string, number>
        const best = scored.topLogprobs![k]![0]!
        expect(top[model.detokenize([best.token])]).toBe(best.logprob)
        expect(Object.keys(top).length).toBe(best.token === token ? 1 : 2)
        expect(Math.max(...Object.values(top)) === lp.token_logprobs[k + 1]).toBe(best.token === token)
      })
      // The generated token after the echo is the library's, and the text starts with the prompt's.
      const generated = await model.generate(ids, { maxTokens: 1 })
      expect(lp.token_logprobs.at(-1)).toBe(generated.logprobs[0])
      expect(choices[i].text).toBe(model.detokenize(ids) + generated.text)
      expect(choices[i].finish_reason).toBe(generated.finishReason === 'length' ? 'length' : 'stop')
    }
    expect(r.json.usage).toEqual({ prompt_tokens: prompts[0]!.length + prompts[1]!.length, completion_tokens: 2, total_tokens: prompts[0]!.length + prompts[1]!.length + 2 })
  })

  it('echo of a text prompt: whole and streamed agree, text offsets run on into the completion, and max_tokens 0 scores the prompt alone', async () => {
    const body = { model: 'default', prompt: TEXTS[1]!, max_tokens: 4, temperature: 0, logprobs: 0, echo: true }
    const whole = await client.completions.create(body)
    const c = whole.choices[0]!
    const lib = await model.generate(TEXTS[1]!, { maxTokens: 4 })
    expect(c.text).toBe(TEXTS[1]! + lib.text)
    const promptIds = model.tokenize(TEXTS[1]!)
    expect(c.logprobs!.tokens!.length).toBe(promptIds.length + lib.tokens.length)
    expect(c.logprobs!.token_logprobs!.slice(promptIds.length)).toEqual(lib.logprobs)
    expect(c.logprobs!.text_offset![promptIds.length]).toBe(TEXTS[1]!.length)
    expect(whole.usage!.completion_tokens).toBe(lib.tokens.length)
    const streamed = await ask(client, 'completions', body, true)
    expect(streamed).toEqual({ text: c.text, tokens: c.logprobs!.tokens, logprobs: c.logprobs!.token_logprobs, finish: c.finish_reason, stop: stopReason(c) })

    const alone = await client.completions.create({ ...body, max_tokens: 0 })
    expect(alone.choices[0]!.text).toBe(TEXTS[1]!)
    expect(alone.choices[0]!.finish_reason).toBe('length')
    expect(alone.choices[0]!.logprobs!.token_logprobs).toEqual(c.logprobs!.token_logprobs!.slice(0, promptIds.length))
    expect(alone.usage).toEqual({ prompt_tokens: promptIds.length, completion_tokens: 0, total_tokens: promptIds.length })
    expect(await ask(client, 'completions', { ...body, max_tokens: 0 }, true)).toEqual({
      text: TEXTS[1]!,
      tokens: alone.choices[0]!.logprobs!.tokens,
      logprobs: alone.choices[0]!.logprobs!.token_logprobs,
      finish: 'length',
      stop: null,
    })
    // Without logprobs the prompt's text alone comes first.
    const plain = await client.completions.create({ model: 'default', prompt: TEXTS[1]!, max_tokens: 4, temperature: 0, echo: true })
    expect(plain.choices[0]!.text).toBe(c.text)
    expect(plain.choices[0]!.logprobs).toBeNull()
  })

  it('/tokenize, /detokenize and /tokenizer_info as vLLM serves them: the model\'s own tokenization', async () => {
    const tokenize = (body: unknown) => post(`${server.url}/tokenize`, body)
    const text = 'ROMEO: naïve 🙂'
    expect((await tokenize({ prompt: text })).json).toEqual({ count: model.tokenize(text).length, max_model_len: model.contextLength, tokens: model.tokenize(text) })
    const bare = model.tokenize(text, { addSpecialTokens: false })
    expect((await tokenize({ model: 'default', prompt: text, add_special_tokens: false })).json.tokens).toEqual(bare)
    const messages = [{ role: 'user', content: 'Who art thou?' }]
    expect((await tokenize({ messages })).json.tokens).toEqual(model.tokenize(messages))
    for (const [body, param, message] of [
      [{}, 'prompt', 'Expected exactly one of prompt (a text) and messages (a conversation) but received neither'],
      [{ prompt: 'a', messages }, 'messages', 'Expected exactly one of prompt (a text) and messages (a conversation) but received both'],
      [{ messages, add_special_tokens: true }, 'add_special_tokens', 'Expected false or null for add_special_tokens with messages'],
      [{ messages, add_generation_prompt: false }, 'add_generation_prompt', 'Unsupported value for add_generation_prompt: false without continue_final_message: true'],
      [{ prompt: 'a', model: 'other' }, 'model', 'The model "other" does not exist'],
    ] as const) {
      const r = await tokenize(body)
      expectErrorBody(r.json, r.status, null, param)
      expect(r.json.error.message).toContain(message)
    }
    const ids = model.tokenize('The old lighthouse keeper')
    expect((await post(`${server.url}/detokenize`, { tokens: ids })).json).toEqual({ prompt: model.detokenize(ids) })
    const bad = await post(`${server.url}/detokenize`, { tokens: [1, model.vocabSize] })
    expectErrorBody(bad.json, bad.status, 'invalid_value', 'tokens')
    expect(bad.json.error.message).toBe(`Expected an integer between 0 and ${model.vocabSize - 1} for tokens[1] but received ${model.vocabSize} of type number`)
    const info = await (await fetch(`${server.url}/tokenizer_info`)).json()
    expect(info).toEqual({
      tokenizer_class: 'PreTrainedTokenizerFast',
      bos_token: model.specialTokens['bos_token'] ?? null,
      eos_token: '<|endoftext|>',
      pad_token: model.specialTokens['pad_token'] ?? null,
      unk_token: model.specialTokens['unk_token'] ?? null,
      chat_template: model.chatTemplate,
      model_max_length: model.contextLength,
    })
    // A remote tokenizer finds EOS's id by encoding its text.
    expect((await tokenize({ prompt: info.eos_token, add_special_tokens: false })).json.tokens).toEqual([model.tokenize(info.eos_token, { addSpecialTokens: false })[0]])
  })

  it('stop_token_ids end a choice at an id, kept as EOS is; ignore_eos reaches the library; both as the library gives them', async () => {
    const lib = await model.generate(TEXTS[2]!, { maxTokens: 12 })
    const id = lib.tokens[4]!
    const at = lib.tokens.indexOf(id)
    const body = { model: 'default', prompt: TEXTS[2]!, max_tokens: 12, temperature: 0, logprobs: 0, stop_token_ids: [id], ignore_eos: true }
    const r = await post(`${server.url}/v1/completions`, body)
    expect(r.status).toBe(200)
    const stopped = await model.generate(TEXTS[2]!, { maxTokens: 12, stopTokenIds: [id], ignoreEos: true })
    expect(stopped.tokens).toEqual(lib.tokens.slice(0, at + 1))
    expect(r.json.choices[0].finish_reason).toBe('stop')
    expect(r.json.choices[0].text).toBe(stopped.text)
    expect(r.json.choices[0].logprobs.token_logprobs).toEqual(stopped.logprobs)
    expect(r.json.usage.completion_tokens).toBe(at + 1)
    const bad = await post(`${server.url}/v1/completions`, { ...body, stop_token_ids: [1, model.vocabSize] })
    expectErrorBody(bad.json, bad.status, 'invalid_value', 'stop_token_ids')
    expect(bad.json.error.message).toBe(`Expected an integer between 0 and ${model.vocabSize - 1} for stop_token_ids[1] but received ${model.vocabSize} of type number`)
  })

  it("stop_reason, as vLLM's: the stop string or stop_token_ids id that ended a choice, null at max_tokens; streamed on the finish_reason chunk, as whole", async () => {
    // (The model's EOS gives null: test/server/app.test.ts, where a scripted model reaches it.)
    const prompts = { completions: TEXTS[0]!, chat: [{ role: 'user' as const, content: QUESTIONS[0]! }] }
    for (const kind of ['completions', 'chat'] as const) {
      const lib = await model.generate(prompts[kind], { maxTokens: 16, ignoreEos: true })
      const stop = lib.text.slice(6, 9)
      const id = lib.tokens[5]!
      const absent = Array.from({ length: model.vocabSize }, (_, t) => t).find((t) => !lib.tokens.includes(t))!
      const common = { model: 'default', ...(kind === 'chat' ? { messages: prompts.chat } : { prompt: prompts.completions }), max_tokens: 16, temperature: 0, ignore_eos: true }
      // The one that ended the choice is listed second, after one that never occurs.
      for (const [extra, finish, expected] of [
        [{ stop: ['never in it', stop] }, 'stop', stop],
        [{ stop_token_ids: [absent, id] }, 'stop', id],
        [{ max_tokens: 4 }, 'length', null],
      ] as const) {
        const body = { ...common, ...extra }
        const whole = await ask(client, kind, body, false)
        expect(whole.finish, `${kind} ${JSON.stringify(extra)}`).toBe(finish)
        expect(whole.stop, `${kind} ${JSON.stringify(extra)}`).toBe(expected)
        const chunks: object[] = []
        expect(await ask(client, kind, body, true, undefined, (c) => chunks.push(c))).toEqual(whole)
        // completions: on every chunk, null before the last; chat: on the last alone.
        const last = chunks.length - 1
        expect(chunks.map((c) => ('stop_reason' in c ? stopReason(c) : 'absent'))).toEqual(chunks.map((_, i) => (i === last ? expected : kind === 'chat' ? 'absent' : null)))
      }
    }
  })

  it("a message's text parts are joined by newlines, as vLLM joins them", async () => {
    const parts = await post(`${server.url}/tokenize`, { messages: [{ role: 'user', content: [{ type: 'text', text: 'Who art' }, { type: 'text', text: 'thou?' }] }] })
    expect(parts.json.tokens).toEqual(model.tokenize([{ role: 'user', content: 'Who art\nthou?' }]))
  })

  it('continue_final_message: the answer continues the last assistant message, as the library continues it', async () => {
    const messages = [
      { role: 'user' as const, content: QUESTIONS[0]! },
      { role: 'assistant' as const, content: 'I see the' },
    ]
    const body = { model: 'default', messages, max_tokens: 6, temperature: 0, add_generation_prompt: false, continue_final_message: true }
    const r = await post(`${server.url}/v1/chat/completions`, body)
    expect(r.status).toBe(200)
    const lib = await model.generate(messages, { maxTokens: 6, continueFinalMessage: true })
    expect(r.json.choices[0].message.content).toBe(lib.text)
    expect(r.json.usage.prompt_tokens).toBe(model.tokenize(messages, { continueFinalMessage: true }).length)
    expect((await post(`${server.url}/tokenize`, { messages, continue_final_message: true })).json.tokens).toEqual(model.tokenize(messages, { continueFinalMessage: true }))
    for (const [extra, param, message] of [
      [{ add_generation_prompt: true }, 'add_generation_prompt', 'Expected false or null for add_generation_prompt with continue_final_message: true'],
      [{ continue_final_message: false }, 'add_generation_prompt', 'Unsupported value for add_generation_prompt: false without continue_final_message: true'],
      [{ messages: [messages[0]] }, 'continue_final_message', "Expected a last message of role 'assistant' (the text to continue) for continue_final_message: true but received one of role 'user'"],
    ] as const) {
      const bad = await post(`${server.url}/v1/chat/completions`, { ...body, ...extra })
      expectErrorBody(bad.json, bad.status, null, param)
      expect(bad.json.error.message).toContain(message)
    }
  })

  it('logit_bias: 100 forces a token, -100 bans one; penalties change the answer; each as the library gives it, log-probs raw', async () => {
    const prompt = TEXTS[2]!
    const lib = await model.generate(prompt, { maxTokens: 16 })
    // A token with text of its own (not EOS) to force, and the first token to ban.
    const forcedId = lib.tokens.find((id, i) => i > 0 && model.detokenize([id]).trim() !== '')!
    const bannedId = lib.tokens[0]!
    const forced = await client.completions.create({ model: 'default', prompt, max_tokens: 6, temperature: 0, logprobs: 0, logit_bias: { [forcedId]: 100 } })
    const forcedLib = await model.generate(prompt, { maxTokens: 6, logitBias: { [forcedId]: 100 } })
    expect(forcedLib.tokens).toEqual(new Array(6).fill(forcedId))
    expect(forced.choices[0]!.text).toBe(model.detokenize(forcedLib.tokens))
    expect(forced.choices[0]!.logprobs!.tokens).toEqual(new Array(6).fill(model.detokenize([forcedId])))
    // The log-probs are the raw model's (vLLM's default raw_logprobs): what scoring the tokens gives.
    expect(forced.choices[0]!.logprobs!.token_logprobs).toEqual(forcedLib.logprobs)
    expect((await model.score(prompt, forcedLib.tokens)).logprobs).toEqual(forcedLib.logprobs)
    const chat = await client.chat.completions.create({
      model: 'default', messages: [{ role: 'user', content: QUESTIONS[2]! }], max_tokens: 4, temperature: 0, logit_bias: { [forcedId]: 100 },
    })
    expect(chat.choices[0]!.message.content).toBe(model.detokenize(new Array(4).fill(forcedId)))

    const banned = await client.completions.create({ model: 'default', prompt, max_tokens: 16, temperature: 0, logprobs: 0, logit_bias: { [bannedId]: -100 } })
    const bannedLib = await model.generate(prompt, { maxTokens: 16, logitBias: new Map([[bannedId, -100]]) })
    expect(bannedLib.tokens).not.toContain(bannedId)
    expect(banned.choices[0]!.text).toBe(bannedLib.text)
    expect(banned.choices[0]!.logprobs!.token_logprobs).toEqual(bannedLib.logprobs)

    const penalties = { presence_penalty: 2, frequency_penalty: 1.5 }
    const penalized = await client.completions.create({ model: 'default', prompt, max_tokens: 16, temperature: 0, logprobs: 0, ...penalties })
    const penalizedLib = await model.generate(prompt, { maxTokens: 16, presencePenalty: 2, frequencyPenalty: 1.5 })
    expect(penalizedLib.tokens).not.toEqual(lib.tokens)
    expect(penalized.choices[0]!.text).toBe(penalizedLib.text)
    expect(penalized.choices[0]!.logprobs!.token_logprobs).toEqual(penalizedLib.logprobs)
    // vLLM's repetition_penalty, which penalizes the prompt's tokens too.
    // (an extension: the client's types leave it out, and pass it on.)
    const extension = { repetition_penalty: 1.8 } as Record<string, unknown>
    const repeated = await client.completions.create({ model: 'default', prompt, max_tokens: 16, temperature: 0, logprobs: 0, ...extension })
    const repeatedLib = await model.generate(prompt, { maxTokens: 16, repetitionPenalty: 1.8 })
    expect(repeatedLib.tokens).not.toEqual(lib.tokens)
    expect(repeated.choices[0]!.text).toBe(repeatedLib.text)
    expect(repeated.choices[0]!.logprobs!.token_logprobs).toEqual(repeatedLib.logprobs)
    // n > 1: each choice is its own completion, counting its own tokens (choice i samples with seed + i).
    const body = { model: 'default', messages: [{ role: 'user' as const, content: QUESTIONS[3]! }], max_tokens: 12, temperature: 0.9, seed: 77, n: 3, logprobs: true, ...penalties }
    const r = await client.chat.completions.create(body)
    for (const [i, c] of r.choices.entries()) {
      const one = await model.generate(body.messages, { maxTokens: 12, temperature: 0.9, seed: 77 + i, presencePenalty: 2, frequencyPenalty: 1.5 })
      expect(c.message.content).toBe(one.text)
      expect(c.logprobs!.content!.map((t) => t.logprob)).toEqual(one.logprobs)
    }
    // Streamed equals whole.
    expect(await ask(client, 'completions', { model: 'default', prompt, max_tokens: 16, temperature: 0, logprobs: 0, ...penalties }, true)).toEqual({
      text: penalized.choices[0]!.text,
      tokens: penalized.choices[0]!.logprobs!.tokens,
      logprobs: penalized.choices[0]!.logprobs!.token_logprobs,
      finish: penalized.choices[0]!.finish_reason,
      stop: stopReason(penalized.choices[0]!),
    })
  })

  it('response_format: JSON a schema accepts (chat, whole and streamed, n = 2), JSON mode on completions; each the library\'s answer, and the same beside other requests', async () => {
    const schema = { type: 'object', properties: { mood: { enum: ['merry', 'sad'] }, loud: { type: 'boolean' } }, required: ['mood', 'loud'], additionalProperties: false }
    const messages = [{ role: 'user' as const, content: QUESTIONS[0]! }]
    const body = { model: 'default', messages, max_tokens: 40, temperature: 0.8, seed: 11, n: 2, response_format: { type: 'json_schema' as const, json_schema: { name: 'mood', schema, strict: true } } }
    const whole = await client.chat.completions.create(body)
    const ids = model.tokenize(messages, { chatTemplateVariables: {} })
    for (const [i, choice] of whole.choices.entries()) {
      expect(choice.finish_reason).toBe('stop')
      const value = JSON.parse(choice.message.content!)
      expect(Object.keys(value)).toEqual(['mood', 'loud'])
      const lib = await model.generate(ids, { maxTokens: 40, temperature: 0.8, seed: 11 + i, responseFormat: { type: 'json_schema', schema } })
      expect(choice.message.content).toBe(lib.text)
    }
    const streamed = await client.chat.completions.stream({ ...body, stream: true }).finalChatCompletion()
    expect(streamed.choices.map((c) => c.message.content)).toEqual(whole.choices.map((c) => c.message.content))
    // Beside free requests, launched together: the same answers.
    const [again, ...others] = await Promise.all([
      client.chat.completions.create(body),
      ...TEXTS.map((prompt) => client.completions.create({ model: 'default', prompt, max_tokens: 12, temperature: 0 })),
    ])
    expect(again!.choices).toEqual(whole.choices)
    expect(others.length).toBe(TEXTS.length)
    // JSON mode on /v1/completions (vLLM's extension): an object, or its beginning when max_tokens cuts it.
    const jsonMode = await client.completions.create({ model: 'default', prompt: TEXTS[1]!, max_tokens: 12, temperature: 0, response_format: { type: 'json_object' } } as never)
    const lib = await model.generate(TEXTS[1]!, { maxTokens: 12, responseFormat: { type: 'json_object' } })
    expect(jsonMode.choices[0]!.text).toBe(lib.text)
    expect(lib.text.startsWith('{')).toBe(true)
  })

  it("structured_outputs (vLLM's): a choice, a regex, an EBNF grammar and a JSON schema, each the library's answer; bad ones refused", async () => {
    const chatUrl = () => `${server.url}/v1/chat/completions`
    const messages = [{ role: 'user' as const, content: QUESTIONS[1]! }]
    const ids = model.tokenize(messages, { chatTemplateVariables: {} })
    const cases = [
      [{ choice: ['Montague', 'Capulet'] }, { type: 'choice', choices: ['Montague', 'Capulet'] }],
      [{ regex: '[A-Z][a-z]{2,8}, [0-9]{1,3}' }, { type: 'regex', pattern: '[A-Z][a-z]{2,8}, [0-9]{1,3}' }],
      [{ grammar: 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"' }, { type: 'grammar', grammar: 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"' }],
      [{ json: JSON.stringify({ type: 'object', properties: { ok: { type: 'boolean' } }, required: ['ok'], additionalProperties: false }) }, { type: 'json_schema', schema: { type: 'object', properties: { ok: { type: 'boolean' } }, required: ['ok'], additionalProperties: false } }],
    ] as const
    for (const [structured, format] of cases) {
      const r = await client.chat.completions.create({ model: 'default', messages, max_tokens: 24, temperature: 0, structured_outputs: structured } as never)
      const lib = await model.generate(ids, { maxTokens: 24, responseFormat: format as never })
      expect((r as { choices: { message: { content: string } }[] }).choices[0]!.message.content, JSON.stringify(structured)).toBe(lib.text)
    }
    const choice = await client.chat.completions.create({ model: 'default', messages, max_tokens: 24, temperature: 0, structured_outputs: cases[0][0] } as never)
    expect(['Montague', 'Capulet']).toContain((choice as { choices: { message: { content: string } }[] }).choices[0]!.message.content)
    const two = await post(chatUrl(), { model: 'default', messages, max_tokens: 2, structured_outputs: { regex: 'a+', choice: ['a'] } })
    expect(two.status).toBe(400)
    expectErrorBody(two.json, two.status, 'invalid_value', 'structured_outputs')
    expect(two.json.error.message).toBe('Expected exactly one of json, regex, choice, grammar, structural_tag or json_object: true in structured_outputs but received regex, choice')
    const bad = await post(chatUrl(), { model: 'default', messages, max_tokens: 2, stream: true, structured_outputs: { regex: '[a-' } })
    expect(bad.status).toBe(400)
    expectErrorBody(bad.json, bad.status, 'invalid_value', 'structured_outputs')
    expect(bad.json.error.message).toMatch(/^The regular expression cannot be used: /)
    const both = await post(chatUrl(), { model: 'default', messages, max_tokens: 2, response_format: { type: 'json_object' }, structured_outputs: { choice: ['a'] } })
    expect(both.status).toBe(400)
    expectErrorBody(both.json, both.status, 'invalid_value', 'response_format')
  })

  it('exports Prometheus metrics', async () => {
    // A request held to JSON: its masks are waited for before its steps.
    await client.completions.create({ model: 'default', prompt: 'Hi', max_tokens: 4, response_format: { type: 'json_object' } } as never)
    const text = await (await fetch(`${server.url}/metrics`)).text()
    for (const name of [
      'detinfer_requests_total',
      'detinfer_prompt_tokens_total',
      'detinfer_completion_tokens_total',
      'detinfer_queue_depth',
      'detinfer_batch_size',
      'detinfer_kv_cache_blocks_used',
      'detinfer_kv_cache_usage_ratio',
      'detinfer_prefix_cache_hit_tokens_total',
      'detinfer_prefix_cache_query_tokens_total',
      'detinfer_time_to_first_token_seconds_bucket',
      'detinfer_inter_token_latency_seconds_bucket',
      'detinfer_steps_total',
      'detinfer_grammar_mask_wait_seconds_total',
    ])
      expect(text).toContain(name)
    expect(await metric(server.url, 'detinfer_steps_total')).toBeGreaterThan(0)
    expect(await metric(server.url, 'detinfer_grammar_mask_wait_seconds_total')).toBeGreaterThan(0)
    expect(await metric(server.url, 'detinfer_completion_tokens_total')).toBeGreaterThan(0)
    expect(await metric(server.url, 'detinfer_time_to_first_token_seconds_count')).toBeGreaterThan(0)
  })

  describe('errors: OpenAI-style bodies, never a stack trace', () => {
    const url = () => `${server.url}/v1/completions`
    const chatUrl = () => `${server.url}/v1/chat/completions`
    const ok = { model: 'default', prompt: 'Hi', max_tokens: 2 }

    it('a body that is not JSON', async () => {
      const r = await post(url(), '{"model": "default", "prompt": ')
      expect(r.status).toBe(400)
      expectErrorBody(r.json, r.status, 'invalid_json')
      expectNoStackTrace(r.text)
    })

    it.each([
      [{ ...ok, max_tokens: '8' }, 'max_tokens', 'Expected integer of at least 0 (0 only with echo: true) or null for max_tokens but received "8" of type string'],
      [{ ...ok, max_tokens: 0 }, 'max_tokens', 'Expected integer of at least 1 or null for max_tokens (0 only with echo: true) but received 0 of type number'],
      [{ ...ok, echo: 'yes' }, 'echo', 'Expected boolean or null for echo but received "yes" of type string'],
      [{ ...ok, temperature: 3 }, 'temperature', 'Expected number between 0 and 2 or null for temperature but received 3 of type number'],
      [{ ...ok, n: 0 }, 'n', 'Expected integer between 1 and 16 or null for n but received 0 of type number'],
      [{ ...ok, seed: 2 ** 60 }, 'seed', 'Expected integer between -9007199254740991 and 9007199254740991 or null for seed but received 1152921504606847000 of type number'],
      [{ ...ok, seed: 1.5 }, 'seed', 'Expected integer between -9007199254740991 and 9007199254740991 or null for seed but received 1.5 of type number'],
      [{ ...ok, stop: 5 }, 'stop', 'for stop but received 5 of type number'],
      [{ ...ok, prompt: { text: 'Hi' } }, 'prompt', 'Expected string, array of strings, array of token ids or array of arrays of token ids for prompt'],
      [{ model: 'default' }, 'prompt', 'Expected string, array of strings, array of token ids or array of arrays of token ids for prompt but received undefined'],
      [{ ...ok, stream: 'yes' }, 'stream', 'Expected boolean or null for stream but received "yes" of type string'],
    ])('wrong types: %j', async (body, param, message) => {
      const r = await post(url(), body)
      expect(r.status).toBe(400)
      expectErrorBody(r.json, r.status, null, param)
      expect(r.json.error.message).toContain(message)
      expect(r.json.error.type).toBe('invalid_request_error')
    })

    it('wrong types inside chat messages name the field', async () => {
      const r = await post(chatUrl(), { model: 'default', messages: [{ role: 'wizard', content: 'hi' }] })
      expect(r.status).toBe(400)
      expectErrorBody(r.json, r.status, 'invalid_value', 'messages[0].role')
      expect(r.json.error.message).toBe(`Expected one of 'system', 'developer', 'user', 'assistant', 'tool' for messages[0].role but received "wizard" of type string`)
    })

    it('unknown parameters are refused, not ignored; unsupported ones only at their neutral value', async () => {
      const unknown = await post(url(), { ...ok, temprature: 0.5 })
      expect(unknown.status).toBe(400)
      expectErrorBody(unknown.json, unknown.status, 'unknown_parameter', 'temprature')
      expect(unknown.json.error.message).toBe('Unrecognized request argument supplied: temprature')
      const suffix = await post(url(), { ...ok, suffix: 'the end' })
      expect(suffix.status).toBe(400)
      expectErrorBody(suffix.json, suffix.status, 'invalid_value', 'suffix')
      expect((await post(url(), { ...ok, frequency_penalty: 0, presence_penalty: null, logit_bias: {}, suffix: null, user: 'someone' })).status).toBe(200)
      // The official client surfaces the message.
      await expect(client.completions.create({ ...ok, best_of: 3 })).rejects.toMatchObject({ status: 400, code: 'invalid_value', param: 'best_of' })
    })

    it('penalties and logit_bias out of range are refused with 400 naming the parameter and the limit', async () => {
      const vocab = model.vocabSize
      const many = Object.fromEntries(Array.from({ length: 301 }, (_, i) => [String(i), 1]))
      for (const [extra, param, message] of [
        [{ frequency_penalty: 2.5 }, 'frequency_penalty', 'Expected number between -2 and 2 or null for frequency_penalty but received 2.5 of type number'],
        [{ presence_penalty: -3 }, 'presence_penalty', 'Expected number between -2 and 2 or null for presence_penalty but received -3 of type number'],
        [{ presence_penalty: '1' }, 'presence_penalty', 'Expected number between -2 and 2 or null for presence_penalty but received "1" of type string'],
        [{ repetition_penalty: 0 }, 'repetition_penalty', 'Expected number greater than 0 and at most 2 or null for repetition_penalty but received 0 of type number'],
        [{ logit_bias: { '5': 101 } }, 'logit_bias[5]', 'Expected number between -100 and 100 for logit_bias[5] but received 101 of type number'],
        [{ logit_bias: { '5': 'ban' } }, 'logit_bias[5]', 'Expected number between -100 and 100 for logit_bias[5] but received "ban" of type string'],
        [{ logit_bias: [5] }, 'logit_bias', 'Expected object of at most 300 token ids to biases between -100 and 100, or null for logit_bias but received [5] of type array'],
        [{ logit_bias: many }, 'logit_bias', 'Expected object of at most 300 token ids to biases between -100 and 100, or null for logit_bias but received {'],
        [{ logit_bias: { the: -100 } }, 'logit_bias', `Expected token ids between 0 and ${vocab - 1} as the keys of logit_bias but received "the"`],
        [{ logit_bias: { [String(vocab)]: -100 } }, 'logit_bias', `Expected token ids between 0 and ${vocab - 1} as the keys of logit_bias but received "${vocab}"`],
        [{ logit_bias: { '007': 1 } }, 'logit_bias', 'as the keys of logit_bias but received "007"'],
      ] as const) {
        for (const target of [url(), chatUrl()]) {
          const body = target === url() ? { ...ok, ...extra } : { model: 'default', messages: [{ role: 'user', content: 'x' }], max_tokens: 2, ...extra }
          const r = await post(target, body)
          expect(r.status, JSON.stringify(extra)).toBe(400)
          expectErrorBody(r.json, r.status, 'invalid_value', param)
          expect(r.json.error.message).toContain(message)
        }
      }
      // The official client surfaces them.
      await expect(client.completions.create({ ...ok, logit_bias: { '5': 200 } })).rejects.toMatchObject({ status: 400, code: 'invalid_value', param: 'logit_bias[5]' })
      // Up to 300 ids are taken.
      const most = Object.fromEntries(Array.from({ length: 300 }, (_, i) => [String(i), -1]))
      expect((await post(url(), { ...ok, logit_bias: most, frequency_penalty: -2, presence_penalty: 2 })).status).toBe(200)
    })

    it('context overflow: a prompt that leaves no room is a 400; max_tokens is capped by the context', async () => {
      const long = Array.from({ length: 1100 }, (_, i) => 3 + (i % 50))
      const r = await post(url(), { model: 'default', prompt: long, max_tokens: 4 })
      expect(r.status).toBe(400)
      expectErrorBody(r.json, r.status, 'context_length_exceeded', 'prompt')
      expect(r.json.error.message).toContain('maximum context length is 1024 tokens')
      const capped = await post(url(), { model: 'default', prompt: long.slice(0, 1020), max_tokens: 100000, temperature: 0 })
      expect(capped.status).toBe(200)
      expect(capped.json.usage.completion_tokens).toBeLessThanOrEqual(4)
    })

    it('a request cannot name a file or a model directory', async () => {
      for (const name of ['/etc/passwd', '../models/default', defaultModelPath]) {
        const r = await post(url(), { ...ok, model: name })
        expect(r.status).toBe(404)
        expectErrorBody(r.json, r.status, 'model_not_found', 'model')
      }
      const r = await post(url(), { ...ok, model_dir: '/tmp' })
      expect(r.status).toBe(400)
    })

    it('a body that is JSON but not an object, and keys that name an object\'s prototype', async () => {
      const array = await post(url(), '[1,2]')
      expect(array.status).toBe(400)
      expect(array.json.error.message).toBe('Expected JSON object for body but received [1,2] of type array')
      for (const key of ['__proto__', 'constructor']) {
        const r = await post(chatUrl(), `{"model":"default","messages":[{"role":"user","content":"x"}],"${key}":{"prototype":{}}}`)
        expect(r.status).toBe(400)
        expectErrorBody(r.json, r.status, 'unknown_parameter', key)
        expect(r.json.error.message).toBe(`Unrecognized request argument supplied: ${key}`)
      }
    })

    it('bad response_formats and message names are refused with what is wrong; a tool message\'s call id is taken', async () => {
      const messages = [{ role: 'user', content: 'x' }]
      const json = await post(chatUrl(), { model: 'default', messages, max_tokens: 2, response_format: { type: 'xml' } })
      expect(json.status).toBe(400)
      expectErrorBody(json.json, json.status, 'invalid_value', 'response_format')
      expect(json.json.error.message).toBe(
        "Expected {type: 'text'}, {type: 'json_object'}, {type: 'json_schema', json_schema: {name, description, schema, strict}}, " +
          "{type: 'structural_tag', format}, {type: 'structural_tag', structures: [{begin, schema, end}], triggers} or null for response_format but received {\"type\":\"xml\"} of type object",
      )
      // A schema the grammar compiler cannot read: 400 naming why, before a stream starts.
      for (const stream of [false, true]) {
        const bad = await post(chatUrl(), { model: 'default', messages, max_tokens: 2, stream, response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 5 } } } })
        expect(bad.status).toBe(400)
        expectErrorBody(bad.json, bad.status, 'invalid_value', 'response_format')
        expect(bad.json.error.message).toBe('The JSON schema cannot be used: Type should be a string')
      }
      const eos = await post(chatUrl(), { model: 'default', messages, max_tokens: 2, ignore_eos: true, response_format: { type: 'json_object' } })
      expect(eos.status).toBe(400)
      expectErrorBody(eos.json, eos.status, 'invalid_value', 'ignore_eos')
      const named = await post(chatUrl(), { model: 'default', messages: [{ role: 'user', content: 'x', name: 'bob' }], max_tokens: 2 })
      expect(named.status).toBe(400)
      expectErrorBody(named.json, named.status, 'unsupported_parameter', 'messages[0].name')
      const tool = await client.chat.completions.create({
        model: 'default',
        messages: [{ role: 'user', content: 'x' }, { role: 'tool', content: '42', tool_call_id: 'call_1' }],
        max_tokens: 2,
        temperature: 0,
      })
      expect(tool.choices.length).toBe(1)
    })

    it('tools without --tool-call-parser are refused, naming the flag', async () => {
      const tools = [{ type: 'function' as const, function: { name: 'get_weather', parameters: { type: 'object', properties: {} } } }]
      const body = { model: 'default', messages: [{ role: 'user' as const, content: 'x' }], max_tokens: 2, tools }
      const refused = client.chat.completions.create(body)
      await expect(refused).rejects.toMatchObject({ status: 400, code: 'unsupported_parameter', param: 'tools' })
      await expect(refused).rejects.toThrow(/start it with --tool-call-parser \(hermes or llama3_json\)/)
      expect((await client.chat.completions.create({ ...body, tool_choice: 'none' })).choices.length).toBe(1)
    })

    it('too many choices name the prompts or n; megabytes of prompt are refused before tokenizing', async () => {
      const many = await post(url(), { model: 'default', prompt: Array.from({ length: 1000 }, () => 'a'), max_tokens: 1 })
      expect(many.status).toBe(400)
      expectErrorBody(many.json, many.status, 'too_many_choices', 'prompt')
      expect(many.json.error.message).toMatch(/asks for 1000 \(1000 prompts times n = 1\)$/)
      // 2.1 MB of text, far more tokens than the context holds.
      const text = 'ROMEO, speak! '.repeat(150_000)
      for (const [at, body] of [
        [url(), { model: 'default', prompt: text, max_tokens: 1 }],
        [chatUrl(), { model: 'default', messages: [{ role: 'user', content: text }], max_tokens: 1 }],
      ] as const) {
        const r = await post(at, body)
        expect(r.status).toBe(400)
        expectErrorBody(r.json, r.status, 'context_length_exceeded', at === url() ? 'prompt' : 'messages')
        expect(r.json.error.message).toMatch(/the prompt's 2100000 bytes of text are at least \d+ tokens$/)
      }
    })

    it('wrong media type, an unknown route', async () => {
      const media = await fetch(url(), { method: 'POST', headers: { 'content-type': 'application/xml' }, body: '<prompt/>' })
      expect(media.status).toBe(415)
      expectErrorBody(await media.json(), 415, 'unsupported_media_type')
      // text/plain too: no parser turns it into a string for the schemas to refuse.
      const plain = await fetch(url(), { method: 'POST', headers: { 'content-type': 'text/plain' }, body: JSON.stringify(ok) })
      expect(plain.status).toBe(415)
      expect((await plain.json()).error.message).toBe('Expected a request body of type application/json but received "text/plain"')
      // No Content-Type at all (Python's requests.post(url, data=json.dumps(body))): read as JSON.
      const untyped = await new Promise<{ status: number; body: string }>((resolve, reject) => {
        const text = JSON.stringify(ok)
        const req = httpRequest(url(), { method: 'POST', headers: { 'content-length': Buffer.byteLength(text) } }, (res) => {
          let body = ''
          res.setEncoding('utf8').on('data', (c: string) => (body += c)).on('end', () => resolve({ status: res.statusCode!, body }))
        })
        req.on('error', reject)
        req.end(text)
      })
      expect(untyped.status, untyped.body).toBe(200)
      expect(JSON.parse(untyped.body).choices[0].text).toEqual(expect.any(String))
      const missing = await fetch(`${server.url}/v1/engines`)
      expect(missing.status).toBe(404)
      expectErrorBody(await missing.json(), 404, 'not_found')
    })
  })
})

describe('detinfer serve --tool-call-parser hermes (openai client, a chat template that renders tools)', () => {
  const tools = [
    { type: 'function' as const, function: { name: 'get_weather', description: 'The weather in a city', parameters: { type: 'object', properties: { city: { type: 'string' } } } } },
  ]
  const messages = [{ role: 'user' as const, content: QUESTIONS[1]! }]
  let dir: string
  let server: RunningServer
  let model: Model

  beforeAll(async () => {
    buildDist()
    dir = join(mkdtempSync(join(tmpdir(), 'detinfer-serve-tools-')), 'tooly')
    cpSync(defaultModelPath, dir, { recursive: true })
    writeFileSync(
      join(dir, 'chat_template.jinja'),
      "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}{% endfor %}<|im_end|>\n{% endif %}" +
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    )
    server = await startServer(['--model', dir, '--tool-call-parser', 'hermes'])
    model = await loadModel(dir, { device: DEVICE })
  })
  afterAll(async () => {
    await model?.dispose()
    if (server) expect(await server.stop()).toBe(0)
    if (dir) rmSync(dirname(dir), { recursive: true, force: true })
  })

  it('renders the tools into the prompt; an answer without calls is plain content, streamed equal to whole', async () => {
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 })
    const ids = model.tokenize(messages, { chatTemplateVariables: { tools } })
    expect(ids.length).toBeGreaterThan(model.tokenize(messages).length)
    const body = { model: 'tooly', messages, tools, max_tokens: 8, temperature: 0 }
    const r = await client.chat.completions.create(body)
    expect(r.usage!.prompt_tokens).toBe(ids.length)
    const lib = await model.generate(ids, { maxTokens: 8 })
    expect(r.choices[0]!.message).toEqual({ role: 'assistant', content: lib.text })
    const streamed = await client.chat.completions.stream({ ...body, stream: true }).finalChatCompletion()
    expect(streamed.choices[0]!.message.content).toBe(lib.text)
    expect(streamed.choices[0]!.message.tool_calls).toBeUndefined()
    expect(streamed.choices[0]!.finish_reason).toBe(r.choices[0]!.finish_reason)
  })

  it('tool_choice forces a call: a named function\'s arguments, or "required"\'s list, held to JSON by a grammar, streamed equal to whole', async () => {
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 })
    const city = { type: 'object', properties: { city: { enum: ['Paris', 'Rome', 'Oslo'] } }, required: ['city'], additionalProperties: false }
    const forcedTools = [
      { type: 'function' as const, function: { name: 'get_weather', parameters: city } },
      { type: 'function' as const, function: { name: 'get_time', parameters: city } },
    ]
    const base = { model: 'tooly', messages, tools: forcedTools, max_tokens: 60, temperature: 0 }
    const named = { ...base, tool_choice: { type: 'function' as const, function: { name: 'get_time' } } }
    const whole = await client.chat.completions.create(named)
    const call = whole.choices[0]!.message.tool_calls![0]! as { id: string; type: string; function: { name: string; arguments: string } }
    expect(whole.choices[0]!.message.tool_calls).toHaveLength(1)
    expect(call.function.name).toBe('get_time')
    expect(['Paris', 'Rome', 'Oslo']).toContain(JSON.parse(call.function.arguments).city)
    // As OpenAI and vLLM answer a call forced by name.
    expect(whole.choices[0]!.finish_reason).toBe('stop')
    const streamed = await client.chat.completions.stream({ ...named, stream: true }).finalChatCompletion()
    expect(streamed.choices[0]!.message.tool_calls).toEqual(whole.choices[0]!.message.tool_calls)
    expect(streamed.choices[0]!.finish_reason).toBe('stop')
    // The answer is the library's completion of the same prompt under the same schema.
    const ids = model.tokenize(messages, { chatTemplateVariables: { tools: forcedTools } })
    const lib = await model.generate(ids, { maxTokens: 60, responseFormat: { type: 'json_schema', schema: city } })
    expect(JSON.parse(lib.text)).toEqual(JSON.parse(call.function.arguments))

    // "required" without parallel calls: a list of one call of either tool.
    const required = await client.chat.completions.create({ ...base, tool_choice: 'required', parallel_tool_calls: false })
    const calls = required.choices[0]!.message.tool_calls! as { function: { name: string; arguments: string } }[]
    expect(calls).toHaveLength(1)
    expect(['get_weather', 'get_time']).toContain(calls[0]!.function.name)
    expect(Object.keys(JSON.parse(calls[0]!.function.arguments))).toEqual(['city'])
    expect(required.choices[0]!.finish_reason).toBe('tool_calls')
    const requiredStream = await client.chat.completions.stream({ ...base, tool_choice: 'required', parallel_tool_calls: false, stream: true }).finalChatCompletion()
    expect(requiredStream.choices[0]!.message.tool_calls).toEqual(required.choices[0]!.message.tool_calls)

    // strict: true with tool_choice auto: the answer runs under the structural tag that holds
    // Hermes calls to the tools' parameters, as the library runs it.
    const strictTools = forcedTools.map((t) => ({ ...t, function: { ...t.function, strict: true } }))
    const strictAnswer = await client.chat.completions.create({ model: 'tooly', messages, tools: strictTools, max_tokens: 24, temperature: 0 })
    const strictIds = model.tokenize(messages, { chatTemplateVariables: { tools: strictTools } })
    const format = strictHermesCallsFormat(strictTools.map((t) => t.function))
    const strictLib = await model.generate(strictIds, { maxTokens: 24, responseFormat: { type: 'structural_tag', format } })
    expect(strictAnswer.choices[0]!.message.content).toBe(strictLib.text)

    // A name that is not a tool, "required" without tools, and a response_format beside a forced call are refused.
    await expect(client.chat.completions.create({ ...base, tool_choice: { type: 'function', function: { name: 'nope' } } })).rejects.toMatchObject({ status: 400, param: 'tool_choice' })
    await expect(client.chat.completions.create({ model: 'tooly', messages, tool_choice: 'required', max_tokens: 2 })).rejects.toMatchObject({ status: 400, param: 'tools' })
    await expect(client.chat.completions.create({ ...named, response_format: { type: 'json_object' } })).rejects.toMatchObject({ status: 400, param: 'response_format' })
    // Parameters the grammar cannot hold the answer to: the request's tools are named, not a response_format it did not send.
    const counted = [{ type: 'function' as const, function: { name: 'count', parameters: { type: 'object', properties: { n: { type: 'integer', multipleOf: 2 } } } } }]
    for (const tool_choice of ['required', { type: 'function', function: { name: 'count' } }] as const)
      await expect(client.chat.completions.create({ ...base, tools: counted, tool_choice })).rejects.toMatchObject({ status: 400, param: 'tools', code: 'invalid_value' })
    // So are a strict tool's, whose calls the model chooses to make.
    const strictCounted = counted.map((t) => ({ ...t, function: { ...t.function, strict: true } }))
    await expect(client.chat.completions.create({ ...base, tools: strictCounted })).rejects.toMatchObject({
      status: 400,
      param: 'tools',
      message: expect.stringContaining("The tools' parameters cannot hold a call: The structural tag cannot be used: format.tags[0].content.json_schema: multipleOf (at #/properties/n) is not supported"),
    })
  })
})

describe('detinfer serve --generation-config (openai client): the model\'s sampling defaults', () => {
  let dir: string
  let model: Model
  beforeAll(async () => {
    buildDist()
    dir = join(mkdtempSync(join(tmpdir(), 'detinfer-serve-generation-')), 'tuned')
    cpSync(defaultModelPath, dir, { recursive: true })
    // Greedy, a repetition penalty and 5 tokens by default; top_k 50 is transformers' own
    // default, so not a setting.
    const file = join(dir, 'generation_config.json')
    writeFileSync(file, JSON.stringify({ ...JSON.parse(readFileSync(file, 'utf8')), temperature: 0, top_k: 50, max_new_tokens: 5, repetition_penalty: 2 }))
    model = await loadModel(dir, { device: DEVICE })
  })
  afterAll(async () => {
    await model?.dispose()
    if (dir) rmSync(dirname(dir), { recursive: true, force: true })
  })

  const prompt = QUESTIONS[2]!
  const request = { model: 'tuned', prompt, seed: 3, ignore_eos: true }

  it('auto (the default): a request that leaves them out gets them; one that sets them, its own', async () => {
    const server = await startServer(['--model', dir])
    try {
      expect(server.log()).toContain(`sampling defaults from ${join(dir, 'generation_config.json')}: temperature 0, repetition_penalty 2, max_tokens 5 (`)
      const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 })
      const ids = model.tokenize(prompt)
      const greedy = await model.generate(ids, { maxTokens: 5, repetitionPenalty: 2, ignoreEos: true })
      // The penalty changes this completion, so the default is seen to apply.
      expect(greedy.text).not.toBe((await model.generate(ids, { maxTokens: 5, ignoreEos: true })).text)
      const r = await client.completions.create(request)
      expect(r.usage!.completion_tokens).toBe(5)
      expect(r.choices[0]!.text).toBe(greedy.text)
      const sampled = await model.generate(ids, { maxTokens: 4, temperature: 1, seed: 3, ignoreEos: true })
      const own = await client.completions.create({ ...request, temperature: 1, max_tokens: 4, repetition_penalty: 1 } as Parameters<typeof client.completions.create>[0] & { stream?: false })
      expect(own.choices[0]!.text).toBe(sampled.text)
      // max_new_tokens is a limit, as vLLM takes it: more asked for gives 5.
      const capped = await client.completions.create({ ...request, max_tokens: 7 })
      expect(capped.usage!.completion_tokens).toBe(5)
    } finally {
      expect(await server.stop()).toBe(0)
    }
  })

  it("none: OpenAI's defaults (temperature 1, 16 tokens for /v1/completions), and another fingerprint", async () => {
    const [auto, none] = await Promise.all([startServer(['--model', dir]), startServer(['--model', dir, '--generation-config', 'none'])])
    try {
      expect(none.log()).not.toContain('sampling defaults from')
      const client = new OpenAI({ baseURL: `${none.url}/v1`, apiKey: 'unused', maxRetries: 0 })
      const sampled = await model.generate(model.tokenize(prompt), { maxTokens: 16, temperature: 1, seed: 3, ignoreEos: true })
      const r = await client.completions.create(request)
      expect(r.usage!.completion_tokens).toBe(16)
      expect(r.choices[0]!.text).toBe(sampled.text)
      const fingerprint = (s: RunningServer) => /system_fingerprint (fp_[0-9a-f]+)/.exec(s.log())![1]
      expect(fingerprint(none)).not.toBe(fingerprint(auto))
    } finally {
      expect(await none.stop()).toBe(0)
      expect(await auto.stop()).toBe(0)
    }
  })

  it('a directory of its own, and a value the server could not take, named with its file', async () => {
    const other = join(dirname(dir), 'other')
    mkdirSync(other)
    writeFileSync(join(other, 'generation_config.json'), JSON.stringify({ temperature: 0.5, top_p: 0.9, top_k: 20, min_p: 0.05 }))
    const server = await startServer(['--model', dir, '--generation-config', other])
    try {
      expect(server.log()).toContain(`sampling defaults from ${join(other, 'generation_config.json')}: temperature 0.5, top_p 0.9, top_k 20, min_p 0.05 (`)
      const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 })
      const expected = await model.generate(model.tokenize(prompt), { maxTokens: 16, temperature: 0.5, topP: 0.9, topK: 20, minP: 0.05, seed: 3, ignoreEos: true })
      expect((await client.completions.create(request)).choices[0]!.text).toBe(expected.text)
    } finally {
      expect(await server.stop()).toBe(0)
    }
    writeFileSync(join(other, 'generation_config.json'), JSON.stringify({ temperature: 3 }))
    const refused = spawnSync(process.execPath, [join(import.meta.dirname, '..', '..', 'dist', 'cli', 'main.js'), 'serve', '--model', dir, '--generation-config', other, '--port', '0'], {
      encoding: 'utf8',
      timeout: 60_000,
      env: { ...process.env, CI: '1' },
    })
    expect(refused.status).toBe(1)
    expect(refused.stderr).toContain(`Expected a number between 0 and 2 for temperature in ${join(other, 'generation_config.json')} but received 3; \`--generation-config none\``)
  })
})

describe('detinfer serve: API key, overload, graceful shutdown', () => {
  let server: RunningServer
  beforeAll(async () => {
    buildDist()
    // One running sequence, one waiting: the third at once gets 429.
    server = await startServer(['--max-batch-size', '1', '--max-queued', '1', '--body-limit', '2048'], { DETINFER_API_KEY: 'sesame' })
  })
  afterAll(async () => {
    if (server?.proc.exitCode === null) await server.stop('SIGKILL')
  })

  const auth = { authorization: 'Bearer sesame' }
  const body = { model: 'default', prompt: 'Once upon a time', max_tokens: 3, temperature: 0 }

  it('needs the API key (from DETINFER_API_KEY) on /v1/*, not on /health', async () => {
    const missing = await post(`${server.url}/v1/completions`, body)
    expect(missing.status).toBe(401)
    expectErrorBody(missing.json, 401, 'invalid_api_key')
    const wrong = await post(`${server.url}/v1/completions`, body, { authorization: 'Bearer open' })
    expect(wrong.status).toBe(401)
    expect(wrong.json.error.type).toBe('authentication_error')
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'sesame', maxRetries: 0 })
    expect((await client.completions.create(body)).choices.length).toBe(1)
    await expect(new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'nope', maxRetries: 0 }).models.list()).rejects.toMatchObject({ status: 401 })
    expect((await fetch(`${server.url}/health`)).status).toBe(200)
    expect((await fetch(`${server.url}/metrics`)).status).toBe(200)
    // The router decodes percent-escapes before it matches a route; the check goes by the route.
    for (const path of ['/%76%31/models', '/v%31/completions', '/%761/chat/completions'])
      expect((await post(`${server.url}${path}`, body)).status).toBe(401)
    await expect(new OpenAI({ baseURL: `${server.url}/%761`, apiKey: 'wrong', maxRetries: 0 }).models.list()).rejects.toMatchObject({ status: 401 })
    // An unknown route too, so that nothing answers without the key but /health and /metrics.
    expect((await fetch(`${server.url}/v1/engines`)).status).toBe(401)
    expect((await fetch(`${server.url}/v1/engines`, { headers: auth })).status).toBe(404)
  })

  it('refuses a body over --body-limit with 413', async () => {
    const big = await post(`${server.url}/v1/completions`, { ...body, prompt: 'a'.repeat(3000) }, auth)
    expect(big.status).toBe(413)
    expectErrorBody(big.json, big.status, 'body_too_large')
  })

  it('429 with Retry-After beyond the queue bound', async () => {
    const results = await Promise.all(
      Array.from({ length: 5 }, () => post(`${server.url}/v1/completions`, { ...body, max_tokens: 40 }, auth)),
    )
    const statuses = results.map((r) => r.status).sort()
    expect(statuses.filter((s) => s === 200).length).toBe(2)
    expect(statuses.filter((s) => s === 429).length).toBe(3)
    for (const r of results.filter((x) => x.status === 429)) {
      expect(r.headers.get('retry-after')).toMatch(/^\d+$/)
      expectErrorBody(r.json, 429, 'queue_full')
    }
    const n = await post(`${server.url}/v1/completions`, { ...body, n: 3, temperature: 1, seed: 1 }, auth)
    expect(n.status).toBe(400)
    expectErrorBody(n.json, 400, 'too_many_choices', 'n')
  })

  it('SIGTERM: the stream in flight finishes, new requests are refused, exit code 0', async () => {
    const res = await fetch(`${server.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...auth },
      body: JSON.stringify({ ...body, max_tokens: 30, stream: true }),
    })
    const reader = res.body!.getReader()
    let text = new TextDecoder().decode((await reader.read()).value)
    server.proc.kill('SIGTERM')
    await new Promise((r) => setTimeout(r, 100))
    const refused = await fetch(`${server.url}/health`).then(
      (r) => r.status,
      () => 'refused',
    )
    expect([503, 'refused']).toContain(refused)
    for (;;) {
      const { value, done } = await reader.read()
      if (done) break
      text += new TextDecoder().decode(value)
    }
    expect(text.trimEnd().endsWith('data: [DONE]')).toBe(true)
    expect(text).toMatch(/"finish_reason":"(stop|length)"/)
    expect(await server.exited).toBe(0)
    expect(server.log()).toContain('stopped')
  })
})

describe('detinfer serve: a prompt the tokenizer cannot finish', () => {
  it(`answers other requests meanwhile, then refuses it after ${ENCODE_TIMEOUT_MS / 1000} s with tokenize_timeout, and goes on`, async () => {
    buildDist()
    // The shipped model with a normalizer that backtracks without end on a run of "a"s before another letter.
    const dir = join(mkdtempSync(join(tmpdir(), 'detinfer-backtracking-')), 'slow')
    cpSync(defaultModelPath, dir, { recursive: true })
    const file = join(dir, 'tokenizer.json')
    writeFileSync(file, JSON.stringify({ ...JSON.parse(readFileSync(file, 'utf8')), normalizer: BACKTRACKING_NORMALIZER }))
    const server = await startServer(['--model', dir])
    try {
      const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'not-needed', maxRetries: 0 })
      let stuckSettled = false
      const stuck = post(`${server.url}/v1/completions`, { model: 'slow', prompt: 'a'.repeat(80) + 'b', max_tokens: 2 }).finally(() => (stuckSettled = true))
      await new Promise((r) => setTimeout(r, 300))
      // The event loop is free: health, metrics and a prompt of token ids (nothing to encode) are answered meanwhile.
      expect((await fetch(`${server.url}/health`)).status).toBe(200)
      const ids = await client.completions.create({ model: 'slow', prompt: [10, 20, 30], max_tokens: 4, temperature: 0 })
      expect(ids.choices[0]!.finish_reason).toBeTruthy()
      expect(stuckSettled).toBe(false)
      const refused = await stuck
      expect(refused.status).toBe(400)
      expectErrorBody(refused.json, 400, 'tokenize_timeout', 'prompt')
      expect(refused.json.error.message).toContain('(normalizer or pre_tokenizer) backtracks without end on it')
      expectNoStackTrace(refused.json.error.message)
      // The next text is encoded by a new worker.
      const text = await client.completions.create({ model: 'slow', prompt: 'Once upon a time', max_tokens: 4, temperature: 0 })
      expect(text.usage!.prompt_tokens).toBeGreaterThan(1)
    } finally {
      expect(await server.stop()).toBe(0)
      rmSync(dirname(dir), { recursive: true, force: true })
    }
  }, 60_000)
})

describe('detinfer serve: --chat-template and --default-chat-template-kwargs', () => {
  it("render chat requests with the server's template and default variables (the request's over them), in a fingerprint of their own", async () => {
    buildDist()
    const dir = mkdtempSync(join(tmpdir(), 'detinfer-serve-template-'))
    const file = join(dir, 'thinking.jinja')
    const template = THINKING_TEMPLATE
    writeFileSync(file, template)
    const plain = await startServer([])
    const server = await startServer(['--chat-template', file, '--default-chat-template-kwargs', '{"enable_thinking": false}'])
    const model = await loadModel(defaultModelPath, { device: DEVICE, chatTemplate: template })
    try {
      const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'not-needed', maxRetries: 0 })
      const messages = [{ role: 'user' as const, content: 'Who art thou?' }]
      const closed = model.tokenize(messages, { chatTemplateVariables: { enable_thinking: false } })
      const r = await client.chat.completions.create({ model: 'default', messages, max_tokens: 4, temperature: 0 })
      expect(r.usage!.prompt_tokens).toBe(closed.length)
      expect(r.choices[0]!.message.content).toBe((await model.generate(closed, { maxTokens: 4 })).text)
      const open = await client.chat.completions.create({ model: 'default', messages, max_tokens: 4, temperature: 0, chat_template_kwargs: { enable_thinking: true } } as never)
      expect(open.usage!.prompt_tokens).toBe(model.tokenize(messages).length)
      const fingerprint = async (url: string) => (await (await fetch(`${url}/health`)).json()).system_fingerprint
      expect(await fingerprint(server.url)).not.toBe(await fingerprint(plain.url))
    } finally {
      await model.dispose()
      expect(await server.stop()).toBe(0)
      expect(await plain.stop()).toBe(0)
      rmSync(dir, { recursive: true, force: true })
    }
    const refused = spawnSync(process.execPath, [join(import.meta.dirname, '..', '..', 'dist', 'cli', 'main.js'), 'serve', '--port', '0', '--default-chat-template-kwargs', '{"tools": []}'], { encoding: 'utf8', env: { ...process.env, CI: '1' } })
    expect(refused.status).toBe(1)
    expect(refused.stderr).toContain('Expected no tools in --default-chat-template-kwargs (each request sets it) but received []')
  }, 60_000)
})

describe('detinfer serve: the shutdown deadline', () => {
  it('ends streams still running at --shutdown-timeout with an error event, then exits 0', async () => {
    buildDist()
    const server = await startServer(['--shutdown-timeout', '0'])
    try {
      const res = await fetch(`${server.url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'default', prompt: 'ROMEO:', max_tokens: 900, temperature: 1, seed: 3, stream: true }),
      })
      const reader = res.body!.getReader()
      let text = new TextDecoder().decode((await reader.read()).value)
      server.proc.kill('SIGTERM')
      for (;;) {
        const { value, done } = await reader.read()
        if (done) break
        text += new TextDecoder().decode(value)
      }
      expect(text).toContain('"code":"shutting_down"')
      expect(text).not.toMatch(/"finish_reason":"(stop|length)"/)
      expect(text.trimEnd().endsWith('data: [DONE]')).toBe(true)
      expect(await server.exited).toBe(0)
    } finally {
      if (server.proc.exitCode === null) await server.stop('SIGKILL')
    }
  })

  it('a connection whose request never finishes arriving does not hold the exit past the deadline; bad HTTP gets a JSON error', async () => {
    buildDist()
    const server = await startServer(['--shutdown-timeout', '1'])
    const { hostname, port } = new URL(server.url)
    const raw = (text: string) =>
      new Promise<{ socket: Socket; received: () => string }>((resolve) => {
        let received = ''
        const socket = connect(Number(port), hostname, () => {
          socket.write(text)
          resolve({ socket, received: () => received })
        })
        socket.on('data', (d) => (received += d))
        socket.on('error', () => {})
      })
    try {
      const bad = await raw('GARBAGE\r\n\r\n')
      await expect.poll(bad.received, { timeout: 5000 }).toMatch(/^HTTP\/1\.1 400 Bad Request\r\n/)
      expect(JSON.parse(bad.received().split('\r\n\r\n')[1]!).error.code).toBe('bad_http')
      // Half a body, then silence.
      const stuck = await raw('POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model":')
      const started = Date.now()
      server.proc.kill('SIGTERM')
      expect(await server.exited).toBe(0)
      expect(Date.now() - started).toBeLessThan(10_000)
      stuck.socket.destroy()
    } finally {
      if (server.proc.exitCode === null) await server.stop('SIGKILL')
    }
  })
})
