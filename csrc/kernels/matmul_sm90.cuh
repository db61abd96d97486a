// The Hopper (sm_90a) matmul, as matmul.cu sees it: the production configurations and one launch.
// matmul.cu chooses this family for every M when the device is compute capability 9.0 and the
// build holds sm_90a code; elsewhere it uses its mma.sync kernels. The invariant is stated in
// matmul_sm90.cu; the kernel template is matmul_sm90_kernel.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace detinfer::cuda::sm90 {

// A product's one row (M = 1) computed in its prologue instead of read from a: the row =
// residual_in (+ x, the sum rounded to bf16 and written to residual_out by block 0), then RMSNorm
// with weight [K] and eps, as the rmsnorm kernels compute it (rmsnorm_row.cuh), into the block's
// shared memory.
struct NormPrologue {
  const void* residual_in = nullptr;  // [M,K] bf16; null: no prologue, a is read as given
  const void* x = nullptr;            // [M,K] bf16 or null
  void* residual_out = nullptr;       // [M,K] bf16, not residual_in (with x only)
  const void* weight = nullptr;       // [K] bf16
  float eps = 0.f;
};

struct Problem {
  const void* a;      // [M,K] bf16, rows K apart, 16-byte aligned
  const void* w;      // [N,K] bf16
  const void* bias;   // [N] bf16 or null (always null for a split's partial sums)
  void* out;          // [M,N] bf16/f32, or the f32 workspace [splits,M,N] of a split
  bool out_f32;
  int M, N, K;
  int k_per_split;    // a multiple of 64; K on the invariant path
  int splits;         // 1 on the invariant path
  // w holds N/2 gate rows then N/2 up rows, and out [M, N/2] bf16 gets
  // silu_mul_value(bf16(gate), bf16(up)) of each pair (splits 1, bf16 out, N even).
  bool gate_up = false;
  NormPrologue norm{};  // with norm.residual_in, a is not read (norm_fuses must have said yes)
  // Accumulators per output element (1 or 2): the k16 step at column k goes to chain
  // (k / 16) % chains, and two chains are added at the end, chain 0 + chain 1. `chains(K)` on
  // the invariant path (the partitioned products of tensor parallelism keep 1).
  int chains = 1;
  // Rows of a that may be read from `a` (M or more; 0: M): a copy of a's rows past M takes them
  // from memory, up to this, instead of as the copy engine's zeros. Whatever they hold feeds only
  // output rows past M, which are never stored.
  int64_t a_readable_rows = 0;
};

#if defined(DETINFER_STAMPS)
// Development (DETINFER_STAMPS builds): per-block timestamps of the sm_90 matmul launches
// (matmul_sm90_kernel.cuh says which), and what each launch was.
namespace stamps {
struct Record {
  long long seq = -1;
  int M = 0, N = 0, K = 0, bm = 0, bn = 0, stages = 0, a_rows = 0, kt = 0, tiles = 0, chains = 0;
  bool gate_up = false, norm = false;
};
// The records by slot (seq -1: a slot not used yet), the stamps [slots][blocks][events], and the
// next launch's sequence number; the device's stamps are cleared after the copy.
void snapshot(std::vector<Record>& records, std::vector<unsigned long long>& data, long long& next);
}  // namespace stamps
#endif

// True when this build has sm_90a code and device 0 can run it.
bool available();
// The configurations production_config can return (the library instantiates no others).
int config_count();
const char* config_name(int config);
// The configuration production uses for M rows of an [N, K] weight. Tiles may follow M; the K
// chain (k16 steps, ascending, one accumulator) never does.
int production_config(int64_t M, int64_t N, int64_t K);
// The configuration of a gate_up product of M rows of an [N, K] w whose plain product would run
// `config`: the same, one whose w tile is wide enough for a gate half and an up half of 8 rows or
// more, or at M <= 8 a wider one that gives every SM at most one tile.
int gate_up_config(int config, int64_t M, int64_t N);
// The accumulator chains of every product with K columns: a function of K alone, never of M or N
// (so fused and separate products of the same K agree, and every M gives the same bits).
int chains(int64_t K);
// Launches `config`, or, where its accumulators for p.chains would not fit, the nearest tile whose
// do (the same bits: the chains, not the tile, fix them).
void launch(const Problem& p, int config, cudaStream_t stream);
// True when `config` computes a NormPrologue of M rows with K columns: one row, a compact-a tile
// with 4 K tiles per copy, K a multiple of 256 up to 4096 that the block's shared memory holds.
bool norm_fuses(int config, int64_t M, int64_t K);

}  // namespace detinfer::cuda::sm90
