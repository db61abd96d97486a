// The paged KV cache's bookkeeping: which of the model's `kvBlocks` cache blocks (each holding
// `blockSize` positions of every layer's keys and values) belong to which sequence, and which
// blocks of finished sequences are kept for reuse (the prefix cache). The cache tensors themselves
// live in the Transformer; a sequence hands its block table to every forward.
//
// A sequence reserves all the blocks it can ever need (prompt + maxTokens) when it is admitted, so a
// running sequence never runs out of cache mid-generation and nothing has to be preempted. Which
// physical blocks a sequence gets does not change its results: attention reads through the block
// table in logical order.
//
// The prefix cache. A block whose positions are all written holds the keys and values of its tokens,
// which depend only on the tokens from position 0 to its end (every kernel is batch-invariant and
// prefill/decode-invariant). So a full block is registered under a chain hash of those tokens
// (hash of block i = H(hash of block i-1, tokens of block i)) and a later sequence whose tokens
// start the same way takes the block instead of computing it: the same bits, less work.
// Invariants:
// - only full, block-aligned blocks are shared, and no sequence writes into a block it did not
//   allocate fresh: a sequence that reuses k blocks starts computing at position k * blockSize;
// - a block has a reference count (the sequences holding it); at 0 a registered block stays
//   cached, evictable, and cached blocks are evicted least recently used first when fresh blocks
//   are needed;
// - a hash names one block at most; a second block computed for the same tokens stays private.
import { createHash } from 'node:crypto'

/** Chain hashes of the full blocks of `tokens`: entry i names tokens [0, (i+1) * blockSize). */
export class PrefixHasher {
  readonly hashes: string[] = []
  constructor(private readonly blockSize: number) {}

  /** Extends the chain to cover the first `blocks` full blocks of `tokens` (which must hold them). */
  extend(tokens: readonly number[], blocks: number): string[] {
    for (let i = this.hashes.length; i < blocks; i++) {
      const h = createHash('sha256')
      if (i > 0) h.update(this.hashes[i - 1]!)
      const ids = Int32Array.from(tokens.slice(i * this.blockSize, (i + 1) * this.blockSize))
      h.update(new Uint8Array(ids.buffer))
      this.hashes.push(h.digest('base64'))
    }
    return this.hashes
  }

  /** Keeps the first `blocks` hashes only. */
  truncate(blocks: number): void {
    this.hashes.length = Math.min(this.hashes.length, blocks)
  }
}

export class KvBlockAllocator {
  readonly totalBlocks: number
  readonly blockSize: number
  readonly prefixCache: boolean
  // Blocks that hold nothing worth keeping, the next one to hand out last (lowest ids first on a fresh pool).
  private readonly free: number[]
  // Sequences holding each block.
  private readonly refs: Int32Array
  // The prefix hash a block is registered under ('' when none).
  private readonly hashOf: string[]
  private readonly byHash = new Map<string, number>()
  // Registered blocks no sequence holds, least recently used first (a Map keeps insertion order).
  private readonly evictable = new Map<number, true>()

  constructor(totalBlocks: number, blockSize: number, options: { prefixCache?: boolean } = {}) {
    this.totalBlocks = totalBlocks
    this.blockSize = blockSize
    this.prefixCache = options.prefixCache ?? false
    this.free = Array.from({ length: totalBlocks }, (_, i) => totalBlocks - 1 - i)
    this.refs = new Int32Array(totalBlocks)
    this.hashOf = new Array<string>(totalBlocks).fill('')
  }

  /** Blocks needed to hold `positions` cache positions. */
  blocksFor(positions: number): number {
    return Math.ceil(positions / this.blockSize)
  }

  /** Blocks a fresh allocation can have: the free ones and the cached ones it may evict. */
  get freeBlocks(): number {
    return this.free.length + this.evictable.size
  }

  /** Blocks held by sequences. */
  get usedBlocks(): number {
    return this.totalBlocks - this.freeBlocks
  }

  /** Blocks kept by the prefix cache that no sequence holds (evictable). */
  get cachedBlocks(): number {
    return this.evictable.size
  }

  /** `count` fresh block ids (evicting cached blocks, least recently used first), or null (and nothing taken) when fewer are available. */
  allocate(count: number): number[] | null {
    if (count > this.freeBlocks) return null
    const blocks: number[] = []
    for (let i = 0; i < count; i++) {
      let id = this.free.pop()
      if (id === undefined) {
        id = this.evictable.keys().next().value as number
        this.evictable.delete(id)
        this.byHash.delete(this.hashOf[id]!)
        this.hashOf[id] = ''
      }
      this.refs[id] = 1
      blocks.push(id)
    }
    return blocks
  }

  /** Drops one reference to each block; the last one frees it, or leaves it cached when registered. */
  release(blocks: readonly number[]): void {
    // Last block first: then a prefix's first blocks are the most recently used, and evicted last.
    for (let i = blocks.length - 1; i >= 0; i--) {
      const id = blocks[i]!
      if (!(this.refs[id]! > 0)) throw new Error(`KvBlockAllocator: block ${id} released but it was not allocated`)
      if (--this.refs[id]! > 0) continue
      if (this.hashOf[id]) this.evictable.set(id, true)
      else this.free.push(id)
    }
  }

  /** The cached blocks of the longest run of `hashes` from the first, each with one more reference (release them like allocated ones). */
  acquirePrefix(hashes: readonly string[]): number[] {
    const blocks: number[] = []
    if (!this.prefixCache) return blocks
    for (const hash of hashes) {
      const id = this.byHash.get(hash)
      if (id === undefined) break
      if (this.refs[id]!++ === 0) this.evictable.delete(id)
      blocks.push(id)
    }
    return blocks
  }

  /** Registers a block whose positions are all written under the hash of its tokens from position 0. */
  register(block: number, hash: string): void {
    if (!this.prefixCache || this.hashOf[block] || this.byHash.has(hash)) return
    this.hashOf[block] = hash
    this.byHash.set(hash, block)
  }

  /** Forgets every cached block (after a failed step, nothing cached is trusted). */
  dropCached(): void {
    for (const id of this.evictable.keys()) this.free.push(id)
    this.evictable.clear()
    for (const [hash, id] of this.byHash) {
      if (this.refs[id]! > 0) continue
      this.byHash.delete(hash)
      this.hashOf[id] = ''
    }
  }
}
