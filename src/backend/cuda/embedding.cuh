// Token + position embedding; a deterministic backward (no float atomics).
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in embedding.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void embedding_forward(Context& ctx, Tensor out, Tensor tokens, Tensor wte, Tensor wpe);
void embedding_backward(Context& ctx, Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens);

}  // namespace mpt::cuda
