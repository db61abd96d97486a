// uploadAsync (through the pinned staging ring) and CUDA graphs of the stream: capture, replay,
// invalidation, abort and disposal. On the CPU: uploadAsync's copies and checks, and the errors
// of the graph functions on a build or machine without CUDA.
import { afterEach, describe, expect, it } from 'vitest'
import { native, type NativeTensor } from '../../lib/native.js'
import { readBytes, toBf16 } from '../../lib/tensor.js'
import { gpuAvailable, describeGpu } from '../helpers/gpu.js'
import { mulberry32 } from '../helpers/random.js'
import { bf16Tensor, expectSameBits, randomBf16 } from './reference.js'

const n = native()
const eps = 1e-6

/** The message of the error a call throws. */
function messageOf(fn: () => void): string {
  try {
    fn()
  } catch (err) {
    return (err as Error).message
  }
  throw new Error('expected the call to throw')
}

describe('uploadAsync (cpu)', () => {
  it('copies the bytes into a CPU tensor', async () => {
    const t = n.empty('cpu', 'i32', [5])
    const data = Int32Array.from([1, -2, 3, 2147483647, -2147483648])
    n.uploadAsync(t, data)
    expectSameBits(await readBytes(t), data, 'uploadAsync into a cpu tensor')
    const bytes = new Uint8Array(20).map((_, i) => 255 - i)
    n.uploadAsync(t, bytes)
    expectSameBits(await readBytes(t), bytes, 'uploadAsync of a Uint8Array')
  })

  it('rejects a wrong size or a non-TypedArray with the messages of upload', () => {
    const t = n.empty('cpu', 'f32', [2, 3])
    for (const data of [new Float32Array(5), new Float32Array(7), new Uint8Array(0)]) {
      const async = messageOf(() => n.uploadAsync(t, data))
      expect(async).toMatch(/^uploadAsync: expected 24 bytes of data for .* but received \d+$/)
      expect(async.replace(/^uploadAsync:/, 'upload:')).toBe(messageOf(() => n.upload(t, data)))
    }
    for (const data of [[1, 2, 3, 4, 5, 6], 'abc', null]) {
      const async = messageOf(() => n.uploadAsync(t, data as never))
      expect(async).toMatch(/^uploadAsync: expected a TypedArray or Buffer for data but received /)
      expect(async.replace(/^uploadAsync:/, 'upload:')).toBe(messageOf(() => n.upload(t, data as never)))
    }
    expect(() => n.uploadAsync(null as never, new Float32Array(6))).toThrow(
      'uploadAsync: expected a Tensor for tensor but received null',
    )
  })
})

describe('CUDA graphs without a usable GPU', () => {
  it.runIf(!gpuAvailable)('graphBegin, graphEnd and graphAbort say why CUDA cannot be used', () => {
    const why = /CUDA device requested but .*use device: 'cpu'/
    expect(() => n.graphBegin()).toThrow(why)
    expect(() => n.graphEnd()).toThrow(why)
    expect(() => n.graphAbort()).toThrow(why)
  })
})

describeGpu('uploadAsync (cuda)', () => {
  it('1000 back-to-back uploads, some larger than the staging ring, all arrive intact', async () => {
    const rand = mulberry32(1234)
    // Small buffers of 1..2048 elements (about 8 MiB in all, so the 4 MiB ring wraps around) and
    // three larger than the ring at that point (it grows each time).
    const big = new Map([
      [250, (5 << 20) / 4 + 3],
      [600, (9 << 20) / 4 + 1],
      [900, (17 << 20) / 4],
    ])
    const sources: Int32Array[] = []
    const tensors: NativeTensor[] = []
    for (let i = 0; i < 1000; i++) {
      const len = big.get(i) ?? 1 + Math.floor(rand() * 2048)
      const src = Int32Array.from({ length: len }, () => Math.floor(rand() * 2 ** 32) | 0)
      const t = n.empty('cuda', 'i32', [len])
      n.uploadAsync(t, src)
      sources.push(src.slice())
      src.fill(-1) // the caller may reuse its buffer at once: the bytes were staged
      tensors.push(t)
    }
    for (let i = 0; i < tensors.length; i++) {
      expectSameBits(await readBytes(tensors[i]!), sources[i]!, `upload ${i} of ${sources[i]!.length} elements`)
      tensors[i]!.dispose()
    }
  })
})

describeGpu('CUDA graphs', () => {
  // A failed test must not leave a capture running for the next one.
  afterEach(() => n.graphAbort())
  const rows = 8
  const H = 1024
  const N = 512

  /** Persistent tensors and the two ops: y = rmsnorm(x)·w, out = y·W^T. */
  function scene() {
    const x = n.empty('cuda', 'bf16', [rows, H])
    const w = bf16Tensor('cuda', [H], randomBf16(H, 11, 1))
    const W = bf16Tensor('cuda', [N, H], randomBf16(N * H, 12, 0.05))
    const y = n.empty('cuda', 'bf16', [rows, H])
    const out = n.empty('cuda', 'bf16', [rows, N])
    const run = (yOut = y, outOut = out) => {
      n.rmsnorm(yOut, x, w, eps)
      n.matmul(outOut, yOut, W, null)
    }
    const dispose = () => [x, w, W, y, out].forEach((t) => t.dispose())
    return { x, y, out, run, dispose }
  }
  const input = (seed: number) => toBf16(randomBf16(rows * H, seed, 2))

  it('replays give the bits of the same ops run eagerly, on each new input', async () => {
    const s = scene()
    const yEager = n.empty('cuda', 'bf16', [rows, H])
    const outEager = n.empty('cuda', 'bf16', [rows, N])
    // Run once eagerly first (kernel set-up happens outside the capture, as a warm-up would).
    n.uploadAsync(s.x, input(1))
    s.run()
    const zeros = new Uint16Array(rows * N)
    n.upload(s.out, zeros)

    n.graphBegin()
    let graph
    try {
      s.run()
      graph = n.graphEnd()
    } catch (err) {
      n.graphAbort()
      throw err
    }
    expect(graph.disposed).toBe(false)
    expect(graph.bytes).toBeGreaterThanOrEqual(0)
    // Capturing records the work without running it.
    expectSameBits(await readBytes(s.out), zeros, 'out after the capture, before any replay')

    const seen = new Set<string>()
    for (const seed of [2, 3, 4]) {
      n.uploadAsync(s.x, input(seed))
      graph.replay()
      const replayed = await readBytes(s.out)
      const normed = await readBytes(s.y)
      s.run(yEager, outEager)
      expectSameBits(replayed, await readBytes(outEager), `matmul output, replay with input ${seed}`)
      expectSameBits(normed, await readBytes(yEager), `rmsnorm output, replay with input ${seed}`)
      seen.add(replayed.toString('hex'))
    }
    expect(seen.size).toBe(3) // each replay read the new input
    graph.dispose()
    s.dispose()
    yEager.dispose()
    outEager.dispose()
  })

  it('a synchronizing call invalidates the capture: graphEnd says so, and the stream stays usable', async () => {
    const s = scene()
    n.upload(s.x, input(5))
    s.run()
    const expected = await readBytes(s.out)

    n.graphBegin()
    s.run()
    expect(() => n.upload(s.x, input(6))).toThrow() // a synchronous upload waits: not capturable
    expect(() => n.graphEnd()).toThrow(/CUDA graph capture was invalidated.*cudaError\w+/)
    n.graphAbort()

    n.upload(s.out, new Uint16Array(rows * N))
    n.upload(s.x, input(5))
    s.run()
    expectSameBits(await readBytes(s.out), expected, 'eager ops after the invalidated capture')
    s.dispose()
  })

  it('graphAbort discards a capture in progress; uploadAsync is refused during one', async () => {
    const s = scene()
    n.upload(s.x, input(7))
    s.run()
    const expected = await readBytes(s.out)
    n.upload(s.out, new Uint16Array(rows * N))

    expect(() => n.graphBegin()).not.toThrow()
    expect(() => n.graphBegin()).toThrow(/already in progress/)
    expect(() => n.uploadAsync(s.x, input(8))).toThrow(/while a CUDA graph is being captured/)
    s.run()
    n.graphAbort()
    n.graphAbort() // nothing to abort: no error
    expect(() => n.graphEnd()).toThrow(/no CUDA graph capture is in progress/)
    // The captured work never ran.
    expectSameBits(await readBytes(s.out), new Uint16Array(rows * N), 'out after the aborted capture')
    s.run()
    expectSameBits(await readBytes(s.out), expected, 'eager ops after the aborted capture')
    s.dispose()
  })

  it('dispose is idempotent and replay after it throws', () => {
    const s = scene()
    s.run()
    n.graphBegin()
    s.run()
    const graph = n.graphEnd()
    graph.replay()
    graph.dispose()
    expect(graph.disposed).toBe(true)
    graph.dispose()
    expect(() => graph.replay()).toThrow('The CUDA graph was disposed and cannot be used any more')
    s.dispose()
  })
})
