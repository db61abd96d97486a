// `detinfer info`: what this installation can run on.
import { availableParallelism } from 'node:os'
import { Command } from 'commander'
import { cudaStatus, variantKernels } from '../device.js'
import { defaultGrammarWorkers, GRAMMAR_WORKERS_DEFAULT_CAP } from '../grammar.js'
import { hubCacheDir } from '../hub-cache.js'
import { BATCH_BUCKETS, MIN_CONTEXT_BUCKET } from '../model/decode-graphs.js'
import { nativeAddonPath, prebuiltPackage, sourceBuildPath, type CudaStatus } from '../native.js'
import { packageVersion } from './package-info.js'

function cudaVersion(v: number): string {
  // CUDA encodes versions as 1000 * major + 10 * minor.
  return v > 0 ? `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}` : 'none'
}

export function infoCommand(): Command {
  return new Command('info')
    .description('show the backend, GPUs, compiled CUDA architectures and versions')
    .option('--json', 'print the information as JSON')
    .action((opts: { json?: boolean }) => {
      const installation = {
        version: packageVersion(),
        node: process.version,
        napi: process.versions.napi,
        platform: `${process.platform}-${process.arch}`,
      }
      let cuda: CudaStatus
      try {
        cuda = cudaStatus()
      } catch (err) {
        printWithoutAddon(installation, err, opts.json === true)
        throw err
      }
      const info = {
        ...installation,
        backend: cuda.available ? 'cuda' : 'cpu',
        addon: nativeAddonPath(),
        cuda: {
          compiled: cuda.compiled,
          available: cuda.available,
          reason: cuda.reason,
          architectures: cuda.archs,
          runtime: cudaVersion(cuda.runtimeVersion),
          driver: cudaVersion(cuda.driverVersion),
          matmulKernels: cuda.matmulKernels,
        },
        devices: cuda.devices,
        // Where -m owner/name finds models (the Hugging Face cache, as huggingface_hub finds it).
        huggingFaceCache: hubCacheDir(),
        variantKernels: variantKernels(),
        // Decode steps padded to these buckets are replayed as CUDA graphs (README: CUDA graphs).
        cudaGraphs: {
          batchBuckets: BATCH_BUCKETS,
          contextBuckets: `${MIN_CONTEXT_BUCKET}, doubling up to the model's longest sequence`,
          memory: 'captured when a bucket is reused; 8 MiB for the 13 buckets of a Qwen3-0.6B benchmark on an H200',
        },
        // Threads that compute structured output's masks by default (README: Grammar workers).
        grammarWorkers: { default: defaultGrammarWorkers(), cores: availableParallelism() },
      }
      if (opts.json) {
        process.stdout.write(JSON.stringify(info, null, 2) + '\n')
        return
      }
      const lines = [
        ...headerLines(info),
        `addon:         ${info.addon}`,
        `backend:       ${info.backend}${cuda.available ? '' : ` (CUDA: ${cuda.reason || 'not available'})`}`,
        `CUDA build:    ${cuda.compiled ? `compiled for ${cuda.archs || 'unknown architectures'}` : 'not compiled (CPU only)'}`,
        `CUDA runtime:  ${info.cuda.runtime}`,
        `CUDA driver:   ${info.cuda.driver}`,
        ...(cuda.devices.length
          ? cuda.devices.map(
              (d) =>
                `GPU ${d.index}:         ${d.name}, compute capability ${d.computeCapability}, ` +
                `${(d.totalMemory / 2 ** 30).toFixed(1)} GiB, ${d.multiprocessors} SMs`,
            )
          : ['GPUs:          none found']),
        ...(cuda.available ? [`matmul:        ${cuda.matmulKernels} kernels`] : []),
        hubCacheLine(),
        `CUDA graphs:   decode steps padded to ${BATCH_BUCKETS.join(', ')} sequences (up to maxBatchSize)`,
        `               and ${MIN_CONTEXT_BUCKET}, ${2 * MIN_CONTEXT_BUCKET}, ... keys of context; ${info.cudaGraphs.memory}`,
        `grammar:       ${info.grammarWorkers.default} worker thread${info.grammarWorkers.default === 1 ? '' : 's'} for structured output's masks by default ` +
          `(one less than the ${info.grammarWorkers.cores} cores, at most ${GRAMMAR_WORKERS_DEFAULT_CAP}; --grammar-workers on serve)`,
      ]
      process.stdout.write(lines.join('\n') + '\n')
    })
}

interface Installation {
  version: string
  node: string
  napi: string | undefined
  platform: string
}

function headerLines(installation: Installation): string[] {
  return [`detinfer ${installation.version} (Node.js ${installation.node}, N-API ${installation.napi})`, `platform:      ${process.platform} ${process.arch}`]
}

function hubCacheLine(): string {
  return `HF cache:      ${hubCacheDir()} (models by repo id, -m owner/name)`
}

/**
 * What info knows without the addon, and where the addon was looked for; the load error, which says
 * how to get one, goes to stderr as every failure of the command does.
 */
function printWithoutAddon(installation: Installation, err: unknown, json: boolean): void {
  if (json) {
    const info = {
      ...installation,
      addon: null,
      addonSearched: [sourceBuildPath, prebuiltPackage],
      addonError: err instanceof Error ? err.message : String(err),
      huggingFaceCache: hubCacheDir(),
    }
    process.stdout.write(JSON.stringify(info, null, 2) + '\n')
    return
  }
  const lines = [
    ...headerLines(installation),
    `addon:         not loaded; looked for ${sourceBuildPath} (built from source), then ${prebuiltPackage} (prebuilt)`,
    hubCacheLine(),
  ]
  process.stdout.write(lines.join('\n') + '\n')
}
