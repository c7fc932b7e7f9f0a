// Sum of squares in fp64, in a fixed order (deterministic).
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in norm.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

double sum_squares(Context& ctx, Tensor t);

}  // namespace mpt::cuda
