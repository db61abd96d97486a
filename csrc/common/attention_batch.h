// The description of a ragged batch of sequences that attention reads; shared by ops.h and both
// backends, which therefore need not include their dispatcher.
#pragma once

#include "tensor.h"

namespace detinfer {

// Per-launch description of a ragged batch of sequences for attention. Sequence b owns query rows
// [query_start[b], query_start[b+1]); its queries are the last rows of its context, so query i of
// a sequence with n queries sits at position seq_lens[b] - n + i and sees keys 0..that position.
struct AttentionBatch {
  Tensor block_tables;  // i32 [B, max_blocks_per_seq], physical block of each logical block
  Tensor query_start;   // i32 [B+1]
  Tensor seq_lens;      // i32 [B], keys in the cache for each sequence once this step is written
  int max_query_len = 0;
  int max_seq_len = 0;
};

}  // namespace detinfer
