// The logit processors' state on the device: frequency, presence and repetition penalties, logit
// bias and the token mask of a constrained completion (csrc/common/logit_processors.h defines
// them). A completion that uses them holds a row of the table while it runs, given by the
// scheduler (not its KV-cache blocks): its token words, u16 [rows, V] (a count in 15 bits, and a
// bit for the prompt's tokens) and its settings (penalties and up to 300 biases). A step's token
// masks (one bit a token; a grammar's allowed tokens change with each token) go to the first rows
// of the mask table, i32 [rows, ceil(V / 32)], in one upload, and the plan names each masked row's
// mask row. The counts are kept on the device
// and updated there, in stream order, right after each choice, so that a step launched before the
// previous one is read back penalizes the tokens that step chose, which the host does not know yet.
//
// Memory: per row, V counts (u16), an adjusted logits row (f32) and V mask bits, 6.125 bytes a
// token: 0.89 MiB at V = 151,936, so 57 MiB for 64 rows (the CUDA default maxBatchSize) and
// 228 MiB for 256. u16 and not i32: a count can only reach 32,767 in a completion of 32,767 tokens
// or more, it saturates there, and the words take half the memory i32 would.
//
// Allocated when the scheduler admits the first request that uses a processor, not at load: a
// model that never serves one spends nothing, and a failed allocation refuses that request alone
// (a LogitProcessorTableError; the server answers 503). The memory check at load counts the table
// all the same (lib/model/load-memory.ts), so that on CUDA the KV cache does not take its room.
// No captured CUDA graph is invalidated by it: the plain decode graphs never reference these
// buffers, and the graphs of steps with processors are captured only after a first eager run of
// their bucket, when the buffers exist; they are never freed or moved before the model is disposed.
//
// A row is zeroed when a sequence takes it, by the first step that chooses for the sequence (its
// prefill's last chunk, or a decode-shaped step when one prompt token is left to compute), in
// stream order on the device:
// a step launched ahead for a sequence that had just ended (its wasted row) adds to the old
// owner's counts before the new owner's first step zeroes them, whatever the host knew. A
// sequence with a repetition penalty has its row reset and its prompt's tokens marked just before
// that step instead (resetLogitRow, in prepare), in the same stream order.
import { describeValue } from '../errors.js'
import { native, type DeviceName, type NativeTensor } from '../native.js'
import { MAX_LOGIT_BIAS, type TokenChoice } from '../sampling.js'

/** Most rows of the table: one launch's plan rows run along the grid's y, at most 65,535. */
export const MAX_LOGIT_PROCESSOR_ROWS = 65535

const PARAMS = 8 // choice::kParams
const SETTINGS = 604 // processors::kSettings: frequency, presence, bias count, repetition, 300 (id, bias) pairs
const BIAS_AT = 4 // processors::kBias
const PLAN_FIELDS = 4 // processors::kPlanFields: logits row, table row, fresh, masked

/** Words of a token mask at a vocabulary of `vocab` tokens: one bit a token (processors::mask_words). */
export function maskWords(vocab: number): number {
  return Math.ceil(vocab / 32)
}

/** Whether any row of a step uses a logit processor. */
export function usesProcessors(choices: readonly TokenChoice[]): boolean {
  return choices.some((c) => c.processors !== undefined)
}

/**
 * Checks a choice's processors at the model's boundary (the scheduler builds them from checked
 * options, so a message from here means a caller above let something through): a row of the table,
 * not taken by another row of the step (`taken` collects them), on a row that chooses its token;
 * on any choice that gives a mask, an Int32Array of ceil(vocab / 32) words that allows some token
 * of the vocabulary; and on the first choice, where they reach the device, settings of at most
 * MAX_LOGIT_BIAS biases of distinct ids in the vocabulary, all values finite.
 */
export function checkRowProcessors(at: string, choice: TokenChoice, tableRows: number, vocab: number, taken: Set<number>): void {
  const p = choice.processors!
  if (!Number.isInteger(p.row) || p.row < 0 || p.row >= tableRows)
    throw new RangeError(`Expected an integer between 0 and ${tableRows - 1} (a row of the logit processors' table) for ${at}.processors.row but received ${describeValue(p.row)}`)
  if (taken.has(p.row)) throw new RangeError(`Expected a table row no other row of the step holds for ${at}.processors.row but received ${p.row} again`)
  taken.add(p.row)
  if (choice.target >= 0) throw new RangeError(`Expected no processors for ${at}, a scored row (target ${choice.target})`)
  if (p.mask !== undefined) checkMask(`${at}.processors.mask`, p.mask, vocab)
  if (!p.first) return
  const { frequencyPenalty, presencePenalty, repetitionPenalty, logitBias } = p.settings
  for (const [name, v] of [['frequencyPenalty', frequencyPenalty], ['presencePenalty', presencePenalty]] as const)
    if (!Number.isFinite(v)) throw new RangeError(`Expected a finite number for ${at}.processors.settings.${name} but received ${describeValue(v)}`)
  if (!(Number.isFinite(repetitionPenalty) && repetitionPenalty > 0))
    throw new RangeError(`Expected a finite number above 0 for ${at}.processors.settings.repetitionPenalty but received ${describeValue(repetitionPenalty)}`)
  if (repetitionPenalty !== 1) {
    const prompt = p.prompt
    if (!Array.isArray(prompt)) throw new RangeError(`Expected the prompt's ids for ${at}.processors.prompt (a repetition penalty's first choice) but received ${describeValue(prompt)}`)
    const bad = prompt.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= vocab)
    if (bad >= 0) throw new RangeError(`Expected token ids between 0 and ${vocab - 1} in ${at}.processors.prompt but received ${describeValue(prompt[bad])} at ${bad}`)
  }
  if (logitBias.length > MAX_LOGIT_BIAS)
    throw new RangeError(`Expected at most ${MAX_LOGIT_BIAS} entries for ${at}.processors.settings.logitBias but received ${logitBias.length}`)
  const ids = new Set<number>()
  for (const [i, [id, bias]] of logitBias.entries()) {
    if (!Number.isInteger(id) || id < 0 || id >= vocab || ids.has(id))
      throw new RangeError(`Expected a distinct token id between 0 and ${vocab - 1} for ${at}.processors.settings.logitBias[${i}][0] but received ${describeValue(id)}`)
    if (!Number.isFinite(bias)) throw new RangeError(`Expected a finite number for ${at}.processors.settings.logitBias[${i}][1] but received ${describeValue(bias)}`)
    ids.add(id)
  }
}

/** A token mask: ceil(vocab / 32) i32 words, some token below `vocab` allowed (bits at and past vocab are ignored). */
function checkMask(at: string, mask: Int32Array, vocab: number): void {
  const words = maskWords(vocab)
  if (!(mask instanceof Int32Array) || mask.length !== words)
    throw new RangeError(`Expected an Int32Array of ${words} words (one bit for each of ${vocab} tokens) for ${at} but received ${mask instanceof Int32Array ? `${mask.length} words` : describeValue(mask)}`)
  const tail = vocab % 32 // the last word's bits below vocab (0: all 32)
  const last = mask[words - 1]! & (tail === 0 ? -1 : 2 ** tail - 1)
  if (last === 0 && mask.subarray(0, words - 1).every((w) => w === 0))
    throw new RangeError(`Expected a mask that allows at least one token below ${vocab} for ${at} but received one that allows none`)
}

/** The table row's settings as the kernels read them (float fields as float32 bits). */
export function packSettings(c: NonNullable<TokenChoice['processors']>['settings']): Int32Array {
  const packed = new Int32Array(SETTINGS)
  const floats = new Float32Array(packed.buffer)
  floats[0] = c.frequencyPenalty
  floats[1] = c.presencePenalty
  packed[2] = c.logitBias.length
  floats[3] = c.repetitionPenalty
  c.logitBias.forEach(([id, bias], i) => {
    packed[BIAS_AT + 2 * i] = id
    floats[BIAS_AT + 2 * i + 1] = bias
  })
  return packed
}

export class LogitProcessorTable {
  /** Device bytes of a table of `rows` rows at a vocabulary of `vocab` tokens. */
  static bytes(rows: number, vocab: number): number {
    return rows * (vocab * (2 + 4) + 4 * maskWords(vocab) + 4 * (SETTINGS + PARAMS + 2 + PLAN_FIELDS)) + 4
  }

  /** u16 [rows, V]: times each token was chosen by the row's completion so far. */
  readonly counts: NativeTensor
  /** i32 [rows, 604]: the row's penalties and biases (csrc/common/logit_processors.h). */
  readonly settings: NativeTensor
  /** i32 [rows, ceil(V / 32)]: the latest step's masks (one bit a token), in its plan's order. */
  readonly mask: NativeTensor
  private readonly adjusted: NativeTensor // f32 [rows, V]: a step's processed logits, by plan row
  private readonly adjustedParams: NativeTensor // i32 [rows, 8]
  private readonly adjustedOut: NativeTensor // i32 [rows, 2]: the choice on the processed logits
  private readonly plan: NativeTensor // i32 [1 + 4 rows]
  private maskStage?: Int32Array // the host side of `mask`'s upload, made at the first masked step

  constructor(
    readonly device: DeviceName,
    readonly rows: number,
    readonly vocab: number,
  ) {
    const n = native()
    const owned: NativeTensor[] = []
    const alloc = (dtype: 'u16' | 'i32' | 'f32', shape: number[]) => {
      const t = n.empty(device, dtype, shape)
      owned.push(t)
      return t
    }
    try {
      this.counts = alloc('u16', [rows, vocab])
      this.settings = alloc('i32', [rows, SETTINGS])
      this.mask = alloc('i32', [rows, maskWords(vocab)])
      this.adjusted = alloc('f32', [rows, vocab])
      this.adjustedParams = alloc('i32', [rows, PARAMS])
      this.adjustedOut = alloc('i32', [rows, 2])
      this.plan = alloc('i32', [1 + PLAN_FIELDS * rows])
    } catch (err) {
      for (const t of owned) t.dispose()
      throw err
    }
  }

  /**
   * Uploads the step's plan, the settings of the sequences that take their row at this step, and
   * the masks the step's choices give (in stream order, before the step's kernels and after the
   * previous step's, which read the masks before; never during a graph capture). A sequence with
   * a repetition penalty has its row reset here, its prompt's tokens marked (resetLogitRow), and
   * not zeroed again by the step; the others' rows are zeroed by the step. The masks go to the
   * mask table's first rows in one upload (not two native calls per mask: 128 a step at 64
   * constrained sequences); a row without a mask this step is planned with none (-1). Returns K,
   * the rows of the step that use processors.
   */
  prepare(choices: readonly TokenChoice[]): number {
    const n = native()
    const entries: number[] = []
    const words = maskWords(this.vocab)
    let masks = 0
    choices.forEach((c, r) => {
      if (!c.processors) return
      const { row, first, settings, prompt, mask } = c.processors
      let fresh = first
      if (first) {
        n.uploadAsync(n.narrow(this.settings, row, 1), packSettings(settings))
        if (settings.repetitionPenalty !== 1) {
          const ids = n.empty(this.device, 'i32', [prompt!.length])
          try {
            n.uploadAsync(ids, Int32Array.from(prompt!))
            n.resetLogitRow(this.counts, row, ids)
          } finally {
            ids.dispose() // stream-ordered: after the kernels that read it
          }
          fresh = false
        }
      }
      if (mask) (this.maskStage ??= new Int32Array(this.rows * words)).set(mask, masks * words)
      entries.push(r, row, fresh ? 1 : 0, mask ? masks++ : -1)
    })
    if (masks > 0) n.uploadAsync(n.narrow(this.mask, 0, masks), this.maskStage!.subarray(0, masks * words))
    const plan = Int32Array.from([entries.length / PLAN_FIELDS, ...entries])
    n.uploadAsync(n.narrow(this.plan, 0, plan.length), plan)
    return entries.length / PLAN_FIELDS
  }

  /**
   * Enqueues, for the first `j` plan rows (the launch's size; the plan's K of them are used): the
   * processed logits of the rows that use processors, the choice on them, and that choice written
   * into `params` as the row's target, its count added. The output head's choice on the raw logits
   * then scores those targets: the log-probs the rows report are the raw ones.
   */
  enqueue(logits: NativeTensor, params: NativeTensor, j: number): void {
    const n = native()
    const plan = n.narrow(this.plan, 0, 1 + PLAN_FIELDS * j)
    const adjusted = n.narrow(this.adjusted, 0, j)
    const adjustedParams = n.narrow(this.adjustedParams, 0, j)
    const chosen = n.narrow(this.adjustedOut, 0, j)
    n.applyLogitProcessors(adjusted, adjustedParams, this.counts, logits, params, plan, this.settings, this.mask)
    n.chooseTokens(chosen, adjusted, adjustedParams, plan)
    n.recordLogitChoices(params, this.counts, chosen, plan)
  }

  dispose(): void {
    for (const t of [this.counts, this.settings, this.mask, this.adjusted, this.adjustedParams, this.adjustedOut, this.plan]) t.dispose()
  }
}
