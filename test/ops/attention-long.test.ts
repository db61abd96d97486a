// Decode at long contexts equals prefill bit for bit (CUDA). A 20,000-key sequence has 79 splits
// of 256 keys, so the decode kernel's partials are merged by the combine pass in three chunks of up
// to 32 splits (attention.cu): the positions below end exactly on a chunk's last split (8191:
// 32 splits), one past it (8192, 16384), and at the end; with each of the decode kernel's two
// pipelines (paired and rotating K/V copies, forced) and the library's choice. Head dims 128 and 64.
// The twin under the variant configuration (split size from the batch size) must differ.
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest'
import { native } from '../../lib/native.js'
import { describeGpu } from '../helpers/gpu.js'
import { AttentionScene, firstDifferentRow, type AttentionShape } from './attention-fixture.js'

const L = 20_000
const POSITIONS = [8191, 8192, 16383, 16384, L - 1]
const SHAPES: AttentionShape[] = [
  { heads: 8, kvHeads: 2, dim: 128, blockSize: 16 },
  { heads: 4, kvHeads: 1, dim: 64, blockSize: 32 },
]

for (const shape of SHAPES) {
  describeGpu(`attention at ${L} keys, head dim ${shape.dim} (cuda)`, () => {
    const row = shape.heads * shape.dim
    let scene: AttentionScene
    let whole: Uint16Array
    beforeAll(async () => {
      // A second, short sequence shares the launches below.
      scene = new AttentionScene('cuda', shape, [L, 300], 77 + shape.dim)
      ;[whole] = (await scene.run([{ seq: 0, start: 0, end: L }])) as [Uint16Array]
    })
    afterAll(() => scene.dispose())
    afterEach(() => {
      native().setVariantKernels(false)
      native().setDecodePipeline('auto')
    })

    for (const pipeline of ['auto', 'paired', 'rotating', 'paired3'] as const) {
      const how = pipeline === 'auto' ? "the library's choice of K/V copies" : `${pipeline} K/V copies`
      it(`decode at 8k-20k keys with ${how} equals one prefill bit for bit, alone and beside a short sequence`, async () => {
        native().setDecodePipeline(pipeline)
        for (const pos of POSITIONS) {
          const want = whole.subarray(pos * row, (pos + 1) * row)
          const [alone] = await scene.run([{ seq: 0, start: pos, end: pos + 1 }])
          expect(firstDifferentRow(alone!, want, row), `alone at position ${pos}`).toBe(-1)
          const [, beside] = await scene.run([
            { seq: 1, start: 299, end: 300 },
            { seq: 0, start: pos, end: pos + 1 },
          ])
          expect(firstDifferentRow(beside!, want, row), `beside a short sequence at position ${pos}`).toBe(-1)
        }
      })
    }

    it('the output is attention: position 16384 against float64 for two heads', async () => {
      const pos = 16384
      const [got] = await scene.run([{ seq: 0, start: pos, end: pos + 1 }])
      const bits = new Uint32Array(1)
      const f = new Float32Array(bits.buffer)
      for (const h of [0, shape.heads - 1]) {
        const ref = scene.reference(0, pos, h)
        for (let d = 0; d < shape.dim; d++) {
          bits[0] = got![h * shape.dim + d]! << 16
          expect(Math.abs(f[0]! - ref[d]!), `head ${h} element ${d}`).toBeLessThanOrEqual(2e-3 + Math.abs(ref[d]!) / 128)
        }
      }
    })

    it('under the variant configuration, decode and prefill differ', async () => {
      native().setVariantKernels(true)
      let differs = 0
      for (const pos of POSITIONS) {
        const [alone] = await scene.run([{ seq: 0, start: pos, end: pos + 1 }])
        if (firstDifferentRow(alone!, whole.subarray(pos * row, (pos + 1) * row), row) !== -1) differs++
      }
      expect(differs).toBeGreaterThan(0)
    })
  })
}
