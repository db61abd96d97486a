// `detinfer generate [prompt]`: one completion, streamed to stdout as it is generated.
import { Command, Option } from 'commander'
import { defaultModelPath, loadModelFrom, readModelDir } from '../api.js'
import { readJsonFile, readTextFile } from '../files.js'
import { DEFAULT_MAX_TOKENS, resolveGenerateOptions, type GenerateOptions, type JsonSchema } from '../generate.js'
import { KV_CACHE_TOKENS_HELP, integer, jsonObject, logitBiasJson, number, positive } from './parse.js'
import { flagsOf, namingFlags } from './option-flags.js'
import { interactiveStderr, withLoadProgress } from './progress.js'

interface GenerateFlags {
  model?: string
  promptFile?: string
  maxTokens?: number
  temperature?: number
  seed?: number
  topK?: number
  topP?: number
  minP?: number
  frequencyPenalty?: number
  presencePenalty?: number
  repetitionPenalty?: number
  logitBias?: Record<string, unknown>
  topLogprobs?: number
  stop?: string[]
  ignoreEos?: boolean
  device: 'auto' | 'cpu' | 'cuda'
  cudaGraphs: boolean
  tensorParallel?: number
  kvCacheTokens?: number
  chat?: boolean
  chatTemplateKwargs?: Record<string, unknown>
  chatTemplate?: string
  system?: string
  json?: boolean
  jsonObject?: boolean
  jsonSchema?: string
  regex?: string
  choice?: string[]
  grammar?: string
  stream: boolean
}

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value]
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = []
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks).toString('utf8')
}

async function promptText(argument: string | undefined, flags: GenerateFlags): Promise<string> {
  if (argument !== undefined && flags.promptFile !== undefined) throw new Error('give the prompt as an argument or with --prompt-file, not both')
  if (flags.promptFile !== undefined) return readTextFile(flags.promptFile, '--prompt-file')
  if (argument !== undefined) return argument
  if (!process.stdin.isTTY) return readStdin()
  throw new Error('no prompt: give it as an argument, with --prompt-file, or on stdin')
}

/** The library options `generate` sets from its flags, by the flags' names. */
const GENERATE_FLAGS = flagsOf([
  'maxTokens',
  'temperature',
  'seed',
  'topK',
  'topP',
  'minP',
  'frequencyPenalty',
  'presencePenalty',
  'repetitionPenalty',
  'logitBias',
  'topLogprobs',
  'stop',
  'ignoreEos',
  'chatTemplateVariables',
  'responseFormat.schema',
  'responseFormat.pattern',
  'responseFormat.choices',
  'responseFormat.grammar',
  'tensorParallel',
  'kvCacheTokens',
])

export function generateCommand(): Command {
  return new Command('generate')
    .description('generate a completion of a prompt (greedy unless --temperature > 0)')
    .argument('[prompt]', 'the prompt (or use --prompt-file, or stdin)')
    .option('-m, --model <dir|repo-id>', 'Hugging Face model directory, or repo id (owner/name[@revision]) already in the Hugging Face cache (default: the model shipped with detinfer)')
    .option('--prompt-file <file>', 'read the prompt from a file')
    .option('-n, --max-tokens <n>', `tokens to generate at most (default: ${DEFAULT_MAX_TOKENS}, or what the context leaves)`, integer)
    .option('--temperature <t>', 'sampling temperature; 0 is greedy', number)
    .option('--seed <n>', 'seed of the sampling noise (same seed, same completion)', integer)
    .option('--top-k <k>', 'sample among the k most likely tokens', integer)
    .option('--top-p <p>', 'sample among the most likely tokens up to probability p', number)
    .option('--min-p <p>', 'sample among tokens at least p times as likely as the most likely one', number)
    .option('--frequency-penalty <f>', "subtract f times a token's count in the completion so far from its logit (-2 to 2)", number)
    .option('--presence-penalty <p>', 'subtract p from the logit of every token the completion has chosen (-2 to 2)', number)
    .option('--repetition-penalty <r>', 'divide the positive logits of tokens in the prompt or the completion by r, multiply the others (above 0, at most 2; 1: none)', number)
    .option('--logit-bias <json>', 'add biases to token logits, e.g. \'{"1234": -100}\' (ids to -100..100, at most 300)', logitBiasJson)
    .option('--top-logprobs <n>', 'with --json: the n most likely tokens and their log-probs at each position (0-20)', integer)
    .option('--stop <text>', 'stop when the text contains this (repeatable)', collect)
    .option('--ignore-eos', "go on past the model's end-of-sequence token (to --max-tokens or a --stop)")
    .option('--json-object', 'the completion is a JSON object: only tokens that keep it one are chosen')
    .option('--json-schema <file>', 'the completion is JSON that the JSON Schema in this file accepts')
    .option('--regex <pattern>', 'the completion is text that the regular expression matches whole')
    .option('--choice <text>', 'the completion is exactly one of these texts (repeatable)', collect)
    .option('--grammar <file>', "the completion is text of the EBNF grammar in this file (xgrammar's syntax, from the rule root)")
    .addOption(new Option('--device <device>', 'where to run').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .option('--tensor-parallel <n>', 'emulate tensor parallelism over n ranks (1, 2, 4 or 8; above 1 on the CPU only): the same bits at every n', integer)
    .option('--no-cuda-graphs', 'launch every op of a decode step instead of replaying CUDA graphs (same bits)')
    .option('--kv-cache-tokens <n>', KV_CACHE_TOKENS_HELP, positive)
    .option('--chat', "wrap the prompt in the model's chat template")
    .option('--system <text>', 'a system message before the prompt (implies --chat)')
    .option('--chat-template <file>', "a chat template (Jinja) to use instead of the model's (with --chat or --system)")
    .option('--chat-template-kwargs <json>', 'variables for the chat template, e.g. \'{"enable_thinking": false}\' (with --chat or --system)', jsonObject)
    .option('--json', 'print text, tokens, log-probs and timings as JSON')
    .option('--no-stream', 'print the text once it is complete')
    .action(namingFlags(GENERATE_FLAGS, generateCompletion))
}

async function generateCompletion(argument: string | undefined, flags: GenerateFlags): Promise<void> {
  const text = await promptText(argument, flags)
  const prompt =
    flags.system !== undefined
      ? [
          { role: 'system', content: flags.system },
          { role: 'user', content: text },
        ]
      : text
  const options: GenerateOptions = {
    ...(flags.maxTokens !== undefined && { maxTokens: flags.maxTokens }),
    ...(flags.temperature !== undefined && { temperature: flags.temperature }),
    ...(flags.seed !== undefined && { seed: flags.seed }),
    ...(flags.topK !== undefined && { topK: flags.topK }),
    ...(flags.topP !== undefined && { topP: flags.topP }),
    ...(flags.minP !== undefined && { minP: flags.minP }),
    ...(flags.frequencyPenalty !== undefined && { frequencyPenalty: flags.frequencyPenalty }),
    ...(flags.presencePenalty !== undefined && { presencePenalty: flags.presencePenalty }),
    ...(flags.repetitionPenalty !== undefined && { repetitionPenalty: flags.repetitionPenalty }),
    ...(flags.logitBias !== undefined && { logitBias: flags.logitBias as Record<number, number> }),
    ...(flags.topLogprobs !== undefined && { topLogprobs: flags.topLogprobs }),
    ...(flags.stop !== undefined && { stop: flags.stop }),
    ...(flags.ignoreEos && { ignoreEos: true }),
    ...(flags.chat && { chat: true }),
    ...(flags.chatTemplateKwargs && { chatTemplateVariables: flags.chatTemplateKwargs }),
    ...(flags.jsonObject && { responseFormat: { type: 'json_object' } }),
  }
  const formats = [flags.jsonObject && '--json-object', flags.jsonSchema !== undefined && '--json-schema', flags.regex !== undefined && '--regex', flags.choice && '--choice', flags.grammar !== undefined && '--grammar'].filter(Boolean)
  if (formats.length > 1) throw new Error(`give one of --json-object, --json-schema, --regex, --choice and --grammar, not ${formats.join(' and ')}`)
  if (flags.ignoreEos && formats.length) throw new Error(`give --ignore-eos or ${formats[0]}, not both: a text the grammar completes ends at EOS`)
  if (flags.jsonSchema !== undefined) options.responseFormat = { type: 'json_schema', schema: (await readJsonFile(flags.jsonSchema)) as JsonSchema }
  if (flags.regex !== undefined) options.responseFormat = { type: 'regex', pattern: flags.regex }
  if (flags.choice) options.responseFormat = { type: 'choice', choices: flags.choice }
  if (flags.grammar !== undefined) options.responseFormat = { type: 'grammar', grammar: await readTextFile(flags.grammar, '--grammar') }
  if (flags.chatTemplateKwargs && !flags.chat && flags.system === undefined) throw new Error('--chat-template-kwargs applies to the chat template: give --chat or --system too')
  if (flags.chatTemplate !== undefined && !flags.chat && flags.system === undefined) throw new Error('--chat-template applies to chat prompts: give --chat or --system too')
  const chatTemplate = flags.chatTemplate === undefined ? undefined : await readTextFile(flags.chatTemplate, '--chat-template')
  if (flags.topLogprobs !== undefined && !flags.json) throw new Error('--top-logprobs shows in the --json output: give --json too')
  // Without --temperature, or at 0, the completion is greedy, which these would not change (as check).
  if (!(flags.temperature !== undefined && flags.temperature > 0) && [flags.seed, flags.topK, flags.topP, flags.minP].some((v) => v !== undefined))
    throw new Error('--seed, --top-k, --top-p and --min-p apply to sampling: give a --temperature above 0 too')
  const modelDir = flags.model ?? defaultModelPath
  // Bad options fail before the weights load; the model checks them again against its cache.
  const source = await readModelDir(modelDir)
  resolveGenerateOptions(options, { contextLength: source.config.maxPositionEmbeddings, vocabSize: source.config.vocabSize })
  const model = await withLoadProgress('model', (onProgress) =>
    loadModelFrom(source, {
      ...(chatTemplate !== undefined && { chatTemplate }),
      device: flags.device,
      maxBatchSize: 1,
      cudaGraphs: flags.cudaGraphs,
      ...(flags.tensorParallel !== undefined && { tensorParallel: flags.tensorParallel }),
      ...(flags.kvCacheTokens !== undefined && { kvCacheTokens: flags.kvCacheTokens }),
      onProgress,
    }),
  )
  // Ctrl-C while generating ends the generation: what was printed stays, the exit code is 130.
  const interrupt = new AbortController()
  const onSigint = () => interrupt.abort()
  process.once('SIGINT', onSigint)
  options.signal = interrupt.signal
  let pieces = 0
  try {
    if (flags.json) {
      const r = await model.generate(prompt, options)
      process.stdout.write(JSON.stringify({ model: modelDir, device: model.device, ...r }) + '\n')
      return
    }
    if (!flags.stream) {
      const r = await model.generate(prompt, options)
      process.stdout.write(r.text + '\n')
      return
    }
    const started = performance.now()
    for await (const piece of model.stream(prompt, options)) {
      process.stdout.write(piece.text)
      pieces++
    }
    process.stdout.write('\n')
    if (interactiveStderr()) {
      const seconds = (performance.now() - started) / 1000
      process.stderr.write(`${pieces} tokens in ${seconds.toFixed(2)} s on ${model.device}\n`)
    }
  } catch (err) {
    if (!interrupt.signal.aborted) throw err
    if (pieces > 0) process.stdout.write('\n')
    process.stderr.write('detinfer: interrupted\n')
    process.exitCode = 130
  } finally {
    process.off('SIGINT', onSigint)
    await model.dispose()
  }
}
