// attention (CUDA): causal attention over a paged KV cache, grouped-query, head dim 64 or 128.
//   q, out [T, heads, D] bf16; k_cache, v_cache [blocks, block_size, kv_heads, D] bf16;
//   sequence b's queries are rows query_start[b] .. query_start[b+1]-1 at positions
//   seq_lens[b]-n .. seq_lens[b]-1; query head h reads kv head h / (heads / kv_heads).
// kv_append: k, v [T, kv_heads, D] -> the cache rows at slots[T] (negative slot: skipped).
//
// Invariant (common/attention_schedule.h): for a query at position p, keys 0..p are cut into splits
// of kSplitSize keys counted from key 0; a split is reduced over key blocks of kKeyBlock keys in
// ascending order (attention_tile.cuh: one warp, mma.sync m16n8k16, fp32 online softmax with exp2
// as exp2_ftz computes it, P rounded to bf16); split partials are merged in ascending split order
// by merge_weights / merge_value. Two kernels implement it with the same device functions:
//   decode  (every sequence has one query): four warps per (sequence, kv head, split) holding the
//           group's query heads as tile rows, each warp a quarter of every key block, with the
//           operations of one warp of the prefill kernel in the same order
//           (attention_decode_wide_kernel), its K and V copied paired, three key blocks deep
//           or rotating by the grid's size against the resident blocks (decode_pipeline); partials
//           to a workspace, then a combine pass. When no sequence can have a second split
//           (max_seq_len <= kSplitSize), the decode kernel merges its one split with the
//           combine's functions and writes the output itself (OnlySplit): the same bits, one
//           launch fewer;
//   prefill (any number of queries): one block per (sequence, kv head, tile of 64 query rows: the
//           kv head's query heads at consecutive positions, PrefillTile), four warps of 16 rows,
//           looping over the splits and merging each in registers as it ends
//           (attention_prefill_kernel). On sm_90a one warpgroup of the 64 rows runs the same
//           operations with wgmma, each key block's P·V beside the next block's softmax
//           (attention_prefill_wgmma_kernel): the same k16 steps in the same order, and wgmma's
//           k16 step gives mma.sync's bits. At head dim 128 two such warpgroups a block take
//           two tiles of a kv head, fed by a producer warpgroup (attention_prefill_ws_kernel).
// Neither the split size nor the key block depends on the batch, the lengths or the SM count; the
// grid does, which changes who computes a row but not how. Only the variant configuration
// (choose_launch) takes the split size from the batch size.
// The host-side max_query_len / max_seq_len size the grid and the decode workspace, so they must
// bound every sequence of the batch (max_query_len == 1 selects decode); a kv_append slot outside
// the cache is skipped, since checking device-side slots on the host would synchronize.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include "../common/attention_schedule.h"
#include "../common/config.h"
#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "attention_tile.cuh"
#include "attention_wgmma.cuh"
#include "cuda_ops.h"
#include "matmul_sm90.cuh"
#include "occupancy.cuh"
#include "pdl.cuh"

namespace detinfer::cuda {
namespace {

using namespace attn;

// Launch geometry (the reduction order above does not depend on any of it).
// Prefill, mma.sync (sm_80-89): four warps of 16 query rows, two K/V key blocks in flight.
struct PrefillTiles {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kWarps * kTileRows;  // query positions per block
  static constexpr int kStages = 2;                 // K/V key blocks in flight
  template <int D>
  static constexpr int smem_bytes() {
    return (kRows * D + 2 * kStages * kKeyBlock * D) * static_cast<int>(sizeof(bf16));
  }
};

// Prefill, wgmma (sm_90a, head dim 64): one warpgroup of 64 query rows, three K/V key blocks in
// flight (block n in stage n % 3), tiles in slab_offset's layout from a 1024-byte aligned base;
// three blocks per SM. Head dim 128 takes the warp-specialized kernel (PrefillWsTiles).
struct PrefillWgmmaTiles {
  static constexpr int kThreads = 128;
  static constexpr int kRows = kWgRows;
  static constexpr int kStages = 3;
  template <int D>
  static constexpr int smem_bytes() {
    return (kRows * D + 2 * kStages * kKeyBlock * D) * static_cast<int>(sizeof(bf16)) + 1024;  // + alignment
  }
  // Blocks per SM that the kernel's registers must allow (0: no bound). At head dim 64 three fit by
  // shared memory, and the lean copies (load_key_block) would take ptxas past 168 registers, two
  // blocks per SM, without the bound.
  template <int D>
  static constexpr int min_blocks() {
    return D == 64 ? 3 : 0;
  }
};

// The key blocks a prefill tile reduces, in order: split s, its blocks of kKeyBlock keys from
// the split's first key, up to the tile's last position pmax.
// stride 2: every other split (the interleaved Hopper prefill's consumers).
struct KeyBlockWalk {
  int s = 0, key0 = 0;
  __device__ bool within(int pmax) const { return key0 <= pmax; }
  __device__ void next(int split, int pmax, int stride = 1) {
    key0 += kKeyBlock;
    if (key0 >= min((s + 1) * split, pmax + 1)) {
      s += stride;
      key0 = s * split;
    }
  }
};

// Decode with four warps per split: the same products, sums and roundings as one warp of the
// prefill kernel, spread over the warps (attention_decode_wide_kernel). Three ways to stream the
// split's K and V through shared memory (launch geometry only, the same bits), by PAIRS:
//   paired (2): K and V of a key block are copied together, two key blocks in flight, into a
//           16-row query tile: 74 KB, three blocks per SM. The lowest latency per block of the
//           two that share SMs, and the deepest copies for grids of many waves;
//   three deep (3): the same with three key blocks in flight: 106 KB, two blocks per SM at head
//           dim 128, or one beside a 100 KB product block launched before it (a grid of at most
//           one block per SM launches with more, so that its blocks spread: launch_decode);
//   rotating (0): K and V tiles take turns in kRotatingSlots buffers (K0, V0, K1, V1, ...), each
//           tile requested as soon as the tile kRotatingSlots before it has been used, and the
//           query tile holds only the group's heads plus one zero row that the tensor cores read
//           for the others: 56 KB at four query heads per kv head, four blocks per SM, so that a
//           grid of one or two waves takes fewer of them.
// decode_pipeline chooses.
template <int PAIRS>
struct DecodeWideTiles {
  static_assert(PAIRS == 0 || PAIRS == 2 || PAIRS == 3, "rotating, or paired 2 or 3 key blocks deep");
  static constexpr bool kPaired = PAIRS > 0;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRotatingSlots = 3;
  static constexpr int kTiles = kPaired ? 2 * PAIRS : kRotatingSlots;  // [kKeyBlock][D] K or V tiles
  // K/V tiles, the block's p (f32), p fragments, row maxima; then the query tile
  template <int D>
  static constexpr int smem_bytes(int q_rows) {
    return kTiles * kKeyBlock * D * static_cast<int>(sizeof(bf16)) + kTileRows * kKeyBlock * 4 + kWarps * 32 * 4 * 4 +
           kWarps * kTileRows * 4 + (kPaired ? kTileRows : q_rows + 1) * D * static_cast<int>(sizeof(bf16));
  }
};

struct KvAppendTiles {
  static constexpr int kThreads = 128;
};

// Everything the attention kernels read, by value.
struct AttentionArgs {
  bf16* out;
  const bf16* q;
  const bf16* k_cache;
  const bf16* v_cache;
  const int* block_tables;  // [num_seqs, max_blocks]
  const int* query_start;   // [num_seqs + 1]
  const int* seq_lens;      // [num_seqs]
  int num_seqs, heads, kv_heads, block_size, max_blocks;
  int block_shift;  // log2(block_size) when it is a power of two, else -1
  int split_size;  // keys per split; 0: variant_split_size(num_seqs, length) per sequence
  int max_splits;  // decode: the workspace's splits per (sequence, head)
  bool direct;     // decode with max_splits == 1: the decode kernel writes out, no combine pass
  float scale_log2;
  float* part_o;   // decode workspace [num_seqs, heads, max_splits, D] f32
  float* part_ml;  // decode workspace [num_seqs, heads, max_splits, 2] f32: (max, sum)
};

__device__ __forceinline__ int split_size_of(const AttentionArgs& a, int len) {
  return a.split_size > 0 ? a.split_size : attention_schedule::variant_split_size(a.num_seqs, len);
}

// Keys a sequence can have: its length, clamped to what its block table can address.
__device__ __forceinline__ int keys_of(const AttentionArgs& a, int seq) {
  return min(a.seq_lens[seq], a.max_blocks * a.block_size);
}

// A decode row's output when its sequence has one split (direct launches): what the combine kernel
// computes from that split's partials, merged alone onto (m, l, o) = (-inf, 0, 0) by the same
// functions, so the same bits without the workspace and the combine launch.
struct OnlySplit {
  MergeWeights w;
  float l;
  __device__ OnlySplit(float m, float l_part, float scale_log2)
      : w(merge_weights(-INFINITY, m, scale_log2)), l(merge_value(0.f, l_part, w)) {}
  __device__ float value(float o_part) const { return normalize(merge_value(0.f, o_part, w), l); }
  __device__ void store(bf16* out, float o0, float o1) const {
    *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(value(o0), value(o1));
  }
};

// ---------------------------------------------------------------------------------------------
// Loading tiles into shared memory (16-byte cp.async; rows past the end are zero-filled).

// kKeyBlock cache rows key0.. of kv head `kv_head` into k_dst and/or v_dst ([kKeyBlock][D], swizzled:
// tile_offset, or slab_offset when kSlabs). Thread t copies 16-byte chunk t % (D/8) of rows
// t / (D/8) + i·(kThreads / (D/8)): rows that far apart share their swizzle, so the thread's
// shared-memory address only steps by a constant. A row's page and place in it come from shifts
// when the block size is a power of two (kPow2), else from a division, chosen once per call and
// not per row.
// kLean (the wgmma prefill): addresses are byte offsets from 32 × 32 → 64-bit products (pages,
// slots and a slot's bytes are below 2^31), one instruction each, and kFull blocks, wholly below
// len (all but a sequence's last), test and zero-fill no row: about 100 PTX instructions per
// thread and key block where there were 168 at head dim 128. H200, 8,192 tokens: 1597 -> 1476 µs
// at head dim 128; at 64, with the kernel's registers bounded for three blocks per SM
// (PrefillWgmmaTiles::min_blocks; 172 registers and two blocks without it, 916 -> 1004 µs),
// 922 -> 881 µs. The decode kernels measured the same either way and keep the plain copies.
// kSkip: key `skip` is left out, no copy at all into its row.
template <int D, int kThreads, bool kLoadK, bool kLoadV, bool kPow2, bool kSlabs, bool kSkip, bool kLean, bool kFull>
__device__ __forceinline__ void load_key_block_rows(bf16* k_dst, bf16* v_dst, const AttentionArgs& a, const int* table,
                                                    int kv_head, int key0, int len, int skip) {
  constexpr int kChunks = D / 8;
  constexpr int kRowStep = kThreads / kChunks;
  constexpr int kPitch = kSlabs ? 64 : D;  // elements from one row to the next
  static_assert(kThreads % kChunks == 0 && kKeyBlock % kRowStep == 0 && kRowStep % 8 == 0,
                "every thread copies one chunk column of whole row steps, each a multiple of the swizzle period");
  const int chunk = static_cast<int>(threadIdx.x) % kChunks, row0 = static_cast<int>(threadIdx.x) / kChunks;
  // + i * kRowStep * kPitch for the thread's i-th row
  const int tile = kSlabs ? slab_offset<D, kKeyBlock>(row0, chunk) : tile_offset<D>(row0, chunk);
  const uint32_t k_s = ptx::smem_addr(k_dst + tile), v_s = ptx::smem_addr(v_dst + tile);
  const int row_elems = a.kv_heads * D;  // one cache slot, every kv head
  const bf16* k_src = a.k_cache + kv_head * D + chunk * 8;
  const bf16* v_src = a.v_cache + kv_head * D + chunk * 8;
  // A constant trip count, unrolled: the page lookups and copies of the rows overlap.
#pragma unroll
  for (int i = 0; i < kKeyBlock / kRowStep; ++i) {
    const int key = key0 + row0 + i * kRowStep;
    const bool valid = kFull || key < len;
    const int page_index = kPow2 ? key >> a.block_shift : key / a.block_size;
    const int in_page = kPow2 ? key & (a.block_size - 1) : key - page_index * a.block_size;
    const uint32_t dst = static_cast<uint32_t>(i * kRowStep * kPitch * sizeof(bf16));
    if (kSkip && key == skip) continue;
    const void *k_row, *v_row;
    if constexpr (kLean) {
      const char* pages = reinterpret_cast<const char*>(table);
      const int page = valid ? *reinterpret_cast<const int*>(pages + ptx::mul_wide_u32(page_index, sizeof(int))) : 0;
      const uint64_t bytes = ptx::mul_wide_u32(page * a.block_size + in_page, row_elems * sizeof(bf16));
      k_row = reinterpret_cast<const char*>(k_src) + bytes, v_row = reinterpret_cast<const char*>(v_src) + bytes;
    } else {
      const int slot = valid ? table[page_index] * a.block_size + in_page : 0;
      const int64_t offset = static_cast<int64_t>(slot) * row_elems;
      k_row = k_src + offset, v_row = v_src + offset;
    }
    if (kLoadK) ptx::cp_async16(k_s + dst, k_row, valid ? 16 : 0);
    if (kLoadV) ptx::cp_async16(v_s + dst, v_row, valid ? 16 : 0);
  }
}

template <int D, int kThreads, bool kLoadK, bool kLoadV, bool kSlabs = false, bool kSkip = false, bool kLean = false>
__device__ __forceinline__ void load_key_block(bf16* k_dst, bf16* v_dst, const AttentionArgs& a, const int* table,
                                               int kv_head, int key0, int len, int skip = -1) {
  const bool full = kLean && key0 + kKeyBlock <= len;
  if (a.block_shift >= 0) {
    if (full)
      load_key_block_rows<D, kThreads, kLoadK, kLoadV, true, kSlabs, kSkip, kLean, true>(k_dst, v_dst, a, table, kv_head,
                                                                                        key0, len, skip);
    else
      load_key_block_rows<D, kThreads, kLoadK, kLoadV, true, kSlabs, kSkip, kLean, false>(k_dst, v_dst, a, table, kv_head,
                                                                                         key0, len, skip);
  } else {
    if (full)
      load_key_block_rows<D, kThreads, kLoadK, kLoadV, false, kSlabs, kSkip, kLean, true>(k_dst, v_dst, a, table, kv_head,
                                                                                         key0, len, skip);
    else
      load_key_block_rows<D, kThreads, kLoadK, kLoadV, false, kSlabs, kSkip, kLean, false>(k_dst, v_dst, a, table, kv_head,
                                                                                          key0, len, skip);
  }
}

// The cache row of key `key` (K and V of kv head `kv_head`) into row `row` of k_dst and v_dst
// ([kKeyBlock][D], tile_offset), by threads 0 .. D/8 - 1.
template <int D>
__device__ __forceinline__ void load_key_row(bf16* k_dst, bf16* v_dst, const AttentionArgs& a, const int* table,
                                             int kv_head, int key, int row) {
  if (static_cast<int>(threadIdx.x) >= D / 8) return;
  const int chunk = threadIdx.x, page = key / a.block_size;
  const int64_t slot = static_cast<int64_t>(table[page]) * a.block_size + (key - page * a.block_size);
  const int64_t offset = slot * a.kv_heads * D + kv_head * D + chunk * 8;
  ptx::cp_async16(ptx::smem_addr(k_dst + tile_offset<D>(row, chunk)), a.k_cache + offset, 16);
  ptx::cp_async16(ptx::smem_addr(v_dst + tile_offset<D>(row, chunk)), a.v_cache + offset, 16);
}

// `rows` query rows into dst ([kRowsTile][D], swizzled: tile_offset, or slab_offset when kSlabs):
// row r comes from q + row_src(r), an element offset.
template <int D, int kThreads, int kRowsTile, bool kSlabs = false, typename RowSrc>
__device__ __forceinline__ void load_query_rows(bf16* dst, const bf16* q, RowSrc row_src, int rows) {
  constexpr int kChunks = D / 8;
  static_assert(kRowsTile * kChunks % kThreads == 0, "every thread runs the same number of iterations");
#pragma unroll
  for (int i = 0; i < kRowsTile * kChunks / kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = c / kChunks, chunk = c % kChunks;
    const bool valid = r < rows;
    const int at = kSlabs ? slab_offset<D, kRowsTile>(r, chunk) : tile_offset<D>(r, chunk);
    ptx::cp_async16(ptx::smem_addr(dst + at), valid ? q + row_src(r) + chunk * 8 : q, valid ? 16 : 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Where a decode block works (both decode kernels): grid (max_splits, kv_heads * row tiles,
// num_seqs); block (split, kv head and tile of its query heads, sequence). Inactive when the
// sequence does not decode (more than one query) or has fewer splits.
struct DecodeSplit {
  bool active;
  int seq, split_index, kv_head;
  int head0, rows;   // the tile's first query head, and its query heads (at most kTileRows)
  int q_row;         // the sequence's query row
  int len;           // its keys
  int begin, end;    // the split's keys [begin, end)
  const int* table;  // its block table
};

__device__ __forceinline__ DecodeSplit decode_split(const AttentionArgs& a) {
  DecodeSplit d{};
  d.split_index = blockIdx.x, d.seq = blockIdx.z;
  const int group = a.heads / a.kv_heads, row_tiles = (group + kTileRows - 1) / kTileRows;
  const int tile = blockIdx.y % row_tiles;
  d.kv_head = blockIdx.y / row_tiles;
  d.head0 = d.kv_head * group + tile * kTileRows, d.rows = min(kTileRows, group - tile * kTileRows);
  d.q_row = a.query_start[d.seq];
  if (a.query_start[d.seq + 1] - d.q_row != 1) return d;
  d.len = keys_of(a, d.seq);
  const int split = split_size_of(a, d.len);
  const int n_splits = min((d.len + split - 1) / split, a.max_splits);
  if (d.split_index >= n_splits) return d;
  d.begin = d.split_index * split, d.end = min(d.begin + split, d.len);
  d.table = a.block_tables + static_cast<int64_t>(d.seq) * a.max_blocks;
  d.active = true;
  return d;
}

// Decode blocks prefetch their split's keys and values into L2 before their wait while the batch
// has at most kPrefetchSeqs sequences and its keys (sequences × the block's sequence length) are
// at most kPrefetchKeys (attention_decode_wide_kernel says what the prefetch gains). H200, random
// Qwen3-0.6B, replayed decode step, two rounds each: batch 16 at 200 keys 1244.5 / 1240.7 ->
// 1227.5 / 1227.9 us when that bound came in for 9-16 sequences (bench/step-attribution.mjs).
// Up to 8 sequences used to prefetch at any length; that rule against never prefetching, µs at
// batch 1 / 8: 200 keys 882.6 / 991.0 against 893.6 / 995.4 (kept: 1,600 keys at batch 8),
// 1,000 keys 948.4 / 1278.8 against 950.9 / 1201.8 (kept at batch 1 only), 3,000 keys 993.7 /
// 1992.2 against 976.8 / 1817.7, 8,000 keys 1121.3 / 3152.7 against 1073.3 / 3065.6 (both
// rounds within 1.3 us). Alone (dev_attention --decode, 32 heads, 8 kv heads), 1 × 32k keys
// took 62.0 us prefetching and 48.4 without, 8 × 8k 91.6 and 80.5: past a wave of blocks the
// prefetches only compete with the copies of the blocks running.
constexpr int kPrefetchSeqs = 16;
constexpr int64_t kPrefetchKeys = 2048;

__device__ __forceinline__ bool prefetches(int num_seqs, int len) {
  return num_seqs <= kPrefetchSeqs && static_cast<int64_t>(num_seqs) * len <= kPrefetchKeys;
}

// The lines of the split's keys and values in the cache (K, then V, of each key), into L2.
template <int D>
__device__ __forceinline__ void prefetch_split_l2(const AttentionArgs& a, const DecodeSplit& d) {
  constexpr int kLines = D * static_cast<int>(sizeof(bf16)) / 128;  // of one kv head's row
  static_assert(kLines >= 1 && D * sizeof(bf16) % 128 == 0, "whole 128-byte lines per row");
  const int64_t row_elems = static_cast<int64_t>(a.kv_heads) * D;
  for (int i = threadIdx.x; i < (d.end - d.begin) * 2 * kLines; i += blockDim.x) {
    const int key = d.begin + i / (2 * kLines), line = i % (2 * kLines);
    const int page = key / a.block_size, slot = d.table[page] * a.block_size + (key - page * a.block_size);
    const bf16* cache = line < kLines ? a.k_cache : a.v_cache;
    ptx::prefetch_l2(cache + slot * row_elems + d.kv_head * D + (line % kLines) * (128 / sizeof(bf16)));
  }
}

// Decode: grid (max_splits, kv_heads * row tiles, num_seqs), four warps per (sequence, kv head,
// split). The 16 tile rows are (up to) 16 query heads of one kv head at the sequence's single query
// position len-1. One warp of the prefill kernel would take the split's key blocks one after
// another (block_scores, accumulate_values, finish_split of attention_tile.cuh); here the four
// warps share every key block. On the H200 that streams the cache at 74-96% of copy bandwidth at 8
// and 64 sequences of 8k-32k keys where one warp per split reached 55-66% (dev_attention).
// Every value is computed by the same instructions on the same operands in the same order as
// block_scores / accumulate_values / finish_split compute it in one warp, so decode gives
// prefill's bits:
//   scores: warp w computes keys 16w..16w+15 of each key block (one warp's j = w), each
//           score the same chain of mma k-steps over D;
//   row max: each warp's exact max, then the exact max of the four (max is exact in any order);
//   m, the offsets and alpha: the same expressions, by every warp;
//   l: warp 0 adds the block's p in one warp's order (j, then the lane's two columns), reading
//           them from shared memory, then the same quad shuffles at the end of the split;
//   o: warp w owns output columns [D/4·w, D/4·(w+1)); each element is rescaled by alpha and then
//           takes the block's four 16-key k-steps in ascending order, from the same bf16(p)
//           fragments (exchanged through shared memory).
template <int D, int PAIRS>
__global__ void __launch_bounds__(DecodeWideTiles<PAIRS>::kThreads) attention_decode_wide_kernel(AttentionArgs a) {
  // The step's lengths and block tables come from the host, by copies before the step's first
  // kernel, and no kernel writes them; this kernel starts at the earliest once the q|k|v product
  // before it has passed its own wait, so those copies have landed and they may be read before
  // the wait. At the batches `prefetches` takes, the split's keys and values are then requested
  // into L2 (ptx::prefetch_l2, which the kernels still running cannot make stale) while the q/k/v
  // product and kernel before this one run (they release it early at such batches, pdl.cuh).
  // H200, random Qwen3-0.6B, replayed decode step, 101 keys: 977 -> 962 us at batch 1, 1006 ->
  // 991 at 8, 1099 -> 1071 at 16; at 32 it lost 1338 -> 1383, the prefetches competing with the
  // product's weights.
  // Paired: the first PAIRS key blocks are then copied into shared memory before the wait too,
  // all but the row of key len-1, which the q/k/v kernel before this one writes in this step; no
  // other row of the cache is written by a kernel that can still be running (each step's q/k/v
  // kernel writes only its tokens' rows, and the ones before this step's have completed). That
  // row, and the query rows, follow after the wait. The same values in shared memory, so the same
  // bits. H200, random Qwen3-0.6B, replayed decode step, paired forced: 868 -> 845 us at batch 1
  // and 101 keys, 956 -> 946 at 200, 1039 -> 1008 at 1000; 1049 -> 1021 at batch 16 and 101 keys.
  const DecodeSplit ds = decode_split(a);
  if (ds.active && prefetches(a.num_seqs, ds.len)) prefetch_split_l2<D>(a, ds);
  using T = DecodeWideTiles<PAIRS>;
  constexpr bool PAIRED = T::kPaired;
  extern __shared__ __align__(128) unsigned char decode_smem[];
  bf16* const kv_early = reinterpret_cast<bf16*>(decode_smem);
  if constexpr (PAIRED) {
    if (ds.active) {
#pragma unroll
      for (int b = 0; b < PAIRS; ++b) {
        const int key0 = ds.begin + b * kKeyBlock;
        if (key0 < ds.end)
          load_key_block<D, T::kThreads, true, true, false, true>(kv_early + 2 * b * kKeyBlock * D,
                                                                  kv_early + (2 * b + 1) * kKeyBlock * D, a, ds.table,
                                                                  ds.kv_head, key0, ds.len, ds.len - 1);
        ptx::cp_async_commit();
      }
    }
  }
  pdl_wait();
  pdl_launch_dependents();
  static_assert(kKeyBlock == 16 * T::kWarps, "one 16-key k-step of the block per warp");
  static_assert(D % (16 * T::kWarps) == 0, "whole 16-column steps of the output per warp");
  constexpr int kDn = D / 16 / T::kWarps;  // 16-column steps of o per warp
  bf16* kv_s = kv_early;  // [kTiles][kKeyBlock][D]
  float* p32 = reinterpret_cast<float*>(kv_s + T::kTiles * kKeyBlock * D);     // [kTileRows][kKeyBlock]
  uint32_t* pfrag = reinterpret_cast<uint32_t*>(p32 + kTileRows * kKeyBlock);  // [kWarps][32][4]
  float* wmax = reinterpret_cast<float*>(pfrag + T::kWarps * 32 * 4);          // [kWarps][kTileRows]
  bf16* q_s = reinterpret_cast<bf16*>(wmax + T::kWarps * kTileRows);           // the query tile

  if (!ds.active) return;
  const int split_index = ds.split_index, seq = ds.seq, kv_head = ds.kv_head, head0 = ds.head0, rows = ds.rows;
  const int q_row = ds.q_row, len = ds.len, begin = ds.begin, end = ds.end;
  const int* table = ds.table;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, col = 2 * (lane & 3);

  // Paired: 16 query rows, those past the group zero-filled. Rotating: the group's rows, then one
  // zero row that the lanes of the other tile rows read (all of its chunks are zero, so its
  // swizzle does not matter).
  const int64_t q_first = (static_cast<int64_t>(q_row) * a.heads + head0) * D;
  int q_lane_row = lane & 15;  // the row this lane addresses in ldmatrix
  if constexpr (PAIRED) {
    load_query_rows<D, T::kThreads, kTileRows>(q_s, a.q, [&](int r) { return q_first + r * D; }, rows);
  } else {
    constexpr int kChunks = D / 8;
    for (int c = threadIdx.x; c < rows * kChunks; c += T::kThreads)
      ptx::cp_async16(ptx::smem_addr(q_s + tile_offset<D>(c / kChunks, c % kChunks)), a.q + q_first + c * 8, 16);
    for (int c = threadIdx.x; c < kChunks; c += T::kThreads)
      reinterpret_cast<uint4*>(q_s + rows * D)[c] = make_uint4(0, 0, 0, 0);
    q_lane_row = min(q_lane_row, rows);
  }
  // Paired: key block b's K in tile 2(b%PAIRS), its V in tile 2(b%PAIRS)+1, one cp.async group per
  // block.
  // Rotating: tile t of the split (K of key block t/2 for even t, else its V) in buffer t % kTiles,
  // one group per tile. Groups are committed also past the split's end (empty), so that the count
  // stays in step with the waits.
  auto tile_of = [&](int t) { return kv_s + (t % T::kTiles) * kKeyBlock * D; };
  auto load_tile = [&](int t) {
    const int key0 = begin + (t >> 1) * kKeyBlock;
    if (key0 < end) {
      if (PAIRED)
        load_key_block<D, T::kThreads, true, true>(tile_of(t), tile_of(t + 1), a, table, kv_head, key0, len);
      else if (t & 1)
        load_key_block<D, T::kThreads, false, true>(tile_of(t), tile_of(t), a, table, kv_head, key0, len);
      else
        load_key_block<D, T::kThreads, true, false>(tile_of(t), tile_of(t), a, table, kv_head, key0, len);
    }
    ptx::cp_async_commit();
  };
  // Three deep: block b + 3 is requested after the first barrier of iteration b + 1, not after a
  // fourth barrier at the end of iteration b. Every warp is done with block b's tiles once it
  // reaches that barrier, and the fourth barrier has nothing else to guard: iteration b + 1 writes
  // wmax only after its first barrier and p32 and pfrag only after its second, by when every warp
  // has read iteration b's. H200, random Qwen3-0.6B, replayed decode step at 200 keys, medians of
  // three rounds, µs: batch 1 885.5 -> 876.2, 8 986.7 -> 983.0, 16 1047.8 -> 1052.5
  // (docs/performance.md, "Three barriers a key block in the three-deep decode").
  constexpr bool kLateLoad = PAIRS == 3;
  // Groups that may still be pending when a block's K (and, rotating, its V) must have landed.
  constexpr int kAhead = kLateLoad ? PAIRS - 2 : PAIRED ? PAIRS - 1 : T::kTiles - 1;
  if constexpr (PAIRED) {
    // The query rows and the row of key len-1, if one of the early blocks holds it: one group.
    // Also when that row lies past the split's end, in the split's last block (splits of
    // kSplitSize keys end at a key block's edge, the variant configuration's need not): its score
    // is masked and its p is 0, but p·V reads the row all the same, and 0 times a stale NaN or
    // infinity left in shared memory is NaN.
    const int last = len - 1, b_last = (last - begin) / kKeyBlock;
    if (last >= begin && b_last < PAIRS && begin + b_last * kKeyBlock < end)
      load_key_row<D>(tile_of(2 * b_last), tile_of(2 * b_last + 1), a, table, kv_head, last, last - begin - b_last * kKeyBlock);
    ptx::cp_async_commit();
  } else {
#pragma unroll
    for (int t = 0; t < T::kTiles; ++t) load_tile(t);  // K0 (with the query rows), V0, K1
  }

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: warp 0's lanes hold one warp's shares
  float o[2 * kDn][4];
#pragma unroll
  for (int i = 0; i < 2 * kDn; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[i][e] = 0.f;

  for (int key0 = begin, b = 0; key0 < end; key0 += kKeyBlock, ++b) {
    const bf16* k_tile = tile_of(2 * b);
    const bf16* v_tile = tile_of(2 * b + 1);
    // K of this block (paired: and its V); paired, at the first block: every early group and the
    // one after the wait.
    if (PAIRED && b == 0)
      ptx::cp_async_wait<0>();
    else
      ptx::cp_async_wait<kAhead>();
    __syncthreads();
    if (kLateLoad && b > 0) load_tile(2 * (b - 1 + PAIRS));  // into block b-1's tiles

    // Scores of keys key0 + 16·warp .. +15 (one warp's s[2j], s[2j+1] with j = warp).
    float sc[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[h][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4], kb[4];
      ptx::ldmatrix_x4(qa, ptx::smem_addr(q_s + tile_offset<D>(q_lane_row, kk * 2 + (lane >> 4))));
      ptx::ldmatrix_x4(kb, ptx::smem_addr(k_tile + tile_offset<D>(warp * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                                   kk * 2 + ((lane >> 3) & 1))));
      ptx::mma_bf16_16816(sc[0], qa, kb[0], kb[1]);
      ptx::mma_bf16_16816(sc[1], qa, kb[2], kb[3]);
    }
    if (key0 + kKeyBlock > end) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key0 + (2 * warp + h) * 8 + col + (e & 1) >= end) sc[h][e] = -INFINITY;
    }
    float bm[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) bm[e >> 1] = fmaxf(bm[e >> 1], sc[h][e]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      bm[r] = fmaxf(bm[r], __shfl_xor_sync(0xffffffffu, bm[r], 1));
      bm[r] = fmaxf(bm[r], __shfl_xor_sync(0xffffffffu, bm[r], 2));
      if ((lane & 3) == 0) wmax[warp * kTileRows + (lane >> 2) + 8 * r] = bm[r];
    }
    __syncthreads();
    if (!PAIRED) load_tile(2 * b + T::kTiles);  // into this block's K buffer, which every warp is done with

    float offset[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = (lane >> 2) + 8 * r;
      float block_max = wmax[row];
#pragma unroll
      for (int w = 1; w < T::kWarps; ++w) block_max = fmaxf(block_max, wmax[w * kTileRows + row]);
      const float m_new = fmaxf(m[r], block_max);
      offset[r] = scaled_max(m_new, a.scale_log2);
      const float alpha = exp2_ftz(m[r] * a.scale_log2 - offset[r]);
      m[r] = m_new;
      l[r] = l[r] * alpha;
#pragma unroll
      for (int i = 0; i < 2 * kDn; ++i) {
        o[i][2 * r] = o[i][2 * r] * alpha;
        o[i][2 * r + 1] = o[i][2 * r + 1] * alpha;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2_ftz(__fmaf_rn(sc[h][e], a.scale_log2, -offset[e >> 1]));
        sc[h][e] = pe;
        p32[((lane >> 2) + 8 * (e >> 1)) * kKeyBlock + (2 * warp + h) * 8 + col + (e & 1)] = pe;
      }
    uint4 mine;
    mine.x = pack_bf16(sc[0][0], sc[0][1]);
    mine.y = pack_bf16(sc[0][2], sc[0][3]);
    mine.z = pack_bf16(sc[1][0], sc[1][1]);
    mine.w = pack_bf16(sc[1][2], sc[1][3]);
    reinterpret_cast<uint4*>(pfrag)[warp * 32 + lane] = mine;
    if (!PAIRED) ptx::cp_async_wait<kAhead>();  // V of this block
    __syncthreads();

    if (warp == 0) {
      // One warp's additions to this lane's shares, in its order.
#pragma unroll
      for (int j = 0; j < kKeyBlock / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) l[e >> 1] = l[e >> 1] + p32[((lane >> 2) + 8 * (e >> 1)) * kKeyBlock + j * 8 + col + (e & 1)];
    }
#pragma unroll
    for (int i = 0; i < kKeyBlock / 16; ++i) {
      const uint4 f = reinterpret_cast<const uint4*>(pfrag)[i * 32 + lane];
      const uint32_t pa[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
      for (int t = 0; t < kDn; ++t) {
        const int dn = warp * kDn + t;
        uint32_t vb[4];
        ptx::ldmatrix_x4_trans(vb, ptx::smem_addr(v_tile + tile_offset<D>(i * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                                                           dn * 2 + (lane >> 4))));
        ptx::mma_bf16_16816(o[2 * t], pa, vb[0], vb[1]);
        ptx::mma_bf16_16816(o[2 * t + 1], pa, vb[2], vb[3]);
      }
    }
    if constexpr (!kLateLoad) {
      __syncthreads();  // every warp is done with this block's V, p32, pfrag and wmax
      load_tile(PAIRED ? 2 * (b + PAIRS) : 2 * b + 1 + T::kTiles);  // paired: block b+PAIRS; rotating: into this V buffer
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = l[r] + __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] = l[r] + __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  if (a.direct) {
    // Only warp 0 holds the row sums; every warp normalizes its own columns (wmax is free: every
    // warp read the last key block's maxima before that block's third barrier, which warp 0 has
    // passed).
    if (warp == 0 && (lane & 3) == 0) wmax[lane >> 2] = l[0], wmax[(lane >> 2) + 8] = l[1];
    __syncthreads();
    l[0] = wmax[lane >> 2], l[1] = wmax[(lane >> 2) + 8];
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = (lane >> 2) + 8 * r;
    if (row >= rows) continue;
    if (a.direct) {
      const OnlySplit only(m[r], l[r], a.scale_log2);
      bf16* out = a.out + (static_cast<int64_t>(q_row) * a.heads + head0 + row) * D;
#pragma unroll
      for (int t = 0; t < 2 * kDn; ++t)
        only.store(out + 8 * (2 * warp * kDn + t) + col, o[t][2 * r], o[t][2 * r + 1]);
      continue;
    }
    const int64_t idx = (static_cast<int64_t>(seq) * a.heads + head0 + row) * a.max_splits + split_index;
    if (warp == 0 && (lane & 3) == 0) {
      a.part_ml[2 * idx] = m[r];
      a.part_ml[2 * idx + 1] = l[r];
    }
    float* out = a.part_o + idx * D;
#pragma unroll
    for (int t = 0; t < 2 * kDn; ++t)
      *reinterpret_cast<float2*>(out + 8 * (2 * warp * kDn + t) + col) = make_float2(o[t][2 * r], o[t][2 * r + 1]);
  }
}

// Decode combine: grid (heads, num_seqs), D threads; thread d merges the splits' partials of
// output element d in ascending split order, exactly as the prefill kernel merges its registers.
// The weights of split s (merge_weights) depend only on split s's max and on the running max
// before it, a prefix max, which is exact in any order. So the splits are taken 32 at a time:
// warp 0 computes the chunk's weights (lane t: split c0 + t) into shared memory while the
// chunk's partial outputs, one contiguous [32][D] block of the workspace, are copied into shared
// memory (cp.async, the next chunk's copy in flight during this chunk's merge); then every thread
// runs its own chains (o of element d, and l) over the chunk in ascending order with
// merge_value. The sequential merge's bits, without a dependent global load per split.
template <int D>
__global__ void __launch_bounds__(D) attention_decode_combine_kernel(AttentionArgs a) {
  static_assert(D % 32 == 0, "whole warps");
  constexpr int kChunk = 32;                             // splits per chunk: one per lane of warp 0
  __shared__ __align__(16) float o_part[2][kChunk * D];  // double-buffered chunks of partials
  __shared__ float2 weights[kChunk];                      // the chunk's (total, part) merge weights
  __shared__ float l_part[kChunk];
  pdl_wait();
  pdl_launch_dependents();
  const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x, lane = d % 32;
  const int q_row = a.query_start[seq];
  if (a.query_start[seq + 1] - q_row != 1) return;
  const int len = keys_of(a, seq);
  const int split = split_size_of(a, len);
  const int n_splits = min((len + split - 1) / split, a.max_splits);
  const int64_t idx0 = (static_cast<int64_t>(seq) * a.heads + head) * a.max_splits;
  // Splits [c0, c0 + kChunk) of the partial outputs into buffer b (16-byte copies).
  auto load_chunk = [&](int b, int c0) {
    const int pieces = min(kChunk, n_splits - c0) * D / 4;
    const float* src = a.part_o + (idx0 + c0) * D;
    for (int i = d; i < pieces; i += D) ptx::cp_async16(ptx::smem_addr(&o_part[b][4 * i]), src + 4 * i, 16);
  };
  load_chunk(0, 0);
  ptx::cp_async_commit();
  float m_run = -INFINITY;  // warp 0: the running max before the chunk
  float l = 0.f, o = 0.f;
  for (int c0 = 0, b = 0; c0 < n_splits; c0 += kChunk, b ^= 1) {
    if (c0 + kChunk < n_splits) load_chunk(b ^ 1, c0 + kChunk);
    ptx::cp_async_commit();
    if (d < 32) {
      const int s = c0 + lane;
      const float m_part = s < n_splits ? a.part_ml[2 * (idx0 + s)] : -INFINITY;
      l_part[lane] = s < n_splits ? a.part_ml[2 * (idx0 + s) + 1] : 0.f;
      float incl = m_part;  // max of the chunk's splits up to this lane's
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const float v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl = fmaxf(incl, v);
      }
      const float before = __shfl_up_sync(0xffffffffu, incl, 1);
      const MergeWeights mw = merge_weights(lane > 0 ? fmaxf(m_run, before) : m_run, m_part, a.scale_log2);
      weights[lane] = make_float2(mw.total, mw.part);
      m_run = fmaxf(m_run, __shfl_sync(0xffffffffu, incl, 31));
    }
    ptx::cp_async_wait<1>();
    __syncthreads();
    // A full chunk's loop unrolled, so that its shared-memory loads are all in flight and only
    // the two chains of merges wait on each other; the same merges in the same order.
    const auto merge = [&](int j) {
      const float2 w2 = weights[j];
      const MergeWeights w{w2.x, w2.y, 0.f};
      l = merge_value(l, l_part[j], w);
      o = merge_value(o, o_part[b][j * D + d], w);
    };
    const int n = min(kChunk, n_splits - c0);
    if (n == kChunk) {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) merge(j);
    } else {
      for (int j = 0; j < n; ++j) merge(j);
    }
    __syncthreads();  // the next chunk rewrites weights and l_part; the one after, this buffer
  }
  a.out[(static_cast<int64_t>(q_row) * a.heads + head) * D + d] = __float2bfloat16_rn(normalize(o, l));
}

// ---------------------------------------------------------------------------------------------
// Prefill: grid (position tiles, kv heads × head tiles, num_seqs); tiles are taken longest first.
// A tile's kRows rows are the query heads of one kv head (all of its group, or kRows of them when
// the group is larger) at consecutive positions, head fastest: row r is head head0 + r % heads at
// the tile's position r / heads. The heads of a group read the same keys and values, so one copy
// of each key block serves all of them: a group of 4 heads takes a quarter of the copies that a
// tile of one head at 64 positions took. Which rows share a tile changes nothing about a row's
// value (attention_tile.cuh).
struct PrefillTile {
  int q_begin, row0, rows;  // the sequence's first query row, the tile's first position (of the sequence's), its rows
  int heads, head0;         // query heads per position in the tile, the first of them
  int len, split, kv_head;  // the sequence's keys, its split size, the tile's kv head
  int pos0, pmax;           // positions of the tile's first and last rows
  const int* table;         // the sequence's block table
  int pos[2];               // this lane's two rows' positions (-1: past the tile's rows)
  int r_lo;                 // the lane's first row in the tile (the second is r_lo + 8)

  // Element offset of row r's query (and output) vector in q [T, heads, D].
  template <int D>
  __device__ __forceinline__ int64_t row_offset(const AttentionArgs& a, int r) const {
    return (static_cast<int64_t>(q_begin + row0 + r / heads) * a.heads + head0 + r % heads) * D;
  }
};

// The tile's geometry (host and device): heads per tile at most kRows, positions per tile.
struct PrefillHeads {
  int tile_heads, head_tiles, positions;
};
__host__ __device__ __forceinline__ PrefillHeads prefill_heads(int heads, int kv_heads, int kRows) {
  const int group = heads / kv_heads, tile_heads = group < kRows ? group : kRows;
  return {tile_heads, (group + tile_heads - 1) / tile_heads, kRows / tile_heads};
}

// Tile `tile` of the block's sequence (blockIdx.z) and head tile (blockIdx.y), for the lane's rows
// in warp `warp` of the tile's warpgroup; false when the tile has no rows (it lies past the
// sequence's queries).
template <int kRows>
__device__ __forceinline__ bool prefill_tile_at(const AttentionArgs& a, PrefillTile& t, int tile, int warp) {
  const int seq = blockIdx.z;
  const PrefillHeads g = prefill_heads(a.heads, a.kv_heads, kRows);
  const int group = a.heads / a.kv_heads, head_tile = blockIdx.y % g.head_tiles;
  t.kv_head = blockIdx.y / g.head_tiles;
  t.head0 = t.kv_head * group + head_tile * g.tile_heads;
  t.heads = min(g.tile_heads, group - head_tile * g.tile_heads);  // the last of a large group's tiles may be narrower
  t.q_begin = a.query_start[seq];
  const int n = a.query_start[seq + 1] - t.q_begin;
  t.row0 = tile * g.positions;
  if (t.row0 >= n) return false;
  t.len = keys_of(a, seq);
  t.split = split_size_of(a, t.len);
  t.table = a.block_tables + static_cast<int64_t>(seq) * a.max_blocks;
  t.rows = min(g.positions, n - t.row0) * t.heads;
  t.pos0 = t.len - n + t.row0;
  t.pmax = t.pos0 + (t.rows - 1) / t.heads;
  const int lane = threadIdx.x & 31;
  t.r_lo = warp * kTileRows + (lane >> 2);
  t.pos[0] = t.r_lo < t.rows ? t.pos0 + t.r_lo / t.heads : -1;
  t.pos[1] = t.r_lo + 8 < t.rows ? t.pos0 + (t.r_lo + 8) / t.heads : -1;
  return true;
}

// The block's one tile: the grid's tiles from the last (the most keys) to the first.
template <int kRows>
__device__ __forceinline__ bool prefill_tile(const AttentionArgs& a, PrefillTile& t) {
  return prefill_tile_at<kRows>(a, t, gridDim.x - 1 - blockIdx.x, threadIdx.x >> 5);
}

// The key limits of this lane's rows in a block of split s: keys below the row's position + 1 and
// below the split's end.
__device__ __forceinline__ void prefill_limits(const PrefillTile& t, int s, int (&limit)[2]) {
  const int split_end = s * t.split + t.split;
  limit[0] = min(t.pos[0] + 1, split_end);
  limit[1] = min(t.pos[1] + 1, split_end);
}

// The tile's output: this lane's rows of total, normalized, as bf16.
template <int D>
__device__ __forceinline__ void prefill_store(const AttentionArgs& a, const PrefillTile& t, const SplitAccum<D>& total) {
  const int col = 2 * (threadIdx.x & 3);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = t.r_lo + 8 * r;
    if (row >= t.rows) continue;
    bf16* o = a.out + t.row_offset<D>(a, row);
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(o + 8 * i + col) =
          pack_bf16(normalize(total.o[i][2 * r], total.l[r]), normalize(total.o[i][2 * r + 1], total.l[r]));
  }
}

// mma.sync: four warps of 16 rows; each warp reduces the tile's key blocks up to its last position.
template <int D>
__global__ void __launch_bounds__(PrefillTiles::kThreads) attention_prefill_kernel(AttentionArgs a) {
  using T = PrefillTiles;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* q_s = reinterpret_cast<bf16*>(smem);  // [kRows][D]
  bf16* k_s = q_s + T::kRows * D;              // [kStages][kKeyBlock][D]
  bf16* v_s = k_s + T::kStages * kKeyBlock * D;

  PrefillTile t;
  if (!prefill_tile<T::kRows>(a, t)) return;
  const int warp = threadIdx.x >> 5;
  const int warp_pmax = warp * kTileRows < t.rows ? t.pos0 + (min(warp * kTileRows + kTileRows, t.rows) - 1) / t.heads : -1;
  auto load = [&](const KeyBlockWalk& b, int stage) {
    load_key_block<D, T::kThreads, true, true>(k_s + stage * kKeyBlock * D, v_s + stage * kKeyBlock * D, a, t.table,
                                               t.kv_head, b.key0, t.len);
  };

  load_query_rows<D, T::kThreads, T::kRows>(q_s, a.q, [&](int r) { return t.row_offset<D>(a, r); }, t.rows);
  KeyBlockWalk b, ahead;
  load(ahead, 0);
  ptx::cp_async_commit();
  ahead.next(t.split, t.pmax);

  SplitAccum<D> total, part;
  split_init(total);
  split_init(part);
  for (int stage = 0;; stage ^= 1) {
    if (ahead.within(t.pmax)) load(ahead, stage ^ 1);
    ptx::cp_async_commit();
    ahead.next(t.split, t.pmax);
    ptx::cp_async_wait<1>();
    __syncthreads();

    // A block past all of this warp's positions would only add masked keys: skipping it is exact.
    if (b.key0 <= warp_pmax) {
      int limit[2];
      prefill_limits(t, b.s, limit);
      uint32_t p[kKeyBlock / 16][4];
      block_scores(part, p, q_s + warp * kTileRows * D, k_s + stage * kKeyBlock * D, b.key0, limit, a.scale_log2);
      accumulate_values(part, p, v_s + stage * kKeyBlock * D);
    }
    const int s = b.s;
    b.next(t.split, t.pmax);
    if (b.s != s) {
      finish_split(part);
      merge_split(total, part, a.scale_log2);
      split_init(part);  // here rather than at the split's first block, where it compiled to selects
    }
    __syncthreads();
    if (!b.within(t.pmax)) break;
  }
  prefill_store(a, t, total);
}

// A stage of a ring of key blocks and the phase of its barriers' use: the next block's with advance.
struct RingSlot {
  int stage = 0;
  uint32_t phase = 0;
  __device__ void advance(int stages) {
    if (++stage == stages) stage = 0, phase ^= 1;
  }
};

// The Hopper prefill's reduction of one tile (sm_90a), shared by both kernels below: one warpgroup
// of 64 rows (attention_wgmma.cuh) takes the tile's key blocks from a ring of shared-memory stages,
// and the products of neighbouring key blocks overlap: while the softmax of block n runs on the
// CUDA cores, the tensor cores finish o += P(n-1)·V(n-1); o is then rescaled by block n's alpha,
// or, when block n starts a split, the ended split is merged first. Every value takes the
// operations of attention_prefill_kernel in the same order, o included: o·alpha(n-1) +
// P(n-1)·V(n-1), then ·alpha(n), then + P(n)·V(n). The warpgroup takes every block up to the tile's
// last position: for a warp whose positions all precede a block every key is masked, and m, l and
// o keep their values exactly (alpha = 1 or, before the row's first key, 0 on zeros; p = 0), as if
// it had skipped the block.
//
// Ring: which of the tile's key blocks this warpgroup takes, where they lie and when, and what
// becomes of an ended split:
//   walk_start(t), walk_next(walk, t)   the blocks, in KeyBlockWalk's order (every split, or every
//                                       other one);
//   Slot, first(), next(slot)   where the walk's first and following blocks lie (a stage and its
//                               barriers' phase);
//   wait_first(), wait(slot)    the first block's, a later block's stage holds it, visible to
//                               wgmma (the async proxy);
//   k_desc(slot), v_desc(slot)  its K and V tiles;
//   consumed(slot)   this warp's products have read the slot's block (the step has waited for them);
//   recycle(slot)    the end of the step that consumed it;
//   merge_ended(total, part, s, c)   split s has ended, its (m, l, o) in part: total <- total ⊕ it,
//                                    with the splits before it first;
//   finish(total, s, c)   after the walk's last split s: whether total is the tile's, to store.
// b then holds the walk's last key block, and the result is its slot.
template <int D, int kRows, typename Ring>
__device__ __forceinline__ typename Ring::Slot prefill_wgmma_tile(const AttentionArgs& a, const PrefillTile& t,
                                                                  uint64_t q_desc, Ring& ring, KeyBlockWalk& b) {
  SplitAccum<D> total, part;
  split_init(total);
  split_init(part);
  uint32_t p_a[kKeyBlock / 16][4], p_b[kKeyBlock / 16][4];
  float s[kKeyBlock / 8][4], alpha[2];
  auto fence_scores = [&] { ptx::fence_registers(*reinterpret_cast<float(*)[kKeyBlock / 2]>(&s[0][0])); };
  auto fence_output = [&] { ptx::fence_registers(*reinterpret_cast<float(*)[D / 2]>(&part.o[0][0])); };

  // Block 0: its scores and softmax (o is zero: rescaling it is exact); its values go with block 1.
  b = ring.walk_start(t);
  typename Ring::Slot slot = ring.first();  // block b's
  ring.wait_first();
  {
    wg_issue_scores<D, kRows>(s, q_desc, ring.k_desc(slot));
    ptx::wgmma_wait<0>();
    fence_scores();
    int limit[2];
    prefill_limits(t, b.s, limit);
    softmax_block<D>(part, s, p_a, b.key0, limit, a.scale_log2);
  }

  // One block per step: its scores and softmax beside the previous block's values. The P fragments
  // alternate between two arrays, so no copy can fold them into the registers the values in
  // flight read. false, doing nothing, when the tile has no next block.
  auto step = [&](uint32_t(&p_prev)[kKeyBlock / 16][4], uint32_t(&p_next)[kKeyBlock / 16][4]) {
    KeyBlockWalk next = b;
    ring.walk_next(next, t);
    if (!next.within(t.pmax)) return false;
    const typename Ring::Slot slot_next = ring.next(slot);
    ring.wait(slot_next);
    wg_issue_scores<D, kRows>(s, q_desc, ring.k_desc(slot_next));
    wg_issue_values<D>(part, p_prev, ring.v_desc(slot));
    ptx::wgmma_wait<1>();
    fence_scores();
    const bool new_split = next.s != b.s;
    const float m_old[2] = {part.m[0], part.m[1]}, l_old[2] = {part.l[0], part.l[1]};
    if (new_split)
      for (int r = 0; r < 2; ++r) part.m[r] = -INFINITY, part.l[r] = 0.f;
    int limit[2];
    prefill_limits(t, next.s, limit);
    softmax_block<D, false>(part, s, p_next, next.key0, limit, a.scale_log2, alpha);
    // Block b's values, waited for in each branch: in one basic block with the softmax, ptxas put
    // the wait above it, and the softmax ran only after the values, with this warpgroup's tensor
    // work done. The two waits differ in a comment, so that no pass merges them above the branch.
    auto values_in = [&] {
      fence_output();
      fence_fragments(p_prev);
      ring.consumed(slot);
    };
    if (new_split) {
      wg_wait_values<0>();
      values_in();
      // The ended split's (m, l, o), merged as attention_prefill_kernel merges it; the new
      // split's o is 0 · alpha = 0.
      const float m_new[2] = {part.m[0], part.m[1]}, l_new[2] = {part.l[0], part.l[1]};
      for (int r = 0; r < 2; ++r) part.m[r] = m_old[r], part.l[r] = l_old[r];
      finish_split(part);
      ring.merge_ended(total, part, b.s, a.scale_log2);
      split_init(part);
      for (int r = 0; r < 2; ++r) part.m[r] = m_new[r], part.l[r] = l_new[r];
    } else {
      wg_wait_values<1>();
      values_in();
      rescale_output(part, alpha);
    }
    ring.recycle(slot);
    b = next;
    slot = slot_next;
    return true;
  };
  bool last_in_a = true;  // which array holds the last block's P
  while (step(p_a, p_b)) {
    if (!step(p_b, p_a)) {
      last_in_a = false;
      break;
    }
  }
  // The last block's values, then its split.
  auto last_values = [&](uint32_t(&p)[kKeyBlock / 16][4]) {
    wg_issue_values<D>(part, p, ring.v_desc(slot));
    ptx::wgmma_wait<0>();
    fence_fragments(p);
  };
  if (last_in_a)
    last_values(p_a);
  else
    last_values(p_b);
  ring.consumed(slot);
  fence_output();
  finish_split(part);
  ring.merge_ended(total, part, b.s, a.scale_log2);
  if (ring.finish(total, b.s, a.scale_log2)) prefill_store(a, t, total);
  return slot;
}

// What the rings that take every split of a tile share (prefill_wgmma_tile's Ring): the tile's key
// blocks in KeyBlockWalk's order, one after another through kStages stages of K and V tiles, each
// ended split merged into the total at once.
template <int D, int kStages_>
struct EverySplit {
  using Slot = RingSlot;
  static constexpr int kStages = kStages_;
  bf16* k_s;  // [kStages][kKeyBlock][D] in slabs
  bf16* v_s;
  __device__ uint64_t k_desc(Slot slot) const { return ptx::smem_desc(ptx::smem_addr(k_s + slot.stage * kKeyBlock * D)); }
  __device__ uint64_t v_desc(Slot slot) const { return n_major_desc(ptx::smem_addr(v_s + slot.stage * kKeyBlock * D)); }
  __device__ Slot first() const { return {}; }
  __device__ Slot next(Slot slot) const {
    slot.advance(kStages);
    return slot;
  }
  __device__ KeyBlockWalk walk_start(const PrefillTile&) const { return {}; }
  __device__ void walk_next(KeyBlockWalk& w, const PrefillTile& tile) const { w.next(tile.split, tile.pmax); }
  __device__ void merge_ended(SplitAccum<D>& total, const SplitAccum<D>& part, int, float scale_log2) const {
    merge_split(total, part, scale_log2);
  }
  __device__ bool finish(SplitAccum<D>&, int, float) const { return true; }
};

// The one-warpgroup kernel's ring: kStages stages that the warpgroup itself fills with cp.async,
// one commit group per key block (empty past the tile's keys); a stage is refilled with the block
// kStages on once every warp has finished the step that read it.
template <int D>
struct CpAsyncRing : EverySplit<D, PrefillWgmmaTiles::kStages> {
  using Base = EverySplit<D, PrefillWgmmaTiles::kStages>;
  using typename Base::Slot;
  using Base::k_s, Base::kStages, Base::v_s;
  const AttentionArgs& a;
  const PrefillTile& t;
  KeyBlockWalk ahead;  // the next block to copy

  __device__ void copy_ahead(int stage) {
    if (ahead.within(t.pmax))
      load_key_block<D, PrefillWgmmaTiles::kThreads, true, true, true, false, true>(
          k_s + stage * kKeyBlock * D, v_s + stage * kKeyBlock * D, a, t.table, t.kv_head, ahead.key0, t.len);
    ptx::cp_async_commit();
    ahead.next(t.split, t.pmax);
  }
  __device__ void start() {
    for (int st = 0; st < kStages; ++st) copy_ahead(st);
  }
  // Block i is commit group i: kStages groups were in flight before block 0, and each step adds one.
  template <int kInFlight>
  __device__ void wait_groups() {
    ptx::cp_async_wait<kInFlight>();
    ptx::fence_proxy_async_smem();  // the copies, seen by wgmma's reads (the async proxy)
    __syncthreads();
  }
  __device__ void wait_first() { wait_groups<kStages - 1>(); }
  __device__ void wait(Slot) { wait_groups<kStages - 2>(); }
  __device__ void consumed(Slot) {}
  __device__ void recycle(Slot slot) {
    __syncthreads();  // the slot's stage is free: the block kStages on goes there
    copy_ahead(slot.stage);
  }
};

// wgmma (sm_90a): one warpgroup of 64 rows reduces the block's tile with prefill_wgmma_tile.
template <int D>
__global__ void __launch_bounds__(PrefillWgmmaTiles::kThreads, PrefillWgmmaTiles::min_blocks<D>())
    attention_prefill_wgmma_kernel(AttentionArgs a) {
  using T = PrefillWgmmaTiles;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // sm_90a machine code only; the host launches it nowhere else
  extern __shared__ __align__(128) unsigned char smem_buffer[];
  unsigned char* smem = smem_buffer + ((1024 - (ptx::smem_addr(smem_buffer) & 1023)) & 1023);
  bf16* q_s = reinterpret_cast<bf16*>(smem);  // [kRows][D] in slabs
  bf16* k_s = q_s + T::kRows * D;              // [kStages][kKeyBlock][D] in slabs
  bf16* v_s = k_s + T::kStages * kKeyBlock * D;

  PrefillTile t;
  if (!prefill_tile<T::kRows>(a, t)) return;
  load_query_rows<D, T::kThreads, T::kRows, true>(q_s, a.q, [&](int r) { return t.row_offset<D>(a, r); }, t.rows);
  CpAsyncRing<D> ring{{k_s, v_s}, a, t};
  ring.start();  // the queries go with block 0's commit group
  KeyBlockWalk b;
  prefill_wgmma_tile<D, T::kRows>(a, t, ptx::smem_desc(ptx::smem_addr(q_s)), ring, b);
#endif
}

// Prefill, warp-specialized wgmma (sm_90a, head dim 128): a producer warpgroup and two consumer
// warpgroups a block, one block per SM. The producer copies the queries and the key blocks the
// consumers take into a ring of kStages stages, each completing on its full barrier
// (cp.async.mbarrier.arrive); a consumer reduces with prefill_wgmma_tile and frees a stage on its
// empty barrier once its four warps' products have read it. Two ways to share a block:
//   tiles: consumer c reduces the block's tile c, of kTiles neighbouring tiles of one kv head; the
//          producer copies the last tile's walk (an earlier tile's walk is a prefix of it), and a
//          consumer whose walk ends first goes on freeing the stages of the others' blocks, in
//          order. The grid's tiles outnumber the SMs.
//   interleaved (kInterleave): the block's one tile, consumer 0 taking the even splits and
//          consumer 1 the odd ones (InterleavedRing). Consumer 1 hands each finished split over
//          in shared memory, and consumer 0 merges it into the tile's total in its turn, so the
//          splits are merged in ascending order as ever. The grid's tiles are no more than the SMs,
//          which would otherwise leave consumer 1 idle (random Qwen3-0.6B, a 32,768-token prompt
//          in 512-token chunks of 128 tiles: 55.9k -> 62.8k tok/s end to end).
// Launch geometry only, the bits of the one-warpgroup kernel; what the tiles form gains is that
// the consumers issue no copies (H200, one sequence, 32 heads over 8 kv heads: 1,369 µs at 8,192
// tokens and 20,864 at 32,768, where the one-warpgroup kernel took 1,479 and 23,300;
// docs/performance.md, "A producer warpgroup for the Hopper prefill", "One tile reduction for
// both Hopper prefill kernels" and "Alternate splits for a grid of few tiles").
struct PrefillWsTiles {
  static constexpr int kTiles = 2;
  static constexpr int kThreads = (kTiles + 1) * 128;
  static constexpr int kRows = kWgRows;  // query rows of each consumer's tile
  static constexpr int kStages = 5;      // key blocks in flight
  // setmaxnreg.inc takes only what the block's dec gave back: kTiles * consumer + producer <=
  // (kTiles + 1) * the registers a thread launched with (65,536 / threads, rounded down to 8). The
  // consumers take 232 (the one-warpgroup kernel 241 unbounded, but 240/24 spilled 60 bytes where
  // 232/40 spill 4).
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  static_assert(kTiles * kConsumerRegs + kProducerRegs <= (kTiles + 1) * (65536 / kThreads / 8 * 8),
                "the consumers' registers must come from the producer's");
  // A split handed from consumer 1 to consumer 0: each thread's o, m and l (SplitAccum) at its own
  // place, [handoff_words][128] floats, as both warpgroups hold the same fragment layout.
  template <int D>
  static constexpr int handoff_words() {
    return D / 2 + 4;
  }
  // The block's shared memory, byte offsets from its 1024-byte aligned start: the query tiles, the
  // K and V stages, the handoff (interleaved only), then the barriers: full[kStages],
  // empty[kStages], q_full, and (interleaved) the handoff's full and empty.
  template <int D, bool kInterleave>
  struct Layout {
    static constexpr uint32_t kStageBytes = kKeyBlock * D * sizeof(bf16);
    static constexpr uint32_t kK = (kInterleave ? 1 : kTiles) * kRows * D * sizeof(bf16);
    static constexpr uint32_t kV = kK + kStages * kStageBytes;
    static constexpr uint32_t kHand = kV + kStages * kStageBytes;
    static constexpr uint32_t kFull = kHand + (kInterleave ? handoff_words<D>() * 128 * sizeof(float) : 0);
    static constexpr uint32_t kEmpty = kFull + kStages * sizeof(uint64_t);
    static constexpr uint32_t kQFull = kEmpty + kStages * sizeof(uint64_t);
    static constexpr uint32_t kHandFull = kQFull + sizeof(uint64_t);
    static constexpr uint32_t kHandEmpty = kHandFull + sizeof(uint64_t);
    static constexpr uint32_t kEnd = kHandEmpty + sizeof(uint64_t);
  };
  template <int D, bool kInterleave>
  static constexpr int smem_bytes() {
    return static_cast<int>(Layout<D, kInterleave>::kEnd) + 1024;  // + alignment
  }
};

// A consumer's view of the producer's ring, every split of its tile in order: a slot's full
// barrier completes its phase when the block's copies land; lane 0 of each warp arrives on the
// slot's empty barrier once the warp's products have read it.
template <int D>
struct MbarrierRing : EverySplit<D, PrefillWsTiles::kStages> {
  using typename EverySplit<D, PrefillWsTiles::kStages>::Slot;
  uint64_t* full;
  uint64_t* empty;

  __device__ uint32_t bar(uint64_t* barriers, int stage) const { return ptx::smem_addr(&barriers[stage]); }
  __device__ void wait(Slot slot) const {
    ptx::mbar_wait(bar(full, slot.stage), slot.phase);
    ptx::fence_proxy_async_smem();  // the copies, seen by wgmma's reads (the async proxy)
  }
  __device__ void wait_first() const { wait(Slot{}); }
  __device__ void consumed(Slot slot) const {
    if ((threadIdx.x & 31) == 0) ptx::mbar_arrive(bar(empty, slot.stage));
  }
  __device__ void recycle(Slot) const {}
};

// Key blocks of the splits first, first + 2, ... of a tile whose last position is pmax (the
// blocks KeyBlockWalk visits with stride 2 from split `first`).
__device__ __forceinline__ int alternate_split_blocks(int first, int split, int pmax) {
  int blocks = 0;
  for (int s = first; s * split <= pmax; s += 2) blocks += (min((s + 1) * split, pmax + 1) - s * split + kKeyBlock - 1) / kKeyBlock;
  return blocks;
}

// The interleaved order of the producer's walk: the two consumers' blocks taking turns, 0 first,
// while both have blocks, then the rest of the longer walk. Block j of consumer c is walk index
// index(c, j).
struct InterleavedWalk {
  int blocks[2];  // each consumer's key blocks
  int paired;     // blocks of each consumer that take turns: the fewer of the two
  __device__ InterleavedWalk(int split, int pmax)
      : blocks{alternate_split_blocks(0, split, pmax), alternate_split_blocks(1, split, pmax)},
        paired(min(blocks[0], blocks[1])) {}
  __device__ int total() const { return blocks[0] + blocks[1]; }
  __device__ int index(int c, int j) const { return j < paired ? 2 * j + c : paired + j; }
  __device__ int consumer(int i) const { return i < 2 * paired ? (i & 1) : (blocks[1] > blocks[0] ? 1 : 0); }
};

// Consumer c of the interleaved form: the splits c, c + 2, ... of the block's tile from the
// producer's ring, where its block j lies at walk index InterleavedWalk::index(c, j). Consumer 1
// hands each of its ended splits to consumer 0 through shared memory (handoff_words floats a
// thread); consumer 0 merges consumer 1's split s - 1 before its own split s, and at the end the
// split after its last one if consumer 1 has it: the ascending order of a single walk. Everything
// it reads lies at a constant offset from the block's shared memory, so that it holds few
// registers beside the tile's.
template <int D>
struct InterleavedRing {
  using T = PrefillWsTiles;
  static constexpr int kStages = T::kStages;
  using L = T::Layout<D, true>;
  static constexpr uint32_t kStageBytes = L::kStageBytes, kK = L::kK, kV = L::kV, kHand = L::kHand;
  static constexpr uint32_t kFull = L::kFull, kEmpty = L::kEmpty, kHandFull = L::kHandFull, kHandEmpty = L::kHandEmpty;
  uint32_t base;  // the block's shared memory, 1024-byte aligned
  InterleavedWalk walk;
  int c;
  int odd_splits;    // the tile's splits 1, 3, ...: consumer 1's
  int handoffs = 0;  // splits this consumer has handed over or taken

  struct Slot {
    int j;
    RingSlot at;
  };
  __device__ Slot slot_of(int j) const {
    const int i = walk.index(c, j);
    return {j, RingSlot{i % kStages, static_cast<uint32_t>((i / kStages) & 1)}};
  }
  __device__ Slot first() const { return slot_of(0); }
  __device__ Slot next(Slot slot) const { return slot_of(slot.j + 1); }
  __device__ void wait(Slot slot) const {
    ptx::mbar_wait(base + kFull + slot.at.stage * sizeof(uint64_t), slot.at.phase);
    ptx::fence_proxy_async_smem();  // the copies, seen by wgmma's reads (the async proxy)
  }
  __device__ void wait_first() const { wait(first()); }
  __device__ uint64_t k_desc(Slot slot) const { return ptx::smem_desc(base + kK + slot.at.stage * kStageBytes); }
  __device__ uint64_t v_desc(Slot slot) const { return n_major_desc(base + kV + slot.at.stage * kStageBytes); }
  __device__ void consumed(Slot slot) const {
    if ((threadIdx.x & 31) == 0) ptx::mbar_arrive(base + kEmpty + slot.at.stage * sizeof(uint64_t));
  }
  __device__ void recycle(Slot) const {}
  __device__ KeyBlockWalk walk_start(const PrefillTile& tile) const { return {c, c * tile.split}; }
  __device__ void walk_next(KeyBlockWalk& w, const PrefillTile& tile) const { w.next(tile.split, tile.pmax, 2); }

  // A thread's words: o[i][e] at 4i + e, then m[0], m[1], l[0], l[1].
  __device__ uint32_t word(int k) const { return base + kHand + (k * 128 + (threadIdx.x & 127)) * sizeof(float); }
  __device__ uint32_t o_word(int i, int e) const { return word(4 * i + e); }
  __device__ uint32_t m_word(int r) const { return word(D / 2 + r); }
  __device__ uint32_t l_word(int r) const { return word(D / 2 + 2 + r); }
  // Consumer 1: part, ended, to consumer 0 (once it has read the split before).
  __device__ void give(const SplitAccum<D>& part) {
    if (handoffs > 0) ptx::mbar_wait(base + kHandEmpty, (handoffs - 1) & 1);
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) ptx::st_shared_b32(o_word(i, e), __float_as_uint(part.o[i][e]));
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      ptx::st_shared_b32(m_word(r), __float_as_uint(part.m[r]));
      ptx::st_shared_b32(l_word(r), __float_as_uint(part.l[r]));
    }
    ptx::mbar_arrive(base + kHandFull);
    ++handoffs;
  }
  // Consumer 0: total <- total ⊕ consumer 1's next split, read from its words.
  __device__ void take(SplitAccum<D>& total, float scale_log2) {
    ptx::mbar_wait(base + kHandFull, handoffs & 1);
    merge_split_from(
        total, [&](int r) { return ptx::ld_shared_f32(m_word(r)); }, [&](int r) { return ptx::ld_shared_f32(l_word(r)); },
        [&](int i, int e) { return ptx::ld_shared_f32(o_word(i, e)); }, scale_log2);
    ptx::mbar_arrive(base + kHandEmpty);
    ++handoffs;
  }
  __device__ void merge_ended(SplitAccum<D>& total, const SplitAccum<D>& part, int s, float scale_log2) {
    if (c == 1) return give(part);
    if (s > 0) take(total, scale_log2);  // split s - 1, consumer 1's
    merge_split(total, part, scale_log2);
  }
  // Consumer 0 after its last split: consumer 1's split after it, if the tile has one.
  __device__ bool finish(SplitAccum<D>& total, int, float scale_log2) {
    if (c == 1) return false;
    if (handoffs < odd_splits) take(total, scale_log2);
    return true;
  }
};

template <int D, bool kInterleave>
__global__ void __launch_bounds__(PrefillWsTiles::kThreads, 1)
    attention_prefill_ws_kernel(AttentionArgs a, int tiles_per_block) {
  using T = PrefillWsTiles;
  constexpr int S = T::kStages;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // sm_90a machine code only; the host launches it nowhere else
  using L = T::Layout<D, kInterleave>;
  extern __shared__ __align__(128) unsigned char smem_buffer[];
  unsigned char* smem = smem_buffer + ((1024 - (ptx::smem_addr(smem_buffer) & 1023)) & 1023);
  bf16* q_s = reinterpret_cast<bf16*>(smem);             // [tiles][kRows][D] in slabs
  bf16* k_s = reinterpret_cast<bf16*>(smem + L::kK);     // [S][kKeyBlock][D] in slabs
  bf16* v_s = reinterpret_cast<bf16*>(smem + L::kV);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kFull);    // a stage's K and V have arrived
  uint64_t* empty = reinterpret_cast<uint64_t*>(smem + L::kEmpty);  // every consumer warp has read it
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + L::kQFull);  // every tile's queries have arrived
  const MbarrierRing<D> ring{{k_s, v_s}, full, empty};

  // Broadcast from lane 0, so that ptxas knows them uniform across the warp: then so are the tiles,
  // the walks and the stages, and the products' descriptors are computed in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0), warp = __shfl_sync(0xffffffffu, (threadIdx.x >> 5) & 3, 0);
  const int first = (gridDim.x - 1 - blockIdx.x) * tiles_per_block;  // the block's tiles, the most keys first
  // The block's tiles that have rows: 0 .. tiles - 1 (the grid's last block may hold fewer).
  PrefillTile last;
  int tiles = 0;
  for (int c = 0; c < tiles_per_block; ++c) {
    PrefillTile t;
    if (!prefill_tile_at<T::kRows>(a, t, first + c, warp)) break;
    last = t, tiles = c + 1;
  }
  if (tiles == 0) return;
  const int pmax = last.pmax;  // the producer's walk: the last tile's
  if (threadIdx.x == 0) {
    for (int i = 0; i < S; ++i) {
      ptx::mbar_init(ring.bar(full, i), 128);  // one arrival per producer thread, when its copies land
      ptx::mbar_init(ring.bar(empty, i), kInterleave ? 4 : 4 * tiles);  // one per warp reading it
    }
    ptx::mbar_init(ptx::smem_addr(q_full), 128);
    if constexpr (kInterleave) {
      ptx::mbar_init(ptx::smem_addr(smem + L::kHandFull), 128);
      ptx::mbar_init(ptx::smem_addr(smem + L::kHandEmpty), 128);
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    ptx::setmaxnreg_dec<T::kProducerRegs>();
    for (int c = 0; c < tiles; ++c) {
      PrefillTile t;
      prefill_tile_at<T::kRows>(a, t, first + c, warp);
      load_query_rows<D, 128, T::kRows, true>(q_s + c * T::kRows * D, a.q, [&](int r) { return t.row_offset<D>(a, r); },
                                              t.rows);
    }
    ptx::cp_async_mbar_arrive(ptx::smem_addr(q_full));
    auto copy = [&](RingSlot slot, bool reuse, int key0) {
      if (reuse) ptx::mbar_wait(ring.bar(empty, slot.stage), slot.phase ^ 1);  // read in the previous round
      load_key_block<D, 128, true, true, true, false, true>(k_s + slot.stage * kKeyBlock * D,
                                                           v_s + slot.stage * kKeyBlock * D, a, last.table,
                                                           last.kv_head, key0, last.len);
      ptx::cp_async_mbar_arrive(ring.bar(full, slot.stage));
    };
    RingSlot slot;
    bool reuse = false;
    if constexpr (kInterleave) {
      const InterleavedWalk order(last.split, pmax);
      KeyBlockWalk w0{0, 0}, w1{1, last.split};  // consumer 0's and 1's
      for (int i = 0; i < order.total(); ++i) {
        const bool to1 = order.consumer(i) == 1;
        copy(slot, reuse, to1 ? w1.key0 : w0.key0);
        if (to1)
          w1.next(last.split, pmax, 2);
        else
          w0.next(last.split, pmax, 2);
        slot.advance(S);
        reuse = reuse || slot.stage == 0;
      }
    } else {
      for (KeyBlockWalk w; w.within(pmax); w.next(last.split, pmax)) {
        copy(slot, reuse, w.key0);
        slot.advance(S);
        reuse = reuse || slot.stage == 0;
      }
    }
    ptx::cp_async_wait<0>();
    return;
  }

  const int c = wg - 1;
  if (c >= (kInterleave ? 2 : tiles)) return;
  ptx::setmaxnreg_inc<T::kConsumerRegs>();
  const int tile = kInterleave ? 0 : c;  // the block's tile this consumer reduces
  PrefillTile t;
  prefill_tile_at<T::kRows>(a, t, first + tile, warp);
  ptx::mbar_wait(ptx::smem_addr(q_full), 0);
  const uint64_t q_desc = ptx::smem_desc(ptx::smem_addr(q_s + tile * T::kRows * D));
  KeyBlockWalk b;
  if constexpr (kInterleave) {
    InterleavedRing<D> sched{ptx::smem_addr(smem), InterleavedWalk(t.split, t.pmax), c, (t.pmax / t.split + 1) / 2};
    if ((c == 0 ? sched.walk.blocks[0] : sched.walk.blocks[1]) == 0) return;  // one split: consumer 0 alone
    prefill_wgmma_tile<D, T::kRows>(a, t, q_desc, sched, b);
  } else {
    RingSlot slot = prefill_wgmma_tile<D, T::kRows>(a, t, q_desc, ring, b);
    // The rest of the producer's walk, freed unread, in order (a stage's barrier phases alternate).
    for (b.next(t.split, pmax); b.within(pmax); b.next(t.split, pmax)) {
      slot.advance(S);
      ring.wait(slot);
      ring.consumed(slot);
    }
  }
#endif
}

template <int D>
void launch_prefill_ws(const AttentionArgs& a, int max_query_len, cudaStream_t stream) {
  using T = PrefillWsTiles;
  static std::once_flag configured;
  std::call_once(configured, [&] {
    CUDA_CHECK(cudaFuncSetAttribute(attention_prefill_ws_kernel<D, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    T::template smem_bytes<D, false>()));
    CUDA_CHECK(cudaFuncSetAttribute(attention_prefill_ws_kernel<D, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    T::template smem_bytes<D, true>()));
  });
  const PrefillHeads g = prefill_heads(a.heads, a.kv_heads, T::kRows);
  const int tiles = (max_query_len + g.positions - 1) / g.positions;
  // As few tiles a block as keep every SM's block busy: one while the grid's tiles are no more than
  // the SMs, so that a small grid (a 512-query chunk of Qwen3-0.6B: 128 tiles) still spreads over
  // as many SMs (two a block there took a chunked prefill of 8,192 tokens from 108,447 to 93,912
  // tok/s), its consumers then taking alternate splits; then one more for each multiple of the
  // SMs, up to kTiles.
  const int64_t grid_tiles = static_cast<int64_t>(tiles) * a.kv_heads * g.head_tiles * a.num_seqs;
  const int64_t sms = cuda_runtime::multiprocessors();
  const int per_block = static_cast<int>(std::min<int64_t>(T::kTiles, (grid_tiles + sms - 1) / sms));
  const dim3 grid((tiles + per_block - 1) / per_block, a.kv_heads * g.head_tiles, a.num_seqs);
  static const bool interleave = !switched_off("DETINFER_PREFILL_INTERLEAVE");
  if (per_block == 1 && interleave)
    attention_prefill_ws_kernel<D, true><<<grid, T::kThreads, T::template smem_bytes<D, true>(), stream>>>(a, 1);
  else
    attention_prefill_ws_kernel<D, false><<<grid, T::kThreads, T::template smem_bytes<D, false>(), stream>>>(a, per_block);
}

// ---------------------------------------------------------------------------------------------
// kv_append: grid T, one block per token row. A slot outside the cache is skipped like a negative
// one (the CPU backend throws; here the slots are on the device and checking them would sync).
template <typename Word>
__global__ void __launch_bounds__(KvAppendTiles::kThreads)
    kv_append_kernel(Word* k_cache, Word* v_cache, const Word* k, const Word* v, const int* slots, int64_t row_words,
                     int64_t capacity) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= capacity) return;
  for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) {
    k_cache[slot * row_words + i] = k[t * row_words + i];
    v_cache[slot * row_words + i] = v[t * row_words + i];
  }
}

// ---------------------------------------------------------------------------------------------
// The one place attention's launch is chosen. Invariant path: kSplitSize for every sequence.
// Variant path (detinfer::variant_kernels()): each sequence's split size from the batch size and
// its length, as FlashDecoding-style libraries do.
struct AttentionLaunch {
  bool decode;     // every sequence has at most one query: split-parallel decode + combine
  int split_size;  // 0: per sequence, variant_split_size(num_seqs, length)
  int max_splits;  // splits of the longest sequence
};

AttentionLaunch choose_launch(const AttentionBatch& batch, int num_seqs) {
  AttentionLaunch l{};
  l.decode = batch.max_query_len == 1;
  if (!variant_kernels()) {
    l.split_size = attention_split_size();  // kSplitSize unless a development switch says otherwise
    l.max_splits = std::max(1, (batch.max_seq_len + l.split_size - 1) / l.split_size);
  } else {
    l.split_size = 0;
    l.max_splits = std::max(1, std::min(attention_schedule::variant_max_splits(num_seqs), batch.max_seq_len));
  }
  return l;
}

// The decode partials' workspace of launches whose caller gives none large enough, kept between
// launches and grown (doubling) when a launch needs more: allocating per launch costs tens of
// microseconds, since the stream-ordered pool hands its memory back at every synchronize. All
// launches share the one stream, so reuse is ordered. Never released (it lives as long as the
// process's CUDA context). Growing it frees the old buffer, so no CUDA graph may hold a pointer
// into it: captured steps use their model's own workspace (cuda_ops.h).
struct DecodeWorkspace {
  std::mutex mutex;
  void* ptr = nullptr;
  size_t capacity = 0;
};
DecodeWorkspace g_decode_workspace;

float* decode_workspace(size_t bytes) {
  DecodeWorkspace& w = g_decode_workspace;
  std::lock_guard<std::mutex> lock(w.mutex);
  if (bytes > w.capacity) {
    const size_t grown = std::max(bytes, 2 * w.capacity);
    void* fresh = cuda_runtime::alloc(grown);
    cuda_runtime::free(w.ptr);  // stream-ordered: after the launches that used it
    w.ptr = fresh;
    w.capacity = grown;
  }
  return static_cast<float*>(w.ptr);
}

std::string describe_launch(const Tensor& q, const Tensor& k_cache, const AttentionBatch& b) {
  return "(q " + q.describe() + ", cache " + k_cache.describe() + ", " + std::to_string(b.seq_lens.dim(0)) +
         " sequences, maxQueryLen " + std::to_string(b.max_query_len) + ", maxSeqLen " +
         std::to_string(b.max_seq_len) + ")";
}

// The dynamic shared memory that keeps a second block of the kernel off an SM: more than half of
// what an SM holds, less each block's reservation (H200: 113 KB of 228). 0 with
// DETINFER_SOLO_ATTENTION=0, for measuring.
int solo_smem_bytes() {
  static const int bytes = [] {
    if (switched_off("DETINFER_SOLO_ATTENTION")) return 0;
    int device = 0, per_sm = 0, reserved = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
    return per_sm / 2 - reserved + 128;
  }();
  return bytes;
}

// Head dim 128's three-deep grids of one wave launch solo (launch_decode); 64 was not measured.
template <int D, int PAIRS>
constexpr bool kSoloDecode = PAIRS == 3 && D == 128;

// The decode kernel's blocks resident on the device at once, by the query rows of its tile
// (1 .. kTileRows): SMs × blocks per SM at that shared memory. The first call also raises the
// kernel's shared-memory limit, which every launch needs.
template <int D, int PAIRS>
int64_t decode_slots(int q_rows) {
  using T = DecodeWideTiles<PAIRS>;
  static std::once_flag once;
  static cudaError_t err = cudaSuccess;
  static int64_t slots[kTileRows + 1] = {};
  std::call_once(once, [] {
    const auto kernel = attention_decode_wide_kernel<D, PAIRS>;
    const int most = std::max(T::template smem_bytes<D>(kTileRows), kSoloDecode<D, PAIRS> ? solo_smem_bytes() : 0);
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most);
    for (int rows = 1; rows <= kTileRows && err == cudaSuccess; ++rows) {
      int blocks = 0;
      err = device_blocks(kernel, T::kThreads, T::template smem_bytes<D>(rows), blocks);
      slots[rows] = blocks;
    }
  });
  CUDA_CHECK(err);
  return slots[q_rows];
}

// How a decode grid streams K and V (DecodeWideTiles' PAIRS). Three deep for a grid of one wave
// of three-deep blocks (two per SM at head dim 128: 264 on the H200's 132 SMs). H200, random
// Qwen3-0.6B, replayed decode step, against paired (both with the early copies): batches 2-16 at
// 101 keys 962-1021 -> 927-987 us, at 200 keys 1048-1149 -> 991-1090, batch 32 at 200 keys
// 1389 -> 1359; batch 1 at 200 keys 946 -> 914, at 1000 keys 1008 -> 970, at 101 keys 845 ->
// 847; it lost at batch 8 of 1000 keys, 1325 -> 1345. Past one such wave: paired while the grid
// is one wave of paired blocks, where each block's latency is what counts; rotating beyond, where
// its extra blocks per SM (four against three at head dim 128 and four query heads per kv head)
// save a wave or most of the last one's tail. Grids of more than two waves of rotating blocks
// took paired (their deeper copies streamed 1-3% faster in an older dev_attention --sweep); at the
// long contexts of a replayed step rotating is faster there: H200, random Qwen3-0.6B, replayed
// decode step, paired -> rotating, µs: 8,000 keys at batch 8 (2,048 blocks) 3066.9 -> 2874.9,
// at batch 16 4982.9 -> 4605.0; 3,000 keys at batch 16 2474.0 -> 2419.1 (bench/step-attribution.mjs
// --decode-pipeline), and alone (dev_attention --decode) 64 x 8k 522.8 -> 519.5, 8 x 32k 272.6
// -> 270.7, 64 x 1k 82.4 -> 79.8. Launch geometry only: each gives the same bits.
template <int D>
int decode_pipeline(dim3 grid, int q_rows) {
  const int forced = forced_decode_pipeline();  // development switch (common/config.h)
  if (forced != 0) return forced == 1 ? 2 : forced == 2 ? 0 : 3;
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  if (blocks <= decode_slots<D, 3>(q_rows)) return 3;
  return blocks <= decode_slots<D, 2>(q_rows) ? 2 : 0;
}

// A three-deep grid of at most one block per SM asks for the solo shared memory (solo_smem_bytes),
// which only its placement uses: two of its blocks never share an SM, as with the narrow matmul
// tiles (matmul_sm90.cu, solo_tiles); at 106 KB a block, two fit on one SM and the block scheduler
// need not spread them. H200, random Qwen3-0.6B, replayed decode step, medians of three rounds,
// µs: 200 keys, batch 1 877.1 -> 870.1, 8 982.4 -> 979.8, 16 1058.1 -> 1042.8; 1,000 keys, batch 1
// 941.6 -> 939.2 (docs/performance.md, "Solo three-deep decode blocks"). The same kernel, the same
// bits. Head dim 128 only (kSoloDecode), the one measured.
template <int D, int PAIRS>
void launch_decode(const AttentionArgs& a, dim3 grid, int q_rows, cudaStream_t stream) {
  using T = DecodeWideTiles<PAIRS>;
  decode_slots<D, PAIRS>(q_rows);  // the kernel's shared-memory limit, set once
  int smem = T::template smem_bytes<D>(q_rows);
  if (kSoloDecode<D, PAIRS> && static_cast<int64_t>(grid.x) * grid.y * grid.z <= cuda_runtime::multiprocessors())
    smem = std::max(smem, solo_smem_bytes());
  launch_overlapped(attention_decode_wide_kernel<D, PAIRS>, grid, T::kThreads, smem, stream, a);
}

// The prefill family: wgmma where this build has sm_90a code and the device runs it, unless the
// development switch forces mma.sync (common/config.h). Either gives the same bits.
bool prefill_wgmma() { return forced_prefill_kernel() != 1 && sm90::available(); }

template <int D, bool WGMMA>
void launch_prefill(const AttentionArgs& a, int max_query_len, cudaStream_t stream) {
  using T = std::conditional_t<WGMMA, PrefillWgmmaTiles, PrefillTiles>;
  const auto kernel = [] {
    if constexpr (WGMMA)
      return attention_prefill_wgmma_kernel<D>;
    else
      return attention_prefill_kernel<D>;
  }();
  constexpr int smem = T::template smem_bytes<D>();
  static std::once_flag configured;
  std::call_once(configured, [&] { CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)); });
  const PrefillHeads g = prefill_heads(a.heads, a.kv_heads, T::kRows);
  const dim3 grid((max_query_len + g.positions - 1) / g.positions, a.kv_heads * g.head_tiles, a.num_seqs);
  kernel<<<grid, T::kThreads, smem, stream>>>(a);
}

// The Hopper prefill: at head dim 128 the warp-specialized kernel, one or two tiles a block; at 64 the
// one-warpgroup kernel, three blocks per SM (two consumer warpgroups a block measured 10-13%
// slower there, three 8% slower at 2,048 tokens and 5% faster only at 32,768: docs/performance.md,
// "A producer warpgroup for the Hopper prefill", "One tile reduction for both Hopper prefill
// kernels").
template <int D>
void launch_prefill_wgmma(const AttentionArgs& a, int max_query_len, cudaStream_t stream) {
  if constexpr (D == 128)
    launch_prefill_ws<D>(a, max_query_len, stream);
  else
    launch_prefill<D, true>(a, max_query_len, stream);
}

template <int D>
void launch_attention(AttentionArgs a, const AttentionLaunch& l, const Tensor& q, const Tensor& k_cache,
                      const AttentionBatch& batch, const Tensor* workspace, cudaStream_t stream) {
  if (l.decode) {
    const int row_tiles = (a.heads / a.kv_heads + kTileRows - 1) / kTileRows;
    const size_t partials = static_cast<size_t>(a.num_seqs) * a.heads * l.max_splits;
    const size_t bytes = partials * (D + 2) * sizeof(float);
    if (workspace && workspace->nbytes() >= bytes) {
      a.part_o = workspace->ptr<float>();
    } else {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
      if (capture != cudaStreamCaptureStatusNone)
        fail("attention: a decode launch captured in a CUDA graph needs a workspace of at least ", bytes,
             " bytes for its split partials but received ", workspace ? workspace->describe() : "none", " ",
             describe_launch(q, k_cache, batch));
      a.part_o = decode_workspace(bytes);
    }
    a.part_ml = a.part_o + partials * D;
    a.max_splits = l.max_splits;
    a.direct = l.max_splits == 1;
    const dim3 grid(l.max_splits, a.kv_heads * row_tiles, a.num_seqs);
    const int q_rows = std::min(a.heads / a.kv_heads, kTileRows);
    switch (decode_pipeline<D>(grid, q_rows)) {
      case 3: launch_decode<D, 3>(a, grid, q_rows, stream); break;
      case 2: launch_decode<D, 2>(a, grid, q_rows, stream); break;
      default: launch_decode<D, 0>(a, grid, q_rows, stream);
    }
    CUDA_CHECK_LAUNCH("attention (decode splits)", describe_launch(q, k_cache, batch));
    if (a.direct) return;
    launch_overlapped(attention_decode_combine_kernel<D>, dim3(a.heads, a.num_seqs), D, 0, stream, a);
    CUDA_CHECK_LAUNCH("attention (decode combine)", describe_launch(q, k_cache, batch));
  } else {
    if (prefill_wgmma())
      launch_prefill_wgmma<D>(a, batch.max_query_len, stream);
    else
      launch_prefill<D, false>(a, batch.max_query_len, stream);
    CUDA_CHECK_LAUNCH("attention (prefill)", describe_launch(q, k_cache, batch));
  }
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data()) % 16 == 0; }

}  // namespace

const char* prefill_kernel() { return prefill_wgmma() ? "wgmma" : "mma.sync"; }

size_t decode_workspace_bytes() {
  std::lock_guard<std::mutex> lock(g_decode_workspace.mutex);
  return g_decode_workspace.capacity;
}

void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, const Tensor& slots) {
  const int64_t tokens = k.dim(0), row = k.dim(1) * k.dim(2), capacity = k_cache.dim(0) * k_cache.dim(1);
  if (tokens == 0) return;
  auto stream = static_cast<cudaStream_t>(cuda_runtime::stream());
  const bool wide = row % 8 == 0 && aligned16(k_cache) && aligned16(v_cache) && aligned16(k) && aligned16(v);
  if (wide) {
    kv_append_kernel<uint4><<<tokens, KvAppendTiles::kThreads, 0, stream>>>(
        k_cache.ptr<uint4>(), v_cache.ptr<uint4>(), k.ptr<uint4>(), v.ptr<uint4>(), slots.ptr<int>(), row / 8, capacity);
  } else {
    kv_append_kernel<uint16_t><<<tokens, KvAppendTiles::kThreads, 0, stream>>>(
        k_cache.ptr<uint16_t>(), v_cache.ptr<uint16_t>(), k.ptr<uint16_t>(), v.ptr<uint16_t>(), slots.ptr<int>(), row,
        capacity);
  }
  CUDA_CHECK_LAUNCH("kv_append", "(k " + k.describe() + ", cache " + k_cache.describe() + ")");
}

void attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const AttentionBatch& batch,
               float scale, const Tensor* workspace) {
  const int64_t dim = q.dim(2), num_seqs = batch.seq_lens.dim(0);
  if (dim != 64 && dim != 128)
    fail("attention: the CUDA kernels support head dims 64 and 128 but received ", dim, " (q ", q.describe(), ")");
  if (!(aligned16(q) && aligned16(out) && aligned16(k_cache) && aligned16(v_cache)))
    fail("attention: expected q, out and the caches to start on 16-byte boundaries (q ", q.describe(), ")");
  if (workspace && !aligned16(*workspace))
    fail("attention: expected the workspace to start on a 16-byte boundary (", workspace->describe(), ")");
  if (num_seqs > 65535) fail("attention: at most 65535 sequences per launch on CUDA but received ", num_seqs);
  if (q.dim(0) == 0 || num_seqs == 0 || batch.max_query_len == 0) return;

  AttentionArgs a{};
  a.out = out.ptr<bf16>();
  a.q = q.ptr<bf16>();
  a.k_cache = k_cache.ptr<bf16>();
  a.v_cache = v_cache.ptr<bf16>();
  a.block_tables = batch.block_tables.ptr<int>();
  a.query_start = batch.query_start.ptr<int>();
  a.seq_lens = batch.seq_lens.ptr<int>();
  a.num_seqs = static_cast<int>(num_seqs);
  a.heads = static_cast<int>(q.dim(1));
  a.kv_heads = static_cast<int>(k_cache.dim(2));
  a.block_size = static_cast<int>(k_cache.dim(1));
  a.max_blocks = static_cast<int>(batch.block_tables.dim(1));
  a.block_shift = -1;
  for (int shift = 0; shift < 31; ++shift)
    if (a.block_size == (1 << shift)) a.block_shift = shift;
  a.scale_log2 = scale * 1.4426950408889634f;  // exp(x·scale) = 2^(x·scale·log2 e)

  const AttentionLaunch l = choose_launch(batch, a.num_seqs);
  a.split_size = l.split_size;
  auto stream = static_cast<cudaStream_t>(cuda_runtime::stream());
  if (dim == 64)
    launch_attention<64>(a, l, q, k_cache, batch, workspace, stream);
  else
    launch_attention<128>(a, l, q, k_cache, batch, workspace, stream);
}

}  // namespace detinfer::cuda
