// The machine code (SASS) of the addon's kernels, without a GPU: per kernel, its instruction count
// and the instructions that tell where a Hopper kernel's issue slots go (wgmma issues, moves of
// vector registers into the uniform registers that wgmma descriptors must sit in, local memory),
// or one kernel's code in full. With a second file, the two side by side, kernel by kernel: the
// check that a change did to the code what it was meant to, before any GPU time is spent on it.
//   node bench/sass.mjs [FILE] [--compare FILE2] [--filter TEXT] [--ops HGMMA,R2UR,...] [--print]
//     [--arch sm_90] [--cuobjdump PATH]
// FILE: an addon (default build/Release/detinfer.node), a harness of build/dev/ or a cubin.
// --filter keeps the kernels whose demangled name contains TEXT; --print prints their code with
// addresses; --arch picks the cubins (sm_90a code is listed as sm_90).
// cuobjdump: --cuobjdump, $CUOBJDUMP, the one on PATH or CUDA's bin/. The cuobjdump of CUDA 12.4
// (Debian's nvidia-cuda-toolkit package, non-free, trixie) reads the sm_90a code of a CUDA 13 build.
import { spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    compare: { type: 'string' },
    filter: { type: 'string', default: '' },
    ops: { type: 'string', default: 'HGMMA,R2UR,WARPGROUP.DEPBAR,MUFU.EX2,LDL,STL' },
    print: { type: 'boolean', default: false },
    arch: { type: 'string', default: 'sm_90' },
    cuobjdump: { type: 'string' },
  },
})

function fail(message) {
  console.error(`sass: ${message}`)
  process.exit(1)
}

function findCuobjdump() {
  const candidates = [values.cuobjdump, process.env.CUOBJDUMP, 'cuobjdump', '/usr/local/cuda/bin/cuobjdump'].filter(Boolean)
  for (const c of candidates) {
    const r = spawnSync(c, ['--version'], { encoding: 'utf8' })
    if (r.status === 0) return c
  }
  fail(`no cuobjdump found (tried ${candidates.join(', ')}); give one with --cuobjdump or $CUOBJDUMP`)
}

// { name (demangled), code: [{ addr, text }] } for every kernel of `file` built for values.arch.
function kernels(cuobjdump, file) {
  if (!existsSync(file)) fail(`${file} does not exist`)
  const r = spawnSync(cuobjdump, ['-sass', '-arch', values.arch, file], { encoding: 'utf8', maxBuffer: 1 << 30 })
  if (r.status !== 0) fail(`${cuobjdump} -sass ${file} failed: ${(r.stderr || String(r.error)).trim()}`)
  const found = []
  for (const line of r.stdout.split('\n')) {
    const fn = line.match(/^\s*Function : (\S+)/)
    if (fn) {
      found.push({ mangled: fn[1], code: [] })
      continue
    }
    const insn = line.match(/^\s+\/\*([0-9a-f]{4,})\*\/\s+(.*?)\s*;?\s*(\/\*.*)?$/)
    if (insn && found.length) found.at(-1).code.push({ addr: insn[1], text: insn[2].replace(/\s*;$/, '') })
  }
  if (!found.length) fail(`${file} holds no ${values.arch} code`)
  const demangled = spawnSync('c++filt', { input: found.map((k) => k.mangled).join('\n'), encoding: 'utf8' })
  const names = demangled.status === 0 ? demangled.stdout.split('\n') : found.map((k) => k.mangled)
  return found.map((k, i) => ({ name: names[i] || k.mangled, code: k.code }))
}

// The opcode of an instruction: its first word after any predicate (`@P0`, `@!UP1`).
const opcode = (text) => text.replace(/^@!?U?P\w+\s+/, '').split(/\s/)[0]
const ops = values.ops.split(',').filter(Boolean)
function counts(code) {
  const row = { instructions: code.length }
  for (const op of ops) row[op] = code.filter((i) => opcode(i.text) === op || opcode(i.text).startsWith(`${op}.`)).length
  return row
}
// A kernel's short name: the template of the kernel without the namespaces and the parameter list.
const shortName = (name) =>
  name
    .replace(/detinfer::cuda::(\(anonymous namespace\)::|sm90::)?/g, '')
    .replace(/\(.*$/, '')
    .replace(/^void /, '')

const cuobjdump = findCuobjdump()
const file = positionals[0] ?? join(import.meta.dirname, '..', 'build', 'Release', 'detinfer.node')
const selected = (list) => list.filter((k) => k.name.includes(values.filter))
const a = selected(kernels(cuobjdump, file))
if (!a.length) fail(`no kernel of ${file} matches "${values.filter}"`)

if (values.print) {
  for (const k of a) {
    console.log(`// ${k.name}: ${k.code.length} instructions`)
    for (const i of k.code) console.log(`${i.addr}  ${i.text}`)
  }
  process.exit(0)
}

const columns = ['instructions', ...ops]
if (!values.compare) {
  console.log(['kernel', ...columns].join('\t'))
  for (const k of a) console.log([shortName(k.name), ...Object.values(counts(k.code))].join('\t'))
} else {
  // Kernels matched by name; a kernel in one file only is listed with dashes for the other.
  const b = new Map(selected(kernels(cuobjdump, values.compare)).map((k) => [k.name, k]))
  console.log(['kernel', ...columns.map((c) => `${c} (a → b)`)].join('\t'))
  const seen = new Set()
  for (const k of a) {
    seen.add(k.name)
    const x = counts(k.code)
    const y = b.has(k.name) ? counts(b.get(k.name).code) : null
    console.log([shortName(k.name), ...columns.map((c) => `${x[c]} → ${y ? y[c] : '-'}`)].join('\t'))
  }
  for (const [name, k] of b)
    if (!seen.has(name)) console.log([shortName(name), ...columns.map((c) => `- → ${counts(k.code)[c]}`)].join('\t'))
}
