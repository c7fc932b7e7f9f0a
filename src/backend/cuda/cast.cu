// Casts between any float dtypes (fp32, fp16, bf16, fp8 e4m3/e5m2), amax and the non-finite
// count. Conversions go through core/formats.h (host and device code): the same bits as the CPU
// backend's, NaN encodings included. The reductions are per-block partials (integer max and
// sums: exact, order-independent) combined on the host.
#include "backend/cuda/cast.cuh"

#include <algorithm>
#include <cstring>

#include "backend/cuda/cuda_common.cuh"
#include "core/formats.h"

namespace mpt::cuda {
namespace {

// Storage types by dtype: float, or core/formats.h's bit structs.
template <class S>
__device__ __forceinline__ float widen(S x) { return to_float(x); }
template <>
__device__ __forceinline__ float widen<float>(float x) { return x; }

template <class D>
__device__ __forceinline__ D narrow(float x);
template <>
__device__ __forceinline__ float narrow<float>(float x) { return x; }
template <>
__device__ __forceinline__ f16 narrow<f16>(float x) { return f16_from_float(x); }
template <>
__device__ __forceinline__ bf16 narrow<bf16>(float x) { return bf16_from_float(x); }
template <>
__device__ __forceinline__ e4m3 narrow<e4m3>(float x) { return e4m3_from_float(x); }
template <>
__device__ __forceinline__ e5m2 narrow<e5m2>(float x) { return e5m2_from_float(x); }

template <class S, class D>
__global__ void cast_kernel(D* dst, const S* src, int64_t n, float maxf,
                            unsigned long long* counters) {
  CastTally tally;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float x = widen<S>(src[i]);
    const D y = narrow<D>(x);
    dst[i] = y;
    if (!std::is_same<D, float>::value) tally.add(x, widen<D>(y), maxf);
  }
  if (!std::is_same<D, float>::value) tally.flush(counters);
}

// Runs f(T{}) with T the storage type of float dtype dt.
template <class F>
void dispatch_any_float(DType dt, const char* what, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(f16{}); return;
    case DType::bf16: f(bf16{}); return;
    case DType::e4m3: f(e4m3{}); return;
    case DType::e5m2: f(e5m2{}); return;
    case DType::i32: break;
  }
  throw RuntimeError(std::string(what) + ": expected a float tensor, got " + dtype_name(dt));
}

void expect_any_float(const char* op, const char* arg, const Tensor& t) {
  if (!t.defined() || !dtype_is_float(t.dtype))
    throw RuntimeError(std::string(op) + ": argument '" + arg + "' expected a float tensor, got " +
                       (t.defined() ? dtype_name(t.dtype) : "undefined") + t.shape.str());
}

// Per-block reductions: blocks of kBlock threads, at most kMaxReduceBlocks of them
// (reduce_blocks(), workspace_plan.h).

// max over the block of unsigned values; every thread calls it; thread 0 gets the result.
__device__ __forceinline__ unsigned block_max_u32(unsigned v, unsigned* shared) {
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned m = 0;
  if (threadIdx.x == 0)
    for (unsigned w = 0; w < blockDim.x / 32; ++w) m = max(m, shared[w]);
  return m;
}

__device__ __forceinline__ unsigned long long block_sum_u64(unsigned long long v,
                                                            unsigned long long* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned long long s = 0;
  if (threadIdx.x == 0)
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += shared[w];
  return s;
}

// partial[block] = the largest magnitude bit pattern (sign cleared) of the widened values: a
// NaN's exceeds infinity's, so a NaN wins, as on the CPU.
template <class S>
__global__ void amax_kernel(const S* x, int64_t n, unsigned* partial) {
  __shared__ unsigned shared[32];
  unsigned m = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    m = max(m, __float_as_uint(widen<S>(x[i])) & 0x7FFFFFFFu);
  m = block_max_u32(m, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = m;
}

template <class S>
__global__ void nonfinite_kernel(const S* x, int64_t n, unsigned long long* partial) {
  __shared__ unsigned long long shared[32];
  unsigned long long c = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    c += (__float_as_uint(widen<S>(x[i])) & 0x7FFFFFFFu) >= 0x7F800000u;
  c = block_sum_u64(c, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = c;
}


// Copies `blocks` partial results of type P from scratch to pinned host memory and waits.
template <class P>
const P* read_partials(Context& ctx, const P* dev, unsigned blocks, const char* what) {
  P* host = static_cast<P*>(ctx.pinned(blocks * sizeof(P)));
  MPT_CUDA_CHECK(cudaMemcpyAsync(host, dev, blocks * sizeof(P), cudaMemcpyDeviceToHost,
                                 ctx.stream()));
  ctx.sync(what);
  return host;
}

}  // namespace

void cast(Context& ctx, Tensor dst, Tensor src, TensorClass cls) {
  expect_any_float("cast", "dst", dst);
  expect_any_float("cast", "src", src);
  if (dst.numel() != src.numel())
    throw RuntimeError("cast: arguments 'dst' " + dst.shape.str() + " and 'src' " +
                       src.shape.str() + " hold different numbers of elements");
  const int64_t n = dst.numel();
  if (n == 0) return;
  const float maxf = static_cast<float>(dtype_traits(dst.dtype).max_finite);
  unsigned long long* counters = ctx.cast_counters(cls);
  dispatch_any_float(src.dtype, "cast: src", [&](auto s) {
    using S = decltype(s);
    dispatch_any_float(dst.dtype, "cast: dst", [&](auto d) {
      using D = decltype(d);
      cast_kernel<S, D><<<grid_stride_blocks(n), kBlock, 0, ctx.stream()>>>(
          static_cast<D*>(dst.data), static_cast<const S*>(src.data), n, maxf, counters);
      MPT_LAUNCH_CHECK(ctx, "cast");
    });
  });
  if (dst.dtype != DType::f32) ctx.add_cast_values(cls, n);
}

float amax(Context& ctx, Tensor t) {
  expect_any_float("amax", "t", t);
  const int64_t n = t.numel();
  if (n == 0) return 0.0f;
  const unsigned blocks = reduce_blocks(n);
  unsigned* partial = static_cast<unsigned*>(ctx.scratch(Scratch::kReduce, blocks * sizeof(unsigned)));
  dispatch_any_float(t.dtype, "amax", [&](auto s) {
    using S = decltype(s);
    amax_kernel<S><<<blocks, kBlock, 0, ctx.stream()>>>(static_cast<const S*>(t.data), n, partial);
    MPT_LAUNCH_CHECK(ctx, "amax");
  });
  const unsigned* host = read_partials(ctx, partial, blocks, "amax");
  unsigned m = 0;
  for (unsigned b = 0; b < blocks; ++b) m = std::max(m, host[b]);
  float f;
  std::memcpy(&f, &m, sizeof f);
  return f;
}

int64_t count_nonfinite(Context& ctx, Tensor t) {
  expect_any_float("count_nonfinite", "t", t);
  const int64_t n = t.numel();
  if (n == 0) return 0;
  const unsigned blocks = reduce_blocks(n);
  auto* partial = static_cast<unsigned long long*>(
      ctx.scratch(Scratch::kReduce, blocks * sizeof(unsigned long long)));
  dispatch_any_float(t.dtype, "count_nonfinite", [&](auto s) {
    using S = decltype(s);
    nonfinite_kernel<S><<<blocks, kBlock, 0, ctx.stream()>>>(static_cast<const S*>(t.data), n,
                                                             partial);
    MPT_LAUNCH_CHECK(ctx, "count_nonfinite");
  });
  const unsigned long long* host = read_partials(ctx, partial, blocks, "count_nonfinite");
  int64_t c = 0;
  for (unsigned b = 0; b < blocks; ++b) c += static_cast<int64_t>(host[b]);
  return c;
}

}  // namespace mpt::cuda
