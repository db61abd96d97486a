// `detinfer serve` as a child process (dist/cli/main.js), the way users run it: started on a free
// port, ready once it logs "ready", stopped by a signal.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'
import { gpuAvailable } from './gpu.js'

export const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
/** The server tests run on the GPU when there is one, else on the CPU. */
export const DEVICE = gpuAvailable ? 'cuda' : 'cpu'
const cli = join(root, 'dist', 'cli', 'main.js')

let built = false

/** A hash of what dist/ is compiled from: every file under lib/ and the tsconfigs. */
function sourceHash(): string {
  const hash = createHash('sha256')
  const files = [join(root, 'tsconfig.json'), join(root, 'tsconfig.build.json')]
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1)))
      if (e.isDirectory()) walk(join(dir, e.name))
      else files.push(join(dir, e.name))
  }
  walk(join(root, 'lib'))
  for (const f of files) hash.update(`${relative(root, f)}\0`).update(readFileSync(f)).update('\0')
  return hash.digest('hex')
}

/**
 * Compiles lib/ to dist/ (the CLI runs from there), once per test file, unless dist/ was compiled
 * from this very lib/ (the hash noted in dist/.source-hash): then a machine without
 * typescript (the GPU machine's payload leaves it out) runs the tests on the dist/ it was given.
 */
export function buildDist(): void {
  if (built) return
  // Beside what it describes; package.json's files leave it out of the package.
  const stamp = join(root, 'dist', '.source-hash')
  const wanted = sourceHash()
  if (existsSync(stamp) && readFileSync(stamp, 'utf8') === wanted) return void (built = true)
  const compiler = join(root, 'node_modules', 'typescript', 'bin', 'tsc')
  if (!existsSync(compiler)) throw new Error('dist/ was not compiled from this lib/, and typescript (to compile it) is not installed')
  const tsc = spawnSync(process.execPath, [compiler, '-p', 'tsconfig.build.json'], { cwd: root, encoding: 'utf8' })
  if (tsc.status !== 0) throw new Error(`tsc failed:\n${tsc.stdout}${tsc.stderr}`)
  writeFileSync(stamp, wanted)
  built = true
}

/**
 * Runs `script` as an ES module in a node process of its own at the project root (after
 * buildDist, so that it can import ./dist/...), which must exit on its own, cleanly and silently
 * on stderr, within a minute; returns what it printed.
 */
export function runModuleScript(script: string): string {
  buildDist()
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { cwd: root, encoding: 'utf8', timeout: 60_000 })
  if (r.signal !== null) throw new Error(`The script was killed by ${r.signal} (it did not exit on its own within a minute):\n${r.stderr}`)
  if (r.status !== 0) throw new Error(`The script exited with ${r.status}:\n${r.stderr}`)
  if (r.stderr !== '') throw new Error(`The script wrote to stderr:\n${r.stderr}`)
  return r.stdout
}

export interface RunningServer {
  url: string
  proc: ChildProcess
  /** Everything the server wrote to stderr so far. */
  log(): string
  /** Resolves with the exit code. */
  exited: Promise<number | null>
  stop(signal?: NodeJS.Signals): Promise<number | null>
}

export async function startServer(args: string[], env: Record<string, string> = {}): Promise<RunningServer> {
  const proc = spawn(process.execPath, [cli, 'serve', '--port', '0', '--device', DEVICE, ...args], {
    cwd: root,
    env: { ...process.env, CI: '1', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let stderr = ''
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)))
  const url = await new Promise<string>((resolve, reject) => {
    let address = ''
    const timer = setTimeout(() => reject(new Error(`the server did not get ready in 60 s:\n${stderr}`)), 60_000)
    proc.stderr!.setEncoding('utf8')
    proc.stderr!.on('data', (chunk: string) => {
      stderr += chunk
      address ||= /listening on (http:\/\/\S+)/.exec(stderr)?.[1] ?? ''
      if (address && /ready: /.test(stderr)) {
        clearTimeout(timer)
        resolve(address)
      }
    })
    void exited.then((code) => {
      clearTimeout(timer)
      reject(new Error(`the server exited with ${code} before it was ready:\n${stderr}`))
    })
  })
  return {
    url,
    proc,
    log: () => stderr,
    exited,
    stop: (signal = 'SIGTERM') => {
      if (proc.exitCode === null) proc.kill(signal)
      return exited
    },
  }
}

/** POSTs a JSON body (or a raw string) and returns the status, headers and parsed body. */
export async function post(url: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  })
  const text = await res.text()
  let json: unknown = null
  try {
    json = JSON.parse(text)
  } catch {
    json = null
  }
  return { status: res.status, headers: res.headers, text, json: json as Record<string, any> }
}

/** One value of a Prometheus text exposition (the unlabelled series). */
export async function metric(url: string, name: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text()
  const line = text.split('\n').find((l) => l.startsWith(`${name} `))
  if (!line) throw new Error(`no metric ${name} in:\n${text}`)
  return Number(line.split(' ')[1])
}
