// matmul: out[M,N] = a[M,K] · w[N,K]^T (+ bias[N])     a,w bf16; fp32 accumulate; out bf16 or f32
// One instruction family per architecture, for every M: on a compute capability 9.0 device with
// sm_90a code in the build, the wgmma kernels of matmul_sm90.cu; everywhere else the kernels below.
// This file chooses, validates and owns the variant's split-K combine for both.
//
// mma.sync kernels: mma.sync.m16n8k16 (bf16 in, fp32 accumulator), A row-major, W
// "col" (each W row is one column of B). Tiles are staged in shared memory by a cp.async pipeline
// of kBlockK = 64 columns of K, 16-byte copies, XOR-swizzled rows, fragments read with ldmatrix.
//
// Invariant: each output element is ONE accumulator that receives the m16n8k16 MMAs of
// k = 0, 16, 32, ... K-1 in ascending order (a K not a multiple of 16 ends with a zero-padded
// step); the bias is added in fp32 after the last step, then the value is rounded once. BM, BN,
// the warp layout and the pipeline depth change with M and N (matmul_config), but none of them
// changes that chain, and neither kBlockK nor the instruction ever depends on M. No split-K on
// the invariant path.
// Variant (variant_kernels()): M <= kVariantMaxRows splits K into kVariantSplits ranges computed by
// separate blocks into an fp32 workspace, then added in split order: the split-K an ordinary
// library picks for small batches, whose sums round differently from the single chain.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>

#include "../common/config.h"
#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "cuda_ops.h"
#include "device_buffer.cuh"
#include "matmul.cuh"
#include "matmul_sm90.cuh"

namespace detinfer::cuda {
namespace {

constexpr int kBlockK = 64;        // K columns per pipeline stage (8 chunks of 16 bytes per row)
constexpr int kChunk = 8;          // bf16 values per 16-byte copy
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;
constexpr int64_t kVariantMaxRows = 16;
constexpr int kVariantSplits = 4;

// Tile geometry of one configuration: a block computes BM x BN outputs with WARPS_M x WARPS_N
// warps, each warp (BM/WARPS_M) x (BN/WARPS_N), through a pipeline of STAGES buffers, each holding
// KB consecutive kBlockK tiles (longer contiguous reads per W row for the weight-streaming
// configurations; the k-blocks are still consumed one at a time in ascending order).
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_, int KB_ = 1>
struct MatmulTiles {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_, KB = KB_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / kMmaM, NT = WN / kMmaN;  // MMA tiles per warp
  static constexpr int SMEM_BYTES = STAGES * KB * (BM + BN) * kBlockK * 2;
  static_assert(WM % kMmaM == 0 && WN % kMmaN == 0, "warp tile must be a multiple of the MMA shape");
  static_assert(NT == 1 || NT % 2 == 0, "B fragments are read two n8 tiles at a time");
};

// The configurations (kTileTable). Production uses a few of them by bucket of M (matmul_config);
// the others exist for the development harness (csrc/dev/matmul.cu), which times every one and
// checks that all of them give the same bits (they share the K chain).
struct MatmulArgs {
  const __nv_bfloat16* a;
  const __nv_bfloat16* w;
  const __nv_bfloat16* bias;  // null: none (always null for a split's partial)
  void* out;                  // [M,N] bf16/f32, or the workspace [splits, M, N] f32 for a split
  bool out_f32;
  int M, N, K;
  int k_per_split;            // multiple of kBlockK; K for the invariant path
};

struct TileEntry {
  const char* name;
  void (*launch)(const MatmulArgs&, int splits, cudaStream_t stream);
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 fills the destination with zeros (rows/columns past the edge).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// d += a · b for one m16n8k16 tile (bf16 inputs, fp32 accumulator).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][kBlockK] bf16 tile: the chunk
// index is XORed with the row so that the 8 rows one ldmatrix phase reads fall in distinct banks.
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * (kBlockK * 2) + ((chunk ^ (row & 7)) << 4));
}

// Copies rows [row0, row0+ROWS) x columns [k0, k0+kBlockK) of src [rows, K] into a tile; chunks
// outside [0,rows) x [0,k_end) are zero-filled.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t tile, const __nv_bfloat16* src, int rows, int K, int row0,
                                          int k0, int k_end) {
  constexpr int kChunksPerRow = kBlockK / kChunk;
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int i = threadIdx.x; i < kChunks; i += THREADS) {
    int row = i / kChunksPerRow, chunk = i % kChunksPerRow;
    int grow = row0 + row, gk = k0 + chunk * kChunk;
    bool valid = grow < rows && gk < k_end;
    const __nv_bfloat16* p = valid ? src + static_cast<int64_t>(grow) * K + gk : src;
    cp_async16(tile + tile_offset(row, chunk), p, valid ? 16 : 0);
  }
}

template <typename Tiles>
__global__ void __launch_bounds__(Tiles::THREADS, Tiles::MIN_BLOCKS) matmul_kernel(MatmulArgs args) {
  constexpr int BM = Tiles::BM, BN = Tiles::BN, STAGES = Tiles::STAGES, THREADS = Tiles::THREADS;
  constexpr int MT = Tiles::MT, NT = Tiles::NT, WM = Tiles::WM, WN = Tiles::WN;
  constexpr int KB = Tiles::KB;
  constexpr uint32_t kTileBytes = (BM + BN) * kBlockK * 2;  // one k-block of A and W
  constexpr uint32_t kStageBytes = KB * kTileBytes;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = smem_addr(smem);

  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
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
      load_tile<BN, THREADS>(w_tile, args.w, args.N, args.K, n0, k0, k_end);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    // The buffer refilled now was read in iteration kt-1, which every warp has finished.
    int next = kt + STAGES - 1;
    if (next < k_tiles) load_stage(next % STAGES, next);
    cp_async_commit();

#pragma unroll
    for (int j = 0; j < KB; ++j) {
      // A k-block past the end is skipped, not multiplied as zeros: the chain stays the same.
      if (KB > 1 && k_begin + (kt * KB + j) * kBlockK >= k_end) break;
      uint32_t a_tile = smem_base + (kt % STAGES) * kStageBytes + j * kTileBytes;
      uint32_t w_tile = a_tile + BM * kBlockK * 2;
#pragma unroll
      for (int kk = 0; kk < kBlockK / kMmaK; ++kk) {
        uint32_t af[MT][4], bf[NT][2];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          int row = warp_m * WM + i * kMmaM + (lane & 15);
          ldmatrix_x4(af[i], a_tile + tile_offset(row, kk * 2 + (lane >> 4)));
        }
        if constexpr (NT == 1) {
          int row = warp_n * WN + (lane & 7);
          ldmatrix_x2(bf[0], w_tile + tile_offset(row, kk * 2 + ((lane >> 3) & 1)));
        } else {
#pragma unroll
          for (int jn = 0; jn < NT; jn += 2) {
            int row = warp_n * WN + jn * kMmaN + (lane & 7) + ((lane >> 4) << 3);
            uint32_t r[4];
            ldmatrix_x4(r, w_tile + tile_offset(row, kk * 2 + ((lane >> 3) & 1)));
            bf[jn][0] = r[0], bf[jn][1] = r[1], bf[jn + 1][0] = r[2], bf[jn + 1][1] = r[3];
          }
        }
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int jn = 0; jn < NT; ++jn) mma_bf16_16816(acc[i][jn], af[i], bf[jn]);
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: fragment (i,j) element r sits at row g (+8 for r >= 2), column 2*t + (r & 1).
  const int g = lane >> 2, t = lane & 3;
  float* out_f32 = static_cast<float*>(args.out) + static_cast<int64_t>(blockIdx.z) * args.M * args.N;
  __nv_bfloat16* out_bf16 = static_cast<__nv_bfloat16*>(args.out);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        int row = m0 + warp_m * WM + i * kMmaM + g + (r >= 2 ? 8 : 0);
        int col = n0 + warp_n * WN + j * kMmaN + 2 * t + (r & 1);
        if (row >= args.M || col >= args.N) continue;
        float v = acc[i][j][r];
        if (args.bias) v = v + __bfloat162float(args.bias[col]);
        int64_t idx = static_cast<int64_t>(row) * args.N + col;
        if (args.out_f32) {
          out_f32[idx] = v;
        } else {
          out_bf16[idx] = __float2bfloat16_rn(v);
        }
      }
}

// Variant only: out[m,n] = ((ws[0,m,n] + ws[1,m,n]) + ...) + bias[n], in split order.
__global__ void split_k_combine_kernel(void* out, bool out_f32, const float* ws, const __nv_bfloat16* bias,
                                       int64_t MN, int N, int splits) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < MN;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = ws[i];
    for (int s = 1; s < splits; ++s) v = v + ws[s * MN + i];
    if (bias) v = v + __bfloat162float(bias[i % N]);
    if (out_f32) {
      static_cast<float*>(out)[i] = v;
    } else {
      static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
    }
  }
}

struct MatmulLaunch {
  int tiles;        // index into kTileTable
  int splits;       // K ranges; 1 on the invariant path
  int k_per_split;  // multiple of kBlockK
};

template <typename Tiles>
void launch_tiles(const MatmulArgs& args, int splits, cudaStream_t stream) {
  static std::once_flag once;
  static cudaError_t attr_err = cudaSuccess;
  std::call_once(once, [] {
    attr_err = cudaFuncSetAttribute(matmul_kernel<Tiles>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    Tiles::SMEM_BYTES);
  });
  CUDA_CHECK(attr_err);
  int64_t grid_n = (args.N + Tiles::BN - 1) / Tiles::BN, grid_m = (args.M + Tiles::BM - 1) / Tiles::BM;
  DI_CHECK(grid_m <= 65535, "matmul: M = ", args.M, " is too large for one launch");
  dim3 grid(static_cast<unsigned>(grid_n), static_cast<unsigned>(grid_m), splits);
  matmul_kernel<Tiles><<<grid, Tiles::THREADS, Tiles::SMEM_BYTES, stream>>>(args);
}


// Every configuration the harness can time; all share kBlockK and the instruction, so all give
// the same bits (the harness checks it at every benchmarked shape).
const TileEntry kTileTable[] = {
    {"16x32 w1x4 s8", launch_tiles<MatmulTiles<16, 32, 1, 4, 8, 1>>},
    {"16x64 w1x4 s6", launch_tiles<MatmulTiles<16, 64, 1, 4, 6, 1>>},
    {"16x16 w1x2 s8", launch_tiles<MatmulTiles<16, 16, 1, 2, 8, 2>>},
    {"16x16 w1x2 s4 kb4", launch_tiles<MatmulTiles<16, 16, 1, 2, 4, 2, 4>>},
    {"16x32 w1x4 s4 kb4", launch_tiles<MatmulTiles<16, 32, 1, 4, 4, 1, 4>>},
    {"16x64 w1x4 s4 kb2", launch_tiles<MatmulTiles<16, 64, 1, 4, 4, 1, 2>>},
    {"16x8 w1x1 s4 kb4", launch_tiles<MatmulTiles<16, 8, 1, 1, 4, 4, 4>>},
    {"16x16 w1x2 s6 kb2", launch_tiles<MatmulTiles<16, 16, 1, 2, 6, 2, 2>>},
    {"16x32 w1x4 s6 kb2", launch_tiles<MatmulTiles<16, 32, 1, 4, 6, 1, 2>>},
    {"32x64 w1x4 s6", launch_tiles<MatmulTiles<32, 64, 1, 4, 6, 1>>},
    {"32x64 w1x4 s4 kb2", launch_tiles<MatmulTiles<32, 64, 1, 4, 4, 1, 2>>},
    {"64x64 w2x2 s4", launch_tiles<MatmulTiles<64, 64, 2, 2, 4, 2>>},
    {"64x64 w2x2 s3 kb2", launch_tiles<MatmulTiles<64, 64, 2, 2, 3, 2, 2>>},
    {"64x128 w2x2 s4", launch_tiles<MatmulTiles<64, 128, 2, 2, 4, 2>>},
    {"128x64 w2x2 s4", launch_tiles<MatmulTiles<128, 64, 2, 2, 4, 2>>},
    {"128x128 w2x4 s3", launch_tiles<MatmulTiles<128, 128, 2, 4, 3, 2>>},
    {"128x128 w2x4 s4", launch_tiles<MatmulTiles<128, 128, 2, 4, 4, 1>>},
    {"128x256 w2x4 s3", launch_tiles<MatmulTiles<128, 256, 2, 4, 3, 1>>},
};
constexpr int kTileCount = sizeof(kTileTable) / sizeof(kTileTable[0]);
// Indices of the configurations production uses.
constexpr int k16x32kb2 = 8, k16x64 = 1, k16x64kb2 = 5, k32x64 = 9, k64x64 = 11, k128x128 = 15;
constexpr int64_t kWideN = 32768;  // an lm_head-sized N: enough blocks over N to prefer wider tiles

// The one place the launch is chosen. Invariant: tiles may follow M, the K chain never does.
// The tiles are the fastest of the harness's sweep on an H100 at N,K in {4096x4096, 12288x4096,
// 4096x12288, 151936x1024}. A split-K fixed per (N,K) was measured too and is not used: two
// ranges lift M=1 at N=4096 from ~955 to ~1190 GB/s of weights but double the M=4096 time
// through the fp32 workspace.
// On Hopper (`hopper`), the tiles are matmul_sm90.cu's, chosen by its production_config.
MatmulLaunch matmul_config(int64_t M, int64_t N, int64_t K, bool hopper) {
  MatmulLaunch l;
  bool wide = N >= kWideN;
  if (hopper) {
    l.tiles = sm90::production_config(M, N, K);
  } else if (M <= 16) {
    l.tiles = wide ? k16x64kb2 : k16x32kb2;  // decode: stream W over many blocks
  } else if (M <= 32) {
    l.tiles = wide ? k32x64 : k16x64;
  } else if (M <= 64) {
    l.tiles = wide ? k32x64 : k64x64;
  } else if (M <= 128) {
    l.tiles = wide ? k128x128 : k64x64;
  } else {
    l.tiles = k128x128;
  }
  l.splits = 1;
  l.k_per_split = static_cast<int>(K);
  if (variant_kernels() && M <= kVariantMaxRows && K > 0) {
    int64_t tiles = (K + kBlockK - 1) / kBlockK;
    int64_t per = (tiles + kVariantSplits - 1) / kVariantSplits;
    l.k_per_split = static_cast<int>(per * kBlockK);
    l.splits = static_cast<int>((K + l.k_per_split - 1) / l.k_per_split);
  }
  return l;
}

std::string shapes(int64_t M, int64_t N, int64_t K) {
  return "[M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" + std::to_string(K) + "]";
}

void run_matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias, bool dev_override, int dev_tiles,
                int dev_splits) {
  int64_t M = a.dim(0), K = a.dim(1), N = w.dim(0);
  if (M == 0 || N == 0) return;
  DI_CHECK(K % kChunk == 0, "matmul: the CUDA kernels need K to be a multiple of ", kChunk, " but received K = ", K,
           " (a ", a.describe(), ", w ", w.describe(), ")");
  DI_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 31) && K < (int64_t{1} << 31) && M * N < (int64_t{1} << 40),
           "matmul: shape ", shapes(M, N, K), " is too large");
  DI_CHECK(reinterpret_cast<uintptr_t>(a.data()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data()) % 16 == 0,
           "matmul: the CUDA kernels need a and w to start on a 16-byte boundary (a view at an odd row offset?)");
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_runtime::stream());
  // K = 0 multiplies nothing (out = bias or zeros): the mma.sync kernel writes that on any device.
  const bool hopper = K > 0 && sm90::available();
  MatmulLaunch l = matmul_config(M, N, K, hopper);
  if (dev_override) {
    DI_CHECK(K > 0, "matmul_with_config: K must be positive");
    int64_t per = ((K + kBlockK - 1) / kBlockK + dev_splits - 1) / dev_splits * kBlockK;
    l = {dev_tiles, static_cast<int>((K + per - 1) / per), static_cast<int>(per)};
  }

  MatmulArgs args{a.ptr<__nv_bfloat16>(), w.ptr<__nv_bfloat16>(), bias ? bias->ptr<__nv_bfloat16>() : nullptr,
                  out.data(), out.dtype == DType::F32, static_cast<int>(M), static_cast<int>(N),
                  static_cast<int>(K), l.k_per_split};
  DeviceBuffer workspace;
  if (l.splits > 1) {
    workspace = DeviceBuffer(static_cast<size_t>(l.splits) * M * N * sizeof(float));
    args.out = workspace.data();
    args.out_f32 = true;
    args.bias = nullptr;
  }
  if (hopper) {
    sm90::Problem p{args.a, args.w, args.bias, args.out, args.out_f32, args.M, args.N, args.K, args.k_per_split,
                    l.splits};
    sm90::launch(p, l.tiles, stream);
  } else {
    kTileTable[l.tiles].launch(args, l.splits, stream);
  }
  CUDA_CHECK_LAUNCH("matmul", shapes(M, N, K));
  if (l.splits > 1) {
    int64_t MN = M * N;
    int blocks = static_cast<int>(std::min<int64_t>((MN + 255) / 256, 4096));
    split_k_combine_kernel<<<blocks, 256, 0, stream>>>(out.data(), out.dtype == DType::F32,
                                                       static_cast<const float*>(workspace.data()),
                                                       bias ? bias->ptr<__nv_bfloat16>() : nullptr, MN,
                                                       static_cast<int>(N), l.splits);
    CUDA_CHECK_LAUNCH("matmul split-K combine", shapes(M, N, K));
  }
}

}  // namespace

void matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias) {
  run_matmul(out, a, w, bias, false, 0, 1);
}

void matmul_k_partitions(float* partials, const Tensor& a, const Tensor& w, int partitions) {
  int64_t M = a.dim(0), K = a.dim(1), N = w.dim(0);
  if (M == 0 || N == 0) return;
  DI_CHECK(partitions >= 1 && K % partitions == 0 && (K / partitions) % 16 == 0,
           "matmul_partials: K = ", K, " is not ", partitions, " partitions of a multiple of 16 columns");
  DI_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 31) && K < (int64_t{1} << 31) && M * N < (int64_t{1} << 40),
           "matmul_partials: shape ", shapes(M, N, K), " is too large");
  DI_CHECK(reinterpret_cast<uintptr_t>(a.data()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data()) % 16 == 0,
           "matmul_partials: the CUDA kernels need a and w to start on a 16-byte boundary");
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_runtime::stream());
  const int64_t width = K / partitions;
  // The family follows the partition's width only, never M: the same for every TP degree.
  const bool hopper = sm90::available() && width % kBlockK == 0;
  MatmulLaunch l = matmul_config(M, N, K, hopper);
  MatmulArgs args{a.ptr<__nv_bfloat16>(), w.ptr<__nv_bfloat16>(), nullptr, partials, true, static_cast<int>(M),
                  static_cast<int>(N), static_cast<int>(K), static_cast<int>(width)};
  if (hopper) {
    sm90::Problem p{args.a, args.w, nullptr, partials, true, args.M, args.N, args.K, args.k_per_split, partitions};
    sm90::launch(p, l.tiles, stream);
  } else {
    kTileTable[l.tiles].launch(args, partitions, stream);
  }
  CUDA_CHECK_LAUNCH("matmul_partials", shapes(M, N, K));
}

const char* matmul_kernels() { return sm90::available() ? "wgmma (sm_90a)" : "mma.sync"; }

// The configurations of the family this device runs (matmul_sm90.cu's on Hopper).
namespace matmul_dev {
int config_count() { return sm90::available() ? sm90::config_count() : kTileCount; }
const char* config_name(int i) { return sm90::available() ? sm90::config_name(i) : kTileTable[i].name; }
int production_config(int64_t M, int64_t N, int64_t K) {
  return matmul_config(M, N, K, sm90::available()).tiles;
}
void matmul_with_config(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias, int config, int splits) {
  DI_CHECK(config >= 0 && config < config_count(), "matmul_with_config: no configuration ", config);
  DI_CHECK(splits >= 1, "matmul_with_config: splits must be at least 1");
  run_matmul(out, a, w, bias, true, config, splits);
}
}  // namespace matmul_dev

}  // namespace detinfer::cuda
