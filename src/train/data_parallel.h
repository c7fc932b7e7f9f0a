// The trainer's data-parallel steps: the gradient all-reduce (host memory through MPI, a GPU's
// through NCCL) and ZeRO-1's gathering of the weights each process updated (host memory).
// docs/architecture.md, "Data parallel".
#pragma once

#include <vector>

#include "backend/backend.h"
#include "core/tensor.h"
#include "dist/communicator.h"
#include "optim/adamw.h"

namespace mpt {

// Sums a gradient slab over the processes, in place, in fp32: fp32 gradients as they are; 16-bit
// ones are widened into an fp32 buffer of the backend's, summed and rounded to nearest once (a
// narrowing cast counted under gradients, like any other), so the reduction adds no rounding
// per process. Host memory goes through the communicator's host sum, a GPU's through its device
// sum on the backend's stream.
class GradientReducer {
 public:
  // InputError when the gradients live where `comm` cannot reduce them (a GPU's without NCCL).
  GradientReducer(dist::Communicator& comm, Backend& backend, Tensor grads);
  void all_reduce();

 private:
  dist::Communicator& comm_;
  Backend& be_;
  Tensor grads_;
  Buffer wide_;  // fp32 copy of 16-bit gradients
};

// ZeRO-1: every process updated the parameter elements of its range (`ranges[rank]`) of the
// parameter slab `params` (the backend's memory: host, or a GPU's through NCCL on the backend's
// stream); afterwards every process holds all of them.
void gather_parameters(dist::Communicator& comm, Backend& backend, Tensor params,
                       const std::vector<SlabRange>& ranges);

}  // namespace mpt
