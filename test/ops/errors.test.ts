// Bad input to any op is a JS exception with a message naming the op, the argument, what was
// expected and what was given; never a crash.
import { describe, expect, it } from 'vitest'
import { native } from '../../lib/native.js'
import { tensorFrom } from '../../lib/tensor.js'

const n = native()
const bf = (shape: number[]) => tensorFrom('cpu', 'bf16', shape, new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.5))
const i32 = (values: number[]) => tensorFrom('cpu', 'i32', [values.length], values)
const f32 = (shape: number[]) => tensorFrom('cpu', 'f32', shape, new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.25))

describe('op argument validation', () => {
  it('rejects a non-tensor argument', () => {
    expect(() => n.rmsnorm(bf([2, 4]), 3 as never, bf([4]), 1e-6)).toThrow('rmsnorm: expected a Tensor for x but received 3')
    expect(() => n.matmul(bf([2, 4]), bf([2, 4]), undefined as never, null)).toThrow('expected a Tensor for w but received undefined')
  })

  it('rejects wrong dtypes', () => {
    expect(() => n.matmul(bf([2, 3]), f32([2, 4]), bf([3, 4]), null)).toThrow(
      'matmul: expected a to be bf16 but received f32[2,4] on cpu',
    )
    expect(() => n.argmax(f32([2]), f32([2, 5]))).toThrow('argmax: expected out to be i32 but received f32[2] on cpu')
  })

  it('rejects mismatched shapes', () => {
    expect(() => n.matmul(bf([2, 3]), bf([2, 4]), bf([3, 5]), null)).toThrow(
      'matmul: expected dimension 1 of a to be 5 (K, the second dimension of w) but received bf16[2,4] on cpu',
    )
    expect(() => n.rmsnorm(bf([2, 4]), bf([2, 4]), bf([5]), 1e-6)).toThrow(
      'rmsnorm: expected the last dimension of x to equal the size of w (5)',
    )
    expect(() => n.add(bf([2, 4]), bf([2, 4]), bf([4, 2]))).toThrow('add: expected a and b to have the same shape')
  })

  it('rejects out-of-range ids and positions without crashing', () => {
    expect(() => n.embedding(bf([1, 4]), bf([3, 4]), i32([3]))).toThrow('embedding: id 3 at index 0 is out of range [0, 3)')
    expect(() => n.tokenLogprobs(f32([1]), f32([1, 5]), i32([-1]))).toThrow('token_logprobs: id -1 at row 0 is out of range')
    const cosSin = f32([4, 2])
    expect(() => n.rope(bf([1, 1, 2]), i32([4]), cosSin)).toThrow("rope: position 4 at index 0 is outside the table's [0, 4)")
  })

  it('rejects bad tensor construction', () => {
    expect(() => n.empty('tpu' as never, 'f32', [2])).toThrow("Expected 'cpu' or 'cuda' for device but received 'tpu'")
    expect(() => n.empty('cpu', 'f64' as never, [2])).toThrow('Expected one of bf16, f16, f32, i32 for dtype')
    expect(() => n.empty('cpu', 'f32', [2, -1])).toThrow('empty: expected an array of non-negative integers for shape')
    expect(() => n.fromBuffer('cpu', 'f32', [3], new Float32Array(2))).toThrow(
      'fromBuffer: expected 12 bytes of data for f32[3] on cpu but received 8',
    )
    expect(() => n.view(f32([2, 3]), [4, 2])).toThrow('cannot view f32[2,3] on cpu as [4,2]: element counts differ')
  })

  it('rejects use after dispose', () => {
    const t = f32([2])
    t.dispose()
    expect(t.disposed).toBe(true)
    expect(() => n.copy(f32([2]), t)).toThrow('copy: tensor src was disposed')
    expect(() => t.shape).toThrow('cannot read shape of a disposed tensor')
  })

  it('explains why CUDA cannot be used', () => {
    const status = n.cudaStatus()
    if (status.available) return
    expect(() => n.empty('cuda', 'f32', [1])).toThrow(/CUDA device requested but .*use device: 'cpu'/)
  })
})
