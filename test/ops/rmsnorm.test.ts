// rmsnorm and add_rmsnorm: reference tests (float64; GPU also against the CPU backend) and
// bitwise invariance of each row across row counts.
import { describe, expect, it } from 'vitest'
import { native, type DeviceName } from '../../lib/native.js'
import { readBytes, readF32, roundBf16 } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { relativeError } from '../helpers/compare.js'
import { mulberry32 } from '../helpers/random.js'
import { bf16Tensor, expectClose, expectSameBits, randomBf16, refRmsnorm, withVariant } from './reference.js'

const n = native()
const eps = 1e-6

/** Weights in [0.5, 1.5): random, non-zero, like trained norm weights. */
function normWeights(H: number, seed: number): Float32Array {
  const rand = mulberry32(seed)
  return roundBf16(Float32Array.from({ length: H }, () => 0.5 + rand()))
}

interface NormResult {
  out: Float32Array
  residual?: Float32Array
  ref: Float64Array
  refResidual?: Float32Array
}

async function norm(device: DeviceName, rows: number, H: number, fused: boolean, seed: number): Promise<NormResult> {
  const x = randomBf16(rows * H, seed, 2)
  const r = randomBf16(rows * H, seed + 1, 2)
  const w = normWeights(H, seed + 2)
  const out = n.empty(device, 'bf16', [rows, H])
  const xt = bf16Tensor(device, [rows, H], x)
  const wt = bf16Tensor(device, [H], w)
  if (!fused) {
    n.rmsnorm(out, xt, wt, eps)
    return { out: await readF32(out), ref: refRmsnorm(x, w, rows, H, eps) }
  }
  const rt = bf16Tensor(device, [rows, H], r)
  n.addRmsnorm(out, rt, xt, wt, eps)
  const refResidual = roundBf16(x.map((v, i) => v + r[i]!))
  return { out: await readF32(out), residual: await readF32(rt), ref: refRmsnorm(refResidual, w, rows, H, eps), refResidual }
}

// The output is rounded twice to bf16 (x·inv, then ·w): relative 2·2^-9, plus fp32 noise.
const rtol = 2 ** -7
const atol = 1e-6

async function checkReference(device: DeviceName, Hs: number[], rowCounts: number[]): Promise<void> {
  for (const H of Hs)
    for (const rows of rowCounts)
      for (const fused of [false, true]) {
        const seed = H * 7 + rows + (fused ? 1 : 0)
        const got = await norm(device, rows, H, fused, seed)
        expectClose(got.out, got.ref, rtol, atol, `${device} ${fused ? 'add_rmsnorm' : 'rmsnorm'} rows=${rows} H=${H}`)
        if (fused) expect(Array.from(got.residual!)).toEqual(Array.from(got.refResidual!))
        if (device === 'cuda') {
          const cpu = await norm('cpu', rows, H, fused, seed)
          expect(relativeError(got.out, got.ref)).toBeLessThanOrEqual(2 * relativeError(cpu.out, cpu.ref) + 1e-6)
          expectClose(got.out, cpu.out, 2 * rtol, atol, `cuda vs cpu rows=${rows} H=${H}`)
        }
      }
}

/**
 * Rows of one [maxRows, H] input normalized in one launch, then again in launches of `count`
 * rows at every offset, each writing its rows into one output. Returns, per count, the first
 * row whose bits differed. The outputs are bf16, so a sum that changes in its last bit changes
 * few output elements: all maxRows rows are compared to make such a change visible.
 */
async function rowsAcrossCounts(device: DeviceName, H: number, counts: number[], maxRows: number): Promise<string[]> {
  const x = bf16Tensor(device, [maxRows, H], randomBf16(maxRows * H, H + 5, 3))
  const w = bf16Tensor(device, [H], normWeights(H, H + 6))
  const full = n.empty(device, 'bf16', [maxRows, H])
  n.rmsnorm(full, x, w, eps)
  const want = await readBytes(full)
  const problems: string[] = []
  for (const count of counts) {
    const out = n.empty(device, 'bf16', [maxRows, H])
    const covered = maxRows - (maxRows % count)
    for (let start = 0; start < covered; start += count)
      n.rmsnorm(n.narrow(out, start, count), n.narrow(x, start, count), w, eps)
    const got = (await readBytes(out)).subarray(0, covered * H * 2)
    const at = got.findIndex((b, i) => b !== want[i])
    if (at >= 0) problems.push(`H=${H} launches of ${count} rows: first difference in row ${Math.floor(at / (2 * H))}`)
    out.dispose()
  }
  return problems
}

describe('rmsnorm on the CPU backend', () => {
  it('matches a float64 reference; add_rmsnorm also updates the residual', async () => {
    await checkReference('cpu', [7, 64, 1000, 4096], [1, 5])
  })

  it('rows are bit-identical across row counts [1, 2, 3, 4, 7, 64]', async () => {
    expect(await rowsAcrossCounts('cpu', 4096, [1, 2, 3, 4, 7, 64], 1024)).toEqual([])
  })

  it('variant twin: with rows split for small batches, some rows differ', async () => {
    const problems = await withVariant(() => rowsAcrossCounts('cpu', 4096, [1, 2, 3, 4, 7, 64], 1024))
    expect(problems.length).toBeGreaterThan(0)
  })
})

describeGpu('rmsnorm on CUDA', () => {
  it('matches a float64 reference and the CPU backend (H up to 16384)', async () => {
    await checkReference('cuda', [1, 7, 64, 128, 1000, 4096, 5120, 8192, 16384], [1, 33])
  })

  it('rows are bit-identical across row counts [1, 2, 3, 4, 7, 64, 255, 256, 257, 1024]', async () => {
    for (const H of [128, 4096, 8192])
      expect(await rowsAcrossCounts('cuda', H, [1, 2, 3, 4, 7, 64, 255, 256, 257, 1024], 1024)).toEqual([])
  }, 120_000)

  // A split changes a row's sum of squares in its last bits at most, and with bf16 outputs that
  // shows only where some x·inv falls next to a rounding midpoint: about one row in a few hundred
  // whose inverse RMS moved. Many short rows make such rows certain to occur.
  it('variant twin: with rows split for small batches, some rows differ', async () => {
    const problems = await withVariant(() => rowsAcrossCounts('cuda', 128, [1, 2, 3], 65536))
    expect(problems.length).toBeGreaterThan(0)
  }, 120_000)

  it('per-head norms over [T, heads, D] equal each head normalized alone, aligned or not', async () => {
    const T = 5
    const heads = 8
    const D = 128
    const values = randomBf16(1 + T * heads * D, 99, 2)
    const w = bf16Tensor('cuda', [D], normWeights(D, 98))
    // An aligned copy, and a view starting one element (2 bytes) into a buffer: 16-byte loads
    // on one, scalar loads on the other, the same order of additions on both.
    const aligned = bf16Tensor('cuda', [T, heads, D], values.subarray(1))
    const flat = bf16Tensor('cuda', [1 + T * heads * D], values)
    const unaligned = n.view(n.narrow(flat, 1, T * heads * D), [T, heads, D])
    const outA = n.empty('cuda', 'bf16', [T, heads, D])
    const outU = n.empty('cuda', 'bf16', [T, heads, D])
    n.rmsnorm(outA, aligned, w, eps)
    n.rmsnorm(outU, unaligned, w, eps)
    const want = await readBytes(outA)
    expectSameBits(await readBytes(outU), want, 'unaligned view vs aligned copy')
    const rows = n.view(aligned, [T * heads, D])
    for (const row of [0, 17, T * heads - 1]) {
      const one = n.empty('cuda', 'bf16', [1, D])
      n.rmsnorm(one, n.narrow(rows, row, 1), w, eps)
      expectSameBits(await readBytes(one), want.subarray(row * D * 2, (row + 1) * D * 2), `head row ${row} alone`)
    }
    const ref = refRmsnorm(values.subarray(1), normWeights(D, 98), T * heads, D, eps)
    expectClose(await readF32(outA), ref, rtol, atol, 'per-head norm')
  })

  it('add_rmsnorm rows are bit-identical across row counts, residual included', async () => {
    const H = 2048
    const maxRows = 64
    const x = randomBf16(maxRows * H, 31, 2)
    const r = randomBf16(maxRows * H, 32, 2)
    const w = bf16Tensor('cuda', [H], normWeights(H, 33))
    const run = async (start: number, count: number): Promise<[Buffer, Buffer]> => {
      const rt = bf16Tensor('cuda', [count, H], r.subarray(start * H, (start + count) * H))
      const out = n.empty('cuda', 'bf16', [count, H])
      n.addRmsnorm(out, rt, bf16Tensor('cuda', [count, H], x.subarray(start * H, (start + count) * H)), w, eps)
      return [await readBytes(out), await readBytes(rt)]
    }
    const [fullOut, fullRes] = await run(0, maxRows)
    for (const [start, count] of [[0, 1], [5, 3], [9, 7], [63, 1], [1, 63]] as const) {
      const [out, res] = await run(start, count)
      expectSameBits(out, fullOut.subarray(start * H * 2, (start + count) * H * 2), `out rows ${start}+${count}`)
      expectSameBits(res, fullRes.subarray(start * H * 2, (start + count) * H * 2), `residual rows ${start}+${count}`)
    }
  })
})
