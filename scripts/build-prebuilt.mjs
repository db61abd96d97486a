#!/usr/bin/env node
// Builds the prebuilt addon of the @detinfer/linux-x64 package into packages/linux-x64/:
// CUDA sm_80, sm_86, sm_89, sm_90a machine code and compute_80 PTX, the CPU backend, the CUDA
// runtime linked statically. Then checks what the binary needs of the machine it lands on: no
// shared library beyond glibc's and the C++ runtime's (which Node itself links), glibc and
// libstdc++ symbol versions no newer than the ones the package declares ("detinfer": {"glibc",
// "glibcxx"} in packages/linux-x64/package.json), and that it loads here.
//
//   node scripts/build-prebuilt.mjs              the CUDA build (needs nvcc; long on few cores)
//   node scripts/build-prebuilt.mjs --cpu-only   the CPU backend only (or DETINFER_CUDA=OFF); the
//                                                same package and loading path, built in a minute
//
// Then `npm pack` in packages/linux-x64 makes the package; scripts/test-install.mjs installs it.
import { spawnSync } from 'node:child_process'
import { copyFileSync, readFileSync, statSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'

const root = join(import.meta.dirname, '..')
const pkgDir = join(root, 'packages', 'linux-x64')
const addonPath = join(pkgDir, 'detinfer.node')
const cpuOnly = process.argv.includes('--cpu-only') || /^(0|off|false)$/i.test(process.env.DETINFER_CUDA ?? '')

function fail(message) {
  console.error(`build-prebuilt: ${message}`)
  process.exit(1)
}
const readJson = (file) => JSON.parse(readFileSync(file, 'utf8'))

if (process.platform !== 'linux' || process.arch !== 'x64') fail(`builds on linux x64 only, not ${process.platform} ${process.arch}`)
const main = readJson(join(root, 'package.json'))
const prebuilt = readJson(join(pkgDir, 'package.json'))
if (prebuilt.version !== main.version || main.optionalDependencies?.[prebuilt.name] !== main.version)
  fail(
    `versions differ: detinfer ${main.version}, ${prebuilt.name} ${prebuilt.version}, optionalDependencies ` +
      `${main.optionalDependencies?.[prebuilt.name]}; give all three the same version`,
  )
if (process.env.DETINFER_CUDA_ARCHS) console.warn(`build-prebuilt: DETINFER_CUDA_ARCHS=${process.env.DETINFER_CUDA_ARCHS} replaces the default architectures`)

// A build directory of its own, so that the development build in build/ is left as it is.
const require = createRequire(import.meta.url)
const cmakeJs = join(dirname(require.resolve('cmake-js/package.json')), 'bin', 'cmake-js')
const args = [
  cmakeJs,
  'compile',
  '--out',
  join('build', cpuOnly ? 'prebuilt-cpu' : 'prebuilt-cuda'),
  `--CDDETINFER_CUDA=${cpuOnly ? 'OFF' : 'ON'}`,
  '--CDDETINFER_PREBUILT=ON',
  `--CDDETINFER_OUTPUT_DIR=${pkgDir}`,
]
const started = Date.now()
const env = { ...process.env }
delete env.DETINFER_CPU_ONLY // the choice is made by --cpu-only here
const build = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit', env })
if (build.status !== 0) fail(`cmake-js failed with status ${build.status}`)
const seconds = ((Date.now() - started) / 1000).toFixed(0)
copyFileSync(join(root, 'LICENSE'), join(pkgDir, 'LICENSE'))

// What the binary needs of the machine: shared libraries and glibc symbol versions.
const objdump = (flag) => {
  const r = spawnSync('objdump', [flag, addonPath], { encoding: 'utf8' })
  if (r.status !== 0) fail(`objdump ${flag} failed: ${r.stderr || r.error}`)
  return r.stdout
}
const needed = [...objdump('-p').matchAll(/^\s*NEEDED\s+(\S+)/gm)].map((m) => m[1])
const systemLibs = /^(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s)\.so\.\d+$|^ld-linux-x86-64\.so\.2$/
const foreign = needed.filter((lib) => !systemLibs.test(lib))
if (foreign.length) fail(`${addonPath} needs shared libraries beyond glibc's and libstdc++'s: ${foreign.join(', ')}`)
const symbols = objdump('-T')
const newer = (a, b) => {
  const [x, y] = [a.split('.').map(Number), b.split('.').map(Number)]
  for (let i = 0; i < Math.max(x.length, y.length); i++) if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) > (y[i] ?? 0)
  return false
}
const newest = (prefix) =>
  [...symbols.matchAll(new RegExp(`\\b${prefix}_(\\d+(?:\\.\\d+)+)\\b`, 'g'))]
    .map((m) => m[1])
    .reduce((max, v) => (newer(v, max) ? v : max), '0')
const found = { glibc: newest('GLIBC'), glibcxx: newest('GLIBCXX') }
for (const [key, version] of Object.entries(found)) {
  const declared = prebuilt.detinfer?.[key]
  if (!declared) fail(`packages/linux-x64/package.json declares no "detinfer": {"${key}": ...}`)
  if (newer(version, declared))
    fail(`${addonPath} needs ${key} ${version}, newer than the ${declared} its package.json declares`)
}

// It loads, and it is the build that was asked for.
const probe = spawnSync(process.execPath, ['-e', `console.log(JSON.stringify(require(${JSON.stringify(addonPath)}).cudaStatus()))`], {
  encoding: 'utf8',
})
if (probe.status !== 0) fail(`${addonPath} does not load: ${probe.stderr}`)
const status = JSON.parse(probe.stdout)
if (status.compiled === cpuOnly) fail(`${addonPath} was built ${status.compiled ? 'with' : 'without'} CUDA, not as asked`)

const mb = (statSync(addonPath).size / 1e6).toFixed(1)
console.log(
  `build-prebuilt: ${addonPath} (${mb} MB, ${cpuOnly ? 'CPU only' : `CUDA ${status.archs}, runtime ${Math.floor(status.runtimeVersion / 1000)}.${(status.runtimeVersion % 1000) / 10}`}) in ${seconds} s; ` +
    `shared libraries: ${needed.join(', ')}; newest symbol versions: GLIBC_${found.glibc}, GLIBCXX_${found.glibcxx} ` +
    `(declared: glibc ${prebuilt.detinfer.glibc}, glibcxx ${prebuilt.detinfer.glibcxx})`,
)
