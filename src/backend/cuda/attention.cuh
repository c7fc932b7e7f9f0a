// Causal multi-head attention with materialised scores and an fp32 softmax.
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in attention.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void attention_forward(Context& ctx, Tensor out, Tensor att, Tensor qkv, int n_head);
void attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor att,
                        int n_head);

}  // namespace mpt::cuda
