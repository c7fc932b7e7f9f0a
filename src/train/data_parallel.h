// The trainer's data-parallel steps over the CPU backend's host memory: the gradient all-reduce
// and ZeRO-1's gathering of the weights each process updated (docs/architecture.md, "Data
// parallel").
#pragma once

#include <vector>

#include "core/tensor.h"
#include "dist/communicator.h"
#include "optim/adamw.h"

namespace mpt {

// Sums the gradient slab `grads` (host memory) over the processes, in place. fp32 gradients are
// summed as they are; 16-bit ones are widened to fp32 (into `scratch`), summed in fp32 and
// rounded to nearest once, so that the reduction adds no rounding per process.
void all_reduce_gradients(dist::Communicator& comm, Tensor grads, std::vector<float>& scratch);

// ZeRO-1: every process updated the parameter elements of its range (`ranges[rank]`) of the
// parameter slab `params` (host memory); afterwards every process holds all of them.
void gather_parameters(dist::Communicator& comm, Tensor params,
                       const std::vector<SlabRange>& ranges);

}  // namespace mpt
