// The fixed K partition of the row-parallel product (matmul_partitioned, matmul_partials,
// combine_partials), shared by the validation and both backends.
//
// Invariant: a row-parallel product over K is cut into kPartitions = 8 equal contiguous ranges,
// whatever the tensor-parallel degree TP (1, 2, 4 or 8): rank r of TP holds partitions
// [r*8/TP, (r+1)*8/TP). Each partition's dot product is computed in fp32 in the plain matmul's
// order over its range; the 8 fp32 partials are added by one fixed binary tree,
//   ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)),
// then the bias, then one rounding. Neither TP, nor M, nor the device's SM count changes a
// partition's range, its chain or the tree, so TP1, TP2, TP4 and TP8 give the same bits.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define DETINFER_PARTITIONS_HD __host__ __device__ __forceinline__
#else
#define DETINFER_PARTITIONS_HD inline
#endif

namespace detinfer::partitions {

constexpr int64_t kPartitions = 8;  // the largest supported TP degree
constexpr int64_t kStep = 16;       // a partition's width is a multiple of the matmul's k-step

// The fixed tree over p[0..8), in fp32 (the argument order is the association order).
DETINFER_PARTITIONS_HD float tree8(float p0, float p1, float p2, float p3, float p4, float p5, float p6, float p7) {
  return ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7));
}

}  // namespace detinfer::partitions
