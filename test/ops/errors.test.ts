// Bad input to any op is a JS exception with a message naming the op, the argument, what was
// expected and what was given; never a crash.
import { spawnSync } from 'node:child_process'
import { describe, expect, it } from 'vitest'
import { native, nativeAddonPath } from '../../lib/native.js'
import { tensorFrom } from '../../lib/tensor.js'

const n = native()
const bf = (shape: number[]) => tensorFrom('cpu', 'bf16', shape, new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.5))
const i32 = (values: number[]) => tensorFrom('cpu', 'i32', [values.length], values)
const f32 = (shape: number[]) => tensorFrom('cpu', 'f32', shape, new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.25))

describe('op argument validation', () => {
  it('rejects a non-tensor argument', () => {
    expect(() => n.rmsnorm(bf([2, 4]), 3 as never, bf([4]), 1e-6)).toThrow('rmsnorm: expected a Tensor for x but received 3')
    expect(() => n.matmul(bf([2, 4]), bf([2, 4]), undefined as never, null)).toThrow('expected a Tensor for w but received undefined')
  })

  it('rejects wrong dtypes', () => {
    expect(() => n.matmul(bf([2, 3]), f32([2, 4]), bf([3, 4]), null)).toThrow(
      'matmul: expected a to be bf16 but received f32[2,4] on cpu',
    )
    expect(() => n.argmax(f32([2]), f32([2, 5]))).toThrow('argmax: expected out to be i32 but received f32[2] on cpu')
  })

  it('rejects mismatched shapes', () => {
    expect(() => n.matmul(bf([2, 3]), bf([2, 4]), bf([3, 5]), null)).toThrow(
      'matmul: expected dimension 1 of a to be 5 (K, the second dimension of w) but received bf16[2,4] on cpu',
    )
    expect(() => n.rmsnorm(bf([2, 4]), bf([2, 4]), bf([5]), 1e-6)).toThrow(
      'rmsnorm: expected the last dimension of x to equal the size of w (5)',
    )
    expect(() => n.add(bf([2, 4]), bf([2, 4]), bf([4, 2]))).toThrow('add: expected a and b to have the same shape')
  })

  it('rejects out-of-range ids and positions without crashing', () => {
    expect(() => n.embedding(bf([1, 4]), bf([3, 4]), i32([3]))).toThrow('embedding: id 3 at index 0 is out of range [0, 3)')
    expect(() => n.tokenLogprobs(f32([1]), f32([1, 5]), i32([-1]))).toThrow('token_logprobs: id -1 at row 0 is out of range')
    const cosSin = f32([4, 2])
    expect(() => n.rope(bf([1, 1, 2]), i32([4]), cosSin)).toThrow("rope: position 4 at index 0 is outside the table's [0, 4)")
  })

  it('rejects bad tensor construction', () => {
    expect(() => n.empty('tpu' as never, 'f32', [2])).toThrow("Expected 'cpu' or 'cuda' for device but received 'tpu'")
    expect(() => n.empty('cpu', 'f64' as never, [2])).toThrow('Expected one of bf16, f16, f32, i32, u16 for dtype')
    expect(() => n.empty('cpu', 'f32', [2, -1])).toThrow('empty: expected an array of non-negative integers for shape')
    expect(() => n.fromBuffer('cpu', 'f32', [3], new Float32Array(2))).toThrow(
      'fromBuffer: expected 12 bytes of data for f32[3] on cpu but received 8',
    )
    expect(() => n.view(f32([2, 3]), [4, 2])).toThrow('cannot view f32[2,3] on cpu as [4,2]: element counts differ')
  })

  it('rejects use after dispose', () => {
    const t = f32([2])
    t.dispose()
    expect(t.disposed).toBe(true)
    expect(() => n.copy(f32([2]), t)).toThrow('copy: tensor src was disposed')
    expect(() => t.shape).toThrow('cannot read shape of a disposed tensor')
  })

  it('explains why CUDA cannot be used', () => {
    const status = n.cudaStatus()
    if (status.available) return
    expect(() => n.empty('cuda', 'f32', [1])).toThrow(/CUDA device requested but .*use device: 'cpu'/)
  })
})

// Each case in a child process of its own: a crash there (a signal, an abort) fails the case
// instead of the test runner, and a hang hits the deadline.
function isolated(body: string): { status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string } {
  const script = `const n = require(${JSON.stringify(nativeAddonPath())});\n${body}`
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 30_000 })
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr }
}

describe('native robustness: what an op reads never takes the process down', () => {
  const attentionCall = (tables: string, starts: string, kvHeads = 2) => `
    const i32 = (a) => n.fromBuffer('cpu', 'i32', [a.length], new Int32Array(a))
    const bf16 = (s) => n.fromBuffer('cpu', 'bf16', s, new Uint16Array(s.reduce((x, y) => x * y, 1)))
    const q = bf16([1, 2, 8]), out = bf16([1, 2, 8]), k = bf16([4, 4, ${kvHeads}, 8]), v = bf16([4, 4, ${kvHeads}, 8])
    try {
      n.attention(out, q, k, v, { blockTables: n.view(i32(${tables}), [1, 2]), queryStart: i32(${starts}), seqLens: i32([1]), maxQueryLen: 1, maxSeqLen: 1 }, 1)
      console.log('returned')
    } catch (e) { console.log(e.constructor.name + ': ' + e.message) }`

  it('attention checks the block ids, query rows and kv heads of the CPU batch before it reads through them', () => {
    for (const [tables, starts, message] of [
      ['[1e9, 0]', '[0, 1]', 'attention: block 0 of sequence 0 is 1000000000, outside the cache\'s 4 blocks'],
      ['[-1, 0]', '[0, 1]', 'attention: block 0 of sequence 0 is -1, outside the cache\'s 4 blocks'],
      ['[4, 0]', '[0, 1]', 'attention: block 0 of sequence 0 is 4, outside the cache\'s 4 blocks'],
      ['[0, 0]', '[-100000000, -99999999]', 'attention: sequence 0 has query rows [-100000000, -99999999) outside q\'s 1 rows'],
    ]) {
      const r = isolated(attentionCall(tables!, starts!))
      expect([r.status, r.signal, r.stderr]).toEqual([0, null, ''])
      expect(r.stdout.trim()).toBe(`Error: ${message}`)
    }
    const zeroHeads = isolated(attentionCall('[0, 0]', '[0, 1]', 0))
    expect([zeroHeads.status, zeroHeads.signal]).toEqual([0, null])
    expect(zeroHeads.stdout).toContain('attention: expected a cache of at least one kv head and one position a block')
    // maxQueryLen and maxSeqLen are integers, not whatever Int32 conversion makes of NaN or 2^32 + 3.
    const i32 = (values: number[]) => tensorFrom('cpu', 'i32', [values.length], values)
    const batch = { blockTables: n.view(i32([0, 0]), [1, 2]), queryStart: i32([0, 1]), seqLens: i32([1]), maxQueryLen: NaN, maxSeqLen: 2 ** 32 + 3 }
    expect(() => n.attention(bf([1, 2, 8]), bf([1, 2, 8]), bf([4, 4, 2, 8]), bf([4, 4, 2, 8]), batch, 1)).toThrow(
      'attention: expected an integer for batch.maxQueryLen but received NaN',
    )
  })

  it('refuses shapes whose byte count wraps around, instead of a small allocation under a huge shape', () => {
    expect(() => n.empty('cpu', 'f32', [2 ** 52 + 1, 4096])).toThrow('Expected a shape of at most 2^62 bytes but received [4503599627370497,4096] of f32')
    expect(() => n.empty('cpu', 'f32', [2 ** 32, 2 ** 32])).toThrow('Expected a shape of at most 2^62 bytes')
    expect(() => n.view(f32([4096]), [2 ** 52 + 1, 4096])).toThrow('Expected a shape of at most 2^62 bytes')
  })

  it('recognizes tensors by a tag, so no JS runs while an op reads its tensors, and holds them until it returns', () => {
    // A Symbol.hasInstance that disposes the tensors checked before: never called.
    const hasInstance = isolated(`
      const N = 1 << 22
      const base = n.empty('cpu', 'bf16', [N]); const row = n.narrow(base, N - 1, 1)
      const src = n.view(row, []); base.dispose(); row.dispose()
      const dst = n.empty('cpu', 'bf16', [])
      const checked = []
      Object.defineProperty(n.Tensor, Symbol.hasInstance, { value(v) { for (const t of checked) t.dispose(); checked.push(v); return true } })
      n.copy(dst, src)
      console.log('returned')`)
    expect([hasInstance.status, hasInstance.signal, hasInstance.stdout.trim()]).toEqual([0, null, 'returned'])
    // A getter of a later argument that disposes a tensor read before it: the op still has it.
    const getter = isolated(`
      const i32 = (a) => n.fromBuffer('cpu', 'i32', [a.length], new Int32Array(a))
      const bf16 = (s) => n.fromBuffer('cpu', 'bf16', s, new Uint16Array(s.reduce((x, y) => x * y, 1)))
      const q = bf16([1, 2, 8]), out = bf16([1, 2, 8]), k = bf16([4, 4, 2, 8]), v = bf16([4, 4, 2, 8])
      const batch = { get blockTables() { q.dispose(); out.dispose(); k.dispose(); return n.view(i32([0, 0]), [1, 2]) }, queryStart: i32([0, 1]), seqLens: i32([1]), maxQueryLen: 1, maxSeqLen: 1 }
      try { n.attention(out, q, k, v, batch, 1); console.log('returned') } catch (e) { console.log(e.message) }`)
    expect([getter.status, getter.signal]).toEqual([0, null])
    // Things that look like tensors are named as what they are, and nothing of theirs runs.
    const t = f32([2])
    const TensorClass = (n as unknown as { Tensor: { prototype: object } }).Tensor
    expect(() => n.copy(f32([2]), Object.create(TensorClass.prototype))).toThrow('copy: expected a Tensor for src but received an object')
    expect(() => n.copy(f32([2]), new Proxy(t, {}))).toThrow('copy: expected a Tensor for src but received an object')
    expect(() => n.copy(f32([2]), Symbol('x') as never)).toThrow('copy: expected a Tensor for src but received a symbol')
    const loud = { toString: () => { throw new Error('toString ran') } }
    expect(() => n.copy(f32([2]), loud as never)).toThrow('copy: expected a Tensor for src but received an object')
  })

  it('takes data from a SharedArrayBuffer', () => {
    const shared = new Float32Array(new SharedArrayBuffer(8))
    shared.set([1.5, -2])
    const t = n.fromBuffer('cpu', 'f32', [2], shared)
    expect(t.nbytes).toBe(8)
  })

  it('a worker thread that exits with downloads and synchronizations pending ends only itself', () => {
    for (const call of ['n.download(t)', "n.synchronize('cpu')"]) {
      const r = isolated(`
        const { Worker } = require('node:worker_threads')
        const w = new Worker(${JSON.stringify(`const n = require(${JSON.stringify(nativeAddonPath())}); const t = n.empty('cpu', 'f32', [1 << 16]); for (let i = 0; i < 100; i++) `)} + ${JSON.stringify(call)} + '; process.exit(0)', { eval: true })
        w.on('exit', (code) => console.log('worker exited ' + code))`)
      expect([r.status, r.signal], r.stderr).toEqual([0, null])
      expect(r.stderr).not.toContain('terminate called')
      expect(r.stdout.trim()).toBe('worker exited 0')
    }
  })
})
