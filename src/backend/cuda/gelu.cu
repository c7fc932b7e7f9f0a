// The GELU kernels (the formulas: gelu_math.cuh). Element-wise, each thread reading an
// element's inputs before writing it: dinp may be dout.
#include "backend/cuda/gelu.cuh"

#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/fp8_math.cuh"
#include "backend/cuda/gelu_math.cuh"

namespace mpt::cuda {
namespace {

template <class T>
__global__ void gelu_forward_kernel(T* out, const void* inp, DType di, int64_t n,
                                    unsigned long long* counters) {
  CastTally tally;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    store_counted(out, i, gelu_value(load_any(inp, di, i)), tally);
  }
  if (kNarrow<T>) tally.flush(counters);
}

// gelu_forward_kernel's values stored as Fp8Output says: rounded to Tr, then quantised.
template <class Tr, bool kE4M3>
__global__ void gelu_forward_fp8_kernel(uint8_t* out, const void* inp, DType di, int64_t n,
                                        float scale, unsigned* amax_bits,
                                        unsigned long long* counters) {
  CastTally tally;
  unsigned am = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = store_fp8_one<Tr, kE4M3>(gelu_value(load_any(inp, di, i)), scale, am, tally);
  tally.flush(counters);
  flush_amax(am, amax_bits);
}

template <class T>
__global__ void gelu_backward_kernel(T* dinp, const void* inp, DType di, const void* dout,
                                     DType dd, int64_t n, unsigned long long* counters) {
  CastTally tally;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float grad = gelu_derivative(load_any(inp, di, i));
    store_counted(dinp, i, __fmul_rn(grad, load_any(dout, dd, i)), tally);
  }
  if (kNarrow<T>) tally.flush(counters);
}

}  // namespace

void gelu_forward(Context& ctx, Tensor out, Tensor inp) {
  const Shape s = out.shape;
  expect_float("gelu_forward", "out", out, s);
  expect_float("gelu_forward", "inp", as_shape(inp, s), s);
  const int64_t n = out.numel();
  if (n == 0) return;
  unsigned long long* counters = ctx.cast_counters(TensorClass::activation);
  MPT_DISPATCH_FLOAT(out.dtype, "gelu_forward: out", [&] {
    gelu_forward_kernel<T><<<grid_stride_blocks(n), kBlock, 0, ctx.stream()>>>(
        static_cast<T*>(out.data), inp.data, inp.dtype, n, counters);
  });
  MPT_LAUNCH_CHECK(ctx, "gelu_forward");
  if (out.dtype != DType::f32) ctx.add_cast_values(TensorClass::activation, n);
}

void gelu_forward_fp8(Context& ctx, Tensor out, Tensor inp, const Fp8Output& fp8) {
  const char* op = "gelu_forward_fp8";
  check_fp8_output(op, out, fp8);
  const Shape s = out.shape;
  expect_float(op, "inp", as_shape(inp, s), s);
  ctx.fp8_inp_caches().forget(out.data, out.bytes());  // written by other means than a forward
  const int64_t n = out.numel();
  if (n == 0) return;
  unsigned long long* counters = ctx.cast_counters(TensorClass::activation);
  unsigned* amax_bits = fp8.q.amax ? ctx.amax_report(fp8.q.amax) : nullptr;
  auto* q = static_cast<uint8_t*>(out.data);
  MPT_DISPATCH_FLOAT(fp8.round_to, "gelu_forward_fp8: round_to", [&] {
    auto launch = [&](auto e4m3) {
      gelu_forward_fp8_kernel<T, decltype(e4m3)::value>
          <<<grid_stride_blocks(n), kBlock, 0, ctx.stream()>>>(q, inp.data, inp.dtype, n,
                                                               fp8.q.scale, amax_bits, counters);
    };
    if (fp8.q.format == DType::e4m3)
      launch(std::true_type{});
    else
      launch(std::false_type{});
  });
  MPT_LAUNCH_CHECK(ctx, op);
  // Both casts, as gelu_forward's store and the GEMM's quantisation count them.
  ctx.add_cast_values(TensorClass::activation, fp8_output_casts(fp8, n));
}

void gelu_backward(Context& ctx, Tensor dinp, Tensor inp, Tensor dout) {
  const Shape s = dinp.shape;
  expect_float("gelu_backward", "dinp", dinp, s);
  expect_float("gelu_backward", "inp", as_shape(inp, s), s);
  expect_float("gelu_backward", "dout", as_shape(dout, s), s);
  const int64_t n = dinp.numel();
  if (n == 0) return;
  unsigned long long* counters = ctx.cast_counters(TensorClass::gradient);
  MPT_DISPATCH_FLOAT(dinp.dtype, "gelu_backward: dinp", [&] {
    gelu_backward_kernel<T><<<grid_stride_blocks(n), kBlock, 0, ctx.stream()>>>(
        static_cast<T*>(dinp.data), inp.data, inp.dtype, dout.data, dout.dtype, n, counters);
  });
  MPT_LAUNCH_CHECK(ctx, "gelu_backward");
  if (dinp.dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, n);
}

}  // namespace mpt::cuda
