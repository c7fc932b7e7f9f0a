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
  void* d = nullptr;  // in the plan's d_type (fp32 unless a direct bf16 output), also C (beta)
  GemmEpilogue epilogue = GemmEpilogue::none;
  const void* bias = nullptr;  // with BIAS and GELU_AUX_BIAS; written by BGRADB
  DType bias_dtype = DType::f32;
  // With GELU_AUX[_BIAS] (written: the pre-activation) and DGELU (read: the GELU's input): fp32,
  // D's shape and leading dimension.
  void* aux = nullptr;
  const float* scale_a = nullptr;  // fp8: device inverse scales
  const float* scale_b = nullptr;
};

// D = alpha op(A) op(B) (times the fp8 inverse scales) + beta D (+ bias), as the plan says, on
// ctx's stream, through g.epilogue (throws RuntimeError when its bias or aux pointer is missing
// or is given without it); batched when p.batch > 1. When cuBLASLt has no algorithm, or refuses
// the call (NOT_SUPPORTED, INVALID_VALUE): throws naming the GEMM (`what`) and its key, or with
// `may_fail` returns false (nothing ran; remembered per key).
bool run_gemm(Context& ctx, const GemmPlan& p, const GemmArgs& g, const char* what,
              bool may_fail = false);

}  // namespace mpt::cuda
