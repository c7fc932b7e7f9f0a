// Matmuls through cuBLASLt (fp32, tf32, fp16, bf16, fp8 with per-tensor scales).
// Host entry points (plain C++, no device code): each checks dtypes and shapes as backend.h
// describes the op, then launches on ctx's stream. Kernels live in matmul.cu.
#pragma once

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

void matmul_forward(Context& ctx, Tensor out, Tensor inp, Tensor weight, Tensor bias,
                    const MatmulSpec& spec);
void matmul_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                     Tensor inp, Tensor weight, const MatmulSpec& spec);
// The fused forms (backend.h): GELU in cuBLASLt's epilogue or in the store kernel
// (matmul_plan.h, GeluPath), else the separate GELU kernel.
void matmul_gelu_forward(Context& ctx, Tensor out, Tensor pre, Tensor inp, Tensor weight,
                         Tensor bias, const MatmulSpec& spec);
// matmul_forward with the residual add in the store kernel (16-bit outputs with a residual of
// the same dtype: residual_in_store), else after it, in place.
void matmul_residual_forward(Context& ctx, Tensor out, Tensor residual, Tensor inp,
                             Tensor weight, Tensor bias, const MatmulSpec& spec);
// The lm_head's GEMM, its fp32 product rounded into 16-bit logits by the classifier's first pass
// (classifier.cuh) instead of by a store of its own; fp32 logits: the two ops.
void matmul_crossentropy(Context& ctx, Tensor losses, Tensor logits, Tensor inp, Tensor weight,
                         Tensor targets, int vocab_size, float dloss, const MatmulSpec& spec);
void matmul_backward_gelu(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                          Tensor inp, Tensor weight, Tensor gelu_pre, const MatmulSpec& spec);

}  // namespace mpt::cuda
