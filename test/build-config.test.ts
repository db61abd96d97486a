// The CMake configuration reads the build's environment variables as scripts/install.mjs and the
// README say: empty, 0, false or off (any case) leave DETINFER_CUDA_ARCHS unset, so the default
// architecture list applies. Runs where cmake and nvcc are (CI has both); configures only.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'

const root = join(import.meta.dirname, '..')
const has = (cmd: string) => spawnSync(cmd, ['--version'], { encoding: 'utf8' }).status === 0
const nvcc = has('nvcc') || existsSync('/usr/local/cuda/bin/nvcc')
const ready = has('cmake') && nvcc
if (!ready) console.log('build configuration test skipped: it needs cmake and nvcc')

/** The architectures CMake configures for with DETINFER_CUDA_ARCHS set to `value`. */
function architectures(value: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'detinfer-cmake-'))
  try {
    const env: NodeJS.ProcessEnv = { ...process.env, DETINFER_CUDA_ARCHS: value }
    delete env.DETINFER_CPU_ONLY
    const r = spawnSync('cmake', ['-S', root, '-B', dir, `-DDETINFER_OUTPUT_DIR=${join(dir, 'out')}`], { encoding: 'utf8', env })
    expect(r.status, r.stderr).toBe(0)
    return /detinfer: CUDA architectures (\S+)/.exec(r.stdout)?.[1] ?? `no architectures in:\n${r.stdout}`
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

describe.skipIf(!ready)('the CMake configuration', () => {
  it('takes DETINFER_CUDA_ARCHS, and off, 0, false or empty as unset', () => {
    const defaults = '80-real;86-real;89-real;90a-real;80-virtual'
    expect(architectures('90a-real')).toBe('90a-real')
    for (const unset of ['off', 'False', '']) expect(architectures(unset), unset).toBe(defaults)
  }, 300_000)
})
