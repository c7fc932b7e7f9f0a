// Causal multi-head attention with materialised scores and an fp32 softmax.
//
// Straightforward kernels rather than cuBLASLt batched GEMMs (correctness first): one warp per
// row of the (B, NH, T, T) score matrix, reading q, k, v straight from the (B, T, 3C) layout
// (no permute pass), each output element summed by one thread in the CPU reference's order with
// fp32 multiplies and adds that are never fused (__fmul_rn/__fadd_rn), so out, dq, dk and dv
// follow the CPU's arithmetic except where the softmax's exp and its warp-reduced sums differ.
// Deterministic: no atomics; every element of out and dqkv is written by exactly one thread.
//
// att is written whole, as the CPU writes it: the probabilities for t2 <= t, zeros above the
// diagonal. Stores into fp16/bf16 outputs are counted (out: activations, dqkv: gradients).
// Backward: d(scores) lives in Scratch::kAttention (B, NH, T, T) fp32, lower triangle only.
#include <cmath>
#include <string>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {
namespace {

constexpr int kWarps = 8;  // rows per block (one warp each)

struct Dims {
  int64_t B, T, C, NH, HS;
  __host__ __device__ int64_t rows() const { return B * NH * T; }
};

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

template <class T>
__device__ __forceinline__ float dot_rn(const T* a, const T* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s = __fadd_rn(s, __fmul_rn(load<T>(a[i]), load<T>(b[i])));
  return s;
}
template <class Ta, class Tb>
__device__ __forceinline__ float dot_rn2(const Ta* a, const Tb* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s = __fadd_rn(s, __fmul_rn(load<Ta>(a[i]), load<Tb>(b[i])));
  return s;
}

// att[b,h,t,:] = softmax over t2 <= t of scale * q[t].k[t2], zeros for t2 > t.
template <class T>
__global__ void softmax_kernel(float* att, const T* qkv, Dims d, float scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= d.rows()) return;  // uniform per warp
  const int64_t t = row % d.T, bh = row / d.T, h = bh % d.NH, b = bh / d.NH;
  const int64_t C3 = 3 * d.C;
  const T* q = qkv + (b * d.T + t) * C3 + h * d.HS;
  float* arow = att + row * d.T;
  float maxv = -INFINITY;
  for (int64_t t2 = lane; t2 <= t; t2 += 32) {
    const T* k = qkv + (b * d.T + t2) * C3 + d.C + h * d.HS;
    const float s = __fmul_rn(dot_rn(q, k, d.HS), scale);
    arow[t2] = s;
    maxv = fmaxf(maxv, s);
  }
  maxv = warp_max(maxv);
  float sum = 0.0f;
  for (int64_t t2 = lane; t2 <= t; t2 += 32) {
    const float e = expf(arow[t2] - maxv);
    arow[t2] = e;
    sum += e;
  }
  sum = warp_sum(sum);
  const float inv = 1.0f / sum;
  for (int64_t t2 = lane; t2 < d.T; t2 += 32) arow[t2] = t2 <= t ? __fmul_rn(arow[t2], inv) : 0.0f;
}

// out[b,t,h*HS+i] = sum over t2 <= t of att[t,t2] v[t2,i] (in t2 order).
template <class T, class To>
__global__ void att_out_kernel(To* out, const float* att, const T* qkv, Dims d,
                               unsigned long long* counters) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= d.rows()) return;  // uniform per warp
  const int64_t t = row % d.T, bh = row / d.T, h = bh % d.NH, b = bh / d.NH;
  const int64_t C3 = 3 * d.C;
  const float* arow = att + row * d.T;
  CastTally tally;
  for (int64_t i = lane; i < d.HS; i += 32) {
    float acc = 0.0f;
    const T* v = qkv + b * d.T * C3 + 2 * d.C + h * d.HS + i;
    for (int64_t t2 = 0; t2 <= t; ++t2) acc = __fadd_rn(acc, __fmul_rn(arow[t2], load<T>(v[t2 * C3])));
    store_counted(out, (b * d.T + t) * d.C + h * d.HS + i, acc, tally);
  }
  if (kNarrow<To>) tally.flush(counters);
}

// dpre[t,t2] = att[t,t2] (datt[t,t2] - sum_t2 att[t,t2] datt[t,t2]) scale, datt = dout[t].v[t2].
template <class T, class Td>
__global__ void dscores_kernel(float* dpre, const float* att, const T* qkv, const Td* dout,
                               Dims d, float scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= d.rows()) return;
  const int64_t t = row % d.T, bh = row / d.T, h = bh % d.NH, b = bh / d.NH;
  const int64_t C3 = 3 * d.C;
  const Td* drow = dout + (b * d.T + t) * d.C + h * d.HS;
  const float* arow = att + row * d.T;
  float* prow = dpre + row * d.T;
  float dot = 0.0f;
  for (int64_t t2 = lane; t2 <= t; t2 += 32) {
    const T* v = qkv + (b * d.T + t2) * C3 + 2 * d.C + h * d.HS;
    const float s = dot_rn2(drow, v, d.HS);
    prow[t2] = s;
    dot += arow[t2] * s;
  }
  dot = warp_sum(dot);
  for (int64_t t2 = lane; t2 <= t; t2 += 32)
    prow[t2] = __fmul_rn(__fmul_rn(arow[t2], __fsub_rn(prow[t2], dot)), scale);
}

// dq[t,i] = sum over t2 <= t of dpre[t,t2] k[t2,i].
template <class T, class Tg>
__global__ void dq_kernel(Tg* dqkv, const float* dpre, const T* qkv, Dims d,
                          unsigned long long* counters) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= d.rows()) return;
  const int64_t t = row % d.T, bh = row / d.T, h = bh % d.NH, b = bh / d.NH;
  const int64_t C3 = 3 * d.C;
  const float* prow = dpre + row * d.T;
  CastTally tally;
  for (int64_t i = lane; i < d.HS; i += 32) {
    const T* k = qkv + b * d.T * C3 + d.C + h * d.HS + i;
    float acc = 0.0f;
    for (int64_t t2 = 0; t2 <= t; ++t2) acc = __fadd_rn(acc, __fmul_rn(prow[t2], load<T>(k[t2 * C3])));
    store_counted(dqkv, (b * d.T + t) * C3 + h * d.HS + i, acc, tally);
  }
  if (kNarrow<Tg>) tally.flush(counters);
}

// For key/value position t2 (the warp's row): dk[t2,i] = sum over t >= t2 of dpre[t,t2] q[t,i],
// dv[t2,i] = sum over t >= t2 of att[t,t2] dout[t,i] (in t order, as the CPU accumulates).
template <class T, class Td, class Tg>
__global__ void dkv_kernel(Tg* dqkv, const float* dpre, const float* att, const T* qkv,
                           const Td* dout, Dims d, unsigned long long* counters) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= d.rows()) return;
  const int64_t t2 = row % d.T, bh = row / d.T, h = bh % d.NH, b = bh / d.NH;
  const int64_t C3 = 3 * d.C;
  const float* pcol = dpre + bh * d.T * d.T + t2;  // dpre[t][t2] at pcol[t * T]
  const float* acol = att + bh * d.T * d.T + t2;
  CastTally tally;
  for (int64_t i = lane; i < d.HS; i += 32) {
    const T* q = qkv + b * d.T * C3 + h * d.HS + i;
    const Td* g = dout + b * d.T * d.C + h * d.HS + i;
    float ak = 0.0f, av = 0.0f;
    for (int64_t t = t2; t < d.T; ++t) {
      ak = __fadd_rn(ak, __fmul_rn(pcol[t * d.T], load<T>(q[t * C3])));
      av = __fadd_rn(av, __fmul_rn(acol[t * d.T], load<Td>(g[t * d.C])));
    }
    const int64_t base = (b * d.T + t2) * C3 + h * d.HS + i;
    store_counted(dqkv, base + d.C, ak, tally);
    store_counted(dqkv, base + 2 * d.C, av, tally);
  }
  if (kNarrow<Tg>) tally.flush(counters);
}

bool is_float(const Tensor& t) {
  return t.defined() && (t.dtype == DType::f32 || t.dtype == DType::f16 || t.dtype == DType::bf16);
}

void expect_shape(const char* op, const char* arg, const Tensor& t, Shape s, bool fp32_only) {
  if (!is_float(t) || t.shape != s || (fp32_only && t.dtype != DType::f32))
    throw RuntimeError(std::string(op) + ": argument '" + arg + "' expected " +
                       (fp32_only ? "an fp32" : "a float (fp32, fp16 or bf16)") + " tensor of shape " +
                       s.str() + ", got " + (t.defined() ? dtype_name(t.dtype) : "undefined") +
                       t.shape.str());
}

Dims dims_of(const char* op, const Tensor& qkv, int n_head) {
  if (!is_float(qkv) || qkv.shape.ndim != 3)
    throw RuntimeError(std::string(op) + ": qkv must be a float (B, T, 3C) tensor, got " +
                       qkv.shape.str());
  Dims d;
  d.B = qkv.dim(0), d.T = qkv.dim(1);
  const int64_t C3 = qkv.dim(2);
  d.C = C3 / 3;
  d.NH = n_head;
  if (n_head <= 0 || C3 != 3 * d.C || d.C % n_head != 0)
    throw RuntimeError(std::string(op) + ": qkv width must be 3 * n_head * head_size");
  d.HS = d.C / n_head;
  return d;
}

unsigned row_blocks(const Dims& d) {
  const int64_t b = (d.rows() + kWarps - 1) / kWarps;
  if (b > 0x7FFFFFFF) throw RuntimeError("attention: too many rows");
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

}  // namespace

void attention_forward(Context& ctx, Tensor out, Tensor att, Tensor qkv, int n_head) {
  const Dims d = dims_of("attention_forward", qkv, n_head);
  expect_shape("attention_forward", "out", out, {d.B, d.T, d.C}, false);
  expect_shape("attention_forward", "att", att, {d.B, d.NH, d.T, d.T}, true);
  if (d.rows() == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.HS));
  const unsigned grid = row_blocks(d);
  float* a = static_cast<float*>(att.data);
  unsigned long long* counters = ctx.cast_counters(TensorClass::activation);
  MPT_DISPATCH_FLOAT(qkv.dtype, "attention_forward qkv", [&] {
    using Tq = T;
    const Tq* x = static_cast<const Tq*>(qkv.data);
    softmax_kernel<Tq><<<grid, kWarps * 32, 0, ctx.stream()>>>(a, x, d, scale);
    MPT_LAUNCH_CHECK(ctx, "attention_forward: softmax");
    MPT_DISPATCH_FLOAT(out.dtype, "attention_forward out", [&] {
      att_out_kernel<Tq, T><<<grid, kWarps * 32, 0, ctx.stream()>>>(static_cast<T*>(out.data), a,
                                                                    x, d, counters);
    });
    MPT_LAUNCH_CHECK(ctx, "attention_forward: att . v");
  });
  if (out.dtype != DType::f32) ctx.add_cast_values(TensorClass::activation, out.numel());
}

void attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor att,
                        int n_head) {
  const Dims d = dims_of("attention_backward", qkv, n_head);
  expect_shape("attention_backward", "dqkv", dqkv, {d.B, d.T, 3 * d.C}, false);
  expect_shape("attention_backward", "dout", dout, {d.B, d.T, d.C}, false);
  expect_shape("attention_backward", "att", att, {d.B, d.NH, d.T, d.T}, true);
  if (d.rows() == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.HS));
  const unsigned grid = row_blocks(d);
  const float* a = static_cast<const float*>(att.data);
  float* dpre = static_cast<float*>(
      ctx.scratch(Scratch::kAttention, attention_backward_scratch_bytes(d.B, d.NH, d.T)));
  unsigned long long* counters = ctx.cast_counters(TensorClass::gradient);
  MPT_DISPATCH_FLOAT(qkv.dtype, "attention_backward qkv", [&] {
    using Tq = T;
    const Tq* x = static_cast<const Tq*>(qkv.data);
    MPT_DISPATCH_FLOAT(dout.dtype, "attention_backward dout", [&] {
      using Td = T;
      const Td* g = static_cast<const Td*>(dout.data);
      dscores_kernel<Tq, Td><<<grid, kWarps * 32, 0, ctx.stream()>>>(dpre, a, x, g, d, scale);
      MPT_LAUNCH_CHECK(ctx, "attention_backward: d(scores)");
      MPT_DISPATCH_FLOAT(dqkv.dtype, "attention_backward dqkv", [&] {
        T* dx = static_cast<T*>(dqkv.data);
        dq_kernel<Tq, T><<<grid, kWarps * 32, 0, ctx.stream()>>>(dx, dpre, x, d, counters);
        MPT_LAUNCH_CHECK(ctx, "attention_backward: dq");
        dkv_kernel<Tq, Td, T><<<grid, kWarps * 32, 0, ctx.stream()>>>(dx, dpre, a, x, g, d,
                                                                       counters);
        MPT_LAUNCH_CHECK(ctx, "attention_backward: dk, dv");
      });
    });
  });
  if (dqkv.dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, dqkv.numel());
}

}  // namespace mpt::cuda
