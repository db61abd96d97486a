// Step packing: the boundary checks of a step's sequence chunks, and the layout of its integer
// inputs in one i32 buffer that reaches the device by one asynchronous copy into memory allocated
// once per model (StepInputs). A decode step can also be laid out padded to a fixed number of
// rows and a fixed block-table width (layoutDecode), the shape a captured CUDA graph replays:
// padding rows carry slot -1 (no cache write) and attend to one key; every op is batch-invariant,
// so they cannot change a real row.
import { checkInteger, describeValue } from '../errors.js'
import { native, type AttentionBatch, type DeviceName, type NativeTensor } from '../native.js'
import type { SequenceChunk } from '../step.js'

export type { SequenceChunk }

/** What a step may hold (the model's sizes). */
export interface StepLimits {
  vocabSize: number
  maxPositionEmbeddings: number
  maxPositions: number
  kvBlockSize: number
  kvBlocks: number
  maxBatchTokens: number
  maxLogitRows: number
}

/** Sizes of a validated step. */
export interface StepSizes {
  tokens: number
  logitRows: number
  maxBlocks: number
}

/**
 * One step's integer inputs, packed into one i32 array so they reach the device in one copy:
 * ids [T] | positions [T] | slots [T] | logitRows [R] | queryStart [B+1] | seqLens [B] | blockTables [B, maxBlocks]
 */
export interface StepLayout {
  packed: Int32Array
  tokens: number
  logitRows: number
  sequences: number
  maxBlocks: number
  rowsPerChunk: number[]
  maxQueryLen: number
  maxSeqLen: number
}

/** The device views of a step's inputs, as the forward pass reads them. */
export interface StepViews {
  tokens: number
  logitRows: number
  ids: NativeTensor // i32 [T]
  positions: NativeTensor // i32 [T]
  slots: NativeTensor // i32 [T]
  rows: NativeTensor // i32 [R], the token rows whose logits are wanted
  batch: AttentionBatch
}

export function inputInts(tokens: number, logitRows: number, sequences: number, maxBlocks: number): number {
  return offsets(tokens, logitRows, sequences).blockTables + sequences * maxBlocks
}

/** Validates the chunks at the boundary, with messages that name the chunk and field. */
export function checkChunks(chunks: SequenceChunk[], limits: StepLimits): StepSizes {
  if (!Array.isArray(chunks) || chunks.length === 0)
    throw new TypeError(`Expected a non-empty array of sequence chunks for chunks but received ${describeValue(chunks)}`)
  const vocab = limits.vocabSize
  const sizes: StepSizes = { tokens: 0, logitRows: 0, maxBlocks: 1 }
  for (let i = 0; i < chunks.length; i++) {
    const ch = chunks[i]!
    const at = `chunks[${i}]`
    if (typeof ch !== 'object' || ch === null) throw new TypeError(`Expected a sequence chunk for ${at} but received ${describeValue(ch)}`)
    if (!Array.isArray(ch.tokens) || ch.tokens.length === 0)
      throw new TypeError(`Expected a non-empty array of token ids for ${at}.tokens but received ${describeValue(ch.tokens)}`)
    for (let j = 0; j < ch.tokens.length; j++) {
      const id = ch.tokens[j]
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= vocab)
        throw new RangeError(`Expected an integer between 0 and ${vocab - 1} for ${at}.tokens[${j}] but received ${describeValue(id)}`)
    }
    checkInteger(`${at}.startPosition`, ch.startPosition, 0)
    const end = ch.startPosition + ch.tokens.length
    if (end > limits.maxPositions) {
      const limit = limits.maxPositions === limits.maxPositionEmbeddings ? 'max_position_embeddings' : 'KV cache capacity'
      throw new RangeError(
        `Expected positions below ${limits.maxPositions} (${limit}) for ${at} but received positions ${ch.startPosition}..${end - 1}`,
      )
    }
    const need = Math.ceil(end / limits.kvBlockSize)
    if (!Array.isArray(ch.blockTable) || ch.blockTable.length < need)
      throw new RangeError(
        `Expected at least ${need} block ids for ${at}.blockTable (positions 0..${end - 1}, ${limits.kvBlockSize} per block) but received ${describeValue(ch.blockTable)}`,
      )
    for (let j = 0; j < need; j++) {
      const b = ch.blockTable[j]
      if (typeof b !== 'number' || !Number.isInteger(b) || b < 0 || b >= limits.kvBlocks)
        throw new RangeError(`Expected an integer between 0 and ${limits.kvBlocks - 1} for ${at}.blockTable[${j}] but received ${describeValue(b)}`)
    }
    if (ch.logits !== 'none' && ch.logits !== 'last' && ch.logits !== 'all')
      throw new TypeError(`Expected 'none', 'last' or 'all' for ${at}.logits but received ${describeValue(ch.logits)}`)
    sizes.tokens += ch.tokens.length
    sizes.logitRows += ch.logits === 'all' ? ch.tokens.length : ch.logits === 'last' ? 1 : 0
    sizes.maxBlocks = Math.max(sizes.maxBlocks, need)
  }
  if (sizes.tokens > limits.maxBatchTokens)
    throw new RangeError(`Expected at most ${limits.maxBatchTokens} tokens (maxBatchTokens) for chunks but received ${sizes.tokens}`)
  if (sizes.logitRows > limits.maxLogitRows)
    throw new RangeError(`Expected at most ${limits.maxLogitRows} logit rows (maxLogitRows) for chunks but received ${sizes.logitRows}`)
  return sizes
}


/** Lays out the step's integer inputs (see StepLayout) from validated chunks. */
export function layoutStep(chunks: SequenceChunk[], sizes: StepSizes, blockSize: number): StepLayout {
  const { tokens: T, logitRows: R, maxBlocks } = sizes
  const B = chunks.length
  const bs = blockSize
  const packed = new Int32Array(inputInts(T, R, B, maxBlocks))
  const at = offsets(T, R, B)
  const ids = packed.subarray(at.ids, at.ids + T)
  const positions = packed.subarray(at.positions, at.positions + T)
  const slots = packed.subarray(at.slots, at.slots + T)
  const logitRows = packed.subarray(at.rows, at.rows + R)
  const queryStart = packed.subarray(at.queryStart, at.queryStart + B + 1)
  const seqLens = packed.subarray(at.seqLens, at.seqLens + B)
  const blockTables = packed.subarray(at.blockTables)
  const step: StepLayout = { packed, tokens: T, logitRows: R, sequences: B, maxBlocks, rowsPerChunk: [], maxQueryLen: 0, maxSeqLen: 0 }
  let row = 0
  let logitRow = 0
  for (let b = 0; b < B; b++) {
    const ch = chunks[b]!
    const len = ch.tokens.length
    const end = ch.startPosition + len
    for (let j = 0; j < Math.ceil(end / bs); j++) blockTables[b * maxBlocks + j] = ch.blockTable[j]!
    for (let j = 0; j < len; j++) {
      const pos = ch.startPosition + j
      ids[row + j] = ch.tokens[j]!
      positions[row + j] = pos
      slots[row + j] = ch.blockTable[Math.floor(pos / bs)]! * bs + (pos % bs)
    }
    const first = ch.logits === 'all' ? 0 : len - 1
    const count = ch.logits === 'all' ? len : ch.logits === 'last' ? 1 : 0
    for (let j = 0; j < count; j++) logitRows[logitRow++] = row + first + j
    step.rowsPerChunk.push(count)
    queryStart[b] = row
    seqLens[b] = end
    step.maxQueryLen = Math.max(step.maxQueryLen, len)
    step.maxSeqLen = Math.max(step.maxSeqLen, end)
    row += len
  }
  queryStart[B] = row
  return step
}

/**
 * A decode step (every chunk one token with its logits) padded to `rows` sequences and a block
 * table `maxBlocks` wide, attending over `maxSeqLen` keys at most: the fixed shape of a captured
 * graph. Padding rows: token 0 at position 0, slot -1 (nothing written), one key, block 0.
 */
export function layoutDecode(chunks: SequenceChunk[], rows: number, maxBlocks: number, maxSeqLen: number, blockSize: number): StepLayout {
  const real = chunks.length
  const packed = new Int32Array(inputInts(rows, rows, rows, maxBlocks))
  const at = offsets(rows, rows, rows)
  for (let b = 0; b < rows; b++) {
    const ch = chunks[b]
    const pos = ch ? ch.startPosition : 0
    packed[at.ids + b] = ch ? ch.tokens[0]! : 0
    packed[at.positions + b] = pos
    packed[at.slots + b] = ch ? ch.blockTable[Math.floor(pos / blockSize)]! * blockSize + (pos % blockSize) : -1
    packed[at.rows + b] = b
    packed[at.queryStart + b] = b
    packed[at.seqLens + b] = pos + 1
    if (ch) for (let j = 0; j <= Math.floor(pos / blockSize); j++) packed[at.blockTables + b * maxBlocks + j] = ch.blockTable[j]!
  }
  packed[at.queryStart + rows] = rows
  return {
    packed,
    tokens: rows,
    logitRows: rows,
    sequences: rows,
    maxBlocks,
    rowsPerChunk: new Array<number>(real).fill(1),
    maxQueryLen: 1,
    maxSeqLen,
  }
}

/** Where each input starts in the packed array. */
function offsets(T: number, R: number, B: number) {
  return { ids: 0, positions: T, slots: 2 * T, rows: 3 * T, queryStart: 3 * T + R, seqLens: 3 * T + R + B + 1, blockTables: 3 * T + R + 2 * B + 1 }
}

/** The model's persistent input buffer: one i32 tensor that every step's inputs are copied into. */
export class StepInputs {
  private readonly buffer: NativeTensor

  constructor(device: DeviceName, capacity: number) {
    this.buffer = native().empty(device, 'i32', [capacity])
  }

  get capacity(): number {
    return this.buffer.shape[0]!
  }

  /** Views of the buffer for a layout's sizes (made once per graph bucket, or per eager step). */
  views(l: { tokens: number; logitRows: number; sequences: number; maxBlocks: number; maxQueryLen: number; maxSeqLen: number }): StepViews {
    const n = native()
    const at = offsets(l.tokens, l.logitRows, l.sequences)
    const slice = (start: number, count: number) => n.narrow(this.buffer, start, count)
    return {
      tokens: l.tokens,
      logitRows: l.logitRows,
      ids: slice(at.ids, l.tokens),
      positions: slice(at.positions, l.tokens),
      slots: slice(at.slots, l.tokens),
      rows: slice(at.rows, l.logitRows),
      batch: {
        queryStart: slice(at.queryStart, l.sequences + 1),
        seqLens: slice(at.seqLens, l.sequences),
        blockTables: n.view(slice(at.blockTables, l.sequences * l.maxBlocks), [l.sequences, l.maxBlocks]),
        maxQueryLen: l.maxQueryLen,
        maxSeqLen: l.maxSeqLen,
      },
    }
  }

  /** Copies a layout's packed inputs to the front of the buffer (asynchronously, in stream order). */
  upload(packed: Int32Array): void {
    if (packed.length > this.capacity)
      throw new RangeError(`A step needs ${packed.length} input integers but the model's input buffer holds ${this.capacity}`)
    native().uploadAsync(native().narrow(this.buffer, 0, packed.length), packed)
  }

  dispose(): void {
    this.buffer.dispose()
  }
}
