// AdamW on master weights writing the compute copy; stochastic rounding without a master.
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in adamw.cu.
#pragma once

#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void adamw_update(Context& ctx, Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                  const AdamWParams& p, AdamWStats* stats);
// Backend::adamw_update_many: the tensors' arguments checked and their disjointness, then up to
// kAdamWTensorsPerLaunch tensors a launch (adamw_plan.h).
void adamw_update_many(Context& ctx, const std::vector<AdamWTensors>& all, AdamWStats* stats);

}  // namespace mpt::cuda
