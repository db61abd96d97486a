// The mma.sync matmul kernel (sm_80 and newer), as a template over its tile geometry:
//   out[M,N] = a[M,K] · w[N,K]^T (+ bias[N])     a,w bf16; fp32 accumulate; out bf16 or f32
// mma.sync.m16n8k16 (bf16 in, fp32 accumulator), A row-major, W "col" (each W row is one column
// of B). Tiles are staged in shared memory by a cp.async pipeline of kBlockK = 64 columns of K,
// 16-byte copies, XOR-swizzled rows, fragments read with ldmatrix.
//
// Invariant: each output element is ONE accumulator that receives the m16n8k16 MMAs of
// k = 0, 16, 32, ... K-1 in ascending order (a K not a multiple of 16 ends with a zero-padded
// step); the bias is added in fp32 after the last step, then the value is rounded once. The tile
// geometry (BM, BN, the warp layout, the pipeline depth, KB) changes none of that, so every
// instantiation gives the same bits. A split (blockIdx.z) covers k_per_split columns of K into its
// own slice of an fp32 workspace; the invariant path has one split.
// gate_up (matmul_silu_mul): w is the fused [gate | up] weight of 2I rows and out is [M, I]. Each
// warp's WN rows of the w tile are WN/2 gate rows followed by the matching WN/2 up rows, so the
// thread that holds the gate accumulator of an output in n8 tile j holds its up accumulator in
// tile j + NT/2; the epilogue rounds both to bf16 (after their biases) and stores silu_mul_value
// of them (NT >= 2). The MMAs and each accumulator's K chain are the plain product's: the bits of
// matmul then silu_mul_packed.
//
// matmul.cu instantiates the configurations production chooses (matmul_config); the development
// harness (csrc/dev/matmul.cu) instantiates the others it times against them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "../cuda/check.h"
#include "ptx.cuh"
#include "silu_mul.cuh"

namespace detinfer::cuda::mma_sync {

constexpr int kBlockK = 64;        // K columns per pipeline stage (8 chunks of 16 bytes per row)
constexpr int kChunk = 8;          // bf16 values per 16-byte copy
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;

// Tile geometry of one configuration: a block computes BM x BN outputs with WARPS_M x WARPS_N
// warps, each warp (BM/WARPS_M) x (BN/WARPS_N), through a pipeline of STAGES buffers, each holding
// KB consecutive kBlockK tiles (longer contiguous reads per W row for the weight-streaming
// configurations; the k-blocks are still consumed one at a time in ascending order).
// FRAGS2: the fragments of the next k16 step are read from shared memory while this step's MMAs
// run, across the k-block boundary too (each warp waits for the next stage before its last k16
// step of the current one). The MMAs and their order are the same (KB = 1 only).
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_, int KB_ = 1, bool FRAGS2_ = false>
struct MatmulTiles {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_, KB = KB_;
  static constexpr bool FRAGS2 = FRAGS2_;
  static_assert(!FRAGS2 || KB == 1, "fragment double buffering walks one k-block per stage");
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / kMmaM, NT = WN / kMmaN;  // MMA tiles per warp
  static constexpr int SMEM_BYTES = STAGES * KB * (BM + BN) * kBlockK * 2;
  static_assert(WM % kMmaM == 0 && WN % kMmaN == 0, "warp tile must be a multiple of the MMA shape");
  static_assert(NT == 1 || NT % 2 == 0, "B fragments are read two n8 tiles at a time");
};

struct MatmulArgs {
  const __nv_bfloat16* a;
  const __nv_bfloat16* w;
  const __nv_bfloat16* bias;  // null: none (always null for a split's partial)
  void* out;                  // [M,N] bf16/f32, or the workspace [splits, M, N] f32 for a split
  bool out_f32;
  int M, N, K;
  int k_per_split;            // multiple of kBlockK; K for the invariant path
  bool gate_up = false;       // w holds N/2 gate rows then N/2 up rows; out [M, N/2] bf16 gets
                              // silu_mul_value of each (gate, up) pair (one split, N even)
};

// One configuration of a table: its name (as the harness and the benchmarks print it) and its
// launch over `splits` K ranges (1 on the invariant path).
struct TileEntry {
  const char* name;
  void (*launch)(const MatmulArgs&, int splits, cudaStream_t stream);
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][kBlockK] bf16 tile: the chunk
// index is XORed with the row so that the 8 rows one ldmatrix phase reads fall in distinct banks.
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * (kBlockK * 2) + ((chunk ^ (row & 7)) << 4));
}

// Copies columns [k0, k0+kBlockK) of rows source_row(0 .. ROWS-1) of src [*, K] into a tile;
// chunks of rows mapped to -1, or at or past k_end, are zero-filled.
template <int ROWS, int THREADS, typename RowMap>
__device__ __forceinline__ void load_tile_rows(uint32_t tile, const __nv_bfloat16* src, int K, int k0, int k_end,
                                               RowMap source_row) {
  constexpr int kChunksPerRow = kBlockK / kChunk;
  constexpr int kChunks = ROWS * kChunksPerRow;
  // A trip count the compiler knows: a bound that depends on threadIdx.x made every unrolled copy
  // a guarded, divergent branch (BSYNC per copy; most of a decode tile's code and a third of its
  // warps' stalls waited for instructions).
  constexpr int kPerThread = (kChunks + THREADS - 1) / THREADS;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int i = static_cast<int>(threadIdx.x) + j * THREADS;
    if (kChunks % THREADS != 0 && i >= kChunks) break;
    int row = i / kChunksPerRow, chunk = i % kChunksPerRow;
    int grow = source_row(row), gk = k0 + chunk * kChunk;
    bool valid = grow >= 0 && gk < k_end;
    const __nv_bfloat16* p = valid ? src + static_cast<int64_t>(grow) * K + gk : src;
    ptx::cp_async16(tile + tile_offset(row, chunk), p, valid ? 16 : 0);
  }
}

// Rows [row0, row0+ROWS) of src [rows, K]; rows past the end are zero-filled.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t tile, const __nv_bfloat16* src, int rows, int K, int row0,
                                          int k0, int k_end) {
  load_tile_rows<ROWS, THREADS>(tile, src, K, k0, k_end, [&](int row) { return row0 + row < rows ? row0 + row : -1; });
}

// GATE_UP: args.gate_up, as a template argument, so that the plain product's code is the one it
// was without the fusion.
template <typename Tiles, bool GATE_UP>
__global__ void __launch_bounds__(Tiles::THREADS, Tiles::MIN_BLOCKS) matmul_kernel(MatmulArgs args) {
  constexpr int BM = Tiles::BM, BN = Tiles::BN, STAGES = Tiles::STAGES, THREADS = Tiles::THREADS;
  constexpr int MT = Tiles::MT, NT = Tiles::NT, WM = Tiles::WM, WN = Tiles::WN;
  constexpr int KB = Tiles::KB;
  constexpr uint32_t kTileBytes = (BM + BN) * kBlockK * 2;  // one k-block of A and W
  constexpr uint32_t kStageBytes = KB * kTileBytes;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = ptx::smem_addr(smem);

  // A gate_up block covers BN/2 columns of out (n0 counts them); plain blocks cover BN.
  const int n_out = GATE_UP ? args.N / 2 : args.N;
  const int n0 = blockIdx.x * (GATE_UP ? BN / 2 : BN), m0 = blockIdx.y * BM;
  const int k_begin = blockIdx.z * args.k_per_split;
  const int k_end = min(args.K, k_begin + args.k_per_split);
  const int k_tiles = (k_end - k_begin + KB * kBlockK - 1) / (KB * kBlockK);  // pipeline stages

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / Tiles::WARPS_N, warp_n = warp % Tiles::WARPS_N;

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  auto load_stage = [&](int stage, int kt) {
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      uint32_t a_tile = smem_base + stage * kStageBytes + j * kTileBytes;
      uint32_t w_tile = a_tile + BM * kBlockK * 2;
      int k0 = k_begin + (kt * KB + j) * kBlockK;
      load_tile<BM, THREADS>(a_tile, args.a, args.M, args.K, m0, k0, k_end);
      if constexpr (GATE_UP) {
        // Warp block b of the tile (rows b*WN ..): WN/2 gate rows, then the same columns' up rows.
        load_tile_rows<BN, THREADS>(w_tile, args.w, args.K, k0, k_end, [&](int row) {
          const int half = WN / 2, b = row / WN, o = row % WN;
          const int c = n0 + b * half + (o < half ? o : o - half);
          return c < n_out ? (o < half ? c : n_out + c) : -1;
        });
      } else {
        load_tile<BN, THREADS>(w_tile, args.w, args.N, args.K, n0, k0, k_end);
      }
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    ptx::cp_async_commit();
  }

  // The A and B fragments of k16 step kk of the k-block at a_tile (its W tile follows it).
  auto load_fragments = [&](uint32_t (&af)[MT][4], uint32_t (&bf)[NT][2], uint32_t a_tile, int kk) {
    const uint32_t w_tile = a_tile + BM * kBlockK * 2;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      int row = warp_m * WM + i * kMmaM + (lane & 15);
      ptx::ldmatrix_x4(af[i], a_tile + tile_offset(row, kk * 2 + (lane >> 4)));
    }
    if constexpr (NT == 1) {
      int row = warp_n * WN + (lane & 7);
      ptx::ldmatrix_x2(bf[0], w_tile + tile_offset(row, kk * 2 + ((lane >> 3) & 1)));
    } else {
#pragma unroll
      for (int jn = 0; jn < NT; jn += 2) {
        int row = warp_n * WN + jn * kMmaN + (lane & 7) + ((lane >> 4) << 3);
        uint32_t r[4];
        ptx::ldmatrix_x4(r, w_tile + tile_offset(row, kk * 2 + ((lane >> 3) & 1)));
        bf[jn][0] = r[0], bf[jn][1] = r[1], bf[jn + 1][0] = r[2], bf[jn + 1][1] = r[3];
      }
    }
  };
  auto mma_step = [&](const uint32_t (&af)[MT][4], const uint32_t (&bf)[NT][2]) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int jn = 0; jn < NT; ++jn) ptx::mma_bf16_16816(acc[i][jn], af[i], bf[jn][0], bf[jn][1]);
  };

  if constexpr (Tiles::FRAGS2) {
    constexpr int kSteps = kBlockK / kMmaK;
    static_assert(kSteps == 4, "the loop below spells out the four k16 steps of a k-block");
    uint32_t af0[MT][4], bf0[NT][2], af1[MT][4], bf1[NT][2];
    ptx::cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (k_tiles > 0) load_fragments(af0, bf0, smem_base, 0);
    // Step kk of k-block kt: at the first, issue the copies of stage kt + STAGES - 1 (into the
    // buffer last read before the barrier of iteration kt-1's last step); read the next step's
    // fragments into (an, bn); multiply (ac, bc).
    auto step = [&](int kt, int kk, const uint32_t (&ac)[MT][4], const uint32_t (&bc)[NT][2], uint32_t (&an)[MT][4],
                    uint32_t (&bn)[NT][2]) {
      const uint32_t a_tile = smem_base + (kt % STAGES) * kStageBytes;
      if (kk == 0) {
        const int next = kt + STAGES - 1;
        if (next < k_tiles) load_stage(next % STAGES, next);
        ptx::cp_async_commit();
      }
      if (kk + 1 < kSteps) {
        load_fragments(an, bn, a_tile, kk + 1);
      } else {
        ptx::cp_async_wait<STAGES - 2>();  // k-block kt+1 has landed (this thread's copies)
        __syncthreads();                   // ... and every thread's
        if (kt + 1 < k_tiles) load_fragments(an, bn, smem_base + ((kt + 1) % STAGES) * kStageBytes, 0);
      }
      mma_step(ac, bc);
    };
    for (int kt = 0; kt < k_tiles; ++kt) {
      step(kt, 0, af0, bf0, af1, bf1);
      step(kt, 1, af1, bf1, af0, bf0);
      step(kt, 2, af0, bf0, af1, bf1);
      step(kt, 3, af1, bf1, af0, bf0);
    }
  } else {
    for (int kt = 0; kt < k_tiles; ++kt) {
      ptx::cp_async_wait<STAGES - 2>();
      __syncthreads();
      // The buffer refilled now was read in iteration kt-1, which every warp has finished.
      int next = kt + STAGES - 1;
      if (next < k_tiles) load_stage(next % STAGES, next);
      ptx::cp_async_commit();

#pragma unroll
      for (int j = 0; j < KB; ++j) {
        // A k-block past the end is skipped, not multiplied as zeros: the chain stays the same.
        if (KB > 1 && k_begin + (kt * KB + j) * kBlockK >= k_end) break;
        uint32_t a_tile = smem_base + (kt % STAGES) * kStageBytes + j * kTileBytes;
#pragma unroll
        for (int kk = 0; kk < kBlockK / kMmaK; ++kk) {
          uint32_t af[MT][4], bf[NT][2];
          load_fragments(af, bf, a_tile, kk);
          mma_step(af, bf);
        }
      }
    }
  }
  ptx::cp_async_wait<0>();

  // Epilogue: fragment (i,j) element r sits at row g (+8 for r >= 2), column 2*t + (r & 1).
  const int g = lane >> 2, t = lane & 3;
  // gate_up: n8 tile j < NT/2 holds gate columns, tile j + NT/2 the up columns of the same outputs
  // (the partner index is taken modulo NT so that every unrolled j indexes acc in range).
  constexpr int warp_cols = GATE_UP ? WN / 2 : WN;
  float* out_f32 = static_cast<float*>(args.out) + static_cast<int64_t>(blockIdx.z) * args.M * args.N;
  __nv_bfloat16* out_bf16 = static_cast<__nv_bfloat16*>(args.out);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if (GATE_UP && j >= NT / 2) continue;
        int row = m0 + warp_m * WM + i * kMmaM + g + (r >= 2 ? 8 : 0);
        int col = n0 + warp_n * warp_cols + j * kMmaN + 2 * t + (r & 1);
        if (row >= args.M || col >= n_out) continue;
        float v = acc[i][j][r];
        if (args.bias) v = v + __bfloat162float(args.bias[col]);
        int64_t idx = static_cast<int64_t>(row) * n_out + col;
        if constexpr (GATE_UP) {
          float u = acc[i][(j + NT / 2) % NT][r];
          if (args.bias) u = u + __bfloat162float(args.bias[n_out + col]);
          out_bf16[idx] = silu_mul_value(__float2bfloat16_rn(v), __float2bfloat16_rn(u));
        } else if (args.out_f32) {
          out_f32[idx] = v;
        } else {
          out_bf16[idx] = __float2bfloat16_rn(v);
        }
      }
}

// One launch of configuration Tiles over `splits` K ranges (blockIdx.z). The caller has checked
// the shapes and alignment (matmul.cu's run_matmul).
template <typename Tiles, bool GATE_UP>
void launch_kernel(const MatmulArgs& args, dim3 grid, cudaStream_t stream) {
  static std::once_flag once;
  static cudaError_t attr_err = cudaSuccess;
  std::call_once(once, [] {
    attr_err = cudaFuncSetAttribute(matmul_kernel<Tiles, GATE_UP>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    Tiles::SMEM_BYTES);
  });
  CUDA_CHECK(attr_err);
  matmul_kernel<Tiles, GATE_UP><<<grid, Tiles::THREADS, Tiles::SMEM_BYTES, stream>>>(args);
}

template <typename Tiles>
void launch_tiles(const MatmulArgs& args, int splits, cudaStream_t stream) {
  DI_CHECK(!args.gate_up || (Tiles::NT >= 2 && args.N % 2 == 0 && splits == 1 && !args.out_f32),
           "matmul: a gate_up product needs warps of 2 or more n8 tiles, an even N, one split and bf16 out");
  const int64_t block_n = args.gate_up ? Tiles::BN / 2 : Tiles::BN, n_out = args.gate_up ? args.N / 2 : args.N;
  int64_t grid_n = (n_out + block_n - 1) / block_n, grid_m = (args.M + Tiles::BM - 1) / Tiles::BM;
  DI_CHECK(grid_m <= 65535, "matmul: M = ", args.M, " is too large for one launch");
  dim3 grid(static_cast<unsigned>(grid_n), static_cast<unsigned>(grid_m), splits);
  if constexpr (Tiles::NT >= 2) {
    if (args.gate_up) return launch_kernel<Tiles, true>(args, grid, stream);
  }
  launch_kernel<Tiles, false>(args, grid, stream);
}

}  // namespace detinfer::cuda::mma_sync
