#!/usr/bin/env node
// Load test of `detinfer serve`: N concurrent streaming clients over a chat workload whose
// requests share a few long system prompts. Reports throughput, time to first token and
// inter-token latency percentiles, the prefix-cache hit rate, and checks that every answer
// (content and log-probs) equals the same request sent alone afterwards: nothing lost, nothing
// different. A second phase measures time to first token with a long system prompt uncached
// and then cached.
//
//   npm run build:ts
//   node bench/serve.mjs --clients 256 --duration 120                      # starts a server (shipped model)
//   node bench/serve.mjs --model /path/to/Qwen3-0.6B --clients 256 --duration 120 --max-tokens 64
//   node bench/serve.mjs --url http://127.0.0.1:8000 --clients 32          # a server already running
//
// Only loopback addresses are driven. Prints a table last and writes JSON (--json, default
// bench/results/serve.json). Exit status 1 when any request failed or any answer differed.
import { spawn } from 'node:child_process'
import { mkdirSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    model: { type: 'string' },
    device: { type: 'string', default: 'auto' },
    'server-args': { type: 'string', default: '' },
    clients: { type: 'string', default: '16' },
    duration: { type: 'string', default: '20' },
    requests: { type: 'string', default: '100000' },
    'max-tokens': { type: 'string', default: '32' },
    'system-prompts': { type: 'string', default: '4' },
    'system-words': { type: 'string', default: '300' },
    questions: { type: 'string', default: '16' },
    'solo-max': { type: 'string', default: '512' },
    'ttft-trials': { type: 'string', default: '5' },
    'ttft-words': { type: 'string', default: '560' },
    'api-key': { type: 'string', default: process.env.DETINFER_API_KEY ?? '' },
    json: { type: 'string', default: join(root, 'bench', 'results', 'serve.json') },
  },
})
const int = (name) => {
  const n = Number(args[name])
  if (!Number.isInteger(n) || n < 0) throw new Error(`Expected a non-negative integer for --${name} but received ${args[name]}`)
  return n
}
const CLIENTS = int('clients')
const DURATION_S = int('duration')
const MAX_REQUESTS = int('requests')
const MAX_TOKENS = int('max-tokens')
const SYSTEMS = int('system-prompts')
const SYSTEM_WORDS = int('system-words')
const QUESTIONS = int('questions')
const SOLO_MAX = int('solo-max')
const TTFT_TRIALS = int('ttft-trials')
const TTFT_WORDS = int('ttft-words')

// ---------------------------------------------------------------------------------------------
// Workload: deterministic texts, so that runs are comparable

const WORDS = 'sea light harbour storm keeper lamp night ship wave rock tide wind glass stair clock rope bell fog shore gull'.split(' ')

function words(seed, count) {
  let x = Math.imul(seed, 2654435761) >>> 0
  const out = []
  for (let i = 0; i < count; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0
    out.push(WORDS[(x >>> 16) % WORDS.length])
  }
  return out.join(' ')
}

const systemPrompts = Array.from({ length: SYSTEMS }, (_, i) => `You are keeper number ${i}. Your log book reads: ${words(i + 1, SYSTEM_WORDS)}.`)
const questions = Array.from({ length: QUESTIONS }, (_, i) => `Question ${i}: what did you see near the ${WORDS[i % WORDS.length]}?`)

/** Request k of the workload: a system prompt, a question, greedy or seeded. Keys repeat, so answers can be compared. */
function request(k) {
  const system = k % SYSTEMS
  const question = Math.floor(k / SYSTEMS) % QUESTIONS
  const seeded = Math.floor(k / (SYSTEMS * QUESTIONS)) % 2 === 1
  const key = `${system}/${question}/${seeded ? 's' : 'g'}`
  const body = {
    model: '',
    messages: [
      { role: 'system', content: systemPrompts[system] },
      { role: 'user', content: questions[question] },
    ],
    max_tokens: MAX_TOKENS,
    temperature: seeded ? 0.8 : 0,
    ...(seeded && { seed: 7 + question }),
    logprobs: true,
    stream: true,
    stream_options: { include_usage: true },
  }
  return { key, body }
}

// ---------------------------------------------------------------------------------------------
// The server

async function startServer() {
  const extra = args['server-args'].split(' ').filter(Boolean)
  const cli = join(root, 'dist', 'cli', 'main.js')
  const proc = spawn(process.execPath, [cli, 'serve', '--port', '0', '--device', args.device, ...(args.model ? ['-m', args.model] : []), '--max-queued', String(Math.max(256, CLIENTS * 2)), ...extra], {
    stdio: ['ignore', 'ignore', 'pipe'],
  })
  let log = ''
  const url = await new Promise((resolve, reject) => {
    proc.stderr.setEncoding('utf8')
    proc.stderr.on('data', (chunk) => {
      log += chunk
      process.stderr.write(chunk)
      const address = /listening on (http:\/\/\S+)/.exec(log)?.[1]
      if (address && /ready: /.test(log)) resolve(address)
    })
    proc.on('exit', (code) => reject(new Error(`the server exited with ${code}:\n${log}`)))
  })
  return { url, stop: () => new Promise((r) => (proc.exitCode !== null ? r() : (proc.on('exit', r), proc.kill('SIGTERM')))) }
}

function checkLoopback(url) {
  const host = new URL(url).hostname
  if (!['127.0.0.1', 'localhost', '[::1]', '::1'].includes(host)) throw new Error(`bench/serve.mjs drives loopback servers only, not ${host}`)
}

const headers = () => ({ 'content-type': 'application/json', ...(args['api-key'] && { authorization: `Bearer ${args['api-key']}` }) })

/** One streamed chat request: the answer, its log-probs and timings. */
async function streamChat(url, body) {
  const started = performance.now()
  const res = await fetch(`${url}/v1/chat/completions`, { method: 'POST', headers: headers(), body: JSON.stringify(body) })
  if (res.status !== 200) return { ok: false, error: `HTTP ${res.status}: ${(await res.text()).slice(0, 200)}` }
  const decoder = new TextDecoder()
  let buffer = ''
  const answer = { ok: true, text: '', logprobs: [], finish: null, usage: null, ttftMs: 0, gapsMs: [], tokens: 0, done: false, fingerprint: '' }
  let last = 0
  for await (const bytes of res.body) {
    buffer += decoder.decode(bytes, { stream: true })
    let cut
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, cut)
      buffer = buffer.slice(cut + 2)
      if (!event.startsWith('data: ')) continue
      const data = event.slice(6)
      if (data === '[DONE]') {
        answer.done = true
        continue
      }
      const chunk = JSON.parse(data)
      if (chunk.error) return { ok: false, error: chunk.error.message }
      answer.fingerprint = chunk.system_fingerprint
      if (chunk.usage) answer.usage = chunk.usage
      for (const choice of chunk.choices ?? []) {
        const now = performance.now()
        const n = choice.logprobs?.content?.length ?? 0
        if (n > 0) {
          if (answer.tokens === 0) answer.ttftMs = now - started
          else answer.gapsMs.push(now - last) // one chunk per token when log-probs are asked for
          last = now
          answer.tokens += n
          answer.logprobs.push(...choice.logprobs.content.map((t) => t.logprob))
        }
        answer.text += choice.delta?.content ?? ''
        if (choice.finish_reason) answer.finish = choice.finish_reason
      }
    }
  }
  if (!answer.done || !answer.finish) return { ok: false, error: 'the stream ended without finish_reason and [DONE]' }
  return answer
}

async function metrics(url) {
  const text = await (await fetch(`${url}/metrics`)).text()
  const value = (name) => Number(text.split('\n').find((l) => l.startsWith(`${name} `))?.split(' ')[1] ?? NaN)
  return { hit: value('detinfer_prefix_cache_hit_tokens_total'), query: value('detinfer_prefix_cache_query_tokens_total') }
}

function percentile(values, p) {
  if (!values.length) return NaN
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
}

const median = (values) => percentile(values, 50)

// ---------------------------------------------------------------------------------------------

async function main() {
  const server = args.url ? null : await startServer()
  const url = args.url ?? server.url
  checkLoopback(url)
  try {
    const models = await (await fetch(`${url}/v1/models`, { headers: headers() })).json()
    const modelName = models.data[0].id
    const withModel = (body) => ({ ...body, model: modelName })

    // Phase 1: load.
    const before = await metrics(url)
    const deadline = performance.now() + DURATION_S * 1000
    const answers = new Map() // key -> answers seen under load
    const failures = []
    let next = 0
    let tokens = 0
    const ttfts = []
    const gaps = []
    const started = performance.now()
    process.stderr.write(`bench/serve: ${CLIENTS} clients for ${DURATION_S} s (at most ${MAX_REQUESTS} requests), ${MAX_TOKENS} tokens each\n`)
    await Promise.all(
      Array.from({ length: CLIENTS }, async () => {
        while (performance.now() < deadline && next < MAX_REQUESTS) {
          const k = next++
          const { key, body } = request(k)
          let a
          try {
            a = await streamChat(url, withModel(body))
          } catch (err) {
            a = { ok: false, error: String(err) }
          }
          if (!a.ok) {
            failures.push({ key, error: a.error })
            continue
          }
          tokens += a.tokens
          ttfts.push(a.ttftMs)
          gaps.push(...a.gapsMs)
          if (!answers.has(key)) answers.set(key, [])
          answers.get(key).push({ ...a, k })
        }
      }),
    )
    const loadSeconds = (performance.now() - started) / 1000
    const after = await metrics(url)
    const requests = [...answers.values()].reduce((n, list) => n + list.length, 0)

    // Phase 2: each distinct request alone; every answer under load must equal it.
    let mismatched = 0
    let compared = 0
    const keys = [...answers.keys()].slice(0, SOLO_MAX)
    for (const key of keys) {
      const k = answers.get(key)[0].k
      const solo = await streamChat(url, withModel(request(k).body))
      if (!solo.ok) {
        failures.push({ key, error: `solo: ${solo.error}` })
        continue
      }
      for (const a of answers.get(key)) {
        compared++
        const same = a.text === solo.text && a.logprobs.length === solo.logprobs.length && a.logprobs.every((x, i) => Object.is(x, solo.logprobs[i]))
        if (!same) mismatched++
      }
    }

    // Phase 3: time to first token with a long system prompt, uncached then cached (server idle).
    const cold = []
    const warm = []
    let systemTokens = 0
    for (let t = 0; t < TTFT_TRIALS; t++) {
      const body = withModel({
        ...request(0).body,
        max_tokens: 1,
        messages: [
          { role: 'system', content: `Trial ${t} ${Date.now()}. ${words(1000 + t, TTFT_WORDS)}` },
          { role: 'user', content: 'Hello?' },
        ],
      })
      const c = await streamChat(url, body)
      const w = await streamChat(url, body)
      if (!c.ok || !w.ok) {
        failures.push({ key: `ttft ${t}`, error: c.error ?? w.error })
        continue
      }
      cold.push(c.ttftMs)
      warm.push(w.ttftMs)
      systemTokens = c.usage?.prompt_tokens ?? 0
    }

    const hitRate = (after.hit - before.hit) / Math.max(1, after.query - before.query)
    const report = {
      url,
      model: modelName,
      fingerprint: [...answers.values()][0]?.[0]?.fingerprint ?? null,
      clients: CLIENTS,
      seconds: loadSeconds,
      requests,
      failed: failures.length,
      mismatched,
      compared,
      distinctRequests: answers.size,
      completionTokens: tokens,
      tokensPerSecond: tokens / loadSeconds,
      requestsPerSecond: requests / loadSeconds,
      ttftMs: { p50: percentile(ttfts, 50), p90: percentile(ttfts, 90), p99: percentile(ttfts, 99) },
      interTokenMs: { p50: percentile(gaps, 50), p90: percentile(gaps, 90), p99: percentile(gaps, 99) },
      prefixCacheHitRate: hitRate,
      ttftLongPrompt: { promptTokens: systemTokens, uncachedMs: median(cold), cachedMs: median(warm), ratio: median(warm) / median(cold) },
      failures: failures.slice(0, 20),
    }
    mkdirSync(dirname(args.json), { recursive: true })
    writeFileSync(args.json, JSON.stringify(report, null, 2) + '\n')

    const f = (x, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : '-')
    console.log(`\ndetinfer serve under load: ${url} (${modelName}, ${report.fingerprint})`)
    console.log(`  clients                  ${CLIENTS}`)
    console.log(`  duration                 ${f(loadSeconds)} s`)
    console.log(`  requests                 ${requests} (${f(report.requestsPerSecond)}/s), ${answers.size} distinct`)
    console.log(`  failed                   ${failures.length}`)
    console.log(`  answers equal to solo    ${compared - mismatched} of ${compared} (mismatched ${mismatched})`)
    console.log(`  completion tokens/s      ${f(report.tokensPerSecond)}`)
    console.log(`  TTFT ms p50/p90/p99      ${f(report.ttftMs.p50)} / ${f(report.ttftMs.p90)} / ${f(report.ttftMs.p99)}`)
    console.log(`  inter-token ms p50/90/99 ${f(report.interTokenMs.p50, 2)} / ${f(report.interTokenMs.p90, 2)} / ${f(report.interTokenMs.p99, 2)}`)
    console.log(`  prefix-cache hit rate    ${f(100 * hitRate)} % of prompt tokens`)
    console.log(`  TTFT, ${systemTokens}-token prompt   uncached ${f(report.ttftLongPrompt.uncachedMs)} ms, cached ${f(report.ttftLongPrompt.cachedMs)} ms (ratio ${f(report.ttftLongPrompt.ratio, 3)})`)
    console.log(`  JSON                     ${args.json}`)
    if (failures.length || mismatched) process.exitCode = 1
  } finally {
    await server?.stop()
  }
}

await main()
