// GPT-2's tanh-approximated GELU and its derivative, with the CPU backend's expressions in the
// same order (explicit round-to-nearest intrinsics: nvcc would otherwise contract products and
// sums into FMAs), and its tanh through one exp: 1 - 2 / (exp(2u) + 1). The results differ
// from the CPU's only by expf's error (CUDA's expf is within 2 ulp).
#include "backend/cuda/gelu.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {
namespace {

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;

__device__ __forceinline__ float tanh_via_exp(float u) {
  return __fsub_rn(1.0f, __fdiv_rn(2.0f, __fadd_rn(expf(__fmul_rn(2.0f, u)), 1.0f)));
}

// tanh(sqrt(2/pi) * (v + 0.044715 v^3)), the products left to right as the CPU writes them.
__device__ __forceinline__ float gelu_tanh(float v) {
  const float cube = __fmul_rn(__fmul_rn(__fmul_rn(kGeluCubic, v), v), v);
  return tanh_via_exp(__fmul_rn(kGeluScale, __fadd_rn(v, cube)));
}

template <class T>
__global__ void gelu_forward_kernel(T* out, const void* inp, DType di, int64_t n,
                                    unsigned long long* counters) {
  CastTally tally;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = load_any(inp, di, i);
    // 0.5f * v * (1.0f + tanh)
    const float y = __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, gelu_tanh(v)));
    store_counted(out, i, y, tally);
  }
  if (kNarrow<T>) tally.flush(counters);
}

template <class T>
__global__ void gelu_backward_kernel(T* dinp, const void* inp, DType di, const void* dout,
                                     DType dd, int64_t n, unsigned long long* counters) {
  CastTally tally;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = load_any(inp, di, i);
    const float th = gelu_tanh(v);
    const float sech2 = __fsub_rn(1.0f, __fmul_rn(th, th));
    // 0.5f * (1.0f + th) + 0.5f * v * sech2 * kGeluScale * (1.0f + 3.0f * kGeluCubic * v * v)
    const float poly =
        __fadd_rn(1.0f, __fmul_rn(__fmul_rn(__fmul_rn(3.0f, kGeluCubic), v), v));
    const float right =
        __fmul_rn(__fmul_rn(__fmul_rn(__fmul_rn(0.5f, v), sech2), kGeluScale), poly);
    const float grad = __fadd_rn(__fmul_rn(0.5f, __fadd_rn(1.0f, th)), right);
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
