// attention (CPU): out[t,h,:] = softmax(q[t,h,:] · K[0..p]^T * scale) · V[0..p]     causal, paged, GQA
//   q,out [T, heads, D] bf16; k_cache, v_cache [blocks, block_size, kv_heads, D] bf16
// Invariant: the schedule of common/attention_schedule.h (splits of kSplitSize keys from key 0,
// key blocks of kKeyBlock in ascending order, fp32 online softmax, splits combined in ascending
// order); every query is computed alone, from its position and its sequence's cache.
// Variant: the split size comes from attention_schedule::variant_split_size(batch, length).
// Arithmetic as in the CUDA kernels (kernels/attention_tile.cuh) where a scalar loop can follow
// it: raw scores, p = exp2(fma(s, c, -max·c)) with the scale folded into c, bf16 weights in P·V,
// splits merged into a running total; the dot products are sequential here, so CPU and CUDA agree
// closely, not bitwise.
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

// The running state of one query over a split, or over the splits merged so far.
struct Partial {
  float max = -std::numeric_limits<float>::infinity();  // of the raw scores q·k
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

float dot(const float* q, const uint16_t* k, int64_t dim) {
  float acc = 0.f;
  for (int64_t d = 0; d < dim; ++d) acc += q[d] * bf16_to_f32(k[d]);
  return acc;
}

// As the CUDA kernels: exp(x·scale) = 2^(x·c) with c = scale·log2(e); the offset of a row that has
// seen no key yet is 0, so an empty row gives 2^(−∞) = 0.
float scaled_max(float max, float c) { return (max == -std::numeric_limits<float>::infinity() ? 0.f : max) * c; }

// Online softmax over keys [begin, end), kKeyBlock keys at a time from `begin`; the weights enter
// P·V rounded to bf16 (the CUDA kernels feed P to bf16 tensor cores) and the sum unrounded.
Partial reduce_split(const float* q, const KeyRows& keys, int64_t begin, int64_t end, float c) {
  Partial p;
  p.out.assign(keys.dim, 0.f);
  float scores[kKeyBlock];
  for (int64_t block = begin; block < end; block += kKeyBlock) {
    int64_t n = end - block < kKeyBlock ? end - block : kKeyBlock;
    float block_max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      scores[j] = dot(q, keys.k(block + j), keys.dim);
      block_max = scores[j] > block_max ? scores[j] : block_max;
    }
    float new_max = block_max > p.max ? block_max : p.max;
    float offset = scaled_max(new_max, c);
    float alpha = std::exp2(p.max * c - offset);
    p.sum *= alpha;
    for (float& o : p.out) o *= alpha;
    for (int64_t j = 0; j < n; ++j) {
      float w = std::exp2(std::fma(scores[j], c, -offset));
      p.sum += w;
      float wv = round_bf16(w);
      const uint16_t* v = keys.v(block + j);
      for (int64_t d = 0; d < keys.dim; ++d) p.out[d] += wv * bf16_to_f32(v[d]);
    }
    p.max = new_max;
  }
  return p;
}

// total <- total merged with the next split (ascending split order).
void merge(Partial& total, const Partial& part, float c) {
  float max = part.max > total.max ? part.max : total.max;
  float offset = scaled_max(max, c);
  float wt = std::exp2(total.max * c - offset), wp = std::exp2(part.max * c - offset);
  total.sum = total.sum * wt + part.sum * wp;
  for (size_t d = 0; d < total.out.size(); ++d) total.out[d] = total.out[d] * wt + part.out[d] * wp;
  total.max = max;
}

}  // namespace

void attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
               const AttentionBatch& batch, float scale, const Tensor* /*workspace: CUDA only*/) {
  int64_t heads = q.dim(1), dim = q.dim(2), kv_heads = k_cache.dim(2), block_size = k_cache.dim(1);
  int64_t group = heads / kv_heads, num_seqs = batch.seq_lens.dim(0), max_blocks = batch.block_tables.dim(1);
  const int32_t* starts = batch.query_start.ptr<int32_t>();
  const int32_t* lens = batch.seq_lens.ptr<int32_t>();
  const int32_t* tables = batch.block_tables.ptr<int32_t>();
  // Every index the loops below follow, checked before anything is read or written through it:
  // query rows within q, keys within the block table, and the blocks they use within the cache.
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t n_queries = int64_t{starts[b + 1]} - starts[b], len = lens[b];
    DI_CHECK(starts[b] >= 0 && n_queries >= 0 && starts[b + 1] <= q.dim(0), "attention: sequence ", b,
             " has query rows [", starts[b], ", ", starts[b + 1], ") outside q's ", q.dim(0), " rows");
    DI_CHECK(n_queries <= len, "attention: sequence ", b, " has ", n_queries, " queries and ", len, " keys");
    DI_CHECK(len <= max_blocks * block_size, "attention: sequence ", b, " has ", len,
             " keys, more than its block table holds");
    for (int64_t j = 0; j < (len + block_size - 1) / block_size; ++j) {
      const int32_t block = tables[b * max_blocks + j];
      DI_CHECK(block >= 0 && block < k_cache.dim(0), "attention: block ", j, " of sequence ", b, " is ", block,
               ", outside the cache's ", k_cache.dim(0), " blocks");
    }
  }
  std::vector<float> qf(dim);
  const float c = scale * 1.4426950408889634f;
  for (int64_t b = 0; b < num_seqs; ++b) {
    int64_t n_queries = starts[b + 1] - starts[b], len = lens[b];
    int64_t split = variant_kernels() ? attention_schedule::variant_split_size(num_seqs, len) : attention_split_size();
    for (int64_t i = 0; i < n_queries; ++i) {
      int64_t row = starts[b] + i, pos = len - n_queries + i;
      for (int64_t h = 0; h < heads; ++h) {
        KeyRows keys{k_cache, v_cache, batch.block_tables.ptr<int32_t>() + b * max_blocks, block_size, kv_heads,
                     dim, h / group};
        const uint16_t* qh = q.ptr<uint16_t>() + (row * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) qf[d] = bf16_to_f32(qh[d]);
        Partial total;
        total.out.assign(dim, 0.f);
        for (int64_t begin = 0; begin <= pos; begin += split)
          merge(total, reduce_split(qf.data(), keys, begin, begin + split < pos + 1 ? begin + split : pos + 1, c), c);
        uint16_t* o = out.ptr<uint16_t>() + (row * heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = f32_to_bf16(total.out[d] / total.sum);
      }
    }
  }
}

}  // namespace detinfer::cpu
