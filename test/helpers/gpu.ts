// The one place GPU tests decide whether to run. Without a usable CUDA device they skip, and the
// reason is printed once so a CI log says why.
import { describe } from 'vitest'
import { native } from '../../lib/native.js'

const status = native().cudaStatus()
export const gpuAvailable = status.available
export const gpuSkipReason = status.available ? '' : status.reason

let told = false
/** `describe` when a GPU is usable, `describe.skip` (with a message) otherwise. */
export function describeGpu(name: string, fn: () => void): void {
  if (!gpuAvailable && !told) {
    told = true
    console.log(`GPU tests skipped: ${gpuSkipReason}`)
  }
  ;(gpuAvailable ? describe : describe.skip)(name, fn)
}
