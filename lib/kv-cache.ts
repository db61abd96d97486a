// The paged KV cache's bookkeeping: which of the model's `kvBlocks` cache blocks (each holding
// `blockSize` positions of every layer's keys and values) belong to which sequence. The cache
// tensors themselves live in the Transformer; a sequence hands its block table to every forward.
//
// A sequence reserves all the blocks it can ever need (prompt + maxTokens) when it is admitted, so a
// running sequence never runs out of cache mid-generation and nothing has to be preempted. Which
// physical blocks a sequence gets does not change its results: attention reads through the block
// table in logical order.

export class KvBlockAllocator {
  readonly totalBlocks: number
  readonly blockSize: number
  // Free block ids, the next one to hand out last (lowest ids first on a fresh pool).
  private readonly free: number[]
  private readonly owned: Uint8Array

  constructor(totalBlocks: number, blockSize: number) {
    this.totalBlocks = totalBlocks
    this.blockSize = blockSize
    this.free = Array.from({ length: totalBlocks }, (_, i) => totalBlocks - 1 - i)
    this.owned = new Uint8Array(totalBlocks)
  }

  /** Blocks needed to hold `positions` cache positions. */
  blocksFor(positions: number): number {
    return Math.ceil(positions / this.blockSize)
  }

  get freeBlocks(): number {
    return this.free.length
  }

  get usedBlocks(): number {
    return this.totalBlocks - this.free.length
  }

  /** `count` block ids, or null (and nothing taken) when fewer are free. */
  allocate(count: number): number[] | null {
    if (count > this.free.length) return null
    const blocks: number[] = []
    for (let i = 0; i < count; i++) {
      const id = this.free.pop()!
      this.owned[id] = 1
      blocks.push(id)
    }
    return blocks
  }

  release(blocks: readonly number[]): void {
    for (const id of blocks) {
      if (!this.owned[id]) throw new Error(`KvBlockAllocator: block ${id} released but it was not allocated`)
      this.owned[id] = 0
      this.free.push(id)
    }
  }
}
