// Row reductions over fp32 logits: log_softmax, argmax, token_logprobs. Reference tests
// (float64; GPU also against the CPU backend), the lowest-index tie-break, the bitwise agreement of
// token_logprobs with log_softmax, and bitwise invariance of each row across row counts.
import { describe, expect, it } from 'vitest'
import { native, type DeviceName } from '../../lib/native.js'
import { readBytes, readF32, readI32, tensorFrom } from '../../lib/tensor.js'
import { describeGpu } from '../helpers/gpu.js'
import { randomArray, randomInts } from '../helpers/random.js'
import { expectClose, expectSameBits, refLogsumexp, withVariant } from './reference.js'

const n = native()
const V_QWEN = 151936

function logits(rows: number, V: number, seed: number): Float32Array {
  return randomArray(rows * V, seed, 8)
}

async function logSoftmax(device: DeviceName, x: Float32Array, rows: number, V: number): Promise<Float32Array> {
  const out = n.empty(device, 'f32', [rows, V])
  n.logSoftmax(out, tensorFrom(device, 'f32', [rows, V], x))
  return readF32(out)
}

async function tokenLogprobs(device: DeviceName, x: Float32Array, rows: number, V: number, ids: Int32Array): Promise<Float32Array> {
  const out = n.empty(device, 'f32', [rows])
  n.tokenLogprobs(out, tensorFrom(device, 'f32', [rows, V], x), tensorFrom(device, 'i32', [rows], ids))
  return readF32(out)
}

async function argmax(device: DeviceName, x: Float32Array, rows: number, V: number): Promise<Int32Array> {
  const out = n.empty(device, 'i32', [rows])
  n.argmax(out, tensorFrom(device, 'f32', [rows, V], x))
  return readI32(out)
}

/** log_softmax rows of one [maxRows, V] input in launches of `count` rows, compared bitwise with one launch. */
async function rowsAcrossCounts(device: DeviceName, V: number, counts: number[], maxRows: number): Promise<string[]> {
  const x = tensorFrom(device, 'f32', [maxRows, V], logits(maxRows, V, V + 1))
  const ids = tensorFrom(device, 'i32', [maxRows], randomInts(maxRows, 3, V))
  const full = n.empty(device, 'f32', [maxRows, V])
  const fullTok = n.empty(device, 'f32', [maxRows])
  n.logSoftmax(full, x)
  n.tokenLogprobs(fullTok, x, ids)
  const want = await readBytes(full)
  const wantTok = await readBytes(fullTok)
  const problems: string[] = []
  for (const count of counts) {
    const out = n.empty(device, 'f32', [maxRows, V])
    const tok = n.empty(device, 'f32', [maxRows])
    const covered = maxRows - (maxRows % count)
    for (let start = 0; start < covered; start += count) {
      n.logSoftmax(n.narrow(out, start, count), n.narrow(x, start, count))
      n.tokenLogprobs(n.narrow(tok, start, count), n.narrow(x, start, count), n.narrow(ids, start, count))
    }
    const got = (await readBytes(out)).subarray(0, covered * V * 4)
    const at = got.findIndex((b, i) => b !== want[i])
    if (at >= 0) problems.push(`log_softmax in launches of ${count} rows: first difference in row ${Math.floor(at / (4 * V))}`)
    const gotTok = (await readBytes(tok)).subarray(0, covered * 4)
    const atTok = gotTok.findIndex((b, i) => b !== wantTok[i])
    if (atTok >= 0) problems.push(`token_logprobs in launches of ${count} rows: first difference in row ${Math.floor(atTok / 4)}`)
    out.dispose()
    tok.dispose()
  }
  return problems
}

function referenceSuite(device: DeviceName, Vs: number[]): void {
  it('log_softmax and token_logprobs match a float64 reference', async () => {
    for (const V of Vs)
      for (const rows of [1, 3, 7]) {
        const x = logits(rows, V, V + rows)
        const lse = refLogsumexp(x, rows, V)
        const ref = Float64Array.from(x, (v, i) => v - lse[Math.floor(i / V)]!)
        const out = await logSoftmax(device, x, rows, V)
        expectClose(out, ref, 1e-5, 1e-4, `${device} log_softmax rows=${rows} V=${V}`)
        const ids = randomInts(rows, V, V)
        const tok = await tokenLogprobs(device, x, rows, V, ids)
        expectClose(tok, Float64Array.from(ids, (id, r) => x[r * V + id]! - lse[r]!), 1e-5, 1e-4, 'token_logprobs')
        // One logsumexp serves both ops: a token's log-prob has the same bits either way.
        expectSameBits(new Float32Array(Array.from(ids, (id, r) => out[r * V + id]!)), tok, 'token_logprobs vs log_softmax')
        if (device === 'cuda') {
          expectClose(out, await logSoftmax('cpu', x, rows, V), 1e-6, 1e-5, 'cuda vs cpu log_softmax')
          expectClose(tok, await tokenLogprobs('cpu', x, rows, V, ids), 1e-6, 1e-5, 'cuda vs cpu token_logprobs')
        }
      }
  })

  it('argmax finds a well-separated maximum and breaks ties by the lowest index', async () => {
    for (const V of Vs) {
      const rows = 4
      const x = logits(rows, V, 5 * V)
      const winners = randomInts(rows, V + 9, V)
      for (let r = 0; r < rows; r++) x[r * V + winners[r]!] = 100
      // Row 1: ties at the two ends of the row; row 2: ties one block stride apart; row 3: ties everywhere.
      const tieA = Math.min(3, V - 1)
      x.fill(-5, 1 * V, 2 * V)
      x[1 * V + (V - 1)] = 50
      x[1 * V + tieA] = 50
      const tieB = Math.min(V - 1, 700)
      x[2 * V + tieB] = 200
      x[2 * V + Math.max(0, tieB - 512)] = 200
      x.fill(7, 3 * V, 4 * V)
      const got = await argmax(device, x, rows, V)
      expect(got[0]).toBe(winners[0])
      expect(got[1]).toBe(tieA)
      expect(got[2]).toBe(Math.max(0, tieB - 512))
      expect(got[3]).toBe(0)
      if (device === 'cuda') expect(Array.from(got)).toEqual(Array.from(await argmax('cpu', x, rows, V)))
    }
  })
}

describe('row reductions on the CPU backend', () => {
  referenceSuite('cpu', [5, 1000, V_QWEN])

  it('log_softmax and token_logprobs rows are bit-identical across row counts [1, 2, 3, 4, 7, 32]', async () => {
    expect(await rowsAcrossCounts('cpu', 32000, [1, 2, 3, 4, 7, 32], 64)).toEqual([])
  })

  it('variant twin: with rows split for small batches, some rows differ', async () => {
    const problems = await withVariant(() => rowsAcrossCounts('cpu', 32000, [1, 2, 3, 4, 7, 32], 64))
    expect(problems.length).toBeGreaterThan(0)
  })
})

describeGpu('row reductions on CUDA', () => {
  referenceSuite('cuda', [5, 1000, 4097, V_QWEN])

  it('log_softmax and token_logprobs rows are bit-identical across row counts [1, 2, 3, 4, 7, 64, 128]', async () => {
    expect(await rowsAcrossCounts('cuda', V_QWEN, [1, 2, 3, 4, 7, 64, 128], 128)).toEqual([])
  }, 120_000)

  it('variant twin: with rows split for small batches, some rows differ', async () => {
    const problems = await withVariant(() => rowsAcrossCounts('cuda', V_QWEN, [1, 2, 3, 4, 7, 64, 128], 128))
    expect(problems.length).toBeGreaterThan(0)
  }, 120_000)
})
