// attention (CPU): out[t,h,:] = softmax(q[t,h,:] · K[0..p]^T * scale) · V[0..p]     causal, paged, GQA
//   q,out [T, heads, D] bf16; k_cache, v_cache [blocks, block_size, kv_heads, D] bf16
// Invariant: the schedule of common/attention_schedule.h (splits of kSplitSize keys from key 0,
// key blocks of kKeyBlock in ascending order, fp32 online softmax, splits combined in ascending
// order); every query is computed alone, from its position and its sequence's cache.
// Variant: the split size comes from attention_schedule::variant_split_size(batch, length).
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/attention_schedule.h"
#include "../common/bf16.h"
#include "../common/config.h"
#include "cpu_ops.h"

namespace detinfer::cpu {
namespace {

using attention_schedule::kKeyBlock;
using attention_schedule::kSplitSize;

struct Partial {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.f;
  std::vector<float> out;
};

struct KeyRows {
  const Tensor& k_cache;
  const Tensor& v_cache;
  const int32_t* block_table;
  int64_t block_size, kv_heads, dim;
  int64_t kv_head;
  const uint16_t* k(int64_t key) const { return row(k_cache, key); }
  const uint16_t* v(int64_t key) const { return row(v_cache, key); }
  const uint16_t* row(const Tensor& cache, int64_t key) const {
    int64_t block = block_table[key / block_size], offset = key % block_size;
    return cache.ptr<uint16_t>() + ((block * block_size + offset) * kv_heads + kv_head) * dim;
  }
};

float score(const float* q, const uint16_t* k, int64_t dim, float scale) {
  float acc = 0.f;
  for (int64_t d = 0; d < dim; ++d) acc += q[d] * bf16_to_f32(k[d]);
  return acc * scale;
}

// Online softmax over keys [begin, end), kKeyBlock keys at a time.
Partial reduce_split(const float* q, const KeyRows& keys, int64_t begin, int64_t end, float scale) {
  Partial p;
  p.out.assign(keys.dim, 0.f);
  float scores[kKeyBlock];
  for (int64_t block = begin; block < end; block += kKeyBlock) {
    int64_t n = end - block < kKeyBlock ? end - block : kKeyBlock;
    float block_max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      scores[j] = score(q, keys.k(block + j), keys.dim, scale);
      block_max = scores[j] > block_max ? scores[j] : block_max;
    }
    float new_max = block_max > p.max ? block_max : p.max;
    float alpha = std::exp(p.max - new_max);
    p.sum *= alpha;
    for (float& o : p.out) o *= alpha;
    for (int64_t j = 0; j < n; ++j) {
      float w = std::exp(scores[j] - new_max);
      p.sum += w;
      const uint16_t* v = keys.v(block + j);
      for (int64_t d = 0; d < keys.dim; ++d) p.out[d] += w * bf16_to_f32(v[d]);
    }
    p.max = new_max;
  }
  return p;
}

}  // namespace

void attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
               const AttentionBatch& batch, float scale) {
  int64_t heads = q.dim(1), dim = q.dim(2), kv_heads = k_cache.dim(2), block_size = k_cache.dim(1);
  int64_t group = heads / kv_heads, num_seqs = batch.seq_lens.dim(0), max_blocks = batch.block_tables.dim(1);
  const int32_t* starts = batch.query_start.ptr<int32_t>();
  const int32_t* lens = batch.seq_lens.ptr<int32_t>();
  std::vector<float> qf(dim);
  for (int64_t b = 0; b < num_seqs; ++b) {
    int64_t n_queries = starts[b + 1] - starts[b], len = lens[b];
    DI_CHECK(n_queries >= 0 && n_queries <= len && starts[b + 1] <= q.dim(0),
             "attention: sequence ", b, " has ", n_queries, " queries and ", len, " keys");
    DI_CHECK(len <= max_blocks * block_size, "attention: sequence ", b, " has ", len,
             " keys, more than its block table holds");
    int64_t split = variant_kernels() ? attention_schedule::variant_split_size(num_seqs, len) : kSplitSize;
    for (int64_t i = 0; i < n_queries; ++i) {
      int64_t row = starts[b] + i, pos = len - n_queries + i;
      for (int64_t h = 0; h < heads; ++h) {
        KeyRows keys{k_cache, v_cache, batch.block_tables.ptr<int32_t>() + b * max_blocks, block_size, kv_heads,
                     dim, h / group};
        const uint16_t* qh = q.ptr<uint16_t>() + (row * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) qf[d] = bf16_to_f32(qh[d]);
        std::vector<Partial> parts;
        for (int64_t begin = 0; begin <= pos; begin += split)
          parts.push_back(reduce_split(qf.data(), keys, begin, begin + split < pos + 1 ? begin + split : pos + 1, scale));
        float max = -std::numeric_limits<float>::infinity();
        for (const Partial& p : parts) max = p.max > max ? p.max : max;
        float sum = 0.f;
        std::vector<float> acc(dim, 0.f);
        for (const Partial& p : parts) {
          float w = std::exp(p.max - max);
          sum += p.sum * w;
          for (int64_t d = 0; d < dim; ++d) acc[d] += p.out[d] * w;
        }
        uint16_t* o = out.ptr<uint16_t>() + (row * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = f32_to_bf16(acc[d] / sum);
      }
    }
  }
}

}  // namespace detinfer::cpu
