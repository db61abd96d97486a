import { describe, expect, it } from 'vitest'
import { native } from '../../lib/native.js'
import { bf16BitsToF32, f32ToBf16Bits, readF32, readI32, tensorFrom } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { randomArray } from '../helpers/random.js'

describe('tensors', () => {
  it('round-trips f32, i32 and bf16 data through the CPU backend', async () => {
    const x = randomArray(37, 1)
    expect(Array.from(await readF32(tensorFrom('cpu', 'f32', [37], x)))).toEqual(Array.from(x))
    const ids = Int32Array.from([5, -3, 2147483647, 0])
    expect(Array.from(await readI32(tensorFrom('cpu', 'i32', [4], ids)))).toEqual(Array.from(ids))
    const back = await readF32(tensorFrom('cpu', 'bf16', [37], x))
    for (let i = 0; i < 37; i++) expect(back[i]).toBe(bf16BitsToF32(f32ToBf16Bits(x[i]!)))
  })

  it('views and row ranges share memory', async () => {
    const n = native()
    const t = tensorFrom('cpu', 'f32', [3, 2], [1, 2, 3, 4, 5, 6])
    expect(n.view(t, [2, 3]).shape).toEqual([2, 3])
    const rows = n.narrow(t, 1, 2)
    expect(Array.from(await readF32(rows))).toEqual([3, 4, 5, 6])
    n.upload(rows, new Float32Array([7, 8, 9, 10]))
    expect(Array.from(await readF32(t))).toEqual([1, 2, 7, 8, 9, 10])
  })

  it('a download sees the tensor as it was when it was asked for, not after later ops', async () => {
    const n = native()
    const t = tensorFrom('cpu', 'f32', [4], [1, 2, 3, 4])
    const before = n.download(t)
    n.upload(t, new Float32Array([5, 6, 7, 8]))
    const buf = await before
    expect(Array.from(new Float32Array(buf.buffer, buf.byteOffset, 4))).toEqual([1, 2, 3, 4])
  })

  it('rounds to nearest even when converting to bf16', () => {
    expect(f32ToBf16Bits(1.0)).toBe(0x3f80)
    expect(bf16BitsToF32(f32ToBf16Bits(1 + 2 ** -8))).toBe(1) // tie, rounds to even
    expect(bf16BitsToF32(f32ToBf16Bits(1 + 3 * 2 ** -8))).toBe(1 + 2 ** -6)
  })

  it('casts between f32, bf16 and f16', async () => {
    const n = native()
    const x = randomArray(64, 2, 4)
    const src = tensorFrom('cpu', 'f32', [64], x)
    const half = n.empty('cpu', 'f16', [64])
    const back = n.empty('cpu', 'f32', [64])
    n.cast(half, src)
    n.cast(back, half)
    const y = await readF32(back)
    for (let i = 0; i < 64; i++) expect(Math.abs(y[i]! - x[i]!)).toBeLessThanOrEqual(Math.abs(x[i]!) * 2 ** -11)
  })
})

describeGpu('tensors on CUDA', () => {
  it('a download sees the tensor as it was when it was asked for, not after ops enqueued later', async () => {
    const n = native()
    const t = tensorFrom('cuda', 'i32', [4], [1, 2, 3, 4])
    const other = tensorFrom('cuda', 'i32', [4], [9, 9, 9, 9])
    const before = n.download(t)
    n.uploadAsync(t, new Int32Array([5, 6, 7, 8])) // enqueued on the stream, not waited for
    const middle = n.download(t)
    n.copy(t, other)
    const [a, b, c] = await Promise.all([before, middle, n.download(t)])
    expect(Array.from(new Int32Array(a.buffer, a.byteOffset, 4))).toEqual([1, 2, 3, 4])
    expect(Array.from(new Int32Array(b.buffer, b.byteOffset, 4))).toEqual([5, 6, 7, 8])
    expect(Array.from(new Int32Array(c.buffer, c.byteOffset, 4))).toEqual([9, 9, 9, 9])
    for (const x of [t, other]) x.dispose()
  })
})
