// The one place GPU tests decide whether to run. Without a usable CUDA device they skip, and the
// reason is printed once so a CI log says why. With DETINFER_REQUIRE_GPU=1 (the GPU workflow)
// a missing GPU fails them instead.
import { describe, it } from 'vitest'
import { native } from '../../lib/native.js'

const status = native().cudaStatus()
export const gpuAvailable = status.available
export const gpuSkipReason = status.available ? '' : status.reason
const gpuRequired = process.env.DETINFER_REQUIRE_GPU === '1'

let told = false
/** `describe` when a GPU is usable, `describe.skip` (with a message) otherwise. */
export function describeGpu(name: string, fn: () => void): void {
  if (gpuAvailable) {
    describe(name, fn)
    return
  }
  if (gpuRequired) {
    describe(name, () => {
      it('runs on a GPU', () => {
        throw new Error(`DETINFER_REQUIRE_GPU=1 but no GPU is usable: ${gpuSkipReason}`)
      })
    })
    return
  }
  if (!told) {
    told = true
    console.log(`GPU tests skipped: ${gpuSkipReason}`)
  }
  describe.skip(name, fn)
}
