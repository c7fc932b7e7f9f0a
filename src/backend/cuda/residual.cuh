// out = a + b.
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in residual.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void residual_forward(Context& ctx, Tensor out, Tensor a, Tensor b);

}  // namespace mpt::cuda
