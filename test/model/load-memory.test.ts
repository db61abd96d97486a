// The memory a load needs on its device (lib/model/load-memory.ts): exact bytes at Qwen3-0.6B's and
// Qwen3-8B's shapes, derived here buffer by buffer; the estimate against what Transformer.load
// really allocates on the CPU; the check's error when the device's free memory is too small; and
// the cleanup when an allocation fails midway through a load.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import { DeviceMemoryError } from '../../lib/errors.js'
import type { ModelConfig } from '../../lib/model/config.js'
import { loadModelConfig } from '../../lib/model/config.js'
import {
  checkDeviceMemory,
  deviceWeightBytes,
  estimateLoadMemory,
  formatBytes,
  memoryMargin,
  type LoadSizes,
} from '../../lib/model/load-memory.js'
import type { OutputHead } from '../../lib/model/output-head.js'
import { Transformer } from '../../lib/model/transformer.js'
import { expectedTensors, loadWeights } from '../../lib/model/weights.js'
import { native, type NativeTensor } from '../../lib/native.js'
import { writeTinyModel, type TinyModelSpec } from '../helpers/tiny-model.js'

const MiB = 2 ** 20
const GiB = 2 ** 30

function qwen3(shape: Pick<ModelConfig, 'numLayers' | 'hiddenSize' | 'numHeads' | 'numKvHeads' | 'intermediateSize' | 'tieWordEmbeddings'>): ModelConfig {
  return {
    architecture: 'Qwen3ForCausalLM',
    headDim: 128,
    vocabSize: 151936,
    maxPositionEmbeddings: 40960,
    rmsNormEps: 1e-6,
    ropeTheta: 1_000_000,
    ropeScaling: null,
    qkvBias: false,
    outputBias: false,
    mlpBias: false,
    qkNorm: true,
    dtype: 'bfloat16',
    bosTokenId: null,
    eosTokenIds: [151645],
    ...shape,
  }
}

const QWEN3_0_6B = qwen3({ numLayers: 28, hiddenSize: 1024, numHeads: 16, numKvHeads: 8, intermediateSize: 3072, tieWordEmbeddings: true })
const QWEN3_8B = qwen3({ numLayers: 36, hiddenSize: 4096, numHeads: 32, numKvHeads: 8, intermediateSize: 12288, tieWordEmbeddings: false })

/** loadModel's sizes on CUDA: 2,048 tokens a pass, 512 logit rows, a 40,960-position cache, 64 sequences. */
const CUDA_SIZES: LoadSizes = {
  maxBatchTokens: 2048,
  maxLogitRows: 512,
  kvBlocks: 2560,
  kvBlockSize: 16,
  tensorParallel: 0,
  decodeWorkspaceRows: 64,
  logitProcessorRows: 64,
}

/**
 * The logit processors' table of 64 sequences at a 151,936-token vocabulary, buffer by buffer:
 * counts u16 [64, V], processed logits f32 [64, V], mask bits i32 [64, V / 32], settings i32
 * [64, 604] (penalties, bias count, 300 id-bias pairs), the processed rows' parameters i32 [64, 8]
 * and choices i32 [64, 2], and the plan i32 [1 + 4 * 64].
 */
const PROCESSORS_64 = 2 * 64 * 151936 + 4 * 64 * 151936 + 4 * 64 * (151936 / 32) + 4 * 64 * 604 + 4 * 64 * 8 + 4 * 64 * 2 + 4 * (1 + 4 * 64)

describe('the bytes a load needs', () => {
  it("Qwen3-0.6B's shapes: weights, KV cache and every other buffer", () => {
    // Weights, element by element (bf16, 2 bytes each); the lm_head is the tied embedding.
    const embed = 151936 * 1024
    const layer =
      2048 * 1024 + // q_proj (16 heads x 128)
      1024 * 1024 + // k_proj (8 heads x 128)
      1024 * 1024 + // v_proj
      1024 * 2048 + // o_proj
      3 * 3072 * 1024 + // gate_proj, up_proj, down_proj
      1024 + 1024 + 128 + 128 // input and post-attention norms, q_norm, k_norm
    const params = embed + 28 * layer + 1024 // + the final norm
    expect(params).toBe(596_049_920) // Qwen3-0.6B's published 0.6B
    const weights = 2 * params // 1,192,099,840

    // KV cache: k and v, 28 layers, 2,560 blocks of 16 positions, 8 kv heads of 128, bf16.
    const kvCache = 2 * 28 * 2560 * 16 * 8 * 128 * 2 // 4,697,620,480 = 4.375 GiB

    // Activations for 2,048 tokens and 512 logit rows.
    const T = 2048
    const bf16 = (...dims: number[]) => 2 * dims.reduce((a, b) => a * b, 1)
    const activations =
      bf16(T, 1024) * 4 + // residual, residualNext, normed, proj
      bf16(T, 2048 + 1024 + 1024) + // q|k|v
      bf16(T, 2048) * 2 + // q (rotated), attn
      bf16(T, 2 * 3072) + // gate|up
      bf16(T, 3072) + // act
      bf16(512, 1024) + // gathered rows
      4 * 512 * 151936 // f32 logits
    // RoPE table f32 [40960, 128]; step inputs: ids, positions, slots (T each), rows (512),
    // query starts (T + 1), sequence lengths (T), block tables (T x 2,560); token choice:
    // parameters (8), results (2 + 2 * 20) and a row map (1) per logit row, all i32.
    const small = 4 * 40960 * 128 + 4 * (3 * T + 512 + (T + 1) + T + T * 2560) + 4 * 512 * (8 + 42 + 1)
    // The decode attention workspace of the largest graph bucket: 64 sequences, 16 heads, 160
    // splits of 256 keys, D + 2 floats per split.
    const workspace = 4 * 64 * 16 * 160 * 130

    // The logit processors' table, one row for each of the 64 sequences: allocated at the first
    // request that uses one, not at load, but counted so that the check reserves it.
    const processors = PROCESSORS_64

    const m = estimateLoadMemory(QWEN3_0_6B, CUDA_SIZES)
    expect(m.weights).toBe(weights)
    expect(m.weights).toBe(1_192_099_840)
    expect(m.kvCache).toBe(kvCache)
    expect(m.kvCache).toBe(4_697_620_480)
    expect(m.other).toEqual([
      { what: 'activations for 2,048 tokens and 512 logit rows', bytes: activations },
      { what: 'RoPE table, step inputs and token-choice buffers', bytes: small },
      { what: 'decode attention workspace (64 sequences at 40,960 positions)', bytes: workspace },
      { what: 'logit processors (penalties, bias, masks) for 64 sequences', bytes: processors },
    ])
    expect([activations, small, workspace, processors]).toEqual([400_293_888, 42_090_500, 85196800, 59_717_124]) // the table: 56.95 MiB
    expect(m.total).toBe(weights + kvCache + activations + small + workspace + processors)
    expect(m.total).toBe(6_477_018_632)
    expect(m.maxPositions).toBe(40960)
  })

  it("Qwen3-8B's shapes, with an untied lm_head", () => {
    const embed = 151936 * 4096
    const layer =
      4096 * 4096 + // q_proj (32 heads x 128)
      1024 * 4096 * 2 + // k_proj, v_proj (8 heads x 128)
      4096 * 4096 + // o_proj
      3 * 12288 * 4096 + // gate_proj, up_proj, down_proj
      4096 * 2 + 128 * 2 // norms
    const params = 2 * embed + 36 * layer + 4096 // embed_tokens, lm_head, final norm
    expect(params).toBe(8_190_735_360) // Qwen3-8B's published 8.2B
    const kvCache = 2 * 36 * 2560 * 16 * 8 * 128 * 2
    const T = 2048
    const activations = 2 * T * (4 * 4096 + (4096 + 2048) + 2 * 4096 + 3 * 12288) + 2 * 512 * 4096 + 4 * 512 * 151936
    const small = 4 * 40960 * 128 + 4 * (5 * T + 512 + 1 + T * 2560) + 4 * 512 * 51
    const workspace = 4 * 64 * 32 * 160 * 130

    const m = estimateLoadMemory(QWEN3_8B, CUDA_SIZES)
    expect(m.weights).toBe(2 * params)
    expect(m.weights).toBe(16_381_470_720)
    expect(m.kvCache).toBe(kvCache)
    expect(m.kvCache).toBe(6_039_797_760)
    expect(m.other.map((o) => o.bytes)).toEqual([activations, small, workspace, PROCESSORS_64])
    expect([activations, small, workspace]).toEqual([592_183_296, 42_090_500, 170_393_600])
    expect(m.total).toBe(2 * params + kvCache + activations + small + workspace + PROCESSORS_64)
  })

  it('the weights from the config equal those from the tensor headers', () => {
    for (const c of [QWEN3_0_6B, QWEN3_8B]) expect(deviceWeightBytes(expectedTensors(c))).toBe(estimateLoadMemory(c, CUDA_SIZES).weights)
    expect(estimateLoadMemory(QWEN3_0_6B, CUDA_SIZES, { weightBytes: 123 }).weights).toBe(123)
  })

  it('the decode workspace follows the decode rows (maxBatchSize), and the CPU has none', () => {
    const workspace = (rows: number) =>
      estimateLoadMemory(QWEN3_0_6B, { ...CUDA_SIZES, decodeWorkspaceRows: rows }).other.find((o) => o.what.startsWith('decode attention workspace'))
        ?.bytes ?? 0
    expect(workspace(0)).toBe(0)
    expect(workspace(1)).toBe(4 * 16 * 160 * 130) // `detinfer generate` and `score`: one sequence
    expect(workspace(64)).toBe(64 * workspace(1))
    expect(workspace(512)).toBe(681_574_400) // what a workspace of 512 rows took, 650 MiB
  })

  it("the logit processors' table follows its rows (maxBatchSize), and a load without any has none", () => {
    const table = (rows: number) =>
      estimateLoadMemory(QWEN3_0_6B, { ...CUDA_SIZES, logitProcessorRows: rows }).other.find((o) => o.what.startsWith('logit processors'))?.bytes ?? 0
    expect(table(0)).toBe(0)
    // A row: counts (2 bytes a token), processed logits (4), mask (a bit), 618 ints of settings,
    // parameters, choice and plan; and the plan's row count, once.
    expect(table(1)).toBe(6 * 151936 + 4 * 4748 + 4 * 618 + 4)
    expect(table(64)).toBe(PROCESSORS_64)
    expect(table(256)).toBe(238_868_484) // 227.80 MiB
  })

  it('the decode workspace follows the attention split size in force at load (a development switch)', () => {
    const at = (split: number) => {
      native().setAttentionSplitSize(split)
      try {
        return estimateLoadMemory(QWEN3_0_6B, CUDA_SIZES).other.find((o) => o.what.startsWith('decode attention workspace'))!.bytes
      } finally {
        native().setAttentionSplitSize(0)
      }
    }
    expect(at(0)).toBe(4 * 64 * 16 * 160 * 130)
    expect(at(64)).toBe(4 * at(0))
    expect(at(4096)).toBe(4 * 64 * 16 * 10 * 130)
  })

  it("Qwen3-8B with loadModel's defaults fits a 24 GiB GPU (an RTX 4090 with 23.5 GiB free), which a 512-row workspace did not", () => {
    const gpu = { free: 23.5 * GiB, total: 24 * GiB, name: 'a 24 GiB GPU' }
    // loadModel's default KV cache: a quarter of the device's memory (k and v of 36 layers x 8 kv heads x 128, bf16).
    const kvBlocks = Math.ceil(Math.floor(gpu.total / 4 / (36 * 8 * 128 * 4)) / 16)
    const sizes = { ...CUDA_SIZES, kvBlocks }
    const fits = checkDeviceMemory('/models/Qwen3-8B', QWEN3_8B, sizes, gpu)
    console.log(`Qwen3-8B, loadModel's CUDA sizes: ${formatBytes(fits.total)} + ${formatBytes(memoryMargin(gpu.total))} margin of ${formatBytes(gpu.free)} free`)
    expect(() => checkDeviceMemory('/models/Qwen3-8B', QWEN3_8B, { ...sizes, decodeWorkspaceRows: 512 }, gpu)).toThrow(DeviceMemoryError)
  })

  it('the KV cache bounds the longest sequence, and with it the RoPE table, step inputs and workspace', () => {
    // 512 blocks: 8,192 positions, fewer than max_position_embeddings (40,960).
    const m = estimateLoadMemory(QWEN3_0_6B, { ...CUDA_SIZES, kvBlocks: 512 })
    expect(m.maxPositions).toBe(8192)
    expect(m.kvCache).toBe(2 * 28 * 8192 * 1024 * 2)
    expect(m.other[1]!.bytes).toBe(4 * 8192 * 128 + 4 * (5 * 2048 + 512 + 1 + 2048 * 512) + 4 * 512 * 51)
    expect(m.other[2]!.bytes).toBe(4 * 64 * 16 * 32 * 130)
    // A cache longer than max_position_embeddings holds more positions but no longer sequences.
    const long = estimateLoadMemory(QWEN3_0_6B, { ...CUDA_SIZES, kvBlocks: 8192 })
    expect(long.kvPositions).toBe(131072)
    expect(long.maxPositions).toBe(40960)
  })

  it('tensorParallel adds the row-parallel partials', () => {
    const plain = estimateLoadMemory(QWEN3_8B, CUDA_SIZES)
    const tp1 = estimateLoadMemory(QWEN3_8B, { ...CUDA_SIZES, tensorParallel: 1 })
    expect(tp1.total - plain.total).toBe(4 * 8 * 2048 * 4096)
    expect(tp1.other.find((o) => o.what === 'row-parallel partials of tensorParallel')?.bytes).toBe(268_435_456)
  })
})

describe('the check against the free memory', () => {
  const H200 = 150_754_820_096
  const name = 'NVIDIA H200'

  it('passes a load that fits with the margin to spare, and returns the estimate', () => {
    const need = estimateLoadMemory(QWEN3_8B, CUDA_SIZES).total
    const margin = memoryMargin(H200)
    expect(margin).toBe(256 * MiB + 1_507_548_201)
    const fits = checkDeviceMemory('/models/Qwen3-8B', QWEN3_8B, CUDA_SIZES, { free: need + margin, total: H200, name })
    expect(fits.total).toBe(need)
    expect(() => checkDeviceMemory('/models/Qwen3-8B', QWEN3_8B, CUDA_SIZES, { free: need + margin - 1, total: H200, name })).toThrow(
      DeviceMemoryError,
    )
  })

  it('names the model, the bytes needed by part, the margin, the free and total bytes and the KV cache that would fit', () => {
    const free = 20 * GiB
    const need = estimateLoadMemory(QWEN3_8B, CUDA_SIZES)
    let error: unknown
    try {
      checkDeviceMemory('/models/Qwen3-8B', QWEN3_8B, CUDA_SIZES, { free, total: H200, name })
    } catch (err) {
      error = err
    }
    expect(error).toBeInstanceOf(DeviceMemoryError)
    const e = error as DeviceMemoryError
    expect(e.name).toBe('DeviceMemoryError')
    expect(e.needs).toEqual({
      weights: 16_381_470_720,
      kvCache: 6_039_797_760,
      other: need.otherBytes,
      margin: memoryMargin(H200),
      free,
      total: H200,
    })
    const m = e.message
    expect(m).toContain('Not enough free memory on GPU 0 (NVIDIA H200) to load the model in /models/Qwen3-8B')
    expect(m).toContain(`it needs ${formatBytes(need.total)} (weights 15.26 GiB in bf16, KV cache 5.63 GiB for 40,960 positions, other 824.34 MiB:`)
    expect(m).toContain('activations for 2,048 tokens and 512 logit rows 564.75 MiB')
    expect(m).toContain('decode attention workspace (64 sequences at 40,960 positions) 162.50 MiB')
    expect(m).toContain('logit processors (penalties, bias, masks) for 64 sequences 56.95 MiB')
    expect(m).toContain('plus a safety margin of 1.65 GiB (256 MiB and 1% of the device')
    expect(m).toContain("but 20.00 GiB of the device's 140.40 GiB are free")
    // The largest KV cache that fits, found independently: every block costs its k and v rows,
    // and what the rest needs shrinks with the positions it bounds.
    const fits = (blocks: number) => estimateLoadMemory(QWEN3_8B, { ...CUDA_SIZES, kvBlocks: blocks }).total + memoryMargin(H200) <= free
    let blocks = 0
    while (fits(blocks + 1)) blocks++
    expect(blocks).toBeGreaterThan(0)
    expect(m).toContain(`A KV cache of at most ${(blocks * 16).toLocaleString('en-US')} positions fits with the rest unchanged`)
    expect(m).toContain(`kvCacheTokens ${(blocks * 16).toLocaleString('en-US')} or kvBlocks ${blocks.toLocaleString('en-US')} (now 40,960 positions`)
    expect(m).toContain('`--kv-cache-tokens` of `detinfer generate`, `score` and `serve`')
    expect(m).toContain('maxBatchTokens (tokens per forward pass, now 2,048; `detinfer serve --max-batch-tokens`)')
    expect(m).toContain(
      'and the 162.50 MiB decode attention workspace and the 56.95 MiB logit-processor table with maxBatchSize (sequences decoded together, now 64; `detinfer serve --max-batch-size`).',
    )
  })

  it('says when the weights alone do not fit, and that there is no smaller dtype and no multi-GPU tensor parallelism', () => {
    const total = 24 * GiB
    expect(() => checkDeviceMemory('/models/Qwen3-8B', QWEN3_8B, CUDA_SIZES, { free: 15 * GiB, total, name: 'NVIDIA L4' })).toThrow(
      /weights 15\.26 GiB in bf16.*but 15\.00 GiB of the device's 24\.00 GiB are free\. The weights alone do not fit: detinfer holds them in bf16 \(fp16 and fp32 files are converted; there is no smaller dtype\) on one GPU \(tensor parallelism over several GPUs is not in this build\)/,
    )
  })

  it('says when not even one KV-cache block fits beside the other buffers', () => {
    const total = 24 * GiB
    const margin = memoryMargin(total)
    const free = estimateLoadMemory(QWEN3_8B, CUDA_SIZES).weights + margin + 100 * MiB // less than the activations
    const message = (() => {
      try {
        checkDeviceMemory('/m', QWEN3_8B, CUDA_SIZES, { free, total })
      } catch (err) {
        return (err as Error).message
      }
      return ''
    })()
    expect(message).toContain('Not enough free memory on GPU 0 to load the model in /m')
    expect(message).toContain('Even a KV cache of one block does not fit beside the other buffers.')
    expect(message).toContain('maxBatchTokens')
  })

  it('leaves maxBatchSize out of the advice at one sequence, as generate and score load', () => {
    const sizes = { ...CUDA_SIZES, decodeWorkspaceRows: 1, logitProcessorRows: 1 }
    expect(() => checkDeviceMemory('/m', QWEN3_0_6B, sizes, { free: 4 * GiB, total: 8 * GiB })).toThrow(/`detinfer serve --max-batch-tokens`\)\.$/)
  })

  it('leaves the decode workspace and the logit-processor table out of the advice when the load has neither', () => {
    const sizes = { ...CUDA_SIZES, decodeWorkspaceRows: 0, logitProcessorRows: 0 }
    expect(() => checkDeviceMemory('/m', QWEN3_0_6B, sizes, { free: 4 * GiB, total: 8 * GiB })).toThrow(/`detinfer serve --max-batch-tokens`\)\.$/)
  })
})

// ---------------------------------------------------------------------------------------------
// Against the real allocations (CPU backend)

let root: string
let count = 0
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'detinfer-load-memory-'))
})
afterAll(() => rmSync(root, { recursive: true, force: true }))
afterEach(() => {
  vi.restoreAllMocks()
})
const fresh = (spec: TinyModelSpec) => writeTinyModel(join(root, `m${count++}`), spec)

/** Every tensor a loaded Transformer holds (its private fields), each once. */
function heldTensors(model: Transformer): Set<NativeTensor> {
  const m = model as unknown as Record<string, unknown>
  const all = new Set<NativeTensor>()
  const walk = tensorWalk(all)
  for (const key of ['weights', 'cache', 'act', 'cosSin', 'tp']) walk(m[key])
  const head = m['head'] as Record<string, unknown>
  for (const key of ['params', 'out', 'remap']) walk(head[key])
  walk((m['inputs'] as Record<string, unknown>)['buffer'])
  return all
}

/** Adds to `into` every tensor found in what it is given, through objects and arrays. */
function tensorWalk(into: Set<NativeTensor>): (x: unknown) => void {
  const walk = (x: unknown): void => {
    if (!x || typeof x !== 'object') return
    if ('nbytes' in x && 'dispose' in x && 'shape' in x) {
      into.add(x as NativeTensor)
      return
    }
    for (const [key, v] of Object.entries(x)) if (key !== 'gatherIds') walk(v) // gather ids: made per step shape, 8 bytes a row
  }
  return walk
}

const bytesOf = (tensors: Set<NativeTensor>) => [...tensors].reduce((s, t) => s + t.nbytes, 0)

// o_proj's K = 8 heads of 16 = 8 partitions of 16, as tensor parallelism needs.
const TP_SPEC: TinyModelSpec = { architecture: 'LlamaForCausalLM', hiddenSize: 64, numHeads: 8, numKvHeads: 8, headDim: 16, intermediateSize: 128, vocabSize: 280 }

const SPECS: { name: string; spec: TinyModelSpec; tensorParallel?: number; unfusedLayers?: boolean }[] = [
  { name: 'qwen3, tied embeddings', spec: { architecture: 'Qwen3ForCausalLM', headDim: 32, tieWordEmbeddings: true } },
  { name: 'qwen3, unfused layers', spec: { architecture: 'Qwen3ForCausalLM', headDim: 32 }, unfusedLayers: true },
  { name: 'qwen2, q/k/v biases', spec: { architecture: 'Qwen2ForCausalLM', numKvHeads: 1, dtype: 'F16' } },
  { name: 'llama, tensorParallel 1', spec: TP_SPEC, tensorParallel: 1 },
  { name: 'llama with attention biases, tensorParallel 2', spec: { ...TP_SPEC, attentionBias: true }, tensorParallel: 2 },
  { name: 'qwen3, tensorParallel 4', spec: { ...TP_SPEC, architecture: 'Qwen3ForCausalLM' }, tensorParallel: 4 },
  { name: 'mistral, a cache longer than max_position_embeddings', spec: { architecture: 'MistralForCausalLM', maxPositions: 64 } },
]

describe('the estimate against what Transformer.load allocates', () => {
  for (const { name, spec, tensorParallel, unfusedLayers } of SPECS) {
    it(`${name}: the same bytes (the logit processors' table at its first use)`, async () => {
      const tiny = fresh(spec)
      const sizes = { maxBatchTokens: 48, maxLogitRows: 12, kvBlocks: 10, kvBlockSize: 8 }
      const model = await Transformer.load(tiny.dir, {
        device: 'cpu',
        ...sizes,
        cudaGraphs: false,
        ...(tensorParallel !== undefined && { tensorParallel }),
        ...(unfusedLayers && { unfusedLayers }),
      })
      try {
        const config = await loadModelConfig(tiny.dir)
        expect(model.logitProcessorRows).toBe(12) // min(maxBatchTokens, maxLogitRows)
        const m = estimateLoadMemory(config, {
          ...sizes,
          tensorParallel: tensorParallel ?? 0,
          decodeWorkspaceRows: 0,
          logitProcessorRows: 12,
          unfusedLayers: unfusedLayers === true,
        })
        // The table is in the estimate but not in the load: the first request that uses it allocates it.
        const table = m.other.find((o) => o.what === 'logit processors (penalties, bias, masks) for 12 sequences')!
        expect(bytesOf(heldTensors(model))).toBe(m.total - table.bytes)
        const head = (model as unknown as { head: OutputHead }).head
        const allocated = new Set<NativeTensor>()
        tensorWalk(allocated)(head.processorTable())
        expect(bytesOf(allocated)).toBe(table.bytes)
      } finally {
        model.dispose()
      }
    })
  }

  it('loadWeights shows the checked tensors before uploading any, and a throw there uploads nothing', async () => {
    const tiny = fresh({ architecture: 'Qwen3ForCausalLM', headDim: 32 })
    const config = await loadModelConfig(tiny.dir)
    const fromBuffer = vi.spyOn(native(), 'fromBuffer')
    let seen = 0
    const refused = new Error('refused before the upload')
    await expect(
      loadWeights(tiny.dir, config, 'cpu', {
        beforeUpload: (tensors) => {
          seen = deviceWeightBytes(tensors)
          throw refused
        },
      }),
    ).rejects.toBe(refused)
    expect(fromBuffer).not.toHaveBeenCalled()
    expect(seen).toBe(
      estimateLoadMemory(config, { maxBatchTokens: 1, maxLogitRows: 1, kvBlocks: 1, kvBlockSize: 1, tensorParallel: 0, decodeWorkspaceRows: 0, logitProcessorRows: 0 }).weights,
    )
  })
})

describe('an allocation that fails during a load', () => {
  /** Makes the `nth` call of native().`op` throw the addon's out-of-memory error; records what the others made. */
  function failOn(op: 'fromBuffer' | 'empty', nth: number): NativeTensor[] {
    const n = native()
    const made: NativeTensor[] = []
    const real = { fromBuffer: n.fromBuffer.bind(n), empty: n.empty.bind(n) }
    let calls = 0
    vi.spyOn(n, 'fromBuffer').mockImplementation((...args) => {
      if (op === 'fromBuffer' && ++calls === nth) throw new Error('out of GPU memory allocating 786432 bytes (3 MiB free of 81559 MiB): out of memory')
      const t = real.fromBuffer(...args)
      made.push(t)
      return t
    })
    vi.spyOn(n, 'empty').mockImplementation((...args) => {
      if (op === 'empty' && ++calls === nth) throw new Error('out of GPU memory allocating 786432 bytes (3 MiB free of 81559 MiB): out of memory')
      const t = real.empty(...args)
      made.push(t)
      return t
    })
    return made
  }

  it('during the weights: frees those uploaded and names the tensor', async () => {
    const tiny = fresh({ architecture: 'Qwen3ForCausalLM', headDim: 32, numLayers: 3 })
    const made = failOn('fromBuffer', 6) // embed, then layer 0: input norm, q|k|v, o_proj, q_norm, k_norm
    await expect(Transformer.load(tiny.dir, { device: 'cpu', maxBatchTokens: 8, kvBlocks: 4 })).rejects.toThrow(
      `Could not load tensor model.layers.0.self_attn.k_norm.weight onto cpu (bf16 [32], 64 bytes) while loading the model in ${tiny.dir}: out of GPU memory allocating`,
    )
    expect(made.length).toBe(5)
    expect(made.every((t) => t.disposed)).toBe(true)
  })

  it('during a concatenated weight: names its parts', async () => {
    const tiny = fresh({ architecture: 'LlamaForCausalLM', numLayers: 2 })
    const made = failOn('fromBuffer', 3) // embed, layer 0's input norm, then q|k|v
    await expect(Transformer.load(tiny.dir, { device: 'cpu', maxBatchTokens: 8, kvBlocks: 4 })).rejects.toThrow(
      'Could not load tensors model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.k_proj.weight, ' +
        'model.layers.0.self_attn.v_proj.weight (concatenated) onto cpu (bf16 [128, 64], 16384 bytes)',
    )
    expect(made.every((t) => t.disposed)).toBe(true)
  })

  it('after the weights: frees the weights and the buffers made so far and names the buffer', async () => {
    const tiny = fresh({ architecture: 'Qwen3ForCausalLM', headDim: 32, numLayers: 3 })
    const made = failOn('empty', 4) // the KV cache: layer 0's keys and values, layer 1's keys, then its values
    await expect(Transformer.load(tiny.dir, { device: 'cpu', maxBatchTokens: 8, kvBlocks: 4 })).rejects.toThrow(
      `Could not allocate the KV cache's values of layer 1 on cpu (bf16 [4, 16, 2, 32], 8192 bytes) while loading the model in ${tiny.dir}`,
    )
    expect(made.length).toBeGreaterThan(3 * 8) // the weights, the RoPE table and three cache tensors
    expect(made.every((t) => t.disposed)).toBe(true)
  })

  it("in a tensor-parallel rank's copy of a layer: names the rank, the layer and the weight, and frees everything", async () => {
    const tiny = fresh({ architecture: 'Qwen3ForCausalLM', headDim: 32, numLayers: 2, intermediateSize: 256, vocabSize: 280 })
    const n = native()
    const real = n.fromBuffer.bind(n)
    const made: NativeTensor[] = []
    // The first rank's q|k|v rows: (4 q heads + 2 * 2 kv heads) * 32 / 2 ranks = 128, by hidden 64.
    vi.spyOn(n, 'fromBuffer').mockImplementation((...args) => {
      if (args[2].length === 2 && args[2][0] === 128 && args[2][1] === 64) throw new Error('out of memory (a stand-in)')
      const t = real(...args)
      made.push(t)
      return t
    })
    await expect(Transformer.load(tiny.dir, { device: 'cpu', maxBatchTokens: 8, kvBlocks: 4, tensorParallel: 2 })).rejects.toThrow(
      `Could not upload rank 0's copy of layer 0's q|k|v projection to cpu (bf16 [128, 64], 16384 bytes) while loading the model in ${tiny.dir}: out of memory (a stand-in)`,
    )
    expect(made.length).toBeGreaterThan(10)
    expect(made.every((t) => t.disposed)).toBe(true)
  })

  it('in the step buffers: names the buffer', async () => {
    const tiny = fresh({ architecture: 'Qwen3ForCausalLM', headDim: 32, numLayers: 1 })
    const made = failOn('empty', 2 + 5) // the KV cache (2), then residual, residualNext, normed, proj, qkv
    await expect(Transformer.load(tiny.dir, { device: 'cpu', maxBatchTokens: 8, kvBlocks: 4 })).rejects.toThrow(
      'Could not allocate the step buffer qkv on cpu (bf16 [8, 256], 4096 bytes)',
    )
    expect(made.every((t) => t.disposed)).toBe(true)
  })
})
