// GPT-2's tanh-approximated GELU and its derivative.
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in gelu.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void gelu_forward(Context& ctx, Tensor out, Tensor inp);
void gelu_backward(Context& ctx, Tensor dinp, Tensor inp, Tensor dout);
void gelu_forward_fp8(Context& ctx, Tensor out, Tensor inp, const Fp8Output& fp8);

}  // namespace mpt::cuda
