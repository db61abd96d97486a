// Float64 references of the ops (inputs are the bf16/f32 values the kernels see), and small
// helpers the op tests share: bf16 inputs as exact float values, bitwise row comparisons.
import { expect } from 'vitest'
import { native, type DeviceName, type NativeTensor } from '../../lib/native.js'
import { readBytes, roundBf16, tensorFrom } from '../../lib/tensor.js'
import { firstDifference, relativeError } from '../helpers/compare.js'
import { randomArray } from '../helpers/random.js'

/** Random values already rounded to bf16, so the reference sees exactly what the kernel reads. */
export function randomBf16(n: number, seed: number, scale = 1): Float32Array {
  return roundBf16(randomArray(n, seed, scale))
}

/** out[m,n] = Σ_k a[m,k]·w[n,k] (+ bias[n]), in float64. */
export function refMatmul(a: Float32Array, w: Float32Array, M: number, N: number, K: number, bias?: Float32Array): Float64Array {
  const out = new Float64Array(M * N)
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let acc = bias ? bias[n]! : 0
      for (let k = 0; k < K; k++) acc += a[m * K + k]! * w[n * K + k]!
      out[m * N + n] = acc
    }
  return out
}

/** y[r,:] = x[r,:] / sqrt(mean(x[r,:]^2) + eps) * w, in float64. */
export function refRmsnorm(x: ArrayLike<number>, w: ArrayLike<number>, rows: number, H: number, eps: number): Float64Array {
  const out = new Float64Array(rows * H)
  for (let r = 0; r < rows; r++) {
    let ss = 0
    for (let i = 0; i < H; i++) ss += x[r * H + i]! * x[r * H + i]!
    const inv = 1 / Math.sqrt(ss / H + eps)
    for (let i = 0; i < H; i++) out[r * H + i] = x[r * H + i]! * inv * w[i]!
  }
  return out
}

/** logsumexp of each row, in float64. */
export function refLogsumexp(x: Float32Array, rows: number, V: number): Float64Array {
  const out = new Float64Array(rows)
  for (let r = 0; r < rows; r++) {
    let max = -Infinity
    for (let v = 0; v < V; v++) max = Math.max(max, x[r * V + v]!)
    let sum = 0
    for (let v = 0; v < V; v++) sum += Math.exp(x[r * V + v]! - max)
    out[r] = max + Math.log(sum)
  }
  return out
}

/** Every element within atol + rtol·|ref| of the reference (reports the first one that is not). */
export function expectClose(out: ArrayLike<number>, ref: ArrayLike<number>, rtol: number, atol: number, what = ''): void {
  expect(out.length).toBe(ref.length)
  for (let i = 0; i < ref.length; i++) {
    const o = out[i]!
    const r = ref[i]!
    if (!(Math.abs(o - r) <= atol + rtol * Math.abs(r)))
      expect.fail(`${what} element ${i}: got ${o}, expected ${r} (atol ${atol}, rtol ${rtol})`)
  }
}

/** Relative (Frobenius) error below `bound`. */
export function expectRelError(out: ArrayLike<number>, ref: ArrayLike<number>, bound: number): number {
  const err = relativeError(out, ref)
  expect(err).toBeLessThan(bound)
  return err
}

/** Bit-for-bit equality, with the first differing byte in the failure message. */
export function expectSameBits(got: ArrayBufferView, want: ArrayBufferView, what: string): void {
  const at = firstDifference(got, want)
  if (at >= 0) expect.fail(`${what}: first differing byte at ${at} of ${got.byteLength}`)
}

/** Raw bytes of rows [start, start+count) of a tensor. */
export async function rowBytes(t: NativeTensor, start: number, count: number): Promise<Buffer> {
  return readBytes(native().narrow(t, start, count))
}

export function bf16Tensor(device: DeviceName, shape: number[], values: Float32Array): NativeTensor {
  return tensorFrom(device, 'bf16', shape, values)
}

/** Runs `fn` with the variant kernels on, and always turns them off again. */
export async function withVariant<T>(fn: () => Promise<T>): Promise<T> {
  native().setVariantKernels(true)
  try {
    return await fn()
  } finally {
    native().setVariantKernels(false)
  }
}

/** bf16 bits of a quiet NaN. */
export const NAN_BF16 = 0x7fc0

/**
 * Leaves `bits` (bf16) in the shared memory of every SM: products of operands that all hold them,
 * at a decode shape and a prefill shape, whose tiles fill it (with the matmul kernel family that
 * is set: the library's unless a test forces another).
 */
export function poisonSharedMemory(bits = NAN_BF16): void {
  const n = native()
  for (const [m, nOut, k] of [
    [64, 8192, 4096],
    [1024, 8192, 1024],
  ] as const) {
    const a = tensorFrom('cuda', 'bf16', [m, k], new Uint16Array(m * k).fill(bits))
    const w = tensorFrom('cuda', 'bf16', [nOut, k], new Uint16Array(nOut * k).fill(bits))
    const out = n.empty('cuda', 'bf16', [m, nOut])
    n.matmul(out, a, w, null)
    for (const t of [a, w, out]) t.dispose()
  }
}
