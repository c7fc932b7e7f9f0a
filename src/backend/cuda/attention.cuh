// Causal multi-head attention (backend.h): batched cuBLASLt GEMMs for its products, an fp32
// softmax between them, only each row's log-sum-exp kept for the backward (attention_plan.h).
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in attention.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void attention_forward(Context& ctx, Tensor out, Tensor lse, Tensor qkv, int n_head,
                       MatmulPrecision prec);
void attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse,
                        int n_head, MatmulPrecision prec);

}  // namespace mpt::cuda
