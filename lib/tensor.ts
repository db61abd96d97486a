// Host-side helpers around native tensors: bf16 conversion, typed uploads and reads.
import { native, type DType, type DeviceName, type NativeTensor } from './native.js'

const f32 = new Float32Array(1)
const u32 = new Uint32Array(f32.buffer)

/** fp32 -> bf16 bits, round to nearest even (as the native code does). */
export function f32ToBf16Bits(value: number): number {
  f32[0] = value
  const bits = u32[0]!
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) return ((bits >>> 16) | 0x40) & 0xffff
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff
}

export function bf16BitsToF32(bits: number): number {
  u32[0] = (bits & 0xffff) << 16
  return f32[0]!
}

export function toBf16(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length)
  for (let i = 0; i < values.length; i++) out[i] = f32ToBf16Bits(values[i]!)
  return out
}

export function fromBf16(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length)
  const view = new Uint32Array(out.buffer)
  for (let i = 0; i < bits.length; i++) view[i] = bits[i]! << 16
  return out
}

/** Rounds each value to the nearest bf16, as storing it in a bf16 tensor would. */
export function roundBf16(values: ArrayLike<number>): Float32Array {
  return fromBf16(toBf16(values))
}

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1)
}

/** A new tensor holding `data` (bf16 tensors take a Uint16Array of bits or plain numbers to convert). */
export function tensorFrom(
  device: DeviceName,
  dtype: DType,
  shape: number[],
  data: ArrayLike<number> | ArrayBufferView,
): NativeTensor {
  return native().fromBuffer(device, dtype, shape, hostBuffer(dtype, data))
}

export function hostBuffer(dtype: DType, data: ArrayLike<number> | ArrayBufferView): ArrayBufferView {
  if (ArrayBuffer.isView(data)) {
    if (dtype === 'bf16' && data instanceof Float32Array) return toBf16(data)
    if (dtype === 'i32' && !(data instanceof Int32Array)) return Int32Array.from(data as unknown as ArrayLike<number>)
    return data
  }
  switch (dtype) {
    case 'bf16':
      return toBf16(data)
    case 'f32':
      return Float32Array.from(data)
    case 'i32':
      return Int32Array.from(data)
    case 'f16':
      throw new Error('Expected a Uint16Array of f16 bits for an f16 tensor but received an array of numbers')
    case 'u16':
      return Uint16Array.from(data)
  }
}

/** Reads a tensor back as float32 values (bf16 and f32 tensors) or int32 values (i32, and u16 widened). */
export async function readTensor(t: NativeTensor): Promise<Float32Array | Int32Array> {
  const buf = await native().download(t)
  const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength)
  switch (t.dtype) {
    case 'f32':
      return new Float32Array(ab)
    case 'i32':
      return new Int32Array(ab)
    case 'bf16':
      return fromBf16(new Uint16Array(ab))
    case 'u16':
      return Int32Array.from(new Uint16Array(ab))
    case 'f16':
      throw new Error('readTensor: f16 tensors are read with native().download')
  }
}

export async function readF32(t: NativeTensor): Promise<Float32Array> {
  const v = await readTensor(t)
  if (!(v instanceof Float32Array)) throw new Error(`readF32: expected a floating tensor but received ${t.dtype}`)
  return v
}

export async function readI32(t: NativeTensor): Promise<Int32Array> {
  const v = await readTensor(t)
  if (!(v instanceof Int32Array)) throw new Error(`readI32: expected an i32 tensor but received ${t.dtype}`)
  return v
}

/** Raw bytes of a tensor, for bitwise comparisons. */
export async function readBytes(t: NativeTensor): Promise<Buffer> {
  return native().download(t)
}
