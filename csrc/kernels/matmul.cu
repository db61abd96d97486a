// matmul: out[M,N] = a[M,K] · w[N,K]^T (+ bias[N])     a,w bf16; fp32 accumulate; out bf16 or f32
// One instruction family per architecture, for every M: on a compute capability 9.0 device with
// sm_90a code in the build, the wgmma kernels of matmul_sm90.cu; everywhere else the mma.sync
// kernels of matmul_tiles.cuh (mma.sync m16n8k16, a cp.async pipeline of kBlockK = 64 columns of
// K). This file chooses, validates and owns the variant's split-K combine for both, and
// instantiates only the mma.sync configurations that matmul_config chooses.
//
// Invariant (mma.sync; the wgmma family's, with its chains fixed by K, is in matmul_sm90.cu):
// each output element is ONE accumulator that receives the m16n8k16 MMAs of
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

#include <algorithm>
#include <atomic>
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
#include "matmul_tiles.cuh"

namespace detinfer::cuda {
namespace {

// The development switch (setMatmulKernels, matmul_dev::force_mma_sync) runs the mma.sync family on
// a Hopper GPU too, to test and measure the kernels that sm_80-89 run on a machine that has only an
// H100/H200. Off in the library; the partitioned product ignores it.
bool use_wgmma() { return sm90::available() && forced_matmul_kernels() != 1; }

using mma_sync::kBlockK;
using mma_sync::kChunk;
using mma_sync::launch_tiles;
using mma_sync::MatmulArgs;
using mma_sync::MatmulTiles;
using mma_sync::TileEntry;
constexpr int64_t kVariantMaxRows = 16;
constexpr int kVariantSplits = 4;

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

// The configurations matmul_config chooses (matmul_tiles.cuh). They share kBlockK and the
// instruction, so they give the same bits; the development harness (csrc/dev/matmul.cu) times
// them beside the configurations it explores and checks that all give these bits.
const TileEntry kTileTable[] = {
    {"16x32 w1x4 s4 kb4", launch_tiles<MatmulTiles<16, 32, 1, 4, 4, 1, 4>>},
    {"16x32 w1x4 s6 kb2", launch_tiles<MatmulTiles<16, 32, 1, 4, 6, 1, 2>>},
    {"16x64 w1x4 s4 kb2", launch_tiles<MatmulTiles<16, 64, 1, 4, 4, 1, 2>>},
    {"32x64 w1x4 s6", launch_tiles<MatmulTiles<32, 64, 1, 4, 6, 1>>},
    {"64x64 w2x2 s4", launch_tiles<MatmulTiles<64, 64, 2, 2, 4, 2>>},
    {"64x128 w2x2 s4", launch_tiles<MatmulTiles<64, 128, 2, 2, 4, 2>>},
    {"128x128 w2x4 s3", launch_tiles<MatmulTiles<128, 128, 2, 4, 3, 2>>},
    {"128x256 w2x4 s3 f2", launch_tiles<MatmulTiles<128, 256, 2, 4, 3, 1, 1, true>>},
};
constexpr int kTileCount = sizeof(kTileTable) / sizeof(kTileTable[0]);
constexpr int k16x32kb4 = 0, k16x32kb2 = 1, k16x64kb2 = 2, k32x64 = 3, k64x64 = 4, k64x128 = 5, k128x128 = 6,
              k128x256 = 7;
// The 16x32 tiles have one n8 tile per warp, which cannot pair gate and up columns.
bool pairs_gate_up(int tiles) { return tiles != k16x32kb4 && tiles != k16x32kb2; }
constexpr int kLargeTileSmem = MatmulTiles<128, 256, 2, 4, 3, 1, 1, true>::SMEM_BYTES;  // 144 KiB

// What the tile choice needs of the current device: its SMs, and whether a block may take the
// 128x256 tile's shared memory (sm_80, sm_87 and sm_90 can; sm_86 and sm_89 stop at 99 KiB, which
// every other tile fits).
struct MmaSyncDevice {
  int sms = 0;
  bool large_tiles = false;
};
const MmaSyncDevice& mma_sync_device() {
  static std::once_flag once;
  static MmaSyncDevice info;
  static cudaError_t err = cudaSuccess;
  std::call_once(once, [] {
    int device = 0, optin = 0;
    info.sms = cuda_runtime::multiprocessors();
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    info.large_tiles = err == cudaSuccess && optin >= kLargeTileSmem;
  });
  CUDA_CHECK(err);
  return info;
}
constexpr int64_t kWideN = 32768;  // an lm_head-sized N: enough blocks over N to prefer wider tiles

// The one place the launch is chosen. Invariant: tiles may follow M, the K chain never does.
// On Hopper (`hopper`), the tiles are matmul_sm90.cu's, chosen by its production_config.
// The mma.sync rule comes from the harness's sweep on an H200 with that family forced
// (`node bench/matmul.mjs --mma-sync`; N,K in {4096x4096, 12288x4096, 4096x12288, 151936x1024} and
// Qwen3-0.6B's decode products, M from 1 to 4096), in blocks per SM so that it carries over to
// GPUs with other SM counts. Decode (M <= 64) streams w: the 16-row tile with four K tiles per stage
// while it gives at most two blocks per SM (more of them queue behind each other), then 16x32 with
// two (M <= 16) or 32x64. Prefill: 128x256 with double-buffered fragments once it gives a wave and
// a half of blocks and a block may hold its 144 KiB (7-17% faster than 128x128 at M = 2048-4096),
// else 128x128, or 64x128 while 128x128 would leave SMs idle. Of the sweep's 40 points this picks
// the fastest tile or one within 3% at 29 and within 8% at all. A split-K fixed per (N,K) was
// measured too and is not used: it changes the bits and costs prefill a workspace pass.
MatmulLaunch matmul_config(int64_t M, int64_t N, int64_t K, bool hopper) {
  MatmulLaunch l;
  const bool wide = N >= kWideN;
  const auto blocks = [&](int64_t BM, int64_t BN) { return ((M + BM - 1) / BM) * ((N + BN - 1) / BN); };
  if (hopper) {
    l.tiles = sm90::production_config(M, N, K);
  } else {
    const MmaSyncDevice& dev = mma_sync_device();
    const int64_t sms = dev.sms;
    if (M <= 64 && wide) {
      l.tiles = M <= 16 ? k16x64kb2 : k32x64;
    } else if (M <= 64 && blocks(16, 32) <= 2 * sms) {
      l.tiles = k16x32kb4;
    } else if (M <= 16) {
      l.tiles = k16x32kb2;
    } else if (M <= 64) {
      l.tiles = blocks(32, 64) <= 2 * sms ? k32x64 : k64x64;
    } else if (dev.large_tiles && 2 * blocks(128, 256) >= 3 * sms) {
      l.tiles = k128x256;
    } else if (M <= 128) {
      l.tiles = wide ? k128x128 : k64x64;
    } else {
      l.tiles = blocks(128, 128) < sms ? k64x128 : k128x128;
    }
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

// Rows of K columns that a's storage holds from a's first row on (a [M,K] view of a larger
// activation buffer holds more than M): the Hopper copies of a may read them (sm90::Problem).
int64_t readable_rows(const Tensor& a) {
  const size_t row_bytes = static_cast<size_t>(a.dim(1)) * dtype_size(a.dtype);
  if (row_bytes == 0 || a.offset > a.storage->nbytes) return a.dim(0);
  return std::max<int64_t>(a.dim(0), static_cast<int64_t>((a.storage->nbytes - a.offset) / row_bytes));
}

std::string shapes(int64_t M, int64_t N, int64_t K) {
  return "[M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" + std::to_string(K) + "]";
}

// What every kernel of both families needs of a product's operands.
void check_operands(const char* op, const Tensor& a, const Tensor& w) {
  const int64_t M = a.dim(0), K = a.dim(1), N = w.dim(0);
  DI_CHECK(K % kChunk == 0, op, ": the CUDA kernels need K to be a multiple of ", kChunk, " but received K = ", K,
           " (a ", a.describe(), ", w ", w.describe(), ")");
  DI_CHECK(M < (int64_t{1} << 31) && N < (int64_t{1} << 31) && K < (int64_t{1} << 31) && M * N < (int64_t{1} << 40),
           op, ": shape ", shapes(M, N, K), " is too large");
  DI_CHECK(reinterpret_cast<uintptr_t>(a.data()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data()) % 16 == 0, op,
           ": the CUDA kernels need a and w to start on a 16-byte boundary (a view at an odd row offset?)");
}

void run_matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias, bool dev_override, int dev_tiles,
                int dev_splits) {
  int64_t M = a.dim(0), K = a.dim(1), N = w.dim(0);
  if (M == 0 || N == 0) return;
  check_operands("matmul", a, w);
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_runtime::stream());
  // K = 0 multiplies nothing (out = bias or zeros): the mma.sync kernel writes that on any device.
  const bool hopper = K > 0 && use_wgmma();
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
                    l.splits, false};
    p.chains = sm90::chains(l.k_per_split);
    p.a_readable_rows = readable_rows(a);
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

// The product's epilogue applies SiLU·mul to each (gate, up) pair of accumulators a thread holds
// (gate_up tiles of either family) and gate_up is never written. In the variant (whose split-K
// goes through a workspace), and for K = 0, the plain product into gate_up and then
// silu_mul_packed. Either way each output is silu_mul_value(bf16(gate), bf16(up)) of the same K
// chains: the same bits.
void matmul_silu_mul(Tensor& out, Tensor& gate_up, const Tensor& a, const Tensor& w, const Tensor* bias) {
  const int64_t M = a.dim(0), K = a.dim(1), N = w.dim(0);
  if (M == 0 || N == 0) return;
  check_operands("matmul_silu_mul", a, w);
  const bool hopper = K > 0 && use_wgmma();
  const MatmulLaunch l = matmul_config(M, N, K, hopper);
  // The mma.sync decode tiles (16x32, one n8 tile per warp) cannot pair gate and up, and their
  // 16x64 sibling halves the blocks: on the H200 that made Qwen3-8B's gate|up 12% slower at M = 1
  // (dev_matmul gate-up --mma-sync), so those products keep the two ops.
  if (K == 0 || l.splits > 1 || (!hopper && !pairs_gate_up(l.tiles))) {
    run_matmul(gate_up, a, w, bias, false, 0, 1);
    silu_mul_packed(out, gate_up);
    return;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_runtime::stream());
  const auto* bias_ptr = bias ? bias->ptr<__nv_bfloat16>() : nullptr;
  if (hopper) {
    sm90::Problem p{a.data(), w.data(), bias_ptr, out.data(), false, static_cast<int>(M), static_cast<int>(N),
                    static_cast<int>(K), static_cast<int>(K), 1, true};
    p.chains = sm90::chains(K);
    p.a_readable_rows = readable_rows(a);
    sm90::launch(p, sm90::gate_up_config(l.tiles, M, N), stream);
  } else {
    MatmulArgs args{a.ptr<__nv_bfloat16>(), w.ptr<__nv_bfloat16>(), bias_ptr, out.data(), false, static_cast<int>(M),
                    static_cast<int>(N), static_cast<int>(K), static_cast<int>(K), true};
    kTileTable[l.tiles].launch(args, 1, stream);
  }
  CUDA_CHECK_LAUNCH("matmul_silu_mul", shapes(M, N, K));
}

namespace {

// The norm in the product's prologue where a Hopper tile can compute it (sm90::norm_fuses: one
// row, one split, so never in the variant), else add_rmsnorm_to into normed and the product.
// Either way out gets the bits of add_rmsnorm then matmul (matmul_silu_mul with gate_up).
void run_norm_matmul(const char* op, Tensor& out, Tensor* gate_up, Tensor& normed, Tensor& residual_out,
                     const Tensor& residual_in, const Tensor* x, const Tensor& norm_w, float eps, const Tensor& w,
                     const Tensor* bias) {
  const int64_t M = residual_in.dim(0), K = residual_in.dim(1), N = w.dim(0);
  if (M == 0) return;
  const bool distinct = !x || residual_out.data() != residual_in.data();  // block 0 writes residual_out as the others read
  const bool aligned = aligned16(residual_in.data()) && aligned16(norm_w.data()) && (!x || (aligned16(x->data()) &&
                       aligned16(residual_out.data())));
  if (N > 0 && K > 0 && M == 1 && distinct && aligned && use_wgmma()) {
    const MatmulLaunch l = matmul_config(M, N, K, true);
    const int config = gate_up ? sm90::gate_up_config(l.tiles, M, N) : l.tiles;
    if (l.splits == 1 && sm90::norm_fuses(config, M, K)) {
      check_operands(op, residual_in, w);
      sm90::Problem p{residual_in.data(), w.data(), bias ? bias->data() : nullptr, out.data(), false,
                      static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(K), 1,
                      gate_up != nullptr};
      p.norm = {residual_in.data(), x ? x->data() : nullptr, x ? residual_out.data() : nullptr, norm_w.data(), eps};
      p.chains = sm90::chains(K);
      sm90::launch(p, config, static_cast<cudaStream_t>(cuda_runtime::stream()));
      CUDA_CHECK_LAUNCH(op, shapes(M, N, K));
      return;
    }
  }
  add_rmsnorm_to(normed, residual_out, residual_in, x, norm_w, eps);
  if (gate_up) matmul_silu_mul(out, *gate_up, normed, w, bias);
  else matmul(out, normed, w, bias);
}

}  // namespace

void norm_matmul(Tensor& out, Tensor& normed, Tensor& residual_out, const Tensor& residual_in, const Tensor* x,
                 const Tensor& norm_w, float eps, const Tensor& w, const Tensor* bias) {
  run_norm_matmul("norm_matmul", out, nullptr, normed, residual_out, residual_in, x, norm_w, eps, w, bias);
}

void norm_matmul_silu_mul(Tensor& out, Tensor& gate_up, Tensor& normed, Tensor& residual_out,
                          const Tensor& residual_in, const Tensor* x, const Tensor& norm_w, float eps, const Tensor& w,
                          const Tensor* bias) {
  run_norm_matmul("norm_matmul_silu_mul", out, &gate_up, normed, residual_out, residual_in, x, norm_w, eps, w, bias);
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
    // One accumulator chain (Problem::chains' default): a rank's K differs with the TP degree,
    // the partition's chain must not.
    sm90::Problem p{args.a, args.w, nullptr, partials, true, args.M, args.N, args.K, args.k_per_split, partitions,
                    false};
    sm90::launch(p, l.tiles, stream);
  } else {
    kTileTable[l.tiles].launch(args, partitions, stream);
  }
  CUDA_CHECK_LAUNCH("matmul_partials", shapes(M, N, K));
}

// The family the next product runs: wgmma on Hopper with sm_90a code unless setMatmulKernels forced mma.sync.
const char* matmul_kernels() { return use_wgmma() ? "wgmma (sm_90a)" : "mma.sync"; }

// The production configurations of the family this device runs (matmul_sm90.cu's on Hopper).
namespace matmul_dev {
void force_mma_sync(bool on) { g_matmul_kernels.store(on ? 1 : 0); }
bool wgmma() { return use_wgmma(); }
int config_count() { return use_wgmma() ? sm90::config_count() : kTileCount; }
const char* config_name(int i) { return use_wgmma() ? sm90::config_name(i) : kTileTable[i].name; }
int production_config(int64_t M, int64_t N, int64_t K) { return matmul_config(M, N, K, use_wgmma()).tiles; }
void matmul_with_config(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias, int config, int splits) {
  DI_CHECK(config >= 0 && config < config_count(), "matmul_with_config: no configuration ", config);
  DI_CHECK(splits >= 1, "matmul_with_config: splits must be at least 1");
  run_matmul(out, a, w, bias, true, config, splits);
}
}  // namespace matmul_dev

}  // namespace detinfer::cuda
