// The products of attention_tile.cuh with wgmma (sm_90a): the Hopper prefill kernel's
// (attention.cu, attention_prefill_wgmma_kernel). One warpgroup owns 64 query rows; warp w of it
// holds rows 16w .. 16w+15 in mma.sync's accumulator layout, so softmax_block, finish_split and
// the merges run on its registers unchanged. Each score and output element takes the k16 steps of
// block_scores and accumulate_values in the same order into one fp32 accumulator:
//   S[64, kKeyBlock] = Q[64, D] · K^T       wgmma m64n64k16, Q and K K-major in shared memory,
//                                           k-steps of 16 dims ascending
//   O[64, D] += bf16(P)[64, kKeyBlock] · V  wgmma m64n64k16 per 64 output columns, P from registers
//                                           (mma.sync's A fragments), V N-major in shared memory,
//                                           k-steps of 16 keys ascending
// and a wgmma k16 step gives the fp32 bits of an mma.sync k16 step (dev_matmul families on the
// H200: every output of six shapes equal), so the Hopper prefill gives the bits of the mma.sync
// kernels, the decode kernel among them. Tiles are in slab_offset's layout, 1024-byte aligned.
#pragma once

#include <cstdint>

#include "attention_tile.cuh"
#include "ptx.cuh"
#include "wgmma_bf16.cuh"

namespace detinfer::cuda::attn {

constexpr int kWgRows = 64;  // query rows of one warpgroup

// Descriptor of an N-major operand (V: keys are K, D is N) with 128-byte swizzle: rows of 64
// columns 128 bytes apart, groups of 8 keys 1024 bytes apart. One instruction reads one 64-column
// slab, so the stride between slabs is never used; both offsets hold 1024.
__device__ __forceinline__ uint64_t n_major_desc(uint32_t addr) {
  uint64_t d = (addr & 0x3FFFF) >> 4;
  d |= uint64_t{1024 >> 4} << 16;
  d |= uint64_t{1024 >> 4} << 32;
  d |= uint64_t{1} << 62;
  return d;
}

// The two products, issued: wg_issue_scores starts S = Q·K^T into s (zeroed here) and
// wg_issue_values starts o += bf16(p)·V, each one commit group. The caller waits (wgmma_wait) and
// fences the registers before it reads them, and keeps p alive (fence_fragments) until the
// values' group is done.
template <int D, int kQRows>
__device__ __forceinline__ void wg_issue_scores(float (&s)[kKeyBlock / 8][4], uint64_t q_desc, uint64_t k_desc) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#pragma unroll
  for (int j = 0; j < kKeyBlock / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
  float(&flat)[kKeyBlock / 2] = *reinterpret_cast<float(*)[kKeyBlock / 2]>(&s[0][0]);
  ptx::wgmma_fence();
  ptx::fence_registers(flat);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    sm90::Wgmma<kKeyBlock>::mma(flat, ptx::desc_add(q_desc, ((kk >> 2) * (kQRows * 128) + (kk & 3) * 32) >> 4),
                                ptx::desc_add(k_desc, ((kk >> 2) * (kKeyBlock * 128) + (kk & 3) * 32) >> 4));
  ptx::wgmma_commit();
  ptx::fence_registers(flat);
#endif
}

template <int D>
__device__ __forceinline__ void wg_issue_values(SplitAccum<D>& acc, const uint32_t (&p)[kKeyBlock / 16][4],
                                                uint64_t v_desc) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  float(&o)[D / 2] = *reinterpret_cast<float(*)[D / 2]>(&acc.o[0][0]);
  ptx::wgmma_fence();
  ptx::fence_registers(o);
#pragma unroll
  for (int i = 0; i < kKeyBlock / 16; ++i)
#pragma unroll
    for (int h = 0; h < D / 64; ++h)
      sm90::WgmmaRegA<64>::mma(*reinterpret_cast<float(*)[32]>(&acc.o[8 * h][0]), p[i],
                               ptx::desc_add(v_desc, (h * (kKeyBlock * 128) + i * (16 * 128)) >> 4));
  ptx::wgmma_commit();
  ptx::fence_registers(o);
#endif
}

// wgmma.wait_group 0, in one of two spellings (kTag), for the two branches of a step that each
// wait: identical asm statements would be hoisted above the branch, back beside the softmax.
template <int kTag>
__device__ __forceinline__ void wg_wait_values() {
  if constexpr (kTag == 0)
    asm volatile("wgmma.wait_group.sync.aligned 0; // a split ends\n" ::: "memory");
  else
    asm volatile("wgmma.wait_group.sync.aligned 0; // the split goes on\n" ::: "memory");
}

// Keeps registers an asynchronous wgmma reads (P fragments) alive and in place until this point.
template <int N>
__device__ __forceinline__ void fence_fragments(uint32_t (&p)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(p[i][e])::"memory");
}

}  // namespace detinfer::cuda::attn
