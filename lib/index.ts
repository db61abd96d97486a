// The public surface of detinfer (re-exports only).
export { loadModel, defaultModelPath, Model } from './model.js'
export type { LoadModelOptions, LoadProgress, Prompt, ScoreResult } from './model.js'
export type { ChatMessage } from './tokenizer.js'
export type { GenerateOptions, GenerateResult, GenerationTimings, StreamPiece } from './generate.js'
export { DisposedError, RequestTooLargeError } from './errors.js'
export { resolveDevice, cudaStatus, setVariantKernels, variantKernels } from './device.js'
export type { DeviceOption } from './device.js'
export type { CudaStatus, CudaDevice, DeviceName } from './native.js'
