// system_fingerprint: the name of a determinism domain. Two answers with equal fingerprints to
// equal requests are equal bit for bit, so the fingerprint covers everything the bits depend on:
// the model's files (weights, config, tokenizer and chat template), the package version, the
// backend, on the GPU the kernel family and the architecture they were built for, the
// tensor-parallel setting (unset gives other bits than any degree, every degree the same ones),
// and the server's own chat template or default template variables when it has them.
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { cudaStatus } from '../device.js'
import type { DeviceName } from '../native.js'

const MODEL_FILES = /^(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|chat_template\.jinja|.*\.safetensors|model\.safetensors\.index\.json)$/

/** SHA-256 over the model directory's files that decide its outputs, in name order (streamed: large weights are fine). */
export async function hashModelFiles(dir: string): Promise<string> {
  const names = (await readdir(dir)).filter((n) => MODEL_FILES.test(n)).sort()
  const all = createHash('sha256')
  for (const name of names) {
    const one = createHash('sha256')
    for await (const chunk of createReadStream(join(dir, name), { highWaterMark: 1 << 22 })) one.update(chunk as Buffer)
    all.update(`${name}\0${one.digest('hex')}\n`)
  }
  return all.digest('hex')
}

/** The kernels that produce the bits: "cpu", or the GPU's matmul family and compute capability. */
export function kernelFamily(device: DeviceName): string {
  if (device === 'cpu') return 'cpu'
  const s = cudaStatus()
  return `cuda ${s.matmulKernels} sm_${(s.devices[0]?.computeCapability ?? '?').replace('.', '')}`
}

/**
 * `prompts` names what the server changes in how requests are served, when it does: a chat
 * template given instead of the model's, default chat template variables, sampling defaults
 * (equal requests would otherwise get other prompts or other sampling, hence other bits, under
 * one fingerprint).
 */
export function systemFingerprint(modelHash: string, version: string, device: DeviceName, tensorParallel?: number, prompts?: string): string {
  const partition = tensorParallel === undefined ? 'no tensor parallelism' : 'tensor parallel'
  const domain = `${modelHash}\n${version}\n${device}\n${kernelFamily(device)}\n${partition}${prompts ? `\n${prompts}` : ''}`
  return `fp_${createHash('sha256').update(domain).digest('hex').slice(0, 16)}`
}
