// Fused softmax + cross-entropy + its gradient, in place over the logits.
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in classifier.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void crossentropy_forward_backward(Context& ctx, Tensor losses, Tensor logits, Tensor targets,
                                   int vocab_size, float dloss);

// matmul_crossentropy's two halves (matmul.cu runs the GEMM between them): the classifier's
// checks of its arguments (the targets on the host), made before the GEMM; then, over 16-bit
// logits, the classifier reading the GEMM's fp32 product d (N,Vp) instead of the logits (d null:
// the logits in place, as crossentropy_forward_backward without its checks; 16-bit ones were
// stored by the GEMM itself, MPT_GEMM_OUT=direct, and are counted as its store would): it
// rounds d into the logits and counts that store as matmul_forward would, then proceeds as
// crossentropy_forward_backward. Same bits and counts as the GEMM's own store followed by
// crossentropy_forward_backward, with one pass fewer over the logits.
// check_crossentropy returns the logits' width, Vp.
int64_t check_crossentropy(Context& ctx, const char* op, const Tensor& losses,
                           const Tensor& logits, const Tensor& targets, int vocab_size);
void crossentropy_from_product(Context& ctx, Tensor losses, Tensor logits, const float* d,
                               Tensor targets, int vocab_size, float dloss);

}  // namespace mpt::cuda
