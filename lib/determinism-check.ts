// The determinism experiment behind `detinfer check` and the determinism suite: one prompt is
// completed `runs` times while the scheduler is under varied load (requests arrive in random
// order among other random prompts of random lengths, the number in flight changes all the
// time, and the serving configuration — batch size and prefill chunk size — changes between
// phases), and every completion is compared, token for token and log-prob for log-prob, bit for
// bit, with the completion of the same prompt run alone.
//
// With the invariant kernels every completion must equal the reference. With the variant kernels
// (setVariantKernels(true)) the same harness is expected to find differences: that is how we
// know it can.
import type { SamplingParams } from './sampling.js'
import { Scheduler, type ForwardModel, type SchedulerOptions, type TokenConstraint } from './scheduler.js'

export interface NoiseOptions {
  /** Other prompts mixed in, in total. */
  count: number
  /** Their token ids are drawn from [1, vocab). */
  vocab: number
  maxPromptTokens: number
  maxTokens: number
}

export interface CheckOptions {
  /** The prompt whose completions are compared (token ids). */
  prompt: number[]
  /** Completions of it under load. */
  runs: number
  /** Tokens per completion (EOS does not end them: every completion has exactly this many). */
  maxTokens: number
  /**
   * Seeded sampling for the prompt's completions (null or absent: greedy). Every run uses the same
   * seed, so every run must draw the same tokens; the noise prompts sample with seeds of their own.
   */
  sampling?: SamplingParams | null
  noise: NoiseOptions
  /** Serving configurations the runs are spread over, one phase each. */
  phases: SchedulerOptions[]
  /** Seed of the arrival order, the noise prompts and the load pattern. */
  seed: number
  /**
   * Grammar constraints (structured output; lib/grammar.ts): `make` gives a fresh one for each
   * request that has one. With `target`, every run of the prompt and its reference are
   * constrained; a share `noiseShare` (0 to 1) of the noise requests are. A constrained completion
   * ends at EOS once its grammar is complete, the others never end early. Constrained sequences
   * are never in a step launched ahead, so they change how the steps are made up, which is what
   * the experiment varies.
   */
  constraints?: { make(): Promise<TokenConstraint>; target?: boolean; noiseShare?: number }
  onProgress?: (done: number, total: number) => void
}

export interface Completion {
  tokens: number[]
  logprobs: number[]
}

export interface Divergence {
  /** Index of the run (in arrival order among the target's runs). */
  run: number
  /** First generated token that differs (or whose log-prob differs). */
  index: number
  expectedToken: number
  actualToken: number
  expectedLogprob: number
  actualLogprob: number
}

export interface CheckReport {
  runs: number
  maxTokens: number
  /** Distinct completions (tokens and log-probs) among the runs. */
  distinctCompletions: number
  /** Distinct token sequences among the runs (log-probs ignored). */
  distinctTexts: number
  /** Runs equal to the reference, bit for bit. */
  identicalToReference: number
  /** Runs whose tokens equal the reference's but some log-prob differs. */
  logprobOnlyDifferences: number
  /** The earliest divergence from the reference over all runs, if any. */
  firstDivergence: Divergence | null
  reference: Completion
  /** Generated tokens in all requests (the target's and the noise's). */
  generatedTokens: number
  seconds: number
  tokensPerSecond: number
  /** Largest number of sequences seen running together. */
  maxConcurrentSeen: number
  phases: SchedulerOptions[]
  sampling: SamplingParams | null
}

/** mulberry32: a small seeded generator for load patterns and test inputs (never for sampling). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

interface Job {
  prompt: number[]
  maxTokens: number
  sampling: SamplingParams | null
  run: number // index among the target's runs, -1 for noise
  constrained: boolean
}

/**
 * Generates exactly maxTokens tokens (EOS included as an ordinary token); with a constraint, up to
 * the EOS that ends its grammar.
 */
function complete(scheduler: Scheduler, prompt: number[], maxTokens: number, sampling: SamplingParams | null, constraint?: TokenConstraint): Promise<Completion> {
  const tokens: number[] = []
  const logprobs: number[] = []
  const scheduled = scheduler.submit({
    kind: 'generate',
    prompt,
    maxTokens,
    sampling,
    ...(constraint && { constraint }),
    onToken(token, logprob) {
      tokens.push(token)
      logprobs.push(logprob)
      return !constraint?.finished
    },
  })
  return scheduled.done.then(() => ({ tokens, logprobs }))
}

function sameBits(a: number, b: number): boolean {
  return Object.is(a, b)
}

function divergence(reference: Completion, c: Completion, run: number): Divergence | null {
  const n = Math.max(reference.tokens.length, c.tokens.length)
  for (let i = 0; i < n; i++) {
    if (reference.tokens[i] !== c.tokens[i] || !sameBits(reference.logprobs[i]!, c.logprobs[i]!))
      return {
        run,
        index: i,
        expectedToken: reference.tokens[i] ?? -1,
        actualToken: c.tokens[i] ?? -1,
        expectedLogprob: reference.logprobs[i] ?? NaN,
        actualLogprob: c.logprobs[i] ?? NaN,
      }
  }
  return null
}

function jobsFor(options: CheckOptions, rand: () => number): Job[] {
  const { noise } = options
  const jobs: Job[] = []
  const sampling = options.sampling ?? null
  const constraints = options.constraints
  for (let r = 0; r < options.runs; r++) jobs.push({ prompt: options.prompt, maxTokens: options.maxTokens, sampling, run: -1, constrained: constraints?.target === true })
  for (let i = 0; i < noise.count; i++) {
    const length = 1 + Math.floor(rand() * noise.maxPromptTokens)
    const prompt = Array.from({ length }, () => 1 + Math.floor(rand() * (noise.vocab - 1)))
    const maxTokens = 1 + Math.floor(rand() * noise.maxTokens)
    const own = sampling ? { ...sampling, seed: Math.floor(rand() * 2 ** 32) } : null
    // Drawn only with constraints, so that the load of a check without them stays what it was.
    const constrained = constraints !== undefined && rand() < (constraints.noiseShare ?? 0)
    jobs.push({ prompt, maxTokens, sampling: own, run: -1, constrained })
  }
  for (let i = jobs.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1))
    ;[jobs[i], jobs[j]] = [jobs[j]!, jobs[i]!]
  }
  let run = 0
  for (const job of jobs) if (job.prompt === options.prompt) job.run = run++
  return jobs
}

/** The completion of `prompt` with nothing else running: one sequence, whole-prompt prefill. */
export function referenceCompletion(
  model: ForwardModel,
  prompt: number[],
  maxTokens: number,
  sampling: SamplingParams | null = null,
  constraint?: TokenConstraint,
): Promise<Completion> {
  const scheduler = new Scheduler(model, { maxBatchSize: 1, prefillChunkSize: model.maxBatchTokens })
  return complete(scheduler, prompt, maxTokens, sampling, constraint)
}

/**
 * Serves the jobs of one phase: the number of requests in flight is redrawn after every
 * completion, between 1 and twice the batch size, so batches grow, shrink and mix prefill chunks
 * with decodes throughout.
 */
async function servePhase(
  model: ForwardModel,
  serving: SchedulerOptions,
  jobs: Job[],
  rand: () => number,
  onDone: (job: Job, c: Completion) => void,
  constraints?: CheckOptions['constraints'],
): Promise<number> {
  const scheduler = new Scheduler(model, serving)
  const inFlight = new Set<Promise<void>>()
  let target = 1
  for (const job of jobs) {
    while (inFlight.size >= target) {
      await Promise.race(inFlight)
      target = 1 + Math.floor(rand() * 2 * scheduler.maxBatchSize)
    }
    const constraint = job.constrained ? await constraints!.make() : undefined
    const p: Promise<void> = complete(scheduler, job.prompt, job.maxTokens, job.sampling, constraint).then((c) => {
      inFlight.delete(p)
      onDone(job, c)
    })
    inFlight.add(p)
  }
  await Promise.all(inFlight)
  return scheduler.load.peakRunning
}

export async function runCheck(model: ForwardModel, options: CheckOptions): Promise<CheckReport> {
  if (options.phases.length === 0) throw new RangeError('runCheck: expected at least one serving phase')
  const rand = mulberry32(options.seed)
  const started = performance.now()
  const reference = await referenceCompletion(
    model,
    options.prompt,
    options.maxTokens,
    options.sampling ?? null,
    options.constraints?.target ? await options.constraints.make() : undefined,
  )
  const jobs = jobsFor(options, rand)
  const completions: Completion[] = new Array(options.runs)
  let generated = reference.tokens.length
  let maxConcurrent = 1
  let done = 0
  const perPhase = Math.ceil(jobs.length / options.phases.length)
  for (let p = 0; p < options.phases.length; p++) {
    const slice = jobs.slice(p * perPhase, (p + 1) * perPhase)
    const peak = await servePhase(model, options.phases[p]!, slice, rand, (job, c) => {
      generated += c.tokens.length
      if (job.run >= 0) completions[job.run] = c
      options.onProgress?.(++done, jobs.length)
    }, options.constraints)
    maxConcurrent = Math.max(maxConcurrent, peak)
  }
  const seconds = (performance.now() - started) / 1000

  const key = (c: Completion, withLogprobs: boolean) =>
    c.tokens.join(',') + (withLogprobs ? '|' + Buffer.from(Float64Array.from(c.logprobs).buffer).toString('base64') : '')
  const distinct = new Set(completions.map((c) => key(c, true)))
  const distinctTexts = new Set(completions.map((c) => key(c, false)))
  let identical = 0
  let logprobOnly = 0
  let first: Divergence | null = null
  completions.forEach((c, run) => {
    const d = divergence(reference, c, run)
    if (!d) return void identical++
    if (key(c, false) === key(reference, false)) logprobOnly++
    if (!first || d.index < first.index) first = d
  })
  return {
    runs: options.runs,
    maxTokens: options.maxTokens,
    distinctCompletions: distinct.size,
    distinctTexts: distinctTexts.size,
    identicalToReference: identical,
    logprobOnlyDifferences: logprobOnly,
    firstDivergence: first,
    reference,
    generatedTokens: generated,
    seconds,
    tokensPerSecond: generated / seconds,
    maxConcurrentSeen: maxConcurrent,
    phases: options.phases,
    sampling: options.sampling ?? null,
  }
}

/** Phases that sweep the batch size from 1 to `maxBatchSize` and vary the prefill chunk size. */
export function defaultPhases(maxBatchSize: number, maxBatchTokens: number): SchedulerOptions[] {
  const chunk = (n: number) => Math.max(1, Math.min(n, maxBatchTokens))
  const batch = (n: number) => Math.max(1, Math.min(n, maxBatchSize))
  return [
    { maxBatchSize: batch(maxBatchSize), prefillChunkSize: chunk(maxBatchTokens) },
    { maxBatchSize: batch(Math.ceil(maxBatchSize / 2) + 1), prefillChunkSize: chunk(7) },
    { maxBatchSize: batch(3), prefillChunkSize: chunk(64) },
    { maxBatchSize: batch(maxBatchSize), prefillChunkSize: chunk(1) },
    { maxBatchSize: batch(Math.ceil(maxBatchSize / 4) + 2), prefillChunkSize: chunk(100) },
  ]
}
