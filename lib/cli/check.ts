// `detinfer check`: the determinism experiment (lib/determinism-check.ts) for any model. Completes
// one prompt many times under varied load and reports how many distinct completions came back,
// whether each equals the prompt's completion run alone, bit for bit, and where the first
// divergence is.
// With --variant the same experiment runs again on the variant kernels, for contrast.
import { Command, Option } from 'commander'
import { defaultModelPath, forwardOf, loadModelFrom, loadTokenizer, readModelDir } from '../api.js'
import { defaultPhases, runCheck, type CheckReport } from '../determinism-check.js'
import { resolveGenerateOptions } from '../generate.js'
import { GrammarEngine } from '../grammar.js'
import { resolveDevice, setVariantKernels } from '../device.js'
import { readTextFile } from '../files.js'
import type { SamplingParams } from '../sampling.js'
import { integer, nonNegative, number, positive } from './parse.js'
import { flagsOf, namingFlags } from './option-flags.js'
import { interactiveStderr, withLoadProgress } from './progress.js'

interface CheckFlags {
  model?: string
  promptFile?: string
  runs: number
  maxTokens: number
  noise?: number
  maxBatchSize?: number
  seed: number
  temperature?: number
  topK?: number
  topP?: number
  minP?: number
  samplingSeed?: number
  device: 'auto' | 'cpu' | 'cuda'
  cudaGraphs: boolean
  tensorParallel?: number
  chat?: boolean
  variant?: boolean
  jsonObject?: boolean
  json?: boolean
}

/** The runs' sampling from the flags (null: greedy), checked like generate's options. */
function samplingFrom(flags: CheckFlags, limits: { contextLength: number; vocabSize: number }): SamplingParams | null {
  if (flags.temperature === undefined || flags.temperature === 0) {
    if (flags.topK !== undefined || flags.topP !== undefined || flags.minP !== undefined || flags.samplingSeed !== undefined)
      throw new Error('--top-k, --top-p, --min-p and --sampling-seed apply to sampling: give a --temperature above 0 too')
    if (flags.temperature === undefined) return null
  }
  const options = {
    temperature: flags.temperature,
    seed: flags.samplingSeed ?? 0,
    ...(flags.topK !== undefined && { topK: flags.topK }),
    ...(flags.topP !== undefined && { topP: flags.topP }),
    ...(flags.minP !== undefined && { minP: flags.minP }),
  }
  return resolveGenerateOptions(options, limits).sampling
}

function describeSampling(s: SamplingParams | null): string {
  return s ? `sampling at temperature ${s.temperature}, top-k ${s.topK}, top-p ${s.topP}, min-p ${s.minP ?? 0}, seed ${s.seed}` : 'greedy'
}

function describeDivergence(r: CheckReport): string {
  const d = r.firstDivergence
  if (!d) return 'none'
  const what = d.expectedToken === d.actualToken ? `log-prob ${d.expectedLogprob} vs ${d.actualLogprob}` : `token ${d.expectedToken} vs ${d.actualToken}`
  return `run ${d.run}, token ${d.index}: ${what}`
}

function table(rows: [string, CheckReport][]): string {
  const header = ['kernels', 'runs', 'tokens', 'distinct', 'distinct texts', 'identical', 'first divergence', 'seconds', 'tok/s']
  const body = rows.map(([name, r]) => [
    name,
    String(r.runs),
    String(r.maxTokens),
    String(r.distinctCompletions),
    String(r.distinctTexts),
    `${r.identicalToReference}/${r.runs}`,
    describeDivergence(r),
    r.seconds.toFixed(1),
    r.tokensPerSecond.toFixed(0),
  ])
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)))
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()
  return [line(header), ...body.map(line)].join('\n')
}

/**
 * The library options `check` sets from its flags, by the flags' names. The sampling's seed is
 * --sampling-seed here (--seed orders the arrivals).
 */
const CHECK_FLAGS = { ...flagsOf(['maxTokens', 'temperature', 'topK', 'topP', 'minP', 'tensorParallel', 'maxBatchSize']), seed: '--sampling-seed' }

export function checkCommand(): Command {
  return new Command('check')
    .description('complete one prompt many times under varied batching and count distinct completions')
    .argument('[prompt]', 'the prompt (default: "ROMEO:")')
    .option('-m, --model <dir|repo-id>', 'Hugging Face model directory, or repo id (owner/name[@revision]) already in the Hugging Face cache (default: the model shipped with detinfer)')
    .option('--prompt-file <file>', 'read the prompt from a file')
    .option('--runs <n>', 'completions of the prompt', positive, 1000)
    .option('-n, --max-tokens <n>', 'tokens per completion (EOS does not stop them)', positive, 256)
    .option('--noise <n>', 'other random prompts mixed in (default: half of --runs)', nonNegative)
    .option('--max-batch-size <n>', 'largest batch (default: 64 on CUDA, 16 on the CPU)', positive)
    .option('--seed <n>', 'seed of the arrival order and the noise prompts', nonNegative, 1)
    .option('--temperature <t>', 'sample instead of greedy decoding: every run with the same seed must draw the same tokens', number)
    .option('--top-k <k>', 'with --temperature: sample among the k most likely tokens', integer)
    .option('--top-p <p>', 'with --temperature: sample among the most likely tokens up to probability p', number)
    .option('--min-p <p>', 'with --temperature: sample among tokens at least p times as likely as the most likely one', number)
    .option('--sampling-seed <n>', 'with --temperature: the seed of every run (default 0)', integer)
    .addOption(new Option('--device <device>', 'where to run').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .option('--tensor-parallel <n>', 'emulate tensor parallelism over n ranks (1, 2, 4 or 8; above 1 on the CPU only): the same bits at every n', integer)
    .option('--no-cuda-graphs', 'launch every op of a decode step instead of replaying CUDA graphs (same bits)')
    .option('--chat', "wrap the prompt in the model's chat template")
    .option('--json-object', "hold the prompt's completions, and half of the other prompts', to JSON (structured output); they end at EOS once their JSON is complete")
    .option('--variant', 'also run on the variant kernels (batch-dependent splits), for contrast')
    .option('--json', 'print the reports as JSON')
    .action(namingFlags(CHECK_FLAGS, checkDeterminism))
}

async function checkDeterminism(argument: string | undefined, flags: CheckFlags): Promise<void> {
  if (argument !== undefined && flags.promptFile !== undefined) throw new Error('give the prompt as an argument or with --prompt-file, not both')
  const dir = flags.model ?? defaultModelPath
  const text = flags.promptFile !== undefined ? await readTextFile(flags.promptFile, '--prompt-file') : (argument ?? 'ROMEO:')
  const device = resolveDevice(flags.device)
  const maxBatchSize = flags.maxBatchSize ?? (device === 'cuda' ? 64 : 16)
  const { path, config } = await readModelDir(dir)
  const sampling = samplingFrom(flags, { contextLength: config.maxPositionEmbeddings, vocabSize: config.vocabSize })
  const tokenizer = await loadTokenizer({ path, config })
  const prompt = tokenizer.encodePrompt(text, flags.chat === true)
  if (prompt.length === 0) throw new Error('the prompt is empty after tokenizing')
  const maxNoisePrompt = 64
  const maxBatchTokens = Math.max(256, maxBatchSize * 4)
  const blocksPerSequence = Math.ceil((Math.max(prompt.length, maxNoisePrompt) + flags.maxTokens) / 16)
  const model = await withLoadProgress('model', (onProgress) =>
    loadModelFrom(
      { path, config, device, tokenizer },
      {
        maxBatchTokens,
        maxBatchSize,
        // maxBatchSize sequences in the largest phase, and room for one more.
        kvBlocks: blocksPerSequence * (maxBatchSize + 1),
        prefixCache: false,
        cudaGraphs: flags.cudaGraphs,
        ...(flags.tensorParallel !== undefined && { tensorParallel: flags.tensorParallel }),
        onProgress,
      },
    ),
  )
  const forward = forwardOf(model)
  const grammars = flags.jsonObject ? new GrammarEngine(tokenizer, config.vocabSize) : null
  const constraints = grammars && { make: async () => (await grammars.constrain({ type: 'json_object' }))!, target: true, noiseShare: 0.5 }
  const reports: [string, CheckReport][] = []
  try {
    for (const variant of flags.variant ? [false, true] : [false]) {
      setVariantKernels(variant)
      const name = variant ? 'variant' : 'invariant'
      const total = flags.runs + (flags.noise ?? Math.ceil(flags.runs / 2))
      const report = await runCheck(forward, {
        prompt,
        runs: flags.runs,
        maxTokens: flags.maxTokens,
        sampling,
        noise: { count: total - flags.runs, vocab: Math.min(tokenizer.vocabSize, model.vocabSize), maxPromptTokens: maxNoisePrompt, maxTokens: flags.maxTokens },
        phases: defaultPhases(maxBatchSize, maxBatchTokens),
        seed: flags.seed,
        ...(constraints && { constraints }),
        onProgress: (done, all) => {
          if (interactiveStderr() ? done % 10 === 0 || done === all : done % Math.ceil(all / 4) === 0)
            process.stderr.write(`${interactiveStderr() ? '\r' : ''}${name}: ${done}/${all} requests${interactiveStderr() ? '' : '\n'}`)
        },
      })
      if (interactiveStderr()) process.stderr.write('\n')
      reports.push([name, report])
    }
  } finally {
    setVariantKernels(false)
    grammars?.dispose()
    await model.dispose()
  }
  // Status 1 when an invariant-kernel completion differs, in either output format.
  const invariant = reports[0]![1]
  if (invariant.identicalToReference !== invariant.runs) process.exitCode = 1
  if (flags.json) {
    process.stdout.write(JSON.stringify({ model: dir, device, prompt: text, sampling, reports: Object.fromEntries(reports) }) + '\n')
    return
  }
  process.stdout.write(`model ${dir} on ${device}, prompt ${JSON.stringify(text)} (${prompt.length} tokens), ${describeSampling(sampling)}\n`)
  process.stdout.write(`reference: ${JSON.stringify(tokenizer.decode(reports[0]![1].reference.tokens).slice(0, 120))}\n\n`)
  process.stdout.write(table(reports) + '\n')
}
