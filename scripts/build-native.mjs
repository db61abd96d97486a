#!/usr/bin/env node
// Builds the addon through CMake (cmake-js), into build/Release/detinfer.node. Called by
// binding.gyp's action so that `node-gyp rebuild` produces the same addon as `npm install`.
// CMake's own files go to build/cmake so they do not collide with node-gyp's Makefile in build/.
import { spawnSync } from 'node:child_process'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'

const root = join(import.meta.dirname, '..')
const require = createRequire(import.meta.url)
const cmakeJs = join(dirname(require.resolve('cmake-js/package.json')), 'bin', 'cmake-js')
const args = [cmakeJs, 'compile', '--out', join('build', 'cmake'), ...process.argv.slice(2)]
const run = spawnSync(process.execPath, args, { cwd: root, stdio: 'inherit' })
process.exit(run.status ?? 1)
