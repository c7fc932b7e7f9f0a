// The CUDA backend's workspace, predicted on the host: the cuBLASLt workspace and the bytes each
// scratch role (cuda::Context::scratch) grows to. Plain C++ (no CUDA headers), built with or
// without nvcc, so the memory ledger can predict a GPU run's workspace anywhere and tests check
// it without a GPU. The constants below are the ones the kernels use (the .cu files include
// this header); the plan_* functions ask for what the ops ask for, op by op.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "backend/backend.h"

namespace mpt::cuda {

// Scratch roles: each op argument position that needs temporary device memory has its own, so
// no two temporaries of one op share memory. Grow-only; their sizes count in workspace_bytes().
enum class Scratch : int {
  kReduce,     // per-block partial results of reductions (amax, sums, counts)
  kOperandA,   // fp8 (or transposed) copy of a matmul's first operand
  kOperandB,   // ... of its second operand
  kAttScores,    // attention: a chunk's scores, then probabilities (fp32, T x T per head)
  kAttGrads,     // attention backward: d(probabilities), then d(scores) (fp32, the same shape)
  kAttOperands,  // attention in fp16/bf16: the rounded probabilities and score gradients
  kAttHeads,     // attention: q, k, v (and dout) gathered head-major in the operand type
  kAttResult,    // attention: out, or dq, dk, dv, head-major fp32 before the counted stores
  kOperandC,   // matmul backward: the fp8 transposed copy of dout
  kMatmulOut,  // matmul: fp32 result staged before a counted store into fp16/bf16 outputs
  kAttDelta,   // fused attention backward: D = sum p dp per row (fp32, B x NH x T)
  kCount
};
constexpr int kScratchRoles = static_cast<int>(Scratch::kCount);

// cuBLASLt's recommended workspace: 32 MiB on Hopper (compute capability 9.x), 4 MiB elsewhere
// (cuda-crib.md §1, from the cuBLAS documentation's cublasSetWorkspace notes).
size_t lt_workspace_size(int cc_major);

// Threads per block of the elementwise and reduction kernels.
constexpr int kBlock = 256;
// Blocks of per_block threads for n elements, one thread an element (at least one block).
inline unsigned blocks_for(int64_t n, int per_block = kBlock) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}
// Grid-stride kernels over n elements use at most this many blocks (enough to fill any GPU).
inline unsigned grid_stride_blocks(int64_t n, int per_block = kBlock) {
  const unsigned b = blocks_for(n, per_block);
  return b < 65535u ? b : 65535u;
}
// amax and count_nonfinite: one partial per block of kBlock threads, at most this many blocks.
constexpr unsigned kMaxReduceBlocks = 1024;
unsigned reduce_blocks(int64_t n);

// matmul_backward's bias gradient: partial column sums over chunks of kDbiasRows rows; at least
// one chunk (no rows: one chunk of zeros), so that a row of partial sums always fits.
constexpr int64_t kDbiasRows = 256;
constexpr int64_t dbias_chunks(int64_t N) {
  return N > kDbiasRows ? (N + kDbiasRows - 1) / kDbiasRows : 1;
}
// sum_squares: chunks of kNormChunk elements (as CpuBackend::sum_squares), one fp64 partial each.
constexpr int64_t kNormChunk = int64_t{1} << 14;
// layernorm_backward: dweight/dbias partials over chunks of at least kLayerNormRowChunk rows.
constexpr int64_t kLayerNormRowChunk = 32;

// Rows per layernorm_backward partial: kLayerNormRowChunk, more when there would be more chunks
// than a grid's y dimension allows (65535).
int64_t layernorm_row_chunk(int64_t N);

// Scratch bytes by role of the ops planned so far: each role grows to the largest request.
struct ScratchPlan {
  std::array<size_t, kScratchRoles> bytes{};
  void need(Scratch role, size_t b);
  size_t scratch_bytes() const;  // what Context::scratch_bytes() will hold
};

// What each op asks for, with the dtypes and shapes it is called with (see the op in backend.h).
// A narrow `out`/`dinp`/`dweight` (not fp32) is staged in fp32 (kMatmulOut) unless the GEMM
// writes it itself (matmul_plan.h, gemm_writes_output: bf16 outputs and input gradients under
// MPT_GEMM_OUT=direct, with the bias, if any, in the epilogue; weight gradients, which
// accumulate, stay staged); `dinp` = false for a matmul_backward without an input gradient.
void plan_matmul_forward(ScratchPlan& s, int64_t N, int64_t C, int64_t OC, DType inp,
                         DType weight, DType out, const MatmulSpec& spec, bool has_bias = false,
                         DType bias = DType::f32);
// `inp_cached`: an fp8 backward given the forward's MatmulSpec::inp_cache (no inp^T copy).
void plan_matmul_backward(ScratchPlan& s, int64_t N, int64_t C, int64_t OC, DType inp,
                          DType weight, DType dout, bool dinp, DType dinp_dtype, DType dweight,
                          bool dbias, const MatmulSpec& spec, bool inp_cached = false);
// Attention in operand format f (attention_plan.h), with the kernel attention_kernel(f, HS)
// picks: the GEMM path takes one pass over attention_batch_chunk(B, NH, T) batch elements at a
// time, its scratch by role (attention_scratch); the fused kernels need only the backward's D.
void plan_attention(ScratchPlan& s, bool backward, int64_t B, int64_t NH, int64_t T, int64_t HS,
                    OperandFormat f);
size_t layernorm_backward_scratch_bytes(int64_t N, int64_t C);
void plan_layernorm_backward(ScratchPlan& s, int64_t N, int64_t C);
size_t sum_squares_scratch_bytes(int64_t n);
void plan_sum_squares(ScratchPlan& s, int64_t n);
// embedding_backward uploads its token buckets, (2 * distinct tokens + 1 + N) int32, into
// scratch sized for the most distinct tokens N positions of a (vocab_size, C) table can hold.
void plan_embedding_backward(ScratchPlan& s, int64_t N, int64_t vocab_size);
size_t embedding_backward_scratch_bytes(int64_t N, int64_t vocab_size);
// amax (fp8 current scaling): one 32-bit partial per block, at most kMaxReduceBlocks.
void plan_amax(ScratchPlan& s, int64_t n);
// count_nonfinite (the replay of a non-finite step): one 64-bit partial per block.
void plan_count_nonfinite(ScratchPlan& s, int64_t n);

}  // namespace mpt::cuda
