// Compares addon builds on the replayed decode step: each round runs bench/step-attribution.mjs
// (nothing left out) once per build, in turn, with that build copied to build/Release/detinfer.node,
// and the table gives each build's median and range over the rounds, and its median's difference
// from the first build's. Builds taking turns within one call is what makes differences of a few
// µs readable (docs/performance.md, "Three barriers a key block in the three-deep decode": two
// builds of one source, and one with an extra kernel never launched, stayed within 1.3 µs).
//   node bench/compare-builds.mjs --builds main=/tmp/main.node,new=/tmp/new.node
//     [--keys 200,1000] [--batches 1,8,16,64] [--rounds 3] [-- more step-attribution options]
// A build may carry environment variables for its runs, `name=path@VAR=value@VAR2=value`, so that
// one addon under two development switches takes turns like two builds.
// The addon in build/Release is put back afterwards. Development measurement, on a GPU machine.
import { spawnSync } from 'node:child_process'
import { copyFileSync, existsSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const { values, positionals } = parseArgs({
  options: {
    builds: { type: 'string' },
    keys: { type: 'string', default: '200' },
    batches: { type: 'string', default: '1,8,16,64' },
    rounds: { type: 'string', default: '3' },
  },
  allowPositionals: true,
})
if (!values.builds) throw new Error('--builds: expected name=path[,name=path...] (addon files to compare)')
const builds = values.builds.split(',').map((entry) => {
  const at = entry.indexOf('=')
  if (at < 1) throw new Error(`--builds: expected name=path but received ${entry}`)
  const [path, ...settings] = entry.slice(at + 1).split('@')
  const env = {}
  for (const setting of settings) {
    const eq = setting.indexOf('=')
    if (eq < 1) throw new Error(`--builds: expected VAR=value after @ but received ${setting} (build ${entry.slice(0, at)})`)
    env[setting.slice(0, eq)] = setting.slice(eq + 1)
  }
  const build = { name: entry.slice(0, at), path, env }
  if (!existsSync(build.path)) throw new Error(`--builds: no addon at ${build.path} (build ${build.name})`)
  return build
})
const rounds = Number(values.rounds)
if (!Number.isInteger(rounds) || rounds < 1) throw new Error(`--rounds: expected a positive integer but received ${values.rounds}`)
const keysList = values.keys.split(',')
const batches = values.batches.split(',')

const addon = join(root, 'build', 'Release', 'detinfer.node')
const saved = join(mkdtempSync(join(tmpdir(), 'detinfer-compare-')), 'detinfer.node')
if (existsSync(addon)) copyFileSync(addon, saved)

/** The step's µs at each batch, from step-attribution's "nothing" row, with `build` in place. */
function step(build, keys) {
  copyFileSync(build.path, addon)
  const args = ['bench/step-attribution.mjs', '--leave-out', '', '--keys', keys, '--batches', batches.join(','), ...positionals]
  const run = spawnSync(process.execPath, args, { cwd: root, encoding: 'utf8', env: { ...process.env, ...build.env } })
  const row = run.stdout.split('\n').find((line) => line.startsWith('nothing'))
  if (run.status !== 0 || !row) throw new Error(`step-attribution failed with build ${build.name}:\n${run.stdout}${run.stderr}`)
  return row.trim().split(/\s+/).slice(1).map(Number)
}

const median = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)]
try {
  for (const keys of keysList) {
    // times[build][batch] = the rounds' µs
    const times = builds.map(() => batches.map(() => []))
    for (let r = 0; r < rounds; r++)
      builds.forEach((build, b) => step(build, keys).forEach((us, i) => times[b][i].push(us)))
    console.log(`\n${keys} keys, µs per replayed step: median (range over ${rounds} rounds) [median − ${builds[0].name}'s]`)
    console.log(['build'.padEnd(16), ...batches.map((B) => `batch ${B}`.padStart(30))].join(''))
    const base = times[0].map(median)
    builds.forEach((build, b) => {
      const cells = times[b].map((v, i) => {
        const m = median(v)
        const diff = b === 0 ? '' : ` [${m - base[i] >= 0 ? '+' : ''}${(m - base[i]).toFixed(1)}]`
        return `${m.toFixed(1)} (${Math.min(...v).toFixed(1)}–${Math.max(...v).toFixed(1)})${diff}`.padStart(30)
      })
      console.log([build.name.padEnd(16), ...cells].join(''))
    })
  }
} finally {
  if (existsSync(saved)) copyFileSync(saved, addon)
  rmSync(dirname(saved), { recursive: true, force: true })
}
