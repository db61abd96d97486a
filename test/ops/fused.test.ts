// The fused forms of a layer's ops give the bits of the separate ops, element for element:
// - one product over weights concatenated by rows (q|k|v, gate|up) equals the separate products,
//   because each output element's K chain does not depend on N (the tile shape may);
// - siluMulPacked over [gate | up] rows equals siluMul over the two halves;
// - qkvRopeAppend equals rmsnorm per head (Qwen3), rope and kvAppend run one after the other.
// On the CPU at small shapes; on CUDA at Qwen3-0.6B's (hidden 1024, 16 heads and 8 kv heads of
// 128, intermediate 3072) for M in 1, 7, 64, 300, where the matmul tile choice depends on N.
import { describe, expect, it } from 'vitest'
import { native, type DeviceName, type NativeTensor } from '../../lib/native.js'
import { readBytes, tensorFrom, toBf16 } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { concatRows, randomInts } from '../helpers/random.js'
import { expectSameBits, randomBf16 } from './reference.js'

const n = native()

interface Shapes {
  hidden: number
  heads: number
  kvHeads: number
  headDim: number
  intermediate: number
  rows: number[]
}

/** Row-wise concatenation of [rows, width_i] blocks. */
function concatColumns(parts: Buffer[], rows: number): Buffer {
  const widths = parts.map((p) => p.length / rows)
  const out = Buffer.alloc(parts.reduce((s, p) => s + p.length, 0))
  let at = 0
  for (let r = 0; r < rows; r++)
    parts.forEach((p, i) => {
      at += p.copy(out, at, r * widths[i]!, (r + 1) * widths[i]!)
    })
  return out
}

/** Fused product over the row-concatenated weights vs one product per weight; bytes of [M, ΣN]. */
async function fusedVersusSeparate(
  device: DeviceName,
  M: number,
  K: number,
  widths: number[],
  seed: number,
  withBias: boolean,
): Promise<[Buffer, Buffer]> {
  const a = tensorFrom(device, 'bf16', [M, K], randomBf16(M * K, seed))
  const ws = widths.map((N, i) => randomBf16(N * K, seed + 10 + i, 0.05))
  const bs = widths.map((N, i) => randomBf16(N, seed + 20 + i, 0.5))
  const total = widths.reduce((s, x) => s + x, 0)
  const fused = n.empty(device, 'bf16', [M, total])
  n.matmul(fused, a, tensorFrom(device, 'bf16', [total, K], concatRows(ws)), withBias ? tensorFrom(device, 'bf16', [total], concatRows(bs)) : null)
  const parts: Buffer[] = []
  for (let i = 0; i < widths.length; i++) {
    const out = n.empty(device, 'bf16', [M, widths[i]!])
    n.matmul(out, a, tensorFrom(device, 'bf16', [widths[i]!, K], ws[i]!), withBias ? tensorFrom(device, 'bf16', [widths[i]!], bs[i]!) : null)
    parts.push(await readBytes(out))
  }
  return [await readBytes(fused), concatColumns(parts, M)]
}

function fusedSuite(device: DeviceName, s: Shapes): void {
  const D = s.headDim

  it(`a q|k|v product equals the q, k and v products bit for bit for M in [${s.rows}]`, async () => {
    for (const M of s.rows)
      for (const withBias of [false, true]) {
        const [fused, separate] = await fusedVersusSeparate(device, M, s.hidden, [s.heads * D, s.kvHeads * D, s.kvHeads * D], M, withBias)
        expectSameBits(fused, separate, `q|k|v, M=${M}, bias ${withBias}`)
      }
  })

  it(`a gate|up product equals the gate and up products bit for bit for M in [${s.rows}]`, async () => {
    for (const M of s.rows) {
      const [fused, separate] = await fusedVersusSeparate(device, M, s.hidden, [s.intermediate, s.intermediate], 100 + M, false)
      expectSameBits(fused, separate, `gate|up, M=${M}`)
    }
  })

  it('siluMulPacked over [gate | up] rows equals siluMul over the halves bit for bit', async () => {
    const I = s.intermediate
    for (const M of s.rows) {
      const gate = randomBf16(M * I, 300 + M, 6)
      const up = randomBf16(M * I, 400 + M, 3)
      const separate = n.empty(device, 'bf16', [M, I])
      n.siluMul(separate, tensorFrom(device, 'bf16', [M, I], gate), tensorFrom(device, 'bf16', [M, I], up))
      const gateUp = concatColumns([Buffer.from(toBf16(gate).buffer), Buffer.from(toBf16(up).buffer)], M)
      const packed = n.empty(device, 'bf16', [M, I])
      n.siluMulPacked(packed, n.fromBuffer(device, 'bf16', [M, 2 * I], gateUp))
      expectSameBits(await readBytes(packed), await readBytes(separate), `silu·mul, M=${M}`)
    }
  })

  for (const headNorm of [true, false])
    it(`qkvRopeAppend equals ${headNorm ? 'rmsnorm per head, ' : ''}rope and kvAppend bit for bit`, async () => {
      for (const T of s.rows) await checkQkvRopeAppend(device, s, T, headNorm)
    })

  it('qkvRopeAppend and siluMulPacked refuse mismatched shapes, naming the argument', () => {
    const cache = n.empty(device, 'bf16', [2, 4, s.kvHeads, D])
    const q = n.empty(device, 'bf16', [3, s.heads, D])
    const wrong = n.empty(device, 'bf16', [3, (s.heads + s.kvHeads) * D])
    const ints = tensorFrom(device, 'i32', [3], [0, 1, 2])
    const cosSin = n.empty(device, 'f32', [8, D])
    expect(() => n.qkvRopeAppend(q, cache, cache, wrong, ints, cosSin, ints, null, null, 1e-6)).toThrow(
      `qkv_rope_append: expected dimension 1 of qkv to be ${(s.heads + 2 * s.kvHeads) * D} ((heads + 2 * kv heads) * head dim) but received bf16[3,${(s.heads + s.kvHeads) * D}]`,
    )
    expect(() => n.siluMulPacked(n.empty(device, 'bf16', [3, 8]), n.empty(device, 'bf16', [3, 8]))).toThrow(
      'silu_mul_packed: expected dimension 1 of gate_up to be 16 (twice the columns of out: gate then up) but received bf16[3,8]',
    )
  })
}

async function checkQkvRopeAppend(device: DeviceName, s: Shapes, T: number, headNorm: boolean): Promise<void> {
  const { heads, kvHeads, headDim: D } = s
  const width = (heads + 2 * kvHeads) * D
  const blockSize = 16
  const blocks = Math.ceil((T + 3) / blockSize) + 1
  const capacity = blocks * blockSize
  const maxPos = 4096
  const qkvValues = randomBf16(T * width, 500 + T, 4)
  const positions = randomInts(T, 600 + T, maxPos)
  // Distinct slots in a scattered order; the last row's is -1 (a padding row: not written).
  const slots = Int32Array.from({ length: T }, (_, t) => (t === T - 1 && T > 1 ? -1 : (t * 7 + 3) % capacity))
  const cosSin = new Float32Array(maxPos * D)
  for (let p = 0; p < maxPos; p++)
    for (let i = 0; i < D / 2; i++) {
      const angle = Math.fround(p * Math.fround(1 / 1e6 ** ((2 * i) / D)))
      cosSin[p * D + i] = Math.cos(angle)
      cosSin[p * D + D / 2 + i] = Math.sin(angle)
    }
  const cacheInit = randomBf16(capacity * kvHeads * D, 700 + T)
  const qNorm = headNorm ? tensorFrom(device, 'bf16', [D], randomBf16(D, 801, 2)) : null
  const kNorm = headNorm ? tensorFrom(device, 'bf16', [D], randomBf16(D, 802, 2)) : null
  const pos = tensorFrom(device, 'i32', [T], positions)
  const slotT = tensorFrom(device, 'i32', [T], slots)
  const table = tensorFrom(device, 'f32', [maxPos, D], cosSin)
  const cacheShape = [blocks, blockSize, kvHeads, D]
  const eps = 1e-6

  // Separate ops, on q, k, v split on the host.
  const split = (from: number, count: number) => {
    const out = new Float32Array(T * count * D)
    for (let t = 0; t < T; t++) out.set(qkvValues.subarray(t * width + from * D, t * width + (from + count) * D), t * count * D)
    return out
  }
  let q = tensorFrom(device, 'bf16', [T, heads, D], split(0, heads))
  let k = tensorFrom(device, 'bf16', [T, kvHeads, D], split(heads, kvHeads))
  const v = tensorFrom(device, 'bf16', [T, kvHeads, D], split(heads + kvHeads, kvHeads))
  if (qNorm && kNorm) {
    const qn = n.empty(device, 'bf16', [T, heads, D])
    const kn = n.empty(device, 'bf16', [T, kvHeads, D])
    n.rmsnorm(n.view(qn, [T * heads, D]), n.view(q, [T * heads, D]), qNorm, eps)
    n.rmsnorm(n.view(kn, [T * kvHeads, D]), n.view(k, [T * kvHeads, D]), kNorm, eps)
    q = qn
    k = kn
  }
  n.rope(q, pos, table)
  n.rope(k, pos, table)
  const kCacheA = tensorFrom(device, 'bf16', cacheShape, cacheInit)
  const vCacheA = tensorFrom(device, 'bf16', cacheShape, cacheInit)
  n.kvAppend(kCacheA, vCacheA, k, v, slotT)

  // One fused op.
  const qOut = n.empty(device, 'bf16', [T, heads, D])
  const kCacheB = tensorFrom(device, 'bf16', cacheShape, cacheInit)
  const vCacheB = tensorFrom(device, 'bf16', cacheShape, cacheInit)
  n.qkvRopeAppend(qOut, kCacheB, vCacheB, tensorFrom(device, 'bf16', [T, width], qkvValues), pos, table, slotT, qNorm, kNorm, eps)

  const what = `T=${T}, head norm ${headNorm}`
  expectSameBits(await readBytes(qOut), await readBytes(q), `q of ${what}`)
  expectSameBits(await readBytes(kCacheB), await readBytes(kCacheA), `k cache of ${what}`)
  expectSameBits(await readBytes(vCacheB), await readBytes(vCacheA), `v cache of ${what}`)
  const all: NativeTensor[] = [q, k, v, kCacheA, vCacheA, qOut, kCacheB, vCacheB, pos, slotT, table]
  for (const t of all) t.dispose()
}

describe('fused layer ops on the CPU', () => {
  fusedSuite('cpu', { hidden: 96, heads: 4, kvHeads: 2, headDim: 64, intermediate: 160, rows: [1, 7, 19] })
})

describeGpu('fused layer ops on CUDA at Qwen3-0.6B shapes', () => {
  fusedSuite('cuda', { hidden: 1024, heads: 16, kvHeads: 8, headDim: 128, intermediate: 3072, rows: [1, 7, 64, 300] })
})

// Heads of 64, and 12 head rows per token: the fused kernel's last block of 8 warps is partly empty.
describeGpu('fused layer ops on CUDA with heads of 64', () => {
  fusedSuite('cuda', { hidden: 512, heads: 8, kvHeads: 2, headDim: 64, intermediate: 1024, rows: [1, 5, 33] })
})
