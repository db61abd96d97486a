// The only module that loads the compiled addon, and the one type that describes every native
// function. Everything else imports `native()` from here. The addon comes from a build from source
// (build/Release/detinfer.node, made by `npm install`'s script or `npm run build:native`) when there
// is one, and otherwise from the prebuilt package for this platform (@detinfer/linux-x64).
import { existsSync, readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

export type DType = 'bf16' | 'f16' | 'f32' | 'i32' | 'u16'
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

/**
 * A CUDA graph captured from the stream (graphBegin ... graphEnd). replay() enqueues the recorded
 * work again, on the same tensors; bytes is the GPU memory its instantiation took.
 */
export interface NativeGraph {
  readonly bytes: number
  readonly disposed: boolean
  replay(): void
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

/**
 * Every function of the addon. On CUDA, ops enqueue and return at once, and download/synchronize
 * wait off the JS thread; on the CPU backend an op computes before it returns, on the JS thread.
 */
/** One Hopper matmul launch of a DETINFER_STAMPS build (NativeAddon.stamps). */
export interface MatmulStampRecord {
  slot: number
  seq: number
  M: number
  N: number
  K: number
  /** "BMxBN sSTAGES aA_ROWS ktKT" */
  tile: string
  tiles: number
  chains: number
  gateUp: boolean
  norm: boolean
}

export interface NativeAddon {
  empty(device: DeviceName, dtype: DType, shape: number[]): NativeTensor
  fromBuffer(device: DeviceName, dtype: DType, shape: number[], data: ArrayBufferView): NativeTensor
  upload(tensor: NativeTensor, data: ArrayBufferView): void
  /**
   * Like upload, but a CUDA tensor's copy is enqueued from a pinned staging buffer and not waited
   * for (data may be reused at once). Not allowed while a graph is being captured.
   */
  uploadAsync(tensor: NativeTensor, data: ArrayBufferView): void
  /**
   * The tensor's bytes, waited for off the JS thread. They are those left by the ops called before
   * download, never by a later one: a CPU tensor is copied at the call, and a CUDA tensor of up to
   * 1 MiB is copied by a read-back enqueued on the stream at the call (a larger one when the worker
   * runs: call it once the ops that must not change the tensor are done).
   */
  download(tensor: NativeTensor): Promise<Buffer>
  synchronize(device: DeviceName): Promise<void>
  view(tensor: NativeTensor, shape: number[]): NativeTensor
  narrow(tensor: NativeTensor, start: number, count: number): NativeTensor
  embedding(out: NativeTensor, table: NativeTensor, ids: NativeTensor): void
  rmsnorm(out: NativeTensor, x: NativeTensor, w: NativeTensor, eps: number): void
  addRmsnorm(out: NativeTensor, residual: NativeTensor, x: NativeTensor, w: NativeTensor, eps: number): void
  matmul(out: NativeTensor, a: NativeTensor, w: NativeTensor, bias: NativeTensor | null): void
  /**
   * The row-parallel product: K in 8 equal partitions (K/8 a multiple of 16), each partition's
   * product in fp32, the partials added by the fixed tree ((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7)), + bias.
   */
  matmulPartitioned(out: NativeTensor, a: NativeTensor, w: NativeTensor, bias: NativeTensor | null): void
  /** partials f32 [Q,M,N]: the products over Q equal K ranges of a [M,K] and w [N,K], each as one partition of matmulPartitioned. */
  matmulPartials(partials: NativeTensor, a: NativeTensor, w: NativeTensor): void
  /** out = the fixed tree over partials f32 [8,M,N] (+ bias); ranks (1, 2, 4, 8) matters only to the variant's ring order. */
  combinePartials(out: NativeTensor, partials: NativeTensor, bias: NativeTensor | null, ranks: number): void
  rope(x: NativeTensor, positions: NativeTensor, cosSin: NativeTensor): void
  siluMul(out: NativeTensor, gate: NativeTensor, up: NativeTensor): void
  /** out [T,I] = silu(gateUp[:, :I]) * gateUp[:, I:], gateUp [T,2I] the fused gate|up product. */
  siluMulPacked(out: NativeTensor, gateUp: NativeTensor): void
  /**
   * out [M,I] = silu(a·w[:I]ᵀ) * (a·w[I:]ᵀ), w [2I,K] the fused gate|up weight (+ bias [2I]): the bits of
   * matmul into gateUp then siluMulPacked, in one launch on CUDA (the CPU runs the two ops). gateUp
   * [M,2I] is scratch, written by the paths that do not fuse; its contents afterwards are unspecified.
   */
  matmulSiluMul(out: NativeTensor, gateUp: NativeTensor, a: NativeTensor, w: NativeTensor, bias: NativeTensor | null): void
  /**
   * out [M,N] = rmsnorm(rows)·wᵀ (+ bias), rows = residualIn + x written to residualOut (x null: rows =
   * residualIn, residualOut not written): the bits of addRmsnorm then matmul, in one launch on
   * Hopper at decode sizes. normed [M,K] is scratch for the paths that do not fuse.
   */
  normMatmul(
    out: NativeTensor,
    normed: NativeTensor,
    residualOut: NativeTensor,
    residualIn: NativeTensor,
    x: NativeTensor | null,
    normW: NativeTensor,
    eps: number,
    w: NativeTensor,
    bias: NativeTensor | null,
  ): void
  /** normMatmul before matmulSiluMul: out [M,I], gateUp [M,2I] and normed [M,K] scratch. */
  normMatmulSiluMul(
    out: NativeTensor,
    gateUp: NativeTensor,
    normed: NativeTensor,
    residualOut: NativeTensor,
    residualIn: NativeTensor,
    x: NativeTensor | null,
    normW: NativeTensor,
    eps: number,
    w: NativeTensor,
    bias: NativeTensor | null,
  ): void
  add(out: NativeTensor, a: NativeTensor, b: NativeTensor): void
  kvAppend(kCache: NativeTensor, vCache: NativeTensor, k: NativeTensor, v: NativeTensor, slots: NativeTensor): void
  /**
   * From the fused projection qkv [T, (heads + 2*kvHeads)*D]: qOut [T,heads,D] = rope(qNorm(q)), and the
   * cache rows at slots get rope(kNorm(k)) and v; the bits of rmsnorm per head, rope and kvAppend.
   */
  qkvRopeAppend(
    qOut: NativeTensor,
    kCache: NativeTensor,
    vCache: NativeTensor,
    qkv: NativeTensor,
    positions: NativeTensor,
    cosSin: NativeTensor,
    slots: NativeTensor,
    qNorm: NativeTensor | null,
    kNorm: NativeTensor | null,
    eps: number,
  ): void
  /**
   * `workspace` (f32, CUDA): where a decode launch writes its split partials when it holds them;
   * otherwise (or without one) a workspace the process keeps and grows, which a CUDA graph must
   * not capture (csrc/kernels/cuda_ops.h).
   */
  attention(
    out: NativeTensor,
    q: NativeTensor,
    kCache: NativeTensor,
    vCache: NativeTensor,
    batch: AttentionBatch,
    scale: number,
    workspace?: NativeTensor | null,
  ): void
  logSoftmax(out: NativeTensor, x: NativeTensor): void
  argmax(out: NativeTensor, x: NativeTensor): void
  tokenLogprobs(out: NativeTensor, x: NativeTensor, ids: NativeTensor): void
  /**
   * The output head (csrc/common/token_choice.h): out i32 [R, 2+2N], x f32 [R, V], params i32 [R, 8].
   * With `live` (i32 [n]), rows at or past live[0] are skipped (their out rows are not written).
   */
  chooseTokens(out: NativeTensor, x: NativeTensor, params: NativeTensor, live?: NativeTensor | null): void
  /**
   * Logit processors (csrc/common/logit_processors.h): for the plan's rows j < plan[0], adjusted[j]
   * = the penalized and biased row plan[1+4j] of x (counts u16 [S, V] and settings i32 [S, 604] of
   * table row plan[2+4j], its counts zeroed first when plan[3+4j] is 1), with the tokens its mask
   * row (mask i32 [S, ceil(V/32)], bit v & 31 of word v >> 5) forbids at -Infinity when plan[4+4j]
   * is 1; adjustedParams[j] = its params.
   */
  applyLogitProcessors(
    adjusted: NativeTensor,
    adjustedParams: NativeTensor,
    counts: NativeTensor,
    x: NativeTensor,
    params: NativeTensor,
    plan: NativeTensor,
    settings: NativeTensor,
    mask: NativeTensor,
  ): void
  /** After chooseTokens on the adjusted rows: params[plan row].target = the chosen id, and its count + 1. */
  recordLogitChoices(params: NativeTensor, counts: NativeTensor, chosen: NativeTensor, plan: NativeTensor): void
  /** Zeroes row `row` of counts u16 [S, V], then marks the words of the ids in prompt i32 [n] as the prompt's (repetition penalty). */
  resetLogitRow(counts: NativeTensor, row: number, prompt: NativeTensor): void
  copy(dst: NativeTensor, src: NativeTensor): void
  cast(dst: NativeTensor, src: NativeTensor): void
  setVariantKernels(enabled: boolean): void
  /** Development: how every CUDA decode attention launch streams K and V; 'auto' restores the library's choice by grid size. Same bits either way. */
  setDecodePipeline(pipeline: 'auto' | 'paired' | 'rotating' | 'paired3'): void
  /** Development: 'mma.sync' runs every CUDA prefill attention launch with the sm_80-89 kernel, on Hopper too; 'auto' restores the library's choice (wgmma on Hopper). Same bits either way. */
  setPrefillKernel(kernel: 'auto' | 'mma.sync'): void
  /** Development: 'mma.sync' runs every CUDA matmul with the sm_80-89 kernels, on Hopper too; 'auto' restores the library's choice (wgmma on an sm_90a build on Hopper). Same bits either way. */
  setMatmulKernels(kernels: 'auto' | 'mma.sync'): void
  variantKernels(): boolean
  cudaStatus(): CudaStatus
  /**
   * Development, only in an addon built with `--CDDETINFER_STAMPS=ON` (bench/step-stamps.mjs): the
   * last Hopper matmul launches (by slot) and their blocks' timestamps, u64 [slots][blocks][events]
   * as csrc/kernels/matmul_sm90_kernel.cuh lists them; the device's copy is cleared.
   */
  stamps?(): { next: number; records: MatmulStampRecord[]; data: ArrayBuffer }
  /** Starts recording the CUDA stream's work into a graph instead of running it. */
  graphBegin(): void
  /** Ends the recording and instantiates it; throws when the capture was invalidated (call graphAbort then). */
  graphEnd(): NativeGraph
  /** Ends a capture after an error, discarding it and clearing the error; does nothing when none is running. */
  graphAbort(): void
  /**
   * GPU memory free and in all, in bytes, once the stream's work has run (CUDA only), and the
   * bytes of the decode attention workspace the process holds for launches given none large
   * enough (grown by them, never released; a model's own decode steps use the model's).
   */
  memoryInfo(): { free: number; total: number; decodeWorkspace: number }
  /** Keys per attention split in force: the schedule's constant (csrc/common/attention_schedule.h) unless setAttentionSplitSize says otherwise. */
  attentionSplitSize(): number
  /**
   * Development: the keys per attention split (a multiple of 64 up to 4096; 0 restores the
   * build's 256). Every size keeps the invariants but gives other bits: for measuring only, set
   * before a model loads (csrc/common/config.h).
   */
  setAttentionSplitSize(keys: number): void
}

/**
 * Every function NativeAddon types (test/layering.test.ts holds this list to the interface and to
 * what the binding registers): an addon that lacks one was built from other sources than this
 * package's JavaScript, and is refused at load with the names, not failed at the first call.
 */
export const ADDON_FUNCTIONS = [
  'empty', 'fromBuffer', 'upload', 'uploadAsync', 'download', 'synchronize', 'view', 'narrow',
  'embedding', 'rmsnorm', 'addRmsnorm', 'matmul', 'matmulPartitioned', 'matmulPartials',
  'combinePartials', 'rope', 'siluMul', 'siluMulPacked', 'matmulSiluMul', 'normMatmul',
  'normMatmulSiluMul', 'add', 'kvAppend', 'qkvRopeAppend', 'attention', 'logSoftmax', 'argmax',
  'tokenLogprobs', 'chooseTokens', 'applyLogitProcessors', 'recordLogitChoices', 'resetLogitRow',
  'copy', 'cast', 'setVariantKernels', 'setDecodePipeline', 'setPrefillKernel', 'setMatmulKernels',
  'variantKernels', 'cudaStatus', 'graphBegin', 'graphEnd', 'graphAbort', 'memoryInfo',
  'attentionSplitSize', 'setAttentionSplitSize',
] as const satisfies readonly (keyof NativeAddon)[]

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..')
/** The addon built from source in this package. */
export const sourceBuildPath = join(packageRoot, 'build', 'Release', 'detinfer.node')
/** The optional package that holds a prebuilt addon for this platform. */
export const prebuiltPackage = `@detinfer/${process.platform}-${process.arch}`

/** The prebuilt package as installed: its addon and the oldest glibc it runs on. */
export interface PrebuiltAddon {
  path: string
  glibc: string
}

let addon: NativeAddon | undefined
let addonPath = ''

/** The loaded addon; throws an error that says how to get one when there is none or it does not load. */
export function native(): NativeAddon {
  if (addon) return addon
  const fromSource = existsSync(sourceBuildPath)
  const prebuilt = fromSource ? null : prebuiltAddon()
  if (!fromSource && prebuilt === null) {
    throw new Error(
      `detinfer: no native addon: ${sourceBuildPath} does not exist and ${prebuiltPackage} is not installed. ` +
        `Reinstall detinfer without --ignore-scripts (it uses the prebuilt package where there is one for this ` +
        `platform and builds from source otherwise), or ${rebuildAdvice()}.`,
    )
  }
  const path = prebuilt?.path ?? sourceBuildPath
  let loaded: NativeAddon
  try {
    loaded = createRequire(import.meta.url)(path) as NativeAddon
  } catch (err) {
    const reason = err instanceof Error ? err.message.split('\n')[0] : String(err)
    throw new Error(
      `detinfer: the native addon ${path} could not be loaded (${reason}). ` +
        (prebuilt
          ? `The prebuilt addon needs Linux x64 with glibc ${prebuilt.glibc} or newer; elsewhere reinstall with ` +
            `DETINFER_BUILD_FROM_SOURCE=1 to build from source (needs CMake and a C++ compiler).`
          : `${capitalized(rebuildAdvice())}.`),
    )
  }
  const missing = missingAddonFunctions(loaded)
  if (missing.length > 0)
    throw new Error(
      `detinfer: the native addon ${path} was built from other sources than this package's JavaScript: it lacks ` +
        `${missing.join(', ')}. ` +
        (prebuilt
          ? `Reinstall detinfer and ${prebuiltPackage} at the same version.`
          : `${capitalized(rebuildAdvice())}.`),
    )
  addon = loaded
  addonPath = path
  return addon
}

/**
 * How to build the addon from source: `npm rebuild detinfer` where detinfer is installed (its
 * install script builds and cleans up), `npm run build:native` in a checkout of the repository.
 */
function rebuildAdvice(): string {
  const how = existsSync(join(packageRoot, '.git')) ? '`npm run build:native` in the checkout' : '`npm rebuild detinfer`'
  return `build it from source with ${how} (needs CMake and a C++ compiler; CUDA's nvcc for the GPU backend)`
}

function capitalized(text: string): string {
  return text[0]!.toUpperCase() + text.slice(1)
}

/** The ADDON_FUNCTIONS an addon does not have. */
export function missingAddonFunctions(loaded: object): string[] {
  return ADDON_FUNCTIONS.filter((name) => typeof (loaded as Record<string, unknown>)[name] !== 'function')
}

/** The file the addon was loaded from ('' before the first `native()`). */
export function nativeAddonPath(): string {
  return addonPath
}

/**
 * The prebuilt package of this platform, or null when it is not installed (or holds no addon). One
 * of another version than this package is an error: its ops may differ.
 */
export function prebuiltAddon(): PrebuiltAddon | null {
  let manifestPath: string
  try {
    manifestPath = createRequire(join(packageRoot, 'package.json')).resolve(`${prebuiltPackage}/package.json`)
  } catch {
    return null
  }
  const ours = readManifest(join(packageRoot, 'package.json'))
  const theirs = readManifest(manifestPath)
  if (theirs.version !== ours.version)
    throw new Error(
      `detinfer: ${prebuiltPackage} ${theirs.version} is installed beside detinfer ${ours.version}; install the same version of both`,
    )
  const path = join(dirname(manifestPath), 'detinfer.node')
  return existsSync(path) ? { path, glibc: theirs.detinfer?.glibc ?? 'unknown' } : null
}

function readManifest(file: string): { version: string; detinfer?: { glibc?: string } } {
  return JSON.parse(readFileSync(file, 'utf8')) as { version: string; detinfer?: { glibc?: string } }
}
