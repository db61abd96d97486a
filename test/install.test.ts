// The consumer install from packed tarballs (scripts/test-install.mjs): no compiler, no CMake, no
// nvcc, `npm install --ignore-scripts`, and the CLI works from the prebuilt addon. Runs when the
// prebuilt addon has been built (node scripts/build-prebuilt.mjs --cpu-only, as CI does); it
// needs the npm registry (or npm's cache) for the dependencies.
import { spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'

const root = join(import.meta.dirname, '..')
const prebuilt = join(root, 'packages', 'linux-x64', 'detinfer.node')
const built = existsSync(prebuilt)
if (!built) console.log(`install test skipped: ${prebuilt} is not built (node scripts/build-prebuilt.mjs --cpu-only)`)

describe.skipIf(!built)('consumer install of the packed tarballs', () => {
  it('runs `npx detinfer generate` from the prebuilt package without building anything', () => {
    const r = spawnSync(process.execPath, [join(root, 'scripts', 'test-install.mjs')], { encoding: 'utf8' })
    expect(r.status, r.stderr).toBe(0)
    const result = JSON.parse(r.stdout.trim().split('\n').pop()!)
    expect(result.addon).toMatch(/node_modules\/@detinfer\/linux-x64\/detinfer\.node$/)
    expect(result.installScript).toMatch(/^detinfer: using the prebuilt addon .*@detinfer\/linux-x64\/detinfer\.node$/)
    expect(result.buildFiles).toEqual([])
    expect(result.generated.length).toBeGreaterThan(20)
    expect(result.tarballs.map((t: { file: string }) => t.file)).toEqual([
      expect.stringMatching(/^detinfer-\d.*\.tgz$/),
      expect.stringMatching(/^detinfer-linux-x64-\d.*\.tgz$/),
    ])
  }, 600_000)
})
