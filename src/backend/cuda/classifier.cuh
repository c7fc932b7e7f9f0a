// Fused softmax + cross-entropy + its gradient, in place over the logits.
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in classifier.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void crossentropy_forward_backward(Context& ctx, Tensor losses, Tensor logits, Tensor targets,
                                   int vocab_size, float dloss);

}  // namespace mpt::cuda
