// The one reduction schedule every attention implementation follows (CPU, CUDA decode, CUDA
// prefill). For a query at position p, keys 0..p are cut into splits of kSplitSize keys counted
// from key 0; each split is reduced over key blocks of kKeyBlock keys in ascending order with an
// fp32 online softmax; the splits' partials (max, sum, output) are combined in ascending order.
// Neither constant may depend on the batch, the sequence length or the free SMs.
#pragma once

// Its own name: token_choice.h's DI_HOST_DEVICE also forces inlining, and the two headers meet
// in most files.
#if defined(__CUDACC__)
#define DI_SCHEDULE_HOST_DEVICE __host__ __device__
#else
#define DI_SCHEDULE_HOST_DEVICE
#endif

namespace detinfer::attention_schedule {

constexpr int kSplitSize = 256;
// 64 keys: the tensor-core tile of the CUDA kernels (4 k-steps of 16 keys for P·V) and a 16 KiB
// K block at head dim 128.
constexpr int kKeyBlock = 64;
static_assert(kSplitSize % kKeyBlock == 0, "a split is a whole number of key blocks");

// Variant configuration only (FlashDecoding-style): the number of splits grows when the batch is
// small, so the split boundaries depend on the batch size and the length.
DI_SCHEDULE_HOST_DEVICE inline int variant_split_size(int batch, int seq_len) {
  int splits = 64 / (batch < 1 ? 1 : batch);
  int by_len = (seq_len + kKeyBlock - 1) / kKeyBlock;
  if (splits > by_len) splits = by_len;
  if (splits < 1) splits = 1;
  return seq_len < 1 ? 1 : (seq_len + splits - 1) / splits;
}

// Upper bound of the number of splits variant_split_size gives any sequence of a batch.
inline int variant_max_splits(int batch) {
  int splits = 64 / (batch < 1 ? 1 : batch);
  return splits < 1 ? 1 : splits;
}

}  // namespace detinfer::attention_schedule
