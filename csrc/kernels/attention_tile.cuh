// The arithmetic of attention, shared by the decode and the prefill kernels (attention.cu), so that
// both compute a query's output with the same instructions in the same order.
//
// One warp owns a tile of 16 query rows (mma.sync m16n8k16, bf16 in, fp32 accumulate):
//   S[16, kKeyBlock] = Q[16, D] · K[kKeyBlock, D]^T     k-steps of 16 dims in ascending order
//   online softmax in fp32 over S (raw scores; scale folded into exp2: p = 2^(fma(s, c, −m·c)), exp2_ftz)
//   O[16, D] += bf16(P)[16, kKeyBlock] · V[kKeyBlock, D] k-steps of 16 keys in ascending order
// A row's result depends only on its own Q row, the keys and its key limit: which other rows share
// the tile (heads of a GQA group in decode, neighbouring positions in prefill) never matters.
// Lane l holds rows g = l/4 and g+8 and, of each 8-column accumulator tile, columns 2·(l%4)+{0,1}.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "../common/attention_schedule.h"
#include "ptx.cuh"

namespace detinfer::cuda::attn {

using bf16 = __nv_bfloat16;

constexpr int kTileRows = 16;
constexpr int kKeyBlock = attention_schedule::kKeyBlock;
static_assert(kKeyBlock % 16 == 0, "a key block is a whole number of mma k-steps");

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles: [rows][D] bf16; the 16-byte chunk c of row r is stored at chunk c ^ (r % 8)
// so that ldmatrix reads of 8 rows at one column hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// The layout of the Hopper prefill (attention_wgmma.cuh), the one wgmma reads with 128-byte swizzle
// descriptors: a [kRows][D] tile as D/64 slabs of [kRows][64], every row 128 bytes, chunk c of
// row r at chunk c ^ (r % 8) of its slab (the same swizzle as tile_offset; at D = 64 the same
// layout). Slabs start 1024-byte aligned when the tile does.
template <int D, int kRows>
__device__ __forceinline__ int slab_offset(int row, int chunk) {
  return (chunk >> 3) * (kRows * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

// Every CUDA attention kernel takes its exponentials from ptx::exp2_ftz, so each gives the
// others' bits; a p or weight below 2^-126 (beside the row's max of 2^0) is 0.
using ptx::exp2_ftz;

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------------------------------------
// The running state of one split for the warp's 16 rows (the fields of this lane's two rows).
template <int D>
struct SplitAccum {
  float o[D / 8][4];  // unnormalized output, accumulator layout: [d tile][row g: 0,1 | row g+8: 2,3]
  float m[2];         // running max of the raw scores
  float l[2];         // this lane's share of the running sum; the whole row's after finish_split
};

template <int D>
__device__ __forceinline__ void split_init(SplitAccum<D>& acc) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc.o[i][e] = 0.f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    acc.m[r] = -INFINITY;
    acc.l[r] = 0.f;
  }
}

// The exp2 offset of a row whose max is m: m·c, or 0 while the row has seen no key (m = −∞), so that
// an empty row gives p = 2^(−∞) = 0 and never −∞ − (−∞).
__device__ __forceinline__ float scaled_max(float m, float scale_log2) {
  return (m == -INFINITY ? 0.f : m) * scale_log2;
}

// o · alpha per row; skipped when every alpha of the warp is 1 (no row's max moved), as x · 1 = x
// exactly.
template <int D>
__device__ __forceinline__ void rescale_output(SplitAccum<D>& acc, const float alpha[2]) {
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        acc.o[i][2 * r] = acc.o[i][2 * r] * alpha[r];
        acc.o[i][2 * r + 1] = acc.o[i][2 * r + 1] * alpha[r];
      }
  }
}

// One online-softmax step over a key block's raw scores s [16 rows][kKeyBlock keys] (accumulator
// layout), for block_scores here and the Hopper prefill (attention.cu): masks keys at or past
// each row's limit, updates m, rescales o and l, adds the block's p to l and returns bf16(p) as
// the A fragments of the P·V k-steps. kRescaleO = false leaves o · alpha to the caller
// (rescale_output with the alphas returned), which first finishes the previous block's P·V into o.
template <int D, bool kRescaleO = true>
__device__ __forceinline__ void softmax_block(SplitAccum<D>& acc, float (&s)[kKeyBlock / 8][4],
                                              uint32_t p[kKeyBlock / 16][4], int key0, const int limit[2],
                                              float scale_log2, float* alpha_out = nullptr) {
  const int lane = threadIdx.x & 31;
  // Mask keys at or past each row's limit; a block wholly below both limits has nothing to mask.
  if (key0 + kKeyBlock > min(limit[0], limit[1])) {
    const int col = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < kKeyBlock / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (key0 + j * 8 + col + (e & 1) >= limit[e >> 1]) s[j][e] = -INFINITY;
  }
  float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kKeyBlock / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) block_max[e >> 1] = fmaxf(block_max[e >> 1], s[j][e]);

  float offset[2], alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 1));
    block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 2));
    const float m_new = fmaxf(acc.m[r], block_max[r]);
    offset[r] = scaled_max(m_new, scale_log2);
    alpha[r] = exp2_ftz(acc.m[r] * scale_log2 - offset[r]);
    acc.m[r] = m_new;
    acc.l[r] = acc.l[r] * alpha[r];
  }
  if constexpr (kRescaleO) {
    rescale_output(acc, alpha);
  } else {
    alpha_out[0] = alpha[0];
    alpha_out[1] = alpha[1];
  }

#pragma unroll
  for (int j = 0; j < kKeyBlock / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      // One explicit fma (s·c − m·c): --fmad=false forbids only contractions the compiler chooses.
      const float pe = exp2_ftz(__fmaf_rn(s[j][e], scale_log2, -offset[e >> 1]));
      acc.l[e >> 1] = acc.l[e >> 1] + pe;
      s[j][e] = pe;
    }

#pragma unroll
  for (int i = 0; i < kKeyBlock / 16; ++i) {
    p[i][0] = pack_bf16(s[2 * i][0], s[2 * i][1]);
    p[i][1] = pack_bf16(s[2 * i][2], s[2 * i][3]);
    p[i][2] = pack_bf16(s[2 * i + 1][0], s[2 * i + 1][1]);
    p[i][3] = pack_bf16(s[2 * i + 1][2], s[2 * i + 1][3]);
  }
}

// Scores of the tile's 16 rows against the key block in k_tile (keys key0 .. key0+kKeyBlock-1),
// masked to keys < limit[row], then one online-softmax step: updates m, rescales o and l, adds the
// block's p to l and returns bf16(p) as mma A fragments for accumulate_values.
//   q_tile [16][D], k_tile [kKeyBlock][D]: shared, swizzled (tile_offset)
template <int D>
__device__ __forceinline__ void block_scores(SplitAccum<D>& acc, uint32_t p[kKeyBlock / 16][4], const bf16* q_tile,
                                             const bf16* k_tile, int key0, const int limit[2], float scale_log2) {
  const int lane = threadIdx.x & 31;
  float s[kKeyBlock / 8][4];
#pragma unroll
  for (int j = 0; j < kKeyBlock / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;

#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ptx::ldmatrix_x4(a, ptx::smem_addr(q_tile + tile_offset<D>(lane & 15, kk * 2 + (lane >> 4))));
#pragma unroll
    for (int j = 0; j < kKeyBlock / 16; ++j) {
      uint32_t b[4];
      ptx::ldmatrix_x4(b, ptx::smem_addr(k_tile + tile_offset<D>(j * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                                  kk * 2 + ((lane >> 3) & 1))));
      ptx::mma_bf16_16816(s[2 * j], a, b[0], b[1]);
      ptx::mma_bf16_16816(s[2 * j + 1], a, b[2], b[3]);
    }
  }

  softmax_block<D>(acc, s, p, key0, limit, scale_log2);
}

// o += bf16(p) · V for the key block in v_tile [kKeyBlock][D] (shared, swizzled).
template <int D>
__device__ __forceinline__ void accumulate_values(SplitAccum<D>& acc, const uint32_t p[kKeyBlock / 16][4],
                                                  const bf16* v_tile) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < kKeyBlock / 16; ++i)
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t b[4];
      ptx::ldmatrix_x4_trans(
          b, ptx::smem_addr(v_tile + tile_offset<D>(i * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dn * 2 + (lane >> 4))));
      ptx::mma_bf16_16816(acc.o[2 * dn], p[i], b[0], b[1]);
      ptx::mma_bf16_16816(acc.o[2 * dn + 1], p[i], b[2], b[3]);
    }
}

// Ends a split: each lane's share of l becomes the row's sum (fixed order: xor 1, then xor 2).
template <int D>
__device__ __forceinline__ void finish_split(SplitAccum<D>& acc) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    acc.l[r] = acc.l[r] + __shfl_xor_sync(0xffffffffu, acc.l[r], 1);
    acc.l[r] = acc.l[r] + __shfl_xor_sync(0xffffffffu, acc.l[r], 2);
  }
}

// ---------------------------------------------------------------------------------------------
// Combining split partials, in ascending split order, one scalar at a time. The prefill kernel
// applies it to registers, the decode combine kernel to the partials in its workspace; both call
// exactly these two functions. An empty split (m = −∞, l = 0, o = 0) leaves the total unchanged.
struct MergeWeights {
  float total;  // weight of the running total
  float part;   // weight of the split being merged
  float m;      // the new running max
};

__device__ __forceinline__ MergeWeights merge_weights(float m_total, float m_part, float scale_log2) {
  const float m = fmaxf(m_total, m_part);
  const float offset = scaled_max(m, scale_log2);
  return {exp2_ftz(m_total * scale_log2 - offset), exp2_ftz(m_part * scale_log2 - offset), m};
}

__device__ __forceinline__ float merge_value(float total, float part, const MergeWeights& w) {
  return total * w.total + part * w.part;
}

// total <- total ⊕ part for the warp's rows, the part's values read through part_m(r), part_l(r)
// and part_o(i, e) (SplitAccum's layout) wherever they are held.
template <int D, typename M, typename L, typename O>
__device__ __forceinline__ void merge_split_from(SplitAccum<D>& total, M part_m, L part_l, O part_o, float scale_log2) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const MergeWeights w = merge_weights(total.m[r], part_m(r), scale_log2);
    total.m[r] = w.m;
    total.l[r] = merge_value(total.l[r], part_l(r), w);
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      total.o[i][2 * r] = merge_value(total.o[i][2 * r], part_o(i, 2 * r), w);
      total.o[i][2 * r + 1] = merge_value(total.o[i][2 * r + 1], part_o(i, 2 * r + 1), w);
    }
  }
}

// total <- total ⊕ part for the warp's rows (prefill: splits are merged in registers as they end).
template <int D>
__device__ __forceinline__ void merge_split(SplitAccum<D>& total, const SplitAccum<D>& part, float scale_log2) {
  merge_split_from(
      total, [&](int r) { return part.m[r]; }, [&](int r) { return part.l[r]; },
      [&](int i, int e) { return part.o[i][e]; }, scale_log2);
}

// The final output value of a row: o / l, rounded to bf16 by the caller.
__device__ __forceinline__ float normalize(float o, float l) { return o / l; }

}  // namespace detinfer::cuda::attn
