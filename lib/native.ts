// The only module that loads the compiled addon (build/Release/detinfer.node), and the one type
// that describes every native function. Everything else imports `native()` from here.
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

export type DType = 'bf16' | 'f16' | 'f32' | 'i32'
export type DeviceName = 'cpu' | 'cuda'

/** A device or host tensor owned by the native layer. */
export interface NativeTensor {
  readonly dtype: DType
  readonly device: DeviceName
  readonly shape: number[]
  readonly nbytes: number
  readonly disposed: boolean
  dispose(): void
}

/** A ragged batch of sequences for attention (see csrc/ops.h). */
export interface AttentionBatch {
  blockTables: NativeTensor // i32 [B, maxBlocksPerSeq]
  queryStart: NativeTensor // i32 [B+1]
  seqLens: NativeTensor // i32 [B], keys once this step is written
  maxQueryLen: number
  maxSeqLen: number
}

export interface CudaDevice {
  index: number
  name: string
  computeCapability: string
  totalMemory: number
  multiprocessors: number
}

export interface CudaStatus {
  compiled: boolean
  available: boolean
  reason: string
  archs: string
  runtimeVersion: number
  driverVersion: number
  devices: CudaDevice[]
  /** The matmul kernel family device 0 runs ("wgmma (sm_90a)" or "mma.sync"); "" without a usable GPU. */
  matmulKernels: string
}

/** Every function of the addon. Ops enqueue and return at once; download/synchronize wait off the JS thread. */
export interface NativeAddon {
  empty(device: DeviceName, dtype: DType, shape: number[]): NativeTensor
  fromBuffer(device: DeviceName, dtype: DType, shape: number[], data: ArrayBufferView): NativeTensor
  upload(tensor: NativeTensor, data: ArrayBufferView): void
  download(tensor: NativeTensor): Promise<Buffer>
  synchronize(device: DeviceName): Promise<void>
  view(tensor: NativeTensor, shape: number[]): NativeTensor
  narrow(tensor: NativeTensor, start: number, count: number): NativeTensor
  embedding(out: NativeTensor, table: NativeTensor, ids: NativeTensor): void
  rmsnorm(out: NativeTensor, x: NativeTensor, w: NativeTensor, eps: number): void
  addRmsnorm(out: NativeTensor, residual: NativeTensor, x: NativeTensor, w: NativeTensor, eps: number): void
  matmul(out: NativeTensor, a: NativeTensor, w: NativeTensor, bias: NativeTensor | null): void
  rope(x: NativeTensor, positions: NativeTensor, cosSin: NativeTensor): void
  siluMul(out: NativeTensor, gate: NativeTensor, up: NativeTensor): void
  add(out: NativeTensor, a: NativeTensor, b: NativeTensor): void
  kvAppend(kCache: NativeTensor, vCache: NativeTensor, k: NativeTensor, v: NativeTensor, slots: NativeTensor): void
  attention(
    out: NativeTensor,
    q: NativeTensor,
    kCache: NativeTensor,
    vCache: NativeTensor,
    batch: AttentionBatch,
    scale: number,
  ): void
  logSoftmax(out: NativeTensor, x: NativeTensor): void
  argmax(out: NativeTensor, x: NativeTensor): void
  tokenLogprobs(out: NativeTensor, x: NativeTensor, ids: NativeTensor): void
  /** The output head (csrc/common/token_choice.h): out i32 [R, 2+2N], x f32 [R, V], params i32 [R, 8]. */
  chooseTokens(out: NativeTensor, x: NativeTensor, params: NativeTensor): void
  copy(dst: NativeTensor, src: NativeTensor): void
  cast(dst: NativeTensor, src: NativeTensor): void
  setVariantKernels(enabled: boolean): void
  variantKernels(): boolean
  cudaStatus(): CudaStatus
}

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..')
let addon: NativeAddon | undefined

/** The loaded addon; throws an error that says how to build it when it is missing. */
export function native(): NativeAddon {
  if (addon) return addon
  const require = createRequire(import.meta.url)
  const bindings = require('bindings') as (opts: { bindings: string; module_root: string }) => NativeAddon
  try {
    addon = bindings({ bindings: 'detinfer.node', module_root: packageRoot })
  } catch (err) {
    const reason = err instanceof Error ? err.message.split('\n')[0] : String(err)
    throw new Error(
      `detinfer: the native addon could not be loaded (${reason}). ` +
        `Build it with \`npm run build:native\` (needs CMake and a C++ compiler; CUDA's nvcc for the GPU backend).`,
    )
  }
  return addon
}
