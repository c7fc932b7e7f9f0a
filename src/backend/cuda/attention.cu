// Causal multi-head attention. In fp16/bf16 with head sizes up to 128 the fused kernels of
// flash_attention.cu run it (attention_kernel in attention_plan.h; MPT_ATTENTION=gemm picks the
// path below instead); everything else takes this file's path: strided-batched cuBLASLt GEMMs
// for the six products, warp-per-row kernels for the fp32 softmax and its gradient, and
// gather/scatter kernels between the (B, T, 3C) layout and head-major operands. How each
// product maps to a GEMM, the chunking of the batch and the scratch are decided in
// attention_plan.h (tested without a GPU).
//
// Per chunk of the batch (forward):
//   gather q, k, v head-major in the operand type -> S = scale Q.K^T (fp32) -> softmax: lse and
//   P (fp32 in place, or rounded into fp16/bf16) -> O = P.V (fp32) -> counted store into out.
// Backward: the same gather (and dout), S again, dP = dO.V^T, then one kernel recomputes
// p = exp(s - lse), D = sum p dp and ds = p (dp - D) scale, writing P and dS in the operand type
// (zeros above the diagonal); dQ = dS.K, dK = dS^T.Q, dV = P^T.dO; counted stores into dqkv.
//
// The GEMMs compute the whole (T, T) square and the masked probabilities are zeros, so a
// non-finite k or v at position t2 also makes rows t < t2 NaN (0 x inf), where the CPU, summing
// over the causal window only, keeps them finite. Only a step that is skipped anyway (its
// activations are non-finite) sees the difference, in where the replay first finds a NaN.
//
// Deterministic: the GEMMs' algorithms are fixed per shape (cached), and every other element is
// written by one thread with fixed-order warp reductions, no atomics but the cast counters.
// Against the CPU reference the results differ only in summation order (GEMM tiling, warp trees)
// and expf/logf's last bits; in fp16/bf16 a probability whose fp32 value moved by that much can
// round to the neighbouring value (the parity test allows for it).
#include <algorithm>
#include <cmath>
#include <string>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/attention_plan.h"
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/flash_attention.cuh"
#include "backend/cuda/gemm.h"

namespace mpt::cuda {
namespace {

constexpr int kWarps = 8;  // rows per block of the softmax kernels (one warp each)

struct Dims {
  int64_t B, T, C, NH, HS;
};

// dst (heads, T, HS) = the heads' columns [off + h HS, off + (h + 1) HS) of src (chunk, T, W),
// converted to the operand type (exact: the operand type is the source's or fp32).
template <class Tin, class Tout>
__global__ void gather_heads_kernel(const Tin* __restrict__ src, Tout* __restrict__ dst, int64_t n,
                                    int64_t T, int64_t NH, int64_t HS, int64_t W, int64_t off) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i % HS, t = (i / HS) % T, bh = i / (HS * T);
    const int64_t h = bh % NH, b = bh / NH;
    dst[i] = store<Tout>(load<Tin>(src[(b * T + t) * W + off + h * HS + e]));
  }
}

// The inverse: dst's columns [off + h HS, ...) of (chunk, T, W) = src (heads, T, HS) fp32,
// rounded to To and counted.
template <class To>
__global__ void scatter_heads_kernel(const float* __restrict__ src, To* dst, int64_t n, int64_t T,
                                     int64_t NH, int64_t HS, int64_t W, int64_t off,
                                     unsigned long long* counters) {
  CastTally tally;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i % HS, t = (i / HS) % T, bh = i / (HS * T);
    const int64_t h = bh % NH, b = bh / NH;
    store_counted(dst, (b * T + t) * W + off + h * HS + e, src[i], tally);
  }
  if (kNarrow<To>) tally.flush(counters);
}

// Row r = (bh, t) of the scores S (row stride Tp): lse[r] = m + log(sum_{t2 <= t} exp(s - m)),
// P[r, t2] = exp(s - lse) for t2 <= t, 0 above. P may be S itself (fp32: each element read
// and then written by the same lane).
template <class TP>
__global__ void softmax_forward_kernel(const float* S, TP* P, float* __restrict__ lse,
                                       int64_t rows, int64_t T, int64_t Tp) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // uniform per warp
  const int64_t t = row % T;
  const float* s = S + row * Tp;
  float m = -INFINITY;
  for (int64_t t2 = lane; t2 <= t; t2 += 32) m = fmaxf(m, s[t2]);
  m = warp_max(m);
  float sum = 0.0f;
  for (int64_t t2 = lane; t2 <= t; t2 += 32) sum += expf(s[t2] - m);
  sum = warp_sum(sum);
  const float l = m + logf(sum);
  if (lane == 0) lse[row] = l;
  TP* p = P + row * Tp;
  for (int64_t t2 = lane; t2 < T; t2 += 32)
    p[t2] = store<TP>(t2 <= t ? expf(s[t2] - l) : 0.0f);
}

// Row r = (bh, t): p = exp(s - lse), D = sum_t2 p dp, then P = p and dS = p (dp - D) scale in
// the operand type (0 above the diagonal). P may alias S and dS may alias dP (fp32).
template <class TP>
__global__ void softmax_backward_kernel(const float* S, const float* dP, TP* P, TP* dS,
                                        const float* __restrict__ lse, int64_t rows, int64_t T,
                                        int64_t Tp, float scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // uniform per warp
  const int64_t t = row % T;
  const float* s = S + row * Tp;
  const float* dp = dP + row * Tp;
  const float l = lse[row];
  float D = 0.0f;
  for (int64_t t2 = lane; t2 <= t; t2 += 32) D += expf(s[t2] - l) * dp[t2];
  D = warp_sum(D);
  TP* p = P + row * Tp;
  TP* ds = dS + row * Tp;
  for (int64_t t2 = lane; t2 < T; t2 += 32) {
    float pv = 0.0f, g = 0.0f;
    if (t2 <= t) {
      pv = expf(s[t2] - l);
      g = __fmul_rn(__fmul_rn(pv, __fsub_rn(dp[t2], D)), scale);
    }
    p[t2] = store<TP>(pv);
    ds[t2] = store<TP>(g);
  }
}

Dims dims_of(const char* op, const Tensor& qkv, int n_head) {
  const bool is_float =
      qkv.dtype == DType::f32 || qkv.dtype == DType::f16 || qkv.dtype == DType::bf16;
  if (!qkv.defined() || !is_float || qkv.shape.ndim != 3)
    throw RuntimeError(std::string(op) + ": qkv must be a float (B, T, 3C) tensor, got " +
                       qkv.shape.str());
  Dims d;
  d.B = qkv.dim(0), d.T = qkv.dim(1);
  const int64_t C3 = qkv.dim(2);
  d.C = C3 / 3;
  d.NH = n_head;
  if (n_head <= 0 || d.C == 0 || C3 != 3 * d.C || d.C % n_head != 0)
    throw RuntimeError(std::string(op) + ": qkv width must be 3 * n_head * head_size, head_size >= 1");
  d.HS = d.C / n_head;
  return d;
}

unsigned row_blocks(int64_t rows) {
  const int64_t b = (rows + kWarps - 1) / kWarps;
  if (b > 0x7FFFFFFF) throw RuntimeError("attention: too many rows");
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

// Calls fn with a value of the operand type's storage type (float, __half, __nv_bfloat16).
template <class F>
void dispatch_operand(GemmType t, F&& fn) {
  switch (t) {
    case GemmType::f16: fn(__half{}); return;
    case GemmType::bf16: fn(__nv_bfloat16{}); return;
    default: fn(float{}); return;
  }
}

// The head-major copy of columns [off, off + C) of src (B, T, W) for batch elements
// [b0, b0 + bc), in the operand type TO.
template <class TO>
void gather(Context& ctx, const Tensor& src, int64_t W, int64_t off, int64_t b0, int64_t bc,
            const Dims& d, TO* dst, const char* what) {
  const int64_t n = bc * d.NH * d.T * d.HS;
  MPT_DISPATCH_FLOAT(src.dtype, what, [&] {
    const T* x = static_cast<const T*>(src.data) + b0 * d.T * W;
    gather_heads_kernel<T, TO><<<grid_stride_blocks(n), kBlock, 0, ctx.stream()>>>(
        x, dst, n, d.T, d.NH, d.HS, W, off);
  });
  MPT_LAUNCH_CHECK(ctx, what);
}

// q, k and v of batch elements [b0, b0 + bc) of qkv (B, T, 3C), head-major in TO, at q, k, v.
template <class TO>
void gather_qkv(Context& ctx, const Tensor& qkv, int64_t b0, int64_t bc, const Dims& d, TO* q,
                TO* k, TO* v) {
  gather(ctx, qkv, 3 * d.C, 0, b0, bc, d, q, "attention: gather q");
  gather(ctx, qkv, 3 * d.C, d.C, b0, bc, d, k, "attention: gather k");
  gather(ctx, qkv, 3 * d.C, 2 * d.C, b0, bc, d, v, "attention: gather v");
}

// Columns [off, off + C) of dst (B, T, W) for batch elements [b0, b0 + bc) = src (head-major
// fp32), stored in dst's dtype and counted under cls.
void scatter(Context& ctx, const float* src, Tensor dst, int64_t W, int64_t off, int64_t b0,
             int64_t bc, const Dims& d, TensorClass cls, const char* what) {
  const int64_t n = bc * d.NH * d.T * d.HS;
  unsigned long long* counters = ctx.cast_counters(cls);
  MPT_DISPATCH_FLOAT(dst.dtype, what, [&] {
    T* y = static_cast<T*>(dst.data) + b0 * d.T * W;
    scatter_heads_kernel<T><<<grid_stride_blocks(n), kBlock, 0, ctx.stream()>>>(
        src, y, n, d.T, d.NH, d.HS, W, off, counters);
  });
  MPT_LAUNCH_CHECK(ctx, what);
}

void gemm(Context& ctx, AttentionGemm which, int64_t heads, const Dims& d, OperandFormat f,
          float scale, const void* a, const void* b, float* out) {
  const GemmPlan p = plan_attention_gemm(which, heads, d.T, d.HS, f, scale);
  GemmArgs g;
  g.a = a, g.b = b, g.d = out;
  run_gemm(ctx, p, g, attention_gemm_name(which));
}

}  // namespace

void attention_forward(Context& ctx, Tensor out, Tensor lse, Tensor qkv, int n_head,
                       MatmulPrecision prec) {
  const Dims d = dims_of("attention_forward", qkv, n_head);
  expect_float("attention_forward", "out", out, {d.B, d.T, d.C});
  expect_tensor("attention_forward", "lse", lse, DType::f32, {d.B, d.NH, d.T});
  const OperandFormat f = attention_operand_format(qkv.dtype, qkv.dtype, prec);
  if (d.B * d.T == 0) return;
  if (attention_kernel(f, d.HS) == AttentionKernel::flash) {
    flash_attention_forward(ctx, out, lse, qkv, FlashDims{d.B, d.T, d.C, d.NH, d.HS});
    if (out.dtype != DType::f32) ctx.add_cast_values(TensorClass::activation, out.numel());
    return;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.HS));
  const int64_t chunk = attention_batch_chunk(d.B, d.NH, d.T), Tp = attention_ld(d.T);
  const AttentionScratch sz = attention_scratch(false, chunk, d.NH, d.T, d.HS, f);
  const GemmType ot = attention_gemm_type(f);
  const size_t head_bytes = sz.heads / 3;  // each of q, k, v, 256-byte aligned
  float* S = static_cast<float*>(ctx.scratch(Scratch::kAttScores, sz.scores));
  char* heads = static_cast<char*>(ctx.scratch(Scratch::kAttHeads, sz.heads));
  float* O = static_cast<float*>(ctx.scratch(Scratch::kAttResult, sz.result));
  void* narrow = sz.operands ? ctx.scratch(Scratch::kAttOperands, sz.operands) : nullptr;
  dispatch_operand(ot, [&](auto tag) {
    using TO = decltype(tag);
    TO* q = reinterpret_cast<TO*>(heads);
    TO* k = reinterpret_cast<TO*>(heads + head_bytes);
    TO* v = reinterpret_cast<TO*>(heads + 2 * head_bytes);
    // fp32 probabilities overwrite the scores; fp16/bf16 ones go to their own buffer.
    TO* P = narrow ? static_cast<TO*>(narrow) : reinterpret_cast<TO*>(S);
    for (int64_t b0 = 0; b0 < d.B; b0 += chunk) {
      const int64_t bc = std::min(chunk, d.B - b0), heads_n = bc * d.NH, rows = heads_n * d.T;
      gather_qkv(ctx, qkv, b0, bc, d, q, k, v);
      gemm(ctx, AttentionGemm::scores, heads_n, d, f, scale, k, q, S);
      softmax_forward_kernel<TO><<<row_blocks(rows), kWarps * 32, 0, ctx.stream()>>>(
          S, P, static_cast<float*>(lse.data) + b0 * d.NH * d.T, rows, d.T, Tp);
      MPT_LAUNCH_CHECK(ctx, "attention_forward: softmax");
      gemm(ctx, AttentionGemm::out, heads_n, d, f, scale, v, P, O);
      scatter(ctx, O, out, d.C, 0, b0, bc, d, TensorClass::activation,
              "attention_forward: store out");
    }
  });
  if (out.dtype != DType::f32) ctx.add_cast_values(TensorClass::activation, out.numel());
}

void attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse,
                        int n_head, MatmulPrecision prec) {
  const Dims d = dims_of("attention_backward", qkv, n_head);
  expect_float("attention_backward", "dqkv", dqkv, {d.B, d.T, 3 * d.C});
  expect_float("attention_backward", "dout", dout, {d.B, d.T, d.C});
  expect_tensor("attention_backward", "lse", lse, DType::f32, {d.B, d.NH, d.T});
  const OperandFormat f = attention_operand_format(qkv.dtype, dout.dtype, prec);
  if (d.B * d.T == 0) return;
  if (attention_kernel(f, d.HS) == AttentionKernel::flash) {
    flash_attention_backward(ctx, dqkv, dout, qkv, lse, FlashDims{d.B, d.T, d.C, d.NH, d.HS});
    if (dqkv.dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, dqkv.numel());
    return;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.HS));
  const int64_t chunk = attention_batch_chunk(d.B, d.NH, d.T), Tp = attention_ld(d.T);
  const AttentionScratch sz = attention_scratch(true, chunk, d.NH, d.T, d.HS, f);
  const GemmType ot = attention_gemm_type(f);
  const size_t head_bytes = sz.heads / 4;      // q, k, v, dout
  const size_t result_bytes = sz.result / 3;   // dq, dk, dv
  float* S = static_cast<float*>(ctx.scratch(Scratch::kAttScores, sz.scores));
  float* dP = static_cast<float*>(ctx.scratch(Scratch::kAttGrads, sz.grads));
  char* heads = static_cast<char*>(ctx.scratch(Scratch::kAttHeads, sz.heads));
  char* result = static_cast<char*>(ctx.scratch(Scratch::kAttResult, sz.result));
  char* narrow =
      sz.operands ? static_cast<char*>(ctx.scratch(Scratch::kAttOperands, sz.operands)) : nullptr;
  float* dq = reinterpret_cast<float*>(result);
  float* dk = reinterpret_cast<float*>(result + result_bytes);
  float* dv = reinterpret_cast<float*>(result + 2 * result_bytes);
  dispatch_operand(ot, [&](auto tag) {
    using TO = decltype(tag);
    TO* q = reinterpret_cast<TO*>(heads);
    TO* k = reinterpret_cast<TO*>(heads + head_bytes);
    TO* v = reinterpret_cast<TO*>(heads + 2 * head_bytes);
    TO* g = reinterpret_cast<TO*>(heads + 3 * head_bytes);
    // fp32: P over S and dS over dP, in place; fp16/bf16: both in the operands buffer.
    TO* P = narrow ? reinterpret_cast<TO*>(narrow) : reinterpret_cast<TO*>(S);
    TO* dS = narrow ? reinterpret_cast<TO*>(narrow + sz.operands / 2) : reinterpret_cast<TO*>(dP);
    for (int64_t b0 = 0; b0 < d.B; b0 += chunk) {
      const int64_t bc = std::min(chunk, d.B - b0), heads_n = bc * d.NH, rows = heads_n * d.T;
      gather_qkv(ctx, qkv, b0, bc, d, q, k, v);
      gather(ctx, dout, d.C, 0, b0, bc, d, g, "attention_backward: gather dout");
      gemm(ctx, AttentionGemm::scores, heads_n, d, f, scale, k, q, S);
      gemm(ctx, AttentionGemm::dprobs, heads_n, d, f, scale, v, g, dP);
      softmax_backward_kernel<TO><<<row_blocks(rows), kWarps * 32, 0, ctx.stream()>>>(
          S, dP, P, dS, static_cast<const float*>(lse.data) + b0 * d.NH * d.T, rows, d.T, Tp,
          scale);
      MPT_LAUNCH_CHECK(ctx, "attention_backward: softmax backward");
      gemm(ctx, AttentionGemm::dq, heads_n, d, f, scale, k, dS, dq);
      gemm(ctx, AttentionGemm::dk, heads_n, d, f, scale, q, dS, dk);
      gemm(ctx, AttentionGemm::dv, heads_n, d, f, scale, g, P, dv);
      scatter(ctx, dq, dqkv, 3 * d.C, 0, b0, bc, d, TensorClass::gradient,
              "attention_backward: store dq");
      scatter(ctx, dk, dqkv, 3 * d.C, d.C, b0, bc, d, TensorClass::gradient,
              "attention_backward: store dk");
      scatter(ctx, dv, dqkv, 3 * d.C, 2 * d.C, b0, bc, d, TensorClass::gradient,
              "attention_backward: store dv");
    }
  });
  if (dqkv.dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, dqkv.numel());
}

}  // namespace mpt::cuda
