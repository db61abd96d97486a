// The architecture, checked: dependencies run one way in csrc/ (#include lines) and lib/ (imports),
// only the binding includes napi.h, and the op list of csrc/common/op_list.h is what the binding
// registers and lib/native.ts types. The rules live in test/helpers/layering.ts.
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { ADDON_FUNCTIONS, missingAddonFunctions, native } from '../lib/native.js'
import {
  CSRC_LAYERS,
  csrcIncludeEdges,
  csrcViolations,
  libImportEdges,
  libViolations,
  type Violation,
} from './helpers/layering.js'

const root = join(import.meta.dirname, '..')
const csrc = join(root, 'csrc')
const lib = join(root, 'lib')
const arrows = (vs: Violation[]) => vs.map((v) => `${v.from} -> ${v.to} (${v.fromLayer} -> ${v.toLayer})`)

describe('csrc/ layering', () => {
  const { edges, systemIncludes, unresolved } = csrcIncludeEdges(csrc)

  it('every quoted #include names a file of csrc/', () => {
    expect(edges.length).toBeGreaterThan(50)
    expect(unresolved).toEqual([])
  })

  it('no #include goes from a lower layer to a higher one', () => {
    expect(arrows(csrcViolations(edges))).toEqual([])
  })

  it('only the binding includes napi.h', () => {
    const napi = systemIncludes.filter((e) => e.to === 'napi.h').map((e) => e.from)
    expect(napi.length).toBeGreaterThan(0)
    expect(napi.filter((f) => !f.startsWith('binding/'))).toEqual([])
  })

  it('the declared layers have an order (no layer reaches one that reaches back)', () => {
    const reaches = (from: string, to: string, seen = new Set<string>()): boolean =>
      (CSRC_LAYERS[from] ?? []).some((l) => l === to || (!seen.has(l) && (seen.add(l), reaches(l, to, seen))))
    expect(Object.keys(CSRC_LAYERS).filter((l) => reaches(l, l))).toEqual([])
  })

  it('fails on an arrow that goes up', () => {
    const bad = [
      { from: 'common/tensor.cc', to: 'cuda/runtime.h' },
      { from: 'cpu/cpu_ops.h', to: 'ops.h' },
      { from: 'kernels/cuda_ops.h', to: 'ops.h' },
      { from: 'binding/ops_binding.cc', to: 'kernels/cuda_ops.h' },
      { from: 'cuda/runtime_stub.cc', to: 'kernels/cuda_ops.h' },
      { from: 'cpu/matmul.cc', to: 'kernels/matmul.cuh' },
    ]
    expect(arrows(csrcViolations(bad))).toEqual([
      'common/tensor.cc -> cuda/runtime.h (common -> cuda)',
      'cpu/cpu_ops.h -> ops.h (cpu -> ops)',
      'kernels/cuda_ops.h -> ops.h (kernels -> ops)',
      'binding/ops_binding.cc -> kernels/cuda_ops.h (binding -> kernels)',
      'cuda/runtime_stub.cc -> kernels/cuda_ops.h (cuda -> kernels)',
      'cpu/matmul.cc -> kernels/matmul.cuh (cpu -> kernels)',
    ])
    expect(csrcViolations([{ from: 'ops.cc', to: 'cpu/cpu_ops.h' }, { from: 'binding/addon.cc', to: 'ops.h' }])).toEqual([])
  })
})

describe('lib/ layering', () => {
  const { edges, unresolved } = libImportEdges(lib)

  it('every relative import names a module of lib/', () => {
    expect(edges.length).toBeGreaterThan(40)
    expect(unresolved).toEqual([])
  })

  it('no import goes up or into a sibling', () => {
    expect(arrows(libViolations(edges))).toEqual([])
  })

  it('fails on an import that goes up or sideways', () => {
    const bad = [
      { from: 'native.ts', to: 'api.ts' },
      { from: 'model/transformer.ts', to: 'scheduler.ts' },
      { from: 'scheduler.ts', to: 'model/transformer.ts' },
      { from: 'tokenizer.ts', to: 'model/config.ts' },
      { from: 'files.ts', to: 'step.ts' },
      { from: 'tensor.ts', to: 'cli/main.ts' },
      { from: 'api.ts', to: 'index.ts' },
    ]
    expect(arrows(libViolations(bad))).toEqual([
      'native.ts -> api.ts (base -> api)',
      'model/transformer.ts -> scheduler.ts (model -> scheduler)',
      'scheduler.ts -> model/transformer.ts (scheduler -> model)',
      'tokenizer.ts -> model/config.ts (tokenizer -> model)',
      'files.ts -> step.ts (base -> runtime)',
      'tensor.ts -> cli/main.ts (runtime -> cli)',
      'api.ts -> index.ts (api -> index)',
    ])
    expect(libViolations([{ from: 'model/weights.ts', to: 'model/config.ts' }, { from: 'cli/main.ts', to: 'native.ts' }])).toEqual([])
  })

  it('a module in no declared layer is an error', () => {
    expect(() => libViolations([{ from: 'server.ts', to: 'api.ts' }])).toThrow('lib/server.ts is in no declared layer')
  })
})

describe('the op list (csrc/common/op_list.h)', () => {
  const read = (path: string) => readFileSync(join(root, path), 'utf8')
  const list = read('csrc/common/op_list.h')
  const body = list.slice(list.indexOf('#define DETINFER_BACKEND_OPS(X)'))
  const ops = [...body.matchAll(/^\s*X\((\w+),/gm)].map((m) => m[1]!)
  const camel = (name: string) => name.replace(/_(\w)/g, (_, c: string) => c.toUpperCase())
  const binding = read('csrc/binding/ops_binding.cc')
  const registered = [...binding.matchAll(/\{"(\w+)",\s*\w+\}/g)].map((m) => m[1]!)
  const nativeTs = read('lib/native.ts')
  const addonType = nativeTs.slice(nativeTs.indexOf('export interface NativeAddon {'))
  const typed = [...addonType.slice(0, addonType.indexOf('\n}\n')).matchAll(/^ {2}(\w+)\(/gm)].map((m) => m[1]!)

  it('lists the ops', () => {
    expect(ops).toContain('matmul')
    expect(ops).toContain('attention')
    expect(new Set(ops).size).toBe(ops.length)
  })

  it('is expanded by ops.h and both backends instead of repeated', () => {
    for (const header of ['csrc/ops.h', 'csrc/cpu/cpu_ops.h', 'csrc/kernels/cuda_ops.h', 'csrc/kernels/cuda_ops_stub.cc'])
      expect(read(header), header).toMatch(/DETINFER_BACKEND_OPS\(DETINFER_\w+_OP\)/)
  })

  it('every op is registered by the binding under its camelCase name', () => {
    expect(ops.map(camel).filter((name) => !registered.includes(name))).toEqual([])
  })

  it('the binding registers exactly the functions NativeAddon types, and the load checks them all', () => {
    expect(typed.length).toBeGreaterThan(ops.length)
    expect([...registered].sort()).toEqual([...typed].sort())
    expect([...ADDON_FUNCTIONS].sort()).toEqual([...typed].sort())
    // The loaded addon has them all; one built from older sources is told apart by name.
    expect(missingAddonFunctions(native())).toEqual([])
    const { resetLogitRow: _, attentionSplitSize: __, ...older } = native()
    expect(missingAddonFunctions({ ...older, attentionSplitSize: 256 })).toEqual(['resetLogitRow', 'attentionSplitSize'])
  })
})
