#!/usr/bin/env node
// `npm install`'s script. Uses the prebuilt addon (@detinfer/linux-x64, an optional dependency) when
// it is installed and loads on this machine; otherwise builds the addon from source with cmake-js,
// which needs CMake and a C++ compiler (and CUDA's nvcc for the GPU backend).
//
//   DETINFER_CPU_ONLY=1           build from source, CPU backend only (no nvcc needed)
//   DETINFER_BUILD_FROM_SOURCE=1  build from source even when the prebuilt addon loads
//   DETINFER_CUDA_ARCHS=...       build from source for these CUDA architectures (see CMakeLists.txt)
//
// In a checkout of the repository (a .git beside package.json) it always builds from source. An
// installed package (inside node_modules) keeps only build/Release/detinfer.node of its build:
// CMake's intermediates are removed.
import { spawnSync } from 'node:child_process'
import { copyFileSync, existsSync, mkdirSync, readdirSync, renameSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join, sep } from 'node:path'
import { pathToFileURL } from 'node:url'

const root = join(import.meta.dirname, '..')
const buildDir = join(root, 'build')
const sourceAddon = join(buildDir, 'Release', 'detinfer.node')
// An earlier build from source (npm rebuild), set aside while the prebuilt addon is tried and
// while a new build runs: put back if the new build fails, removed once something else works.
// In a checkout, cmake-js's `compile` removes the whole build directory when a build fails (its
// retry as a clean rebuild), so the addon is copied out of it before any build.
const previousBuild = join(root, 'build-previous')
const previousAddon = join(previousBuild, 'Release', 'detinfer.node')
const installed = root.split(sep).includes('node_modules')
const env = process.env
const isSet = (name) => env[name] !== undefined && !/^(|0|false|off)$/i.test(env[name])

const cpuOnly = isSet('DETINFER_CPU_ONLY')
const checkout = existsSync(join(root, '.git'))
const reason = cpuOnly
  ? 'DETINFER_CPU_ONLY is set'
  : isSet('DETINFER_BUILD_FROM_SOURCE')
    ? 'DETINFER_BUILD_FROM_SOURCE is set'
    : isSet('DETINFER_CUDA_ARCHS')
      ? 'DETINFER_CUDA_ARCHS is set'
      : checkout
        ? 'this is a checkout of the repository'
        : await prebuiltUnusable()

if (reason === null) {
  rmSync(previousBuild, { recursive: true, force: true })
  process.exit(0)
}
console.log(`detinfer: building the native addon from source (${reason})${cpuOnly ? ', CPU backend only' : ''}`)
const require = createRequire(import.meta.url)
const cmakeJs = join(dirname(require.resolve('cmake-js/package.json')), 'bin', 'cmake-js')
// An installed package builds in a clean directory (keepOnlyAddon below), so a failure is the
// build's own: `build` reports it. `compile` would run the whole build a second time first (its
// retry as a clean rebuild, for a stale build directory, which a checkout may have).
const args = [cmakeJs, installed ? 'build' : 'compile', ...(cpuOnly ? ['--CDDETINFER_CUDA=OFF'] : [])]
if (existsSync(sourceAddon)) {
  rmSync(previousBuild, { recursive: true, force: true })
  mkdirSync(dirname(previousAddon), { recursive: true })
  copyFileSync(sourceAddon, previousAddon)
}
const build = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' })
if (build.status !== 0) {
  const kept = existsSync(previousAddon)
  if (kept) {
    mkdirSync(dirname(sourceAddon), { recursive: true })
    rmSync(sourceAddon, { force: true })
    renameSync(previousAddon, sourceAddon)
  }
  rmSync(previousBuild, { recursive: true, force: true })
  // The failed build's CMake files go too: the next build starts from a clean directory.
  if (installed) keepOnlyAddon(buildDir)
  console.error(
    'detinfer: the build from source failed (its own messages are above). It needs CMake (3.18 or newer) and a C++17 ' +
      'compiler on PATH' +
      (cpuOnly ? '' : ', and for the GPU backend CUDA 12.4 or newer; set DETINFER_CPU_ONLY=1 to leave out the CUDA backend') +
      '.' +
      (kept ? ' The addon built before is kept.' : ''),
  )
  process.exit(build.status ?? 1)
}
rmSync(previousBuild, { recursive: true, force: true })
if (installed) keepOnlyAddon(buildDir)

// Why the prebuilt addon cannot be used, or null when it loads here (through lib/native.ts, the one
// module that loads the addon, as the package's users will).
async function prebuiltUnusable() {
  const nativeJs = join(root, 'dist', 'native.js')
  if (!existsSync(nativeJs)) return 'dist/native.js is not built'
  const { native, nativeAddonPath, prebuiltAddon, prebuiltPackage } = await import(pathToFileURL(nativeJs).href)
  try {
    if (prebuiltAddon() === null) return `${prebuiltPackage} is not installed`
    // An earlier build from source (npm rebuild) would be loaded before the prebuilt addon: set it aside.
    if (existsSync(buildDir)) {
      rmSync(previousBuild, { recursive: true, force: true })
      renameSync(buildDir, previousBuild)
    }
    native().cudaStatus()
    console.log(`detinfer: using the prebuilt addon ${nativeAddonPath()}`)
    return null
  } catch (err) {
    return `the prebuilt addon does not load: ${err instanceof Error ? err.message : err}`
  }
}

// Removes everything of a cmake-js build but build/Release/detinfer.node (build/ itself when that
// is not there).
function keepOnlyAddon(buildDir) {
  if (!existsSync(join(buildDir, 'Release', 'detinfer.node'))) {
    rmSync(buildDir, { recursive: true, force: true })
    return
  }
  for (const entry of readdirSync(buildDir)) {
    if (entry !== 'Release') rmSync(join(buildDir, entry), { recursive: true, force: true })
  }
  const release = join(buildDir, 'Release')
  for (const entry of readdirSync(release)) {
    if (entry !== 'detinfer.node') rmSync(join(release, entry), { recursive: true, force: true })
  }
}
