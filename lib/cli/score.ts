// `detinfer score [prompt]`: the log-prob of each token of a completion after a prompt, from the
// same forward pass as generation. For the ids `generate --json` printed, the log-probs are the
// ones it printed, bit for bit; --system, --chat-template, --chat-template-kwargs and
// --tensor-parallel build the prompt and the forward pass as generate's do, so that those runs can
// be scored too.
import { Command, Option } from 'commander'
import { defaultModelPath, loadModelFrom, readModelDir } from '../api.js'
import { checkInteger } from '../errors.js'
import { MAX_TOP_LOGPROBS } from '../model/output-head.js'
import { readTextFile } from '../files.js'
import { KV_CACHE_TOKENS_HELP, ids, integer, jsonObject, positive } from './parse.js'
import { flagsOf, namingFlags } from './option-flags.js'
import { withLoadProgress } from './progress.js'

interface ScoreFlags {
  model?: string
  promptFile?: string
  completion?: string
  completionFile?: string
  completionIds?: number[]
  device: 'auto' | 'cpu' | 'cuda'
  chat?: boolean
  system?: string
  chatTemplate?: string
  chatTemplateKwargs?: Record<string, unknown>
  tensorParallel?: number
  json?: boolean
  topLogprobs?: number
  kvCacheTokens?: number
}

async function completionOf(flags: ScoreFlags): Promise<string | number[]> {
  const given = [flags.completion, flags.completionFile, flags.completionIds].filter((c) => c !== undefined)
  if (given.length !== 1) throw new Error('give the completion with exactly one of --completion, --completion-file and --completion-ids')
  if (flags.completionIds !== undefined) return flags.completionIds
  return flags.completionFile !== undefined ? readTextFile(flags.completionFile, '--completion-file') : flags.completion!
}

/** The library options `score` sets from its flags, by the flags' names. */
const SCORE_FLAGS = flagsOf(['topLogprobs', 'chatTemplateVariables', 'tensorParallel', 'kvCacheTokens'])

export function scoreCommand(): Command {
  return new Command('score')
    .description("print the log-prob of each token of a completion after a prompt (generation's forward pass)")
    .argument('[prompt]', 'the prompt (or use --prompt-file)')
    .option('-m, --model <dir|repo-id>', 'Hugging Face model directory, or repo id (owner/name[@revision]) already in the Hugging Face cache (default: the model shipped with detinfer)')
    .option('--prompt-file <file>', 'read the prompt from a file')
    .option('-c, --completion <text>', 'the completion, as text (tokenized on its own)')
    .option('--completion-file <file>', 'read the completion text from a file')
    .option('--completion-ids <ids>', 'the completion as token ids, e.g. the tokens of generate --json', ids)
    .addOption(new Option('--device <device>', 'where to run').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .option('--chat', "wrap the prompt in the model's chat template")
    .option('--system <text>', 'a system message before the prompt (implies --chat)')
    .option('--chat-template <file>', "a chat template (Jinja) to use instead of the model's (with --chat or --system)")
    .option('--chat-template-kwargs <json>', 'variables for the chat template, e.g. \'{"enable_thinking": false}\' (with --chat or --system)', jsonObject)
    .option('--tensor-parallel <n>', 'emulate tensor parallelism over n ranks (1, 2, 4 or 8; above 1 on the CPU only): the same bits at every n', integer)
    .option('--json', 'print tokens and log-probs as JSON')
    .option('--top-logprobs <n>', 'with --json: the n most likely tokens and their log-probs at each position (0-20)', integer)
    .option('--kv-cache-tokens <n>', KV_CACHE_TOKENS_HELP, positive)
    .action(namingFlags(SCORE_FLAGS, scoreCompletion))
}

async function scoreCompletion(argument: string | undefined, flags: ScoreFlags): Promise<void> {
  if (argument !== undefined && flags.promptFile !== undefined) throw new Error('give the prompt as an argument or with --prompt-file, not both')
  const text = flags.promptFile !== undefined ? await readTextFile(flags.promptFile, '--prompt-file') : argument
  if (text === undefined) throw new Error('no prompt: give it as an argument or with --prompt-file')
  const chat = flags.chat === true || flags.system !== undefined
  if (flags.chatTemplateKwargs && !chat) throw new Error('--chat-template-kwargs applies to the chat template: give --chat or --system too')
  if (flags.chatTemplate !== undefined && !chat) throw new Error('--chat-template applies to chat prompts: give --chat or --system too')
  // As generate builds it: a system message, then the prompt as the user's.
  const prompt =
    flags.system !== undefined
      ? [
          { role: 'system' as const, content: flags.system },
          { role: 'user' as const, content: text },
        ]
      : text
  const chatTemplate = flags.chatTemplate === undefined ? undefined : await readTextFile(flags.chatTemplate, '--chat-template')
  const completion = await completionOf(flags)
  if (flags.topLogprobs !== undefined && !flags.json) throw new Error('--top-logprobs shows in the --json output: give --json too')
  const modelName = flags.model ?? defaultModelPath
  // Bad options fail before the weights load, as generate's do; the model checks them again.
  const source = await readModelDir(modelName)
  if (flags.topLogprobs !== undefined) checkInteger('topLogprobs', flags.topLogprobs, 0, MAX_TOP_LOGPROBS)
  if (Array.isArray(completion)) completion.forEach((id, i) => checkInteger(`completion[${i}]`, id, 0, source.config.vocabSize - 1))
  const model = await withLoadProgress('model', (onProgress) =>
    loadModelFrom(source, {
      device: flags.device,
      maxBatchSize: 1,
      ...(chatTemplate !== undefined && { chatTemplate }),
      ...(flags.tensorParallel !== undefined && { tensorParallel: flags.tensorParallel }),
      ...(flags.kvCacheTokens !== undefined && { kvCacheTokens: flags.kvCacheTokens }),
      onProgress,
    }),
  )
  try {
    const { tokens, logprobs, topLogprobs } = await model.score(prompt, completion, {
      chat: flags.chat === true,
      ...(flags.chatTemplateKwargs && { chatTemplateVariables: flags.chatTemplateKwargs }),
      ...(flags.topLogprobs !== undefined && { topLogprobs: flags.topLogprobs }),
    })
    const total = logprobs.reduce((a, b) => a + b, 0)
    if (flags.json) {
      process.stdout.write(JSON.stringify({ model: modelName, device: model.device, tokens, logprobs, ...(topLogprobs && { topLogprobs }), total }) + '\n')
      return
    }
    const width = Math.max(5, ...tokens.map((t) => String(t).length))
    for (const [i, t] of tokens.entries())
      process.stdout.write(`${String(t).padStart(width)}  ${logprobs[i]!.toFixed(6).padStart(11)}  ${JSON.stringify(model.detokenize([t]))}\n`)
    process.stdout.write(
      `${tokens.length} tokens: total log-prob ${total.toFixed(6)}, mean ${(total / tokens.length).toFixed(6)}, ` +
        `perplexity ${Math.exp(-total / tokens.length).toFixed(4)}\n`,
    )
  } finally {
    await model.dispose()
  }
}
