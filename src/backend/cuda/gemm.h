// Runs one cuBLASLt GEMM as a GemmPlan (matmul_plan.h) describes it: descriptors built per call,
// the algorithm chosen by cuBLASLt's heuristic once per GemmKey and cached in the Context. Host
// code (no kernels), shared by the matmuls and the attention.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"
#include "backend/cuda/matmul_plan.h"

namespace mpt::cuda {

struct GemmArgs {
  const void* a = nullptr;
  const void* b = nullptr;
  float* d = nullptr;  // fp32, also C (beta)
  const void* bias = nullptr;  // with the BIAS epilogue
  DType bias_dtype = DType::f32;
  const float* scale_a = nullptr;  // fp8: device inverse scales
  const float* scale_b = nullptr;
};

// D = alpha op(A) op(B) (times the fp8 inverse scales) + beta D (+ bias), as the plan says, on
// ctx's stream; batched when p.batch > 1. When cuBLASLt has no algorithm: throws naming the
// GEMM (`what`) and its key, or with `may_fail` returns false (nothing ran; remembered per key).
bool run_gemm(Context& ctx, const GemmPlan& p, const GemmArgs& g, const char* what,
              bool may_fail = false);

}  // namespace mpt::cuda
