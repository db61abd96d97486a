#!/usr/bin/env node
// The test command (`npm test`): runs vitest once, then prints a plain closing line
// "N passed, N failed, N skipped" that CI systems can read. Extra arguments go to vitest.
import { spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const dir = mkdtempSync(join(tmpdir(), 'detinfer-test-'))
const report = join(dir, 'report.json')
const vitest = join(import.meta.dirname, '..', 'node_modules', 'vitest', 'vitest.mjs')
const args = [vitest, 'run', '--reporter=default', '--reporter=json', `--outputFile.json=${report}`, ...process.argv.slice(2)]
const run = spawnSync(process.execPath, args, { stdio: 'inherit' })

let code = run.status ?? 1
try {
  const r = JSON.parse(readFileSync(report, 'utf8'))
  const skipped = (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0)
  console.log(`\n${r.numPassedTests} passed, ${r.numFailedTests} failed, ${skipped} skipped`)
  if (r.numFailedTests > 0 || r.numFailedTestSuites > 0) code = code || 1
} catch (err) {
  console.error(`test: no vitest report was written (${err.message})`)
  code = code || 1
}
rmSync(dir, { recursive: true, force: true })
process.exit(code)
