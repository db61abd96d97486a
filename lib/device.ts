// Choosing the backend: CUDA when a usable GPU is there, the CPU otherwise.
import { native, type CudaStatus, type DeviceName } from './native.js'

export type DeviceOption = DeviceName | 'auto'

export function cudaStatus(): CudaStatus {
  return native().cudaStatus()
}

/** 'auto' picks CUDA when usable; 'cuda' where none is usable throws an error naming the reason. */
export function resolveDevice(option: DeviceOption = 'auto'): DeviceName {
  if (option !== 'auto' && option !== 'cpu' && option !== 'cuda')
    throw new TypeError(`Expected 'auto', 'cpu' or 'cuda' for device but received ${JSON.stringify(option)}`)
  if (option === 'cpu') return 'cpu'
  const status = cudaStatus()
  if (status.available) return 'cuda'
  if (option === 'cuda') throw new Error(`detinfer: CUDA device requested but ${status.reason}`)
  return 'cpu'
}

/** Makes matmul, the row reductions and attention pick their split from the batch size, like ordinary stacks (for tests and `detinfer check --variant`). */
export function setVariantKernels(enabled: boolean): void {
  native().setVariantKernels(enabled)
}

export function variantKernels(): boolean {
  return native().variantKernels()
}
