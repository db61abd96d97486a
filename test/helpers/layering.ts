// The layer rules of csrc/ and lib/, and the functions that check a set of dependency edges
// against them (test/layering.test.ts). A layer may depend on the layers it lists, never on one
// above it; the test also feeds these functions bad edges to show that they fail.
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { dirname, join, relative, sep } from 'node:path'

/** A dependency from one file to another, paths relative to the tree's root (csrc/ or lib/). */
export interface Edge {
  from: string
  to: string
}

export interface Violation extends Edge {
  fromLayer: string
  toLayer: string
}

// ---------------------------------------------------------------------------------------------
// csrc/

/**
 * What each csrc/ layer may include. common < cuda (the runtime) < kernels; common < cpu; the ops
 * dispatch to cpu and kernels; the binding sees ops, the runtime and common, never a backend.
 */
export const CSRC_LAYERS: Record<string, readonly string[]> = {
  common: [],
  cuda: ['common'],
  cpu: ['common'],
  kernels: ['common', 'cuda'],
  ops: ['common', 'cuda', 'cpu', 'kernels'],
  binding: ['common', 'cuda', 'ops'],
  // The development harnesses are programs of their own above everything but the binding.
  dev: ['common', 'cuda', 'cpu', 'kernels', 'ops'],
}

/** The layer of a file under csrc/: its folder, or `ops` for ops.h and ops.cc. */
export function csrcLayer(file: string): string {
  const parts = file.split('/')
  return parts.length === 1 ? 'ops' : parts[0]!
}

/** The arrows of `edges` that go where their layer may not (a layer always includes itself). */
export function csrcViolations(edges: readonly Edge[]): Violation[] {
  return edges.flatMap((e) => {
    const fromLayer = csrcLayer(e.from)
    const toLayer = csrcLayer(e.to)
    const allowed = CSRC_LAYERS[fromLayer]
    if (allowed === undefined) throw new Error(`csrc/${e.from} is in no declared layer (${fromLayer})`)
    return fromLayer === toLayer || allowed.includes(toLayer) ? [] : [{ ...e, fromLayer, toLayer }]
  })
}

const CSRC_SOURCE = /\.(h|cc|cu|cuh)$/

/** Every `#include "..."` of csrc/, resolved against the including file's folder, then csrc/. */
export function csrcIncludeEdges(csrc: string): { edges: Edge[]; systemIncludes: Edge[]; unresolved: Edge[] } {
  const edges: Edge[] = []
  const systemIncludes: Edge[] = []
  const unresolved: Edge[] = []
  for (const file of listFiles(csrc, CSRC_SOURCE)) {
    const from = relative(csrc, file).split(sep).join('/')
    for (const m of readFileSync(file, 'utf8').matchAll(/^\s*#\s*include\s*([<"])([^>"]+)[>"]/gm)) {
      const [, kind, name] = m as unknown as [string, string, string]
      if (kind === '<') {
        systemIncludes.push({ from, to: name })
        continue
      }
      const target = [join(dirname(file), name), join(csrc, name)].find((p) => existsSync(p))
      if (target === undefined) unresolved.push({ from, to: name })
      else edges.push({ from, to: relative(csrc, target).split(sep).join('/') })
    }
  }
  return { edges, systemIncludes, unresolved }
}

// ---------------------------------------------------------------------------------------------
// lib/

/**
 * lib/'s layers from the bottom up. A module may import modules of lower layers and of its own
 * group; groups of one layer are siblings and do not import each other (the scheduler drives any
 * forward model, the tokenizer knows no model files, grammars know no tensors).
 */
export const LIB_LAYERS: readonly (readonly { group: string; modules: readonly string[] }[])[] = [
  [{ group: 'base', modules: ['errors.ts', 'native.ts', 'files.ts', 'hub-cache.ts', 'eval-worker.ts'] }],
  [
    { group: 'runtime', modules: ['tensor.ts', 'device.ts', 'kv-cache.ts', 'sampling.ts', 'step.ts'] },
    // Token masks from grammars (xgrammar): the tokenizer hands it its vocabulary, the scheduler applies its masks.
    { group: 'grammar', modules: ['grammar.ts'] },
  ],
  [
    { group: 'model', modules: ['model/*'] },
    { group: 'tokenizer', modules: ['tokenizer.ts', 'chat-template.ts', 'encode-worker.ts'] },
    { group: 'scheduler', modules: ['scheduler.ts'] },
  ],
  [{ group: 'generation', modules: ['generate.ts', 'determinism-check.ts'] }],
  [{ group: 'api', modules: ['api.ts'] }],
  [{ group: 'server', modules: ['server/*'] }],
  [{ group: 'cli', modules: ['cli/*'] }],
  [{ group: 'index', modules: ['index.ts'] }],
]

/** The layer (index from the bottom) and group of a module of lib/, or undefined if none declares it. */
export function libPlace(module: string): { layer: number; group: string } | undefined {
  for (const [layer, groups] of LIB_LAYERS.entries())
    for (const { group, modules } of groups)
      if (modules.some((m) => (m.endsWith('/*') ? module.startsWith(m.slice(0, -1)) : m === module))) return { layer, group }
  return undefined
}

/** The imports of `edges` that go up, or sideways into a sibling group. */
export function libViolations(edges: readonly Edge[]): Violation[] {
  return edges.flatMap((e) => {
    const from = libPlace(e.from)
    const to = libPlace(e.to)
    if (!from) throw new Error(`lib/${e.from} is in no declared layer: add it to LIB_LAYERS`)
    if (!to) throw new Error(`lib/${e.to} is in no declared layer: add it to LIB_LAYERS`)
    const ok = from.group === to.group || to.layer < from.layer
    return ok ? [] : [{ ...e, fromLayer: from.group, toLayer: to.group }]
  })
}

/** Every relative import and re-export of lib/**\/*.ts (type-only ones too), as paths of .ts files. */
export function libImportEdges(lib: string): { edges: Edge[]; unresolved: Edge[] } {
  const edges: Edge[] = []
  const unresolved: Edge[] = []
  for (const file of listFiles(lib, /\.ts$/)) {
    const from = relative(lib, file).split(sep).join('/')
    const text = readFileSync(file, 'utf8')
    const specifiers = [
      ...text.matchAll(/^\s*(?:import|export)\b[^;'"]*?\bfrom\s*['"]([^'"]+)['"]/gm),
      ...text.matchAll(/^\s*import\s*['"]([^'"]+)['"]/gm),
      ...text.matchAll(/\bimport\(\s*['"]([^'"]+)['"]\s*\)/g),
    ].map((m) => m[1]!)
    for (const spec of specifiers) {
      if (!spec.startsWith('.')) continue
      const target = join(dirname(file), spec.replace(/\.js$/, '.ts'))
      if (!existsSync(target)) unresolved.push({ from, to: spec })
      else edges.push({ from, to: relative(lib, target).split(sep).join('/') })
    }
  }
  return { edges, unresolved }
}

function listFiles(dir: string, pattern: RegExp): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const path = join(dir, e.name)
    if (e.isDirectory()) return listFiles(path, pattern)
    return pattern.test(e.name) ? [path] : []
  })
}
