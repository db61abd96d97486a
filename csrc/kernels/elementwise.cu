// Elementwise ops (CUDA):
//   embedding  out[T,H] = table[ids[t], :]                 any dtype; table [V,H], ids i32 [T]
//   rope       x [T, heads, D] bf16 rotated in place (rotate-half) at positions i32 [T],
//              cos_sin f32 [max_pos, D] = cos of the D/2 frequencies, then their sin
//   silu_mul   out = bf16(bf16(silu(gate)) * up)           bf16 [T, I]
//   silu_mul_packed  the same with gate and up the two halves of one row: gate_up [T, 2I] -> out [T, I]
//   add        out = bf16(a + b)                           bf16
//   cast       dst = src between f32, bf16 and f16
// Invariant by nature: each output element is computed from its own inputs alone, so nothing
// depends on the batch. The roundings are the CPU backend's (csrc/cpu/elementwise.cc):
// RoPE y1 = bf16(bf16(x1*c) + bf16(-x2*s)), y2 = bf16(bf16(x2*c) + bf16(x1*s)), c,s = bf16(table).
// Out-of-range ids or positions (validated by the host; checked here only so a bad index cannot
// read outside the tables) give zero rows, or leave the row unrotated.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../cuda/check.h"
#include "../cuda/runtime.h"
#include "cuda_ops.h"
#include "pdl.cuh"
#include "rope_pair.cuh"
#include "silu_mul.cuh"

namespace detinfer::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;

cudaStream_t device_stream() { return static_cast<cudaStream_t>(cuda_runtime::stream()); }

unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks))); }

#define GRID_STRIDE(i, n)                                                                 \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ---------------------------------------------------------------------------------------------
// embedding: one block per row; the row copied in `Word` units (16 bytes when sizes allow).
template <typename Word>
__global__ void embedding_kernel(Word* out, const Word* table, const int32_t* ids, int64_t vocab, int64_t words) {
  pdl_wait();
  pdl_launch_dependents();
  int64_t t = blockIdx.x;
  int32_t id = ids[t];
  bool valid = id >= 0 && id < vocab;
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x)
    out[t * words + i] = valid ? table[static_cast<int64_t>(id) * words + i] : Word{};
}

// ---------------------------------------------------------------------------------------------
// rope: one thread per (token, head, i < D/2) pair of elements (i, i + D/2).
__global__ void rope_kernel(__nv_bfloat16* x, const int32_t* positions, const float* cos_sin, int64_t tokens,
                            int64_t heads, int64_t dim, int64_t max_pos) {
  int64_t half = dim / 2, n = tokens * heads * half;
  GRID_STRIDE(idx, n) {
    int64_t i = idx % half, th = idx / half, t = th / heads;
    int32_t pos = positions[t];
    if (pos < 0 || pos >= max_pos) continue;
    const float* cs = cos_sin + static_cast<int64_t>(pos) * dim;
    __nv_bfloat16* v = x + th * dim;
    rope_pair::rotate(v[i], v[i + half], __bfloat162float(v[i]), __bfloat162float(v[i + half]), cs[i], cs[half + i]);
  }
}

// ---------------------------------------------------------------------------------------------
// silu_mul: out = bf16(bf16(silu(g)) * u), silu_mul.cuh's expression (also the fused gate/up
// product's epilogue).
__global__ void silu_mul_kernel(__nv_bfloat16* out, const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n) {
  GRID_STRIDE(i, n) out[i] = silu_mul_value(gate[i], up[i]);
}

// silu_mul_packed: gate_up [rows, 2I] holds gate in columns [0, I) and up in [I, 2I).
__global__ void silu_mul_packed_kernel(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int64_t rows, int64_t I) {
  GRID_STRIDE(idx, rows * I) {
    const __nv_bfloat16* row = gate_up + (idx / I) * 2 * I;
    int64_t i = idx % I;
    out[idx] = silu_mul_value(row[i], row[I + i]);
  }
}

__global__ void add_kernel(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n) {
  GRID_STRIDE(i, n) out[i] = __float2bfloat16_rn(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}

// ---------------------------------------------------------------------------------------------
// cast: every value goes through fp32 (exact for bf16 and f16), then rounds to nearest even.
__device__ __forceinline__ float load_as_f32(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_f32(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

__global__ void cast_kernel(void* dst, DType dst_type, const void* src, DType src_type, int64_t n) {
  GRID_STRIDE(i, n) store_from_f32(dst, dst_type, i, load_as_f32(src, src_type, i));
}

std::string shape_of(const Tensor& t) { return t.describe(); }

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

void embedding(Tensor& out, const Tensor& table, const Tensor& ids) {
  int64_t rows = ids.dim(0), vocab = table.dim(0);
  size_t row_bytes = static_cast<size_t>(table.dim(1)) * dtype_size(table.dtype);
  if (rows == 0 || row_bytes == 0) return;
  DI_CHECK(rows <= 0x7fffffff, "embedding: too many ids (", rows, ")");
  cudaStream_t stream = device_stream();
  unsigned grid = static_cast<unsigned>(rows);
  const int32_t* id = ids.ptr<int32_t>();
  if (row_bytes % 16 == 0 && aligned(out.data(), 16) && aligned(table.data(), 16)) {
    launch_overlapped(embedding_kernel<uint4>, grid, kThreads, 0, stream, out.ptr<uint4>(), table.ptr<uint4>(), id,
                      vocab, static_cast<int64_t>(row_bytes / 16));
  } else if (row_bytes % 4 == 0 && aligned(out.data(), 4) && aligned(table.data(), 4)) {
    launch_overlapped(embedding_kernel<uint32_t>, grid, kThreads, 0, stream, out.ptr<uint32_t>(),
                      table.ptr<uint32_t>(), id, vocab, static_cast<int64_t>(row_bytes / 4));
  } else {
    launch_overlapped(embedding_kernel<uint16_t>, grid, kThreads, 0, stream, out.ptr<uint16_t>(),
                      table.ptr<uint16_t>(), id, vocab, static_cast<int64_t>(row_bytes / 2));
  }
  CUDA_CHECK_LAUNCH("embedding", shape_of(out) + " from " + shape_of(table));
}

void rope(Tensor& x, const Tensor& positions, const Tensor& cos_sin) {
  int64_t tokens = x.dim(0), heads = x.dim(1), dim = x.dim(2);
  int64_t n = tokens * heads * (dim / 2);
  if (n == 0) return;
  rope_kernel<<<grid_for(n), kThreads, 0, device_stream()>>>(x.ptr<__nv_bfloat16>(), positions.ptr<int32_t>(),
                                                             cos_sin.ptr<float>(), tokens, heads, dim,
                                                             cos_sin.dim(0));
  CUDA_CHECK_LAUNCH("rope", shape_of(x));
}

void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up) {
  int64_t n = out.numel();
  if (n == 0) return;
  silu_mul_kernel<<<grid_for(n), kThreads, 0, device_stream()>>>(out.ptr<__nv_bfloat16>(), gate.ptr<__nv_bfloat16>(),
                                                                 up.ptr<__nv_bfloat16>(), n);
  CUDA_CHECK_LAUNCH("silu_mul", shape_of(out));
}

void silu_mul_packed(Tensor& out, const Tensor& gate_up) {
  int64_t rows = out.dim(0), I = out.dim(1);
  if (rows * I == 0) return;
  silu_mul_packed_kernel<<<grid_for(rows * I), kThreads, 0, device_stream()>>>(
      out.ptr<__nv_bfloat16>(), gate_up.ptr<__nv_bfloat16>(), rows, I);
  CUDA_CHECK_LAUNCH("silu_mul_packed", shape_of(gate_up));
}

void add(Tensor& out, const Tensor& a, const Tensor& b) {
  int64_t n = out.numel();
  if (n == 0) return;
  add_kernel<<<grid_for(n), kThreads, 0, device_stream()>>>(out.ptr<__nv_bfloat16>(), a.ptr<__nv_bfloat16>(),
                                                            b.ptr<__nv_bfloat16>(), n);
  CUDA_CHECK_LAUNCH("add", shape_of(out));
}

void cast(Tensor& dst, const Tensor& src) {
  int64_t n = src.numel();
  if (n == 0) return;
  cast_kernel<<<grid_for(n), kThreads, 0, device_stream()>>>(dst.data(), dst.dtype, src.data(), src.dtype, n);
  CUDA_CHECK_LAUNCH("cast", shape_of(src) + " to " + dtype_name(dst.dtype));
}

}  // namespace detinfer::cuda
