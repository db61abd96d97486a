// Validation and dispatch of every op. Each op checks dtypes, ranks, shapes and devices of its
// arguments and throws an Error that names the op, the argument, what was expected and what was
// given, before anything is launched.
#include "ops.h"

#include <cstring>
#include <initializer_list>

#include "common/config.h"
#include "common/logit_processors.h"
#include "common/partitions.h"
#include "common/token_choice.h"
#include "cpu/cpu_ops.h"
#include "cuda/runtime.h"
#include "kernels/cuda_ops.h"

namespace detinfer {

Tensor make_tensor(Device device, DType dtype, const std::vector<int64_t>& shape) {
  static const Allocator cuda_allocator{cuda_runtime::alloc, cuda_runtime::free};
  return allocate_tensor(device, device == Device::CPU ? kHostAllocator : cuda_allocator, dtype, shape);
}

}  // namespace detinfer

namespace detinfer::ops {
namespace {

struct Checker {
  const char* op;

  void dtype(const Tensor& t, const char* name, std::initializer_list<DType> allowed) const {
    for (DType d : allowed)
      if (t.dtype == d) return;
    std::string names;
    for (DType d : allowed) names += std::string(names.empty() ? "" : " or ") + dtype_name(d);
    fail(op, ": expected ", name, " to be ", names, " but received ", t.describe());
  }

  void rank(const Tensor& t, const char* name, int r) const {
    if (t.rank() != r) fail(op, ": expected ", name, " to have ", r, " dimensions but received ", t.describe());
  }

  void dim(const Tensor& t, const char* name, int i, int64_t expected, const char* what) const {
    if (t.dim(i) != expected)
      fail(op, ": expected dimension ", i, " of ", name, " to be ", expected, " (", what, ") but received ",
           t.describe());
  }

  void same_shape(const Tensor& a, const char* an, const Tensor& b, const char* bn) const {
    if (a.shape != b.shape)
      fail(op, ": expected ", an, " and ", bn, " to have the same shape but received ", a.describe(), " and ",
           b.describe());
  }

  void devices(std::initializer_list<std::pair<const char*, const Tensor*>> ts) const {
    const Tensor* first = ts.begin()->second;
    for (auto& [name, t] : ts)
      if (t->device() != first->device())
        fail(op, ": all tensors must be on one device, but ", ts.begin()->first, " is on ",
             device_name(first->device()), " and ", name, " is on ", device_name(t->device()));
  }
};

bool on_cuda(const Tensor& t) { return t.device() == Device::CUDA; }

}  // namespace

void embedding(Tensor& out, const Tensor& table, const Tensor& ids) {
  Checker c{"embedding"};
  c.devices({{"out", &out}, {"table", &table}, {"ids", &ids}});
  c.rank(table, "table", 2);
  c.rank(out, "out", 2);
  c.rank(ids, "ids", 1);
  c.dtype(ids, "ids", {DType::I32});
  if (out.dtype != table.dtype) fail("embedding: expected out to be ", dtype_name(table.dtype), " like table but received ", out.describe());
  c.dim(out, "out", 0, ids.dim(0), "number of ids");
  c.dim(out, "out", 1, table.dim(1), "row size of table");
  on_cuda(out) ? cuda::embedding(out, table, ids) : cpu::embedding(out, table, ids);
}

static void check_norm(const Checker& c, const Tensor& out, const Tensor& x, const Tensor& w) {
  c.devices({{"out", &out}, {"x", &x}, {"w", &w}});
  c.dtype(x, "x", {DType::BF16});
  c.dtype(out, "out", {DType::BF16});
  c.dtype(w, "w", {DType::BF16});
  c.rank(w, "w", 1);
  c.same_shape(out, "out", x, "x");
  if (x.rank() < 1 || x.dim(-1) != w.dim(0))
    fail(c.op, ": expected the last dimension of x to equal the size of w (", w.dim(0), ") but received ", x.describe());
}

void rmsnorm(Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  Checker c{"rmsnorm"};
  check_norm(c, out, x, w);
  on_cuda(out) ? cuda::rmsnorm(out, x, w, eps) : cpu::rmsnorm(out, x, w, eps);
}

void add_rmsnorm(Tensor& out, Tensor& residual, const Tensor& x, const Tensor& w, float eps) {
  Checker c{"add_rmsnorm"};
  check_norm(c, out, x, w);
  c.devices({{"out", &out}, {"residual", &residual}});
  c.dtype(residual, "residual", {DType::BF16});
  c.same_shape(residual, "residual", x, "x");
  on_cuda(out) ? cuda::add_rmsnorm(out, residual, x, w, eps) : cpu::add_rmsnorm(out, residual, x, w, eps);
}

// K cut into `parts` partitions of a multiple of partitions::kStep columns each.
static void check_partition(const Checker& c, int64_t K, int64_t parts, const Tensor& a) {
  if (K <= 0 || K % parts != 0 || (K / parts) % partitions::kStep != 0)
    fail(c.op, ": expected K (the second dimension of a) to be a multiple of ", parts * partitions::kStep, " (", parts,
         " equal partitions, each a positive multiple of ", partitions::kStep, " columns) but received ", a.describe());
}

static void check_product(const Checker& c, const Tensor& a, const Tensor& w, const char* a_name = "a") {
  c.rank(a, a_name, 2);
  c.rank(w, "w", 2);
  c.dtype(a, a_name, {DType::BF16});
  c.dtype(w, "w", {DType::BF16});
  c.dim(a, a_name, 1, w.dim(1), "K, the second dimension of w");
}

static void check_bias(const Checker& c, const Tensor& out, const Tensor* bias, int64_t N,
                       const char* what = "N, columns of out") {
  if (!bias) return;
  c.devices({{"out", &out}, {"bias", bias}});
  c.dtype(*bias, "bias", {DType::BF16});
  c.rank(*bias, "bias", 1);
  c.dim(*bias, "bias", 0, N, what);
}

// A plain product: a [M,K] (named a_name) · w [N,K]^T (+ bias [N]) into out [M,N] of out_types.
static void check_plain_product(const Checker& c, const Tensor& out, std::initializer_list<DType> out_types,
                                const Tensor& a, const char* a_name, const Tensor& w, const Tensor* bias,
                                const char* bias_what = "N, columns of out") {
  check_product(c, a, w, a_name);
  const std::string rows = std::string("M, rows of ") + a_name;
  c.rank(out, "out", 2);
  c.dtype(out, "out", out_types);
  c.dim(out, "out", 0, a.dim(0), rows.c_str());
  c.dim(out, "out", 1, w.dim(0), "N, rows of w");
  check_bias(c, out, bias, w.dim(0), bias_what);
}

void matmul(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias) {
  Checker c{"matmul"};
  c.devices({{"out", &out}, {"a", &a}, {"w", &w}});
  check_plain_product(c, out, {DType::BF16, DType::F32}, a, "a", w, bias, "N, rows of w");
  on_cuda(out) ? cuda::matmul(out, a, w, bias) : cpu::matmul(out, a, w, bias);
}

void matmul_partitioned(Tensor& out, const Tensor& a, const Tensor& w, const Tensor* bias) {
  Checker c{"matmul_partitioned"};
  c.devices({{"out", &out}, {"a", &a}, {"w", &w}});
  check_plain_product(c, out, {DType::BF16, DType::F32}, a, "a", w, bias);
  check_partition(c, a.dim(1), partitions::kPartitions, a);
  on_cuda(out) ? cuda::matmul_partitioned(out, a, w, bias) : cpu::matmul_partitioned(out, a, w, bias);
}

void matmul_partials(Tensor& partials, const Tensor& a, const Tensor& w) {
  Checker c{"matmul_partials"};
  c.devices({{"partials", &partials}, {"a", &a}, {"w", &w}});
  check_product(c, a, w);
  c.rank(partials, "partials", 3);
  c.dtype(partials, "partials", {DType::F32});
  if (partials.dim(0) < 1 || partials.dim(0) > partitions::kPartitions)
    fail("matmul_partials: expected dimension 0 of partials (the partitions) to be between 1 and ",
         partitions::kPartitions, " but received ", partials.describe());
  c.dim(partials, "partials", 1, a.dim(0), "M, rows of a");
  c.dim(partials, "partials", 2, w.dim(0), "N, rows of w");
  check_partition(c, a.dim(1), partials.dim(0), a);
  on_cuda(partials) ? cuda::matmul_partials(partials, a, w) : cpu::matmul_partials(partials, a, w);
}

void combine_partials(Tensor& out, const Tensor& partials, const Tensor* bias, int ranks) {
  Checker c{"combine_partials"};
  c.devices({{"out", &out}, {"partials", &partials}});
  c.rank(out, "out", 2);
  c.dtype(out, "out", {DType::BF16, DType::F32});
  c.rank(partials, "partials", 3);
  c.dtype(partials, "partials", {DType::F32});
  c.dim(partials, "partials", 0, partitions::kPartitions, "the fixed number of partitions");
  c.dim(partials, "partials", 1, out.dim(0), "rows of out");
  c.dim(partials, "partials", 2, out.dim(1), "columns of out");
  check_bias(c, out, bias, out.dim(1));
  if (ranks != 1 && ranks != 2 && ranks != 4 && ranks != 8)
    fail("combine_partials: expected ranks to be 1, 2, 4 or 8 but received ", ranks);
  on_cuda(out) ? cuda::combine_partials(out, partials, bias, ranks) : cpu::combine_partials(out, partials, bias, ranks);
}

void rope(Tensor& x, const Tensor& positions, const Tensor& cos_sin) {
  Checker c{"rope"};
  c.devices({{"x", &x}, {"positions", &positions}, {"cos_sin", &cos_sin}});
  c.dtype(x, "x", {DType::BF16});
  c.rank(x, "x", 3);
  c.dtype(positions, "positions", {DType::I32});
  c.rank(positions, "positions", 1);
  c.dim(positions, "positions", 0, x.dim(0), "tokens, rows of x");
  c.dtype(cos_sin, "cos_sin", {DType::F32});
  c.rank(cos_sin, "cos_sin", 2);
  c.dim(cos_sin, "cos_sin", 1, x.dim(2), "head dim of x");
  if (x.dim(2) % 2 != 0) fail("rope: expected an even head dim but received ", x.describe());
  on_cuda(x) ? cuda::rope(x, positions, cos_sin) : cpu::rope(x, positions, cos_sin);
}

void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up) {
  Checker c{"silu_mul"};
  c.devices({{"out", &out}, {"gate", &gate}, {"up", &up}});
  c.dtype(out, "out", {DType::BF16});
  c.dtype(gate, "gate", {DType::BF16});
  c.dtype(up, "up", {DType::BF16});
  c.same_shape(gate, "gate", up, "up");
  c.same_shape(out, "out", gate, "gate");
  on_cuda(out) ? cuda::silu_mul(out, gate, up) : cpu::silu_mul(out, gate, up);
}

void silu_mul_packed(Tensor& out, const Tensor& gate_up) {
  Checker c{"silu_mul_packed"};
  c.devices({{"out", &out}, {"gate_up", &gate_up}});
  c.dtype(out, "out", {DType::BF16});
  c.dtype(gate_up, "gate_up", {DType::BF16});
  c.rank(out, "out", 2);
  c.rank(gate_up, "gate_up", 2);
  c.dim(gate_up, "gate_up", 0, out.dim(0), "rows of out");
  c.dim(gate_up, "gate_up", 1, 2 * out.dim(1), "twice the columns of out: gate then up");
  on_cuda(out) ? cuda::silu_mul_packed(out, gate_up) : cpu::silu_mul_packed(out, gate_up);
}

// A gate|up product of a [M,K] (named a_name) and w [2I,K] into out [M,I], gate_up [M,2I] its scratch.
static void check_gate_up_product(const Checker& c, const Tensor& out, const Tensor& gate_up, const Tensor& a,
                                  const char* a_name, const Tensor& w, const Tensor* bias) {
  check_product(c, a, w, a_name);
  if (w.dim(0) % 2 != 0)
    fail(c.op, ": expected w to hold gate then up rows (an even number) but received ", w.describe());
  const std::string rows = std::string("M, rows of ") + a_name;
  c.rank(out, "out", 2);
  c.dtype(out, "out", {DType::BF16});
  c.dim(out, "out", 0, a.dim(0), rows.c_str());
  c.dim(out, "out", 1, w.dim(0) / 2, "I, half the rows of w");
  c.rank(gate_up, "gate_up", 2);
  c.dtype(gate_up, "gate_up", {DType::BF16});
  c.dim(gate_up, "gate_up", 0, a.dim(0), rows.c_str());
  c.dim(gate_up, "gate_up", 1, w.dim(0), "2I, rows of w");
  check_bias(c, out, bias, w.dim(0), "2I, rows of w");
}

void matmul_silu_mul(Tensor& out, Tensor& gate_up, const Tensor& a, const Tensor& w, const Tensor* bias) {
  Checker c{"matmul_silu_mul"};
  c.devices({{"out", &out}, {"gate_up", &gate_up}, {"a", &a}, {"w", &w}});
  check_gate_up_product(c, out, gate_up, a, "a", w, bias);
  on_cuda(out) ? cuda::matmul_silu_mul(out, gate_up, a, w, bias) : cpu::matmul_silu_mul(out, gate_up, a, w, bias);
}

// The norm before a product: residual_in [M,K] (+ x) -> residual_out, normed [M,K]; norm_w [K].
static void check_norm_input(const Checker& c, const Tensor& normed, const Tensor& residual_out,
                             const Tensor& residual_in, const Tensor* x, const Tensor& norm_w) {
  c.devices({{"residual_in", &residual_in}, {"normed", &normed}, {"residual_out", &residual_out}, {"norm_w", &norm_w}});
  c.rank(residual_in, "residual_in", 2);
  c.dtype(residual_in, "residual_in", {DType::BF16});
  c.dtype(norm_w, "norm_w", {DType::BF16});
  c.rank(norm_w, "norm_w", 1);
  c.dim(residual_in, "residual_in", 1, norm_w.dim(0), "K, the size of norm_w");
  c.dtype(normed, "normed", {DType::BF16});
  c.same_shape(normed, "normed", residual_in, "residual_in");
  c.dtype(residual_out, "residual_out", {DType::BF16});
  c.same_shape(residual_out, "residual_out", residual_in, "residual_in");
  if (x) {
    c.devices({{"residual_in", &residual_in}, {"x", x}});
    c.dtype(*x, "x", {DType::BF16});
    c.same_shape(*x, "x", residual_in, "residual_in");
  }
}

void norm_matmul(Tensor& out, Tensor& normed, Tensor& residual_out, const Tensor& residual_in, const Tensor* x,
                 const Tensor& norm_w, float eps, const Tensor& w, const Tensor* bias) {
  Checker c{"norm_matmul"};
  check_norm_input(c, normed, residual_out, residual_in, x, norm_w);
  c.devices({{"out", &out}, {"residual_in", &residual_in}, {"w", &w}});
  check_plain_product(c, out, {DType::BF16}, residual_in, "residual_in", w, bias);
  on_cuda(out) ? cuda::norm_matmul(out, normed, residual_out, residual_in, x, norm_w, eps, w, bias)
               : cpu::norm_matmul(out, normed, residual_out, residual_in, x, norm_w, eps, w, bias);
}

void norm_matmul_silu_mul(Tensor& out, Tensor& gate_up, Tensor& normed, Tensor& residual_out,
                          const Tensor& residual_in, const Tensor* x, const Tensor& norm_w, float eps, const Tensor& w,
                          const Tensor* bias) {
  Checker c{"norm_matmul_silu_mul"};
  check_norm_input(c, normed, residual_out, residual_in, x, norm_w);
  c.devices({{"out", &out}, {"gate_up", &gate_up}, {"residual_in", &residual_in}, {"w", &w}});
  check_gate_up_product(c, out, gate_up, residual_in, "residual_in", w, bias);
  on_cuda(out) ? cuda::norm_matmul_silu_mul(out, gate_up, normed, residual_out, residual_in, x, norm_w, eps, w, bias)
               : cpu::norm_matmul_silu_mul(out, gate_up, normed, residual_out, residual_in, x, norm_w, eps, w, bias);
}

void add(Tensor& out, const Tensor& a, const Tensor& b) {
  Checker c{"add"};
  c.devices({{"out", &out}, {"a", &a}, {"b", &b}});
  c.dtype(out, "out", {DType::BF16});
  c.dtype(a, "a", {DType::BF16});
  c.dtype(b, "b", {DType::BF16});
  c.same_shape(a, "a", b, "b");
  c.same_shape(out, "out", a, "a");
  on_cuda(out) ? cuda::add(out, a, b) : cpu::add(out, a, b);
}

void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, const Tensor& slots) {
  Checker c{"kv_append"};
  c.devices({{"k_cache", &k_cache}, {"v_cache", &v_cache}, {"k", &k}, {"v", &v}, {"slots", &slots}});
  c.dtype(k_cache, "k_cache", {DType::BF16});
  c.rank(k_cache, "k_cache", 4);
  c.same_shape(k_cache, "k_cache", v_cache, "v_cache");
  c.dtype(v_cache, "v_cache", {DType::BF16});
  c.dtype(k, "k", {DType::BF16});
  c.dtype(v, "v", {DType::BF16});
  c.rank(k, "k", 3);
  c.same_shape(k, "k", v, "v");
  c.dim(k, "k", 1, k_cache.dim(2), "kv heads of the cache");
  c.dim(k, "k", 2, k_cache.dim(3), "head dim of the cache");
  c.dtype(slots, "slots", {DType::I32});
  c.rank(slots, "slots", 1);
  c.dim(slots, "slots", 0, k.dim(0), "tokens, rows of k");
  on_cuda(k) ? cuda::kv_append(k_cache, v_cache, k, v, slots) : cpu::kv_append(k_cache, v_cache, k, v, slots);
}

void qkv_rope_append(Tensor& q_out, Tensor& k_cache, Tensor& v_cache, const Tensor& qkv, const Tensor& positions,
                     const Tensor& cos_sin, const Tensor& slots, const Tensor* q_norm, const Tensor* k_norm,
                     float eps) {
  Checker c{"qkv_rope_append"};
  c.devices({{"q_out", &q_out}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"qkv", &qkv},
             {"positions", &positions}, {"cos_sin", &cos_sin}, {"slots", &slots}});
  c.dtype(q_out, "q_out", {DType::BF16});
  c.rank(q_out, "q_out", 3);
  c.dtype(k_cache, "k_cache", {DType::BF16});
  c.rank(k_cache, "k_cache", 4);
  c.dtype(v_cache, "v_cache", {DType::BF16});
  c.same_shape(k_cache, "k_cache", v_cache, "v_cache");
  c.dim(q_out, "q_out", 2, k_cache.dim(3), "head dim of the cache");
  if (q_out.dim(2) % 2 != 0) fail("qkv_rope_append: expected an even head dim but received ", q_out.describe());
  const int64_t T = q_out.dim(0), D = q_out.dim(2);
  c.dtype(qkv, "qkv", {DType::BF16});
  c.rank(qkv, "qkv", 2);
  c.dim(qkv, "qkv", 0, T, "tokens, rows of q_out");
  c.dim(qkv, "qkv", 1, (q_out.dim(1) + 2 * k_cache.dim(2)) * D, "(heads + 2 * kv heads) * head dim");
  c.dtype(positions, "positions", {DType::I32});
  c.rank(positions, "positions", 1);
  c.dim(positions, "positions", 0, T, "tokens, rows of q_out");
  c.dtype(slots, "slots", {DType::I32});
  c.rank(slots, "slots", 1);
  c.dim(slots, "slots", 0, T, "tokens, rows of q_out");
  c.dtype(cos_sin, "cos_sin", {DType::F32});
  c.rank(cos_sin, "cos_sin", 2);
  c.dim(cos_sin, "cos_sin", 1, D, "head dim");
  for (auto [name, w] : {std::pair<const char*, const Tensor*>{"q_norm", q_norm}, {"k_norm", k_norm}}) {
    if (!w) continue;
    c.devices({{"q_out", &q_out}, {name, w}});
    c.dtype(*w, name, {DType::BF16});
    c.rank(*w, name, 1);
    c.dim(*w, name, 0, D, "head dim");
  }
  on_cuda(q_out) ? cuda::qkv_rope_append(q_out, k_cache, v_cache, qkv, positions, cos_sin, slots, q_norm, k_norm, eps)
                 : cpu::qkv_rope_append(q_out, k_cache, v_cache, qkv, positions, cos_sin, slots, q_norm, k_norm, eps);
}

void attention(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
               const AttentionBatch& b, float scale, const Tensor* workspace) {
  Checker c{"attention"};
  c.devices({{"out", &out}, {"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache},
             {"block_tables", &b.block_tables}, {"query_start", &b.query_start}, {"seq_lens", &b.seq_lens}});
  if (workspace) {
    c.devices({{"out", &out}, {"workspace", workspace}});
    c.dtype(*workspace, "workspace", {DType::F32});
  }
  c.dtype(q, "q", {DType::BF16});
  c.dtype(out, "out", {DType::BF16});
  c.rank(q, "q", 3);
  c.same_shape(out, "out", q, "q");
  c.dtype(k_cache, "k_cache", {DType::BF16});
  c.dtype(v_cache, "v_cache", {DType::BF16});
  c.rank(k_cache, "k_cache", 4);
  c.same_shape(k_cache, "k_cache", v_cache, "v_cache");
  c.dim(q, "q", 2, k_cache.dim(3), "head dim of the cache");
  if (k_cache.dim(2) < 1 || k_cache.dim(1) < 1)
    fail("attention: expected a cache of at least one kv head and one position a block but received ",
         k_cache.describe());
  if (q.dim(1) % k_cache.dim(2) != 0)
    fail("attention: expected the query heads of q (", q.dim(1), ") to be a multiple of the cache's kv heads (",
         k_cache.dim(2), ")");
  c.dtype(b.block_tables, "block_tables", {DType::I32});
  c.rank(b.block_tables, "block_tables", 2);
  c.dtype(b.query_start, "query_start", {DType::I32});
  c.rank(b.query_start, "query_start", 1);
  c.dtype(b.seq_lens, "seq_lens", {DType::I32});
  c.rank(b.seq_lens, "seq_lens", 1);
  int64_t batch = b.seq_lens.dim(0);
  c.dim(b.query_start, "query_start", 0, batch + 1, "sequences + 1");
  c.dim(b.block_tables, "block_tables", 0, batch, "sequences");
  if (b.max_query_len < 0 || b.max_seq_len < b.max_query_len)
    fail("attention: expected 0 <= maxQueryLen <= maxSeqLen but received ", b.max_query_len, " and ", b.max_seq_len);
  if (b.max_seq_len > b.block_tables.dim(1) * k_cache.dim(1))
    fail("attention: maxSeqLen ", b.max_seq_len, " exceeds the block table's capacity of ",
         b.block_tables.dim(1) * k_cache.dim(1), " keys");
  // The contents of the batch tensors (query rows, lengths, block ids) are checked by the CPU
  // backend, which reads them on the host. On CUDA they are device memory, which the step's packing
  // (lib/model/step-layout.ts) fills from the cache allocator's own block ids; a wrong block id there
  // would fault on the device and come back as a CUDA error, not end the process.
  on_cuda(out) ? cuda::attention(out, q, k_cache, v_cache, b, scale, workspace)
               : cpu::attention(out, q, k_cache, v_cache, b, scale, workspace);
}

static void check_rows(const Checker& c, const Tensor& x) {
  c.dtype(x, "x", {DType::F32});
  c.rank(x, "x", 2);
}

void log_softmax(Tensor& out, const Tensor& x) {
  Checker c{"log_softmax"};
  c.devices({{"out", &out}, {"x", &x}});
  check_rows(c, x);
  c.dtype(out, "out", {DType::F32});
  c.same_shape(out, "out", x, "x");
  on_cuda(out) ? cuda::log_softmax(out, x) : cpu::log_softmax(out, x);
}

void argmax(Tensor& out, const Tensor& x) {
  Checker c{"argmax"};
  c.devices({{"out", &out}, {"x", &x}});
  check_rows(c, x);
  c.dtype(out, "out", {DType::I32});
  c.rank(out, "out", 1);
  c.dim(out, "out", 0, x.dim(0), "rows of x");
  on_cuda(out) ? cuda::argmax(out, x) : cpu::argmax(out, x);
}

void token_logprobs(Tensor& out, const Tensor& x, const Tensor& ids) {
  Checker c{"token_logprobs"};
  c.devices({{"out", &out}, {"x", &x}, {"ids", &ids}});
  check_rows(c, x);
  c.dtype(out, "out", {DType::F32});
  c.rank(out, "out", 1);
  c.dim(out, "out", 0, x.dim(0), "rows of x");
  c.dtype(ids, "ids", {DType::I32});
  c.rank(ids, "ids", 1);
  c.dim(ids, "ids", 0, x.dim(0), "rows of x");
  on_cuda(out) ? cuda::token_logprobs(out, x, ids) : cpu::token_logprobs(out, x, ids);
}

void choose_tokens(Tensor& out, const Tensor& x, const Tensor& params, const Tensor* live) {
  Checker c{"choose_tokens"};
  c.devices({{"out", &out}, {"x", &x}, {"params", &params}});
  check_rows(c, x);
  c.dtype(out, "out", {DType::I32});
  c.rank(out, "out", 2);
  c.dim(out, "out", 0, x.dim(0), "rows of x");
  int64_t width = out.dim(1);
  if (width < 2 || width % 2 != 0 || (width - 2) / 2 > choice::kMaxTopLogprobs)
    fail("choose_tokens: expected out to have 2 + 2N columns with N between 0 and ", choice::kMaxTopLogprobs,
         " but received ", out.describe());
  c.dtype(params, "params", {DType::I32});
  c.rank(params, "params", 2);
  c.dim(params, "params", 0, x.dim(0), "rows of x");
  c.dim(params, "params", 1, choice::kParams, "choice::kParams");
  if (live) {
    c.devices({{"out", &out}, {"live", live}});
    c.dtype(*live, "live", {DType::I32});
    if (live->rank() != 1 || live->dim(0) < 1)
      fail("choose_tokens: expected live to be i32 [n] with n >= 1 (the count of rows to choose for) but received ",
           live->describe());
  }
  if (x.dim(1) > 0x7fffffff) fail("choose_tokens: expected at most 2^31 - 1 columns but received ", x.describe());
  on_cuda(out) ? cuda::choose_tokens(out, x, params, live) : cpu::choose_tokens(out, x, params, live);
}

// The plan of the logit processors' ops: i32 [1 + kPlanFields * J] for J processed rows.
static int64_t check_plan(const Checker& c, const Tensor& plan) {
  c.dtype(plan, "plan", {DType::I32});
  c.rank(plan, "plan", 1);
  if (plan.dim(0) < 1 || (plan.dim(0) - 1) % processors::kPlanFields != 0)
    fail(c.op, ": expected plan to be i32 [1 + ", processors::kPlanFields, "J] but received ", plan.describe());
  return (plan.dim(0) - 1) / processors::kPlanFields;
}

void apply_logit_processors(Tensor& adjusted, Tensor& adjusted_params, Tensor& counts, const Tensor& x,
                            const Tensor& params, const Tensor& plan, const Tensor& settings, const Tensor& mask) {
  Checker c{"apply_logit_processors"};
  c.devices({{"adjusted", &adjusted},
             {"adjusted_params", &adjusted_params},
             {"counts", &counts},
             {"x", &x},
             {"params", &params},
             {"plan", &plan},
             {"settings", &settings},
             {"mask", &mask}});
  check_rows(c, x);
  const int64_t V = x.dim(1);
  const int64_t J = check_plan(c, plan);
  c.dtype(adjusted, "adjusted", {DType::F32});
  c.rank(adjusted, "adjusted", 2);
  c.dim(adjusted, "adjusted", 0, J, "rows of the plan");
  c.dim(adjusted, "adjusted", 1, V, "columns of x");
  c.dtype(adjusted_params, "adjusted_params", {DType::I32});
  c.rank(adjusted_params, "adjusted_params", 2);
  c.dim(adjusted_params, "adjusted_params", 0, J, "rows of the plan");
  c.dim(adjusted_params, "adjusted_params", 1, choice::kParams, "choice::kParams");
  c.dtype(params, "params", {DType::I32});
  c.rank(params, "params", 2);
  c.dim(params, "params", 0, x.dim(0), "rows of x");
  c.dim(params, "params", 1, choice::kParams, "choice::kParams");
  c.dtype(counts, "counts", {DType::U16});
  c.rank(counts, "counts", 2);
  c.dim(counts, "counts", 1, V, "columns of x");
  c.dtype(settings, "settings", {DType::I32});
  c.rank(settings, "settings", 2);
  c.dim(settings, "settings", 0, counts.dim(0), "rows of counts");
  c.dim(settings, "settings", 1, processors::kSettings, "processors::kSettings");
  c.dtype(mask, "mask", {DType::I32});
  c.rank(mask, "mask", 2);
  c.dim(mask, "mask", 0, counts.dim(0), "rows of counts");
  c.dim(mask, "mask", 1, processors::mask_words(V), "ceil(V / 32) words, V the columns of x");
  if (V > 0x7fffffff) fail("apply_logit_processors: expected at most 2^31 - 1 columns but received ", x.describe());
  if (J == 0 || V == 0) return;
  on_cuda(x) ? cuda::apply_logit_processors(adjusted, adjusted_params, counts, x, params, plan, settings, mask)
             : cpu::apply_logit_processors(adjusted, adjusted_params, counts, x, params, plan, settings, mask);
}

void record_logit_choices(Tensor& params, Tensor& counts, const Tensor& chosen, const Tensor& plan) {
  Checker c{"record_logit_choices"};
  c.devices({{"params", &params}, {"counts", &counts}, {"chosen", &chosen}, {"plan", &plan}});
  const int64_t J = check_plan(c, plan);
  c.dtype(params, "params", {DType::I32});
  c.rank(params, "params", 2);
  c.dim(params, "params", 1, choice::kParams, "choice::kParams");
  c.dtype(counts, "counts", {DType::U16});
  c.rank(counts, "counts", 2);
  c.dtype(chosen, "chosen", {DType::I32});
  c.rank(chosen, "chosen", 2);
  c.dim(chosen, "chosen", 0, J, "rows of the plan");
  if (chosen.dim(1) < 2) fail("record_logit_choices: expected chosen to have at least 2 columns but received ", chosen.describe());
  if (J == 0) return;
  on_cuda(params) ? cuda::record_logit_choices(params, counts, chosen, plan)
                  : cpu::record_logit_choices(params, counts, chosen, plan);
}

void reset_logit_row(Tensor& counts, int row, const Tensor& prompt) {
  Checker c{"reset_logit_row"};
  c.devices({{"counts", &counts}, {"prompt", &prompt}});
  c.dtype(counts, "counts", {DType::U16});
  c.rank(counts, "counts", 2);
  c.dtype(prompt, "prompt", {DType::I32});
  c.rank(prompt, "prompt", 1);
  if (row < 0 || row >= counts.dim(0))
    fail("reset_logit_row: expected a row between 0 and ", counts.dim(0) - 1, " but received ", row);
  if (counts.dim(1) > 0x7fffffff) fail("reset_logit_row: expected at most 2^31 - 1 columns but received ", counts.describe());
  if (prompt.dim(0) > 0x7fffffff) fail("reset_logit_row: expected at most 2^31 - 1 prompt ids but received ", prompt.describe());
  // The ids themselves are checked by the CPU backend; the CUDA kernel skips one outside [0, V).
  on_cuda(counts) ? cuda::reset_logit_row(counts, row, prompt) : cpu::reset_logit_row(counts, row, prompt);
}

void copy(Tensor& dst, const Tensor& src) {
  Checker c{"copy"};
  c.devices({{"dst", &dst}, {"src", &src}});
  if (dst.dtype != src.dtype || dst.numel() != src.numel())
    fail("copy: expected dst to match src's dtype and element count but received ", dst.describe(), " and ",
         src.describe());
  if (on_cuda(dst)) {
    cuda_runtime::copy_async(dst.data(), src.data(), src.nbytes());
  } else {
    std::memcpy(dst.data(), src.data(), src.nbytes());
  }
}

void cast(Tensor& dst, const Tensor& src) {
  Checker c{"cast"};
  c.devices({{"dst", &dst}, {"src", &src}});
  c.dtype(dst, "dst", {DType::BF16, DType::F16, DType::F32});
  c.dtype(src, "src", {DType::BF16, DType::F16, DType::F32});
  if (dst.numel() != src.numel())
    fail("cast: expected dst and src to have the same element count but received ", dst.describe(), " and ",
         src.describe());
  on_cuda(dst) ? cuda::cast(dst, src) : cpu::cast(dst, src);
}

void set_variant_kernels(bool enabled) { g_variant_kernels.store(enabled); }

void set_decode_pipeline(const std::string& pipeline) {
  const int value = pipeline == "auto"       ? 0
                    : pipeline == "paired"   ? 1
                    : pipeline == "rotating" ? 2
                    : pipeline == "paired3"  ? 3
                                             : -1;
  if (value < 0)
    fail("setDecodePipeline: expected \"auto\", \"paired\", \"rotating\" or \"paired3\" but received \"",
         pipeline, "\"");
  g_decode_pipeline.store(value);
}

// The development switches of the two kernel families: 0 for "auto", 1 for "mma.sync".
static int auto_or_mma_sync(const char* op, const std::string& value) {
  if (value != "auto" && value != "mma.sync")
    fail(op, ": expected \"auto\" or \"mma.sync\" but received \"", value, "\"");
  return value == "mma.sync" ? 1 : 0;
}

void set_attention_split_size(int keys) {
  const int block = attention_schedule::kKeyBlock;
  if (keys != 0 && (keys < block || keys > 64 * block || keys % block != 0))
    fail("setAttentionSplitSize: expected 0 (the build's ", attention_schedule::kSplitSize, ") or a multiple of ", block,
         " from ", block, " to ", 64 * block, " but received ", keys);
  g_attention_split_size.store(keys);
}

int attention_split_size_now() { return attention_split_size(); }

void set_prefill_kernel(const std::string& kernel) {
  g_prefill_kernel.store(auto_or_mma_sync("setPrefillKernel", kernel));
}

void set_matmul_kernels(const std::string& kernels) {
  g_matmul_kernels.store(auto_or_mma_sync("setMatmulKernels", kernels));
}

const char* cuda_matmul_kernels() { return cuda::matmul_kernels(); }
const char* cuda_prefill_kernel() { return cuda::prefill_kernel(); }
size_t cuda_decode_workspace_bytes() { return cuda::decode_workspace_bytes(); }

#if defined(DETINFER_STAMPS)
void matmul_stamps(std::vector<MatmulStampRecord>& records, std::vector<unsigned long long>& data, long long& next) {
  cuda::sm90::stamps::snapshot(records, data, next);
}
#endif

}  // namespace detinfer::ops
