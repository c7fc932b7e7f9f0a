// The fused causal attention of fp16/bf16 formats (attention_plan.h, "the fused kernels"): the
// scores stay on chip, nothing (T, T) is written. Called by attention.cu's entry points, which
// have checked dtypes and shapes and picked this path (attention_kernel): qkv (and, backward,
// dout) are of the operand format's dtype, out and dqkv any float dtype. Kernels live in
// flash_attention.cu.
#pragma once

#include <cstdint>

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"

namespace mpt::cuda {

struct FlashDims {
  int64_t B, T, C, NH, HS;
};

// out (B, T, C) and lse (B, NH, T) fp32 from qkv (B, T, 3C); out's narrowing stores counted as
// activations.
void flash_attention_forward(Context& ctx, Tensor out, Tensor lse, Tensor qkv,
                             const FlashDims& d);
// dqkv (B, T, 3C), written (not accumulated); its narrowing stores counted as gradients.
void flash_attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse,
                              const FlashDims& d);

}  // namespace mpt::cuda
