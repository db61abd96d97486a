// Seeded corruptions of the shipped model (models/default): the safetensors header (bytes, length,
// dtypes, shapes, offsets, names), truncation, config.json values, tokenizer.json fields and the
// special tokens and chat template of tokenizer_config.json and generation_config.json. Each
// corrupted copy is loaded by a child process (test/model/fuzz-runner.mjs, on the built dist/)
// under a deadline, and must either load and generate finite output, or fail with an Error that
// names the model's file or directory; a crash, a hang, a non-Error or a message that leaks
// internals fails the test, which lists every such case with its seed.
//
//   DETINFER_FUZZ_CASES=2000 DETINFER_FUZZ_SEED=7 npx vitest run test/model/fuzz.test.ts
import { fork, type ChildProcess } from 'node:child_process'
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { mulberry32 } from '../helpers/random.js'
import { buildDist } from '../helpers/server.js'

const repo = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const shipped = join(repo, 'models', 'default')
const CASES = Number(process.env['DETINFER_FUZZ_CASES'] ?? 300)
const SEED = Number(process.env['DETINFER_FUZZ_SEED'] ?? 16)
/** One load plus two short generations of a 4-layer model: well under a second; a case past this hangs. */
const CASE_DEADLINE_MS = 20_000
const FILES = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json']

type Json = any // eslint-disable-line @typescript-eslint/no-explicit-any
type Rand = () => number

interface Corruption {
  /** What was done, for the failure list. */
  what: string
  /** Replaced files (name -> bytes); the others are links to the shipped ones. */
  files: Record<string, Buffer | string>
}

const pick = <T>(rand: Rand, list: readonly T[]): T => list[Math.floor(rand() * list.length)]!

/** Values that have broken loaders: wrong types, edges, huge, tiny, non-finite (1e400 parses to Infinity). */
const NUMBERS = ['0', '-1', '1', '2', '3', '7', '63', '65', '1024', '4096', '4097', '65536', '1e9', '1e7', '2147483648', '1e308', '1e400', '-1e400', '1e-300', '0.5', '2.5', '-0']
const OTHERS = ['null', 'true', 'false', '"64"', '""', '[]', '[1]', '{}', '{"a":1}']
const anyValue = (rand: Rand) => (rand() < 0.7 ? pick(rand, NUMBERS) : pick(rand, OTHERS))

/** Sets (or deletes) `path` inside `json` to raw JSON text `value`, returning the new text. */
function setRaw(json: Json, path: string[], value: string | undefined): string {
  const marker = '__FUZZ_VALUE__'
  let at = json
  for (const key of path.slice(0, -1)) at = at[key]
  const last = path.at(-1)!
  if (value === undefined) delete at[last]
  else at[last] = marker
  return JSON.stringify(json).replace(`"${marker}"`, value ?? '')
}

// ---------------------------------------------------------------------------------------------
// safetensors

interface Safetensors {
  header: Json
  data: Buffer
}

function readSafetensors(bytes: Buffer): Safetensors {
  const n = Number(bytes.readBigUInt64LE(0))
  return { header: JSON.parse(bytes.subarray(8, 8 + n).toString('utf8')), data: bytes.subarray(8 + n) }
}

function writeSafetensors(header: Json | string, data: Buffer, lengthOverride?: bigint): Buffer {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header))
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(lengthOverride ?? BigInt(json.length))
  return Buffer.concat([len, json, data])
}

function corruptWeights(rand: Rand, original: Buffer): Corruption {
  const { header, data } = readSafetensors(original)
  const names = Object.keys(header).filter((k) => k !== '__metadata__')
  const name = pick(rand, names)
  const entry = header[name]
  const kind = Math.floor(rand() * 9)
  const file = (what: string, bytes: Buffer): Corruption => ({ what: `model.safetensors: ${what}`, files: { 'model.safetensors': bytes } })
  switch (kind) {
    case 0: {
      // Bytes of the header text flipped.
      const bytes = Buffer.from(original)
      const n = Number(bytes.readBigUInt64LE(0))
      const flips: string[] = []
      for (let i = 0, count = 1 + Math.floor(rand() * 3); i < count; i++) {
        const at = 8 + Math.floor(rand() * n)
        const to = Math.floor(rand() * 256)
        bytes[at] = to
        flips.push(`${at}=${to}`)
      }
      return file(`header bytes ${flips.join(',')}`, bytes)
    }
    case 1: {
      const length = pick(rand, [0n, 1n, 7n, 2n ** 63n, 2n ** 64n - 1n, BigInt(original.length), BigInt(original.length - 8), 100_000_001n])
      const bytes = Buffer.from(original)
      bytes.writeBigUInt64LE(length, 0)
      return file(`header length ${length}`, bytes)
    }
    case 2: {
      const dtype = pick(rand, ['F16', 'F32', 'BF16', 'I8', 'U8', 'I64', 'F64', 'BOOL', 'F8_E4M3', 'Q4', '', 5, null])
      entry.dtype = dtype
      return file(`${name}.dtype = ${JSON.stringify(dtype)}`, writeSafetensors(header, data))
    }
    case 3: {
      const shape = entry.shape as number[]
      const options: unknown[] = [
        [...shape].reverse(),
        shape.map((d) => d + 1),
        [...shape, 1],
        shape.slice(1),
        [0, ...shape.slice(1)],
        shape.map(() => 2 ** 53),
        [-1, ...shape.slice(1)],
        [shape.reduce((a, b) => a * b, 1)],
        'x',
        null,
        [1.5],
      ]
      entry.shape = pick(rand, options)
      return file(`${name}.shape = ${JSON.stringify(entry.shape)}`, writeSafetensors(header, data))
    }
    case 4: {
      const [b, e] = entry.data_offsets as [number, number]
      const options: unknown[] = [[e, b], [b + 2, e + 2], [b - 2, e - 2], [b, e + 2], [0, e - b], [b, data.length + 2], [-2, e], [b + 0.5, e], [b], null, [b, 2 ** 60]]
      entry.data_offsets = pick(rand, options)
      return file(`${name}.data_offsets = ${JSON.stringify(entry.data_offsets)}`, writeSafetensors(header, data))
    }
    case 5: {
      const renamed = pick(rand, [
        name.replace('layers.0', 'layers.4'),
        name.replace('layers.3', 'layers.9'),
        name.replace('q_norm', 'q_normx'),
        'lm_head.weight',
        `${name}.extra`,
        'model.layers.1000000000.mlp.up_proj.weight',
      ])
      header[renamed] = entry
      if (renamed !== name) delete header[name]
      return file(`${name} renamed ${renamed}`, writeSafetensors(header, data))
    }
    case 6: {
      delete header[name]
      return file(`${name} removed`, writeSafetensors(header, data))
    }
    case 7: {
      const at = Math.floor(rand() * original.length)
      return file(`truncated to ${at} bytes`, original.subarray(0, at))
    }
    default: {
      header[name] = pick(rand, [null, 5, 'x', [], {}, { dtype: 'BF16' }])
      return file(`${name} = ${JSON.stringify(header[name])}`, writeSafetensors(header, data))
    }
  }
}

// ---------------------------------------------------------------------------------------------
// config.json, tokenizer.json, tokenizer_config.json, generation_config.json

const CONFIG_FIELDS = [
  'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim',
  'vocab_size', 'max_position_embeddings', 'rms_norm_eps', 'rope_theta', 'bos_token_id', 'eos_token_id', 'pad_token_id',
  'tie_word_embeddings', 'attention_bias', 'architectures', 'hidden_act', 'torch_dtype', 'dtype', 'sliding_window',
  'use_sliding_window', 'rope_scaling',
]

function corruptConfig(rand: Rand, text: string): Corruption {
  const json = JSON.parse(text)
  const field = pick(rand, CONFIG_FIELDS)
  let value: string | undefined
  if (rand() < 0.1) value = undefined
  else if (field === 'architectures') value = pick(rand, ['["LlamaForCausalLM"]', '["Qwen2ForCausalLM"]', '["MistralForCausalLM"]', '["GPT2LMHeadModel"]', '[]', '"Qwen3ForCausalLM"', '[5]'])
  else if (field === 'rope_scaling')
    value = pick(rand, ['{"rope_type":"llama3","factor":1e400,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":256}', '{"rope_type":"yarn","factor":4}', '{"rope_type":"llama3"}', '5'])
  else value = anyValue(rand)
  if (field === 'rope_theta') delete json['rope_parameters']
  return { what: `config.json: ${field} = ${value ?? '(removed)'}`, files: { 'config.json': setRaw(json, [field], value) } }
}

function corruptTokenizer(rand: Rand, text: string): Corruption {
  const json = JSON.parse(text)
  const out = (what: string, body: string): Corruption => ({ what: `tokenizer.json: ${what}`, files: { 'tokenizer.json': body } })
  const kind = Math.floor(rand() * 8)
  if (kind === 0) {
    const tokens = Object.keys(json.model.vocab)
    const token = pick(rand, tokens)
    const value = pick(rand, ['2000000000', '4096', '4095', '-1', '1.5', '"7"', 'null', '1e400', '16777216'])
    return out(`model.vocab[${JSON.stringify(token)}] = ${value}`, setRaw(json, ['model', 'vocab', token], value))
  }
  if (kind === 1) {
    const value = pick(rand, ['null', '5', '[]', '{}', '{"type":"BPE"}', '{"type":"Unigram","vocab":[["a",0]]}', '{"type":"WordPiece","vocab":{"a":0}}'])
    return out(`model = ${value}`, setRaw(json, ['model'], value))
  }
  if (kind === 2) {
    const field = pick(rand, ['type', 'vocab', 'merges', 'unk_token', 'byte_fallback', 'fuse_unk', 'continuing_subword_prefix'])
    const value = pick(rand, ['null', '"Unigram"', '"WordPiece"', '"WordLevel"', '"Foo"', '5', '[]', '{}', '[1,2]', '["a b c"]', '"x"', 'true'])
    return out(`model.${field} = ${value}`, setRaw(json, ['model', field], value))
  }
  if (kind === 3) {
    const i = Math.floor(rand() * json.added_tokens.length)
    const field = pick(rand, ['id', 'content', 'special'])
    const value = field === 'id' ? pick(rand, ['2000000000', '4096', '-1', '"0"', 'null', '2.5']) : pick(rand, ['null', '5', '""', '"ROMEO"', '"<|im_end|>"'])
    return out(`added_tokens[${i}].${field} = ${value}`, setRaw(json, ['added_tokens', String(i), field], value))
  }
  if (kind === 4) {
    const field = pick(rand, ['normalizer', 'pre_tokenizer', 'post_processor', 'decoder', 'added_tokens', 'truncation', 'padding'])
    const value = pick(rand, ['null', '5', '"x"', '[]', '{}', '{"type":"Foo"}', '{"type":"Sequence","pretokenizers":[null]}', '{"type":"TemplateProcessing","single":5}'])
    return out(`${field} = ${value}`, setRaw(json, [field], value))
  }
  if (kind === 5) {
    const i = Math.floor(rand() * json.model.merges.length)
    const value = pick(rand, ['5', 'null', '"a"', '"a b c"', '["a"]', '[]'])
    return out(`model.merges[${i}] = ${value}`, setRaw(json, ['model', 'merges', String(i)], value))
  }
  if (kind === 6) {
    const at = Math.floor(rand() * text.length)
    return out(`truncated to ${at} characters`, text.slice(0, at))
  }
  return out('not an object', pick(rand, ['[]', 'null', '5', '"tokenizer"']))
}

function corruptSpecial(rand: Rand, tokenizerConfig: string, generationConfig: string): Corruption {
  if (rand() < 0.5) {
    const json = JSON.parse(tokenizerConfig)
    const field = pick(rand, ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'chat_template', 'add_bos_token', 'additional_special_tokens', 'added_tokens_decoder', 'clean_up_tokenization_spaces'])
    const value =
      field === 'chat_template'
        ? pick(rand, [
            '"{% for %}"',
            '"{{"',
            '""',
            '"{% for i in range(100000000) %}x{% endfor %}"',
            '"{{ raise_exception(\'no\') }}"',
            '"{% if false %}x{% endif %}"',
            '[{"name":"default"}]',
            '5',
            '"{{ messages[0].content * 3 }}"',
            '"{% for m in messages %}{% for m2 in messages %}{{ m.content }}{% endfor %}{% endfor %}"',
          ])
        : field === 'added_tokens_decoder'
          ? pick(rand, ['{"2000000000":{"content":"x"}}', '{"x":{}}', '5'])
          : pick(rand, ['null', '5', '""', '"ROMEO"', '"<|im_end|>"', '"<nonexistent>"', '{"content":"<|im_start|>"}', '{"content":5}', '[]', 'true', '"yes"'])
    return { what: `tokenizer_config.json: ${field} = ${value}`, files: { 'tokenizer_config.json': setRaw(json, [field], value) } }
  }
  const json = JSON.parse(generationConfig)
  const field = pick(rand, ['eos_token_id', 'bos_token_id', 'pad_token_id'])
  const value = pick(rand, ['1e9', '4096', '4095', '-1', '[0,1e9]', '[]', '"0"', 'null', '1e400', '2.5'])
  return { what: `generation_config.json: ${field} = ${value}`, files: { 'generation_config.json': setRaw(json, [field], value) } }
}

function corruption(seed: number, originals: Record<string, Buffer>): Corruption {
  const rand = mulberry32(seed)
  const text = (name: string) => originals[name]!.toString('utf8')
  const r = rand()
  if (r < 0.4) return corruptWeights(rand, originals['model.safetensors']!)
  if (r < 0.6) return corruptConfig(rand, text('config.json'))
  if (r < 0.85) return corruptTokenizer(rand, text('tokenizer.json'))
  return corruptSpecial(rand, text('tokenizer_config.json'), text('generation_config.json'))
}

// ---------------------------------------------------------------------------------------------
// Judging the outcome

interface RunnerError {
  isError: boolean
  name: string
  message: string
}
interface Reply {
  loaded: boolean
  error?: RunnerError
  vocabSize?: number
  runs?: { tokens?: number[]; logprobs?: number[]; error?: RunnerError }[]
}

/** Messages of JavaScript's own failures, which say nothing to a user about their files. */
const LEAKS = /Cannot read propert|is not a function|is not iterable|is not defined|of undefined|of null|Invalid array length|Invalid string length|Maximum call stack|EISDIR|ENOTDIR|chunks\[\d+\]/

function judgeError(e: RunnerError, dir: string, stage: string): string | null {
  if (!e.isError) return `${stage} threw a non-Error (${e.name}): ${e.message}`
  if (!['Error', 'TypeError', 'RangeError', 'RequestTooLargeError'].includes(e.name)) return `${stage} threw ${e.name}: ${e.message}`
  // The tokenizer library's own words may follow, quoted, once the message has said what failed where.
  if (LEAKS.test(e.message.replace(/ \(the tokenizer library said: .*\)$/s, ''))) return `${stage} failed with an internal message: ${e.message}`
  if (stage === 'load' && !e.message.includes(dir) && !FILES.some((f) => e.message.includes(f)))
    return `load failed without naming the model's file or directory: ${e.message}`
  return null
}

function judge(reply: Reply, dir: string): string | null {
  if (!reply.loaded) return judgeError(reply.error!, dir, 'load')
  for (const run of reply.runs!) {
    if (run.error) {
      const bad = judgeError(run.error, dir, 'generate')
      if (bad) return bad
      continue
    }
    if (!run.logprobs!.every(Number.isFinite)) return `generated non-finite log-probs ${JSON.stringify(run.logprobs)}`
    if (!run.tokens!.every((t) => Number.isInteger(t) && t >= 0 && t < reply.vocabSize!)) return `generated ids outside the vocabulary ${JSON.stringify(run.tokens)}`
  }
  return null
}

// ---------------------------------------------------------------------------------------------

/** One child process at a time; a crash or a missed deadline ends it, and the next case starts another. */
class Runner {
  private child: ChildProcess | null = null

  private async start(): Promise<ChildProcess> {
    const child = fork(join(repo, 'test', 'model', 'fuzz-runner.mjs'), [], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] })
    child.stderr!.resume()
    await new Promise<void>((resolve, reject) => {
      child.once('message', () => resolve())
      child.once('exit', (code, signal) => reject(new Error(`the fuzz runner exited at start (${code ?? signal})`)))
    })
    return child
  }

  /** The child's reply, or a string saying how it crashed or hung. */
  async load(dir: string, id: number): Promise<Reply | string> {
    const child = this.child ?? (this.child = await this.start())
    return new Promise((resolve) => {
      const done = (result: Reply | string) => {
        clearTimeout(timer)
        child.off('message', onMessage)
        child.off('exit', onExit)
        resolve(result)
      }
      const onMessage = (m: Reply & { id: number }) => m.id === id && done(m)
      const onExit = (code: number | null, signal: string | null) => {
        this.child = null
        done(`the process died (${signal ?? `exit code ${code}`})`)
      }
      const timer = setTimeout(() => {
        this.stop()
        done(`no answer within ${CASE_DEADLINE_MS / 1000} s (hung)`)
      }, CASE_DEADLINE_MS)
      child.on('message', onMessage)
      child.once('exit', onExit)
      child.send({ id, dir })
    })
  }

  stop(): void {
    this.child?.kill('SIGKILL')
    this.child = null
  }
}

describe(`fuzzed copies of the shipped model (${CASES} cases, seed ${SEED})`, () => {
  let root: string
  const runner = new Runner()
  const originals: Record<string, Buffer> = {}
  beforeAll(() => {
    buildDist()
    root = mkdtempSync(join(tmpdir(), 'detinfer-fuzz-'))
    for (const f of FILES) {
      originals[f] = readFileSync(join(shipped, f))
      copyFileSync(join(shipped, f), join(root, f))
    }
  })
  afterAll(() => {
    runner.stop()
    if (root) rmSync(root, { recursive: true, force: true })
  })

  it('each loads and generates finite output, or fails with an Error naming the file', async () => {
    const failures: string[] = []
    let loaded = 0
    let refused = 0
    for (let i = 0; i < CASES; i++) {
      const seed = SEED * 1_000_003 + i
      const c = corruption(seed, originals)
      const dir = join(root, `case-${i}`)
      mkdirSync(dir)
      for (const f of FILES) {
        const replaced = c.files[f]
        if (replaced === undefined) symlinkSync(join(root, f), join(dir, f))
        else writeFileSync(join(dir, f), replaced)
      }
      const reply = await runner.load(dir, i)
      const verdict = typeof reply === 'string' ? reply : judge(reply, dir)
      if (verdict) failures.push(`case ${i} (seed ${seed}) ${c.what}: ${verdict}`)
      else if ((reply as Reply).loaded) loaded++
      else refused++
      rmSync(dir, { recursive: true, force: true })
    }
    expect(failures).toEqual([])
    // Not vacuous: most corruptions are refused, and some (harmless ones) load and generate.
    expect(refused).toBeGreaterThan(CASES / 3)
    expect(loaded).toBeGreaterThan(CASES / 50)
  }, 60_000 + CASES * 1000)
})
