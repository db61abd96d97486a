// `detinfer serve`: the OpenAI-compatible HTTP server (lib/server/) over one model. It listens at
// once (GET /health answers 503 while the weights load, 200 when ready; a model that fails to load
// closes the server and exits with status 1), and on SIGINT or SIGTERM stops accepting requests,
// lets those in flight finish within --shutdown-timeout, and exits 0.
import { basename, resolve } from 'node:path'
import { Command, Option } from 'commander'
import { defaultModelPath, loadModelFrom, readModelDir, type LoadModelOptions, type Model } from '../api.js'
import { CHAT_REQUEST_VARIABLES, InferenceServer } from '../server/app.js'
import { hashModelFiles, systemFingerprint } from '../server/fingerprint.js'
import { TOOL_CALL_PARSERS, type ToolCallParser } from '../server/tool-calls.js'
import { describeSamplingDefaults, readGenerationDefaults } from '../server/generation-config.js'
import { packageVersion } from './package-info.js'
import { readTextFile } from '../files.js'
import { GRAMMAR_WORKERS_DEFAULT_CAP } from '../grammar.js'
import { integer, jsonObject, origins, positive } from './parse.js'

/** The environment variable that sets --api-key. */
export const API_KEY_ENV = 'DETINFER_API_KEY'

interface ServeFlags {
  model?: string
  host: string
  port: number
  servedModelName?: string
  device: 'auto' | 'cpu' | 'cuda'
  maxBatchSize?: number
  maxBatchTokens?: number
  prefillChunkSize?: number
  kvCacheTokens?: number
  prefixCache: boolean
  cudaGraphs: boolean
  tensorParallel?: number
  grammarWorkers?: number
  maxQueued: number
  apiKey?: string
  bodyLimit: number
  shutdownTimeout: number
  toolCallParser?: ToolCallParser
  chatTemplate?: string
  defaultChatTemplateKwargs?: Record<string, unknown>
  generationConfig: string
  allowedOrigins?: string[] | '*'
}

function log(line: string): void {
  process.stderr.write(`detinfer serve: ${line}\n`)
}

export function serveCommand(): Command {
  return new Command('serve')
    .description('serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)')
    .option('-m, --model <dir|repo-id>', 'Hugging Face model directory, or repo id (owner/name[@revision]) already in the Hugging Face cache (default: the model shipped with detinfer)')
    .option('--host <address>', 'address to listen on (0.0.0.0 opens the server to the network)', '127.0.0.1')
    .option('--port <n>', 'port to listen on (0: any free port)', integer, 8000)
    .option('--served-model-name <name>', "the model's name in the API (default: the repo id, or the directory's name)")
    .addOption(new Option('--device <device>', 'where to run').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .option('--max-batch-size <n>', 'sequences decoded together at most', positive)
    .option('--max-batch-tokens <n>', 'tokens in one forward pass at most', positive)
    .option('--prefill-chunk-size <n>', 'prompt tokens of one sequence per forward pass at most', positive)
    .option('--kv-cache-tokens <n>', 'KV-cache capacity in tokens', positive)
    .option('--no-prefix-cache', 'do not keep KV-cache blocks of prompt prefixes for later requests')
    .option('--tensor-parallel <n>', 'emulate tensor parallelism over n ranks (1, 2, 4 or 8; above 1 on the CPU only): the same bits at every n', integer)
    .option('--no-cuda-graphs', 'launch every op of a decode step instead of replaying CUDA graphs (same bits)')
    .option('--grammar-workers <n>', `worker threads that compute structured output's token masks in parallel (0: all on the main thread; default: one less than the cores, at most ${GRAMMAR_WORKERS_DEFAULT_CAP}; same bits)`, integer)
    .option('--max-queued <n>', 'sequences that may wait for a place in the batch; beyond them requests get 429', integer, 256)
    .option('--allowed-origins <origins>', "origins whose web pages may call the server (CORS), comma-separated (e.g. http://localhost:5173), or '*' for any; none by default", origins)
    .addOption(new Option('--api-key <key>', 'require Authorization: Bearer <key> on every route but /health and /metrics').env(API_KEY_ENV))
    .option('--body-limit <bytes>', 'largest request body', positive, 4 * 1024 * 1024)
    .option('--shutdown-timeout <seconds>', 'on SIGINT/SIGTERM, how long requests in flight may take to finish', integer, 30)
    .option('--chat-template <file>', "a chat template (Jinja) to use instead of the model's")
    .option(
      '--generation-config <auto|none|dir>',
      "sampling defaults for what a request leaves out (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens): auto, the model's generation_config.json; none, OpenAI's; or a directory's generation_config.json",
      'auto',
    )
    .option('--default-chat-template-kwargs <json>', 'chat template variables of every chat request, under the request\'s chat_template_kwargs, e.g. \'{"enable_thinking": false}\'', jsonObject)
    .addOption(
      new Option('--tool-call-parser <format>', 'read tool calls in chat answers (hermes: the <tool_call> blocks of Qwen2.5, Qwen3 and Hermes models; llama3_json: the JSON calls of Llama 3.1 and 3.2); without it, chat requests with tools are refused unless tool_choice is "none", "required" or a named function').choices(TOOL_CALL_PARSERS),
    )
    .action(async (flags: ServeFlags) => {
      if (flags.port < 0 || flags.port > 65535) throw new Error(`Expected integer between 0 and 65535 for --port but received ${flags.port}`)
      if (flags.maxQueued < 0) throw new Error(`Expected integer of at least 0 for --max-queued but received ${flags.maxQueued}`)
      if (flags.shutdownTimeout < 0) throw new Error(`Expected integer of at least 0 for --shutdown-timeout but received ${flags.shutdownTimeout}`)
      // An empty key (`--api-key "$KEY"` with KEY unset) would otherwise serve without one.
      if (flags.apiKey === '') throw new Error(`Expected a non-empty key for --api-key (or ${API_KEY_ENV}) but received ""`)
      const defaults = flags.defaultChatTemplateKwargs
      for (const key of CHAT_REQUEST_VARIABLES)
        if (defaults && Object.hasOwn(defaults, key))
          throw new Error(`Expected no ${key} in --default-chat-template-kwargs (each request sets it) but received ${JSON.stringify(defaults[key])}`)
      const chatTemplate = flags.chatTemplate === undefined ? undefined : await readTextFile(flags.chatTemplate, '--chat-template')
      const source = await readModelDir(flags.model ?? defaultModelPath) // a bad model directory fails before the server listens
      const dir = source.path
      const generation =
        flags.generationConfig === 'none'
          ? null
          : flags.generationConfig === 'auto'
            ? await readGenerationDefaults(dir)
            : await readGenerationDefaults(flags.generationConfig, { required: true })
      const sampling = generation?.sampling ?? {}
      const described = describeSamplingDefaults(sampling)
      if (generation && described) log(`sampling defaults from ${generation.file}: ${described} (\`--generation-config none\` for OpenAI's)`)
      const server = new InferenceServer({
        // A model from the Hugging Face cache goes by its repo id, not its snapshot's commit hash.
        modelName: flags.servedModelName ?? source.repoId ?? basename(resolve(dir)),
        ...(flags.apiKey && { apiKey: flags.apiKey }),
        maxQueued: flags.maxQueued,
        bodyLimit: flags.bodyLimit,
        ...(flags.toolCallParser && { toolCallParser: flags.toolCallParser }),
        ...(defaults && { defaultChatTemplateKwargs: defaults }),
        ...(described && { samplingDefaults: sampling }),
        ...(flags.allowedOrigins && { allowedOrigins: flags.allowedOrigins }),
      })
      const address = await server.app.listen({ host: flags.host, port: flags.port })
      log(`listening on ${address} (GET /health answers 503 until the model is loaded)`)

      let model: Model | null = null
      let stopping: Promise<void> | null = null
      const stop = (signal: string) => {
        if (stopping) return
        log(`${signal}: no new requests; waiting up to ${flags.shutdownTimeout} s for those in flight`)
        stopping = (async () => {
          await server.shutdown(flags.shutdownTimeout * 1000)
          await model?.dispose()
          log('stopped')
          process.exit(0)
        })()
      }
      process.on('SIGINT', () => stop('SIGINT'))
      process.on('SIGTERM', () => stop('SIGTERM'))

      const options: LoadModelOptions = {
        device: flags.device,
        ...(flags.maxBatchSize !== undefined && { maxBatchSize: flags.maxBatchSize }),
        ...(flags.maxBatchTokens !== undefined && { maxBatchTokens: flags.maxBatchTokens }),
        ...(flags.prefillChunkSize !== undefined && { prefillChunkSize: flags.prefillChunkSize }),
        ...(flags.kvCacheTokens !== undefined && { kvCacheTokens: flags.kvCacheTokens }),
        ...(!flags.prefixCache && { prefixCache: false }),
        ...(!flags.cudaGraphs && { cudaGraphs: false }),
        ...(flags.tensorParallel !== undefined && { tensorParallel: flags.tensorParallel }),
        ...(flags.grammarWorkers !== undefined && { grammarWorkers: flags.grammarWorkers }),
        ...(chatTemplate !== undefined && { chatTemplate }),
      }
      const started = performance.now()
      const loading = loadModelFrom(source, options)
      let loaded: Model, modelHash: string
      try {
        ;[loaded, modelHash] = await Promise.all([loading, hashModelFiles(dir)])
      } catch (err) {
        // A server that cannot load its model must not stay up answering 503: stop listening,
        // free what did load, and fail (status 1).
        await server.shutdown(0)
        await loading.then((m) => m.dispose(), () => {})
        throw err
      }
      model = loaded
      if (stopping) return
      // The server's own template and default variables change the prompts, and its sampling
      // defaults the completions of requests that leave a parameter out: all part of the domain.
      const prompts = [
        ...(chatTemplate !== undefined ? [`chat template\0${chatTemplate}`] : []),
        ...(defaults ? [`default chat template kwargs\0${JSON.stringify(defaults)}`] : []),
        ...(described ? [`sampling defaults\0${described}`] : []),
      ].join('\n')
      const fingerprint = systemFingerprint(modelHash, packageVersion(), loaded.device, flags.tensorParallel, prompts)
      server.setModel(loaded, fingerprint)
      const seconds = ((performance.now() - started) / 1000).toFixed(1)
      const where = source.repoId === undefined ? dir : `${flags.model} (${dir})`
      log(`ready: ${where} on ${loaded.device} in ${seconds} s, model name ${JSON.stringify(server.options.modelName)}, system_fingerprint ${fingerprint}`)
    })
}
