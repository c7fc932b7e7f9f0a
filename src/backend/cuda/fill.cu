// Fill: the value is rounded once on the host (core/formats.h, as the CPU backend rounds it) and
// its bit pattern replicated on the device. A fill is not a counted cast.
#include "backend/cuda/fill.cuh"

#include <cstring>

#include "backend/cuda/cuda_common.cuh"
#include "core/formats.h"

namespace mpt::cuda {
namespace {

template <class U>
__global__ void fill_kernel(U* p, int64_t n, U bits) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    p[i] = bits;
}

template <class U>
void launch_fill(Context& ctx, void* p, int64_t n, U bits) {
  fill_kernel<U><<<grid_stride_blocks(n), kBlock, 0, ctx.stream()>>>(static_cast<U*>(p), n, bits);
  MPT_LAUNCH_CHECK(ctx, "fill");
}

}  // namespace

void fill(Context& ctx, Tensor t, float value) {
  if (!t.defined() || !dtype_is_float(t.dtype))
    throw RuntimeError(std::string("fill: argument 't' expected a float tensor, got ") +
                       (t.defined() ? dtype_name(t.dtype) : "undefined") + t.shape.str());
  const int64_t n = t.numel();
  if (n == 0) return;
  switch (t.dtype) {
    case DType::f32: {
      uint32_t u;
      std::memcpy(&u, &value, sizeof u);
      launch_fill<uint32_t>(ctx, t.data, n, u);
      return;
    }
    case DType::f16: launch_fill<uint16_t>(ctx, t.data, n, f16_from_float(value).bits); return;
    case DType::bf16: launch_fill<uint16_t>(ctx, t.data, n, bf16_from_float(value).bits); return;
    case DType::e4m3: launch_fill<uint8_t>(ctx, t.data, n, e4m3_from_float(value).bits); return;
    case DType::e5m2: launch_fill<uint8_t>(ctx, t.data, n, e5m2_from_float(value).bits); return;
    case DType::i32: break;
  }
  throw RuntimeError("fill: not a float dtype");
}

}  // namespace mpt::cuda
