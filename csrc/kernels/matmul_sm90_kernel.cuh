// The Hopper matmul kernel (sm_90a), as a template over its tile configuration:
//   out[M,N] = a[M,K] · w[N,K]^T (+ bias[N]), bf16 in, fp32 accumulate.
// One instruction family for every configuration: wgmma.mma_async m64nBNk16 (wgmma_bf16.cuh),
// both operands read from shared memory in the 128-byte swizzled K-major layout. A producer
// warpgroup streams 64-column K tiles of a and w into a ring of STAGES buffers with the tensor copy
// engine (cp.async.bulk.tensor, completion on an mbarrier); 1 or 2 consumer warpgroups, 64 rows
// each, multiply them. Columns past K and rows past N arrive as zeros from the copy engine; rows
// of a past M arrive from a's memory where it holds them (Problem::a_readable_rows), else as zeros
// (when M is below the tile, only M rounded up to 8 rows are copied and the rest of the tile is
// zeroed once); rows past M are computed and never stored. A tile's rows never mix: output row m
// reads only row m of a, whichever rows share its tile, so what the rows past M hold (NaN too)
// reaches no stored output.
//
// Invariant: each output element is CHAINS fp32 accumulators (the caller's p.chains, a function of
// K alone: matmul_sm90.cu's chains); the k16 steps k = 0, 16, 32, ..., 64*ceil(K/64) - 16 go in
// ascending order, step k to chain (k / 16) % CHAINS, each `D += A·B` (scale-d = 1, also for the
// first step, onto zeros); columns past K are zeros. Two chains are added, chain 0 + chain 1, in
// fp32. The bias is added in fp32 after that and the value is rounded once. BM, BN, the pipeline
// depth, the staging of the stores and the order of the tiles over the persistent grid change none
// of that, so every instantiation of the same CHAINS gives the same bits. Two chains let the
// wgmmas of one stage overlap in pairs where one chain would have each wait for the one before. A split (blockIdx.z) covers k_per_split columns of K into its own slice of
// an fp32 workspace; the invariant path has one split.
// gate_up (matmul_silu_mul): w is the fused [gate | up] weight of 2I rows and out is [M, I]. A
// tile's w stage holds BN/2 gate rows n0.. then the BN/2 up rows I + n0.., copied as two boxes, so
// each thread holds the gate and the up accumulator of the same output (groups j and j + BN/16);
// the epilogue rounds both to bf16 (after their biases) and stores silu_mul_value of them. The
// MMAs and each accumulator's K chain are the plain product's: the bits of matmul then
// silu_mul_packed.
//
// The kernel body exists only in sm_90a code (__CUDA_ARCH_FEAT_SM90_ALL); the build's other
// targets compile it empty and never launch it (sm90::available()). matmul_sm90.cu instantiates
// the configurations production_config chooses; the development harness (csrc/dev/matmul.cu)
// instantiates the others it times against them.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>

#include "../cuda/check.h"
#include "matmul_sm90.cuh"
#include "block_reduce.cuh"
#include "occupancy.cuh"
#include "pdl.cuh"
#include "ptx.cuh"
#include "rmsnorm_row.cuh"
#include "silu_mul.cuh"
#include "wgmma_bf16.cuh"

namespace detinfer::cuda::sm90 {

constexpr int kTileK = 64;         // K columns per stage: one 128-byte swizzle row of bf16
constexpr int kRowBytes = kTileK * 2;
constexpr int kWarpgroup = 128;

struct Args {
  const __nv_bfloat16* bias;
  void* out;
  bool out_f32;
  int M, N, K;
  int n_out;    // columns of out: N, or N/2 for a gate_up product (the kernel's GATE_UP)
  int k_per_split;
  int a_rows;  // rows of a per copy: BM, or M rounded up to 8 when M < BM (the rest stay zero)
  bool pairs;  // N even and out aligned: two neighbouring columns are stored at once
  bool staged; // the tile goes out through shared memory and the copy engine (map_out)
  NormPrologue norm;  // the kernel's NORM: the rows of a computed in the prologue
#if defined(DETINFER_STAMPS)
  int stamp = -1;                             // this launch's slot of stamps::kLaunches
  unsigned long long* stamps_base = nullptr;  // stamps::device_data()
#endif
};
// The kernel's parameters, three tensor maps and Args, stay within 512 bytes: on the H200 48 bytes
// past them cost a replayed 0.6B decode step up to 39 us (docs/performance.md, "Kernel parameters
// past 512 bytes").
static_assert(3 * sizeof(CUtensorMap) + sizeof(Args) <= 512, "matmul_sm90_kernel's parameters past 512 bytes");

// Development (cmake -DDETINFER_STAMPS=ON, bench/step-stamps.mjs): each block (of the first
// stamps::kBlocks) writes %globaltimer at kernel events into its row of kEvents values, the
// producer's issuing thread events 1 and 2 and the first consumer thread the others:
// 0 start, 1 the producer's weight requests issued, 2 the producer past its wait, 3 the consumer
// past its wait, 4 the first stage full, 5 the last MMA done, 6 the end; 7 the SM; 8 the clock64
// cycles the consumer spent waiting for full stages, 9 those from the first full stage to the last
// MMA, 10 the consumer past its norm prologue (NORM; else right after 3). Without the option
// DI_STAMP is nothing and the kernel is the same code.
#if defined(DETINFER_STAMPS)
namespace stamps {
constexpr int kLaunches = 1024, kBlocks = 256, kEvents = 11;
unsigned long long* device_data();  // matmul_sm90.cu
// Records a launch's description and returns its slot (launches take the slots in turn).
int record(const Problem& p, int bm, int bn, int stages, int a_rows, int kt, int tiles);
}  // namespace stamps
#define DI_STAMP(i)                                             \
  do {                                                          \
    if (stamp_row) {                                            \
      unsigned long long t_;                                    \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));  \
      stamp_row[i] = t_;                                        \
    }                                                           \
  } while (0)
#else
#define DI_STAMP(i) \
  do {              \
  } while (0)
#endif

// A block computes BM x BN outputs with BM/64 consumer warpgroups of 64 rows each and one producer
// warpgroup, through STAGES buffers that each hold one 64-column K tile of a and of w.
// The grid is persistent: block b takes tiles b, b + gridDim.x, ... so that its producer fetches
// the next tile while its consumers store the last one. GROUP_M tiles of M walk over N together,
// so the blocks in flight share a and w in L2.
// STAGED (bf16 out, no split, N a multiple of 8): each consumer writes its 64 x BN outputs to
// shared memory and one thread hands them to the copy engine, which stores them while the
// consumers go on with the next tile; otherwise every thread stores its own outputs.
// FULL_A: copy BM rows of a even when M is smaller (the copy engine fills the missing rows with
// zeros) instead of zeroing them once; the same products, another prologue.
// A_ROWS < BM (compact a, decode only): a stage keeps only A_ROWS rows of a, so that a stage is
// mostly w and many more of them fit, and an output tile is A_ROWS rows tall (M <= A_ROWS with one
// K tile per copy). The MMA still reads BM rows from the stage's start; rows past A_ROWS are
// whatever bytes follow (the next stages' tiles), and they only feed output rows past the tile's,
// which are never stored. The ring ends with (BM - A_ROWS) rows of slack so
// that the last stage's reads stay inside the block's shared memory.
// KT > 1 (K and the split multiples of 64 * KT): a stage holds KT consecutive K tiles, those of a
// and those of w each brought by ONE copy of a 3-D view of the matrix (4-D for gate_up's two
// halves), K tile t of a at t * A_ROWS rows (A_ROWS rows copied, those past M arriving as zeros)
// and of w at t * BN rows past the stage's w. The copy engine's cost per copy, not per byte, is
// what bounds a decode product's stream of small tiles (about 100 ns per copy and block on the
// H200), so fewer, larger copies; the MMAs, in the same order on the same tiles, are the same.
// IDLE > 0: the block has IDLE more warpgroups, which leave right after the block's setup. They
// only make the block's register allocation larger than half an SM's (kSoloRegisters), so that
// the block scheduler cannot put two blocks of the kernel on one SM, while one still fits beside a
// block of another product (matmul_sm90.cu says where and what it measured).
template <int BM_, int BN_, int STAGES_, bool STAGED_ = false, bool FULL_A_ = false, int GROUP_M_ = 8,
          int A_ROWS_ = BM_, int KT_ = 1, int IDLE_ = 0>
struct Tiles {
  static constexpr int BM = BM_, BN = BN_, STAGES = STAGES_, GROUP_M = GROUP_M_, A_ROWS = A_ROWS_, KT = KT_;
  static constexpr bool STAGED = STAGED_, FULL_A = FULL_A_;
  static constexpr int CONSUMERS = BM / 64, IDLE = IDLE_;
  static constexpr int WORKERS = kWarpgroup * (CONSUMERS + 1);  // the threads that do the work
  static constexpr int THREADS = WORKERS + kWarpgroup * IDLE;
  static constexpr int A_BYTES = KT * A_ROWS * kRowBytes, W_BYTES = KT * BN * kRowBytes;
  static constexpr int STAGE_BYTES = A_BYTES + W_BYTES;           // KT K tiles of a, then of w
  static constexpr int A_SLACK = (BM - A_ROWS) * kRowBytes;        // compact a: the last stage's overhang
  static constexpr int OUT_BYTES = STAGED ? BM * BN * 2 : 0;       // bf16 staging, 64 x 64 boxes
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + A_SLACK + OUT_BYTES + 1024;  // + slack to align to 1024
  static constexpr int ACC = BN / 2;                               // fp32 accumulators per thread (a chain)
  static_assert(BM == 64 || BM == 128, "one or two consumer warpgroups");
  static_assert(STAGES >= 2, "a stage is released only once the next one is in flight");
  static_assert(BN % 8 == 0 && BN <= 256, "wgmma N is a multiple of 8 up to 256");
  static_assert(SMEM_BYTES <= 227 * 1024, "shared memory per block");
  static_assert(!STAGED || BN % 64 == 0, "staged stores go out in 64-column boxes");
  static_assert(A_ROWS == BM || (BM == 64 && A_ROWS % 8 == 0 && !STAGED && !FULL_A),
                "compact a: one consumer, whole 1024-byte groups of 8 rows");
  static_assert(KT >= 1, "K tiles per stage");
  static_assert(IDLE == 0 || CONSUMERS == 1, "idle warpgroups only beside one consumer");
};

// CHAINS (1 or 2) accumulators a thread, ACC registers each (matmul_sm90.cu: chains): at most 128
// registers of them.
template <typename T, int CHAINS>
constexpr bool kChainsFit = CHAINS == 1 || (CHAINS == 2 && T::ACC * 2 <= 128);
// 2 consumers with 128 accumulators each need more than 65536 / 384 registers: move them from the
// producer, which needs few (setmaxnreg).
template <typename T, int CHAINS>
constexpr bool kMoveRegisters = T::CONSUMERS == 2 && T::ACC * CHAINS >= 128;

// One configuration of a table: its name (as the harness and the benchmarks print it) and its
// launch; for a tile that can compute a NormPrologue, its rows of a per K tile and its shared
// memory besides them (norm_a_rows 0: it cannot).
struct Entry {
  const char* name;
  void (*launch)(const Problem&, cudaStream_t);
  int norm_a_rows = 0;
  int norm_fixed_bytes = 0;
};

// ---- the kernel -------------------------------------------------------------------------------

// A tile that can compute a NormPrologue: compact a (one consumer, M <= A_ROWS) with 4 K tiles per
// copy, so that K is a multiple of 256 and a's rows sit in shared memory as the stages lay them out.
template <typename T>
constexpr bool kNormTile = T::A_ROWS < T::BM && T::KT > 1;

// NORM: the one row of a (M = 1, a decode step of one sequence), computed from args.norm, into
// shared memory at `row_a` as the MMAs read it: K tile t at t * A_ROWS rows of 128 bytes (row 0 of
// each, whose 16-byte chunks the copy engine's 128-byte swizzle leaves in place). The row is the
// rmsnorm kernels' (rmsnorm_regs_kernel): their block of norm_row::kThreads = 256 threads is
// played by the 128 threads of this warpgroup, thread t as threads t and t + 128. Chunk c (8
// elements) belongs to thread c % 256 of that block, whose fp32 sum takes its chunks' squares in
// increasing element order; the 8 warp sums then go through block_sum's tree (warp_sum in warp 0
// over lanes 0-7, zeros elsewhere). The same operations on the same values in the same order: the
// bits of add_rmsnorm (or rmsnorm). Block 0 alone writes residual_out, which no block reads.
// `w0`: the norm weight's chunk t, loaded before the kernel's wait (no kernel writes it).
// H200, replayed Qwen3-0.6B decode step at batch 1: 960 -> 901 us. A prologue of more rows, one
// after another in each block, lost to the separate norm kernel (980 -> 1003 us at batch 2, 991
// -> 1097 at 4), and so did one that kept each row in registers (973 us at batch 1).
constexpr int kNormChunks = 4;  // chunks of the row a thread handles at most
constexpr int kNormMaxK = kNormChunks * kWarpgroup * norm_row::kChunk;

template <int A_ROWS>
__device__ void norm_row_to_smem(const Args& args, unsigned char* row_a, float* sums, float* inv, uint4 w0) {
  using namespace norm_row;
  static_assert(kThreads == 2 * kWarpgroup, "each consumer thread plays two threads of the norm's block");
  const int t = threadIdx.x % kWarpgroup, lane = t % 32, warp = t / 32;
  const int K = args.K, chunks = K / kChunk;
  const auto* res_in = static_cast<const __nv_bfloat16*>(args.norm.residual_in);
  const auto* x = static_cast<const __nv_bfloat16*>(args.norm.x);
  auto* res_out = static_cast<__nv_bfloat16*>(args.norm.residual_out);
  const auto* weight = static_cast<const __nv_bfloat16*>(args.norm.weight);
  const bool write_out = x != nullptr && blockIdx.x == 0;
  // Chunk c: K tile c / 8, 16-byte column c % 8 of the tile's row 0.
  auto chunk_at = [&](int c) { return reinterpret_cast<uint4*>(row_a + (c / 8) * A_ROWS * kRowBytes + ((c % 8) << 4)); };
  float lo = 0.f, hi = 0.f;  // the sums of the norm block's threads t and t + 128
  for (int c = t; c < chunks; c += kWarpgroup) {
    float v[kChunk];
    load_chunk(res_in, K, c, true, v);
    __nv_bfloat16 row[kChunk];
    if (x) {
      float b[kChunk];
      load_chunk(x, K, c, true, b);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        row[j] = __float2bfloat16_rn(v[j] + b[j]);
        v[j] = __bfloat162float(row[j]);
      }
      if (write_out) store_chunk(res_out, c, true, kChunk, row);
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) row[j] = __float2bfloat16_rn(v[j]);  // exact: v came from bf16
    }
    float s = (c / kWarpgroup) % 2 ? hi : lo;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) s = s + v[j] * v[j];
    if ((c / kWarpgroup) % 2) hi = s;
    else lo = s;
    *chunk_at(c) = *reinterpret_cast<const uint4*>(row);
  }
  lo = warp_sum(lo);
  hi = warp_sum(hi);
  if (lane == 0) sums[warp] = lo, sums[4 + warp] = hi;
  ptx::warpgroup_barrier(0);
  if (warp == 0) {
    const float total = warp_sum(lane < 8 ? sums[lane] : 0.f);
    if (lane == 0) *inv = inverse_rms(total, K, args.norm.eps);
  }
  ptx::warpgroup_barrier(0);
  const float scale = *inv;
  for (int c = t; c < chunks; c += kWarpgroup) {
    float wv[kChunk];
    if (c == t) {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) wv[j] = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(&w0)[j]);
    } else {
      load_chunk(weight, K, c, true, wv);
    }
    uint4 raw = *chunk_at(c);
    __nv_bfloat16* row = reinterpret_cast<__nv_bfloat16*>(&raw);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) row[j] = normalized(__bfloat162float(row[j]), scale, wv[j]);
    *chunk_at(c) = raw;
  }
  // The MMAs read the row through the async proxy.
  ptx::fence_proxy_async_smem();
  ptx::warpgroup_barrier(0);
}

// GATE_UP: w is N/2 gate rows then N/2 up rows, and out gets SiLU·mul of each (gate, up) pair.
// A template argument, so that the plain product's code is the one it was without the fusion.
// NORM (kNormTile tiles, M = 1): a is not read; the prologue computes its row (norm_row_to_smem)
// into shared memory past the ring, whose stages then hold only w.
template <typename T, bool GATE_UP, bool NORM = false, int CHAINS = 1>
__global__ void __launch_bounds__(T::THREADS, 1)
    matmul_sm90_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w,
                       const __grid_constant__ CUtensorMap map_out, Args args) {
  static_assert(T::GROUP_M >= 1 && T::ACC * 2 == T::BN, "tile parameters");
  static_assert(kChainsFit<T, CHAINS>, "the chains' accumulators must fit a consumer thread's registers");
  constexpr bool kMove = kMoveRegisters<T, CHAINS>;
  static_assert(!kMove || T::THREADS == 3 * kWarpgroup, "setmaxnreg budget is for 1 producer + 2 consumers");
  static_assert(!NORM || kNormTile<T>, "a norm prologue needs a compact-a tile with 4 K tiles per copy");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = T::BN, STAGES = T::STAGES;
  // A stage holds KT K tiles of a (not with NORM), then KT K tiles of w.
  constexpr int A_STAGE = NORM ? 0 : T::A_BYTES, STAGE_BYTES = A_STAGE + T::W_BYTES;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
  __shared__ float norm_sums[NORM ? 8 : 1], norm_inv;  // NORM: the row's 8 warp sums, its inverse rms
#if defined(DETINFER_STAMPS)
  unsigned long long* stamp_row = nullptr;
  {
    const int b = blockIdx.z * gridDim.x + blockIdx.x;
    if (args.stamp >= 0 && b < stamps::kBlocks && args.stamps_base)
      stamp_row = args.stamps_base + (static_cast<int64_t>(args.stamp) * stamps::kBlocks + b) * stamps::kEvents;
  }
#endif
  if (threadIdx.x == 0) DI_STAMP(0);
  const uint32_t ring = (ptx::smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t rows_a = ring + STAGES * STAGE_BYTES;  // NORM: a's row, K tile t at t * A_ROWS rows

  // A gate_up tile holds BN/2 columns of out: w rows n0.. (gate) in the first half of the w stage
  // and N/2 + n0.. (up) in the second, so that accumulator groups j and j + BN/16 pair up.
  constexpr int bn_out = GATE_UP ? BN / 2 : BN;
  // Output tiles are A_ROWS rows tall (BM, or a compact a's rows: the MMAs' rows past A_ROWS read
  // whatever follows a in the stage, and are never stored).
  const int m_tiles = (args.M + T::A_ROWS - 1) / T::A_ROWS, n_tiles = (args.n_out + bn_out - 1) / bn_out;
  const int tiles = m_tiles * n_tiles;
  const int group_tiles = T::GROUP_M * n_tiles;
  auto tile_origin = [&](int tile, int& m0, int& n0) {
    const int group = tile / group_tiles, in_group = tile % group_tiles;
    const int first_m = group * T::GROUP_M, group_m = min(m_tiles - first_m, T::GROUP_M);
    m0 = (first_m + in_group % group_m) * T::A_ROWS;
    n0 = (in_group / group_m) * bn_out;
  };
  const int k_begin = blockIdx.z * args.k_per_split;
  const int k_end = min(args.K, k_begin + args.k_per_split);
  const int k_tiles = (k_end - k_begin + kTileK - 1) / kTileK;  // K tiles per output tile
  constexpr int KT = T::KT;
  const int kt_begin = k_begin / kTileK;                       // (KT > 1: k_begin is a multiple of 64)
  const int k_stages = (k_tiles + KT - 1) / KT;                 // stages per output tile
  // Broadcast from lane 0, so that ptxas knows it uniform across the warp: the consumer's stages
  // and descriptors are then computed in uniform registers, not in vector registers moved to
  // uniform ones before every wgmma.
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / kWarpgroup, 0);

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      ptx::mbar_init(ptx::smem_addr(&full[s]), 1);
      ptx::mbar_init(ptx::smem_addr(&empty[s]), T::CONSUMERS * 4);  // one arrival per consumer warp
    }
    ptx::fence_mbarrier_init();
  }
  // Rows of a past a_rows (up to the stage's A_ROWS) are never copied: zero them once, for the
  // tensor cores to read.
  if (!NORM && args.a_rows < T::A_ROWS) {
    const int row_bytes = (T::A_ROWS - args.a_rows) * kRowBytes;
    for (int i = threadIdx.x; i < STAGES * row_bytes / 16; i += T::THREADS) {
      const int stage = i / (row_bytes / 16), off = i % (row_bytes / 16);
      const uint32_t dst = ring + stage * STAGE_BYTES + args.a_rows * kRowBytes + off * 16;
      ptx::st_shared_zero16(dst);
    }
    ptx::fence_proxy_async_smem();
  }
  __syncthreads();
  if (wg > T::CONSUMERS) return;  // an idle warpgroup (T::IDLE)

  if (wg == T::CONSUMERS) {
    // Producer warpgroup: one thread issues every copy.
    if constexpr (kMove) ptx::setmaxnreg_dec<40>();
    if (threadIdx.x == T::CONSUMERS * kWarpgroup) {
      const uint32_t stage_tx = (NORM ? 0 : KT * args.a_rows * kRowBytes) + T::W_BYTES;
      // Stage s's weights from K tile kt for the tile at n0 (a gate_up tile: its gate and up boxes;
      // with KT > 1, one copy of KT tiles of both halves, each tile's gate rows then its up rows).
      auto load_w = [&](int s, int kt, int n0) {
        const uint32_t bar = ptx::smem_addr(&full[s]), w_dst = ring + s * STAGE_BYTES + A_STAGE;
        ptx::mbar_expect_tx(bar, stage_tx);
        if constexpr (KT > 1) {
          if constexpr (GATE_UP) ptx::tma_load_4d(w_dst, &map_w, 0, n0, 0, kt, bar);
          else ptx::tma_load_3d(w_dst, &map_w, 0, n0, kt, bar);
        } else {
          ptx::tma_load(w_dst, &map_w, kt * kTileK, n0, bar);
          if constexpr (GATE_UP) ptx::tma_load(w_dst + (BN / 2) * kRowBytes, &map_w, kt * kTileK, args.n_out + n0, bar);
        }
      };
      // Launched overlapped (pdl.cuh): the first STAGES stages' weights, which no kernel writes,
      // are requested before the kernels before this one have finished; a only after, its
      // descriptor fetched in the meantime.
      ptx::prefetch_tensor_map(&map_a);
      int ahead = 0;
      for (int tile = blockIdx.x; tile < tiles && ahead < STAGES; tile += gridDim.x) {
        int m0, n0;
        tile_origin(tile, m0, n0);
        for (int ks = 0; ks < k_stages && ahead < STAGES; ++ks, ++ahead) load_w(ahead, kt_begin + ks * KT, n0);
      }
      DI_STAMP(1);
      pdl_wait();
      DI_STAMP(2);
      pdl_launch_dependents();
      int it = 0;  // stages filled so far, over all of this block's tiles
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int m0, n0;
        tile_origin(tile, m0, n0);
        for (int ks = 0; ks < k_stages; ++ks, ++it) {
          const int s = it % STAGES;
          if (it >= STAGES) ptx::mbar_wait(ptx::smem_addr(&empty[s]), ((it / STAGES) - 1) & 1);
          const int kt = kt_begin + ks * KT;
          if (it >= ahead) load_w(s, kt, n0);
          if constexpr (NORM) continue;
          const uint32_t a_dst = ring + s * STAGE_BYTES, bar = ptx::smem_addr(&full[s]);
          if constexpr (KT > 1) ptx::tma_load_3d(a_dst, &map_a, 0, m0, kt, bar);
          else ptx::tma_load(a_dst, &map_a, kt * kTileK, m0, bar);
        }
      }
    } else {
      pdl_wait();
    }
  } else {
    if constexpr (kMove) ptx::setmaxnreg_inc<232>();
    uint4 w0{};
    if constexpr (NORM)
      if (threadIdx.x % kWarpgroup < args.K / norm_row::kChunk) w0 = static_cast<const uint4*>(args.norm.weight)[threadIdx.x % kWarpgroup];
    pdl_wait();
    if (threadIdx.x == 0) DI_STAMP(3);
    if constexpr (NORM) norm_row_to_smem<T::A_ROWS>(args, smem_raw + (rows_a - ptx::smem_addr(smem_raw)), norm_sums, &norm_inv, w0);
    if (threadIdx.x == 0) DI_STAMP(10);
#if defined(DETINFER_STAMPS)
    bool first_stage = true;
    long long wait_cycles = 0, first_clock = 0;
#endif
    const int lane = threadIdx.x % 32, warp = (threadIdx.x % kWarpgroup) / 32;
    const bool leader = threadIdx.x % kWarpgroup == 0;
    float* out_f32 = static_cast<float*>(args.out) + static_cast<int64_t>(blockIdx.z) * args.M * args.N;
    __nv_bfloat16* out_bf16 = static_cast<__nv_bfloat16*>(args.out);
    int it = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int m0, n0;
      tile_origin(tile, m0, n0);
      float chain[CHAINS][T::ACC];
#pragma unroll
      for (int c = 0; c < CHAINS; ++c)
#pragma unroll
        for (int i = 0; i < T::ACC; ++i) chain[c][i] = 0.f;
      auto fence_chains = [&] {
#pragma unroll
        for (int c = 0; c < CHAINS; ++c) ptx::fence_registers(chain[c]);
      };

      for (int ks = 0; ks < k_stages; ++ks, ++it) {
        const int s = it % STAGES;
#if defined(DETINFER_STAMPS)
        const long long w_begin = clock64();
#endif
        ptx::mbar_wait(ptx::smem_addr(&full[s]), (it / STAGES) & 1);
#if defined(DETINFER_STAMPS)
        const long long w_end = clock64();
        wait_cycles += w_end - w_begin;
        if (first_stage) first_clock = w_end;
        if (first_stage && threadIdx.x == 0) DI_STAMP(4);  // (thread 0's own cycles: 8 and 9)
        first_stage = false;
#endif
        const uint32_t stage = ring + s * STAGE_BYTES;
        ptx::wgmma_fence();
        fence_chains();
        // All four k16 steps of each K tile, also in a last tile that K ends inside: its columns
        // past K are zeros. (KT > 1: every stage is whole, K being a multiple of 64 * KT; no
        // branch around the MMAs, which would make the compiler serialize them.) Step kk of K
        // tile t is k16 step 4t + kk of the stage, and a stage starts at a multiple of 64 columns,
        // so its chain, (k / 16) % CHAINS, is (4t + kk) % CHAINS: known when compiled.
#pragma unroll
        for (int t = 0; t < KT; ++t) {
          const uint64_t da = ptx::smem_desc(NORM ? rows_a + ((ks * KT + t) * T::A_ROWS) * kRowBytes
                                                  : stage + (wg * 64 + t * T::A_ROWS) * kRowBytes),
                         dw = ptx::smem_desc(stage + A_STAGE + t * BN * kRowBytes);
#pragma unroll
          for (int kk = 0; kk < kTileK / 16; ++kk)
            Wgmma<BN>::mma(chain[(4 * t + kk) % CHAINS], ptx::desc_add(da, 2 * kk), ptx::desc_add(dw, 2 * kk));
        }
        ptx::wgmma_commit();
        fence_chains();
        // The previous stage's MMAs have finished once at most this stage's group is in flight.
        ptx::wgmma_wait<1>();
        fence_chains();
        if (ks > 0 && lane == 0) ptx::mbar_arrive(ptx::smem_addr(&empty[(it - 1) % STAGES]));
      }
      ptx::wgmma_wait<0>();
      fence_chains();
#if defined(DETINFER_STAMPS)
      if (threadIdx.x == 0 && stamp_row) {
        DI_STAMP(5);
        stamp_row[8] = wait_cycles, stamp_row[9] = clock64() - first_clock;
      }
#endif
      if (k_stages > 0 && lane == 0) ptx::mbar_arrive(ptx::smem_addr(&empty[(it - 1) % STAGES]));
      // The output's value before its bias: chain 0, or chain 0 + chain 1 in fp32.
      float (&acc)[T::ACC] = chain[0];
      if constexpr (CHAINS == 2) {
#pragma unroll
        for (int i = 0; i < T::ACC; ++i) acc[i] = chain[0][i] + chain[1][i];
      }

      // Accumulator layout of m64nBN: warp w of the warpgroup holds rows 16w + lane/4 (registers
      // 4j, 4j+1) and 16w + lane/4 + 8 (4j+2, 4j+3), columns 8j + 2*(lane%4) + {0, 1}.
      const int row_base = m0 + wg * 64 + warp * 16 + lane / 4;
      const int col_base = n0 + 2 * (lane % 4);
      const int row_end = min(args.M, m0 + T::A_ROWS);  // the tile's rows that are stored
      // Group j's two outputs in row half h, at columns col and col + 1 of out: the product plus
      // the bias in fp32, rounded once by the store; or (gate_up, j < BN/16) the gate pair of group
      // j and the up pair of group j + BN/16, each plus its bias and rounded to bf16, then
      // silu_mul_value: values exact in bf16, which the store keeps. The up group's index is taken
      // modulo BN/8 so that every unrolled j indexes acc in range (the groups j >= BN/16 of a
      // gate_up tile are skipped).
      auto output_pair = [&](int j, int h, int col, float& v0, float& v1) {
        v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
        const bool first = col < args.n_out, second = col + 1 < args.n_out;
        if (args.bias && first) {
          v0 = v0 + __bfloat162float(args.bias[col]);
          if (second) v1 = v1 + __bfloat162float(args.bias[col + 1]);
        }
        if constexpr (GATE_UP) {
          const int u = (j + BN / 16) % (BN / 8);
          float u0 = acc[4 * u + 2 * h], u1 = acc[4 * u + 2 * h + 1];
          if (args.bias && first) {
            u0 = u0 + __bfloat162float(args.bias[args.n_out + col]);
            if (second) u1 = u1 + __bfloat162float(args.bias[args.n_out + col + 1]);
          }
          v0 = __bfloat162float(silu_mul_value(__float2bfloat16_rn(v0), __float2bfloat16_rn(u0)));
          v1 = __bfloat162float(silu_mul_value(__float2bfloat16_rn(v1), __float2bfloat16_rn(u1)));
        }
      };
      if (T::STAGED && args.staged) {
        // The copy engine must have read this warpgroup's previous tile before it is overwritten.
        const uint32_t out_tile = ring + STAGES * STAGE_BYTES + T::A_SLACK + wg * 64 * BN * 2;
        if (leader) ptx::bulk_wait_read<0>();
        ptx::warpgroup_barrier(wg);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (GATE_UP && j >= BN / 16) continue;
            float v0, v1;
            output_pair(j, h, col_base + 8 * j, v0, v1);
            __nv_bfloat162 pair = __floats2bfloat162_rn(v0, v1);
            // Box j/8 of 64 columns, 128-byte rows, 16-byte chunk j%8 swizzled with the row.
            const int r = warp * 16 + lane / 4 + 8 * h;
            const uint32_t dst = out_tile + (j / 8) * 64 * kRowBytes + r * kRowBytes + (((j % 8) ^ (r & 7)) << 4) +
                                 (lane % 4) * 4;
            ptx::st_shared_b32(dst, *reinterpret_cast<uint32_t*>(&pair));
          }
        ptx::fence_proxy_async_smem();
        ptx::warpgroup_barrier(wg);
        if (leader && m0 + wg * 64 < args.M) {
#pragma unroll
          for (int b = 0; b < BN / 64; ++b)  // boxes wholly past the tile or out hold nothing to store
            if (64 * b < bn_out && n0 + 64 * b < args.n_out) ptx::tma_store(&map_out, n0 + 64 * b, m0 + wg * 64, out_tile + b * 64 * kRowBytes);
          ptx::bulk_commit();
        }
        continue;
      }
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row_base + 8 * h, col = col_base + 8 * j;
          if ((GATE_UP && j >= BN / 16) || row >= row_end || col >= args.n_out) continue;
          float v0, v1;
          output_pair(j, h, col, v0, v1);
          const bool second = col + 1 < args.n_out;
          const int64_t idx = static_cast<int64_t>(row) * args.n_out + col;
          if (args.out_f32) {
            if (second && args.pairs) {
              *reinterpret_cast<float2*>(out_f32 + idx) = make_float2(v0, v1);
            } else {
              out_f32[idx] = v0;
              if (second) out_f32[idx + 1] = v1;
            }
          } else {
            if (second && args.pairs) {
              *reinterpret_cast<__nv_bfloat162*>(out_bf16 + idx) = __floats2bfloat162_rn(v0, v1);
            } else {
              out_bf16[idx] = __float2bfloat16_rn(v0);
              if (second) out_bf16[idx + 1] = __float2bfloat16_rn(v1);
            }
          }
        }
    }
    // Shared memory must outlive the copy engine's last reads of it.
    if (T::STAGED && args.staged && leader) ptx::bulk_wait<0>();
#if defined(DETINFER_STAMPS)
    if (threadIdx.x == 0 && stamp_row) {
      DI_STAMP(6);
      unsigned smid;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
      stamp_row[7] = smid;
    }
#endif
  }
#endif
}

// ---- host side --------------------------------------------------------------------------------

// A [rows, K] bf16 row-major matrix, read (or written) in boxes of 64 columns x box_rows rows
// (matmul_sm90.cu).
CUtensorMap tensor_map(const void* data, int rows, int K, int box_rows, const char* what);
// The same matrix (K a multiple of 64) as `tiles` K tiles of box_rows rows per copy: a 3-D view
// {64 columns, rows, K/64 tiles}, or with halves = 2 (gate_up) a 4-D view {64, rows/2, 2 halves,
// K/64} whose box holds each tile's rows of both halves, first half first.
CUtensorMap tensor_map_tiles(const void* data, int rows, int K, int box_rows, int tiles, int halves, const char* what);

// Blocks of matmul_sm90_kernel<T, GATE_UP, false, CHAINS> resident on the whole device (its
// shared-memory size is set once).
template <typename T, bool GATE_UP, int CHAINS>
int resident_blocks() {
  static std::once_flag once;
  static cudaError_t attr_err = cudaSuccess;
  static int slots = 0;
  std::call_once(once, [] {
    auto* kernel = matmul_sm90_kernel<T, GATE_UP, false, CHAINS>;
    attr_err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::SMEM_BYTES);
    if (attr_err == cudaSuccess) attr_err = device_blocks(kernel, T::THREADS, T::SMEM_BYTES, slots);
  });
  CUDA_CHECK(attr_err);
  DI_CHECK(slots > 0, "matmul: the sm_90 kernel ", T::BM, "x", T::BN, " does not fit on this device");
  return slots;
}

// Shared memory of a NormPrologue launch of tile T besides a's rows (kNormTile tiles): the ring of
// w stages, the slack past the last K tile's rows (the MMA reads BM rows from its start), the
// alignment.
template <typename T>
constexpr int norm_fixed_bytes() {
  return T::STAGES * T::W_BYTES + T::A_SLACK + 1024;
}
// The most dynamic shared memory norm_fuses lets a NormPrologue launch take: the H100's and H200's
// 227 KiB a block, less 1 KiB for the kernel's static shared memory (its barriers and the norm's
// sums, under 1 KiB).
constexpr int kMaxSmemBytes = 226 * 1024;

// The NormPrologue launch of tile T (launch_tiles): a's rows of K tiles in shared memory, whose
// size follows K, so the blocks that fit are found once per size.
template <typename T, bool GATE_UP, int CHAINS>
void launch_norm_tiles(const Problem& p, const CUtensorMap& map_w, const Args& args, int64_t tiles,
                       cudaStream_t stream) {
  const int smem = norm_fixed_bytes<T>() + (p.K / kTileK) * T::A_ROWS * kRowBytes;
  auto* kernel = matmul_sm90_kernel<T, GATE_UP, true, CHAINS>;
  // The block may take what the device allows less the kernel's static shared memory.
  static std::once_flag once;
  static cudaError_t attr_err = cudaSuccess;
  static int max_dynamic = 0;
  std::call_once(once, [&] {
    cudaFuncAttributes attrs{};
    int device = 0, optin = 0;
    attr_err = cudaFuncGetAttributes(&attrs, kernel);
    if (attr_err == cudaSuccess) attr_err = cudaGetDevice(&device);
    if (attr_err == cudaSuccess) attr_err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    max_dynamic = optin - static_cast<int>(attrs.sharedSizeBytes);
    if (attr_err == cudaSuccess)
      attr_err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_dynamic);
  });
  CUDA_CHECK(attr_err);
  DI_CHECK(smem <= max_dynamic, "matmul: a norm prologue of K = ", p.K, " needs ", smem,
           " bytes of shared memory and the block may take ", max_dynamic);
  static std::mutex mutex;
  static std::map<int, int> blocks_by_smem;
  int blocks = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = blocks_by_smem.find(smem);
    if (found == blocks_by_smem.end()) {
      CUDA_CHECK(device_blocks(kernel, T::THREADS, smem, blocks));
      found = blocks_by_smem.emplace(smem, blocks).first;
    }
    blocks = found->second;
  }
  DI_CHECK(blocks > 0, "matmul: the sm_90 norm prologue kernel ", T::BM, "x", T::BN, " does not fit on this device");
  dim3 grid(static_cast<unsigned>(std::min<int64_t>(tiles, blocks)), 1, 1);
  // The kernel never reads map_a or map_out: any valid map will do.
  launch_overlapped(kernel, grid, T::THREADS, smem, stream, map_w, map_w, map_w, args);
}

// The launch of tile T with CHAINS accumulator chains (kChainsFit), its maps and arguments made.
template <typename T, int CHAINS>
void launch_chains(const Problem& p, const CUtensorMap& map_a, const CUtensorMap& map_w, const CUtensorMap& map_out,
                   const Args& args, int64_t tiles, cudaStream_t stream) {
  if constexpr (kNormTile<T>) {
    if (p.norm.residual_in != nullptr) {
      if constexpr (T::BN >= 16)
        if (p.gate_up) return launch_norm_tiles<T, true, CHAINS>(p, map_w, args, tiles, stream);
      return launch_norm_tiles<T, false, CHAINS>(p, map_w, args, tiles, stream);
    }
  }
  if constexpr (T::BN >= 16) {
    if (p.gate_up) {
      dim3 grid(static_cast<unsigned>(std::min<int64_t>(tiles, resident_blocks<T, true, CHAINS>())), 1, 1);
      launch_overlapped(matmul_sm90_kernel<T, true, false, CHAINS>, grid, T::THREADS, T::SMEM_BYTES, stream, map_a,
                        map_w, map_out, args);
      return;
    }
  }
  dim3 grid(static_cast<unsigned>(std::min<int64_t>(tiles, resident_blocks<T, false, CHAINS>())), 1,
            static_cast<unsigned>(p.splits));
  launch_overlapped(matmul_sm90_kernel<T, false, false, CHAINS>, grid, T::THREADS, T::SMEM_BYTES, stream, map_a, map_w,
                    map_out, args);
}

// One launch of configuration T: a persistent grid of as many blocks as fit on the device (at
// most one per tile), p.splits deep.
template <typename T>
void launch_tiles(const Problem& p, cudaStream_t stream) {
  // A compact a of one K tile per copy brings M rows rounded up to 8 (a_rows below), which must fit
  // its A_ROWS; with several K tiles per copy every copy brings A_ROWS rows, and M takes as many
  // tiles of A_ROWS rows as it needs.
  DI_CHECK(T::A_ROWS == T::BM || T::KT > 1 || p.M <= T::A_ROWS, "matmul: the sm_90 tiles with ", T::A_ROWS,
           " rows of a take M <= ", T::A_ROWS, ", not ", p.M);
  DI_CHECK(!p.gate_up || (T::BN >= 16 && p.N % 2 == 0 && p.splits == 1 && !p.out_f32),
           "matmul: a gate_up product needs a w tile of 16 rows or more, an even N, one split and bf16 out");
  DI_CHECK(T::KT == 1 || (p.K % (kTileK * T::KT) == 0 && p.k_per_split % (kTileK * T::KT) == 0),
           "matmul: the sm_90 tiles of ", T::KT, " K tiles per copy take K and the split a multiple of ",
           kTileK * T::KT, ", not ", p.K, " and ", p.k_per_split);
  const bool norm = p.norm.residual_in != nullptr;
  DI_CHECK(!norm || (kNormTile<T> && p.splits == 1 && !p.out_f32 && p.M == 1 && p.K <= kNormMaxK),
           "matmul: the sm_90 tile ", T::BM, "x", T::BN, " cannot compute a norm prologue of ", p.M, " rows and K = ", p.K);
  // KT > 1: every copy of a brings A_ROWS rows (those past M arrive as zeros), so that k-tile t
  // sits at t * A_ROWS rows.
  const int a_rows = T::KT > 1 ? T::A_ROWS : p.M >= T::BM || T::FULL_A ? T::BM : (p.M + 7) / 8 * 8;
  // A gate_up tile's w arrives as two boxes of BN/2 rows (gate, up), each whole swizzle atoms of 8 rows.
  const int n_out = p.gate_up ? p.N / 2 : p.N, bn_out = p.gate_up ? T::BN / 2 : T::BN;
  CUtensorMap map_w = T::KT > 1 ? tensor_map_tiles(p.w, p.N, p.K, bn_out, T::KT, p.gate_up ? 2 : 1, "w")
                                 : tensor_map(p.w, p.N, p.K, bn_out, "w");
  // With a norm prologue there is no a to read: any valid map will do. The map spans the rows
  // that the copies of a read, where a's memory holds them (Problem::a_readable_rows), so that
  // they come from memory and not as zeros past the map's end. With the zeros, 32 rows took longer
  // than 64 on the same 64-row tile (N = 1024, K = 3072, a of exactly M rows, back to back in a
  // graph: 6.3 us a call at M = 32, 5.0 at 64), and taking the rows from memory gave, H200, random
  // Qwen3-0.6B, replayed decode step at 200 keys, three rounds: batch 24 1262.7 -> 1206.8 us,
  // 32 1316.7 -> 1249.4, 48 1368.2 -> 1362.7; batches 1, 16 and 64 within 0.5 us. The same
  // products of the same rows, so the same bits (test/ops/matmul.test.ts puts NaN there).
  const int64_t a_copied_rows = (int64_t{p.M} + a_rows - 1) / a_rows * a_rows;
  const int a_map_rows = static_cast<int>(std::max<int64_t>(p.M, std::min(p.a_readable_rows, a_copied_rows)));
  CUtensorMap map_a = norm        ? map_w
                      : T::KT > 1 ? tensor_map_tiles(p.a, a_map_rows, p.K, a_rows, T::KT, 1, "a")
                                  : tensor_map(p.a, a_map_rows, p.K, a_rows, "a");
  int64_t tiles = ((int64_t{p.M} + T::A_ROWS - 1) / T::A_ROWS) * ((int64_t{n_out} + bn_out - 1) / bn_out);
  DI_CHECK(tiles < (int64_t{1} << 31), "matmul: [M=", p.M, ", N=", p.N, "] needs too many tiles");
  const bool pairs = n_out % 2 == 0 && reinterpret_cast<uintptr_t>(p.out) % (p.out_f32 ? 8 : 4) == 0;
  const bool staged = T::STAGED && !p.out_f32 && p.splits == 1 && n_out % 8 == 0 && bn_out % 64 == 0 &&
                      reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  // Without staging the kernel never reads map_out: any valid map will do.
  CUtensorMap map_out = staged ? tensor_map(p.out, p.M, n_out, 64, "out") : map_w;
  Args args{static_cast<const __nv_bfloat16*>(p.bias), p.out, p.out_f32, p.M, p.N, p.K, n_out,
            p.k_per_split, a_rows, pairs, staged, p.norm};
#if defined(DETINFER_STAMPS)
  args.stamps_base = stamps::device_data();
  args.stamp = stamps::record(p, T::BM, T::BN, T::STAGES, T::A_ROWS, T::KT, static_cast<int>(tiles));
#endif
  switch (p.chains) {
    case 1: return launch_chains<T, 1>(p, map_a, map_w, map_out, args, tiles, stream);
    case 2: if constexpr (kChainsFit<T, 2>) return launch_chains<T, 2>(p, map_a, map_w, map_out, args, tiles, stream);
            break;
  }
  DI_CHECK(false, "matmul: the sm_90 tile ", T::BM, "x", T::BN, " has no kernel of ", p.chains, " chains");
}

}  // namespace detinfer::cuda::sm90
