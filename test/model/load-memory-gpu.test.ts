// The device memory check on a real GPU: a load refused for lack of free memory (a smaller free
// figure given through the loader's internal reading) leaves the device's memory as it was; an
// allocation that fails midway through a load frees what the load made and names what failed; and
// the estimate is what a load takes from the device. loadModelFrom hands the check the reading it is given.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { loadModelFrom, readModelDir } from '../../lib/api.js'
import { DeviceMemoryError } from '../../lib/errors.js'
import { loadModelConfig } from '../../lib/model/config.js'
import { estimateLoadMemory, memoryMargin, type DeviceMemory, type LoadSizes } from '../../lib/model/load-memory.js'
import { Transformer, type TransformerOptions } from '../../lib/model/transformer.js'
import { native, type NativeTensor } from '../../lib/native.js'
import type { TokenChoice } from '../../lib/sampling.js'
import { describeGpu } from '../helpers/gpu.js'
import { writeTinyModel } from '../helpers/tiny-model.js'

const MiB = 2 ** 20
const GiB = 2 ** 30

let root: string
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'detinfer-load-memory-gpu-'))
})
afterAll(() => rmSync(root, { recursive: true, force: true }))

/** Plenty of free memory, whatever the device has: the check passes and the allocations decide. */
const plenty = (): DeviceMemory => ({ free: 2 ** 50, total: 2 ** 50 })

describeGpu('the device memory check on CUDA', () => {
  // Head dim 64, which the CUDA attention kernels take; about 116 MiB of weights in 4 layers.
  let dir: string
  beforeAll(() => {
    dir = writeTinyModel(join(root, 'model'), {
      architecture: 'LlamaForCausalLM',
      hiddenSize: 1024,
      intermediateSize: 4096,
      numLayers: 4,
      numHeads: 16,
      numKvHeads: 4,
      headDim: 64,
      maxPositions: 4096,
    }).dir
  })
  const opts = (extra: Partial<TransformerOptions> = {}): TransformerOptions => ({
    device: 'cuda',
    maxBatchTokens: 128,
    maxLogitRows: 64,
    kvBlocks: 256,
    kvBlockSize: 16,
    ...extra,
  })

  it('refuses a load that the free memory cannot hold before uploading anything, and the memory stays as it was', async () => {
    const before = native().memoryInfo()
    const small = (): DeviceMemory => ({ ...native().memoryInfo(), free: 64 * MiB })
    const error = await Transformer.load(dir, opts({ deviceMemory: small })).catch((err: unknown) => err)
    expect(error).toBeInstanceOf(DeviceMemoryError)
    const message = (error as Error).message
    console.log(message)
    expect(message).toContain(`Not enough free memory on GPU 0 to load the model in ${dir}: it needs`)
    expect(message).toContain("but 64.00 MiB of the device's")
    expect(message).toContain('The weights alone do not fit')
    // Nothing was allocated (1 MiB of slack for another process on the GPU).
    expect(Math.abs(native().memoryInfo().free - before.free)).toBeLessThan(MiB)
  })

  it('names the device and the KV cache that would fit when the free memory is short of the cache', async () => {
    const config = await loadModelConfig(dir)
    const sizes: LoadSizes = { maxBatchTokens: 128, maxLogitRows: 64, kvBlocks: 256, kvBlockSize: 16, tensorParallel: 0, decodeWorkspaceRows: 64, logitProcessorRows: 64 }
    const need = estimateLoadMemory(config, sizes)
    const { total } = native().memoryInfo()
    const margin = 256 * MiB + Math.ceil(total / 100)
    const short = (): DeviceMemory => ({ free: need.total + margin - need.kvCache / 2, total, name: native().cudaStatus().devices[0]!.name })
    const error = await Transformer.load(dir, opts({ deviceMemory: short })).catch((err: unknown) => err)
    expect(error).toBeInstanceOf(DeviceMemoryError)
    expect((error as Error).message).toContain(`Not enough free memory on GPU 0 (${native().cudaStatus().devices[0]!.name})`)
    expect((error as Error).message).toMatch(/A KV cache of at most [\d,]+ positions fits with the rest unchanged/)
  })

  it('loadModelFrom gives the check the reading it is handed: the margin is that of the total read (bench/fits.mjs, a smaller card)', async () => {
    const total = 24 * GiB
    const card = (): DeviceMemory => ({ free: 64 * MiB, total })
    const error = await loadModelFrom(await readModelDir(dir), { device: 'cuda' }, card).catch((err: unknown) => err)
    expect(error).toBeInstanceOf(DeviceMemoryError)
    expect((error as DeviceMemoryError).needs).toMatchObject({ free: 64 * MiB, total, margin: memoryMargin(total) })
  })

  it('an allocation that fails after the weights frees them and what came after, and names the tensor', async () => {
    const before = native().memoryInfo()
    // KV-cache tensors of two sevenths of the free memory each: layer 0's keys and values and
    // layer 1's keys fit, its values do not.
    const perBlock = 16 * 4 * 64 * 2
    const kvBlocks = Math.ceil((before.free * 2) / 7 / perBlock)
    const error = await Transformer.load(dir, opts({ kvBlocks, deviceMemory: plenty })).catch((err: unknown) => err)
    expect(error).toBeInstanceOf(Error)
    const message = (error as Error).message
    console.log(message)
    expect(message).toContain(`Could not allocate the KV cache's values of layer 1 on cuda (bf16 [${kvBlocks}, 16, 4, 64]`)
    expect(message).toContain(`while loading the model in ${dir}: out of GPU memory allocating`)
    const after = native().memoryInfo()
    expect(Math.abs(after.free - before.free)).toBeLessThan(8 * MiB)
  })

  it('an upload that fails midway through the weights frees those uploaded, and names the tensor', async () => {
    // Fill the device until less than half the weights' 116 MiB stays free.
    const fill: NativeTensor[] = []
    const n = native()
    const before = n.memoryInfo()
    try {
      let free = before.free
      while (free > 56 * MiB) {
        const elements = free > 2 * GiB ? Math.floor((free - GiB) / 2) : 4 * MiB
        fill.push(n.empty('cuda', 'bf16', [elements]))
        free = n.memoryInfo().free
      }
      const held = n.memoryInfo()
      console.log(`filled: ${held.free} bytes free of ${held.total}`)
      const error = await Transformer.load(dir, opts({ deviceMemory: plenty })).catch((err: unknown) => err)
      expect(error).toBeInstanceOf(Error)
      const message = (error as Error).message
      console.log(message)
      expect(message).toMatch(/^Could not load tensors? model\.layers\.\d+\.\S+ /)
      expect(message).toContain(`onto cuda (bf16 [`)
      expect(message).toContain('out of GPU memory allocating')
      expect(Math.abs(n.memoryInfo().free - held.free)).toBeLessThan(8 * MiB)
    } finally {
      for (const t of fill) t.dispose()
    }
    expect(Math.abs(n.memoryInfo().free - before.free)).toBeLessThan(8 * MiB)
  })

  it('a load takes what the estimate says, and decode steps replayed as graphs never touch the process workspace', async () => {
    const config = await loadModelConfig(dir)
    const kvBlocks = 20_480 // 160 MiB a layer's keys or values (whole 2 MiB pages of the pool): 1.25 GiB in all
    // 64 decode rows at 4,096 positions: a 4.06 MiB workspace (16 heads, 16 splits, 66 floats each).
    const sizes: LoadSizes = { maxBatchTokens: 128, maxLogitRows: 64, kvBlocks, kvBlockSize: 16, tensorParallel: 0, decodeWorkspaceRows: 64, logitProcessorRows: 64 }
    // Two sequences past their first split (so the partials go through the workspace): the
    // bucket runs eagerly, is captured, then replayed.
    const greedy: TokenChoice = { temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: 0, target: -1 }
    const table = (first: number) => Array.from({ length: 40 }, (_, i) => first + i)
    const decode = async (model: Transformer) => {
      for (let step = 0; step < 3; step++)
        await model.step(
          [
            { tokens: [1 + step], startPosition: 600 + step, blockTable: table(0), logits: 'last' },
            { tokens: [2 + step], startPosition: 300 + step, blockTable: table(40), logits: 'last' },
          ],
          [greedy, greedy],
          0,
        )
    }
    // A first load, with the same steps, brings in the kernels' code: CUDA loads each kernel
    // lazily, at its first launch, and keeps it for the process's life.
    const start = native().memoryInfo()
    const first = await Transformer.load(dir, opts({ kvBlocks }))
    await decode(first).finally(() => first.dispose())
    const before = native().memoryInfo()
    console.log(`the first load and its steps left ${((start.free - before.free) / MiB).toFixed(1)} MiB taken (kernel code)`)
    const model = await Transformer.load(dir, opts({ kvBlocks }))
    try {
      const loaded = native().memoryInfo()
      const estimate = estimateLoadMemory(config, sizes)
      expect(estimate.other.find((o) => o.what.startsWith('decode attention workspace'))?.bytes).toBe(4 * 64 * 16 * 16 * 66)
      // The logit processors' table is in the estimate (the check reserves it) but not in the
      // load: the first request that uses it allocates it (about 0.25 MiB here, 64 rows of the
      // tiny vocabulary; load-memory.test.ts holds its bytes to what it allocates).
      const atFirstUse = estimate.other.find((o) => o.what === 'logit processors (penalties, bias, masks) for 64 sequences')!.bytes
      const atLoad = estimate.total - atFirstUse
      const taken = before.free - loaded.free
      console.log(`a load took ${taken} bytes; the estimate of what it allocates is ${atLoad}`)
      // The pool rounds allocations up to its pages, and small ones share a page.
      expect(Math.abs(taken - atLoad)).toBeLessThan(32 * MiB)

      // The steps, eager, captured and replayed, never grow the process's workspace.
      const held = native().memoryInfo().decodeWorkspace
      await decode(model)
      expect(model.graphStats()!.captured.map((c) => [c.rows, c.context])).toEqual([[2, 1024]])
      expect(native().memoryInfo().decodeWorkspace).toBe(held)
    } finally {
      model.dispose()
    }
    // Disposal gives it all back, the graphs' memory included.
    const after = native().memoryInfo()
    console.log(`after the second model's disposal: ${((before.free - after.free) / MiB).toFixed(1)} MiB short of before it`)
    expect(Math.abs(after.free - before.free)).toBeLessThan(8 * MiB)
  })
})
