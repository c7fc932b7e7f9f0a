// Sum of squares in fp64 in the CPU backend's order, so the result is bit-identical to it:
// chunks of kChunk elements, each summed sequentially by one thread (explicit round-to-nearest
// fp64 arithmetic: no FMA contraction), then the chunks' sums added in order on the host.
#include "backend/cuda/norm.cuh"

#include "backend/cuda/cuda_common.cuh"
#include "core/formats.h"

namespace mpt::cuda {
namespace {

constexpr int64_t kChunk = kNormChunk;  // as CpuBackend::sum_squares (workspace_plan.h)
constexpr int kNormBlock = 128;

template <class S>
__device__ __forceinline__ double widen_f64(S x) { return to_float(x); }
template <>
__device__ __forceinline__ double widen_f64<float>(float x) { return x; }

template <class S>
__global__ void sum_squares_kernel(const S* x, int64_t n, int64_t nchunks, double* partial) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c >= nchunks) return;
  const int64_t i0 = c * kChunk, i1 = min(n, i0 + kChunk);
  double s = 0.0;
  for (int64_t i = i0; i < i1; ++i) {
    const double v = widen_f64<S>(x[i]);
    s = __dadd_rn(s, __dmul_rn(v, v));
  }
  partial[c] = s;
}

template <class S>
void launch(Context& ctx, const Tensor& t, int64_t n, int64_t nchunks, double* partial) {
  sum_squares_kernel<S><<<blocks_for(nchunks, kNormBlock), kNormBlock, 0, ctx.stream()>>>(
      static_cast<const S*>(t.data), n, nchunks, partial);
}

}  // namespace

double sum_squares(Context& ctx, Tensor t) {
  if (!t.defined() || !dtype_is_float(t.dtype))
    throw RuntimeError(std::string("sum_squares: argument 't' expected a float tensor, got ") +
                       (t.defined() ? dtype_name(t.dtype) : "undefined") + t.shape.str());
  const int64_t n = t.numel();
  if (n == 0) return 0.0;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  auto* partial = static_cast<double*>(ctx.scratch(Scratch::kReduce, sum_squares_scratch_bytes(n)));
  switch (t.dtype) {
    case DType::f32: launch<float>(ctx, t, n, nchunks, partial); break;
    case DType::f16: launch<f16>(ctx, t, n, nchunks, partial); break;
    case DType::bf16: launch<bf16>(ctx, t, n, nchunks, partial); break;
    case DType::e4m3: launch<e4m3>(ctx, t, n, nchunks, partial); break;
    case DType::e5m2: launch<e5m2>(ctx, t, n, nchunks, partial); break;
    case DType::i32: break;
  }
  MPT_LAUNCH_CHECK(ctx, "sum_squares");
  auto* host = static_cast<double*>(ctx.pinned(static_cast<size_t>(nchunks) * sizeof(double)));
  MPT_CUDA_CHECK(cudaMemcpyAsync(host, partial, static_cast<size_t>(nchunks) * sizeof(double),
                                 cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.sync("sum_squares");
  double total = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) total += host[c];
  return total;
}

}  // namespace mpt::cuda
