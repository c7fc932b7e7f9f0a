// GPT-2's tanh-approximated GELU and its derivative as device functions, shared by the GELU
// kernels (gelu.cu) and the matmul store kernels that fuse them (matmul.cu), so that a fused
// and a separate GELU give the same bits.
//
// The CPU backend's expressions in the same order, with explicit round-to-nearest intrinsics
// (nvcc would otherwise contract products and sums into FMAs), and tanh through one exp:
// 1 - 2 / (exp(2u) + 1). The results differ from the CPU's only by expf's error (CUDA's expf is
// within 2 ulp).
#pragma once

namespace mpt::cuda {

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

// 0.5f * v * (1.0f + tanh)
__device__ __forceinline__ float gelu_value(float v) {
  return __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, gelu_tanh(v)));
}

// gelu'(v) = 0.5f * (1.0f + th) + 0.5f * v * sech2 * kGeluScale * (1.0f + 3.0f * kGeluCubic * v * v)
__device__ __forceinline__ float gelu_derivative(float v) {
  const float th = gelu_tanh(v);
  const float sech2 = __fsub_rn(1.0f, __fmul_rn(th, th));
  const float poly = __fadd_rn(1.0f, __fmul_rn(__fmul_rn(__fmul_rn(3.0f, kGeluCubic), v), v));
  const float right =
      __fmul_rn(__fmul_rn(__fmul_rn(__fmul_rn(0.5f, v), sech2), kGeluScale), poly);
  return __fadd_rn(__fmul_rn(0.5f, __fadd_rn(1.0f, th)), right);
}

}  // namespace mpt::cuda
