// The built `detinfer` command, run as a user would: a child process of dist/cli/main.js.
import { spawn, spawnSync } from 'node:child_process'
import { copyFileSync, cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs'
import { availableParallelism, tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { loadModel } from '../../lib/api.js'
import { hubCacheDir } from '../../lib/hub-cache.js'
import { defaultGrammarWorkers } from '../../lib/grammar.js'
import { nativeAddonPath } from '../../lib/native.js'
import { buildDist } from '../helpers/server.js'
import { writeTinyModel } from '../helpers/tiny-model.js'
import { THINKING_TEMPLATE } from '../helpers/templates.js'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const cli = join(root, 'dist', 'cli', 'main.js')

function detinfer(args: string[], input?: string) {
  const r = spawnSync(process.execPath, [cli, ...args], { cwd: root, encoding: 'utf8', input, env: { ...process.env, CI: '1' } })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

beforeAll(() => buildDist())

function expectNoStackTrace(stderr: string) {
  expect(stderr).not.toMatch(/^\s+at /m)
}

describe('detinfer CLI', () => {
  it('info prints the backend, the CUDA build, the versions and the default grammar workers', () => {
    const r = detinfer(['info'])
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/^detinfer \d+\.\d+\.\d+ \(Node\.js v\d+/)
    expect(r.stdout).toMatch(/^backend: +(cpu|cuda)/m)
    expect(r.stdout).toContain(`\nplatform:      ${process.platform} ${process.arch}\n`)
    expect(r.stdout).toMatch(/^CUDA build: /m)
    expect(r.stdout).toMatch(/^CUDA driver: /m)
    const json = JSON.parse(detinfer(['info', '--json']).stdout)
    expect(json.huggingFaceCache).toBe(hubCacheDir())
    expect(r.stdout).toContain(`HF cache:      ${hubCacheDir()} (models by repo id, -m owner/name)`)
    expect(['cpu', 'cuda']).toContain(json.backend)
    expect(json.node).toBe(process.version)
    expect(json.platform).toBe(`${process.platform}-${process.arch}`)
    expect(Array.isArray(json.devices)).toBe(true)
    expect(json.grammarWorkers).toEqual({ default: defaultGrammarWorkers(), cores: availableParallelism() })
    expect(r.stdout).toMatch(new RegExp(`^grammar: +${defaultGrammarWorkers()} worker threads? for structured output's masks by default \\(one less than the ${availableParallelism()} cores, at most 8; --grammar-workers on serve\\)$`, 'm'))
    // The matmul family is named when a GPU runs: its bits are part of "same build, same GPU".
    if (json.backend === 'cuda') {
      expect(json.cuda.matmulKernels).toMatch(/^(wgmma \(sm_90a\)|mma\.sync)$/)
      expect(r.stdout).toMatch(/^matmul: +(wgmma \(sm_90a\)|mma\.sync) kernels$/m)
      if (json.devices[0].computeCapability === '9.0' && /90a/.test(json.cuda.architectures))
        expect(json.cuda.matmulKernels).toBe('wgmma (sm_90a)')
    } else {
      expect(json.cuda.matmulKernels).toBe('')
      expect(r.stdout).not.toMatch(/^matmul:/m)
    }
  })

  it('info without a loadable addon prints what it can, where it looked, and the error with its advice, and exits 1', () => {
    // A copy of the installed package (dist/, package.json, the dependencies) without an addon of its own.
    const pkg = mkdtempSync(join(tmpdir(), 'detinfer-cli-no-addon-'))
    try {
      cpSync(join(root, 'dist'), join(pkg, 'dist'), { recursive: true })
      copyFileSync(join(root, 'package.json'), join(pkg, 'package.json'))
      // The dependencies, less the prebuilt addon package (a checkout links its own build there).
      mkdirSync(join(pkg, 'node_modules'))
      for (const entry of readdirSync(join(root, 'node_modules')))
        if (entry !== '@detinfer') symlinkSync(join(root, 'node_modules', entry), join(pkg, 'node_modules', entry))
      const info = (args: string[] = []) => spawnSync(process.execPath, [join(pkg, 'dist', 'cli', 'main.js'), 'info', ...args], { cwd: pkg, encoding: 'utf8', env: { ...process.env, CI: '1' } })
      const addon = join(pkg, 'build', 'Release', 'detinfer.node')
      const version = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version
      const prebuilt = `@detinfer/${process.platform}-${process.arch}`

      const absent = info()
      expect(absent.status).toBe(1)
      expect(absent.stdout).toBe(
        `detinfer ${version} (Node.js ${process.version}, N-API ${process.versions.napi})\n` +
          `platform:      ${process.platform} ${process.arch}\n` +
          `addon:         not loaded; looked for ${addon} (built from source), then ${prebuilt} (prebuilt)\n` +
          `HF cache:      ${hubCacheDir()} (models by repo id, -m owner/name)\n`,
      )
      expect(absent.stderr).toBe(
        `detinfer: no native addon: ${addon} does not exist and ${prebuilt} is not installed. Reinstall detinfer without --ignore-scripts ` +
          '(it uses the prebuilt package where there is one for this platform and builds from source otherwise), or build it from source ' +
          "with `npm rebuild detinfer` (needs CMake and a C++ compiler; CUDA's nvcc for the GPU backend).\n",
      )

      mkdirSync(dirname(addon), { recursive: true })
      writeFileSync(addon, 'not a shared object')
      const broken = info(['--json'])
      expect(broken.status).toBe(1)
      expect(broken.stderr).toMatch(/^detinfer: the native addon .*detinfer\.node could not be loaded \(.+\)\. Build it from source with `npm rebuild detinfer`/)
      expectNoStackTrace(broken.stderr)
      expect(JSON.parse(broken.stdout)).toEqual({
        version,
        node: process.version,
        napi: process.versions.napi,
        platform: `${process.platform}-${process.arch}`,
        addon: null,
        addonSearched: [addon, prebuilt],
        addonError: broken.stderr.trim(),
        huggingFaceCache: hubCacheDir(),
      })
    } finally {
      rmSync(pkg, { recursive: true, force: true })
    }
  })

  it('generate --json-schema and --json-object: JSON the schema accepts, the library\'s answer; a bad schema named, no stack trace', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'detinfer-cli-schema-'))
    try {
      const schema = { type: 'object', properties: { mood: { enum: ['merry', 'sad'] }, loud: { type: 'boolean' } }, required: ['mood', 'loud'], additionalProperties: false }
      const file = join(dir, 'schema.json')
      writeFileSync(file, JSON.stringify(schema))
      const r = detinfer(['generate', 'To be or not', '-n', '40', '--device', 'cpu', '--json-schema', file, '--no-stream'])
      expect(r.code, r.stderr).toBe(0)
      const value = JSON.parse(r.stdout)
      expect(Object.keys(value)).toEqual(['mood', 'loud'])
      const model = await loadModel(undefined, { device: 'cpu', maxBatchSize: 1 })
      try {
        expect(r.stdout).toBe((await model.generate('To be or not', { maxTokens: 40, responseFormat: { type: 'json_schema', schema } })).text + '\n')
      } finally {
        await model.dispose()
      }
      const streamed = detinfer(['generate', 'To be or not', '-n', '40', '--device', 'cpu', '--json-schema', file])
      expect(streamed.stdout).toBe(r.stdout)
      const mode = detinfer(['generate', 'To be or not', '-n', '6', '--device', 'cpu', '--json-object', '--no-stream'])
      expect(mode.code, mode.stderr).toBe(0)
      expect(mode.stdout.startsWith('{')).toBe(true)
      writeFileSync(file, '{"type": 5}')
      const bad = detinfer(['generate', 'x', '--device', 'cpu', '--json-schema', file])
      expect(bad.code).not.toBe(0)
      expect(bad.stderr).toContain('The JSON schema cannot be used: Type should be a string')
      expectNoStackTrace(bad.stderr)
      const both = detinfer(['generate', 'x', '--device', 'cpu', '--json-schema', file, '--json-object'])
      expect(both.code).not.toBe(0)
      expect(both.stderr).toContain('give one of --json-object, --json-schema, --regex, --choice and --grammar, not --json-object and --json-schema')
      const choice = detinfer(['generate', 'To be or not', '-n', '20', '--device', 'cpu', '--choice', 'to be', '--choice', 'not to be', '--no-stream'])
      expect(choice.code, choice.stderr).toBe(0)
      expect(['to be\n', 'not to be\n']).toContain(choice.stdout)
      const regex = detinfer(['generate', 'To be or not', '-n', '20', '--device', 'cpu', '--regex', '[0-9]{3}-[a-z]{2}', '--no-stream'])
      expect(regex.code, regex.stderr).toBe(0)
      expect(regex.stdout).toMatch(/^[0-9]{3}-[a-z]{2}\n$/)
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  })

  it("generate's errors name the flags the user gave, not the library's options", () => {
    const dir = mkdtempSync(join(tmpdir(), 'detinfer-cli-flags-'))
    try {
      const refused = (args: string[], message: string) => {
        const r = detinfer(['generate', 'To be', '--device', 'cpu', ...args])
        expect(r.code, args.join(' ')).toBe(1)
        expect(r.stderr, args.join(' ')).toBe(`detinfer: ${message}\n`)
        expect(r.stdout).toBe('')
      }
      writeFileSync(join(dir, 'schema.json'), '{"type": "object"}')
      writeFileSync(join(dir, 'grammar.ebnf'), 'root ::= "a"')
      for (const format of [['--json-object'], ['--json-schema', join(dir, 'schema.json')], ['--regex', 'a+'], ['--choice', 'a'], ['--grammar', join(dir, 'grammar.ebnf')]])
        refused(['--ignore-eos', ...format], `give --ignore-eos or ${format[0]}, not both: a text the grammar completes ends at EOS`)
      refused(['-n', '0'], 'Expected integer between 1 and 1024 for --max-tokens but received 0 of type number')
      refused(['--temperature', '-1'], 'Expected 0 (greedy) or a number between 1e-30 and 100 for --temperature but received -1 of type number')
      refused(['--temperature', '1', '--top-p', '2'], 'Expected number greater than 0 and at most 1 for --top-p but received 2 of type number')
      refused(['--json', '--top-logprobs', '21'], 'Expected integer between 0 and 20 for --top-logprobs but received 21 of type number')
      refused(['--stop', 'x', '--stop', ''], 'Expected non-empty string for --stop[1] but received "" of type string')
      refused(['--logit-bias', '{"7": 500}'], 'Expected number between -100 and 100 for --logit-bias[7] but received 500 of type number')
      refused(['--regex', ''], 'Expected non-empty string for --regex but received "" of type string')
      refused(['--choice', 'a', '--choice', ''], 'Expected non-empty string for --choice[1] but received "" of type string')
      writeFileSync(join(dir, 'schema.json'), '[]')
      refused(['--json-schema', join(dir, 'schema.json')], 'Expected JSON Schema (an object, or true or false) for --json-schema but received [] of type array')
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  })

  it("score's and check's errors name the flags the user gave, not the library's options", () => {
    const refused = (args: string[], message: string) => {
      const r = detinfer(args)
      expect(r.code, args.join(' ')).toBe(1)
      expect(r.stderr, args.join(' ')).toContain(`detinfer: ${message}\n`)
      expect(r.stderr, args.join(' ')).not.toMatch(/\b(topLogprobs|tensorParallel|maxTokens|topP|topK|minP)\b/)
      expect(r.stdout).toBe('')
    }
    const score = ['score', '--device', 'cpu', '-c', 'x']
    refused([...score, '--json', '--top-logprobs', '21', 'hi'], 'Expected integer between 0 and 20 for --top-logprobs but received 21 of type number')
    refused([...score, '--tensor-parallel', '3', 'hi'], 'Expected 1, 2, 4 or 8 for --tensor-parallel but received 3 of type number')
    const check = ['check', '--device', 'cpu', '--runs', '1', '-n', '1']
    refused([...check, '--temperature', '-1'], 'Expected 0 (greedy) or a number between 1e-30 and 100 for --temperature but received -1 of type number')
    refused([...check, '--temperature', '1', '--top-k', '-1'], 'Expected integer between 0 and 4096 for --top-k but received -1 of type number')
    refused([...check, '--temperature', '1', '--top-p', '2'], 'Expected number greater than 0 and at most 1 for --top-p but received 2 of type number')
    refused([...check, '--temperature', '1', '--min-p', '2'], 'Expected number between 0 and 1 for --min-p but received 2 of type number')
    // check's --seed orders the arrivals; the sampling's seed is --sampling-seed.
    refused([...check, '--temperature', '1', '--sampling-seed', '-1'], 'Expected integer between 0 and 4294967295 for --sampling-seed but received -1 of type number')
    refused([...check, '--tensor-parallel', '3'], 'Expected 1, 2, 4 or 8 for --tensor-parallel but received 3 of type number')
    refused(['check', '--device', 'cpu', '--runs', '1', '-n', '100000'], "The prompt (2 tokens) plus --max-tokens (100000) exceeds the model's context of 1024 tokens")
  })

  it('generate --tensor-parallel: the same tokens and log-probs at 1 and 2, and clear errors for 3 and for heads that do not divide', () => {
    const run = (tp: string) => detinfer(['generate', 'To be or not', '-n', '8', '--device', 'cpu', '--tensor-parallel', tp, '--json', '--no-stream'])
    const [one, two] = [run('1'), run('2')]
    expect(one.code).toBe(0)
    expect(two.code).toBe(0)
    const a = JSON.parse(one.stdout)
    const b = JSON.parse(two.stdout)
    expect(a.tokens).toHaveLength(8)
    expect(b.tokens).toEqual(a.tokens)
    expect(b.logprobs).toEqual(a.logprobs)
    const three = run('3')
    expect(three.code).not.toBe(0)
    expect(three.stderr).toContain('Expected 1, 2, 4 or 8 for --tensor-parallel but received 3 of type number')
    const four = run('4') // the shipped model has 2 kv heads
    expect(four.code).not.toBe(0)
    expect(four.stderr).toContain('Expected num_key_value_heads of the model to be divisible by --tensor-parallel 4 but received num_key_value_heads 2')
    expectNoStackTrace(four.stderr)
  })

  it('--version prints the package version', () => {
    const r = detinfer(['--version'])
    expect(r.code).toBe(0)
    expect(r.stdout.trim()).toMatch(/^\d+\.\d+\.\d+$/)
  })

  it('rejects a non-numeric flag value with a message and a non-zero exit', () => {
    const r = detinfer(['generate', '--max-tokens', 'many', 'hello'])
    expect(r.code).not.toBe(0)
    expect(r.stderr).toContain(`option '-n, --max-tokens <n>' argument 'many' is invalid. expected an integer but received "many"`)
    expect(r.stdout).toBe('')
    expectNoStackTrace(r.stderr)
  })

  it('rejects an unknown option and a bad device choice', () => {
    const unknown = detinfer(['generate', '--frobnicate', 'hello'])
    expect(unknown.code).not.toBe(0)
    expect(unknown.stderr).toContain(`unknown option '--frobnicate'`)
    const device = detinfer(['generate', '--device', 'tpu', 'hello'])
    expect(device.code).not.toBe(0)
    expect(device.stderr).toContain(`argument 'tpu' is invalid. Allowed choices are auto, cpu, cuda.`)
  })

  it('reports a missing model directory in one line', () => {
    const r = detinfer(['generate', '-m', '/nonexistent/model', 'hello'])
    expect(r.code).toBe(1)
    expect(r.stderr.trim()).toBe(
      'detinfer: No model at /nonexistent/model: expected a Hugging Face model directory with config.json, weights and tokenizer.json',
    )
    expectNoStackTrace(r.stderr)
  })

  it('names a prompt file that is a directory or a FIFO, without hanging', () => {
    const tmp = mkdtempSync(join(tmpdir(), 'detinfer-cli-files-'))
    try {
      const r = detinfer(['generate', '--prompt-file', tmp])
      expect(r.code).toBe(1)
      expect(r.stderr.trim()).toBe(`detinfer: Expected a regular file for --prompt-file but ${tmp} is a directory`)
      const score = detinfer(['score', 'hello', '--completion-file', tmp])
      expect(score.stderr.trim()).toBe(`detinfer: Expected a regular file for --completion-file but ${tmp} is a directory`)
      const fifo = join(tmp, 'prompt.fifo')
      if (spawnSync('mkfifo', [fifo]).status === 0) {
        const piped = spawnSync(process.execPath, [cli, 'generate', '--prompt-file', fifo], { cwd: root, encoding: 'utf8', timeout: 20_000 })
        expect(piped.status).toBe(1)
        expect(piped.stderr.trim()).toBe(`detinfer: Expected a regular file for --prompt-file but ${fifo} is a FIFO (named pipe)`)
      }
      expect(detinfer(['generate', '--prompt-file', join(tmp, 'none.txt')]).stderr.trim()).toBe(
        `detinfer: --prompt-file not found: ${join(tmp, 'none.txt')} does not exist`,
      )
    } finally {
      rmSync(tmp, { recursive: true, force: true })
    }
  })

  it("the README's `detinfer serve --help` is the command's", () => {
    const readme = readFileSync(join(root, 'README.md'), 'utf8')
    const block = /`detinfer serve --help`:\n\n```\n([^]*?)```/.exec(readme)?.[1]
    expect(block).toBeDefined()
    const r = detinfer(['serve', '--help'])
    expect(r.code).toBe(0)
    expect(r.stdout).toBe(block)
  })

  it('serve: a model that fails to load stops the server with status 1; an empty API key is refused', () => {
    const tmp = mkdtempSync(join(tmpdir(), 'detinfer-serve-bad-'))
    try {
      for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'model.safetensors'])
        copyFileSync(join(root, 'models', 'default', f), join(tmp, f))
      truncateSync(join(tmp, 'model.safetensors'), 3_000_000)
      const serve = (args: string[], env: Record<string, string> = {}) =>
        spawnSync(process.execPath, [cli, 'serve', '--port', '0', '--device', 'cpu', ...args], {
          cwd: root,
          encoding: 'utf8',
          timeout: 60_000,
          env: { ...process.env, CI: '1', ...env },
        })
      const bad = serve(['-m', tmp])
      expect(bad.status).toBe(1)
      expect(bad.stderr).toMatch(/listening on/)
      expect(bad.stderr).toContain(`detinfer: Invalid safetensors file ${join(tmp, 'model.safetensors')}`)
      expectNoStackTrace(bad.stderr)
      const message = 'detinfer: Expected a non-empty key for --api-key (or DETINFER_API_KEY) but received ""\n'
      for (const [args, env] of [[['--api-key', ''], {}], [[], { DETINFER_API_KEY: '' }]] as const) {
        const empty = serve([...args], env)
        expect(empty.status).toBe(1)
        expect(empty.stderr).toBe(message)
      }
      for (const value of ['localhost:5173', 'http://localhost:5173/', 'ftp://x.example', 'http://a.example,*']) {
        const refused = serve(['--allowed-origins', value])
        expect(refused.status).toBe(1)
        expect(refused.stderr).toMatch(/option '--allowed-origins <origins>' argument '.*' is invalid\. expected '\*' or origins such as http:\/\/localhost:5173 \(scheme, host and port only\) but received "/)
      }
    } finally {
      rmSync(tmp, { recursive: true, force: true })
    }
  })

  it('stops quietly with status 0 when the reader of its output goes away (| head)', () => {
    // The command's own status, through a pipe that closes early.
    const own = spawnSync('bash', ['-c', `set -o pipefail; "${process.execPath}" "${cli}" generate --device cpu -n 300 "ROMEO:" | head -c 1 >/dev/null`], {
      cwd: root,
      encoding: 'utf8',
      env: { ...process.env, CI: '1' },
    })
    expect(own.status, own.stderr).toBe(0)
    expectNoStackTrace(own.stderr)
  })

  it('goes on with its work and its output when the reader of its diagnostics goes away', () => {
    const tmp = mkdtempSync(join(tmpdir(), 'detinfer-stderr-'))
    try {
      const out = join(tmp, 'out.txt')
      // stderr into a pipe that closes after the first byte, stdout into a file.
      const r = spawnSync('bash', ['-c', `"${process.execPath}" "${cli}" generate --device cpu -n 40 "ROMEO:" 2>&1 >"${out}" | head -c 1 >/dev/null; echo "\${PIPESTATUS[0]}"`], {
        cwd: root,
        encoding: 'utf8',
        env: { ...process.env, CI: '1' },
      })
      expect(r.stdout.trim(), r.stderr).toBe('0')
      expect(readFileSync(out, 'utf8').length).toBeGreaterThan(40)
    } finally {
      rmSync(tmp, { recursive: true, force: true })
    }
  })

  it('rejects a prompt given twice', () => {
    for (const command of [['generate'], ['score', '-c', 'x'], ['check', '--device', 'cpu', '--runs', '1', '-n', '1']]) {
      const r = detinfer([...command, '--prompt-file', 'package.json', 'hello'])
      expect(r.code, command[0]).toBe(1)
      expect(r.stderr).toContain('give the prompt as an argument or with --prompt-file, not both')
    }
  })
})

describe('detinfer generate on a tiny model', () => {
  let dir: string
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'detinfer-cli-'))
    writeTinyModel(dir, { architecture: 'LlamaForCausalLM', hiddenSize: 64, numLayers: 2, seed: 9 })
  })
  afterAll(() => rmSync(dir, { recursive: true, force: true }))

  it('--json prints the tokens, log-probs and timings the library gives, bit for bit', async () => {
    const r = detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '10', '--json', 'the weather is'])
    expect(r.code, r.stderr).toBe(0)
    const out = JSON.parse(r.stdout)
    const model = await loadModel(dir, { device: 'cpu' })
    try {
      const lib = await model.generate('the weather is', { maxTokens: 10 })
      expect(out.tokens).toEqual(lib.tokens)
      expect(Float32Array.from(out.logprobs)).toEqual(Float32Array.from(lib.logprobs))
      expect(out.text).toBe(lib.text)
      expect(out.finishReason).toBe(lib.finishReason)
      expect(out.device).toBe('cpu')
      expect(out.timings.promptTokens).toBe(model.tokenize('the weather is').length)
      expect(out.timings.completionTokens).toBe(lib.tokens.length)
    } finally {
      await model.dispose()
    }
  })

  it('--ignore-eos goes on past the end-of-sequence token, as the library does', async () => {
    // The tiny model ends "the end" with EOS after 34 tokens.
    const ended = JSON.parse(detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '60', '--json', 'the end']).stdout)
    expect(ended.finishReason).toBe('stop')
    const r = detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '60', '--json', '--ignore-eos', 'the end'])
    expect(r.code, r.stderr).toBe(0)
    const out = JSON.parse(r.stdout)
    expect(out.finishReason).toBe('length')
    expect(out.tokens.length).toBe(60)
    expect(out.tokens.slice(0, ended.tokens.length)).toEqual(ended.tokens)
    const model = await loadModel(dir, { device: 'cpu' })
    try {
      expect(out.tokens).toEqual((await model.generate('the end', { maxTokens: 60, ignoreEos: true })).tokens)
    } finally {
      await model.dispose()
    }
  })

  it('streams the same text to stdout, with the prompt from an argument, a file or stdin', () => {
    const json = JSON.parse(detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '12', '--json', 'once upon']).stdout)
    const streamed = detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '12', 'once upon'])
    expect(streamed.code).toBe(0)
    expect(streamed.stdout).toBe(json.text + '\n')
    // Not a terminal: plain progress lines on stderr, nothing else on stdout.
    expect(streamed.stderr).toMatch(/^Loading model: 0%/m)
    const file = join(dir, 'prompt.txt')
    writeFileSync(file, 'once upon')
    expect(detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '12', '--no-stream', '--prompt-file', file]).stdout).toBe(json.text + '\n')
    expect(detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '12'], 'once upon').stdout).toBe(json.text + '\n')
  })

  it('seeded sampling from the CLI is reproducible', () => {
    const args = ['generate', '-m', dir, '--device', 'cpu', '-n', '12', '--temperature', '1.2', '--top-k', '50', '--seed', '31', '--json', 'hello']
    const a = JSON.parse(detinfer(args).stdout)
    const b = JSON.parse(detinfer(args).stdout)
    expect(a.seed).toBe(31)
    expect(b.tokens).toEqual(a.tokens)
    expect(b.logprobs).toEqual(a.logprobs)
  })

  it('--min-p and --top-logprobs reach the JSON output, and score reports the same top log-probs', () => {
    const args = ['generate', '--device', 'cpu', '-n', '6', '--temperature', '0.9', '--min-p', '0.1', '--seed', '5', '--top-logprobs', '3', '--json', 'ROMEO:']
    const r = detinfer(args)
    expect(r.code, r.stderr).toBe(0)
    const gen = JSON.parse(r.stdout)
    expect(gen.topLogprobs).toHaveLength(gen.tokens.length)
    for (const top of gen.topLogprobs) {
      expect(top).toHaveLength(3)
      expect(top[0].logprob).toBeGreaterThanOrEqual(top[1].logprob)
    }
    const scored = JSON.parse(
      detinfer(['score', '--device', 'cpu', '--completion-ids', gen.tokens.join(','), '--top-logprobs', '3', '--json', 'ROMEO:']).stdout,
    )
    expect(scored.logprobs).toEqual(gen.logprobs)
    expect(scored.topLogprobs).toEqual(gen.topLogprobs)
    const noJson = detinfer(['generate', '--device', 'cpu', '-n', '2', '--top-logprobs', '3', 'ROMEO:'])
    expect(noJson.code).toBe(1)
    expect(noJson.stderr).toContain('--top-logprobs shows in the --json output: give --json too')
    const bad = detinfer(['generate', '--device', 'cpu', '--temperature', '1', '--min-p', '2', 'ROMEO:'])
    expect(bad.stderr).toContain('Expected number between 0 and 1 for --min-p but received 2 of type number')
  })

  it('--logit-bias, --presence-penalty and --frequency-penalty reach the library; bad values are refused before loading', async () => {
    const base = ['generate', '-m', dir, '--device', 'cpu', '-n', '8', '--json']
    const plain = JSON.parse(detinfer([...base, 'the weather is']).stdout)
    const id = plain.tokens[2]
    const forced = detinfer([...base, '--logit-bias', `{"${id}": 100}`, 'the weather is'])
    expect(forced.code, forced.stderr).toBe(0)
    expect(JSON.parse(forced.stdout).tokens).toEqual(new Array(8).fill(id))
    const penalized = JSON.parse(detinfer([...base, '--presence-penalty', '2', '--frequency-penalty', '1.5', 'the weather is']).stdout)
    const model = await loadModel(dir, { device: 'cpu' })
    try {
      const lib = await model.generate('the weather is', { maxTokens: 8, presencePenalty: 2, frequencyPenalty: 1.5 })
      expect(penalized.tokens).toEqual(lib.tokens)
      expect(Float32Array.from(penalized.logprobs)).toEqual(Float32Array.from(lib.logprobs))
    } finally {
      await model.dispose()
    }
    const bad = detinfer(['generate', '--device', 'cpu', '--presence-penalty', '3', 'ROMEO:'])
    expect(bad.code).toBe(1)
    expect(bad.stderr).toContain('Expected number between -2 and 2 for --presence-penalty but received 3 of type number')
    const notJson = detinfer(['generate', '--device', 'cpu', '--logit-bias', '[1]', 'ROMEO:'])
    expect(notJson.code).toBe(1)
    expect(notJson.stderr).toContain(`expected a JSON object of token ids to biases such as '{"1234": -100}' but received "[1]"`)
  })

  it('--chat applies the chat template', () => {
    const plain = JSON.parse(detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '4', '--json', 'hi']).stdout)
    const chat = JSON.parse(detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '4', '--json', '--chat', 'hi']).stdout)
    expect(chat.timings.promptTokens).toBeGreaterThan(plain.timings.promptTokens + 4)
  })

  it('an out-of-range value fails with the library message and no stack trace', () => {
    const r = detinfer(['generate', '-m', dir, '--device', 'cpu', '-n', '0', 'hello'])
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('detinfer: Expected integer between 1 and 512 for --max-tokens but received 0 of type number')
    expectNoStackTrace(r.stderr)
    expect(r.stdout).toBe('')
  })

  it('names a weights file that is a directory, and says when score passes the context', () => {
    const broken = join(dir, 'weights-dir')
    mkdirSync(join(broken, 'model.safetensors'), { recursive: true })
    for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json']) copyFileSync(join(dir, f), join(broken, f))
    const r = detinfer(['generate', '-m', broken, '--device', 'cpu', 'hello'])
    expect(r.code).toBe(1)
    expect(r.stderr).toContain(`detinfer: Expected a regular file for model.safetensors but ${join(broken, 'model.safetensors')} is a directory\n`)
    expectNoStackTrace(r.stderr)
    const long = detinfer(['score', '-m', dir, '--device', 'cpu', 'x'.repeat(600), '--completion', 'y'])
    expect(long.code).toBe(1)
    expect(long.stderr).toMatch(/^detinfer: The prompt plus completion is \d+ tokens \(\d+ \+ 1\) but the model's context is 512 tokens$/m)
  })

  it('--kv-cache-tokens sizes the KV cache of generate and score, which bounds their context', () => {
    const gen = detinfer(['generate', '-m', dir, '--device', 'cpu', '--kv-cache-tokens', '64', '-n', '100', 'hello'])
    expect(gen.code).toBe(1)
    expect(gen.stderr).toContain("detinfer: --max-tokens (100) exceeds the model's context of 64 tokens (the positions its KV cache holds as loaded")
    const fits = detinfer(['generate', '-m', dir, '--device', 'cpu', '--kv-cache-tokens', '64', '-n', '8', '--json', 'hello'])
    expect(fits.code, fits.stderr).toBe(0)
    expect(JSON.parse(fits.stdout).tokens).toHaveLength(8)
    const score = detinfer(['score', '-m', dir, '--device', 'cpu', '--kv-cache-tokens', '16', 'x'.repeat(40), '--completion', 'y'])
    expect(score.code).toBe(1)
    expect(score.stderr).toMatch(/^detinfer: The prompt plus completion is \d+ tokens \(\d+ \+ 1\) but the model's context is 16 tokens$/m)
    const zero = detinfer(['generate', '-m', dir, '--device', 'cpu', '--kv-cache-tokens', '0', 'hello'])
    expect(zero.code).not.toBe(0)
    expect(zero.stderr).toContain("option '--kv-cache-tokens <n>' argument '0' is invalid")
  })

  it('checks the options before it loads the weights', () => {
    // A directory with the config alone: the option error comes first, not the missing weights.
    const configOnly = join(dir, 'config-only')
    mkdirSync(configOnly, { recursive: true })
    copyFileSync(join(dir, 'config.json'), join(configOnly, 'config.json'))
    const r = detinfer(['generate', '-m', configOnly, '--device', 'cpu', '--temperature', '1', '--top-p', '2', 'hello'])
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('detinfer: Expected number greater than 0 and at most 1 for --top-p but received 2 of type number')
    expect(detinfer(['generate', '-m', configOnly, '--device', 'cpu', 'hello']).stderr).toMatch(/^detinfer: \S+ not found/)
    // score's too.
    const top = detinfer(['score', '-m', configOnly, '--device', 'cpu', '-c', 'x', '--json', '--top-logprobs', '21', 'hello'])
    expect(top.code).toBe(1)
    expect(top.stderr).toContain('detinfer: Expected integer between 0 and 20 for --top-logprobs but received 21 of type number')
    const vocab = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')).vocab_size as number
    const id = detinfer(['score', '-m', configOnly, '--device', 'cpu', '--completion-ids', `3,${vocab}`, 'hello'])
    expect(id.code).toBe(1)
    expect(id.stderr).toContain(`detinfer: Expected integer between 0 and ${vocab - 1} for completion[1] but received ${vocab} of type number`)
    expect(detinfer(['score', '-m', configOnly, '--device', 'cpu', '-c', 'x', 'hello']).stderr).toMatch(/^detinfer: \S+ not found/)
  })

  it('Ctrl-C while streaming keeps the text printed so far and exits with 130', async () => {
    const child = spawn(process.execPath, [cli, 'generate', '-m', dir, '--device', 'cpu', '-n', '500', 'once upon'], {
      cwd: root,
      env: { ...process.env, CI: '1' },
    })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (chunk: Buffer) => {
      if (!stdout) child.kill('SIGINT')
      stdout += chunk.toString()
    })
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()))
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve))
    expect(code).toBe(130)
    expect(stdout.length).toBeGreaterThan(0)
    expect(stderr).toContain('detinfer: interrupted')
    expectNoStackTrace(stderr)
  })
})

describe('the shipped model', () => {
  it('is what generate uses without -m', () => {
    const r = detinfer(['generate', '--device', 'cpu', '-n', '8', '--json', 'ROMEO:'])
    expect(r.code, r.stderr).toBe(0)
    const out = JSON.parse(r.stdout)
    expect(out.model).toBe(join(root, 'models', 'default'))
    expect(out.tokens.length).toBeGreaterThan(0)
    expect(out.tokens.length).toBeLessThanOrEqual(8)
  })

  it('--system puts a system message before the prompt, as the library does with messages', async () => {
    const r = detinfer(['generate', '--device', 'cpu', '-n', '6', '--json', '--system', 'Speak as a king.', 'Who art thou?'])
    expect(r.code, r.stderr).toBe(0)
    const model = await loadModel(join(root, 'models', 'default'), { device: 'cpu' })
    try {
      const lib = await model.generate(
        [
          { role: 'system', content: 'Speak as a king.' },
          { role: 'user', content: 'Who art thou?' },
        ],
        { maxTokens: 6 },
      )
      expect(JSON.parse(r.stdout).tokens).toEqual(lib.tokens)
      // score rebuilds the same prompt, with the template's variables and tensor parallelism too.
      const ids = JSON.parse(r.stdout).tokens.join(',')
      const scored = detinfer(['score', '--device', 'cpu', '--json', '--system', 'Speak as a king.', '--completion-ids', ids, 'Who art thou?'])
      expect(scored.code, scored.stderr).toBe(0)
      expect(JSON.parse(scored.stdout).logprobs).toEqual(JSON.parse(r.stdout).logprobs)
      const extra = ['--chat', '--chat-template-kwargs', '{"enable_thinking": false}', '--tensor-parallel', '2']
      const gen = detinfer(['generate', '--device', 'cpu', '-n', '6', '--json', ...extra, 'Who art thou?'])
      expect(gen.code, gen.stderr).toBe(0)
      const again = detinfer(['score', '--device', 'cpu', '--json', ...extra, '--completion-ids', JSON.parse(gen.stdout).tokens.join(','), 'Who art thou?'])
      expect(again.code, again.stderr).toBe(0)
      expect(JSON.parse(again.stdout).logprobs).toEqual(JSON.parse(gen.stdout).logprobs)
      const bare = detinfer(['score', '--device', 'cpu', '--chat-template-kwargs', '{}', '-c', 'x', 'Who art thou?'])
      expect(bare.stderr).toContain('--chat-template-kwargs applies to the chat template: give --chat or --system too')
    } finally {
      await model.dispose()
    }
  })

  it('--chat-template-kwargs passes variables to the chat template, --chat-template replaces it, and both need --chat or --system', async () => {
    const copy = mkdtempSync(join(tmpdir(), 'detinfer-cli-kwargs-'))
    try {
      cpSync(join(root, 'models', 'default'), copy, { recursive: true })
      writeFileSync(join(copy, 'chat_template.jinja'), THINKING_TEMPLATE)
      const r = detinfer(['generate', '-m', copy, '--device', 'cpu', '-n', '4', '--json', '--chat', '--chat-template-kwargs', '{"enable_thinking": false}', 'Who art thou?'])
      expect(r.code, r.stderr).toBe(0)
      const model = await loadModel(copy, { device: 'cpu' })
      try {
        const lib = await model.generate('Who art thou?', { chat: true, chatTemplateVariables: { enable_thinking: false }, maxTokens: 4 })
        const out = JSON.parse(r.stdout)
        expect(out.tokens).toEqual(lib.tokens)
        expect(out.timings.promptTokens).toBe(model.tokenize('Who art thou?', { chat: true }).length + model.tokenize('<think>\n\n</think>\n\n', { addSpecialTokens: false }).length)
      } finally {
        await model.dispose()
      }
      // The same template given with --chat-template to the shipped model (the same weights) gives the same tokens.
      const given = detinfer(['generate', '--chat-template', join(copy, 'chat_template.jinja'), '--device', 'cpu', '-n', '4', '--json', '--chat', '--chat-template-kwargs', '{"enable_thinking": false}', 'Who art thou?'])
      expect(given.code, given.stderr).toBe(0)
      expect(JSON.parse(given.stdout).tokens).toEqual(JSON.parse(r.stdout).tokens)
      expect(detinfer(['generate', '--chat-template', join(copy, 'chat_template.jinja'), '--device', 'cpu', 'hi']).stderr).toContain(
        '--chat-template applies to chat prompts: give --chat or --system too',
      )
      const without = detinfer(['generate', '-m', copy, '--device', 'cpu', '--chat-template-kwargs', '{"enable_thinking": false}', 'hi'])
      expect(without.code).toBe(1)
      expect(without.stderr).toContain('--chat-template-kwargs applies to the chat template: give --chat or --system too')
      const bad = detinfer(['generate', '-m', copy, '--device', 'cpu', '--chat', '--chat-template-kwargs', 'enable_thinking=false', 'hi'])
      expect(bad.code).not.toBe(0)
      expect(bad.stderr).toContain(`expected a JSON object such as '{"enable_thinking": false}' but received "enable_thinking=false"`)
    } finally {
      rmSync(copy, { recursive: true, force: true })
    }
  })

  it('score gives the log-probs generate printed, bit for bit, and a readable table', () => {
    const gen = JSON.parse(detinfer(['generate', '--device', 'cpu', '-n', '10', '--json', 'ROMEO:']).stdout)
    const r = detinfer(['score', '--device', 'cpu', '--completion-ids', gen.tokens.join(','), '--json', 'ROMEO:'])
    expect(r.code, r.stderr).toBe(0)
    const scored = JSON.parse(r.stdout)
    expect(scored.tokens).toEqual(gen.tokens)
    expect(scored.logprobs).toEqual(gen.logprobs)
    // The tokens as generate --json prints them, a JSON array, are taken too.
    const asJson = detinfer(['score', '--device', 'cpu', '--completion-ids', JSON.stringify(gen.tokens), '--json', 'ROMEO:'])
    expect(asJson.code, asJson.stderr).toBe(0)
    expect(JSON.parse(asJson.stdout).logprobs).toEqual(gen.logprobs)
    const table = detinfer(['score', '--device', 'cpu', '-c', ' Is the day so young?', 'ROMEO:'])
    expect(table.code, table.stderr).toBe(0)
    expect(table.stdout).toMatch(/^\d+ tokens: total log-prob -\d+\.\d+, mean -\d+\.\d+, perplexity \d+\.\d+$/m)
    const both = detinfer(['score', '--device', 'cpu', '-c', 'x', '--completion-ids', '1', 'ROMEO:'])
    expect(both.code).toBe(1)
    expect(both.stderr).toContain('give the completion with exactly one of --completion, --completion-file and --completion-ids')
  })

  it('check exits with status 1 when an invariant-kernel completion differs, with --json too', () => {
    // A preload that leaves the variant kernels on for the invariant run, so that its completions differ.
    const tmp = mkdtempSync(join(tmpdir(), 'detinfer-check-'))
    try {
      const preload = join(tmp, 'variant.cjs')
      writeFileSync(
        preload,
        `const a = require(${JSON.stringify(nativeAddonPath())}); const set = a.setVariantKernels; a.setVariantKernels = () => set.call(a, true)\n`,
      )
      for (const json of [false, true]) {
        const args = ['-r', preload, cli, 'check', '--device', 'cpu', '--runs', '30', '-n', '16', ...(json ? ['--json'] : [])]
        const r = spawnSync(process.execPath, args, { cwd: root, encoding: 'utf8', env: { ...process.env, CI: '1' } })
        const identical = json ? JSON.parse(r.stdout).reports.invariant.identicalToReference : Number(/invariant\s+30\s+16\s+\d+\s+\d+\s+(\d+)\/30/.exec(r.stdout)?.[1])
        expect(identical, r.stdout).toBeLessThan(30)
        expect(r.status, `--json ${json}`).toBe(1)
      }
    } finally {
      rmSync(tmp, { recursive: true, force: true })
    }
  })

  it('check: greedy and seeded sampling runs all equal the run alone; sampling flags need --temperature', () => {
    const greedy = detinfer(['check', '--device', 'cpu', '--runs', '12', '-n', '8', '--json'])
    expect(greedy.code, greedy.stderr).toBe(0)
    const g = JSON.parse(greedy.stdout)
    expect(g.sampling).toBeNull()
    expect(g.reports.invariant.identicalToReference).toBe(12)
    const sampled = detinfer(['check', '--device', 'cpu', '--runs', '12', '-n', '8', '--temperature', '0.8', '--top-p', '0.9', '--sampling-seed', '3', '--json'])
    expect(sampled.code, sampled.stderr).toBe(0)
    const s = JSON.parse(sampled.stdout)
    expect(s.sampling).toEqual({ temperature: 0.8, topK: 0, topP: 0.9, minP: 0, seed: 3 })
    expect(s.reports.invariant.identicalToReference).toBe(12)
    expect(s.reports.invariant.reference.tokens).not.toEqual(g.reports.invariant.reference.tokens)
    const bad = detinfer(['check', '--device', 'cpu', '--top-k', '3'])
    expect(bad.code).toBe(1)
    expect(bad.stderr).toContain('detinfer: --top-k, --top-p, --min-p and --sampling-seed apply to sampling: give a --temperature above 0 too')
    expectNoStackTrace(bad.stderr)
    // generate likewise; and check takes no noise prompts and seed 0.
    for (const temperature of [[], ['--temperature', '0']]) {
      const greedyFlags = detinfer(['generate', '--device', 'cpu', '-n', '2', ...temperature, '--seed', '4', '--top-p', '0.9', 'ROMEO:'])
      expect(greedyFlags.code).toBe(1)
      expect(greedyFlags.stderr).toBe('detinfer: --seed, --top-k, --top-p and --min-p apply to sampling: give a --temperature above 0 too\n')
    }
    expect(detinfer(['check', '--device', 'cpu', '--temperature', '0', '--top-k', '3']).stderr).toContain('give a --temperature above 0 too')
    const quiet = detinfer(['check', '--device', 'cpu', '--runs', '3', '-n', '4', '--noise', '0', '--seed', '0', '--json'])
    expect(quiet.code, quiet.stderr).toBe(0)
    expect(JSON.parse(quiet.stdout).reports.invariant.identicalToReference).toBe(3)
  })

  it('check --json-object: structured completions under varied load, identical to the one run alone', async () => {
    const r = detinfer(['check', '--device', 'cpu', '--runs', '8', '-n', '12', '--seed', '3', '--json-object', '--json'])
    expect(r.code, r.stderr).toBe(0)
    const report = JSON.parse(r.stdout).reports.invariant
    expect(report.identicalToReference).toBe(8)
    // The reference is JSON (an object, ended by EOS, or the start of one), unlike the free one.
    const model = await loadModel(undefined, { device: 'cpu', maxBatchSize: 1 })
    try {
      expect(model.detokenize(report.reference.tokens).startsWith('{')).toBe(true)
      const free = await model.generate('ROMEO:', { maxTokens: 12, ignoreEos: true })
      expect(report.reference.tokens).not.toEqual(free.tokens)
    } finally {
      await model.dispose()
    }
  })

  it('runs every example, and the examples find what they claim', () => {
    const run = (name: string) => spawnSync(process.execPath, [join(root, 'examples', name)], { cwd: root, encoding: 'utf8' })
    for (const name of ['generate.mjs', 'stream.mjs', 'batch.mjs', 'score.mjs', 'chat.mjs', 'structured.mjs']) {
      const r = run(name)
      expect(r.status, `${name}: ${r.stderr}`).toBe(0)
      expect(r.stdout.length).toBeGreaterThan(0)
    }
    expect(run('batch.mjs').stdout).toContain('prompt 0 alone gives the same tokens and log-probs as in the batch: true')
    expect(run('score.mjs').stdout).toContain('scored log-probs equal the generated ones bit for bit: true')
    expect(run('structured.mjs').stdout).toContain('the sampled request beside others gives the same tokens and log-probs: true')
  })
})
