// `detinfer info`: what this installation can run on.
import { Command } from 'commander'
import { cudaStatus, variantKernels } from '../device.js'
import { nativeAddonPath } from '../native.js'
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
      const cuda = cudaStatus()
      const info = {
        version: packageVersion(),
        node: process.version,
        napi: process.versions.napi,
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
        variantKernels: variantKernels(),
      }
      if (opts.json) {
        process.stdout.write(JSON.stringify(info, null, 2) + '\n')
        return
      }
      const lines = [
        `detinfer ${info.version} (Node.js ${info.node}, N-API ${info.napi})`,
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
      ]
      process.stdout.write(lines.join('\n') + '\n')
    })
}
