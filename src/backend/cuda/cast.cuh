// Casts with cast statistics, amax and the non-finite count (backend.h).
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in cast.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void cast(Context& ctx, Tensor dst, Tensor src, TensorClass cls);
float amax(Context& ctx, Tensor t);
int64_t count_nonfinite(Context& ctx, Tensor t);

}  // namespace mpt::cuda
