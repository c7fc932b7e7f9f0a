// The host-side decisions of the CUDA attention (attention.cu), as pure functions (plain C++, no
// CUDA headers) that tests check without a GPU: the batched cuBLASLt GEMMs of its six products,
// the layout of its (T, T) matrices, how many batch elements one pass takes, and the scratch
// each pass needs.
//
// The GEMM path of the op (backend.h, attention_forward) on a GPU, for what the fused kernels
// below do not take (attention_kernel): q, k, v (and dout) are gathered head-major,
// (b, h, T, HS), in the products' operand format; one strided-batched GEMM per product runs over
// the (b, h) pairs of a chunk of the batch, with the (T, T) scores and their gradients
// materialised in scratch for that chunk only - nothing (T, T) outlives the op. The GEMMs
// compute the whole (T, T) square; the softmax kernels write zeros above the diagonal, so the
// products after them are causal.
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
#include <initializer_list>

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

// ---- the fused kernels (flash_attention.cu)
// In fp16/bf16 with a head size up to kFlashMaxHead, attention runs as fused kernels that keep
// the scores on chip (FlashAttention-2, Dao 2023): per (b, h), a block of 4 warps takes
// kFlashTile query rows (16 per warp) and walks the key tiles at or below the diagonal, with
// mma.sync m16n8k16 Tensor Core products accumulating in fp32 and an online softmax; nothing
// (T, T) is written. The backward is two kernels, so that every output element has one writer
// (no atomics, deterministic): one per query tile (D = sum p dp in a first pass over the key
// tiles, then dQ), one per key tile (dK, dV). The rounding points are the op's (backend.h): p
// and ds enter their products rounded to the operand format, lse and D come from fp32 values.
constexpr int kFlashTile = 64;
constexpr int64_t kFlashMaxHead = 128;

enum class AttentionKernel { gemm, flash };
const char* attention_kernel_name(AttentionKernel k);
// The kernel attention uses in format f at head size HS: flash where it applies (fp16/bf16,
// HS <= kFlashMaxHead) unless `env` (the value of MPT_ATTENTION, null when unset) is "gemm";
// "flash" or unset pick flash where it applies. Any other value throws, naming it.
AttentionKernel attention_kernel_for(OperandFormat f, int64_t HS, const char* env);
// The same with this process's MPT_ATTENTION (read at each call: the op and the workspace
// prediction see the same value).
AttentionKernel attention_kernel(OperandFormat f, int64_t HS);
// The head size a fused kernel is compiled for: HS rounded up to 32, 64 or 128 (the operand
// tiles are zero-padded to it, which changes no product).
int flash_head_tile(int64_t HS);
// Query (or key) tiles of a sequence: ceil(T / kFlashTile), the launch grid's y dimension
// (at most 65535).
int64_t flash_tiles(int64_t T);
// Whether the fused kernels' tile loads may move 8 elements (16 bytes) at once: HS a multiple of
// 8 and every base (qkv, and dout in the backward) 16-byte aligned, so that each row segment
// they read - at multiples of 8 elements, as the row strides 3C and C are then too - is.
bool flash_vector_loads(int64_t HS, std::initializer_list<const void*> bases);
// Scratch bytes of the fused backward: D = sum_t2 p dp per row, (B, NH, T) fp32, written by the
// query-tile kernel and read by the key-tile kernel. The forward needs none.
size_t flash_backward_scratch(int64_t B, int64_t NH, int64_t T);

}  // namespace mpt::cuda
