// Elementwise ops: embedding gather, RoPE, SiLU·mul, add, casts. Each against a float64
// reference, and against an exact simulation of the roundings the kernels promise (bf16 after
// each product and sum where the CPU backend rounds); on CUDA also against the CPU backend.
import { describe, expect, it } from 'vitest'
import { native, type DeviceName } from '../../lib/native.js'
import { bf16BitsToF32, f32ToBf16Bits, readBytes, readF32, roundBf16, tensorFrom, toBf16 } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { randomArray, randomInts } from '../helpers/random.js'
import { expectClose, expectSameBits, randomBf16 } from './reference.js'

const n = native()
const bf = (v: number): number => bf16BitsToF32(f32ToBf16Bits(v))

/** cos of the D/2 frequencies, then their sin, for positions 0..maxPos-1 (f32, as models build it). */
function cosSinTable(maxPos: number, D: number, theta = 1e6): Float32Array {
  const half = D / 2
  const t = new Float32Array(maxPos * D)
  for (let p = 0; p < maxPos; p++)
    for (let i = 0; i < half; i++) {
      const angle = p * Math.fround(1 / theta ** ((2 * i) / D))
      t[p * D + i] = Math.cos(angle)
      t[p * D + half + i] = Math.sin(angle)
    }
  return t
}

function elementwiseSuite(device: DeviceName): void {
  it('embedding gathers rows of any dtype', async () => {
    const V = 300
    const H = 72
    const ids = randomInts(37, 1, V)
    const bfTable = randomBf16(V * H, 2)
    const out = n.empty(device, 'bf16', [37, H])
    n.embedding(out, tensorFrom(device, 'bf16', [V, H], bfTable), tensorFrom(device, 'i32', [37], ids))
    const got = await readF32(out)
    for (let t = 0; t < 37; t++) expect(Array.from(got.subarray(t * H, (t + 1) * H))).toEqual(Array.from(bfTable.subarray(ids[t]! * H, (ids[t]! + 1) * H)))
    // f32 rows of an odd width (no 16-byte copies), and bf16 rows of an odd width.
    for (const [dtype, width] of [['f32', 5], ['bf16', 3]] as const) {
      const table = dtype === 'f32' ? randomArray(V * width, 3) : randomBf16(V * width, 3)
      const o = n.empty(device, dtype, [37, width])
      n.embedding(o, tensorFrom(device, dtype, [V, width], table), tensorFrom(device, 'i32', [37], ids))
      const g = await readF32(o)
      for (let t = 0; t < 37; t++)
        for (let j = 0; j < width; j++) expect(g[t * width + j]).toBe(table[ids[t]! * width + j])
    }
  })

  it('rope rotates halves with the bf16 roundings of the CPU backend', async () => {
    const T = 6
    const heads = 4
    const D = 128
    const maxPos = 4096
    const table = cosSinTable(maxPos, D)
    const positions = Int32Array.from([0, 1, 17, 1000, 4095, 17])
    const x = randomBf16(T * heads * D, 4, 3)
    const xt = tensorFrom(device, 'bf16', [T, heads, D], x)
    n.rope(xt, tensorFrom(device, 'i32', [T], positions), tensorFrom(device, 'f32', [maxPos, D], table))
    const got = await readF32(xt)
    const exact = new Float32Array(x.length)
    const ref = new Float64Array(x.length)
    const half = D / 2
    for (let t = 0; t < T; t++)
      for (let h = 0; h < heads; h++)
        for (let i = 0; i < half; i++) {
          const base = (t * heads + h) * D
          const c = table[positions[t]! * D + i]!
          const s = table[positions[t]! * D + half + i]!
          const x1 = x[base + i]!
          const x2 = x[base + half + i]!
          ref[base + i] = x1 * c - x2 * s
          ref[base + half + i] = x2 * c + x1 * s
          const cb = bf(c)
          const sb = bf(s)
          exact[base + i] = bf(Math.fround(bf(Math.fround(x1 * cb)) + bf(Math.fround(-x2 * sb))))
          exact[base + half + i] = bf(Math.fround(bf(Math.fround(x2 * cb)) + bf(Math.fround(x1 * sb))))
        }
    expectSameBits(got, exact, 'rope vs the rounding simulation')
    expectClose(got, ref, 2 ** -6, 3 * 2 ** -7, 'rope vs float64')
  })

  it('silu_mul and add match float64 references (add exactly, as bf16(a + b))', async () => {
    const count = 3000
    const g = randomBf16(count, 5, 6)
    const u = randomBf16(count, 6, 2)
    const out = n.empty(device, 'bf16', [3, 1000])
    n.siluMul(out, tensorFrom(device, 'bf16', [3, 1000], g), tensorFrom(device, 'bf16', [3, 1000], u))
    const ref = Float64Array.from(g, (v, i) => (v / (1 + Math.exp(-v))) * u[i]!)
    expectClose(await readF32(out), ref, 2 ** -7, 1e-6, 'silu_mul')
    n.add(out, tensorFrom(device, 'bf16', [3, 1000], g), tensorFrom(device, 'bf16', [3, 1000], u))
    expectSameBits(await readF32(out), roundBf16(g.map((v, i) => Math.fround(v + u[i]!))), 'add')
  })

  it('cast converts f32 -> bf16 -> f32 exactly and f32 -> f16 -> f32 within 2^-11', async () => {
    const x = randomArray(4099, 7, 100)
    const src = tensorFrom(device, 'f32', [4099], x)
    const b = n.empty(device, 'bf16', [4099])
    const back = n.empty(device, 'f32', [4099])
    n.cast(b, src)
    expectSameBits(await readBytes(b), toBf16(x), 'f32 -> bf16 bits')
    n.cast(back, b)
    expectSameBits(await readF32(back), roundBf16(x), 'bf16 -> f32')
    const h = n.empty(device, 'f16', [4099])
    n.cast(h, src)
    n.cast(back, h)
    expectClose(await readF32(back), x, 2 ** -11, 1e-7, 'f32 -> f16 -> f32')
    const h2 = n.empty(device, 'f16', [4099])
    n.cast(h2, b)
    const b2 = n.empty(device, 'bf16', [4099])
    n.cast(b2, h2)
    expectClose(await readF32(b2), roundBf16(x), 2 ** -8, 1e-7, 'bf16 -> f16 -> bf16')
  })
}

describe('elementwise ops on the CPU backend', () => elementwiseSuite('cpu'))

describeGpu('elementwise ops on CUDA', () => {
  elementwiseSuite('cuda')

  it('agree with the CPU backend bit for bit (silu_mul within one bf16 step)', async () => {
    const x = randomBf16(4 * 8 * 64, 8, 4)
    const g = randomBf16(4096, 9, 6)
    const u = randomBf16(4096, 10, 2)
    const table = cosSinTable(64, 64)
    const pos = Int32Array.from([3, 63, 0, 9])
    const f = randomArray(4096, 11, 6e4)
    const results: Record<string, Buffer[]> = {}
    for (const device of ['cpu', 'cuda'] as const) {
      const xt = tensorFrom(device, 'bf16', [4, 8, 64], x)
      n.rope(xt, tensorFrom(device, 'i32', [4], pos), tensorFrom(device, 'f32', [64, 64], table))
      const s = n.empty(device, 'bf16', [4096])
      n.siluMul(s, tensorFrom(device, 'bf16', [4096], g), tensorFrom(device, 'bf16', [4096], u))
      const h = n.empty(device, 'f16', [4096])
      n.cast(h, tensorFrom(device, 'f32', [4096], f))
      results[device] = [await readBytes(xt), await readBytes(s), await readBytes(h)]
    }
    expectSameBits(results.cuda![0]!, results.cpu![0]!, 'rope')
    expectSameBits(results.cuda![2]!, results.cpu![2]!, 'cast to f16')
    const sc = new Uint16Array(results.cuda![1]!.buffer, results.cuda![1]!.byteOffset, 4096)
    const sp = new Uint16Array(results.cpu![1]!.buffer, results.cpu![1]!.byteOffset, 4096)
    for (let i = 0; i < 4096; i++) expect(Math.abs(sc[i]! - sp[i]!)).toBeLessThanOrEqual(1)
  })

  it('embedding ids outside the table give zero rows instead of reading out of bounds', async () => {
    const table = tensorFrom('cuda', 'bf16', [10, 16], randomBf16(160, 12))
    const out = n.empty('cuda', 'bf16', [3, 16])
    n.embedding(out, table, tensorFrom('cuda', 'i32', [3], [2, 10, -1]))
    const got = await readF32(out)
    expect(Array.from(got.subarray(16))).toEqual(new Array(32).fill(0))
    expect(Array.from(got.subarray(0, 16))).toEqual(Array.from((await readF32(table)).subarray(32, 48)))
  })
})
