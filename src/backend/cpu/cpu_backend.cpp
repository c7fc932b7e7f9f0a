#include "backend/cpu/cpu_backend.h"

#include "backend/cpu/cpu_common.h"
#include "core/formats.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

namespace mpt {
namespace {

using cpu_detail::BlasThreads;
using cpu_detail::expect;
using cpu_detail::for_column_blocks;


// Token ids index tables; check them before the parallel loops (an exception must not leave an
// OpenMP region).
void check_ids(const char* op, const int32_t* ids, int64_t n, int64_t limit) {
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= limit)
      throw RuntimeError(std::string(op) + ": token id " + std::to_string(ids[i]) + " at " +
                         std::to_string(i) + " outside [0, " + std::to_string(limit) + ")");
}


constexpr float kLayerNormEps = 1e-5f;
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;

// tanh through one expf: glibc's tanhf goes through expm1f and was a quarter of a training step.
// Saturates correctly (expf overflowing to inf gives 1, underflowing to 0 gives -1); the absolute
// error near 0 is about 1e-7, below what the fp32 GELU output can resolve.
inline float fast_tanh(float u) { return 1.0f - 2.0f / (std::exp(2.0f * u) + 1.0f); }


}  // namespace

CpuBackend::CpuBackend(int threads) : threads_(threads > 0 ? threads : omp_get_num_procs()) {}

std::string CpuBackend::device_description() const {
  return std::string("CPU, ") + std::to_string(threads_) + " threads, " +
         openblas_get_config();
}

Buffer CpuBackend::allocate(size_t bytes) {
  constexpr size_t kAlign = 256;
  const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, rounded ? rounded : kAlign);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, rounded);
  mem_->add(bytes);
  fp8_caches_->forget(p, rounded);  // the second guard, as the free's own
  return Buffer(p, bytes, [mem = mem_, caches = fp8_caches_, bytes, rounded](void* q) {
    caches->forget(q, rounded);
    std::free(q);
    mem->sub(bytes);
  });
}

MemoryUsage CpuBackend::memory_usage() const {
  MemoryUsage u;
  u.bytes = mem_->bytes();
  u.peak_bytes = mem_->peak();
  return u;
}

void CpuBackend::copy_from_host(Tensor dst, const void* src) {
  fp8_caches_->forget(dst.data, dst.bytes());  // as the CUDA backend's: its record is stale
  std::memcpy(dst.data, src, dst.bytes());
}

void CpuBackend::copy_to_host(void* dst, Tensor src) { std::memcpy(dst, src.data, src.bytes()); }

void CpuBackend::embedding_forward_f32(Tensor out, Tensor tokens, Tensor wte, Tensor wpe) {
  const int64_t B = tokens.dim(0), T = tokens.dim(1), C = wte.dim(1), Vp = wte.dim(0);
  expect("embedding_forward", "tokens", tokens, DType::i32, {B, T});
  expect("embedding_forward", "out", out, DType::f32, {B, T, C});
  MPT_CHECK(wpe.dim(0) >= T && wpe.dim(1) == C, "wpe too small for T");
  const int32_t* tok = tokens.as<int32_t>();
  const float* e = wte.as<float>();
  const float* p = wpe.as<float>();
  float* o = out.as<float>();
  check_ids("embedding_forward", tok, B * T, Vp);
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t bt = 0; bt < B * T; ++bt) {
    const int32_t id = tok[bt];
    const float* erow = e + id * C;              // (C)
    const float* prow = p + (bt % T) * C;        // (C)
    float* orow = o + bt * C;                    // (C)
    for (int64_t c = 0; c < C; ++c) orow[c] = erow[c] + prow[c];
  }
}

void CpuBackend::embedding_backward_f32(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) {
  const int64_t B = tokens.dim(0), T = tokens.dim(1), C = dwte.dim(1);
  expect("embedding_backward", "dout", dout, DType::f32, {B, T, C});
  const int32_t* tok = tokens.as<int32_t>();
  const float* d = dout.as<float>();
  float* dwt = dwte.as<float>();
  float* dwp = dwpe.as<float>();
  check_ids("embedding_backward", tok, B * T, dwte.dim(0));
  // Tokens repeat, so rows of dwte receive several contributions: split by column.
  for_column_blocks(C, threads_, [&](int64_t c0, int64_t c1) {
    for (int64_t bt = 0; bt < B * T; ++bt) {
      const float* drow = d + bt * C;
      float* erow = dwt + static_cast<int64_t>(tok[bt]) * C;
      float* prow = dwp + (bt % T) * C;
      for (int64_t c = c0; c < c1; ++c) {
        erow[c] += drow[c];
        prow[c] += drow[c];
      }
    }
  });
}

void CpuBackend::layernorm_forward_f32(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                                   Tensor bias) {
  const int64_t C = inp.dim(-1), N = inp.numel() / C;
  expect("layernorm_forward", "out", out.reshape({N, C}), DType::f32, {N, C});
  expect("layernorm_forward", "mean", mean.reshape({N}), DType::f32, {N});
  expect("layernorm_forward", "rstd", rstd.reshape({N}), DType::f32, {N});
  expect("layernorm_forward", "weight", weight, DType::f32, {C});
  expect("layernorm_forward", "bias", bias, DType::f32, {C});
  const float* x = inp.as<float>();
  const float* w = weight.as<float>();
  const float* b = bias.as<float>();
  float* o = out.as<float>();
  float* mu = mean.as<float>();
  float* rs = rstd.as<float>();
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;  // (C)
    float m = 0.0f;
    for (int64_t c = 0; c < C; ++c) m += xr[c];
    m /= static_cast<float>(C);
    float var = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const float dx = xr[c] - m;
      var += dx * dx;
    }
    var /= static_cast<float>(C);
    const float s = 1.0f / std::sqrt(var + kLayerNormEps);
    float* orow = o + n * C;
    for (int64_t c = 0; c < C; ++c) orow[c] = (xr[c] - m) * s * w[c] + b[c];
    mu[n] = m;
    rs[n] = s;
  }
}

void CpuBackend::layernorm_backward_f32(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                    Tensor inp, Tensor weight, Tensor mean, Tensor rstd) {
  const int64_t C = inp.dim(-1), N = inp.numel() / C;
  expect("layernorm_backward", "dinp", dinp.reshape({N, C}), DType::f32, {N, C});
  expect("layernorm_backward", "dout", dout.reshape({N, C}), DType::f32, {N, C});
  expect("layernorm_backward", "dweight", dweight, DType::f32, {C});
  expect("layernorm_backward", "dbias", dbias, DType::f32, {C});
  const float* x = inp.as<float>();
  const float* w = weight.as<float>();
  const float* d = dout.as<float>();
  const float* mu = mean.as<float>();
  const float* rs = rstd.as<float>();
  float* dx = dinp.as<float>();
  float* dw = dweight.as<float>();
  float* db = dbias.as<float>();

  // dinp: rows are independent.
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x + n * C;
    const float* dr = d + n * C;
    const float m = mu[n], s = rs[n];
    // dnorm = dout * w;  dx = s * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const float norm = (xr[c] - m) * s;
      const float dnorm = w[c] * dr[c];
      dnorm_mean += dnorm;
      dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean /= static_cast<float>(C);
    dnorm_norm_mean /= static_cast<float>(C);
    float* dxr = dx + n * C;
    for (int64_t c = 0; c < C; ++c) {
      const float norm = (xr[c] - m) * s;
      const float dnorm = w[c] * dr[c];
      dxr[c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
    }
  }
  // dweight, dbias: sums over rows.
  for_column_blocks(C, threads_, [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x + n * C;
      const float* dr = d + n * C;
      const float m = mu[n], s = rs[n];
      for (int64_t c = c0; c < c1; ++c) {
        dw[c] += (xr[c] - m) * s * dr[c];
        db[c] += dr[c];
      }
    }
  });
}

namespace {

// x rounded to attention's operand format F (backend.h): the probabilities and score gradients,
// computed in fp32.
template <OperandFormat F>
inline float rnd(float x) {
  if constexpr (F == OperandFormat::f32) return x;
  else if constexpr (F == OperandFormat::tf32) return round_tf32(x);
  else if constexpr (F == OperandFormat::f16) return round_to_f16(x);
  else return round_to_bf16(x);
}
// An input (q, k, v, dout) as the products read it: fp16/bf16 values arrive widened and exact
// (rounding them again would change nothing but cost a conversion per product); fp32 ones are
// rounded under tf32.
template <OperandFormat F>
inline float rnd_in(float x) {
  if constexpr (F == OperandFormat::tf32) return round_tf32(x);
  else return x;
}

struct AttDims {
  int64_t B, T, C, NH, HS;
  float scale;
};

// Column block [off + h HS, off + (h + 1) HS) of every row of one batch element's (T, W) slice,
// as the products read it (rnd_in), into a contiguous (T, HS) buffer: each head's q, k, v and
// dout are then read with unit stride, and tf32's rounding happens once per element.
template <OperandFormat F>
void gather_head(const float* x, int64_t T, int64_t W, int64_t off, int64_t HS, float* out) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < HS; ++i) out[t * HS + i] = rnd_in<F>(x[t * W + off + i]);
}

// Head h's q, k and v of one batch element's (T, 3C) slice xb, gathered into three consecutive
// (T, HS) buffers starting at qkvh.
template <OperandFormat F>
void gather_qkv(const float* xb, const AttDims& d, int64_t h, float* qkvh) {
  for (int64_t j = 0; j < 3; ++j)
    gather_head<F>(xb, d.T, 3 * d.C, j * d.C + h * d.HS, d.HS, qkvh + j * d.T * d.HS);
}

// s[t2] = (sum_i q~[t,i] k~[t2,i]) * scale for t2 <= t, from the head's gathered q and k;
// returns lse over them.
float attention_scores(const float* qh, const float* kh, const AttDims& d, int64_t t, float* s) {
  const float* q = qh + t * d.HS;
  float maxv = -INFINITY;
  for (int64_t t2 = 0; t2 <= t; ++t2) {
    const float* k = kh + t2 * d.HS;
    float dot = 0.0f;
    for (int64_t i = 0; i < d.HS; ++i) dot += q[i] * k[i];
    s[t2] = dot * d.scale;
    maxv = std::max(maxv, s[t2]);
  }
  float sum = 0.0f;
  for (int64_t t2 = 0; t2 <= t; ++t2) sum += std::exp(s[t2] - maxv);
  return maxv + std::log(sum);
}

// Per-thread scratch of the attention loops: `rows` (T) rows plus `heads` (T, HS) gathers.
struct AttScratch {
  std::vector<float> buf;
  int64_t per_thread;
  AttScratch(int threads, const AttDims& d, int rows, int heads)
      : per_thread(rows * d.T + heads * d.T * d.HS) {
    buf.resize(static_cast<size_t>(threads) * per_thread);
  }
  float* mine() { return buf.data() + static_cast<size_t>(omp_get_thread_num()) * per_thread; }
};

template <OperandFormat F>
void attention_forward_rows(float* o, float* lse, const float* x, const AttDims& d,
                            AttScratch& scratch, int threads) {
  const int64_t C3 = 3 * d.C, T = d.T, HS = d.HS;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t h = 0; h < d.NH; ++h) {
      float* p = scratch.mine();  // (T)
      float* qh = p + T;          // (T, HS) each: q, k, v
      float* kh = qh + T * HS;
      float* vh = kh + T * HS;
      gather_qkv<F>(x + b * T * C3, d, h, qh);
      for (int64_t t = 0; t < T; ++t) {
        const float l = attention_scores(qh, kh, d, t, p);
        lse[(b * d.NH + h) * T + t] = l;
        for (int64_t t2 = 0; t2 <= t; ++t2) p[t2] = rnd<F>(std::exp(p[t2] - l));
        float* orow = o + (b * T + t) * d.C + h * HS;  // (HS)
        for (int64_t i = 0; i < HS; ++i) orow[i] = 0.0f;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          const float* v = vh + t2 * HS;
          for (int64_t i = 0; i < HS; ++i) orow[i] += p[t2] * v[i];
        }
      }
    }
  }
}

template <OperandFormat F>
void attention_backward_rows(float* dx, const float* g, const float* x, const float* lse,
                             const AttDims& d, AttScratch& scratch, int threads) {
  const int64_t C3 = 3 * d.C, T = d.T, HS = d.HS;
  // Each (b, h) owns its slice of dqkv, so the tasks never write the same element.
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t h = 0; h < d.NH; ++h) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < 3; ++j)
          std::memset(dx + (b * T + t) * C3 + j * d.C + h * HS, 0, HS * sizeof(float));
      float* p = scratch.mine();  // (T)
      float* dp = p + T;          // (T)
      float* qh = dp + T;         // (T, HS) each: q, k, v, dout
      float* kh = qh + T * HS;
      float* vh = kh + T * HS;
      float* gh = vh + T * HS;
      gather_qkv<F>(x + b * T * C3, d, h, qh);
      gather_head<F>(g + b * T * d.C, T, d.C, h * HS, HS, gh);
      for (int64_t t = 0; t < T; ++t) {
        // the forward's probabilities again, from its lse (the scores' sum is not needed)
        attention_scores(qh, kh, d, t, p);
        const float l = lse[(b * d.NH + h) * T + t];
        for (int64_t t2 = 0; t2 <= t; ++t2) p[t2] = std::exp(p[t2] - l);
        const float* drow = gh + t * HS;  // (HS)
        const float* q = qh + t * HS;
        float* dq = dx + (b * T + t) * C3 + h * HS;
        // out[t] = sum_t2 p~[t2] v~[t2]  ->  dp[t2] = dout~[t].v~[t2], dv[t2] += p~[t2] dout~[t]
        float D = 0.0f;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          const float* v = vh + t2 * HS;
          float* dv = dx + (b * T + t2) * C3 + 2 * d.C + h * HS;
          const float pr = rnd<F>(p[t2]);
          float sdot = 0.0f;
          for (int64_t i = 0; i < HS; ++i) {
            sdot += drow[i] * v[i];
            dv[i] += pr * drow[i];
          }
          dp[t2] = sdot;
          D += p[t2] * sdot;
        }
        // softmax backward: ds = p (dp - D) scale, then s = scale q~.k~
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          const float* k = kh + t2 * HS;
          float* dk = dx + (b * T + t2) * C3 + d.C + h * HS;
          const float ds = rnd<F>(p[t2] * (dp[t2] - D) * d.scale);
          for (int64_t i = 0; i < HS; ++i) {
            dq[i] += ds * k[i];
            dk[i] += ds * q[i];
          }
        }
      }
    }
  }
}

AttDims attention_dims(const char* op, const Tensor& qkv, int n_head) {
  MPT_CHECK(qkv.shape.ndim == 3 && n_head > 0, std::string(op) + ": qkv must be (B, T, 3C)");
  AttDims d;
  d.B = qkv.dim(0), d.T = qkv.dim(1), d.C = qkv.dim(2) / 3, d.NH = n_head;
  d.HS = d.C / n_head;
  MPT_CHECK(qkv.dim(2) == 3 * d.C && d.HS * d.NH == d.C && d.HS >= 1,
            std::string(op) + ": qkv width must be 3 * n_head * head_size, head_size >= 1");
  d.scale = 1.0f / std::sqrt(static_cast<float>(d.HS));
  return d;
}

}  // namespace

void CpuBackend::attention_forward_f32(Tensor out, Tensor lse, Tensor qkv, int n_head,
                                       OperandFormat f) {
  const AttDims d = attention_dims("attention_forward", qkv, n_head);
  expect("attention_forward", "out", out, DType::f32, {d.B, d.T, d.C});
  expect("attention_forward", "lse", lse, DType::f32, {d.B, d.NH, d.T});
  // Per-thread scratch, allocated here: nothing may throw inside the parallel region.
  AttScratch scratch(threads_, d, 1, 3);
  float* o = out.as<float>();
  float* l = lse.as<float>();
  const float* x = qkv.as<float>();
  switch (f) {
    case OperandFormat::f32: attention_forward_rows<OperandFormat::f32>(o, l, x, d, scratch, threads_); break;
    case OperandFormat::tf32: attention_forward_rows<OperandFormat::tf32>(o, l, x, d, scratch, threads_); break;
    case OperandFormat::f16: attention_forward_rows<OperandFormat::f16>(o, l, x, d, scratch, threads_); break;
    case OperandFormat::bf16: attention_forward_rows<OperandFormat::bf16>(o, l, x, d, scratch, threads_); break;
  }
}

void CpuBackend::attention_backward_f32(Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse,
                                        int n_head, OperandFormat f) {
  const AttDims d = attention_dims("attention_backward", qkv, n_head);
  expect("attention_backward", "dqkv", dqkv, DType::f32, {d.B, d.T, 3 * d.C});
  expect("attention_backward", "dout", dout, DType::f32, {d.B, d.T, d.C});
  expect("attention_backward", "lse", lse, DType::f32, {d.B, d.NH, d.T});
  AttScratch scratch(threads_, d, 2, 4);
  float* dx = dqkv.as<float>();
  const float* g = dout.as<float>();
  const float* x = qkv.as<float>();
  const float* l = lse.as<float>();
  switch (f) {
    case OperandFormat::f32: attention_backward_rows<OperandFormat::f32>(dx, g, x, l, d, scratch, threads_); break;
    case OperandFormat::tf32: attention_backward_rows<OperandFormat::tf32>(dx, g, x, l, d, scratch, threads_); break;
    case OperandFormat::f16: attention_backward_rows<OperandFormat::f16>(dx, g, x, l, d, scratch, threads_); break;
    case OperandFormat::bf16: attention_backward_rows<OperandFormat::bf16>(dx, g, x, l, d, scratch, threads_); break;
  }
}

void CpuBackend::gelu_forward_f32(Tensor out, Tensor inp) {
  MPT_CHECK(out.numel() == inp.numel(), "gelu_forward: size mismatch");
  const float* x = inp.as<float>();
  float* o = out.as<float>();
  const int64_t n = inp.numel();
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    o[i] = 0.5f * v * (1.0f + fast_tanh(kGeluScale * (v + kGeluCubic * v * v * v)));
  }
}

void CpuBackend::gelu_backward_f32(Tensor dinp, Tensor inp, Tensor dout) {
  MPT_CHECK(dinp.numel() == inp.numel() && dout.numel() == inp.numel(), "gelu_backward: sizes");
  const float* x = inp.as<float>();
  const float* d = dout.as<float>();
  float* dx = dinp.as<float>();
  const int64_t n = inp.numel();
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float th = fast_tanh(kGeluScale * (v + kGeluCubic * v * v * v));
    const float sech2 = 1.0f - th * th;
    const float grad =
        0.5f * (1.0f + th) + 0.5f * v * sech2 * kGeluScale * (1.0f + 3.0f * kGeluCubic * v * v);
    dx[i] = grad * d[i];
  }
}

void CpuBackend::residual_forward_f32(Tensor out, Tensor a, Tensor b) {
  MPT_CHECK(out.numel() == a.numel() && b.numel() == a.numel(), "residual_forward: sizes");
  const float* x = a.as<float>();
  const float* y = b.as<float>();
  float* o = out.as<float>();
  const int64_t n = a.numel();
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
}

void CpuBackend::crossentropy_f32(Tensor losses, Tensor logits, Tensor targets,
                                               int vocab_size, float dloss) {
  const int64_t Vp = logits.dim(-1), N = logits.numel() / Vp, V = vocab_size;
  MPT_CHECK(V >= 1 && V <= Vp, "vocab_size larger than the logits");
  expect("crossentropy", "losses", losses.reshape({N}), DType::f32, {N});
  expect("crossentropy", "targets", targets.reshape({N}), DType::i32, {N});
  float* lg = logits.as<float>();
  const int32_t* tgt = targets.as<int32_t>();
  float* loss = losses.as<float>();
  check_ids("crossentropy", tgt, N, V);
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t n = 0; n < N; ++n) {
    float* row = lg + n * Vp;  // (Vp); only the first V columns are real tokens
    const int32_t y = tgt[n];
    float maxv = -INFINITY;
    for (int64_t i = 0; i < V; ++i) maxv = std::max(maxv, row[i]);
    float sum = 0.0f;
    for (int64_t i = 0; i < V; ++i) sum += std::exp(row[i] - maxv);
    const float logsum = std::log(sum) + maxv;
    loss[n] = logsum - row[y];
    if (dloss != 0.0f) {
      for (int64_t i = 0; i < V; ++i) {
        const float p = std::exp(row[i] - logsum);
        row[i] = dloss * (p - (i == y ? 1.0f : 0.0f));
      }
      for (int64_t i = V; i < Vp; ++i) row[i] = 0.0f;
    }
  }
}

}  // namespace mpt
