// Fill every element of t with value rounded to its dtype (a fill is not a counted cast).
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in fill.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void fill(Context& ctx, Tensor t, float value);

}  // namespace mpt::cuda
