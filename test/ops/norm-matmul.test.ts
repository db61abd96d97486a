// normMatmul / normMatmulSiluMul: the RMSNorm before a product, in the product. With x, the rows
// are residualIn + x (rounded to bf16) and that sum goes to residualOut; without, the rows are
// residualIn and residualOut is not written. out must get the bits of addRmsnorm then matmul (or
// matmulSiluMul), which the model ran before: on Hopper at one row the product's prologue computes
// the norm (each block for itself, the rmsnorm kernels' sums in their order), elsewhere it is the
// two ops. Also against float64, and bitwise batch invariance across M with its variant twin:
// M = 1 fuses, larger M does not, and a row's bits must not notice.
import { describe, expect, it } from 'vitest'
import { native, type DeviceName, type NativeTensor } from '../../lib/native.js'
import { readBytes, readF32 } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { bf16Tensor, expectClose, expectSameBits, randomBf16, refMatmul, refRmsnorm, rowBytes, withVariant } from './reference.js'

const n = native()
const EPS = 1e-6

interface Case {
  M: number
  N: number // rows of w: the product's N, or 2I for gate|up
  K: number
  gateUp: boolean
  withX: boolean
  withBias: boolean
}

interface Operands {
  residualIn: NativeTensor
  x: NativeTensor | null
  normW: NativeTensor
  w: NativeTensor
  bias: NativeTensor | null
  values: { residualIn: Float32Array; x?: Float32Array; normW: Float32Array; w: Float32Array; bias?: Float32Array }
}

function operands(device: DeviceName, c: Case, seed: number): Operands {
  const residualIn = randomBf16(c.M * c.K, seed, 2)
  const x = c.withX ? randomBf16(c.M * c.K, seed + 1, 0.5) : undefined
  const normW = randomBf16(c.K, seed + 2, 1)
  const w = randomBf16(c.N * c.K, seed + 3, 0.05)
  const bias = c.withBias ? randomBf16(c.N, seed + 4, 0.5) : undefined
  return {
    residualIn: bf16Tensor(device, [c.M, c.K], residualIn),
    x: x ? bf16Tensor(device, [c.M, c.K], x) : null,
    normW: bf16Tensor(device, [c.K], normW),
    w: bf16Tensor(device, [c.N, c.K], w),
    bias: bias ? bf16Tensor(device, [c.N], bias) : null,
    values: { residualIn, x, normW, w, bias },
  }
}

const outWidth = (c: Case) => (c.gateUp ? c.N / 2 : c.N)

/** The fused op into `out`; residualOut starts as a copy of `sentinel`. */
function runFused(device: DeviceName, c: Case, o: Operands, out: NativeTensor, residualOut: NativeTensor): void {
  const normed = n.empty(device, 'bf16', [c.M, c.K])
  if (c.gateUp) n.normMatmulSiluMul(out, n.empty(device, 'bf16', [c.M, c.N]), normed, residualOut, o.residualIn, o.x, o.normW, EPS, o.w, o.bias)
  else n.normMatmul(out, normed, residualOut, o.residualIn, o.x, o.normW, EPS, o.w, o.bias)
}

/** out and the residual sum (or residualIn) by the separate ops, as bytes. */
async function separate(device: DeviceName, c: Case, o: Operands): Promise<{ out: Buffer; residual: Buffer }> {
  const residual = n.empty(device, 'bf16', [c.M, c.K])
  n.copy(residual, o.residualIn)
  const normed = n.empty(device, 'bf16', [c.M, c.K])
  if (o.x) n.addRmsnorm(normed, residual, o.x, o.normW, EPS)
  else n.rmsnorm(normed, residual, o.normW, EPS)
  const out = n.empty(device, 'bf16', [c.M, outWidth(c)])
  if (c.gateUp) n.matmulSiluMul(out, n.empty(device, 'bf16', [c.M, c.N]), normed, o.w, o.bias)
  else n.matmul(out, normed, o.w, o.bias)
  return { out: await readBytes(out), residual: await readBytes(residual) }
}

/** float64 of rows [0, rows): rmsnorm(residualIn + x) · wᵀ (+ bias), SiLU·mul for gate|up. */
function reference(c: Case, o: Operands, rows: number): Float64Array {
  const { residualIn, x, normW, w, bias } = o.values
  const sum = new Float32Array(rows * c.K)
  for (let i = 0; i < rows * c.K; i++) sum[i] = residualIn[i]! + (x ? x[i]! : 0)
  const normed = Float32Array.from(refRmsnorm(sum, normW, rows, c.K, EPS))
  const product = refMatmul(normed, w, rows, c.N, c.K, bias)
  if (!c.gateUp) return product
  const I = c.N / 2
  const out = new Float64Array(rows * I)
  for (let r = 0; r < rows; r++)
    for (let i = 0; i < I; i++) {
      const g = product[r * c.N + i]!
      out[r * I + i] = (g / (1 + Math.exp(-g))) * product[r * c.N + I + i]!
    }
  return out
}

async function checkCase(device: DeviceName, c: Case, seed: number, referenceRows: number): Promise<void> {
  const what = `M=${c.M} N=${c.N} K=${c.K}${c.gateUp ? ' gate|up' : ''}${c.withX ? ' +x' : ''}${c.withBias ? ' bias' : ''}`
  const o = operands(device, c, seed)
  const sentinel = bf16Tensor(device, [c.M, c.K], randomBf16(c.M * c.K, seed + 9))
  const residualOut = n.empty(device, 'bf16', [c.M, c.K])
  n.copy(residualOut, sentinel)
  const inBefore = await readBytes(o.residualIn)
  const out = n.empty(device, 'bf16', [c.M, outWidth(c)])
  runFused(device, c, o, out, residualOut)
  const want = await separate(device, c, o)
  expectSameBits(await readBytes(out), want.out, `${what}: out`)
  expectSameBits(await readBytes(o.residualIn), inBefore, `${what}: residualIn unchanged`)
  if (c.withX) expectSameBits(await readBytes(residualOut), want.residual, `${what}: residualOut = residualIn + x`)
  else expectSameBits(await readBytes(residualOut), await readBytes(sentinel), `${what}: residualOut not written without x`)
  const rows = Math.min(c.M, referenceRows)
  const ref = reference(c, o, rows)
  const scale = ref.reduce((m, v) => Math.max(m, Math.abs(v)), 0)
  // The normed rows are rounded twice to bf16 (relative 2^-8 each) before the product: about
  // sqrt(K) such errors add up in each output.
  expectClose((await readF32(out)).subarray(0, rows * outWidth(c)), ref, 2 ** -5, 8e-3 * scale * Math.sqrt(c.K / 1024), `${what} vs float64`)
}

/** residualOut = residualIn: the sum is written in place (the unfused path) and out is unchanged. */
async function inPlace(device: DeviceName, c: Case): Promise<void> {
  const o = operands(device, c, 5)
  const want = await separate(device, c, o)
  const out = n.empty(device, 'bf16', [c.M, c.N])
  n.normMatmul(out, n.empty(device, 'bf16', [c.M, c.K]), o.residualIn, o.residualIn, o.x, o.normW, EPS, o.w, null)
  expectSameBits(await readBytes(out), want.out, 'out')
  expectSameBits(await readBytes(o.residualIn), want.residual, 'residual')
}

function suite(device: DeviceName, shapes: Array<{ N: number; K: number; gateUp: boolean }>, Ms: number[]): void {
  for (const { N, K, gateUp } of shapes)
    it(`equals addRmsnorm then ${gateUp ? 'matmulSiluMul' : 'matmul'} bit for bit, N=${N} K=${K}, M in [${Ms}]`, async () => {
      let seed = 1
      for (const M of Ms)
        for (const [withX, withBias] of [
          [true, false],
          [false, true],
        ] as const)
          await checkCase(device, { M, N, K, gateUp, withX, withBias }, 100 * M + (seed += 10), 2)
    }, 240_000)
}

describe('normMatmul on the CPU', () => {
  suite('cpu', [
    { N: 48, K: 96, gateUp: false },
    { N: 40, K: 64, gateUp: true },
  ], [1, 5, 19])

  it('writes the sum in place when residualOut is residualIn', () => inPlace('cpu', { M: 3, N: 16, K: 32, gateUp: false, withX: true, withBias: false }))

  it('refuses shapes that do not fit, naming the argument', () => {
    const t = (shape: number[]) => n.empty('cpu', 'bf16', shape)
    const w = t([8, 16])
    expect(() => n.normMatmul(t([3, 8]), t([3, 16]), t([3, 16]), t([3, 16]), t([3, 8]), t([16]), EPS, w, null)).toThrow(
      'norm_matmul: expected x and residual_in to have the same shape but received bf16[3,8] on cpu and bf16[3,16] on cpu',
    )
    expect(() => n.normMatmul(t([3, 8]), t([3, 16]), t([3, 16]), t([3, 16]), null, t([12]), EPS, w, null)).toThrow(
      'norm_matmul: expected dimension 1 of residual_in to be 12 (K, the size of norm_w) but received bf16[3,16] on cpu',
    )
    expect(() => n.normMatmul(t([3, 7]), t([3, 16]), t([3, 16]), t([3, 16]), null, t([16]), EPS, w, null)).toThrow(
      'norm_matmul: expected dimension 1 of out to be 8 (N, rows of w) but received bf16[3,7] on cpu',
    )
    expect(() => n.normMatmulSiluMul(t([3, 4]), t([3, 8]), t([3, 16]), t([2, 16]), t([3, 16]), null, t([16]), EPS, w, null)).toThrow(
      'norm_matmul_silu_mul: expected residual_out and residual_in to have the same shape but received bf16[2,16] on cpu and bf16[3,16] on cpu',
    )
    expect(() => n.normMatmulSiluMul(t([3, 8]), t([3, 8]), t([3, 16]), t([3, 16]), t([3, 16]), null, t([16]), EPS, w, null)).toThrow(
      'norm_matmul_silu_mul: expected dimension 1 of out to be 4 (I, half the rows of w) but received bf16[3,8] on cpu',
    )
  })
})

// Every tile that computes the norm in its prologue (M = 1), and the paths around it (M > 1):
//   Qwen3-0.6B's q|k|v (N 4096, K 1024): the 32-column tile; its gate|up (2I 6144): the
//     48-column one;
//   Qwen3-8B's q|k|v (N 6144, K 4096), 64 K tiles of the row in shared memory, and a gate|up of
//     K 4096 (the 48-column tile); 2I 8192, more 48-column tiles than SMs, takes the 32-column
//     gate|up tile, and so does Qwen3-8B's own gate|up, 2I 24576 at K 4096 (its 64x128 tiles
//     would be between one and two waves);
//   N 512: the 8-column tile; 2I 128: gate|up's 16-column tile; N 1024 at K 3072: the 12-stage ring;
//   K 1088, not a multiple of 256: never fused.
describeGpu('normMatmul on CUDA', () => {
  suite('cuda', [
    { N: 4096, K: 1024, gateUp: false },
    { N: 6144, K: 1024, gateUp: true },
  ], [1, 2, 7, 8, 9, 16, 17, 64])
  suite('cuda', [
    { N: 6144, K: 4096, gateUp: false },
    { N: 6144, K: 4096, gateUp: true },
    { N: 8192, K: 1024, gateUp: true },
    { N: 24576, K: 4096, gateUp: true },
    { N: 512, K: 1024, gateUp: false },
    { N: 128, K: 1024, gateUp: true },
    { N: 1024, K: 3072, gateUp: false },
    { N: 256, K: 1088, gateUp: false },
  ], [1, 8, 16])

  it('writes the sum in place when residualOut is residualIn (not fused)', () =>
    inPlace('cuda', { M: 1, N: 4096, K: 1024, gateUp: false, withX: true, withBias: false }))

  /** Descriptions of every probe row whose output bits changed with M (empty: invariant). */
  async function probesAcrossM(N: number, K: number, gateUp: boolean, Ms: number[]): Promise<string[]> {
    const width = gateUp ? N / 2 : N
    const w = bf16Tensor('cuda', [N, K], randomBf16(N * K, 31, 0.05))
    const normW = bf16Tensor('cuda', [K], randomBf16(K, 33))
    const probeRes = bf16Tensor('cuda', [2, K], randomBf16(2 * K, 32, 2))
    const probeX = bf16Tensor('cuda', [2, K], randomBf16(2 * K, 34, 0.5))
    const run = (M: number, res: NativeTensor, x: NativeTensor) => {
      const out = n.empty('cuda', 'bf16', [M, width])
      const normed = n.empty('cuda', 'bf16', [M, K])
      const resOut = n.empty('cuda', 'bf16', [M, K])
      if (gateUp) n.normMatmulSiluMul(out, n.empty('cuda', 'bf16', [M, N]), normed, resOut, res, x, normW, EPS, w, null)
      else n.normMatmul(out, normed, resOut, res, x, normW, EPS, w, null)
      return out
    }
    const alone: Buffer[] = []
    for (let p = 0; p < 2; p++) alone.push(await readBytes(run(1, n.narrow(probeRes, p, 1), n.narrow(probeX, p, 1))))
    const problems: string[] = []
    for (const M of Ms) {
      const res = bf16Tensor('cuda', [M, K], randomBf16(M * K, 40 + M, 2))
      const x = bf16Tensor('cuda', [M, K], randomBf16(M * K, 80 + M, 0.5))
      const at = [0, M - 1]
      at.forEach((row, p) => {
        n.copy(n.narrow(res, row, 1), n.narrow(probeRes, p, 1))
        n.copy(n.narrow(x, row, 1), n.narrow(probeX, p, 1))
      })
      const out = run(M, res, x)
      for (let p = 0; p < 2; p++) {
        const got = await rowBytes(out, at[p]!, 1)
        const first = got.findIndex((b, i) => b !== alone[p]![i])
        if (first >= 0) problems.push(`M=${M} probe ${p} at row ${at[p]}: first differing byte ${first}`)
      }
    }
    return problems
  }

  const Ms = [2, 3, 8, 9, 16, 17, 64, 300]
  it(`rows are bit-identical for M in [${Ms}] (q|k|v N 4096 and gate|up 2I 6144, K 1024)`, async () => {
    expect(await probesAcrossM(4096, 1024, false, Ms)).toEqual([])
    expect(await probesAcrossM(6144, 1024, true, Ms)).toEqual([])
  }, 120_000)

  // The variant splits the norm's rows below 4 and K below 64 rows: rows of M = 1 and larger M
  // take other roundings.
  it('variant twin: with the norm and the product split by M, some probe rows differ', async () => {
    const problems = await withVariant(() => probesAcrossM(4096, 1024, false, Ms))
    expect(problems.length).toBeGreaterThan(0)
  }, 120_000)
})
