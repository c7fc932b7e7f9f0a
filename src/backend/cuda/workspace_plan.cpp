#include "backend/cuda/workspace_plan.h"

#include <algorithm>

#include "backend/cuda/attention_plan.h"
#include "backend/cuda/matmul_plan.h"

namespace mpt::cuda {

size_t lt_workspace_size(int cc_major) { return cc_major >= 9 ? size_t{32} << 20 : size_t{4} << 20; }

unsigned reduce_blocks(int64_t n) {
  const int64_t b = std::max<int64_t>(1, (n + kBlock - 1) / kBlock);
  return static_cast<unsigned>(std::min<int64_t>(b, kMaxReduceBlocks));
}

int64_t layernorm_row_chunk(int64_t N) { return std::max(kLayerNormRowChunk, (N + 65534) / 65535); }

void ScratchPlan::need(Scratch role, size_t b) {
  size_t& have = bytes[static_cast<int>(role)];
  have = std::max(have, b);
}

size_t ScratchPlan::scratch_bytes() const {
  size_t n = 0;
  for (size_t b : bytes) n += b;
  return n;
}

namespace {
size_t f32_copy(int64_t elements) { return operand_copy_bytes(elements, GemmType::f32); }
constexpr uintptr_t kAligned = 256;  // a pointer as aligned as the model's tensor views
}  // namespace

// As matmul.cu's matmul_forward.
void plan_matmul_forward(ScratchPlan& s, int64_t N, int64_t C, int64_t OC, DType inp,
                         DType weight, DType out, const MatmulSpec& spec, bool has_bias,
                         DType bias) {
  const GemmPlan p = plan_matmul(MatmulOp::forward, N, C, OC, inp, weight, inp, spec);
  if (p.fp8) {
    s.need(Scratch::kOperandA, operand_copy_bytes(OC * C, p.a.type));
    if (p.b.copy) s.need(Scratch::kOperandB, operand_copy_bytes(N * C, p.b.type));
  } else {
    if (p.a.copy) s.need(Scratch::kOperandA, f32_copy(OC * C));  // the weight, widened
    if (p.b.copy) s.need(Scratch::kOperandB, f32_copy(N * C));   // the input, widened
  }
  // (kAligned: the model's views are.)
  const bool direct =
      gemm_writes_output(p, out, gemm_out(), has_bias, bias, kAligned, lt_epilogues_enabled());
  if (out != DType::f32 && !direct) s.need(Scratch::kMatmulOut, f32_copy(N * OC));
}

// As matmul.cu's matmul_backward.
void plan_matmul_backward(ScratchPlan& s, int64_t N, int64_t C, int64_t OC, DType inp,
                          DType weight, DType dout, bool dinp, DType dinp_dtype, DType dweight,
                          bool dbias, const MatmulSpec& spec, bool inp_cached) {
  const GemmPlan pw = plan_matmul(MatmulOp::wgrad, N, C, OC, inp, weight, dout, spec);
  if (dbias) {
    const int64_t chunks = dbias_chunks(N);
    s.need(Scratch::kReduce, std::max<size_t>(256, chunks * OC * sizeof(float)));
  }
  if (pw.fp8) {
    if (dinp) s.need(Scratch::kOperandB, operand_copy_bytes(N * OC, pw.b.type));
    s.need(Scratch::kOperandC, operand_copy_bytes(N * OC, pw.b.type));
  }
  if (dinp) {
    const GemmPlan pd = plan_matmul(MatmulOp::dgrad, N, C, OC, inp, weight, dout, spec);
    if (pd.fp8) {
      s.need(Scratch::kOperandA, operand_copy_bytes(OC * C, pd.a.type));  // weight^T
    } else {
      if (pd.a.copy) s.need(Scratch::kOperandA, f32_copy(OC * C));  // the weight
      if (pd.b.copy) s.need(Scratch::kOperandB, f32_copy(N * OC));  // dout
    }
    if (dinp_dtype != DType::f32 &&
        !gemm_writes_output(pd, dinp_dtype, gemm_out(), false, DType::f32, kAligned,
                            lt_epilogues_enabled()))
      s.need(Scratch::kMatmulOut, f32_copy(N * C));
  }
  if (pw.fp8) {
    if (!inp_cached) s.need(Scratch::kOperandA, operand_copy_bytes(N * C, pw.a.type));  // inp^T
  } else {
    if (pw.a.copy) s.need(Scratch::kOperandA, f32_copy(N * C));   // inp
    if (pw.b.copy) s.need(Scratch::kOperandB, f32_copy(N * OC));  // dout
  }
  if (dweight != DType::f32) s.need(Scratch::kMatmulOut, f32_copy(OC * C));
}

void plan_attention(ScratchPlan& s, bool backward, int64_t B, int64_t NH, int64_t T, int64_t HS,
                    OperandFormat f) {
  if (attention_kernel(f, HS) == AttentionKernel::flash) {
    if (backward) s.need(Scratch::kAttDelta, flash_backward_scratch(B, NH, T));
    return;
  }
  const AttentionScratch a =
      attention_scratch(backward, attention_batch_chunk(B, NH, T), NH, T, HS, f);
  s.need(Scratch::kAttScores, a.scores);
  if (a.grads) s.need(Scratch::kAttGrads, a.grads);
  if (a.operands) s.need(Scratch::kAttOperands, a.operands);
  s.need(Scratch::kAttHeads, a.heads);
  s.need(Scratch::kAttResult, a.result);
}

size_t layernorm_backward_scratch_bytes(int64_t N, int64_t C) {
  const int64_t row_chunk = layernorm_row_chunk(N);
  const int64_t chunks = (N + row_chunk - 1) / row_chunk;
  return static_cast<size_t>(2 * chunks * C) * sizeof(float);
}
void plan_layernorm_backward(ScratchPlan& s, int64_t N, int64_t C) {
  s.need(Scratch::kReduce, layernorm_backward_scratch_bytes(N, C));
}

size_t sum_squares_scratch_bytes(int64_t n) {
  return static_cast<size_t>((n + kNormChunk - 1) / kNormChunk) * sizeof(double);
}
void plan_sum_squares(ScratchPlan& s, int64_t n) {
  s.need(Scratch::kReduce, sum_squares_scratch_bytes(n));
}

size_t embedding_backward_scratch_bytes(int64_t N, int64_t vocab_size) {
  const int64_t K = std::min(N, vocab_size);  // distinct tokens, at most
  return static_cast<size_t>(K + K + 1 + N) * sizeof(int32_t);
}
void plan_embedding_backward(ScratchPlan& s, int64_t N, int64_t vocab_size) {
  s.need(Scratch::kReduce, embedding_backward_scratch_bytes(N, vocab_size));
}

void plan_amax(ScratchPlan& s, int64_t n) {
  s.need(Scratch::kReduce, reduce_blocks(n) * sizeof(unsigned));
}

void plan_count_nonfinite(ScratchPlan& s, int64_t n) {
  s.need(Scratch::kReduce, reduce_blocks(n) * sizeof(unsigned long long));
}


}  // namespace mpt::cuda
