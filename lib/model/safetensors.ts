// safetensors reading, by hand: u64 little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, __metadata__?}, then the data, with offsets
// relative to byte 8+N. A checkpoint is one model.safetensors or shards listed in
// model.safetensors.index.json (weight_map). Tensors are read one at a time with positioned
// reads; nothing beyond one tensor is held in memory.
import type { FileHandle } from 'node:fs/promises'
import { join } from 'node:path'
import { invalidField, isPlainObject } from '../errors.js'
import { openRegularFile, pathExists, readJsonFile } from '../files.js'

/** The safetensors reference implementation refuses larger headers. */
export const MAX_HEADER_BYTES = 100_000_000
const MAX_READ_BYTES = 1 << 30

const DTYPE_BYTES: Record<string, number> = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1, I16: 2, U16: 2, F16: 2, BF16: 2, I32: 4, U32: 4, F32: 4, F64: 8,
  I64: 8, U64: 8,
}
/** The dtypes detinfer loads (F16 and F32 are converted to bf16). */
export const LOADABLE_DTYPES = ['BF16', 'F16', 'F32'] as const
export type LoadableDType = (typeof LOADABLE_DTYPES)[number]

export interface TensorInfo {
  name: string
  /** Path of the file holding it. */
  file: string
  dtype: string
  shape: number[]
  /** Absolute byte offset in `file`. */
  offset: number
  nbytes: number
}

function headerError(file: string, detail: string): Error {
  return new Error(`Invalid safetensors file ${file}: ${detail}`)
}

function isDim(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0
}

/** Validates a parsed header against the file size; returns its tensors in offset order. */
export function parseHeader(header: unknown, file: string, headerBytes: number, fileBytes: number): TensorInfo[] {
  if (!isPlainObject(header)) throw headerError(file, 'the header is not a JSON object')
  const dataStart = 8 + headerBytes
  const dataBytes = fileBytes - dataStart
  const tensors: TensorInfo[] = []
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') continue
    const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown }
    if (typeof e !== 'object' || e === null) throw headerError(file, `tensor ${name} has no {dtype, shape, data_offsets} entry`)
    if (typeof e.dtype !== 'string' || !(e.dtype in DTYPE_BYTES))
      throw headerError(file, `tensor ${name} has unknown dtype ${JSON.stringify(e.dtype)}`)
    if (!Array.isArray(e.shape) || !e.shape.every(isDim))
      throw headerError(file, `tensor ${name} has an invalid shape ${JSON.stringify(e.shape)}`)
    const offsets = e.data_offsets
    if (!Array.isArray(offsets) || offsets.length !== 2 || !isDim(offsets[0]) || !isDim(offsets[1]) || offsets[1] < offsets[0])
      throw headerError(file, `tensor ${name} has invalid data_offsets ${JSON.stringify(offsets)}`)
    const [begin, end] = offsets as [number, number]
    if (end > dataBytes)
      throw headerError(
        file,
        `tensor ${name} has data_offsets [${begin}, ${end}] beyond the ${dataBytes} data bytes of the file (truncated?)`,
      )
    const shape = e.shape as number[]
    const expected = shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[e.dtype]!
    if (expected !== end - begin)
      throw headerError(
        file,
        `tensor ${name} is ${e.dtype} [${shape.join(', ')}] (${expected} bytes) but its data_offsets [${begin}, ${end}] span ${end - begin} bytes`,
      )
    tensors.push({ name, file, dtype: e.dtype, shape, offset: dataStart + begin, nbytes: end - begin })
  }
  tensors.sort((a, b) => a.offset - b.offset || a.nbytes - b.nbytes)
  for (let i = 1; i < tensors.length; i++) {
    const prev = tensors[i - 1]!
    const cur = tensors[i]!
    if (cur.offset < prev.offset + prev.nbytes)
      throw headerError(file, `tensors ${prev.name} and ${cur.name} overlap`)
  }
  return tensors
}

async function readExactly(fh: FileHandle, into: Buffer, position: number, file: string, what: string): Promise<void> {
  let done = 0
  while (done < into.length) {
    const want = Math.min(into.length - done, MAX_READ_BYTES)
    const { bytesRead } = await fh.read(into, done, want, position + done)
    if (bytesRead === 0) throw new Error(`Could not read ${what} from ${file}: the file ended early (truncated?)`)
    done += bytesRead
  }
}

/** One open .safetensors file. */
export class SafetensorsFile {
  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    readonly tensors: Map<string, TensorInfo>,
    readonly metadata: Record<string, string> | null,
  ) {}

  static async open(path: string): Promise<SafetensorsFile> {
    const handle = await openRegularFile(path)
    try {
      const size = (await handle.stat()).size
      if (size < 8) throw headerError(path, `the file is ${size} bytes, too short for the 8-byte header length`)
      const lengthBytes = Buffer.alloc(8)
      await readExactly(handle, lengthBytes, 0, path, 'the header length')
      const headerLength = lengthBytes.readBigUInt64LE(0)
      if (headerLength > BigInt(MAX_HEADER_BYTES))
        throw headerError(path, `the header length ${headerLength} exceeds the ${MAX_HEADER_BYTES}-byte limit`)
      const n = Number(headerLength)
      if (8 + n > size) throw headerError(path, `the header length ${n} exceeds the file's ${size} bytes (truncated?)`)
      const headerBytes = Buffer.alloc(n)
      await readExactly(handle, headerBytes, 8, path, 'the header')
      let header: unknown
      try {
        header = JSON.parse(headerBytes.toString('utf8'))
      } catch (err) {
        throw headerError(path, `the header is not valid JSON (${(err as Error).message})`)
      }
      const list = parseHeader(header, path, n, size)
      const meta = (header as Record<string, unknown>)['__metadata__']
      const metadata = meta && typeof meta === 'object' ? (meta as Record<string, string>) : null
      return new SafetensorsFile(path, handle, new Map(list.map((t) => [t.name, t])), metadata)
    } catch (err) {
      await handle.close()
      throw err
    }
  }

  /** The raw bytes of one tensor, in a fresh (aligned) buffer. */
  async read(info: TensorInfo): Promise<Buffer> {
    const buf = Buffer.allocUnsafeSlow(info.nbytes)
    await readExactly(this.handle, buf, info.offset, this.path, `tensor ${info.name}`)
    return buf
  }

  async close(): Promise<void> {
    await this.handle.close()
  }
}

/** The weights of a model directory: model.safetensors, or the shards named by model.safetensors.index.json. */
export class SafetensorsCheckpoint {
  private constructor(
    readonly dir: string,
    private readonly files: SafetensorsFile[],
    readonly tensors: Map<string, TensorInfo>,
  ) {}

  static async open(dir: string): Promise<SafetensorsCheckpoint> {
    const single = join(dir, 'model.safetensors')
    const index = join(dir, 'model.safetensors.index.json')
    if (await pathExists(index)) return SafetensorsCheckpoint.openSharded(dir, index)
    if (await pathExists(single)) {
      const file = await SafetensorsFile.open(single)
      return new SafetensorsCheckpoint(dir, [file], file.tensors)
    }
    throw new Error(`No weights found in ${dir}: expected model.safetensors or model.safetensors.index.json`)
  }

  private static async openSharded(dir: string, index: string): Promise<SafetensorsCheckpoint> {
    const raw = (await readJsonFile(index)) as { weight_map?: unknown }
    const map = raw?.weight_map
    if (!isPlainObject(map)) throw invalidField('an object', 'weight_map', index, map)
    const byShard = new Map<string, string[]>()
    const shardOf = new Map<string, string>()
    for (const [name, shard] of Object.entries(map as Record<string, unknown>)) {
      // A file of this directory: no path, not "." or "..", a .safetensors name.
      if (typeof shard !== 'string' || shard.includes('/') || shard.includes('\\') || !/^[^.].*\.safetensors$/.test(shard))
        throw invalidField('a shard file name (NAME.safetensors in the same directory)', `weight_map[${JSON.stringify(name)}]`, index, shard)
      const names = byShard.get(shard)
      if (names) names.push(name)
      else byShard.set(shard, [name])
      shardOf.set(name, shard)
    }
    const files: SafetensorsFile[] = []
    const tensors = new Map<string, TensorInfo>()
    try {
      for (const [shard, names] of byShard) {
        const file = await SafetensorsFile.open(join(dir, shard))
        files.push(file)
        for (const name of names) {
          const info = file.tensors.get(name)
          if (!info) throw new Error(`${index} maps tensor ${name} to ${shard}, but ${file.path} does not contain it`)
          tensors.set(name, info)
        }
        // A shard's other tensors are part of the checkpoint too (Hugging Face loads whole shards),
        // so the checks of the weights against the config see them; one the index maps to
        // another shard is there twice.
        for (const [name, info] of file.tensors) {
          const listed = shardOf.get(name)
          if (listed === shard) continue
          if (listed !== undefined)
            throw new Error(`${file.path} holds tensor ${name}, which ${index} maps to ${listed}: a tensor must be in one shard`)
          const other = tensors.get(name)
          if (other) throw new Error(`${file.path} and ${other.file} both hold tensor ${name}: a tensor must be in one shard`)
          tensors.set(name, info)
        }
      }
    } catch (err) {
      await Promise.all(files.map((f) => f.close()))
      throw err
    }
    return new SafetensorsCheckpoint(dir, files, tensors)
  }

  /** The raw bytes of a tensor (any dtype). */
  async read(info: TensorInfo): Promise<Buffer> {
    const file = this.files.find((f) => f.path === info.file)
    if (!file) throw new Error(`tensor ${info.name}: ${info.file} is not part of this checkpoint`)
    return file.read(info)
  }

  async close(): Promise<void> {
    await Promise.all(this.files.map((f) => f.close()))
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions to bf16 bits (round to nearest even, as the native cast does)

const f32Scratch = new Float32Array(1)
const u32Scratch = new Uint32Array(f32Scratch.buffer)

function f32BitsToBf16(bits: number): number {
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) return ((bits >>> 16) | 0x40) & 0xffff
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff
}

/** IEEE half bits -> float32 bits (exact). */
function f16BitsToF32Bits(h: number): number {
  const sign = (h & 0x8000) << 16
  const exp = (h >>> 10) & 0x1f
  const man = h & 0x3ff
  if (exp === 0x1f) return (sign | 0x7f800000 | (man << 13)) >>> 0
  if (exp !== 0) return (sign | ((exp + 112) << 23) | (man << 13)) >>> 0
  if (man === 0) return sign >>> 0
  f32Scratch[0] = man * 2 ** -24
  return (sign | u32Scratch[0]!) >>> 0
}

/** A tensor's bytes as bf16 bits: BF16 as is, F16 and F32 converted. */
export function toBf16Bits(info: TensorInfo, bytes: Buffer): Uint16Array {
  const count = info.nbytes / DTYPE_BYTES[info.dtype]!
  switch (info.dtype) {
    case 'BF16':
      return new Uint16Array(bytes.buffer, bytes.byteOffset, count)
    case 'F16': {
      const src = new Uint16Array(bytes.buffer, bytes.byteOffset, count)
      const out = new Uint16Array(count)
      for (let i = 0; i < count; i++) out[i] = f32BitsToBf16(f16BitsToF32Bits(src[i]!))
      return out
    }
    case 'F32': {
      const src = new Uint32Array(bytes.buffer, bytes.byteOffset, count)
      const out = new Uint16Array(count)
      for (let i = 0; i < count; i++) out[i] = f32BitsToBf16(src[i]!)
      return out
    }
    default:
      throw new Error(
        `tensor ${info.name} in ${info.file} has dtype ${info.dtype}; supported dtypes: ${LOADABLE_DTYPES.join(', ')}`,
      )
  }
}
