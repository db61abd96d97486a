// The output head's token choice: one native op (chooseTokens, csrc/common/token_choice.h) turns
// each logits row into the chosen id, its log-prob and, when asked, the N most likely ids with
// their log-probs. Greedy rows, seeded samples and scored targets share one launch, and a step
// reads back a few bytes per row, never a logits row.
//
// Buffers are allocated once for the model's most logit rows; each step uses their first rows.
// Rows whose completion has logit processors (penalties, logit bias, token masks:
// lib/model/logit-processors.ts)
// are chosen from their processed logits first, and that choice is then scored by the same launch
// as every other row: one op on the raw logits, whose log-probs are what every row reports.
import { native, type DeviceName, type NativeTensor } from '../native.js'
import { readI32 } from '../tensor.js'
import type { StepTokens, TokenChoice, TopLogprob } from '../sampling.js'
import { LogitProcessorTableError } from '../errors.js'
import { LogitProcessorTable, usesProcessors } from './logit-processors.js'

export type { StepTokens, TokenChoice, TopLogprob }

/** Most top log-probs per row (OpenAI's top_logprobs limit). */
export const MAX_TOP_LOGPROBS = 20

const PARAMS = 8 // fields per row, in csrc/common/token_choice.h's order

/** Packs the rows' parameters as the native op reads them (f32 fields as their bits). */
export function packChoices(choices: readonly TokenChoice[]): Int32Array {
  const packed = new Int32Array(choices.length * PARAMS)
  const floats = new Float32Array(packed.buffer)
  choices.forEach((c, r) => {
    const at = r * PARAMS
    floats[at + 0] = c.temperature
    floats[at + 1] = c.topP
    floats[at + 2] = c.minP
    packed[at + 3] = c.topK
    packed[at + 4] = c.seed | 0
    packed[at + 5] = c.position
    packed[at + 6] = c.target
    packed[at + 7] = c.topLogprobs ?? 0
  })
  return packed
}

/** Reads the op's output rows [rows, 2 + 2N]. */
export function unpackStepTokens(out: Int32Array, rows: number, topN: number): StepTokens {
  const width = 2 + 2 * topN
  const asFloat = new Float32Array(out.buffer, out.byteOffset, out.length)
  const result: StepTokens = {
    ids: new Int32Array(rows),
    logprobs: new Float32Array(rows),
    topN,
    topIds: new Int32Array(rows * topN),
    topLogprobs: new Float32Array(rows * topN),
  }
  for (let r = 0; r < rows; r++) {
    result.ids[r] = out[r * width]!
    result.logprobs[r] = asFloat[r * width + 1]!
    for (let i = 0; i < topN; i++) {
      result.topIds[r * topN + i] = out[r * width + 2 + i]!
      result.topLogprobs[r * topN + i] = asFloat[r * width + 2 + topN + i]!
    }
  }
  return result
}

/** Where a launched step's chosen ids lie: column 0 of the first `rows` rows of `out`, i32 [R, width], on the device. */
export interface ChosenIds {
  readonly out: NativeTensor
  readonly rows: number
  readonly width: number
}

/** The token-choice buffers of one model: parameters in, results out. */
export class OutputHead {
  private readonly params: NativeTensor // i32 [maxRows, 8]
  private readonly out: NativeTensor // i32 [maxRows * (2 + 2 * MAX_TOP_LOGPROBS)]
  // i32 [maxRows]: r * width, the offsets of the ids in a flattened out (takeIds), by width.
  private readonly idOffsets = new Map<number, NativeTensor>()
  private readonly remap: NativeTensor // i32 [maxRows]: the offsets of a row map (takeIds)
  private table: LogitProcessorTable | null = null

  /** `processors`: the rows of the logit processors' table and the vocabulary (none: no processors). */
  constructor(
    readonly device: DeviceName,
    readonly maxRows: number,
    readonly processors: { rows: number; vocab: number } | null = null,
  ) {
    const n = native()
    this.params = n.empty(device, 'i32', [maxRows, PARAMS])
    const owned = [this.params]
    try {
      this.out = n.empty(device, 'i32', [maxRows * (2 + 2 * MAX_TOP_LOGPROBS)])
      owned.push(this.out)
      this.remap = n.empty(device, 'i32', [maxRows])
    } catch (err) {
      for (const t of owned) t.dispose()
      throw err
    }
  }

  /** Views of the first `rows` rows: params i32 [rows, 8] and out i32 [rows, 2 + 2 * topN]. */
  views(rows: number, topN: number): [NativeTensor, NativeTensor] {
    const n = native()
    const width = 2 + 2 * topN
    return [n.narrow(this.params, 0, rows), n.view(n.narrow(this.out, 0, rows * width), [rows, width])]
  }

  /** Copies the rows' parameters into `params` (a view from views()), in stream order. */
  uploadParams(params: NativeTensor, choices: readonly TokenChoice[]): void {
    native().uploadAsync(params, packChoices(choices))
  }

  /** Enqueues the token choice for logits f32 [R, V] into `out`. */
  enqueue(logits: NativeTensor, params: NativeTensor, out: NativeTensor): void {
    native().chooseTokens(out, logits, params)
  }

  /** The logit processors' table, allocated at its first use (lib/model/logit-processors.ts says why). */
  processorTable(): LogitProcessorTable {
    if (!this.processors || this.processors.rows === 0)
      throw new RangeError('This output head has no logit processor rows: a choice with processors cannot run here')
    if (!this.table) {
      const { rows, vocab } = this.processors
      try {
        this.table = new LogitProcessorTable(this.device, rows, vocab)
      } catch (err) {
        const mib = (LogitProcessorTable.bytes(rows, vocab) / 2 ** 20).toFixed(1)
        const why = err instanceof Error ? err.message : String(err)
        throw new LogitProcessorTableError(`Could not allocate the table of penalties and logit bias (${mib} MiB for ${rows} sequences at ${vocab} tokens) on ${this.device}: ${why}`, { cause: err })
      }
    }
    return this.table
  }

  /** Reads back the first `rows` rows of `out` (a view from views() with topN top entries). */
  async read(out: NativeTensor, rows: number, topN: number): Promise<StepTokens> {
    const first = rows === out.shape[0] ? out : native().narrow(out, 0, rows)
    return unpackStepTokens(await readI32(first), rows, topN)
  }

  /** Enqueues the choice for logits f32 [R, V] and reads back the results. */
  async choose(logits: NativeTensor, choices: readonly TokenChoice[], topN: number): Promise<StepTokens> {
    if (choices.length === 0) return unpackStepTokens(new Int32Array(0), 0, topN)
    return this.launch(logits, choices, topN).tokens
  }

  /**
   * Enqueues the choice for logits f32 [R, V] and the read-back of its results (in stream order,
   * now), and returns at once: the results to await, and where the chosen ids lie for takeIds.
   */
  launch(logits: NativeTensor, choices: readonly TokenChoice[], topN: number): { tokens: Promise<StepTokens>; chosen: ChosenIds } {
    const rows = choices.length
    if (rows === 0) throw new RangeError('OutputHead.launch: a step with no logits rows chooses nothing')
    const [params, out] = this.views(rows, topN)
    this.uploadParams(params, choices)
    if (usesProcessors(choices)) {
      const table = this.processorTable()
      table.enqueue(logits, params, table.prepare(choices))
    }
    this.enqueue(logits, params, out)
    return { tokens: this.read(out, rows, topN), chosen: { out, rows, width: 2 + 2 * topN } }
  }

  /**
   * Enqueues ids[i] = the id chosen for row rows[i] of `chosen` (row i when `rows` is absent, for
   * i < chosen.rows): a gather on the device, in stream order, so that a step can take the previous
   * step's tokens before the host has them.
   */
  takeIds(ids: NativeTensor, chosen: ChosenIds, rows?: readonly number[]): void {
    const n = native()
    const count = rows?.length ?? chosen.rows
    let offsets: NativeTensor
    if (rows) {
      // The map changes from step to step: one buffer, rewritten in stream order.
      offsets = n.narrow(this.remap, 0, count)
      n.uploadAsync(offsets, Int32Array.from(rows, (r) => r * chosen.width))
    } else {
      let cached = this.idOffsets.get(chosen.width)
      if (!cached) {
        cached = n.empty(this.device, 'i32', [this.maxRows])
        n.uploadAsync(cached, Int32Array.from({ length: this.maxRows }, (_, r) => r * chosen.width))
        this.idOffsets.set(chosen.width, cached)
      }
      offsets = n.narrow(cached, 0, count)
    }
    const flat = n.view(n.narrow(chosen.out, 0, chosen.rows), [chosen.rows * chosen.width, 1])
    n.embedding(n.view(n.narrow(ids, 0, count), [count, 1]), flat, offsets)
  }

  dispose(): void {
    this.params.dispose()
    this.out.dispose()
    this.remap.dispose()
    for (const t of this.idOffsets.values()) t.dispose()
    this.idOffsets.clear()
    this.table?.dispose()
    this.table = null
  }
}

/** One launch on logits a caller already holds (tests, stand-in models): temporary buffers. */
export async function chooseOnLogits(logits: NativeTensor, choices: readonly TokenChoice[], topN: number): Promise<StepTokens> {
  const head = new OutputHead(logits.device, Math.max(1, choices.length))
  try {
    return await head.choose(logits, choices, topN)
  } finally {
    head.dispose()
  }
}
