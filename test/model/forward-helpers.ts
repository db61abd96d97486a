// Running whole sequences through Transformer.forward for tests: block allocation, chunking.
import type { SequenceChunk, Transformer } from '../../lib/model/transformer.js'
import { readBytes } from '../../lib/tensor.js'

/** Block tables for `count` sequences of up to `blocksEach` blocks, interleaved and reversed so no table is contiguous. */
export function blockTables(count: number, blocksEach: number): number[][] {
  return Array.from({ length: count }, (_, s) =>
    Array.from({ length: blocksEach }, (_, j) => (blocksEach - 1 - j) * count + s),
  )
}

/** Logit bytes (f32 [V] per position) of one sequence run in chunks of the given sizes, alone. */
export async function runChunked(
  model: Transformer,
  tokens: number[],
  chunkSizes: number[] | number,
  blockTable: number[],
): Promise<Buffer[]> {
  const rows: Buffer[] = []
  let pos = 0
  let i = 0
  while (pos < tokens.length) {
    const size = typeof chunkSizes === 'number' ? chunkSizes : chunkSizes[i++ % chunkSizes.length]!
    const piece = tokens.slice(pos, pos + size)
    const out = model.forward([{ tokens: piece, startPosition: pos, blockTable, logits: 'all' }])
    rows.push(...splitRows(await readBytes(out.logits), piece.length))
    pos += piece.length
  }
  return rows
}

export function splitRows(bytes: Buffer, count: number): Buffer[] {
  const size = bytes.length / count
  return Array.from({ length: count }, (_, r) => bytes.subarray(r * size, (r + 1) * size))
}

/** Runs several sequences together, each step advancing each unfinished one by its next chunk size. */
export async function runBatched(
  model: Transformer,
  sequences: number[][],
  chunkSize: (seq: number, step: number) => number,
  tables: number[][],
): Promise<Buffer[][]> {
  const rows: Buffer[][] = sequences.map(() => [])
  const pos = sequences.map(() => 0)
  for (let step = 0; pos.some((p, s) => p < sequences[s]!.length); step++) {
    const chunks: SequenceChunk[] = []
    const owners: number[] = []
    sequences.forEach((seq, s) => {
      if (pos[s]! >= seq.length) return
      const piece = seq.slice(pos[s], pos[s]! + chunkSize(s, step))
      chunks.push({ tokens: piece, startPosition: pos[s]!, blockTable: tables[s]!, logits: 'all' })
      owners.push(s)
    })
    const out = model.forward(chunks)
    const bytes = await readBytes(out.logits)
    const all = splitRows(bytes, out.rowsPerChunk.reduce((a, b) => a + b, 0))
    let r = 0
    chunks.forEach((c, k) => {
      rows[owners[k]!]!.push(...all.slice(r, r + c.tokens.length))
      r += c.tokens.length
      pos[owners[k]!] = pos[owners[k]!]! + c.tokens.length
    })
  }
  return rows
}

/** Index of the first position whose logits differ, or -1. */
export function firstDifferentRow(a: Buffer[], b: Buffer[]): number {
  if (a.length !== b.length) return Math.min(a.length, b.length)
  for (let i = 0; i < a.length; i++) if (!a[i]!.equals(b[i]!)) return i
  return -1
}

export function asF32(row: Buffer): Float32Array {
  return new Float32Array(row.buffer.slice(row.byteOffset, row.byteOffset + row.byteLength))
}
