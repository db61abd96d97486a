// Decode steps padded to graph buckets, and replayed as CUDA graphs: the same bits as launching
// every op of the unpadded step. On the CPU the padded buckets run eagerly (cudaGraphs: true
// there means exactly that), which proves that padding rows never touch a real row; on a GPU the
// buckets are captured and replayed. The variant twin shows that padding would change real rows if
// the kernels were not batch-invariant.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { setVariantKernels } from '../../lib/device.js'
import type { DeviceName } from '../../lib/native.js'
import { batchBuckets, contextBuckets } from '../../lib/model/decode-graphs.js'
import { layoutDecode } from '../../lib/model/step-layout.js'
import { Transformer } from '../../lib/model/transformer.js'
import type { SamplingParams } from '../../lib/sampling.js'
import { Scheduler, type ForwardModel } from '../../lib/scheduler.js'
import type { LaunchedStep } from '../../lib/step.js'
import { describeGpu } from '../helpers/gpu.js'
import { mulberry32 } from '../helpers/random.js'
import { writeTinyModel } from '../helpers/tiny-model.js'

let dir: string
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'detinfer-graphs-'))
  writeTinyModel(dir, { architecture: 'Qwen3ForCausalLM', hiddenSize: 128, intermediateSize: 256, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 64, maxPositions: 1024, seed: 9 })
})
afterAll(() => {
  setVariantKernels(false)
  rmSync(dir, { recursive: true, force: true })
})

interface Run {
  tokens: number[]
  logprobs: Float32Array
  top: string
}

/**
 * A workload of mixed prompts (some sampled, some with top log-probs) arriving in two waves. With
 * `stops`, a request also ends when its consumer says so (after 3 tokens, at a token divisible by 13),
 * so that sequences end at steps the scheduler could not foresee.
 */
async function workload(model: ForwardModel, maxBatchSize: number, stops = false, launchAhead = true): Promise<Run[]> {
  const rand = mulberry32(77)
  const scheduler = new Scheduler(model, { maxBatchSize, prefillChunkSize: 32, launchAhead })
  const requests = Array.from({ length: 11 }, (_, i) => {
    const prompt = Array.from({ length: 3 + Math.floor(rand() * 60) }, () => Math.floor(rand() * 260))
    const sampling: SamplingParams | null = i % 3 === 1 ? { temperature: 0.8, topK: 0, topP: 0.9, minP: 0, seed: i } : null
    return { prompt, sampling, maxTokens: 6 + (i % 5) * 5, topLogprobs: i % 4 === 0 ? 3 : 0 }
  })
  const run = (r: (typeof requests)[number]) => {
    const out: Run = { tokens: [], logprobs: new Float32Array(0), top: '' }
    const lps: number[] = []
    const done = scheduler.submit({
      kind: 'generate',
      ...r,
      onToken(token, logprob, top) {
        out.tokens.push(token)
        lps.push(logprob)
        if (top) out.top += top.map((t) => `${t.token}:${t.logprob}`).join(',') + ';'
        return !(stops && out.tokens.length >= 3 && token % 13 === 0)
      },
    }).done
    return done.then(() => {
      out.logprobs = Float32Array.from(lps)
      return out
    })
  }
  const first = requests.slice(0, 6).map(run)
  await new Promise((r) => setTimeout(r, 0))
  const second = requests.slice(6).map(run)
  const results = await Promise.all([...first, ...second])
  await scheduler.close(new Error('done'))
  return results
}

function bits(runs: Run[]): string[] {
  return runs.map((r) => `${r.tokens.join(',')}|${Buffer.from(r.logprobs.buffer).toString('hex')}|${r.top}`)
}

/** The model without launch(): the scheduler runs its steps one after another. */
function oneAtATime(model: Transformer): ForwardModel {
  const m = Object.create(model) as Omit<Transformer, 'launch'> & { launch?: Transformer['launch'] }
  m.launch = undefined
  m.step = (chunks, choices, topN) => model.step(chunks, choices, topN)
  return m
}

/**
 * The model with launch(), counting the steps launched after another (tokens taken on the device),
 * and those of them that take the tokens of some rows only (sequences that end drop out).
 */
function counted(model: Transformer, counter: { ahead: number; remapped: number }, takeIds = true): ForwardModel {
  const m = Object.create(model) as Transformer
  m.step = (chunks, choices, topN) => model.step(chunks, choices, topN)
  m.launch = (chunks, choices, topN, after?: LaunchedStep, afterRows?: readonly number[]) => {
    if (after) counter.ahead++
    if (afterRows) counter.remapped++
    // takeIds false, the variant twin: the chained step reads the chunks' placeholder tokens.
    return takeIds ? model.launch(chunks, choices, topN, after, afterRows) : model.launch(chunks, choices, topN)
  }
  return m
}

/** Steps launched ahead give the bits of steps run one after another (CPU and GPU alike). */
async function expectAheadMatches(model: Transformer) {
  for (const stops of [false, true]) {
    const counter = { ahead: 0, remapped: 0 }
    const ahead = bits(await workload(counted(model, counter), 6, stops))
    expect(counter.ahead).toBeGreaterThan(stops ? 4 : 10)
    expect(counter.remapped).toBeGreaterThan(0)
    expect(ahead).toEqual(bits(await workload(oneAtATime(model), 6, stops)))
    // launchAhead: false, with the same model: no step is launched ahead, and the same bits.
    const off = { ahead: 0, remapped: 0 }
    expect(bits(await workload(counted(model, off), 6, stops, false))).toEqual(ahead)
    expect(off.ahead).toBe(0)
  }
}

const load = (device: DeviceName, cudaGraphs: boolean) =>
  Transformer.load(dir, { device, maxBatchTokens: 128, kvBlocks: 200, kvBlockSize: 16, maxLogitRows: 64, cudaGraphs })

describe('decode buckets', () => {
  it('pad batch sizes up to 1, 2, 4, 8, 16, 24, 32, 48, 64, ... and contexts up to doubling sizes from 256', () => {
    expect(batchBuckets(64)).toEqual([1, 2, 4, 8, 16, 24, 32, 48, 64])
    expect(batchBuckets(50)).toEqual([1, 2, 4, 8, 16, 24, 32, 48, 50])
    expect(contextBuckets(1024)).toEqual([256, 512, 1024])
    expect(contextBuckets(1000)).toEqual([256, 512, 1000])
  })

  it('lay out padding rows with slot -1, position 0 and one key', () => {
    const chunks = [
      { tokens: [7], startPosition: 20, blockTable: [3, 5], logits: 'last' as const },
      { tokens: [9], startPosition: 0, blockTable: [4], logits: 'last' as const },
    ]
    const l = layoutDecode(chunks, 4, 2, 256, 16)
    const T = 4
    const ints = Array.from(l.packed)
    expect(ints.slice(0, T)).toEqual([7, 9, 0, 0]) // ids
    expect(ints.slice(T, 2 * T)).toEqual([20, 0, 0, 0]) // positions
    expect(ints.slice(2 * T, 3 * T)).toEqual([5 * 16 + 4, 4 * 16, -1, -1]) // slots
    expect(ints.slice(4 * T + T + 1, 4 * T + T + 1 + T)).toEqual([21, 1, 1, 1]) // seqLens
    expect(ints.slice(4 * T + 2 * T + 1)).toEqual([3, 5, 4, 0, 0, 0, 0, 0]) // block tables
    expect(l.rowsPerChunk).toEqual([1, 1])
  })
})

describe('padded decode buckets on the CPU backend', () => {
  it('give the bits of unpadded steps: greedy, sampled and top log-probs, in mixed batches', async () => {
    const [padded, plain] = await Promise.all([load('cpu', true), load('cpu', false)])
    try {
      expect(bits(await workload(padded, 6))).toEqual(bits(await workload(plain, 6)))
      expect(padded.graphStats()?.captured).toEqual([])
    } finally {
      padded.dispose()
      plain.dispose()
    }
  })

  it('maxDecodeRows bounds the buckets; larger decode steps run unpadded, with the same bits', async () => {
    const small = await Transformer.load(dir, { device: 'cpu', maxBatchTokens: 128, kvBlocks: 200, kvBlockSize: 16, maxLogitRows: 64, maxDecodeRows: 4, cudaGraphs: true })
    const plain = await load('cpu', false)
    try {
      expect(small.maxDecodeRows).toBe(4)
      expect(small.graphStats()?.batchBuckets).toEqual([1, 2, 4])
      // 6 sequences at once: steps of 5 and 6 decode rows are past the largest bucket.
      expect(bits(await workload(small, 6))).toEqual(bits(await workload(plain, 6)))
      await expect(
        Transformer.load(dir, { device: 'cpu', maxBatchTokens: 128, kvBlocks: 200, maxLogitRows: 64, maxDecodeRows: 65 }),
      ).rejects.toThrow(/maxDecodeRows/)
    } finally {
      small.dispose()
      plain.dispose()
    }
  })

  it('steps launched before the previous one is read back give the bits of steps one at a time', async () => {
    for (const graphs of [true, false]) {
      const model = await load('cpu', graphs)
      try {
        await expectAheadMatches(model)
      } finally {
        model.dispose()
      }
    }
  })

  it('launch() checks the rows a chained step takes its tokens from', async () => {
    const model = await load('cpu', true)
    try {
      const greedy = { temperature: 0, topK: 0, topP: 1, minP: 0, seed: 0, position: 1, target: -1 }
      const chunk = (block: number, start: number) => ({ tokens: [7], startPosition: start, blockTable: [block], logits: 'last' as const })
      const first = model.launch([chunk(0, 0), chunk(1, 0)], [greedy, greedy], 0)
      expect(() => model.launch([chunk(0, 1)], [greedy], 0, first, [2])).toThrow(/afterRows\[0\]/)
      expect(() => model.launch([chunk(0, 1)], [greedy], 0, first)).toThrow(/Expected 2 decode chunks/)
      expect(() => model.launch([chunk(0, 1)], [greedy], 0, undefined, [0])).toThrow(/needs a launched step/)
      const second = model.launch([chunk(1, 1)], [greedy], 0, first, [1])
      const [a, b] = await Promise.all([first.tokens, second.tokens])
      expect(a.ids.length).toBe(2)
      expect(b.ids.length).toBe(1)
    } finally {
      model.dispose()
    }
  })

  it('variant twin: a chained step that does not take the previous tokens on the device changes the completions', async () => {
    const model = await load('cpu', true)
    try {
      const counter = { ahead: 0, remapped: 0 }
      const broken = bits(await workload(counted(model, counter, false), 6))
      expect(counter.ahead).toBeGreaterThan(10)
      const plain = bits(await workload(oneAtATime(model), 6))
      expect(broken.some((x, i) => x !== plain[i])).toBe(true)
    } finally {
      model.dispose()
    }
  })

  it('variant twin: under the variant kernels padding changes some real rows', async () => {
    const [padded, plain] = await Promise.all([load('cpu', true), load('cpu', false)])
    setVariantKernels(true)
    try {
      const a = bits(await workload(padded, 6))
      const b = bits(await workload(plain, 6))
      expect(a.some((x, i) => x !== b[i])).toBe(true)
    } finally {
      setVariantKernels(false)
      padded.dispose()
      plain.dispose()
    }
  })
})

describeGpu('CUDA graphs', () => {
  it('replayed decode steps give the bits of eager steps, with prefill and mixed steps eager', async () => {
    const [graphs, eager] = await Promise.all([load('cuda', true), load('cuda', false)])
    try {
      expect(bits(await workload(graphs, 6))).toEqual(bits(await workload(eager, 6)))
      const stats = graphs.graphStats()!
      console.log(`captured ${stats.captured.map((c) => `${c.rows}x${c.context} (${c.bytes} B)`).join(', ')}`)
      expect(stats.captured.length).toBeGreaterThan(0)
      expect(eager.graphStats()).toBeNull()
      await expectAheadMatches(graphs)
      await expectAheadMatches(eager)
    } finally {
      graphs.dispose()
      eager.dispose()
    }
  })
})

describeGpu('dispose', () => {
  it('gives the KV cache, the buffers and the captured graphs back to the GPU', async () => {
    const { native } = await import('../../lib/native.js')
    // A KV cache of 20,000 blocks (312.5 MiB), so that the load is plain to see.
    const open = () => Transformer.load(dir, { device: 'cuda', maxBatchTokens: 128, kvBlocks: 20000, kvBlockSize: 16, maxLogitRows: 64, cudaGraphs: true })
    // A first model loads the kernels' code (CUDA loads modules lazily) and sizes the token
    // choice's workspace: memory the process keeps, whichever model comes next.
    const first = await open()
    await workload(first, 6)
    first.dispose()
    const before = native().memoryInfo().free
    const model = await open()
    await workload(model, 6)
    const loaded = native().memoryInfo().free
    expect(model.graphStats()!.captured.length).toBeGreaterThan(0)
    model.dispose()
    const after = native().memoryInfo().free
    console.log(`free GPU memory: ${before} before load, ${loaded} loaded, ${after} after dispose`)
    // Most of the KV cache shows as a drop in free memory; part of it may come from memory the
    // allocator kept after the first model (an H200 run measured 288 MiB of the 312.5).
    expect(before - loaded).toBeGreaterThan(256 * 2 ** 20)
    // Within 8 MiB of where it started (the CUDA context's own allocations may move a little).
    expect(Math.abs(before - after)).toBeLessThan(8 * 2 ** 20)
  })
})
