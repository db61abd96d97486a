#!/usr/bin/env node
// Installs the packed package as a consumer would, into an empty directory, and runs the CLI.
//
//   node scripts/test-install.mjs            `npm pack` detinfer and packages/linux-x64 (build the
//                                            addon first: scripts/build-prebuilt.mjs [--cpu-only]),
//                                            `npm install --ignore-scripts` both tarballs with no
//                                            CMake, nvcc or C/C++ compiler on PATH, then
//                                            `npx detinfer generate "ROMEO:"`; then `npm rebuild
//                                            detinfer` (its install script) must pick the prebuilt
//                                            addon and build nothing.
//   node scripts/test-install.mjs --source   `npm install` the detinfer tarball alone with
//                                            DETINFER_CPU_ONLY=1: the install script builds from
//                                            source and leaves only build/Release/detinfer.node;
//                                            then an `npm rebuild detinfer` whose build fails (a
//                                            C++ compiler that always fails) must keep that addon.
//
// Both check what the detinfer tarball holds: what the package needs at run time and for a build
// from source, no development files, and no dist/ file without its lib/ source.
//
// Prints what it measured (install time, tarball and installed sizes) and, last, one line of JSON
// that test/install.test.ts reads. Exits non-zero when a step fails.
import { spawnSync } from 'node:child_process'
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'

const root = join(import.meta.dirname, '..')
const prebuiltDir = join(root, 'packages', 'linux-x64')
const fromSource = process.argv.includes('--source')
const keep = process.argv.includes('--keep')
const work = mkdtempSync(join(tmpdir(), 'detinfer-install-'))
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'

function fail(message) {
  console.error(`test-install: ${message}`)
  process.exit(1)
}

function run(cmd, args, opts = {}, expectFailure = false) {
  const started = Date.now()
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...opts })
  const seconds = (Date.now() - started) / 1000
  if ((r.status !== 0) !== expectFailure)
    fail(`${cmd} ${args.join(' ')} ${expectFailure ? 'succeeded' : 'failed'} with status ${r.status} ${r.error ?? ''}\n${r.stdout ?? ''}\n${r.stderr ?? ''}`)
  return { stdout: r.stdout, stderr: r.stderr, seconds }
}

// `npm pack --json` of a directory: the tarball's path, sizes and files.
function pack(dir) {
  const { stdout } = run(npm, ['pack', '--json', '--pack-destination', work], { cwd: dir })
  const [info] = JSON.parse(stdout.slice(stdout.indexOf('[')))
  return {
    file: join(work, info.filename),
    size: info.size,
    unpackedSize: info.unpackedSize,
    entries: info.entryCount,
    paths: info.files.map((f) => f.path),
  }
}

// What the detinfer tarball must hold and must not.
function checkContents(paths) {
  const has = new Set(paths)
  const required = [
    'package.json', 'README.md', 'LICENSE', 'CMakeLists.txt', 'binding.gyp', 'scripts/install.mjs', 'scripts/build-native.mjs',
    'dist/index.js', 'dist/index.d.ts', 'dist/native.js', 'dist/cli/main.js', 'dist/chat-template.js', 'dist/encode-worker.js',
    'csrc/binding/addon.cc', 'csrc/ops.cc',
    ...readdirSync(join(root, 'models', 'default'))
      .filter((f) => f !== 'training_stats.json')
      .map((f) => `models/default/${f}`),
  ]
  const missing = required.filter((p) => !has.has(p))
  if (missing.length) fail(`the tarball lacks ${missing.join(', ')}`)
  const devOnly = paths.filter(
    (p) =>
      /^(lib|test|bench|tools|examples|packages|build|node_modules|csrc\/dev)\//.test(p) ||
      /^\./.test(p) ||
      p === 'dist/.source-hash' ||
      p === 'models/default/training_stats.json' ||
      (/\.ts$/.test(p) && !/\.d\.ts$/.test(p)) ||
      /\.(map|tgz|log)$/.test(p),
  )
  if (devOnly.length) fail(`the tarball holds development files: ${devOnly.join(', ')}`)
  // dist/ is compiled into, not emptied: a module whose source is gone would ship.
  const orphans = paths.filter((p) => /^dist\/.*\.js$/.test(p) && !existsSync(join(root, 'lib', p.slice(5).replace(/\.js$/, '.ts'))))
  if (orphans.length) fail(`the tarball holds dist/ files without a source in lib/: ${orphans.join(', ')}`)
}

// A PATH with every program of the current one except build tools.
function pathWithoutBuildTools() {
  const banned = /^(cmake|ctest|cpack|nvcc|gcc|g\+\+|cc|c\+\+|clang|clang\+\+|make|ninja)(-[\d.]+)?$/
  const bin = join(work, 'bin')
  mkdirSync(bin)
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (!dir || !existsSync(dir)) continue
    for (const name of readdirSync(dir)) {
      if (banned.test(name) || existsSync(join(bin, name))) continue
      symlinkSync(join(dir, name), join(bin, name))
    }
  }
  return bin
}

function du(path) {
  if (!existsSync(path)) return 0
  const st = statSync(path, { throwIfNoEntry: false })
  if (!st) return 0
  if (!st.isDirectory()) return st.size
  return readdirSync(path).reduce((sum, name) => sum + du(join(path, name)), 0)
}

function listTree(dir, prefix = '') {
  if (!existsSync(dir)) return []
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? listTree(join(dir, e.name), `${prefix}${e.name}/`) : [`${prefix}${e.name}`],
  )
}

const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`

const tarballs = []
const main = pack(root)
checkContents(main.paths)
tarballs.push(main)
if (!fromSource) {
  if (!existsSync(join(prebuiltDir, 'detinfer.node')))
    fail(`${join(prebuiltDir, 'detinfer.node')} is not built: run node scripts/build-prebuilt.mjs [--cpu-only] first`)
  tarballs.push(pack(prebuiltDir))
}

const app = join(work, 'app')
mkdirSync(app)
const env = { ...process.env, npm_config_audit: 'false', npm_config_fund: 'false', npm_config_update_notifier: 'false' }
for (const key of Object.keys(env)) if (key.startsWith('DETINFER_')) delete env[key]
if (fromSource) {
  env.DETINFER_CPU_ONLY = '1'
} else {
  env.PATH = pathWithoutBuildTools()
  for (const tool of ['cmake', 'nvcc', 'g++', 'cc'])
    if (spawnSync('sh', ['-c', `command -v ${tool}`], { env }).status === 0) fail(`${tool} is still on PATH`)
}

const installArgs = ['install', '--prefer-offline', ...(fromSource ? [] : ['--ignore-scripts']), ...tarballs.map((t) => t.file)]
const install = run(npm, installArgs, { cwd: app, env })
const installed = join(app, 'node_modules', 'detinfer')

// With its install script, as `npm install` runs it: it must find the prebuilt addon and build nothing.
let installScript = ''
if (!fromSource) {
  const rebuild = run(npm, ['rebuild', 'detinfer', '--foreground-scripts'], { cwd: app, env })
  installScript = (rebuild.stdout + rebuild.stderr).match(/^detinfer: .*$/m)?.[0] ?? ''
  if (!installScript.includes('using the prebuilt addon')) fail(`the install script did not use the prebuilt addon:\n${rebuild.stdout}\n${rebuild.stderr}`)
}

// A later build from source that fails (here at CMake's compiler check) keeps the addon built
// before it, and nothing else; it runs once (cmake-js's compile would retry it as a clean rebuild).
let failedRebuild = ''
if (fromSource) {
  const addon = join(installed, 'build', 'Release', 'detinfer.node')
  const before = readFileSync(addon)
  const failingCxx = join(work, 'failing-c++')
  writeFileSync(failingCxx, '#!/bin/sh\nexit 1\n')
  chmodSync(failingCxx, 0o755)
  const rebuild = run(npm, ['rebuild', 'detinfer', '--foreground-scripts'], { cwd: app, env: { ...env, CXX: failingCxx } }, true)
  failedRebuild = (rebuild.stdout + rebuild.stderr).match(/^detinfer: the build from source failed.*$/m)?.[0] ?? ''
  if (!failedRebuild.endsWith('The addon built before is kept.')) fail(`the failed rebuild did not keep the addon:\n${rebuild.stdout}\n${rebuild.stderr}`)
  if (!existsSync(addon) || !readFileSync(addon).equals(before)) fail(`the failed rebuild did not keep ${addon} as it was`)
  if (existsSync(join(installed, 'build-previous'))) fail('the failed rebuild left build-previous/')
  if (/full rebuild/.test(rebuild.stdout + rebuild.stderr)) fail(`the failed build ran a second time:\n${rebuild.stdout}\n${rebuild.stderr}`)
}

const generate = run('npx', ['detinfer', 'generate', 'ROMEO:'], { cwd: app, env })
if (generate.stdout.trim() === '') fail('`npx detinfer generate "ROMEO:"` printed nothing')
const info = JSON.parse(run('npx', ['detinfer', 'info', '--json'], { cwd: app, env }).stdout)
const buildFiles = listTree(join(installed, 'build'))

const result = {
  mode: fromSource ? 'source' : 'prebuilt',
  installSeconds: Number(install.seconds.toFixed(1)),
  generateSeconds: Number(generate.seconds.toFixed(1)),
  installScript,
  failedRebuild,
  generated: generate.stdout,
  addon: info.addon,
  backend: info.backend,
  cudaCompiled: info.cuda.compiled,
  buildFiles,
  tarballs: tarballs.map(({ file, size, unpackedSize, entries }) => ({ file: file.split('/').pop(), size, unpackedSize, entries })),
  installedBytes: {
    node_modules: du(join(app, 'node_modules')),
    detinfer: du(installed),
    prebuilt: du(join(app, 'node_modules', '@detinfer')),
  },
}

if (fromSource) {
  if (buildFiles.join() !== 'Release/detinfer.node') fail(`build/ should hold Release/detinfer.node alone, not: ${buildFiles.join(', ')}`)
  if (result.cudaCompiled) fail('DETINFER_CPU_ONLY=1 gave a build with CUDA')
  if (!result.addon.endsWith(join('node_modules', 'detinfer', 'build', 'Release', 'detinfer.node'))) fail(`loaded ${result.addon}`)
} else {
  if (buildFiles.length) fail(`nothing should have been built, but build/ holds: ${buildFiles.join(', ')}`)
  if (!result.addon.endsWith(join('node_modules', '@detinfer', 'linux-x64', 'detinfer.node'))) fail(`loaded ${result.addon}`)
}

console.log(`install (${result.mode}): ${result.installSeconds} s; generate: ${result.generateSeconds} s, addon ${result.addon}`)
for (const t of result.tarballs) console.log(`tarball ${t.file}: ${mb(t.size)} packed, ${mb(t.unpackedSize)} unpacked, ${t.entries} files`)
console.log(
  `installed: node_modules ${mb(result.installedBytes.node_modules)}, detinfer ${mb(result.installedBytes.detinfer)}, ` +
    `@detinfer ${mb(result.installedBytes.prebuilt)}; build/: ${buildFiles.length ? buildFiles.join(', ') : 'none'}`,
)
console.log(JSON.stringify(result))
if (!keep) rmSync(work, { recursive: true, force: true })
else console.error(`test-install: kept ${work}`)
