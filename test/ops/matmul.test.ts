// matmul: out[M,N] = a[M,K]·w[N,K]^T (+bias). Reference tests (float64, and GPU against the CPU
// backend) and bitwise batch invariance: a row's output does not depend on M or on the other rows.
import { afterEach, describe, expect, it } from 'vitest'
import { native, type DType, type DeviceName, type NativeTensor } from '../../lib/native.js'
import { readBytes, readF32, tensorFrom, toBf16 } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { relativeError } from '../helpers/compare.js'
import { randomArray } from '../helpers/random.js'
import { bf16Tensor, expectClose, expectSameBits, randomBf16, refMatmul, rowBytes, withVariant } from './reference.js'

const n = native()

interface Product {
  out: Float32Array
  ref: Float64Array
}

async function product(device: DeviceName, M: number, N: number, K: number, dtype: DType, withBias: boolean, seed: number): Promise<Product> {
  const a = randomBf16(M * K, seed)
  const w = randomBf16(N * K, seed + 1)
  const bias = withBias ? randomBf16(N, seed + 2) : undefined
  const out = n.empty(device, dtype, [M, N])
  n.matmul(out, bf16Tensor(device, [M, K], a), bf16Tensor(device, [N, K], w), bias ? bf16Tensor(device, [N], bias) : null)
  return { out: await readF32(out), ref: refMatmul(a, w, M, N, K, bias) }
}

// bf16 outputs round once (relative 2^-9); fp32 outputs carry only the accumulation's error.
function tolerance(dtype: DType, K: number): { rtol: number; atol: number } {
  return dtype === 'bf16' ? { rtol: 2 ** -8, atol: 1e-3 * Math.sqrt(K) } : { rtol: 1e-5, atol: 1e-5 * Math.sqrt(K) }
}

const referenceShapes: [number, number, number][] = [
  [1, 64, 64],
  [3, 40, 72],
  [17, 33, 264],
  [64, 130, 512],
  [129, 136, 1000],
  [300, 257, 520],
  [5, 24, 8],
  [2, 16, 40],
  // K of two accumulator chains on Hopper (matmul_sm90.cu: chains), one with a partial last K tile
  [9, 72, 2048],
  [70, 40, 3072],
  [130, 24, 2056],
]

/** The rows of `a` computed inside batches of every M in `Ms` (CPU, small shapes). */
async function rowsAcrossM(device: DeviceName, N: number, K: number, Ms: number[], dtype: DType): Promise<string[]> {
  const maxM = Math.max(...Ms)
  const a = bf16Tensor(device, [maxM, K], randomBf16(maxM * K, 70 + N))
  const w = bf16Tensor(device, [N, K], randomBf16(N * K, 71 + K))
  const full = n.empty(device, dtype, [maxM, N])
  n.matmul(full, a, w, null)
  const problems: string[] = []
  for (const M of Ms)
    for (const start of [0, maxM - M]) {
      const out = n.empty(device, dtype, [M, N])
      n.matmul(out, n.narrow(a, start, M), w, null)
      const got = await readBytes(out)
      const want = await rowBytes(full, start, M)
      const at = got.findIndex((b, i) => b !== want[i])
      if (at >= 0) problems.push(`M=${M} start=${start}: first differing byte ${at}`)
    }
  return problems
}

/** K = 0: nothing to multiply, so out is the bias, or zeros. */
async function emptyProduct(device: DeviceName, dtype: DType, withBias: boolean): Promise<Float32Array> {
  const out = tensorFrom(device, dtype, [3, 5], new Float32Array(15).fill(7))
  const bias = withBias ? bf16Tensor(device, [5], randomBf16(5, 9)) : null
  n.matmul(out, n.empty(device, 'bf16', [3, 0]), n.empty(device, 'bf16', [5, 0]), bias)
  return readF32(out)
}

function expectEmptyProduct(out: Float32Array, withBias: boolean): void {
  const bias = randomBf16(5, 9)
  for (let i = 0; i < 15; i++) expect(out[i]).toBe(withBias ? bias[i % 5] : 0)
}

describe('matmul on the CPU backend', () => {
  it('K = 0 gives the bias, or zeros (also under the variant)', async () => {
    for (const dtype of ['bf16', 'f32'] as const)
      for (const bias of [false, true]) {
        expectEmptyProduct(await emptyProduct('cpu', dtype, bias), bias)
        expectEmptyProduct(await withVariant(() => emptyProduct('cpu', dtype, bias)), bias)
      }
  })

  it('matches a float64 reference (bf16 and f32 out, with and without bias)', async () => {
    for (const [M, N, K] of referenceShapes.slice(0, 4))
      for (const dtype of ['bf16', 'f32'] as const)
        for (const bias of [false, true]) {
          const { out, ref } = await product('cpu', M, N, K, dtype, bias, M + N + K)
          const { rtol, atol } = tolerance(dtype, K)
          expectClose(out, ref, rtol, atol, `cpu ${M}x${N}x${K} ${dtype}`)
          expect(relativeError(out, ref)).toBeLessThan(dtype === 'bf16' ? 5e-3 : 1e-6)
        }
  })

  it('rows are bit-identical for M in [1, 2, 3, 7, 8, 16, 31, 64]', async () => {
    expect(await rowsAcrossM('cpu', 64, 256, [1, 2, 3, 7, 8, 16, 31, 64], 'f32')).toEqual([])
  })

  it('rows are bit-identical whether one thread or several computed them', async () => {
    // N = 1000, K = 512: one row is below the work that starts a second thread, 64 rows above it.
    expect(await rowsAcrossM('cpu', 1000, 512, [1, 3, 17, 64], 'bf16')).toEqual([])
  })

  it('variant twin: with a split-K chosen from M, some rows differ', async () => {
    const problems = await withVariant(() => rowsAcrossM('cpu', 64, 256, [1, 2, 3, 7, 8, 16, 31, 64], 'f32'))
    expect(problems.length).toBeGreaterThan(0)
  })
})

describeGpu('matmul on CUDA', () => {
  it('matches a float64 reference and the CPU backend, tails in M, N and K', async () => {
    for (const [M, N, K] of referenceShapes)
      for (const dtype of ['bf16', 'f32'] as const)
        for (const bias of [false, true]) {
          const seed = 3 * M + N + K + (bias ? 1 : 0)
          const gpu = await product('cuda', M, N, K, dtype, bias, seed)
          const cpu = await product('cpu', M, N, K, dtype, bias, seed)
          const { rtol, atol } = tolerance(dtype, K)
          expectClose(gpu.out, gpu.ref, rtol, atol, `cuda ${M}x${N}x${K} ${dtype}`)
          const errGpu = relativeError(gpu.out, gpu.ref)
          const errCpu = relativeError(cpu.out, cpu.ref)
          // bf16 out: at most twice the CPU backend's error. fp32 out carries only the
          // accumulation error, larger on tensor cores than in the CPU's fp32 lanes.
          if (dtype === 'bf16') expect(errGpu).toBeLessThanOrEqual(2 * errCpu + 1e-7)
          else expect(errGpu).toBeLessThan(2e-5)
          expectClose(gpu.out, cpu.out, 2 * rtol, 2 * atol, `cuda vs cpu ${M}x${N}x${K} ${dtype}`)
        }
  })

  it('K = 0 gives the bias, or zeros (also under the variant)', async () => {
    for (const dtype of ['bf16', 'f32'] as const)
      for (const bias of [false, true]) {
        expectEmptyProduct(await emptyProduct('cuda', dtype, bias), bias)
        expectEmptyProduct(await withVariant(() => emptyProduct('cuda', dtype, bias)), bias)
      }
  })

  it('rejects K that is not a multiple of 8', () => {
    const out = n.empty('cuda', 'bf16', [2, 4])
    expect(() => n.matmul(out, n.empty('cuda', 'bf16', [2, 12]), n.empty('cuda', 'bf16', [4, 12]), null)).toThrow(
      'matmul: the CUDA kernels need K to be a multiple of 8 but received K = 12',
    )
  })
})

// ---------------------------------------------------------------------------------------------
// Batch invariance on realistic shapes. Three probe rows are computed alone (M = 1), then placed
// at rows 0, M/2 and M-1 of batches of every M whose other rows are random; their outputs must
// be the same bits. The random rows and the weights come from one device-side pool of random
// bf16 values (uploaded once) so that large shapes stay fast.
const invarianceMs = [1, 2, 3, 7, 8, 16, 24, 31, 40, 64, 128, 257, 1024, 4096]
const poolRows = 4104
const poolCols = 12288

let pool: NativeTensor | undefined
function randomPool(): NativeTensor {
  pool ??= tensorFrom('cuda', 'bf16', [poolRows * poolCols], toBf16(randomArray(poolRows * poolCols, 2024)))
  return pool
}

/** A [rows, K] tensor of random bf16 rows taken from the pool (tiled if the pool is smaller). */
function poolMatrix(rows: number, K: number, offsetRows: number): NativeTensor {
  const whole = Math.floor((poolRows * poolCols) / K) // rows of K that fit in the pool (K need not divide it)
  const src = n.view(n.narrow(randomPool(), 0, whole * K), [whole, K])
  const t = n.empty('cuda', 'bf16', [rows, K])
  for (let r = 0; r < rows; ) {
    const from = (offsetRows + r) % src.shape[0]!
    const count = Math.min(rows - r, src.shape[0]! - from)
    n.copy(n.narrow(t, r, count), n.narrow(src, from, count))
    r += count
  }
  return t
}

/** Descriptions of every probe row whose bits changed with M (empty: invariant). */
async function probesAcrossM(N: number, K: number, dtype: DType, Ms: number[]): Promise<string[]> {
  const w = poolMatrix(N, K, 17)
  const probes = bf16Tensor('cuda', [3, K], randomBf16(3 * K, N + K))
  const alone: Buffer[] = []
  for (let p = 0; p < 3; p++) {
    const out = n.empty('cuda', dtype, [1, N])
    n.matmul(out, n.narrow(probes, p, 1), w, null)
    alone.push(await readBytes(out))
    out.dispose()
  }
  const problems: string[] = []
  for (const M of Ms) {
    const a = poolMatrix(M, K, M % 5)
    const positions = [0, Math.floor(M / 2), M - 1].slice(0, Math.min(M, 3))
    positions.forEach((row, p) => n.copy(n.narrow(a, row, 1), n.narrow(probes, p, 1)))
    const out = n.empty('cuda', dtype, [M, N])
    n.matmul(out, a, w, null)
    for (let p = 0; p < positions.length; p++) {
      const got = await rowBytes(out, positions[p]!, 1)
      const at = got.findIndex((b, i) => b !== alone[p]![i])
      if (at >= 0) problems.push(`N=${N} K=${K} M=${M} probe ${p} at row ${positions[p]}: first differing byte ${at}`)
    }
    a.dispose()
    out.dispose()
  }
  w.dispose()
  return problems
}

describeGpu('matmul batch invariance on CUDA', () => {
  const shapes: [number, number, DType][] = [
    // 8B-class shapes. 4096 x 4096 and 4096 x 12288 (o and down) take, on sm_90a, the compact 32-
    // and 48-row tiles at M 24, 31 and 40 and the 64-row one at 64.
    [4096, 4096, 'bf16'],
    [12288, 4096, 'bf16'],
    [4096, 12288, 'f32'],
    // Qwen3-8B's gate|up as one product: compact decode tiles up to M 16 and 64x64 ones at 17-64,
    // where its 64x128 tiles would run between one and two waves, the second less than half full.
    [24576, 4096, 'bf16'],
    [151936, 1024, 'f32'],
    // Narrow decode tiles (few columns per block): Qwen3-0.6B's down projection. On sm_90a its
    // decode tiles copy 4 K tiles at a time (K a multiple of 256), compact ones with a ring of 12
    // stages at M <= 16, output tiles of 32 and 48 rows of a compact a at M 17-32 and 33-48, and
    // 64-row ones of 16 columns at M 49-64 (as N = K = 4096 takes 32 columns there)...
    [1024, 3072, 'bf16'],
    // ...its q|k|v product, 32 columns wide from M 17 (compact a of 32 and 48 rows up to 48)...
    [4096, 1024, 'bf16'],
    // ...and its o_proj, whose K fits the 8-stage ring (the solo 64x8 tile at M <= 8)...
    [1024, 2048, 'bf16'],
    // ...and one at a time when K is not (17 tiles of 64): the same chain either way.
    [1024, 1088, 'bf16'],
  ]
  for (const [N, K, dtype] of shapes)
    it(`rows are bit-identical for M in [${invarianceMs.join(', ')}], N=${N} K=${K} (${dtype} out)`, async () => {
      expect(await probesAcrossM(N, K, dtype, invarianceMs)).toEqual([])
    }, 120_000)

  // fp32 outputs: the split's different rounding shows in every row, not only where bf16 flips.
  for (const [N, K, dtype] of [[4096, 4096, 'f32'], [151936, 1024, 'f32']] as const)
    it(`variant twin: with a split-K chosen from M, some probe rows differ (N=${N} K=${K})`, async () => {
      const problems = await withVariant(() => probesAcrossM(N, K, dtype, [1, 2, 3, 7, 8, 16, 31, 64, 128]))
      expect(problems.length).toBeGreaterThan(0)
    }, 120_000)

  // In a model a product's a is the first M rows of a larger activation buffer, and the Hopper
  // copies of a take the rows past M that a tile reads from that buffer (sm90::Problem::
  // a_readable_rows) instead of as zeros: NaN there must reach no output. Qwen3-0.6B's down
  // projection, every decode tile (compact 8-, 16-, 32- and 48-row ones, 64-row ones with 4 K
  // tiles a copy) and a prefill one, against the same rows as a tensor of their own.
  it('rows of the buffer past a view of M rows (NaN) change none of its outputs', async () => {
    const N = 1024
    const K = 3072
    const w = poolMatrix(N, K, 23)
    const nanBits = Buffer.alloc(128 * K * 2)
    for (let i = 0; i < 128 * K; i++) nanBits.writeUInt16LE(0x7fc0, 2 * i)
    const nanRows = n.fromBuffer('cuda', 'bf16', [128, K], nanBits)
    const differing: string[] = []
    for (const M of [1, 5, 8, 13, 16, 24, 32, 48, 64, 100]) {
      const a = poolMatrix(M, K, 7 * M)
      const buffer = n.empty('cuda', 'bf16', [M + 128, K])
      n.copy(n.narrow(buffer, 0, M), a)
      n.copy(n.narrow(buffer, M, 128), nanRows)
      const alone = n.empty('cuda', 'bf16', [M, N])
      const viewed = n.empty('cuda', 'bf16', [M, N])
      n.matmul(alone, a, w, null)
      n.matmul(viewed, n.narrow(buffer, 0, M), w, null)
      const x = await readBytes(alone)
      const y = await readBytes(viewed)
      const at = x.findIndex((b, i) => b !== y[i])
      if (at >= 0) differing.push(`M=${M}: first differing byte ${at}`)
      for (const t of [a, buffer, alone, viewed]) t.dispose()
    }
    nanRows.dispose()
    w.dispose()
    expect(differing).toEqual([])
  }, 60_000)

  it('a product written into a view of a larger tensor equals the same product alone', async () => {
    const K = 1024
    const N = 512
    const w = poolMatrix(N, K, 3)
    const a = poolMatrix(8, K, 40)
    const big = n.empty('cuda', 'bf16', [20, N])
    const alone = n.empty('cuda', 'bf16', [8, N])
    n.matmul(n.narrow(big, 5, 8), a, w, null)
    n.matmul(alone, a, w, null)
    expectSameBits(await rowBytes(big, 5, 8), await readBytes(alone), 'rows 5..12 of a larger output')
    const bias = tensorFrom('cuda', 'bf16', [N], randomBf16(N, 5))
    n.matmul(alone, a, w, bias)
    const cpuOut = n.empty('cpu', 'f32', [8, N])
    const cpuA = n.empty('cpu', 'bf16', [8, K])
    const cpuW = n.empty('cpu', 'bf16', [N, K])
    const cpuBias = n.empty('cpu', 'bf16', [N])
    n.upload(cpuA, await readBytes(a))
    n.upload(cpuW, await readBytes(w))
    n.upload(cpuBias, await readBytes(bias))
    n.matmul(cpuOut, cpuA, cpuW, cpuBias)
    expectClose(await readF32(alone), await readF32(cpuOut), 2 ** -7, 0.05, 'cuda with bias vs cpu')
  })
})

// The mma.sync family of sm_80-89 forced (setMatmulKernels) on this GPU, whose library matmul on
// Hopper is wgmma: the same invariance across M (every tile production can pick, the 128x256 one
// at M = 4096 where a block may hold 144 KiB of shared memory), and the same fp32 bits as the
// library's family, which walks K in the same k16 steps into one accumulator.
describeGpu('matmul on CUDA with the mma.sync kernels forced', () => {
  afterEach(() => n.setMatmulKernels('auto'))

  // Together every tile production can pick: 4096 x 4096 the 16x32 one with four K tiles per
  // stage, 32x64, 64x64, 64x128, 128x128 and 128x256; 12288 x 4096 the 16x32 one with two at
  // M <= 16; 151936 x 1024 the lm_head-wide ones.
  for (const [N, K, dtype] of [[4096, 4096, 'bf16'], [12288, 4096, 'f32'], [151936, 1024, 'f32']] as const)
    it(`rows are bit-identical for M in [${invarianceMs.join(', ')}], N=${N} K=${K} (${dtype} out)`, async () => {
      n.setMatmulKernels('mma.sync')
      expect(await probesAcrossM(N, K, dtype, invarianceMs)).toEqual([])
    }, 180_000)

  it('gives the fp32 bits of the library family at M 1 to 4096', async () => {
    const K = 4096
    const N = 4096
    const w = poolMatrix(N, K, 11)
    const differing: string[] = []
    for (const M of [1, 16, 64, 128, 512, 4096]) {
      const a = poolMatrix(M, K, 5 + M)
      const library = n.empty('cuda', 'f32', [M, N])
      const forced = n.empty('cuda', 'f32', [M, N])
      n.matmul(library, a, w, null)
      n.setMatmulKernels('mma.sync')
      n.matmul(forced, a, w, null)
      n.setMatmulKernels('auto')
      const x = await readBytes(library)
      const y = await readBytes(forced)
      const at = x.findIndex((b, i) => b !== y[i])
      if (at >= 0) differing.push(`M=${M}: first differing byte ${at}`)
      for (const t of [a, library, forced]) t.dispose()
    }
    w.dispose()
    expect(differing).toEqual([])
  }, 120_000)

  it('variant twin: with a split-K chosen from M, some probe rows differ (N=4096 K=4096)', async () => {
    n.setMatmulKernels('mma.sync')
    const problems = await withVariant(() => probesAcrossM(4096, 4096, 'f32', [1, 2, 3, 7, 8, 16, 31, 64, 128]))
    expect(problems.length).toBeGreaterThan(0)
  }, 120_000)
})

describe('setMatmulKernels', () => {
  it("takes 'mma.sync' or 'auto' and names anything else", () => {
    for (const k of ['mma.sync', 'auto'] as const) n.setMatmulKernels(k)
    expect(() => n.setMatmulKernels('wgmma' as 'auto')).toThrow(
      'setMatmulKernels: expected "auto" or "mma.sync" but received "wgmma"',
    )
  })
})
