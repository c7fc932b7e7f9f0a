// out = a + b, elementwise; inputs and output each fp32, fp16 or bf16.
#include "backend/cuda/residual.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {
namespace {

template <class T>
__global__ void residual_kernel(T* out, const void* a, DType da, const void* b, DType db,
                                int64_t n, unsigned long long* counters) {
  CastTally tally;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    store_counted(out, i, __fadd_rn(load_any(a, da, i), load_any(b, db, i)), tally);
  if (kNarrow<T>) tally.flush(counters);
}

}  // namespace

void residual_forward(Context& ctx, Tensor out, Tensor a, Tensor b) {
  const Shape s = out.shape;
  expect_float("residual_forward", "out", out, s);
  expect_float("residual_forward", "a", as_shape(a, s), s);
  expect_float("residual_forward", "b", as_shape(b, s), s);
  const int64_t n = out.numel();
  if (n == 0) return;
  unsigned long long* counters = ctx.cast_counters(TensorClass::activation);
  MPT_DISPATCH_FLOAT(out.dtype, "residual_forward: out", [&] {
    residual_kernel<T><<<grid_stride_blocks(n), kBlock, 0, ctx.stream()>>>(
        static_cast<T*>(out.data), a.data, a.dtype, b.data, b.dtype, n, counters);
  });
  MPT_LAUNCH_CHECK(ctx, "residual_forward");
  if (out.dtype != DType::f32) ctx.add_cast_values(TensorClass::activation, n);
}

}  // namespace mpt::cuda
