// Development harness: what bounds a decode-shaped product on Hopper (sm_90a builds on an sm_90
// GPU), measured apart from the matmul kernel.
//   build/dev/dev_copy_engine chain    cycles per step of a dependent chain of wgmma k16 steps into
//                                      one accumulator (data in shared memory, no copies), by N,
//                                      steps per commit group and wait depth, and two independent
//                                      chains against one
//   build/dev/dev_copy_engine stream   one block per 8 (32) rows of w [1024, K] bf16 streams its rows
//                                      through a ring of stages with the tensor copy engine, one
//                                      thread copying and one warp releasing each stage as it lands
//                                      (no math), with or without the matmul's 8-row tile of a, 1 to
//                                      8 K tiles of 64 columns per copy; the time at K = 512, 1536 and
//                                      3072 and its slope per K tile, weights rotated through more
//                                      than L2
//   build/dev/dev_copy_engine boxes    the copy engine streaming boxes of 128 bytes by 8-64 rows, one
//                                      per K tile, at 1, 2 and 4 blocks per SM, or 2-8 copying threads
//                                      in one block, 64 or 128 KB in flight per SM: GB/s against a
//                                      device copy
// Findings on the H200 (docs/performance.md, "Four K tiles per copy"): the chain costs 18 (N = 8)
// to 24 (N = 32) cycles a step, and two chains twice that; the stream's slope is about 100 ns per
// K tile with one copy per tile and 33-50 ns with 4 to 8 tiles per copy, the same bytes in flight.
// Boxes ("The copy engine's rate is per copying thread"): one copying thread issues a 1-2 KB box
// about every 90-110 ns, and eight lanes of one warp together one about every 67 ns, so 1-2 KB
// boxes need 2-4 copying threads per SM (blocks, or lanes of a warp) and 128 KB in flight to
// stream at 84-100% of a device copy, where 4-8 KB boxes need one thread.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "dev/harness.cuh"
#include "kernels/matmul_sm90_kernel.cuh"
#include "kernels/ptx.cuh"
#include "kernels/wgmma_bf16.cuh"

using namespace detinfer;
using namespace detinfer::cuda;
using namespace detinfer::cuda::sm90;

namespace {

// Writes 1 only where the build holds sm_90a code for this GPU; the kernels below are empty elsewhere.
__global__ void probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#endif
}

bool have_sm90a() {
  int* flag;
  int host = 0;
  CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
  CUDA_CHECK(cudaMemset(flag, 0, sizeof(int)));
  probe_kernel<<<1, 1, 0, dev::stream()>>>(flag);
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaMemcpyAsync(&host, flag, sizeof(int), cudaMemcpyDeviceToHost, dev::stream()));
  CUDA_CHECK(cudaStreamSynchronize(dev::stream()));
  cudaFree(flag);
  return host == 1;
}

// ---- chain ------------------------------------------------------------------------------------

constexpr int kChainSteps = 1024;

// One warpgroup, both operands in shared memory (64 rows of a, BN rows of w, one 64-column swizzled
// tile each): CHAINS accumulators each take kChainSteps k16 steps, PER_GROUP per commit group,
// waiting until at most WAIT groups are in flight after each.
template <int BN, int PER_GROUP, int WAIT, int CHAINS>
__global__ void __launch_bounds__(128) chain_kernel(long long* cycles, float* sink) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem[];
  const uint32_t base = (ptx::smem_addr(smem) + 1023) & ~1023u;
  unsigned char* p = smem + (base - ptx::smem_addr(smem));
  for (int i = threadIdx.x; i < (64 + BN) * 128 / 4; i += 128)
    reinterpret_cast<uint32_t*>(p)[i] = 0x3c003c00u ^ ((i * 2654435761u) & 0x00ff00ffu);  // small bf16 pairs
  ptx::fence_proxy_async_smem();
  __syncthreads();
  const uint64_t da = ptx::smem_desc(base), dw = ptx::smem_desc(base + 64 * 128);
  float acc[CHAINS][BN / 2];
  for (int c = 0; c < CHAINS; ++c)
    for (int i = 0; i < BN / 2; ++i) acc[c][i] = 0.f;
  const long long t0 = clock64();
  for (int s = 0; s < kChainSteps; s += PER_GROUP) {
    ptx::wgmma_fence();
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) ptx::fence_registers(acc[c]);
#pragma unroll
    for (int g = 0; g < PER_GROUP; ++g)
#pragma unroll
      for (int c = 0; c < CHAINS; ++c) Wgmma<BN>::mma(acc[c], da + 2 * (g % 4), dw + 2 * (g % 4));
    ptx::wgmma_commit();
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) ptx::fence_registers(acc[c]);
    ptx::wgmma_wait<WAIT>();
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) ptx::fence_registers(acc[c]);
  }
  ptx::wgmma_wait<0>();
  for (int c = 0; c < CHAINS; ++c) ptx::fence_registers(acc[c]);
  const long long t1 = clock64();
  float total = 0.f;
  for (int c = 0; c < CHAINS; ++c)
    for (int i = 0; i < BN / 2; ++i) total += acc[c][i];
  sink[threadIdx.x] = total;
  if (threadIdx.x == 0) *cycles = t1 - t0;
#endif
}

template <int BN, int PER_GROUP, int WAIT, int CHAINS>
void chain(const char* note) {
  long long* cycles;
  float* sink;
  CUDA_CHECK(cudaMalloc(&cycles, sizeof(long long)));
  CUDA_CHECK(cudaMalloc(&sink, 128 * sizeof(float)));
  const int smem = (64 + BN) * 128 + 1024;
  auto kernel = chain_kernel<BN, PER_GROUP, WAIT, CHAINS>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  long long best = -1;
  for (int r = 0; r < 5; ++r) {
    kernel<<<1, 128, smem, dev::stream()>>>(cycles, sink);
    CUDA_CHECK(cudaGetLastError());
    long long c = 0;
    CUDA_CHECK(cudaMemcpyAsync(&c, cycles, sizeof c, cudaMemcpyDeviceToHost, dev::stream()));
    CUDA_CHECK(cudaStreamSynchronize(dev::stream()));
    if (best < 0 || c < best) best = c;
  }
  std::printf("m64n%-3d k16  %2d steps per group, wait<%d>, %d chain%s: %6.1f cycles per step of a chain  %s\n", BN,
              PER_GROUP, WAIT, CHAINS, CHAINS > 1 ? "s" : " ", double(best) / kChainSteps, note);
  cudaFree(cycles);
  cudaFree(sink);
}

void chains() {
  chain<8, 4, 1, 1>("(the decode kernel's grouping)");
  chain<8, 4, 0, 1>("");
  chain<8, 16, 1, 1>("");
  chain<8, 4, 1, 2>("(independent chains)");
  chain<32, 4, 1, 1>("(the decode kernel's grouping)");
  chain<32, 4, 0, 1>("");
  chain<32, 16, 1, 1>("");
  chain<32, 4, 1, 2>("(independent chains)");
  chain<64, 4, 1, 1>("");
  chain<128, 4, 1, 1>("");
  chain<256, 4, 1, 1>("");
}

// ---- stream -----------------------------------------------------------------------------------

constexpr int kN = 1024, kK = 3072;
constexpr int kCopies = 12;  // 12 x 6 MiB of weights rotated: more than L2

// [rows, kK] bf16 in boxes of box_rows rows, with the matmul's own tensor maps: one 64-column K
// tile per copy (2-D), or `tiles` per copy (the 3-D view of tensor_map_tiles).
CUtensorMap map_of(void* data, int rows, int box_rows, int tiles) {
  return tiles == 1 ? tensor_map(data, rows, kK, box_rows, "w")
                    : tensor_map_tiles(data, rows, kK, box_rows, tiles, 1, "w");
}

template <int BN, int TILES, bool WITH_A>
struct StreamTiles {
  static constexpr int W_BYTES = TILES * BN * 128, A_BYTES = WITH_A ? TILES * 8 * 128 : 0;
  static constexpr int STAGE = A_BYTES + W_BYTES;
  static constexpr int STAGES = 64 * 1024 / STAGE < 32 ? 64 * 1024 / STAGE : 32;  // 64 KiB in flight
  static constexpr int SMEM = STAGES * STAGE + 1024;
};

template <int BN, int TILES, bool WITH_A>
__global__ void __launch_bounds__(160) stream_kernel(const __grid_constant__ CUtensorMap map_w,
                                                     const __grid_constant__ CUtensorMap map_a, int k_tiles) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = StreamTiles<BN, TILES, WITH_A>;
  extern __shared__ unsigned char smem[];
  __shared__ __align__(8) uint64_t full[T::STAGES], empty[T::STAGES];
  const uint32_t ring = (ptx::smem_addr(smem) + 1023) & ~1023u;
  const int n0 = blockIdx.x * BN, stages = k_tiles / TILES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < T::STAGES; ++s) {
      ptx::mbar_init(ptx::smem_addr(&full[s]), 1);
      ptx::mbar_init(ptx::smem_addr(&empty[s]), 1);
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 128) {  // the copying thread
    for (int it = 0; it < stages; ++it) {
      const int s = it % T::STAGES;
      if (it >= T::STAGES) ptx::mbar_wait(ptx::smem_addr(&empty[s]), ((it / T::STAGES) - 1) & 1);
      const uint32_t bar = ptx::smem_addr(&full[s]), stage = ring + s * T::STAGE;
      ptx::mbar_expect_tx(bar, T::STAGE);
      if (TILES == 1) ptx::tma_load(stage + T::A_BYTES, &map_w, it * 64, n0, bar);
      else ptx::tma_load_3d(stage + T::A_BYTES, &map_w, 0, n0, it * TILES, bar);
      if (WITH_A) {
        if (TILES == 1) ptx::tma_load(stage, &map_a, it * 64, 0, bar);
        else ptx::tma_load_3d(stage, &map_a, 0, 0, it * TILES, bar);
      }
    }
  } else if (threadIdx.x == 0) {  // the releasing thread
    for (int it = 0; it < stages; ++it) {
      const int s = it % T::STAGES;
      ptx::mbar_wait(ptx::smem_addr(&full[s]), (it / T::STAGES) & 1);
      ptx::mbar_arrive(ptx::smem_addr(&empty[s]));
    }
  }
#endif
}

template <int BN, int TILES, bool WITH_A>
void stream(std::vector<Tensor>& weights, Tensor& a) {
  using T = StreamTiles<BN, TILES, WITH_A>;
  std::vector<CUtensorMap> maps;
  for (Tensor& w : weights) maps.push_back(map_of(w.data(), kN, BN, TILES));
  const CUtensorMap map_a = map_of(a.data(), 8, 8, TILES);
  auto kernel = stream_kernel<BN, TILES, WITH_A>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::SMEM));
  const int k_tiles[3] = {8, 24, 48};
  double us[3];
  for (int q = 0; q < 3; ++q)
    us[q] = dev::median_us(
        [&](int i) {
          kernel<<<kN / BN, 160, T::SMEM, dev::stream()>>>(maps[i % maps.size()], map_a, k_tiles[q]);
          CUDA_CHECK(cudaGetLastError());
        },
        50);
  std::printf("w %2d rows per block, %d K tile%s per copy, a %-3s (%2d stages, %3d blocks): K 512 / 1536 / 3072 "
              "%6.2f %6.2f %6.2f us, slope %4.0f ns per K tile\n",
              BN, TILES, TILES > 1 ? "s" : " ", WITH_A ? "yes" : "no", T::STAGES, kN / BN, us[0], us[1], us[2],
              (us[2] - us[0]) * 1e3 / (k_tiles[2] - k_tiles[0]));
}

void streams() {
  std::vector<Tensor> weights;
  const std::vector<uint16_t> values = dev::random_bf16(size_t{kN} * kK, 7, -1.f, 1.f);
  for (int c = 0; c < kCopies; ++c) weights.push_back(dev::upload(Device::CUDA, DType::BF16, {kN, kK}, values.data()));
  Tensor a = dev::upload(Device::CUDA, DType::BF16, {8, kK}, values.data());
  stream<8, 1, false>(weights, a);
  stream<8, 1, true>(weights, a);
  stream<8, 2, true>(weights, a);
  stream<8, 4, true>(weights, a);
  stream<8, 8, true>(weights, a);
  stream<32, 1, true>(weights, a);
  stream<32, 4, true>(weights, a);
}

// ---- boxes ------------------------------------------------------------------------------------

// The copy engine streaming boxes of 64 columns (128 bytes) by box_rows rows, by the box's rows
// and by blocks per SM: whether it can feed attention over a paged cache, whose pages give boxes
// of 8-16 rows per kv head (a 16-slot page of one head's K is 16 rows of 256 bytes, two boxes),
// where the weight products copy 8-64 rows by 4 K tiles. Each of a block's `issuers` copying
// threads (lanes of warp 4) streams its own box_rows rows of a tall [rows, 3072] bf16 matrix, one
// box per K tile, through its share of a ring of `stages` boxes, released by a thread of warp 0 as
// each lands (no math); the blocks of a launch start at a row that moves from launch to launch, so
// that a launch reads what L2 no longer holds.
constexpr int kBoxMaxStages = 64;
constexpr int64_t kBoxRows = 34816;  // 528 blocks of 64 rows, and a little more

__global__ void __launch_bounds__(160) box_kernel(const __grid_constant__ CUtensorMap map, int box_rows, int stages,
                                                  int issuers, int k_tiles, int row0) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem[];
  __shared__ __align__(8) uint64_t full[kBoxMaxStages], empty[kBoxMaxStages];
  const uint32_t ring = (ptx::smem_addr(smem) + 1023) & ~1023u, box = box_rows * 128;
  const int per = stages / issuers;  // stages of each issuer's share of the ring
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      ptx::mbar_init(ptx::smem_addr(&full[s]), 1);
      ptx::mbar_init(ptx::smem_addr(&empty[s]), 1);
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  // Issuer p (thread 128 + p) copies rows [row, row + box_rows) of band p of the block; thread p
  // releases its stages.
  const int p = threadIdx.x >= 128 ? threadIdx.x - 128 : threadIdx.x;
  if (p >= issuers) return;
  const int row = row0 + (blockIdx.x * issuers + p) * box_rows, first = p * per;
  if (threadIdx.x >= 128) {  // a copying thread
    for (int it = 0; it < k_tiles; ++it) {
      const int s = first + it % per;
      if (it >= per) ptx::mbar_wait(ptx::smem_addr(&empty[s]), ((it / per) - 1) & 1);
      const uint32_t bar = ptx::smem_addr(&full[s]);
      ptx::mbar_expect_tx(bar, box);
      ptx::tma_load(ring + s * box, &map, it * 64, row, bar);
    }
  } else {  // a releasing thread
    for (int it = 0; it < k_tiles; ++it) {
      const int s = first + it % per;
      ptx::mbar_wait(ptx::smem_addr(&full[s]), (it / per) & 1);
      ptx::mbar_arrive(ptx::smem_addr(&empty[s]));
    }
  }
#endif
}

void boxes() {
  const int sms = cuda_runtime::multiprocessors();
  std::vector<Tensor> copies;
  const std::vector<uint16_t> values = dev::random_bf16(size_t{kBoxRows} * kK, 11, -1.f, 1.f);
  for (int c = 0; c < 2; ++c) copies.push_back(dev::upload(Device::CUDA, DType::BF16, {kBoxRows, kK}, values.data()));
  const double copy = dev::copy_gbs(size_t{1} << 30);
  std::printf("copy %.0f GB/s; boxes of 64 columns x R rows, one per K tile, %d SMs\n", copy, sms);
  std::printf(" rows  box KB  blocks/SM  issuers  KB in flight/SM  stages   K 512 us  K 3072 us   GB/s  of copy\n");
  auto kernel = box_kernel;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  std::set<std::tuple<int, int, int, int>> done;  // a ring capped at kBoxMaxStages runs once
  auto run = [&](int rows, int per_sm, int issuers, int flight_kb) {
    const int box = rows * 128;
    const int stages = std::min(kBoxMaxStages, flight_kb * 1024 / per_sm / box) / issuers * issuers;
    const int smem = stages * box + 1024;
    if (stages < 2 * issuers || smem * per_sm > 220 * 1024) return;
    if (!done.insert({rows, per_sm, issuers, stages}).second) return;
    const int blocks = sms * per_sm;
    const int64_t span = int64_t{blocks} * issuers * rows, places = kBoxRows / span;
    if (places < 1) return;
    std::vector<CUtensorMap> maps;
    for (Tensor& t : copies) maps.push_back(tensor_map(t.data(), static_cast<int>(kBoxRows), kK, rows, "boxes"));
    double us[2];
    const int k_tiles[2] = {8, 48};
    for (int q = 0; q < 2; ++q)
      us[q] = dev::median_us(
          [&](int i) {
            const int row0 = static_cast<int>((i % places) * span);
            kernel<<<blocks, 160, smem, dev::stream()>>>(maps[i % maps.size()], rows, stages, issuers, k_tiles[q], row0);
            CUDA_CHECK(cudaGetLastError());
          },
          40);
    const double bytes = double(blocks) * issuers * box * (k_tiles[1] - k_tiles[0]);
    const double gbs = bytes / ((us[1] - us[0]) * 1e3);
    std::printf("%5d %7.0f %10d %8d %16d %7d %10.2f %10.2f %6.0f %7.0f%%\n", rows, box / 1024.0, per_sm, issuers,
                stages * box * per_sm / 1024, stages, us[0], us[1], gbs, 100 * gbs / copy);
  };
  for (int rows : {8, 16, 32, 64})
    for (int per_sm : {1, 2, 4})
      for (int flight_kb : {64, 128}) run(rows, per_sm, 1, flight_kb);
  // Several copying threads in one block, each with its own rows and share of the ring.
  for (int rows : {8, 16})
    for (int issuers : {2, 4, 8})
      for (int flight_kb : {64, 128}) run(rows, 1, issuers, flight_kb);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    cuda_runtime::require();
    int device = 0, major = 0, minor = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    if (major != 9 || minor != 0 || !have_sm90a()) {
      std::fprintf(stderr, "dev_copy_engine: needs an sm_90 GPU and a build with sm_90a code (this GPU is sm_%d%d)\n",
                   major, minor);
      return 2;
    }
    const std::string mode = argc > 1 ? argv[1] : "all";
    if (mode == "chain" || mode == "all") chains();
    if (mode == "stream" || mode == "all") streams();
    if (mode == "boxes" || mode == "all") boxes();
    if (mode != "chain" && mode != "stream" && mode != "boxes" && mode != "all") {
      std::fprintf(stderr, "usage: dev_copy_engine [chain | stream | boxes]\n");
      return 2;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dev_copy_engine: %s\n", e.what());
    return 1;
  }
}
