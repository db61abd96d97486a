// matmul on Hopper (sm_90a): out[M,N] = a[M,K] · w[N,K]^T (+ bias[N]), bf16 in, fp32 accumulate.
// The kernel (wgmma.mma_async m64nBNk16 fed by the tensor copy engine, a producer warpgroup and 1
// or 2 consumer warpgroups) is matmul_sm90_kernel.cuh's template; this file instantiates the
// configurations production_config chooses, and owns the tensor maps and the choice.
//
// Invariant: each output element is chains(K) fp32 accumulators (1 or 2, a function of K alone);
// the k16 steps k = 0, 16, 32, ..., 64*ceil(K/64) - 16 go in ascending order, step k to chain
// (k / 16) % chains(K), each `D += A·B` (scale-d = 1, also for the first step, onto zeros);
// columns past K are zeros. Two chains are then added, chain 0 + chain 1, in fp32. The bias is
// added in fp32 after that and the value is rounded once. BM, BN, the pipeline depth, the staging
// of the stores and the order of the tiles over the persistent grid follow the shape and the
// device's SM count (production_config); none of them changes those chains.
// No split-K on the invariant path.
// Variant: the caller asks for `splits` K ranges (blockIdx.z), written to an fp32 workspace that
// matmul.cu adds up in split order: the small-batch split-K of ordinary libraries.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "matmul_sm90.cuh"
#include "matmul_sm90_kernel.cuh"

namespace detinfer::cuda::sm90 {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_function() {
  static std::once_flag once;
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static cudaError_t err = cudaSuccess;
  static cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSuccess;
  std::call_once(once, [] {
    void* p = nullptr;
    err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found);
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  });
  CUDA_CHECK(err);
  DI_CHECK(found == cudaDriverEntryPointSuccess && fn, "matmul: the CUDA driver has no cuTensorMapEncodeTiled (",
           static_cast<int>(found), "); a driver for CUDA 12 or newer is needed");
  return fn;
}

}  // namespace

// A [rows, K] bf16 row-major matrix, read (or written) in boxes of 64 columns x box_rows rows.
CUtensorMap tensor_map(const void* data, int rows, int K, int box_rows, const char* what) {
  CUtensorMap map;
  cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * 2};
  cuuint32_t box[2] = {kTileK, static_cast<cuuint32_t>(box_rows)};
  cuuint32_t element_strides[2] = {1, 1};
  CUresult r = encode_function()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(data), dims, strides, box,
                                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  DI_CHECK(r == CUDA_SUCCESS, "matmul: cuTensorMapEncodeTiled failed for ", what, " (CUresult ", static_cast<int>(r),
           ", rows ", rows, ", K ", K, ")");
  return map;
}

CUtensorMap tensor_map_tiles(const void* data, int rows, int K, int box_rows, int tiles, int halves, const char* what) {
  DI_CHECK(K % kTileK == 0 && (halves == 1 || (halves == 2 && rows % 2 == 0)), "matmul: ", what,
           " cannot be viewed as K tiles (rows ", rows, ", K ", K, ")");
  CUtensorMap map;
  const cuuint64_t row_bytes = static_cast<cuuint64_t>(K) * 2, k_tiles = static_cast<cuuint64_t>(K / kTileK);
  const cuuint64_t half_rows = static_cast<cuuint64_t>(rows / halves);
  // Innermost first: 64 columns (128 bytes), the rows, [the halves,] the K tiles 128 bytes apart.
  cuuint64_t dims3[3] = {kTileK, static_cast<cuuint64_t>(rows), k_tiles}, strides3[2] = {row_bytes, kRowBytes};
  cuuint64_t dims4[4] = {kTileK, half_rows, 2, k_tiles}, strides4[3] = {row_bytes, half_rows * row_bytes, kRowBytes};
  cuuint32_t box3[3] = {kTileK, static_cast<cuuint32_t>(box_rows), static_cast<cuuint32_t>(tiles)};
  cuuint32_t box4[4] = {kTileK, static_cast<cuuint32_t>(box_rows), 2, static_cast<cuuint32_t>(tiles)};
  cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const bool two = halves == 2;
  CUresult r = encode_function()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, two ? 4 : 3, const_cast<void*>(data),
                                 two ? dims4 : dims3, two ? strides4 : strides3, two ? box4 : box3, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  DI_CHECK(r == CUDA_SUCCESS, "matmul: cuTensorMapEncodeTiled failed for ", what, " as K tiles (CUresult ",
           static_cast<int>(r), ", rows ", rows, ", K ", K, ", tiles per copy ", tiles, ")");
  return map;
}

namespace {

// Idle warpgroups of the solo tiles: 7 warpgroups take 35,840 (at 40 registers a thread, the
// 64x8 kernels of one chain use 37) or 43,008 (48; two chains use 44) of an SM's 65,536, so two
// blocks never share an SM, and one still fits beside a 16,384-register block of another product.
constexpr int kSoloIdle = 5;

// The narrow compact-a tiles with 4 K tiles per copy, whose ring depth production_config compares
// with K.
using Narrow8 = Tiles<64, 8, 8, false, false, 8, 8, 4>;
using Narrow16 = Tiles<64, 16, 4, false, false, 8, 16, 4>;

// A table entry of tile T (Entry), with what norm_fuses needs to know of it.
template <typename T>
constexpr Entry entry(const char* name) {
  return {name, launch_tiles<T>, kNormTile<T> ? T::A_ROWS : 0, kNormTile<T> ? norm_fixed_bytes<T>() : 0};
}

// The configurations production_config chooses. They share the K chain, so they give the same
// bits; the development harness (csrc/dev/matmul.cu) times them beside the configurations it
// explores and checks that all give these bits.
const Entry kConfigs[] = {
    entry<Tiles<64, 32, 8>>("wg 64x32 s8"),
    entry<Tiles<64, 64, 8>>("wg 64x64 s8"),
    entry<Tiles<64, 128, 8>>("wg 64x128 s8"),
    entry<Tiles<128, 256, 4>>("wg 128x256 s4"),
    entry<Tiles<128, 256, 3, true>>("wg 128x256 s3 staged"),
    entry<Tiles<128, 128, 5, true>>("wg 128x128 s5 staged"),
    // Decode: compact a (M <= 8 or 16), narrow w tiles for many blocks, deep rings.
    entry<Tiles<64, 8, 32, false, false, 8, 8>>("wg 64x8 s32 a8"),
    entry<Tiles<64, 32, 16, false, false, 8, 8>>("wg 64x32 s16 a8"),
    entry<Tiles<64, 16, 16, false, false, 8, 16>>("wg 64x16 s16 a16"),
    entry<Tiles<64, 32, 16, false, false, 8, 16>>("wg 64x32 s16 a16"),
    // The same with 4 K tiles per copy (K a multiple of 256): a quarter of the copies, the same bytes in flight.
    entry<Narrow8>("wg 64x8 s8 a8 kt4"),
    entry<Tiles<64, 32, 4, false, false, 8, 8, 4>>("wg 64x32 s4 a8 kt4"),
    entry<Narrow16>("wg 64x16 s4 a16 kt4"),
    entry<Tiles<64, 32, 4, false, false, 8, 16, 4>>("wg 64x32 s4 a16 kt4"),
    // Batch-sized decode (M 17-64) at small N: the 64-row tiles with 4 K tiles per copy.
    entry<Tiles<64, 32, 4, false, false, 8, 64, 4>>("wg 64x32 s4 kt4"),
    entry<Tiles<64, 16, 5, false, false, 8, 64, 4>>("wg 64x16 s5 kt4"),
    // The narrow compact-a tiles with a ring of 12 stages (48 K tiles): the whole w of a block up
    // to K = 3072 requested before the kernels before it finish (pdl.cuh).
    entry<Tiles<64, 8, 12, false, false, 8, 8, 4>>("wg 64x8 s12 a8 kt4"),
    entry<Tiles<64, 16, 12, false, false, 8, 16, 4>>("wg 64x16 s12 a16 kt4"),
    // gate_up decode (M <= 8): 24 outputs a tile (gate_up_config).
    entry<Tiles<64, 48, 4, false, false, 8, 8, 4>>("wg 64x48 s4 a8 kt4"),
    // The narrow decode tiles with idle warpgroups: one block per SM (Tiles' IDLE).
    entry<Tiles<64, 8, 8, false, false, 8, 8, 4, kSoloIdle>>("wg 64x8 s8 a8 kt4 solo"),
    entry<Tiles<64, 8, 12, false, false, 8, 8, 4, kSoloIdle>>("wg 64x8 s12 a8 kt4 solo"),
    // Batch-sized decode (M 17-48) at small N: output tiles of 32 and 48 rows from a compact a.
    entry<Tiles<64, 32, 4, false, false, 8, 32, 4>>("wg 64x32 s4 a32 kt4"),
    entry<Tiles<64, 16, 5, false, false, 8, 32, 4>>("wg 64x16 s5 a32 kt4"),
    entry<Tiles<64, 32, 4, false, false, 8, 48, 4>>("wg 64x32 s4 a48 kt4"),
    entry<Tiles<64, 16, 5, false, false, 8, 48, 4>>("wg 64x16 s5 a48 kt4"),
};
constexpr int kConfigCount = sizeof(kConfigs) / sizeof(kConfigs[0]);
constexpr int k64x32 = 0, k64x64 = 1, k64x128 = 2, k128x256 = 3, k128x256_staged = 4, k128x128_staged = 5;
constexpr int k64x8_a8 = 6, k64x32_a8 = 7, k64x16_a16 = 8, k64x32_a16 = 9;
constexpr int kTiles4 = 4;  // k64x8_a8 + kTiles4: the same tile with 4 K tiles per copy
constexpr int k64x32_kt4 = 14, k64x16_kt4 = 15, k64x8_a8_deep = 16, k64x16_a16_deep = 17;
constexpr int k64x48_a8_kt4 = 18, k64x8_a8_kt4_solo = 19, k64x8_a8_deep_solo = 20;
constexpr int k64x32_a32_kt4 = 21, k64x16_a32_kt4 = 22, k64x32_a48_kt4 = 23, k64x16_a48_kt4 = 24;

// The current device is compute capability 9.0, the one the sm_90a code runs on.
bool hopper_device() {
  static std::once_flag once;
  static bool hopper = false;
  static cudaError_t err = cudaSuccess;
  std::call_once(once, [] {
    int device = 0, major = 0, minor = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    hopper = err == cudaSuccess && major == 9 && minor == 0;
  });
  CUDA_CHECK(err);
  return hopper;
}

int64_t tile_count(int64_t M, int64_t N, int64_t BM, int64_t BN) { return ((M + BM - 1) / BM) * ((N + BN - 1) / BN); }
}  // namespace

bool available() {
#if defined(DETINFER_HAVE_SM90A) && DETINFER_HAVE_SM90A
  return hopper_device();
#else
  return false;
#endif
}

int config_count() { return kConfigCount; }
const char* config_name(int config) { return kConfigs[config].name; }

// The largest tile that still gives every SM work. From the harness's sweep on an H200 (132 SMs)
// at N,K in {4096x4096, 12288x4096, 4096x12288, 151936x1024} and M in {1, 8, 32, 128, 512, 4096},
// this rule picks the fastest configuration at 22 of the 24 points and is within 2% at the other
// two. Decode streams w at about the same rate per block whatever the tile, so it wants enough
// blocks (about 0.7 per SM) and then the widest tile; prefill wants 128x256 once there are three
// waves of them. Staging the stores (bf16 out) pays off where the epilogue is a large share, that
// is with K up to 4096; with longer K a fourth stage is worth more.
int production_config(int64_t M, int64_t N, int64_t K) {
  const int64_t sms = cuda_runtime::multiprocessors();
  const auto fills = [&](int64_t BM, int64_t BN) { return 10 * tile_count(M, N, BM, BN) >= 7 * sms; };
  // Between one and two waves of 64x128 tiles (Qwen3-8B's gate|up, N 24576: 192 tiles on 132 SMs)
  // the second wave runs on a third of the SMs; the compact tiles spread the same bytes evenly,
  // and at M = 1 take the norm into their prologue. Back to back (dev_matmul bench OUT batch8b)
  // at M = 1 / 8 / 16: 52.9 / 54.0 / 55.0 -> 51.2 / 50.7 / 51.1 us; the replayed step of random
  // Qwen3-8B at 200 keys, batch 1 / 8 / 16: 5030.9 / 5330.4 / 5163.0 -> 4772.6 / 4847.2 / 4819.1 us.
  // On 132 SMs the rule covers N 16,897-33,791: Llama-3.1-8B's gate|up (28672) too, whose replayed
  // step at 200 keys, batch 1 / 8 / 16, went 4807.0 / 5179.6 / 4935.2 -> 4630.9 / 4795.0 / 4849.8 us;
  // the LM head of a 32,768-token vocabulary (Mistral-7B-v0.3, 256 tiles) cost its replayed step
  // 4.1 / 8.4 us at batch 1 / 16 against 64x128 there (0.1-0.2%), too little to move the bound for.
  const int64_t wide_tiles = tile_count(M, N, 64, 128);
  const bool ragged_waves = wide_tiles > sms && wide_tiles < 2 * sms;
  if (M <= 16 && (!fills(64, 128) || ragged_waves)) {
    // Decode (bench/matmul.mjs sweep, H200, N up to 6144 at K 1024-12288): compact a and a deep
    // ring, 32 columns wide once that still gives every SM a block, else 8 (16) for more blocks.
    // 5-12% faster back to back than 64x32 s8. With one K tile per copy the time per call grew
    // with K by about 170 ns per 64 columns whatever the tile: not the chain of k16 steps (a
    // dependent chain of m64n8k16 / m64n32k16 wgmmas takes 18 / 24 cycles a step on the H200,
    // about 40-50 ns per 64 columns) but the copy engine, whose cost is per copy (about 100 ns
    // per copy and block), a stage being one copy of a and one of w. So with K a multiple of
    // 256, 4 K tiles per copy: N = 1024, K = 3072 back to back 10.0 -> 6.1 us, the same bits.
    const int tiles4 = K % (4 * kTileK) == 0 ? kTiles4 : 0;
    if (fills(64, 32)) return (M <= 8 ? k64x32_a8 : k64x32_a16) + tiles4;
    // A K longer than the narrow tile's ring holds (32 or 16 K tiles) takes the 12-stage ring.
    const int ring_k = M <= 8 ? Narrow8::STAGES * Narrow8::KT * kTileK : Narrow16::STAGES * Narrow16::KT * kTileK;
    if (tiles4 && K > ring_k) return M <= 8 ? k64x8_a8_deep : k64x16_a16_deep;
    return (M <= 8 ? k64x8_a8 : k64x16_a16) + tiles4;
  }
  // At M 17-64 the same waves take 64x64 tiles (two waves and more: 384 for Qwen3-8B's gate|up)
  // where the second wave of 64x128 tiles is at most half full. Back to back (dev_matmul bench OUT
  // batch8b) at M = 24 / 32 / 48 / 64: 54.1 / 55.1 / 55.1 / 58.8 -> 53.4 / 53.8 / 54.5 / 55.1 us,
  // one call 66.7 / 66.9 / 62.9 / 63.1 -> 59.1 / 58.9 / 59.3 / 60.1; the replayed step of random
  // Qwen3-8B at 200 keys, batch 24 / 48 / 64: 5267.9 / 5546.1 / 5805.3 -> 5143.5 / 5469.3 / 5769.5
  // us. With a fuller second wave 64x128 stays ahead (dev_matmul bench OUT ragged, back to back at
  // M = 24 / 32 / 48 / 64, 64x64 against 64x128: Llama-3.1-8B's gate|up, 224 tiles, 67.2 / 67.8 /
  // 69.0 / 69.7 against 64.6 / 65.0 / 65.8 / 66.4 us; a 32,000-token LM head at K 4096, 250 tiles,
  // 69.3 at M = 24 against 66.7), and Llama-3.1-8B's replayed step at 200 keys, batch 24 / 48 / 64,
  // took 5190.9 / 5514.3 / 5774.7 us with 64x64 and 5000.8 / 5276.0 / 5528.6 without.
  if (M <= 64 && ragged_waves && 2 * wide_tiles <= 3 * sms) return k64x64;
  if (M > 128 && tile_count(M, N, 128, 256) >= 3 * sms) return K <= 4096 ? k128x256_staged : k128x256;
  if (M > 64 && fills(128, 128)) return k128x128_staged;
  if (fills(64, 128)) return k64x128;
  if (fills(64, 64)) return k64x64;
  // One tile of 64 rows (batch-sized decode) where N gives fewer than about one block per SM at
  // 64 columns: 4 K tiles per copy, 32 columns wide once that gives every SM a block, else 16.
  // Back to back on the H200 at M = 64 (dev_matmul bench decode): N = 1024, K = 3072 11.6 -> 6.8 us,
  // K = 2048 8.4 -> 5.5; N = 4096, K = 1024 6.4 -> 5.8, K = 4096 16.3 -> 13.5, K = 12288 42.0 -> 31.5.
  // The wider tiles (fills(64, 64) and up) gained nothing from it.
  // At M 17-32 the same widths take a compact a of 32 rows: the MMAs read the 64 rows of a stage
  // from its start, but a copy brings 32 rows instead of 64, and each block's reads of a from L2
  // are halved. Back to back on the H200 at M = 24 / 32 (dev_matmul bench OUT batch): N = 4096,
  // K = 1024 6.01 / 5.98 -> 5.56 / 5.60 us; N = 1024, K = 2048 5.59 / 5.42 -> 5.05 / 5.05; K = 3072
  // 7.74 / 7.07 -> 6.29 / 6.26. At 48 and 64 rows the 32-row tiles (two a tile) were slower. M 33-48
  // takes tiles of 48 rows: at M = 48 5.87 -> 5.75, 5.23 -> 5.17 and 6.53 -> 6.36 us, and the
  // replayed step of random Qwen3-0.6B at 200 keys, batch 48, 1365.7 -> 1347.4 us (32 rows: batch
  // 24 1209.5 -> 1192.0, 32 1249.3 -> 1221.1). The 8B-class o and down products gain more (dev_matmul
  // bench OUT batch8b, M = 24 / 32 / 48): N = 4096, K = 4096 17.1 / 16.1 / 13.9 -> 12.9 / 13.0 /
  // 13.3 us; K = 12288 51.9 / 49.0 / 34.5 -> 29.7 / 30.3 / 31.1 (a of exactly M rows there, so the
  // 64-row copies fill most rows with zeros; the model's a_readable_rows spares it that, hence the
  // smaller gain in the step); the replayed step of random Qwen3-8B at 200 keys, batch
  // 24 / 32 / 48: 5371.2 / 5447.4 / 5554.5 -> 5295.7 / 5355.4 / 5514.0 us.
  if (M <= 64 && K % (4 * kTileK) == 0) {
    const bool wide = fills(64, 32);
    if (M <= 32) return wide ? k64x32_a32_kt4 : k64x16_a32_kt4;
    if (M <= 48) return wide ? k64x32_a48_kt4 : k64x16_a48_kt4;
    return wide ? k64x32_kt4 : k64x16_kt4;
  }
  return k64x32;
}

// A gate_up product of M <= 8 rows whose 32-column tiles (16 outputs each) would be more than one
// per SM takes 48-column tiles (24 outputs each) where those are at most one per SM. Qwen3-0.6B's
// gate|up (N 6144, K 1024) on 132 SMs: 128 tiles instead of 192, so no SM holds two blocks, and
// the 120 KB block leaves room beside it for the down product's 104 KB block launched overlapped
// (pdl.cuh, whose launches ask for the largest shared-memory carveout so that the SM's split of
// L1 has that room). Replayed decode step on the H200: 1035 -> 1006 us at batch 8, about the same
// at 1-4 (measured before the carveout was asked for).
// At 9-16 rows (a 16-row a tile) the same change lost 1064 -> 1099 us at batch 16.
// The 12-stage rings are not taken for gate_up products (none of the models measured has one
// narrow enough): the 4-stage tile of 16 columns, whose gate_up kernel the tests run.
int gate_up_config(int config, int64_t M, int64_t N) {
  const int64_t sms = cuda_runtime::multiprocessors();
  if (config == k64x32_a8 + kTiles4 && tile_count(M, N, 64, 48) <= sms && tile_count(M, N, 64, 32) > sms)
    return k64x48_a8_kt4;
  if (config == k64x8_a8) return k64x16_a16;
  if (config == k64x8_a8 + kTiles4 || config == k64x8_a8_deep || config == k64x16_a16_deep) return k64x16_a16 + kTiles4;
  return config;
}

bool norm_fuses(int config, int64_t M, int64_t K) {
  if (config < 0 || config >= kConfigCount) return false;
  const Entry& e = kConfigs[config];
  return e.norm_a_rows > 0 && M == 1 && K > 0 && K % (4 * kTileK) == 0 && K <= kNormMaxK &&
         e.norm_fixed_bytes + (K / kTileK) * e.norm_a_rows * kRowBytes <= kMaxSmemBytes;
}

// Two chains for 2048 <= K < 4096 (Qwen3-0.6B's o_proj and down_proj, K 2048 and 3072). Replayed
// decode step on the H200, random Qwen3-0.6B at 200 keys, one chain -> two: batch 16 1091 ->
// 1066 us, 24 1299 -> 1290, 32 1375 -> 1370, 64 1560 -> 1533; batch 1-8 within 2 us (918 -> 920
// at batch 1): the products of 9-64 rows, whose 16- and 64-row tiles wait on the chain of wgmmas
// into one accumulator, overlap two. At batch 1 the chain is not what the product waits for (4
// chains did no better, nor did copying all of a at once). Not taken at K >= 4096 (every product
// of Qwen3-8B and Llama-3.1-8B), where two chains were not measured: the 128x256 tile that
// their prefill takes holds one chain's accumulators only, and their decode products stream
// several times more weight bytes per block than the chain takes.
int chains(int64_t K) { return K >= 2048 && K < 4096 ? 2 : 1; }

// The narrow decode tiles of 8 columns (o_proj and down_proj of the 0.6B shapes at 1-8 rows: 128
// blocks on 132 SMs) run as their solo forms (Tiles' IDLE), so that no SM holds two of their
// blocks. Launched overlapped (pdl.cuh), the plain forms' blocks did not spread: in every layer 4
// SMs held two of o_proj's and 4 two of down_proj's at batch 1, and at batch 8 o_proj's 128 blocks
// ran on 68 SMs; a doubled block ends 1.0-1.3 us after the median one (bench/step-stamps.mjs).
// H200, random Qwen3-0.6B, replayed decode step at 200 keys (bench/step-attribution.mjs, two
// rounds): batch 1 915.1 / 913.3 -> 889.3 / 889.9 us, batch 8 1003.6 / 1003.7 -> 990.3 / 990.6,
// 16 and 64 unchanged (1076, 1503: other tiles); step-stamps then counts no shared SM. The same
// kernels, so the same bits. DETINFER_SOLO=0 launches the plain forms, for measuring.
bool solo_tiles() {
  static const bool on = !switched_off("DETINFER_SOLO");
  return on;
}

void launch(const Problem& p, int config, cudaStream_t stream) {
  DI_CHECK(config >= 0 && config < kConfigCount, "matmul: no sm_90 configuration ", config);
  DI_CHECK(p.chains == 1 || p.chains == 2, "matmul: ", p.chains, " accumulator chains");
  // The 128x256 tiles cannot hold two chains' accumulators (kChainsFit): 128x128 does, the same bits.
  if (p.chains == 2 && (config == k128x256 || config == k128x256_staged)) config = k128x128_staged;
  // K, or the variant's splits, in parts that are not whole stages of 4 K tiles: a tile with a
  // copy per K tile (the same bits): the compact-a tile itself, or 64x32 for the 64-row tiles.
  if (config >= k64x8_a8 + kTiles4 && (p.K % (4 * kTileK) != 0 || p.k_per_split % (4 * kTileK) != 0))
    config = config == k64x8_a8_deep     ? k64x8_a8
             : config == k64x16_a16_deep ? k64x16_a16
             : config == k64x48_a8_kt4   ? k64x32_a8
             : config >= k64x32_kt4      ? k64x32
                                         : config - kTiles4;
  if (solo_tiles() && !p.gate_up) {
    if (config == k64x8_a8 + kTiles4) config = k64x8_a8_kt4_solo;
    if (config == k64x8_a8_deep) config = k64x8_a8_deep_solo;
  }
  kConfigs[config].launch(p, stream);
}

#if defined(DETINFER_STAMPS)
namespace stamps {
namespace {
std::mutex g_mutex;
unsigned long long* g_data = nullptr;
std::vector<Record> g_records(kLaunches);
long long g_next = 0;
}  // namespace

// Allocated at the first stamped launch, which is an eager one (a decode step runs eagerly before
// it is captured); kept for the process's life.
unsigned long long* device_data() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_data) {
    const size_t bytes = sizeof(unsigned long long) * kLaunches * kBlocks * kEvents;
    CUDA_CHECK(cudaMalloc(&g_data, bytes));
    CUDA_CHECK(cudaMemset(g_data, 0, bytes));
  }
  return g_data;
}

int record(const Problem& p, int bm, int bn, int stages, int a_rows, int kt, int tiles) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int slot = static_cast<int>(g_next % kLaunches);
  g_records[slot] = Record{g_next, p.M, p.N, p.K, bm, bn, stages, a_rows, kt, tiles, p.chains, p.gate_up,
                           p.norm.residual_in != nullptr};
  ++g_next;
  return slot;
}

void snapshot(std::vector<Record>& records, std::vector<unsigned long long>& data, long long& next) {
  unsigned long long* device = device_data();
  std::lock_guard<std::mutex> lock(g_mutex);
  CUDA_CHECK(cudaDeviceSynchronize());
  data.resize(static_cast<size_t>(kLaunches) * kBlocks * kEvents);
  CUDA_CHECK(cudaMemcpy(data.data(), device, data.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemset(device, 0, data.size() * sizeof(unsigned long long)));
  CUDA_CHECK(cudaDeviceSynchronize());
  records = g_records;
  next = g_next;
}
}  // namespace stamps
#endif

}  // namespace detinfer::cuda::sm90
