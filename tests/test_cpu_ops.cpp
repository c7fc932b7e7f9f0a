// Every CPU op: forward against a straightforward fp64 reference, backward against central
// finite differences of L = sum(w * out) with fresh random w. Shapes are deliberately awkward
// (not multiples of 32, more columns than one reduction block).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <omp.h>

#include "backend/cpu/cpu_backend.h"
#include "core/formats.h"
#include "test_util.h"

using namespace mpt;
using namespace mpt::test;

namespace {

double weighted_sum(const Owned& y, const Owned& w) {
  double s = 0.0;
  for (int64_t i = 0; i < y.n(); ++i) s += static_cast<double>(w.f()[i]) * y.f()[i];
  return s;
}

// Compares analytic gradients of x with central differences of `loss` at `samples` random
// elements plus the element of largest analytic gradient. fp32 forward passes limit accuracy
// to about 1e-6 relative in L, so eps = 1e-2 balances that against the O(eps^2) truncation.
void check_fd(const std::string& what, Owned& x, const std::vector<double>& analytic,
              const std::function<double()>& loss, Rng& rng, int samples = 24,
              double eps = 1e-2, double atol = 2e-3, double rtol = 1e-2) {
  ASSERT_EQ(static_cast<int64_t>(analytic.size()), x.n());
  std::vector<int64_t> idx;
  for (int s = 0; s < samples; ++s) idx.push_back(static_cast<int64_t>(rng.below(x.n())));
  idx.push_back(std::max_element(analytic.begin(), analytic.end(),
                                 [](double a, double b) { return std::fabs(a) < std::fabs(b); }) -
                analytic.begin());
  double max_abs = 0.0;
  for (double g : analytic) {
    ASSERT_TRUE(std::isfinite(g)) << what;
    max_abs = std::max(max_abs, std::fabs(g));
  }
  ASSERT_GT(max_abs, 0.0) << what << ": gradient is identically zero";
  for (int64_t i : idx) {
    const float orig = x.f()[i];
    const float up = orig + static_cast<float>(eps), down = orig - static_cast<float>(eps);
    x.f()[i] = up;
    const double lp = loss();
    x.f()[i] = down;
    const double lm = loss();
    x.f()[i] = orig;
    const double numeric = (lp - lm) / (static_cast<double>(up) - static_cast<double>(down));
    EXPECT_NEAR(analytic[i], numeric, atol + rtol * std::fabs(numeric))
        << what << " element " << i;
  }
}

// Gradient written into `g` by an accumulating op that started from `before`.
std::vector<double> accumulated(const Owned& g, const std::vector<float>& before) {
  std::vector<double> d(g.n());
  for (int64_t i = 0; i < g.n(); ++i) d[i] = static_cast<double>(g.f()[i]) - before[i];
  return d;
}

std::vector<double> as_double(const Owned& g) { return {g.f(), g.f() + g.n()}; }

class CpuOps : public ::testing::Test {
 protected:
  CpuBackend be{2};
  Rng rng{fresh_seed()};
};

}  // namespace

TEST_F(CpuOps, Embedding) {
  const int64_t B = 3, T = 5, C = 45, Vp = 11, maxT = 6;
  Owned tok = make(be, {B, T}, DType::i32);
  for (int64_t i = 0; i < tok.n(); ++i) tok.i()[i] = static_cast<int32_t>(rng.below(Vp));
  Owned wte = randn(be, {Vp, C}, rng), wpe = randn(be, {maxT, C}, rng);
  Owned out = make(be, {B, T, C}), w = randn(be, {B, T, C}, rng);
  be.embedding_forward(out.t, tok.t, wte.t, wpe.t);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c)
        ASSERT_EQ(out.f()[(b * T + t) * C + c],
                  wte.f()[tok.i()[b * T + t] * C + c] + wpe.f()[t * C + c]);

  Owned dwte = randn(be, {Vp, C}, rng), dwpe = randn(be, {maxT, C}, rng);
  const auto dwte0 = copy_of(dwte), dwpe0 = copy_of(dwpe);
  be.embedding_backward(dwte.t, dwpe.t, w.t, tok.t);
  auto loss = [&] {
    be.embedding_forward(out.t, tok.t, wte.t, wpe.t);
    return weighted_sum(out, w);
  };
  check_fd("dwte", wte, accumulated(dwte, dwte0), loss, rng);
  check_fd("dwpe", wpe, accumulated(dwpe, dwpe0), loss, rng);
  // position rows past T receive nothing
  for (int64_t c = 0; c < C; ++c) EXPECT_EQ(dwpe.f()[(maxT - 1) * C + c], dwpe0[(maxT - 1) * C + c]);
}

TEST_F(CpuOps, LayerNorm) {
  const int64_t B = 2, T = 5, C = 45;
  Owned x = randn(be, {B, T, C}, rng, 2.0);
  for (int64_t i = 0; i < x.n(); ++i) x.f()[i] += 0.5f;  // a non-zero mean to remove
  Owned wt = randn(be, {C}, rng, 0.3), bs = randn(be, {C}, rng, 0.3);
  for (int64_t c = 0; c < C; ++c) wt.f()[c] += 1.0f;
  Owned out = make(be, {B, T, C}), mean = make(be, {B, T}), rstd = make(be, {B, T});
  be.layernorm_forward(out.t, mean.t, rstd.t, x.t, wt.t, bs.t);
  for (int64_t n = 0; n < B * T; ++n) {
    double m = 0, v = 0;
    for (int64_t c = 0; c < C; ++c) m += x.f()[n * C + c];
    m /= C;
    for (int64_t c = 0; c < C; ++c) v += (x.f()[n * C + c] - m) * (x.f()[n * C + c] - m);
    v /= C;
    const double s = 1.0 / std::sqrt(v + 1e-5);
    EXPECT_NEAR(mean.f()[n], m, 1e-5);
    EXPECT_NEAR(rstd.f()[n], s, 1e-5 * s);
    for (int64_t c = 0; c < C; ++c)
      EXPECT_NEAR(out.f()[n * C + c], (x.f()[n * C + c] - m) * s * wt.f()[c] + bs.f()[c], 1e-5);
  }
  Owned w = randn(be, {B, T, C}, rng);
  Owned dx = randn(be, {B, T, C}, rng), dw = randn(be, {C}, rng), db = randn(be, {C}, rng);
  const auto dx0 = copy_of(dx), dw0 = copy_of(dw), db0 = copy_of(db);
  be.layernorm_backward(dx.t, dw.t, db.t, w.t, x.t, wt.t, mean.t, rstd.t);
  auto loss = [&] {
    be.layernorm_forward(out.t, mean.t, rstd.t, x.t, wt.t, bs.t);
    return weighted_sum(out, w);
  };
  check_fd("dinp", x, accumulated(dx, dx0), loss, rng);
  check_fd("dweight", wt, accumulated(dw, dw0), loss, rng);
  check_fd("dbias", bs, accumulated(db, db0), loss, rng);
}

// fp32 and tf32 matmuls: the forward against an fp64 product of the operands as the precision
// sees them (rounded to tf32 for tf32), the backward against finite differences.
TEST_F(CpuOps, Matmul) {
  for (MatmulPrecision prec : {MatmulPrecision::native, MatmulPrecision::tf32})
    for (bool with_bias : {true, false}) {
      SCOPED_TRACE(std::string(prec == MatmulPrecision::tf32 ? "tf32" : "fp32") +
                   (with_bias ? ", with bias" : ", without bias"));
      const int64_t B = 2, T = 7, C = 37, OC = 45;
      Owned x = randn(be, {B, T, C}, rng), wt = randn(be, {OC, C}, rng, 0.3);
      Owned bias = with_bias ? randn(be, {OC}, rng) : Owned{};
      Owned out = make(be, {B, T, OC});
      be.matmul_forward(out.t, x.t, wt.t, bias.t, prec);
      auto operand = [&](float v) {
        return prec == MatmulPrecision::tf32 ? double(round_tf32(v)) : double(v);
      };
      double max_rounding = 0;  // how far tf32 moved the result from the fp32 product
      for (int64_t n = 0; n < B * T; ++n)
        for (int64_t o = 0; o < OC; ++o) {
          double s = with_bias ? bias.f()[o] : 0.0, exact = s;
          for (int64_t c = 0; c < C; ++c) {
            s += operand(x.f()[n * C + c]) * operand(wt.f()[o * C + c]);
            exact += double(x.f()[n * C + c]) * wt.f()[o * C + c];
          }
          ASSERT_NEAR(out.f()[n * OC + o], s, 1e-5 * (1 + std::fabs(s)));
          max_rounding = std::max(max_rounding, std::fabs(s - exact));
        }
      if (prec == MatmulPrecision::tf32) {
        EXPECT_GT(max_rounding, 1e-4);  // tf32 really rounds...
        EXPECT_LT(max_rounding, 0.05);  // ...by about 2^-11 per operand
      }
      Owned w = randn(be, {B, T, OC}, rng);
      Owned dx = randn(be, {B, T, C}, rng);  // written, not accumulated: old contents must go
      Owned dw = randn(be, {OC, C}, rng), db = randn(be, {OC}, rng);
      const auto dw0 = copy_of(dw), db0 = copy_of(db);
      be.matmul_backward(dx.t, dw.t, with_bias ? db.t : Tensor(), w.t, x.t, wt.t, prec);
      if (prec == MatmulPrecision::native) {
        auto loss = [&] {
          be.matmul_forward(out.t, x.t, wt.t, bias.t, prec);
          return weighted_sum(out, w);
        };
        check_fd("dinp", x, as_double(dx), loss, rng);
        check_fd("dweight", wt, accumulated(dw, dw0), loss, rng);
        if (with_bias) check_fd("dbias", bias, accumulated(db, db0), loss, rng);
        continue;
      }
      // tf32: both backward products take tf32-rounded operands, exactly like the forward; the
      // reference is their fp64 product. (Finite differences cannot resolve tf32's rounding.)
      const auto dwg = accumulated(dw, dw0);
      for (int64_t n = 0; n < B * T; ++n)
        for (int64_t c = 0; c < C; ++c) {
          double ref = 0, mag = 0;
          for (int64_t o = 0; o < OC; ++o) {
            const double term = operand(w.f()[n * OC + o]) * operand(wt.f()[o * C + c]);
            ref += term;
            mag += std::fabs(term);
          }
          ASSERT_NEAR(dx.f()[n * C + c], ref, 1e-6 * mag + 1e-7) << "dinp " << n << "," << c;
        }
      for (int64_t o = 0; o < OC; ++o)
        for (int64_t c = 0; c < C; ++c) {
          double ref = 0, mag = 0;
          for (int64_t n = 0; n < B * T; ++n) {
            const double term = operand(w.f()[n * OC + o]) * operand(x.f()[n * C + c]);
            ref += term;
            mag += std::fabs(term);
          }
          // dweight started at dw0 (fp32 accumulation adds one rounding of |dw0|)
          ASSERT_NEAR(dwg[o * C + c], ref, 1e-6 * (mag + std::fabs(dw0[o * C + c])) + 1e-7)
              << "dweight " << o << "," << c;
        }
      if (with_bias)  // bias sums use the unrounded gradient: fp32 adds, no tf32 products
        for (int64_t o = 0; o < OC; ++o) {
          double ref = 0;
          for (int64_t n = 0; n < B * T; ++n) ref += w.f()[n * OC + o];
          ASSERT_NEAR(db.f()[o] - db0[o], ref, 1e-5 * (1 + std::fabs(ref)));
        }
    }
}

TEST_F(CpuOps, Attention) {
  const int64_t B = 2, T = 7, NH = 3, HS = 5, C = NH * HS;
  const MatmulPrecision native = MatmulPrecision::native;
  Owned qkv = randn(be, {B, T, 3 * C}, rng);
  Owned out = make(be, {B, T, C}), lse = make(be, {B, NH, T});
  be.attention_forward(out.t, lse.t, qkv.t, NH, native);
  // fp64 reference: softmax(q k^T / sqrt(HS)) over t2 <= t, times v; lse = log sum exp(scores)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> p(t + 1);
        double mx = -1e300, sum = 0;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          double s = 0;
          for (int64_t i = 0; i < HS; ++i)
            s += static_cast<double>(qkv.f()[(b * T + t) * 3 * C + h * HS + i]) *
                 qkv.f()[(b * T + t2) * 3 * C + C + h * HS + i];
          p[t2] = s / std::sqrt(static_cast<double>(HS));
          mx = std::max(mx, p[t2]);
        }
        for (auto& v : p) sum += (v = std::exp(v - mx));
        const double l = mx + std::log(sum);
        ASSERT_NEAR(lse.f()[(b * NH + h) * T + t], l, 1e-5 * (1 + std::fabs(l)));
        for (int64_t i = 0; i < HS; ++i) {
          double o = 0;
          for (int64_t t2 = 0; t2 <= t; ++t2)
            o += p[t2] / sum * qkv.f()[(b * T + t2) * 3 * C + 2 * C + h * HS + i];
          ASSERT_NEAR(out.f()[(b * T + t) * C + h * HS + i], o, 1e-5);
        }
      }
  Owned w = randn(be, {B, T, C}, rng);
  Owned dqkv = randn(be, {B, T, 3 * C}, rng);  // written: stale contents must not survive
  be.attention_backward(dqkv.t, w.t, qkv.t, lse.t, NH, native);
  auto loss = [&] {
    be.attention_forward(out.t, lse.t, qkv.t, NH, native);
    return weighted_sum(out, w);
  };
  check_fd("dqkv", qkv, as_double(dqkv), loss, rng, 48);
  // causality: the key and value of the last position influence nothing but itself
  be.attention_forward(out.t, lse.t, qkv.t, NH, native);
  const auto before = copy_of(out);
  const auto lse_before = copy_of(lse);
  for (int64_t i = C; i < 3 * C; ++i) qkv.f()[(0 * T + T - 1) * 3 * C + i] += 1.0f;
  be.attention_forward(out.t, lse.t, qkv.t, NH, native);
  for (int64_t t = 0; t < T - 1; ++t)
    for (int64_t c = 0; c < C; ++c) EXPECT_EQ(out.f()[t * C + c], before[t * C + c]);
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t t = 0; t < T - 1; ++t) EXPECT_EQ(lse.f()[h * T + t], lse_before[h * T + t]);
}

// Under tf32 the products read q, k, v and the probabilities rounded to tf32 (10-bit
// mantissas): the result moves off fp32's by about that much, no more.
TEST_F(CpuOps, AttentionTf32) {
  const int64_t B = 1, T = 9, NH = 2, HS = 16, C = NH * HS;
  Owned qkv = randn(be, {B, T, 3 * C}, rng);
  Owned o32 = make(be, {B, T, C}), otf = make(be, {B, T, C}), lse = make(be, {B, NH, T});
  be.attention_forward(o32.t, lse.t, qkv.t, NH, MatmulPrecision::native);
  be.attention_forward(otf.t, lse.t, qkv.t, NH, MatmulPrecision::tf32);
  // First order, u = 2^-11: each score moves by at most 2u scale sum|q k| (plus fp32 noise), so
  // each probability by 2 x that relative (its own and the log-sum-exp's); out = sum p~ v~ adds
  // 2u relative per term.
  const double u = 0x1p-11, scale = 1 / std::sqrt(double(HS));
  const float* x = qkv.f();
  int64_t differ = 0;
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> p(t + 1);
      double mx = -1e300, sum = 0, dmax = 0;
      for (int64_t t2 = 0; t2 <= t; ++t2) {
        double s = 0, mag = 0;
        for (int64_t i = 0; i < HS; ++i) {
          const double a = x[t * 3 * C + h * HS + i], b = x[t2 * 3 * C + C + h * HS + i];
          s += a * b, mag += std::fabs(a * b);
        }
        p[t2] = s * scale, mx = std::max(mx, p[t2]), dmax = std::max(dmax, 2 * u * mag * scale);
      }
      for (auto& v : p) sum += (v = std::exp(v - mx));
      for (int64_t i = 0; i < HS; ++i) {
        double bound = 0;
        for (int64_t t2 = 0; t2 <= t; ++t2)
          bound += p[t2] / sum * std::fabs(x[t2 * 3 * C + 2 * C + h * HS + i]) * (2.2 * dmax + 2.2 * u);
        const int64_t io = t * C + h * HS + i;
        ASSERT_NEAR(otf.f()[io], o32.f()[io], bound + 1e-6) << "out[" << io << "]";
        differ += otf.f()[io] != o32.f()[io];
      }
    }
  EXPECT_GT(differ, 0) << "tf32 attention computed exactly fp32's result";
}

// fp8 is not a precision for attention's products, and the operand format follows the dtypes.
TEST_F(CpuOps, AttentionOperandFormat) {
  using P = MatmulPrecision;
  EXPECT_EQ(attention_operand_format(DType::bf16, DType::bf16, P::native), OperandFormat::bf16);
  EXPECT_EQ(attention_operand_format(DType::f16, DType::f16, P::tf32), OperandFormat::f16);
  EXPECT_EQ(attention_operand_format(DType::bf16, DType::f32, P::native), OperandFormat::f32);
  EXPECT_EQ(attention_operand_format(DType::f16, DType::bf16, P::tf32), OperandFormat::tf32);
  EXPECT_EQ(attention_operand_format(DType::f32, DType::f32, P::tf32), OperandFormat::tf32);
  EXPECT_THROW(attention_operand_format(DType::bf16, DType::bf16, P::fp8), RuntimeError);
  EXPECT_THROW(attention_operand_format(DType::i32, DType::f32, P::native), RuntimeError);
  Owned qkv = randn(be, {1, 3, 6}, rng), out = make(be, {1, 3, 2}), lse = make(be, {1, 1, 3});
  EXPECT_THROW(be.attention_forward(out.t, lse.t, qkv.t, 1, P::fp8), RuntimeError);
}

TEST_F(CpuOps, Gelu) {
  const int64_t n = 333;
  Owned x = randn(be, {n}, rng, 2.0), out = make(be, {n}), w = randn(be, {n}, rng);
  be.gelu_forward(out.t, x.t);
  for (int64_t i = 0; i < n; ++i) {
    const double v = x.f()[i];
    const double ref = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    ASSERT_NEAR(out.f()[i], ref, 1e-6 * (1 + std::fabs(ref)));
  }
  Owned dx = randn(be, {n}, rng);
  be.gelu_backward(dx.t, x.t, w.t);
  // Against the fp64 derivative everywhere, tails included...
  for (int64_t i = 0; i < n; ++i) {
    const double v = x.f()[i], k = std::sqrt(2 / M_PI);
    const double th = std::tanh(k * (v + 0.044715 * v * v * v));
    const double d = 0.5 * (1 + th) + 0.5 * v * (1 - th * th) * k * (1 + 3 * 0.044715 * v * v);
    ASSERT_NEAR(dx.f()[i], d * w.f()[i], 1e-5 * (1 + std::fabs(d * w.f()[i]))) << "x = " << v;
  }
  // ...and against finite differences where fp32 resolves them: below x = -3, 1 + tanh cancels
  // to a few ulps and the forward is a staircase at the scale of eps.
  for (int64_t i = 0; i < n; ++i) x.f()[i] = std::max(x.f()[i], -3.0f);
  be.gelu_backward(dx.t, x.t, w.t);
  check_fd("gelu", x, as_double(dx), [&] {
    be.gelu_forward(out.t, x.t);
    return weighted_sum(out, w);
  }, rng, 48, 1e-3, 1e-3, 1e-2);
}

// A row's loss and gradients are NaN when the row holds a NaN or a +inf or is all -inf, and
// finite when some of it is -inf (those columns get probability 0): what the CUDA classifier
// must reproduce (CudaOps.CrossEntropyLongAndNonFiniteRows) and the trainer's skip relies on.
TEST_F(CpuOps, CrossEntropyOfNonFiniteRows) {
  const int64_t N = 4, V = 30, Vp = 32;
  Owned logits = randn(be, {N, Vp}, rng), tgt = make(be, {N}, DType::i32), losses = make(be, {N});
  for (int64_t n = 0; n < N; ++n) tgt.i()[n] = 3;
  logits.f()[0 * Vp + 7] = NAN;
  logits.f()[1 * Vp + 9] = INFINITY;
  for (int64_t i = 0; i < V; i += 4) logits.f()[2 * Vp + i + 1] = -INFINITY;  // not column 3
  for (int64_t i = 0; i < Vp; ++i) logits.f()[3 * Vp + i] = -INFINITY;
  be.crossentropy_forward_backward(losses.t, logits.t, tgt.t, V, 0.25f);
  EXPECT_TRUE(std::isnan(losses.f()[0]));
  EXPECT_TRUE(std::isnan(losses.f()[1]));
  EXPECT_TRUE(std::isfinite(losses.f()[2]));
  EXPECT_TRUE(std::isnan(losses.f()[3]));
  for (int64_t i = 0; i < V; ++i) {
    const float g = logits.f()[2 * Vp + i];
    EXPECT_TRUE(std::isfinite(g)) << i;
    if (i % 4 == 1) {
      EXPECT_EQ(g, 0.0f) << "a -inf logit has probability 0";
    }
  }
  for (int64_t n : {0, 1, 3})
    for (int64_t i = 0; i < V; ++i) EXPECT_TRUE(std::isnan(logits.f()[n * Vp + i])) << n << " " << i;
}

TEST_F(CpuOps, Residual) {
  Owned a = randn(be, {3, 41}, rng), b = randn(be, {3, 41}, rng), out = make(be, {3, 41});
  be.residual_forward(out.t, a.t, b.t);
  for (int64_t i = 0; i < a.n(); ++i) ASSERT_EQ(out.f()[i], a.f()[i] + b.f()[i]);
}

TEST_F(CpuOps, CrossEntropyMasksPaddingAndMatchesFiniteDifferences) {
  const int64_t N = 6, V = 50, Vp = 64;
  Owned logits = randn(be, {N, Vp}, rng, 2.0), tgt = make(be, {N}, DType::i32);
  for (int64_t n = 0; n < N; ++n) tgt.i()[n] = static_cast<int32_t>(rng.below(V));
  // Huge padded logits must change nothing: the padding is outside the softmax.
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = V; i < Vp; ++i) logits.f()[n * Vp + i] = 1e4f;
  Owned losses = make(be, {N}), scratch = make(be, {N, Vp});
  auto mean_loss = [&] {
    std::copy(logits.f(), logits.f() + logits.n(), scratch.f());
    be.crossentropy_forward_backward(losses.t, scratch.t, tgt.t, V, 0.0f);
    double s = 0;
    for (int64_t n = 0; n < N; ++n) s += losses.f()[n];
    return s / N;
  };
  mean_loss();
  for (int64_t n = 0; n < N; ++n) {
    double mx = -1e300, sum = 0;
    for (int64_t i = 0; i < V; ++i) mx = std::max(mx, double(logits.f()[n * Vp + i]));
    for (int64_t i = 0; i < V; ++i) sum += std::exp(logits.f()[n * Vp + i] - mx);
    const double ref = std::log(sum) + mx - logits.f()[n * Vp + tgt.i()[n]];
    EXPECT_NEAR(losses.f()[n], ref, 1e-5 * (1 + ref));
  }
  std::copy(logits.f(), logits.f() + logits.n(), scratch.f());
  be.crossentropy_forward_backward(losses.t, scratch.t, tgt.t, V, 1.0f / N);
  std::vector<double> grad(scratch.f(), scratch.f() + scratch.n());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = V; i < Vp; ++i) EXPECT_EQ(grad[n * Vp + i], 0.0);
  check_fd("dlogits", logits, grad, mean_loss, rng, 48, 1e-2, 2e-4, 1e-2);
}

TEST_F(CpuOps, SumSquaresIsExactAndIndependentOfThreads) {
  const int64_t n = 100003;
  Owned x = randn(be, {n}, rng);
  double ref = 0;
  for (int64_t i = 0; i < n; ++i) ref += static_cast<double>(x.f()[i]) * x.f()[i];
  const double got = be.sum_squares(x.t);
  EXPECT_NEAR(got, ref, 1e-9 * ref);
  CpuBackend one(1);
  EXPECT_EQ(one.sum_squares(x.t), got);
}

TEST_F(CpuOps, AdamWMatchesFp64Reference) {
  const int64_t n = 1001;
  Owned p = randn(be, {n}, rng), g = randn(be, {n}, rng), m = randn(be, {n}, rng, 0.1),
        v = randn(be, {n}, rng, 0.1);
  for (int64_t i = 0; i < n; ++i) v.f()[i] = std::fabs(v.f()[i]);
  const auto p0 = copy_of(p), m0 = copy_of(m), v0 = copy_of(v);
  AdamWParams hp{3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 7, 0.5f};
  be.adamw_update(p.t, Tensor(), g.t, m.t, v.t, hp, nullptr);
  for (int64_t i = 0; i < n; ++i) {
    const double gi = double(g.f()[i]) * 0.5;
    const double mi = 0.9 * m0[i] + 0.1 * gi;
    const double vi = 0.95 * v0[i] + 0.05 * gi * gi;
    const double mh = mi / (1 - std::pow(0.9, 7)), vh = vi / (1 - std::pow(0.95, 7));
    const double pi = p0[i] - 3e-3 * (mh / (std::sqrt(vh) + 1e-8) + 0.1 * p0[i]);
    ASSERT_NEAR(m.f()[i], mi, 1e-6 * (1 + std::fabs(mi)));
    ASSERT_NEAR(v.f()[i], vi, 1e-6 * (1 + vi));
    ASSERT_NEAR(p.f()[i], pi, 1e-6 * (1 + std::fabs(pi)));
  }
}

// adamw_update_many's precondition, checked by every backend before it writes: no two tensors
// overlap, within one element or across; touching ends, undefined and empty tensors are fine.
TEST(AdamWUpdateMany, OverlapsAreRefusedNamingBoth) {
  std::vector<float> mem(4000);
  auto at = [&](int64_t first, int64_t n) { return Tensor(mem.data() + first, DType::f32, {n}); };
  auto one = [&](int64_t base) {
    return AdamWTensors{at(base, 100), Tensor(), at(base + 100, 100), at(base + 200, 100),
                        at(base + 300, 100), AdamWParams{}};
  };
  auto refused = [](const std::vector<AdamWTensors>& all) -> std::string {
    try {
      check_adamw_disjoint(all);
    } catch (const RuntimeError& e) {
      return e.what();
    }
    return "";
  };
  std::vector<AdamWTensors> all = {one(0), one(400), one(800)};  // each ends where the next starts
  all[1].master = Tensor(mem.data() + 1200, DType::f32, {0});     // empty: no bytes to overlap
  EXPECT_EQ(refused(all), "");
  all[2].master = at(750, 100);  // across the end of tensor 1's v and tensor 2's param's start
  EXPECT_EQ(refused(all), "adamw_update_many: tensor 1's v and tensor 2's master overlap");
  all[2].master = at(3000, 100);
  all[0].v = at(50, 10);  // inside tensor 0's own param
  EXPECT_EQ(refused(all), "adamw_update_many: tensor 0's param and tensor 0's v overlap");
  all[0].v = at(300, 100);
  all[2].grad = all[1].grad;  // the same gradient twice
  const std::string msg = refused(all);
  EXPECT_TRUE(msg == "adamw_update_many: tensor 1's grad and tensor 2's grad overlap" ||
              msg == "adamw_update_many: tensor 2's grad and tensor 1's grad overlap")
      << msg;
}

// Every tensor's arguments are checked before the first is updated: a bad last tensor leaves the
// others as they were.
TEST(AdamWUpdateMany, ABadTensorLeavesTheOthersUnwritten) {
  CpuBackend be(1);
  Rng rng(fresh_seed());
  std::vector<Owned> keep;
  std::vector<AdamWTensors> all;
  for (int i = 0; i < 3; ++i) {
    Owned p = randn(be, {50}, rng), g = randn(be, {50}, rng), m = randn(be, {50}, rng, 0.1),
          v = make(be, {i == 2 ? 49 : 50});  // tensor 2's v is one element short
    AdamWParams hp{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1, 1.0f};
    all.push_back({p.t, Tensor(), g.t, m.t, v.t, hp});
    for (Owned* o : {&p, &g, &m, &v}) keep.push_back(std::move(*o));
  }
  const std::vector<float> p0 = copy_of(keep[0]), m0 = copy_of(keep[2]);
  try {
    be.adamw_update_many(all, nullptr);
    ADD_FAILURE() << "a v of 49 elements for a parameter of 50 was accepted";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("adamw_update_many: tensor 2: argument 'v' expected an "
                                         "fp32 tensor of 50 elements (param's), got fp32(49)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(copy_of(keep[0]), p0);
  EXPECT_EQ(copy_of(keep[2]), m0);
}

// Loops that are not BLAS must give the same bits whatever the thread count.
TEST_F(CpuOps, LoopOpsAreIndependentOfThreadCount) {
  CpuBackend one(1);
  const int64_t B = 2, T = 9, NH = 2, HS = 20, C = NH * HS, Vp = 13;
  Owned qkv = randn(be, {B, T, 3 * C}, rng), dout = randn(be, {B, T, C}, rng);
  Owned lse1 = make(be, {B, NH, T}), lse2 = make(be, {B, NH, T}), out1 = make(be, {B, T, C}),
        out2 = make(be, {B, T, C});
  Owned d1 = make(be, {B, T, 3 * C}), d2 = make(be, {B, T, 3 * C});
  be.attention_forward(out1.t, lse1.t, qkv.t, NH, MatmulPrecision::native);
  be.attention_backward(d1.t, dout.t, qkv.t, lse1.t, NH, MatmulPrecision::native);
  one.attention_forward(out2.t, lse2.t, qkv.t, NH, MatmulPrecision::native);
  one.attention_backward(d2.t, dout.t, qkv.t, lse2.t, NH, MatmulPrecision::native);
  EXPECT_EQ(copy_of(out1), copy_of(out2));
  EXPECT_EQ(copy_of(lse1), copy_of(lse2));
  EXPECT_EQ(copy_of(d1), copy_of(d2));
  Owned tok = make(be, {B, T}, DType::i32);
  for (int64_t i = 0; i < tok.n(); ++i) tok.i()[i] = static_cast<int32_t>(rng.below(3));
  Owned e1 = make(be, {Vp, C}), e2 = make(be, {Vp, C}), p1 = make(be, {T, C}), p2 = make(be, {T, C});
  be.embedding_backward(e1.t, p1.t, dout.t, tok.t);
  one.embedding_backward(e2.t, p2.t, dout.t, tok.t);
  EXPECT_EQ(copy_of(e1), copy_of(e2));
  EXPECT_EQ(copy_of(p1), copy_of(p2));

  // LayerNorm backward: row-wise dinp and the column-split dweight/dbias sums.
  Owned x = randn(be, {B, T, C}, rng), w = randn(be, {C}, rng), bias = randn(be, {C}, rng);
  Owned ln = make(be, {B, T, C}), mean = make(be, {B, T}), rstd = make(be, {B, T});
  be.layernorm_forward(ln.t, mean.t, rstd.t, x.t, w.t, bias.t);
  Owned dx1 = make(be, {B, T, C}), dx2 = make(be, {B, T, C}), dw1 = make(be, {C}),
        dw2 = make(be, {C}), db1 = make(be, {C}), db2 = make(be, {C});
  be.layernorm_backward(dx1.t, dw1.t, db1.t, dout.t, x.t, w.t, mean.t, rstd.t);
  one.layernorm_backward(dx2.t, dw2.t, db2.t, dout.t, x.t, w.t, mean.t, rstd.t);
  EXPECT_EQ(copy_of(dx1), copy_of(dx2));
  EXPECT_EQ(copy_of(dw1), copy_of(dw2));
  EXPECT_EQ(copy_of(db1), copy_of(db2));

  // Matmul bias gradient (the weight gradients are BLAS's and may split sums by thread count).
  Owned W = randn(be, {C, C}, rng), gx = make(be, {B, T, C}), gw = make(be, {C, C});
  Owned gb1 = make(be, {C}), gb2 = make(be, {C});
  be.matmul_backward(gx.t, gw.t, gb1.t, dout.t, x.t, W.t, MatmulPrecision::native);
  one.matmul_backward(gx.t, gw.t, gb2.t, dout.t, x.t, W.t, MatmulPrecision::native);
  EXPECT_EQ(copy_of(gb1), copy_of(gb2));

  // The fused classifier: losses and in-place gradients.
  Owned logits1 = randn(be, {B * T, Vp}, rng), tg = make(be, {B * T}, DType::i32);
  for (int64_t i = 0; i < tg.n(); ++i) tg.i()[i] = static_cast<int32_t>(rng.below(Vp - 2));
  Owned logits2 = make(be, {B * T, Vp}), l1 = make(be, {B * T}), l2 = make(be, {B * T});
  std::copy(logits1.f(), logits1.f() + logits1.n(), logits2.f());
  be.crossentropy_forward_backward(l1.t, logits1.t, tg.t, Vp - 2, 0.5f);
  one.crossentropy_forward_backward(l2.t, logits2.t, tg.t, Vp - 2, 0.5f);
  EXPECT_EQ(copy_of(l1), copy_of(l2));
  EXPECT_EQ(copy_of(logits1), copy_of(logits2));
}

// Backends with different thread counts share a process: a BLAS call must leave OpenMP's
// thread count as it found it.
TEST_F(CpuOps, BlasCallsRestoreOpenMpThreadCount) {
  const int before = omp_get_max_threads();
  CpuBackend one(1);
  Owned x = randn(be, {5, 7}, rng), w = randn(be, {3, 7}, rng), out = make(be, {5, 3});
  one.matmul_forward(out.t, x.t, w.t, Tensor(), MatmulPrecision::native);
  EXPECT_EQ(omp_get_max_threads(), before);
  Owned dx = make(be, {5, 7}), dw = make(be, {3, 7});
  one.matmul_backward(dx.t, dw.t, Tensor(), out.t, x.t, w.t, MatmulPrecision::native);
  EXPECT_EQ(omp_get_max_threads(), before);
}
