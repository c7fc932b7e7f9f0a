// The host-side decisions of the CUDA attention (attention.cu), as pure functions (plain C++, no
// CUDA headers) that tests check without a GPU: the batched cuBLASLt GEMMs of its six products,
// the layout of its (T, T) matrices, how many batch elements one pass takes, and the scratch
// each pass needs.
//
// The op (backend.h, attention_forward) on a GPU: q, k, v (and dout) are gathered head-major,
// (b, h, T, HS), in the products' operand format; one strided-batched GEMM per product runs over
// the (b, h) pairs of a chunk of the batch, with the (T, T) scores and their gradients
// materialised in scratch for that chunk only - nothing (T, T) outlives the op. The GEMMs
// compute the whole (T, T) square; the softmax kernels write zeros above the diagonal, so the
// products after them are causal. (A fused kernel that skips the upper triangle and keeps the
// scores on chip - FlashAttention - is the next speed step.)
//
// Row-major to column-major as in matmul_plan.h: a row-major (R, C) matrix with row stride ld is
// the column-major C x R matrix with leading dimension ld. Per (b, h), with Q, K, V, dO row-major
// (T, HS) and S, P, dP, dS row-major (T, T) with row stride Tp = attention_ld(T):
//   scores  S   = scale Q.K^T  -> D (T x T):   A = K  (op T), B = Q  (op N), alpha = scale
//   out     O   = P.V          -> D (HS x T):  A = V  (op N), B = P  (op N)
//   dprobs  dP  = dO.V^T       -> D (T x T):   A = V  (op T), B = dO (op N)
//   dq      dQ  = dS.K         -> D (HS x T):  A = K  (op N), B = dS (op N)
//   dk      dK  = dS^T.Q       -> D (HS x T):  A = Q  (op N), B = dS (op T)
//   dv      dV  = P^T.dO       -> D (HS x T):  A = dO (op N), B = P  (op T)
// Every D is fp32: the scores feed the fp32 softmax, and the results are stored into out and
// dqkv by kernels that count the narrowing casts.
#pragma once

#include <cstddef>
#include <cstdint>

#include "backend/backend.h"
#include "backend/cuda/matmul_plan.h"

namespace mpt::cuda {

// One fp32 (T, T) scratch buffer of a chunk stays within this (unless one batch element alone
// needs more): the chunk's (T, T) matrices - scores, their gradients and, in fp16/bf16, the
// rounded operands - then take at most 3x this.
constexpr size_t kAttentionChunkBytes = size_t{512} << 20;

// The GEMM operand type of an operand format (tf32 operands are stored as fp32) and its compute
// type (CUBLAS_COMPUTE_32F_FAST_TF32 for tf32).
GemmType attention_gemm_type(OperandFormat f);
GemmCompute attention_compute(OperandFormat f);

// The row stride of the (T, T) matrices: T rounded up to a multiple of 8 elements, so that each
// row of an fp16/bf16 matrix starts 16-byte aligned (as Tensor Core GEMMs prefer).
int64_t attention_ld(int64_t T);

// Batch elements per pass: as many as keep one fp32 (T, T) buffer of the chunk (chunk x NH x T x
// attention_ld(T) floats) within kAttentionChunkBytes and chunk x NH GEMMs within a batched
// GEMM's 65535, at least 1, at most B.
int64_t attention_batch_chunk(int64_t B, int64_t NH, int64_t T);

enum class AttentionGemm { scores, out, dprobs, dq, dk, dv };
const char* attention_gemm_name(AttentionGemm g);

// The batched GEMM `g` over `heads` (b, h) pairs of sequence T and head size HS, in format f.
// `scale` is the scores' alpha (ignored by the others).
GemmPlan plan_attention_gemm(AttentionGemm g, int64_t heads, int64_t T, int64_t HS,
                             OperandFormat f, float scale);

// Scratch bytes of one pass over `chunk` batch elements (attention.cu asks for exactly these):
//   scores:   fp32 (T, T) per (b, h): the scores, then the probabilities in place (fp32 format)
//   grads:    backward: fp32 d(probabilities), then d(scores) in place (fp32 format)
//   operands: fp16/bf16 formats: the rounded probabilities (and backward: score gradients)
//   heads:    q, k, v (backward: and dout) gathered head-major in the operand type
//   result:   out (backward: dq, dk, dv) head-major in fp32, before the counted stores
struct AttentionScratch {
  size_t scores = 0, grads = 0, operands = 0, heads = 0, result = 0;
};
AttentionScratch attention_scratch(bool backward, int64_t chunk, int64_t NH, int64_t T,
                                   int64_t HS, OperandFormat f);

}  // namespace mpt::cuda
