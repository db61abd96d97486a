// The built `detinfer` command, run as a user would: a child process of dist/cli/main.js.
import { spawnSync } from 'node:child_process'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { beforeAll, describe, expect, it } from 'vitest'

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
const cli = join(root, 'dist', 'cli', 'main.js')

export function detinfer(args: string[], input?: string) {
  const r = spawnSync(process.execPath, [cli, ...args], { cwd: root, encoding: 'utf8', input, env: { ...process.env, CI: '1' } })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

beforeAll(() => {
  const tsc = spawnSync(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.build.json'], {
    cwd: root,
    encoding: 'utf8',
  })
  if (tsc.status !== 0) throw new Error(`tsc failed:\n${tsc.stdout}${tsc.stderr}`)
})

function expectNoStackTrace(stderr: string) {
  expect(stderr).not.toMatch(/^\s+at /m)
}

describe('detinfer CLI', () => {
  it('info prints the backend, the CUDA build and the versions', () => {
    const r = detinfer(['info'])
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/^detinfer \d+\.\d+\.\d+ \(Node\.js v\d+/)
    expect(r.stdout).toMatch(/^backend: +(cpu|cuda)/m)
    expect(r.stdout).toMatch(/^CUDA build: /m)
    expect(r.stdout).toMatch(/^CUDA driver: /m)
    const json = JSON.parse(detinfer(['info', '--json']).stdout)
    expect(['cpu', 'cuda']).toContain(json.backend)
    expect(json.node).toBe(process.version)
    expect(Array.isArray(json.devices)).toBe(true)
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

  it('rejects a prompt given twice', () => {
    const r = detinfer(['generate', '--prompt-file', 'package.json', 'hello'])
    expect(r.code).toBe(1)
    expect(r.stderr).toContain('give the prompt as an argument or with --prompt-file, not both')
  })
})
