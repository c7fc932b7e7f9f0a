// AdamW on master weights writing the compute copy; stochastic rounding without a master.
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in adamw.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void adamw_update(Context& ctx, Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                  const AdamWParams& p, AdamWStats* stats);

}  // namespace mpt::cuda
