import { defineConfig } from 'vitest/config'

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Native tensors and one CUDA stream per process: run test files in forks, one at a time on CI's 2 cores.
    pool: 'forks',
    fileParallelism: false,
  },
})
