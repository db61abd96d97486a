// matmulSiluMul: out[M,I] = silu(a·w[:I]ᵀ (+b[:I])) * (a·w[I:]ᵀ (+b[I:])), each product rounded to
// bf16 first. It must give the bits of matmul into [M, 2I] then siluMulPacked, which the model
// ran before (on CUDA the product's epilogue does the SiLU·mul on the (gate, up) accumulator
// pairs each thread holds; on the CPU and in the variant it is those two ops). Also against a
// float64 reference, and bitwise batch invariance across M with its variant twin. These run the
// family the GPU runs (wgmma on Hopper), and again with the mma.sync family of sm_80-89 forced
// (setMatmulKernels), whose tiles a Hopper would not otherwise run.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { native, type DeviceName, type NativeTensor } from '../../lib/native.js'
import { readBytes, readF32, tensorFrom } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { bf16Tensor, expectClose, expectSameBits, randomBf16, refMatmul, rowBytes, withVariant } from './reference.js'

const n = native()

interface Operands {
  a: NativeTensor
  w: NativeTensor
  bias: NativeTensor | null
  values: { a: Float32Array; w: Float32Array; bias?: Float32Array }
}

function operands(device: DeviceName, M: number, I: number, K: number, withBias: boolean, seed: number): Operands {
  const a = randomBf16(M * K, seed)
  const w = randomBf16(2 * I * K, seed + 1, 0.08)
  const bias = withBias ? randomBf16(2 * I, seed + 2, 0.5) : undefined
  return {
    a: bf16Tensor(device, [M, K], a),
    w: bf16Tensor(device, [2 * I, K], w),
    bias: bias ? bf16Tensor(device, [2 * I], bias) : null,
    values: { a, w, bias },
  }
}

/** The fused op's output, and matmul + siluMulPacked's, as bytes of [M, I]. */
async function fusedAndSeparate(device: DeviceName, M: number, I: number, x: Operands): Promise<[Buffer, Buffer]> {
  const fused = n.empty(device, 'bf16', [M, I])
  const scratch = n.empty(device, 'bf16', [M, 2 * I])
  n.matmulSiluMul(fused, scratch, x.a, x.w, x.bias)
  const gateUp = n.empty(device, 'bf16', [M, 2 * I])
  const separate = n.empty(device, 'bf16', [M, I])
  n.matmul(gateUp, x.a, x.w, x.bias)
  n.siluMulPacked(separate, gateUp)
  const result: [Buffer, Buffer] = [await readBytes(fused), await readBytes(separate)]
  for (const t of [fused, scratch, gateUp, separate]) t.dispose()
  return result
}

/** silu(g)·u in float64 from float64 products, for rows [0, rows) of the operands. */
function reference(x: Operands, rows: number, I: number, K: number): Float64Array {
  const gu = refMatmul(x.values.a.subarray(0, rows * K), x.values.w, rows, 2 * I, K, x.values.bias)
  const out = new Float64Array(rows * I)
  for (let r = 0; r < rows; r++)
    for (let i = 0; i < I; i++) {
      const g = gu[r * 2 * I + i]!
      out[r * I + i] = (g / (1 + Math.exp(-g))) * gu[r * 2 * I + I + i]!
    }
  return out
}

function suite(device: DeviceName, K: number, widths: number[], rows: number[], referenceRows: number): void {
  for (const I of widths)
    it(`equals matmul then siluMulPacked bit for bit, I=${I} K=${K}, M in [${rows}], with and without bias`, async () => {
      for (const M of rows)
        for (const withBias of [false, true]) {
          const x = operands(device, M, I, K, withBias, 7 * M + I)
          const [fused, separate] = await fusedAndSeparate(device, M, I, x)
          expectSameBits(fused, separate, `M=${M} I=${I} bias ${withBias}`)
          // Every value within the roundings (products, SiLU and the result in bf16) of float64.
          const r = Math.min(M, referenceRows)
          const ref = reference(x, r, I, K)
          const scale = ref.reduce((m, v) => Math.max(m, Math.abs(v)), 0)
          const out = n.empty(device, 'bf16', [M, I])
          n.matmulSiluMul(out, n.empty(device, 'bf16', [M, 2 * I]), x.a, x.w, x.bias)
          expectClose((await readF32(out)).subarray(0, r * I), ref, 2 ** -5, 1e-3 * scale, `M=${M} I=${I} bias ${withBias} vs float64`)
        }
    }, 120_000)
}

describe('matmulSiluMul on the CPU', () => {
  suite('cpu', 96, [160, 37], [1, 7, 19], 19)

  it('refuses shapes that do not fit, naming the argument', () => {
    const a = n.empty('cpu', 'bf16', [3, 16])
    const w = n.empty('cpu', 'bf16', [8, 16])
    expect(() => n.matmulSiluMul(n.empty('cpu', 'bf16', [3, 8]), n.empty('cpu', 'bf16', [3, 8]), a, w, null)).toThrow(
      'matmul_silu_mul: expected dimension 1 of out to be 4 (I, half the rows of w) but received bf16[3,8]',
    )
    expect(() => n.matmulSiluMul(n.empty('cpu', 'bf16', [3, 4]), n.empty('cpu', 'bf16', [3, 4]), a, w, null)).toThrow(
      'matmul_silu_mul: expected dimension 1 of gate_up to be 8 (2I, rows of w) but received bf16[3,4]',
    )
    expect(() =>
      n.matmulSiluMul(n.empty('cpu', 'bf16', [3, 3]), n.empty('cpu', 'bf16', [3, 7]), a, n.empty('cpu', 'bf16', [7, 16]), null),
    ).toThrow('matmul_silu_mul: expected w to hold gate then up rows (an even number) but received bf16[7,16]')
    expect(() => n.matmulSiluMul(n.empty('cpu', 'f32', [3, 4]), n.empty('cpu', 'bf16', [3, 8]), a, w, null)).toThrow(
      'matmul_silu_mul: expected out to be bf16 but received f32[3,4]',
    )
    expect(() => n.matmulSiluMul(n.empty('cpu', 'bf16', [3, 4]), n.empty('cpu', 'bf16', [3, 8]), a, w, n.empty('cpu', 'bf16', [4]))).toThrow(
      'matmul_silu_mul: expected dimension 0 of bias to be 8 (2I, rows of w) but received bf16[4]',
    )
  })
})

// Qwen3-0.6B's gate|up (I 3072, K 1024) over every tile production picks: decode tiles (M <= 16),
// 64-row and 128x128 staged tiles, and 128x256 staged at M = 4096; I = 3080 ends inside a tile;
// I = 64 is narrow enough for the 8-column decode tile (taken as 16 columns when fused); I = 37
// is odd (no paired stores); K = 4160 takes the 128x256 tile that does not stage its stores. At
// M 17-64 with K a multiple of 256, I = 2048 takes the 64-row tile of 32 columns with 4 K tiles per
// copy and I = 64 and 37 the one of 16 columns.
// The sm_80-89 kernels: at M = 4096 the product takes the 128x256 tile (on a GPU whose blocks may
// hold its 144 KiB of shared memory), 128x128 at 300, the decode tiles below.
describeGpu('matmulSiluMul on CUDA with the mma.sync kernels forced', () => {
  beforeAll(() => n.setMatmulKernels('mma.sync'))
  afterAll(() => n.setMatmulKernels('auto'))
  suite('cuda', 1024, [3072], [1, 16, 17, 64, 300, 4096], 2)
})

describeGpu('matmulSiluMul on CUDA', () => {
  suite('cuda', 1024, [3072], [1, 7, 16, 17, 64, 100, 300, 4096], 2)
  suite('cuda', 1024, [3080, 2048, 64, 37], [1, 9, 17, 64, 300], 2)
  // K not a multiple of 256: the decode tiles copy one K tile at a time instead of four.
  suite('cuda', 1088, [1024], [1, 16, 64], 2)
  // K above 4096: the 128x256 tile without staged stores (M 2100 gives it enough tiles).
  suite('cuda', 4160, [3072], [1, 2100], 1)
  // Qwen3-8B's gate|up (I 12288, K 4096): on sm_90a the compact decode tiles at M <= 16 and 64x64
  // tiles at 17-64, since its 192 tiles of 64x128 would run between one and two waves (the second
  // less than half full on 132 SMs).
  suite('cuda', 4096, [12288], [1, 16, 24, 64], 1)

  /** Descriptions of every probe row whose bits changed with M (empty: invariant). */
  async function probesAcrossM(I: number, K: number, Ms: number[]): Promise<string[]> {
    const w = bf16Tensor('cuda', [2 * I, K], randomBf16(2 * I * K, 31, 0.08))
    const probes = bf16Tensor('cuda', [2, K], randomBf16(2 * K, 32))
    const alone: Buffer[] = []
    for (let p = 0; p < 2; p++) {
      const out = n.empty('cuda', 'bf16', [1, I])
      n.matmulSiluMul(out, n.empty('cuda', 'bf16', [1, 2 * I]), n.narrow(probes, p, 1), w, null)
      alone.push(await readBytes(out))
    }
    const problems: string[] = []
    for (const M of Ms) {
      const a = bf16Tensor('cuda', [M, K], randomBf16(M * K, 40 + M))
      const at = [0, M - 1]
      at.forEach((row, p) => n.copy(n.narrow(a, row, 1), n.narrow(probes, p, 1)))
      const out = n.empty('cuda', 'bf16', [M, I])
      n.matmulSiluMul(out, n.empty('cuda', 'bf16', [M, 2 * I]), a, w, null)
      for (let p = 0; p < 2; p++) {
        const got = await rowBytes(out, at[p]!, 1)
        const first = got.findIndex((b, i) => b !== alone[p]![i])
        if (first >= 0) problems.push(`M=${M} probe ${p} at row ${at[p]}: first differing byte ${first}`)
      }
    }
    return problems
  }

  const Ms = [2, 3, 7, 8, 16, 31, 64, 128, 300, 1024]
  it(`rows are bit-identical for M in [${Ms}] (I 3072, K 4096)`, async () => {
    expect(await probesAcrossM(3072, 4096, Ms)).toEqual([])
  }, 120_000)

  const Ms8B = [8, 16, 24, 40, 64, 128]
  it(`rows are bit-identical for M in [${Ms8B}] (I 12288, K 4096)`, async () => {
    expect(await probesAcrossM(12288, 4096, Ms8B)).toEqual([])
  }, 120_000)

  it('variant twin: with a split-K chosen from M, some probe rows differ (I 12288, K 4096)', async () => {
    const problems = await withVariant(() => probesAcrossM(12288, 4096, Ms8B))
    expect(problems.length).toBeGreaterThan(0)
  }, 120_000)

  // bf16 outputs show the split's other rounding only where it flips a value: a long K and 3072
  // columns of two products make that near certain in every row past M = 16.
  it('variant twin: with a split-K chosen from M, some probe rows differ', async () => {
    const problems = await withVariant(() => probesAcrossM(3072, 4096, Ms))
    expect(problems.length).toBeGreaterThan(0)
  }, 120_000)

  it('a bias of the wrong device is refused before anything runs', () => {
    const a = n.empty('cuda', 'bf16', [2, 64])
    const w = n.empty('cuda', 'bf16', [16, 64])
    expect(() => n.matmulSiluMul(n.empty('cuda', 'bf16', [2, 8]), n.empty('cuda', 'bf16', [2, 16]), a, w, tensorFrom('cpu', 'bf16', [16], new Float32Array(16)))).toThrow(
      'matmul_silu_mul: all tensors must be on one device',
    )
  })
})
