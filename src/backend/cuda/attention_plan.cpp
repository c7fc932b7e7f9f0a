#include "backend/cuda/attention_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"

namespace mpt::cuda {

GemmType attention_gemm_type(OperandFormat f) {
  switch (f) {
    case OperandFormat::f16: return GemmType::f16;
    case OperandFormat::bf16: return GemmType::bf16;
    case OperandFormat::f32:
    case OperandFormat::tf32: break;
  }
  return GemmType::f32;
}

GemmCompute attention_compute(OperandFormat f) {
  return f == OperandFormat::tf32 ? GemmCompute::f32_fast_tf32 : GemmCompute::f32;
}

int64_t attention_ld(int64_t T) { return (T + 7) / 8 * 8; }

int64_t attention_batch_chunk(int64_t B, int64_t NH, int64_t T) {
  const double per_element = double(NH) * double(T) * double(attention_ld(T)) * sizeof(float);
  const double fit = per_element > 0 ? std::floor(double(kAttentionChunkBytes) / per_element) : 1;
  // Many cuBLASLt kernels take at most 65535 GEMMs in a batch (cuda-crib.md, attention batching).
  const int64_t by_count = std::max<int64_t>(1, 65535 / std::max<int64_t>(1, NH));
  const int64_t chunk = std::min<int64_t>({B, by_count, static_cast<int64_t>(std::min(fit, 1e15))});
  return std::max<int64_t>(1, chunk);
}

const char* attention_gemm_name(AttentionGemm g) {
  switch (g) {
    case AttentionGemm::scores: return "attention scores";
    case AttentionGemm::out: return "attention out";
    case AttentionGemm::dprobs: return "attention d(probabilities)";
    case AttentionGemm::dq: return "attention dq";
    case AttentionGemm::dk: return "attention dk";
    case AttentionGemm::dv: return "attention dv";
  }
  return "attention";
}

namespace {

// A (T, HS) head-major matrix: column-major HS x T, ld HS.
GemmOperand head_slot(GemmType t, bool trans, int64_t T, int64_t HS) {
  GemmOperand o;
  o.type = t;
  o.trans = trans;
  o.rows = HS, o.cols = T, o.ld = HS;
  return o;
}
// A (T, T) matrix with row stride Tp: column-major T x T, ld Tp.
GemmOperand square_slot(GemmType t, bool trans, int64_t T) {
  GemmOperand o;
  o.type = t;
  o.trans = trans;
  o.rows = T, o.cols = T, o.ld = attention_ld(T);
  return o;
}

}  // namespace

GemmPlan plan_attention_gemm(AttentionGemm g, int64_t heads, int64_t T, int64_t HS,
                             OperandFormat f, float scale) {
  if (heads < 1 || heads > 65535 || T < 1 || HS < 1)
    throw RuntimeError("attention: no GEMM for " + std::to_string(heads) + " heads of T=" +
                       std::to_string(T) + ", head size " + std::to_string(HS));
  const GemmType t = attention_gemm_type(f);
  const int64_t Tp = attention_ld(T);
  GemmPlan p;
  p.d_type = GemmType::f32;
  p.compute = attention_compute(f);
  p.batch = static_cast<int32_t>(heads);
  const bool square_out = g == AttentionGemm::scores || g == AttentionGemm::dprobs;
  if (square_out) {
    // S = scale Q.K^T, dP = dO.V^T: D (T x T) = op T (K or V) . op N (Q or dO), k = HS.
    p.m = T, p.n = T, p.k = HS, p.ldd = Tp;
    p.a = head_slot(t, true, T, HS);
    p.b = head_slot(t, false, T, HS);
    p.stride_a = p.stride_b = T * HS;
    p.stride_d = T * Tp;
    if (g == AttentionGemm::scores) p.alpha = scale;
  } else {
    // O = P.V, dQ = dS.K: B = the square (op N); dK = dS^T.Q, dV = P^T.dO: B = the square (op T).
    p.m = HS, p.n = T, p.k = T, p.ldd = HS;
    p.a = head_slot(t, false, T, HS);
    p.b = square_slot(t, g == AttentionGemm::dk || g == AttentionGemm::dv, T);
    p.stride_a = T * HS;
    p.stride_b = T * Tp;
    p.stride_d = T * HS;
  }
  return p;
}

AttentionScratch attention_scratch(bool backward, int64_t chunk, int64_t NH, int64_t T,
                                   int64_t HS, OperandFormat f) {
  const GemmType t = attention_gemm_type(f);
  const int64_t square = chunk * NH * T * attention_ld(T);  // elements of one (T, T) buffer
  const int64_t head = chunk * NH * T * HS;                // elements of one head-major tensor
  AttentionScratch s;
  s.scores = operand_copy_bytes(square, GemmType::f32);
  if (backward) s.grads = operand_copy_bytes(square, GemmType::f32);
  if (t != GemmType::f32) s.operands = (backward ? 2 : 1) * operand_copy_bytes(square, t);
  s.heads = (backward ? 4 : 3) * operand_copy_bytes(head, t);
  s.result = (backward ? 3 : 1) * operand_copy_bytes(head, GemmType::f32);
  return s;
}

const char* attention_kernel_name(AttentionKernel k) {
  return k == AttentionKernel::flash ? "flash" : "gemm";
}

AttentionKernel attention_kernel_for(OperandFormat f, int64_t HS, const char* env) {
  if (env && *env && std::strcmp(env, "flash") != 0 && std::strcmp(env, "gemm") != 0)
    throw RuntimeError(std::string("MPT_ATTENTION: expected 'flash' or 'gemm', got '") + env +
                       "'");
  if (env && std::strcmp(env, "gemm") == 0) return AttentionKernel::gemm;
  const bool narrow = f == OperandFormat::f16 || f == OperandFormat::bf16;
  return narrow && HS >= 1 && HS <= kFlashMaxHead ? AttentionKernel::flash : AttentionKernel::gemm;
}

AttentionKernel attention_kernel(OperandFormat f, int64_t HS) {
  return attention_kernel_for(f, HS, std::getenv("MPT_ATTENTION"));
}

int flash_head_tile(int64_t HS) {
  if (HS < 1 || HS > kFlashMaxHead)
    throw RuntimeError("attention: no fused kernel for head size " + std::to_string(HS));
  return HS <= 32 ? 32 : HS <= 64 ? 64 : 128;
}

int64_t flash_tiles(int64_t T) {
  const int64_t n = (T + kFlashTile - 1) / kFlashTile;
  if (n > 65535)
    throw RuntimeError("attention: sequence length " + std::to_string(T) +
                       " needs more query tiles than a grid's y dimension holds (65535)");
  return n;
}

bool flash_vector_loads(int64_t HS, std::initializer_list<const void*> bases) {
  if (HS % 8 != 0) return false;
  for (const void* p : bases)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

size_t flash_backward_scratch(int64_t B, int64_t NH, int64_t T) {
  return operand_copy_bytes(B * NH * T, GemmType::f32);
}

}  // namespace mpt::cuda
