// Low-precision storage (fp16, bf16) and fp8 GEMM operands on the CPU backend, op by op.
//
// For every op and storage assignment (all fp16, all bf16, and the mixes the precision policies
// use), with fresh random inputs rounded to their dtypes, two checks per output:
//  - the emulation contract of backend.h, bit for bit: the op on low-precision tensors writes
//    exactly what the same op on fp32 tensors holding the widened inputs writes, rounded to
//    nearest even into the output's dtype (an accumulating output: widened, added in fp32,
//    rounded once). fp32-only outputs (LayerNorm statistics, attention's log-sum-exp, losses)
//    are bit-identical to the fp32 run's. Attention is the exception: its products round the
//    probabilities to the storage format (backend.h), so its outputs are checked against the
//    fp64 reference only, with that rounding in the tolerance.
//  - accuracy against an fp64 reference computed from the same (already rounded) inputs:
//      |got - ref| <= u_d |ref| + min_subnormal_d / 2 + (1 + u_d) tol32
//    where u_d = epsilon_d / 2 is the unit roundoff of the output's dtype (the store's rounding;
//    0 for fp32) and tol32 bounds the op's fp32 arithmetic, derived per op below from Higham's
//    gamma_n = n u / (1 - n u) (u = 2^-24): n roundings in a row perturb by at most gamma_n
//    relative, so a sum of n terms is off by at most gamma_{n-1} times the sum of their
//    magnitudes, in any order (Higham, "Accuracy and Stability of Numerical Algorithms",
//    2nd ed., 3.1 and 4.2). Bounds through exp/log/sqrt are first order.
// plus the cast counts each op adds, per tensor class, against counts derived from the fp32
// results with the formats' thresholds.
//
// Then fp8 GEMMs against fp64 GEMMs of the dequantised operands, saturation and underflow
// statistics on data of known distribution, cast/amax/count_nonfinite/fill, AdamW with master
// weights and with stochastic rounding, and sum_squares.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/formats.h"
#include "test_util.h"

using namespace mpt;
using namespace mpt::test;

namespace {

constexpr double kU = 0x1p-24;  // fp32's unit roundoff

double gamma32(double n) { return n * kU / (1.0 - n * kU); }

// Storage dtypes of one op call by role: activations and their gradients, weights, weight
// gradients.
struct Policy {
  const char* name;
  DType act, weight, grad;
};
constexpr Policy kPolicies[] = {
    {"all fp16", DType::f16, DType::f16, DType::f16},
    {"all bf16 (bf16-pure)", DType::bf16, DType::bf16, DType::bf16},
    {"fp16 activations and weights, fp32 weight gradients", DType::f16, DType::f16, DType::f32},
    {"bf16 activations and weights, fp32 weight gradients", DType::bf16, DType::bf16, DType::f32},
    {"bf16 activations, fp32 weights and weight gradients", DType::bf16, DType::f32, DType::f32},
};

// The counts narrowing the fp32 values y * scale (products in fp32) into dtype d must produce,
// from the format's thresholds: every value; the finite ones of magnitude above the largest
// finite value; the non-zero ones of magnitude at most half the smallest subnormal (they round
// to zero; exactly half is a tie, to the even zero). Nothing for fp32.
CastCounts narrowing_counts(const std::vector<float>& y, DType d, float scale = 1.0f) {
  if (d == DType::f32) return {};
  const DTypeTraits tr = dtype_traits(d);
  CastCounts c;
  for (float v : y) {
    const double a = std::fabs(static_cast<double>(v * scale));
    ++c.values;
    c.overflow += std::isfinite(a) && a > tr.max_finite;
    c.underflow += a > 0 && a <= tr.min_subnormal / 2;
  }
  return c;
}

struct ClassCounts {
  CastCounts c[kTensorClasses];
  CastCounts& operator[](TensorClass k) { return c[static_cast<int>(k)]; }
  // What storing the fp32 result `twin` into `low` (an op output) adds.
  void add(TensorClass k, const Owned& low, const Owned& twin) {
    (*this)[k] += narrowing_counts(copy_of(twin), low.t.dtype);
  }
};

void expect_counts(const Backend& be, ClassCounts want) {
  for (int k = 0; k < kTensorClasses; ++k) {
    const CastCounts got = be.cast_counts(static_cast<TensorClass>(k));
    const char* name = tensor_class_name(static_cast<TensorClass>(k));
    EXPECT_EQ(got.values, want.c[k].values) << name;
    EXPECT_EQ(got.overflow, want.c[k].overflow) << name;
    EXPECT_EQ(got.underflow, want.c[k].underflow) << name;
  }
}

// The counts after an op whose outputs (each: the tensor, its fp32 twin) are all of class k.
struct OutputPair {
  const Owned& low;
  const Owned& twin;
};
void expect_op_counts(const Backend& be, TensorClass k, std::initializer_list<OutputPair> outputs) {
  ClassCounts want;
  for (const OutputPair& o : outputs) want.add(k, o.low, o.twin);
  expect_counts(be, want);
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// |count - n p| within 6 standard deviations of a binomial(n, p): a false failure has
// probability ~2e-9.
void expect_binomial(const std::string& what, int64_t count, int64_t n, double p) {
  const double mean = static_cast<double>(n) * p, sd = std::sqrt(n * p * (1.0 - p));
  EXPECT_LE(std::fabs(static_cast<double>(count) - mean), 6.0 * sd)
      << what << ": " << count << " of " << n << ", expected " << mean << " +- " << sd;
}

// P(|Z| > z) for a standard normal Z.
double normal_two_tail(double z) { return std::erfc(z / std::sqrt(2.0)); }

class PrecisionOps : public ::testing::Test {
 protected:
  CpuBackend be{2};
  CpuBackend twin{2};  // runs the fp32 twins; its cast counts are never read
  Rng rng{fresh_seed()};
  // The largest error / tolerance check_output saw, of the stored outputs (their rounding
  // alone can come within a hair of its bound) and of the fp32 results (how much of the
  // derived fp32 bound the arithmetic used).
  double worst_ = 0.0, worst32_ = 0.0;

  void TearDown() override {
    if (worst_ > 0 || worst32_ > 0)
      std::printf("[  margin  ] largest error / tolerance: stored %.3g, fp32 %.3g\n", worst_,
                  worst32_);
  }

  // `got` (an op output in its dtype) against `twin` (the fp32 run) bit for bit, and against
  // the fp64 reference with the tolerance of the file comment; the fp32 run itself against the
  // reference within tol32 (the fp32 part of the tolerance on its own). NaN fails all three.
  // `operand_tol` (optional): an op whose arithmetic rounds internal operands to the storage
  // format (attention's probabilities and score gradients in fp16/bf16, backend.h) is not its
  // fp32 twin rounded: the bit-for-bit check is skipped and `got` may be off the reference by
  // (1 + u_d) operand_tol more.
  void check_output(const std::string& what, const Owned& got, const Owned& twin_out,
                    const std::vector<double>& ref, const std::vector<double>& tol32,
                    const std::vector<double>* operand_tol = nullptr) {
    ASSERT_EQ(twin_out.t.dtype, DType::f32);
    ASSERT_EQ(got.n(), twin_out.n());
    ASSERT_EQ(static_cast<int64_t>(ref.size()), got.n());
    ASSERT_EQ(static_cast<int64_t>(tol32.size()), got.n());
    const DType d = got.t.dtype;
    const double ud = d == DType::f32 ? 0.0 : dtype_epsilon(d) / 2;
    const double sub = d == DType::f32 ? 0.0 : dtype_traits(d).min_subnormal / 2;
    int64_t bad_bits = 0, bad_ref = 0, bad32 = 0;
    for (int64_t i = 0; i < got.n(); ++i) {
      const float y = twin_out.f()[i];
      const double err32 = std::fabs(y - ref[i]);
      if (!(err32 <= tol32[i])) {
        if (bad32++ < 3)
          ADD_FAILURE() << what << "[" << i << "] in fp32 = " << y << ", fp64 reference " << ref[i]
                        << ", error " << err32 << " > fp32 tolerance " << tol32[i];
      } else if (err32 > 0) {
        worst32_ = std::max(worst32_, err32 / tol32[i]);
      }
      if (std::isnan(y) || (!operand_tol && raw_bits(got.t, i) != narrow_bits(d, y))) {
        if (bad_bits++ < 3)
          ADD_FAILURE() << what << "[" << i << "]: stored bits " << std::hex << raw_bits(got.t, i)
                        << ", fp32 result " << std::dec << y << " rounds to " << std::hex
                        << narrow_bits(d, y);
      }
      const double g = widened_at(got.t, i);
      const double tol = ud * std::fabs(ref[i]) +
                         (1 + ud) * (tol32[i] + (operand_tol ? (*operand_tol)[i] : 0.0)) + sub;
      const double err = std::fabs(g - ref[i]);
      if (!(err <= tol)) {
        if (bad_ref++ < 3)
          ADD_FAILURE() << what << "[" << i << "] = " << g << ", fp64 reference " << ref[i]
                        << ", error " << err << " > tolerance " << tol;
      } else if (err > 0) {
        worst_ = std::max(worst_, err / tol);
      }
    }
    EXPECT_EQ(bad32, 0) << what << ": fp32 results off the fp64 reference";
    EXPECT_EQ(bad_bits, 0) << what << " (" << dtype_name(d) << "): elements not RNE(fp32 op)";
    EXPECT_EQ(bad_ref, 0) << what << " (" << dtype_name(d) << "): elements off the fp64 reference";
  }
};

}  // namespace

// ---- each op on fp16/bf16 storage

TEST_F(PrecisionOps, Embedding) {
  const int64_t B = 3, T = 5, C = 45, Vp = 7, maxT = 6;
  for (const Policy& pol : kPolicies) {
    SCOPED_TRACE(pol.name);
    Owned tok = make(be, {B, T}, DType::i32);
    for (int64_t i = 0; i < tok.n(); ++i) tok.i()[i] = static_cast<int32_t>(rng.below(Vp));
    Owned wte = randn_as(be, {Vp, C}, pol.weight, rng), wpe = randn_as(be, {maxT, C}, pol.weight, rng);
    Owned out = make(be, {B, T, C}, pol.act), out32 = make(be, {B, T, C});
    Owned wte32 = f32_copy(be, wte.t), wpe32 = f32_copy(be, wpe.t);
    be.reset_cast_counts();
    be.embedding_forward(out.t, tok.t, wte.t, wpe.t);
    twin.embedding_forward(out32.t, tok.t, wte32.t, wpe32.t);
    expect_op_counts(be, TensorClass::activation, {{out, out32}});
    std::vector<double> ref(out.n()), tol(out.n());
    for (int64_t bt = 0; bt < B * T; ++bt)
      for (int64_t c = 0; c < C; ++c) {
        const double a = wte32.f()[tok.i()[bt] * C + c], b = wpe32.f()[(bt % T) * C + c];
        ref[bt * C + c] = a + b;
        tol[bt * C + c] = gamma32(1) * std::fabs(a + b);  // one fp32 add
      }
    check_output("embedding out", out, out32, ref, tol);

    // dwte, dwpe accumulate: start from random contents
    Owned dout = randn_as(be, {B, T, C}, pol.act, rng);
    Owned dwte = randn_as(be, {Vp, C}, pol.grad, rng), dwpe = randn_as(be, {maxT, C}, pol.grad, rng);
    Owned dout32 = f32_copy(be, dout.t), dwte32 = f32_copy(be, dwte.t), dwpe32 = f32_copy(be, dwpe.t);
    std::vector<double> rte = to_double(copy_of(dwte32)), rpe = to_double(copy_of(dwpe32));
    std::vector<double> mte(rte.size()), mpe(rpe.size()), nte(rte.size()), npe(rpe.size());
    for (size_t i = 0; i < rte.size(); ++i) mte[i] = std::fabs(rte[i]);
    for (size_t i = 0; i < rpe.size(); ++i) mpe[i] = std::fabs(rpe[i]);
    for (int64_t bt = 0; bt < B * T; ++bt)
      for (int64_t c = 0; c < C; ++c) {
        const double d = dout32.f()[bt * C + c];
        const int64_t e = tok.i()[bt] * C + c, p = (bt % T) * C + c;
        rte[e] += d, mte[e] += std::fabs(d), nte[e] += 1;
        rpe[p] += d, mpe[p] += std::fabs(d), npe[p] += 1;
      }
    for (size_t i = 0; i < rte.size(); ++i) mte[i] *= gamma32(nte[i]);  // nte adds in a row
    for (size_t i = 0; i < rpe.size(); ++i) mpe[i] *= gamma32(npe[i]);
    be.reset_cast_counts();
    be.embedding_backward(dwte.t, dwpe.t, dout.t, tok.t);
    twin.embedding_backward(dwte32.t, dwpe32.t, dout32.t, tok.t);
    expect_op_counts(be, TensorClass::gradient, {{dwte, dwte32}, {dwpe, dwpe32}});
    check_output("dwte", dwte, dwte32, rte, mte);
    check_output("dwpe", dwpe, dwpe32, rpe, mpe);
  }
}

TEST_F(PrecisionOps, LayerNorm) {
  const int64_t B = 2, T = 5, C = 45, N = B * T;
  const double eps = 1e-5f;  // the kernel's fp32 constant
  for (const Policy& pol : kPolicies) {
    SCOPED_TRACE(pol.name);
    Owned x = randn_as(be, {B, T, C}, pol.act, rng, 2.0, 0.5);  // a non-zero mean to remove
    Owned w = randn_as(be, {C}, pol.weight, rng, 0.3, 1.0), b = randn_as(be, {C}, pol.weight, rng, 0.3);
    Owned out = make(be, {B, T, C}, pol.act), mean = make(be, {B, T}), rstd = make(be, {B, T});
    Owned x32 = f32_copy(be, x.t), w32 = f32_copy(be, w.t), b32 = f32_copy(be, b.t);
    Owned out32 = make(be, {B, T, C}), mean32 = make(be, {B, T}), rstd32 = make(be, {B, T});
    be.reset_cast_counts();
    be.layernorm_forward(out.t, mean.t, rstd.t, x.t, w.t, b.t);
    twin.layernorm_forward(out32.t, mean32.t, rstd32.t, x32.t, w32.t, b32.t);
    expect_op_counts(be, TensorClass::activation, {{out, out32}});
    // fp32 error: the mean is off by |dm| <= gamma_C mean|x|; rstd by gamma_{C+6} relative (the
    // squares, their sum, /C, +eps, sqrt, 1/; dm enters squared); out = (x - m) s w + b by
    // gamma_{C+10} (|w| s (mean|x| + |x - m|) + |out|).
    std::vector<double> ro(out.n()), to(out.n()), rm(N), tm(N), rs(N), ts(N);
    const float* xv = x32.f();
    for (int64_t n = 0; n < N; ++n) {
      double m = 0, mabs = 0, var = 0;
      for (int64_t c = 0; c < C; ++c) m += xv[n * C + c], mabs += std::fabs(xv[n * C + c]);
      m /= C, mabs /= C;
      for (int64_t c = 0; c < C; ++c) var += (xv[n * C + c] - m) * (xv[n * C + c] - m);
      var /= C;
      const double s = 1 / std::sqrt(var + eps);
      const double dm = gamma32(C) * mabs;
      rm[n] = m, tm[n] = dm;
      rs[n] = s, ts[n] = (gamma32(C + 6) + dm * dm / var) * s;
      for (int64_t c = 0; c < C; ++c) {
        const double xm = xv[n * C + c] - m, o = xm * s * w32.f()[c] + b32.f()[c];
        ro[n * C + c] = o;
        to[n * C + c] =
            gamma32(C + 10) * (std::fabs(w32.f()[c]) * s * (mabs + std::fabs(xm)) + std::fabs(o));
      }
    }
    check_output("layernorm out", out, out32, ro, to);
    check_output("mean", mean, mean32, rm, tm);
    check_output("rstd", rstd, rstd32, rs, ts);

    // backward from the forward's statistics; dinp, dweight, dbias accumulate
    Owned dout = randn_as(be, {B, T, C}, pol.act, rng), dx = randn_as(be, {B, T, C}, pol.act, rng);
    Owned dw = randn_as(be, {C}, pol.grad, rng), db = randn_as(be, {C}, pol.grad, rng);
    Owned dout32 = f32_copy(be, dout.t), dx32 = f32_copy(be, dx.t), dw32 = f32_copy(be, dw.t),
          db32 = f32_copy(be, db.t);
    // fp32 error, with m and s exact inputs: norm = (x - m) s is off by 2u relative, the row
    // means of dnorm = w dout and dnorm * norm by gamma_{C+1} and gamma_{C+4} of their
    // magnitudes; dx += s (dnorm - mean(dnorm) - norm mean(dnorm norm)) by gamma_{C+10} of
    // |dx0| + s (|dnorm| + mean|dnorm| + |norm| mean|dnorm norm|) + |dx|. The column sums: dw
    // += sum_n norm dout (3 roundings per term) and db += sum_n dout, over N rows.
    std::vector<double> rx(dx.n()), tx(dx.n()), rw(C), tw(C), rb(C), tb(C);
    for (int64_t c = 0; c < C; ++c) {
      rw[c] = dw32.f()[c], tw[c] = std::fabs(rw[c]);
      rb[c] = db32.f()[c], tb[c] = std::fabs(rb[c]);
    }
    for (int64_t n = 0; n < N; ++n) {
      const double m = mean.f()[n], s = rstd.f()[n];
      double a = 0, aa = 0, bv = 0, ba = 0;
      for (int64_t c = 0; c < C; ++c) {
        const double norm = (xv[n * C + c] - m) * s, dn = w32.f()[c] * dout32.f()[n * C + c];
        a += dn, aa += std::fabs(dn), bv += dn * norm, ba += std::fabs(dn * norm);
      }
      a /= C, aa /= C, bv /= C, ba /= C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = n * C + c;
        const double norm = (xv[i] - m) * s, d = dout32.f()[i], dn = w32.f()[c] * d;
        const double r = dx32.f()[i] + (dn - a - norm * bv) * s;
        rx[i] = r;
        tx[i] = gamma32(C + 10) * (std::fabs(dx32.f()[i]) +
                                   s * (std::fabs(dn) + aa + std::fabs(norm) * ba) + std::fabs(r));
        rw[c] += norm * d, tw[c] += std::fabs(norm * d);
        rb[c] += d, tb[c] += std::fabs(d);
      }
    }
    for (int64_t c = 0; c < C; ++c) tw[c] *= gamma32(N + 4), tb[c] *= gamma32(N + 1);
    be.reset_cast_counts();
    be.layernorm_backward(dx.t, dw.t, db.t, dout.t, x.t, w.t, mean.t, rstd.t);
    twin.layernorm_backward(dx32.t, dw32.t, db32.t, dout32.t, x32.t, w32.t, mean32.t, rstd32.t);
    expect_op_counts(be, TensorClass::gradient, {{dx, dx32}, {dw, dw32}, {db, db32}});
    check_output("layernorm dinp", dx, dx32, rx, tx);
    check_output("layernorm dweight", dw, dw32, rw, tw);
    check_output("layernorm dbias", db, db32, rb, tb);
  }
}

namespace {

// fp64 references of the matmul and its gradients from the operands' values (already as the
// multiplications see them), with the fp32 error bound of each sum: gamma_{K + extra} times the
// sum of the magnitudes of its terms, K the accumulation length, `extra` the roundings around
// it (the bias add, the scaling of an fp8 GEMM, the accumulation into an existing value).
struct MatmulRef {
  std::vector<double> out, tol;
};

// out(N,OC) = init(N,OC) + x(N,C) . w(OC,C)^T (init optional: empty).
MatmulRef matmul_ref(const std::vector<double>& x, const std::vector<double>& w,
                     const std::vector<double>& init, int64_t N, int64_t C, int64_t OC,
                     double extra) {
  MatmulRef r{std::vector<double>(N * OC), std::vector<double>(N * OC)};
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      double s = init.empty() ? 0.0 : init[n * OC + o], mag = std::fabs(s);
      for (int64_t c = 0; c < C; ++c) {
        s += x[n * C + c] * w[o * C + c];
        mag += std::fabs(x[n * C + c] * w[o * C + c]);
      }
      r.out[n * OC + o] = s;
      r.tol[n * OC + o] = gamma32(C + extra) * mag;
    }
  return r;
}

// a(R,C)^T
std::vector<double> transposed(const std::vector<double>& a, int64_t R, int64_t C) {
  std::vector<double> t(a.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) t[c * R + r] = a[r * C + c];
  return t;
}

// N copies of a bias row (none when the bias is).
std::vector<double> bias_rows(const std::vector<double>& bias, int64_t N) {
  std::vector<double> r;
  for (int64_t n = 0; n < N && !bias.empty(); ++n) r.insert(r.end(), bias.begin(), bias.end());
  return r;
}

// Column sums of d(N,OC) added to init.
MatmulRef column_sums_ref(const std::vector<double>& d, const std::vector<double>& init,
                          int64_t N, int64_t OC) {
  MatmulRef r{init, std::vector<double>(OC)};
  for (int64_t o = 0; o < OC; ++o) {
    double mag = std::fabs(init[o]);
    for (int64_t n = 0; n < N; ++n) r.out[o] += d[n * OC + o], mag += std::fabs(d[n * OC + o]);
    r.tol[o] = gamma32(N + 1) * mag;
  }
  return r;
}

}  // namespace

// Native matmuls: products of fp16/bf16 values are exact in fp32, so the only fp32 error is the
// accumulation.
TEST_F(PrecisionOps, MatmulNative) {
  const int64_t B = 2, T = 7, C = 37, OC = 45, N = B * T;
  for (const Policy& pol : kPolicies)
    for (bool with_bias : {true, false}) {
      SCOPED_TRACE(std::string(pol.name) + (with_bias ? ", with bias" : ", without bias"));
      Owned x = randn_as(be, {B, T, C}, pol.act, rng), w = randn_as(be, {OC, C}, pol.weight, rng, 0.3);
      Owned bias = with_bias ? randn_as(be, {OC}, pol.weight, rng) : Owned{};
      Owned out = make(be, {B, T, OC}, pol.act), out32 = make(be, {B, T, OC});
      Owned x32 = f32_copy(be, x.t), w32 = f32_copy(be, w.t);
      Owned bias32 = with_bias ? f32_copy(be, bias.t) : Owned{};
      be.reset_cast_counts();
      be.matmul_forward(out.t, x.t, w.t, bias.t, MatmulPrecision::native);
      twin.matmul_forward(out32.t, x32.t, w32.t, bias32.t, MatmulPrecision::native);
      expect_op_counts(be, TensorClass::activation, {{out, out32}});
      const auto xd = to_double(copy_of(x32)), wd = to_double(copy_of(w32));
      const auto bd = with_bias ? to_double(copy_of(bias32)) : std::vector<double>{};
      const MatmulRef f = matmul_ref(xd, wd, bias_rows(bd, N), N, C, OC, 1);
      check_output("matmul out", out, out32, f.out, f.tol);

      // dinp writes (stale contents must go); dweight, dbias accumulate
      Owned dout = randn_as(be, {B, T, OC}, pol.act, rng), dx = randn_as(be, {B, T, C}, pol.act, rng);
      Owned dw = randn_as(be, {OC, C}, pol.grad, rng), db = randn_as(be, {OC}, pol.grad, rng);
      Owned dout32 = f32_copy(be, dout.t), dx32 = f32_copy(be, dx.t), dw32 = f32_copy(be, dw.t),
            db32 = f32_copy(be, db.t);
      const auto dd = to_double(copy_of(dout32));
      const MatmulRef gx = matmul_ref(dd, transposed(wd, OC, C), {}, N, OC, C, 0);
      const MatmulRef gw = matmul_ref(transposed(dd, N, OC), transposed(xd, N, C),
                                      to_double(copy_of(dw32)), OC, N, C, 1);
      const MatmulRef gb = column_sums_ref(dd, to_double(copy_of(db32)), N, OC);
      be.reset_cast_counts();
      be.matmul_backward(dx.t, dw.t, with_bias ? db.t : Tensor(), dout.t, x.t, w.t,
                         MatmulPrecision::native);
      twin.matmul_backward(dx32.t, dw32.t, with_bias ? db32.t : Tensor(), dout32.t, x32.t, w32.t,
                           MatmulPrecision::native);
      ClassCounts wantg;
      wantg.add(TensorClass::gradient, dx, dx32);
      wantg.add(TensorClass::gradient, dw, dw32);
      if (with_bias) wantg.add(TensorClass::gradient, db, db32);
      expect_counts(be, wantg);
      check_output("matmul dinp", dx, dx32, gx.out, gx.tol);
      check_output("matmul dweight", dw, dw32, gw.out, gw.tol);
      if (with_bias) check_output("matmul dbias", db, db32, gb.out, gb.tol);
    }
}

// The bf16 policy: bf16 weights and activations, the weight gradient accumulated in fp32 across
// micro-batches. Two backward calls add into one fp32 dweight and dbias, each rounding once per
// call in fp32 - never through bf16.
TEST_F(PrecisionOps, MatmulWeightGradientAccumulatesInFp32AcrossMicroBatches) {
  const int64_t N = 11, C = 37, OC = 45;
  Owned w = randn_as(be, {OC, C}, DType::bf16, rng, 0.3), w32 = f32_copy(be, w.t);
  Owned dw = randn_as(be, {OC, C}, DType::f32, rng), db = randn_as(be, {OC}, DType::f32, rng);
  Owned dw32 = f32_copy(be, dw.t), db32 = f32_copy(be, db.t);
  std::vector<double> rw = to_double(copy_of(dw)), rb = to_double(copy_of(db));
  std::vector<double> mw(rw.size()), mb(rb.size());
  for (size_t i = 0; i < rw.size(); ++i) mw[i] = std::fabs(rw[i]);
  for (size_t i = 0; i < rb.size(); ++i) mb[i] = std::fabs(rb[i]);
  for (int micro = 0; micro < 2; ++micro) {
    // small gradients onto O(1) sums: bf16 accumulation would lose most of them
    Owned x = randn_as(be, {N, C}, DType::bf16, rng), dout = randn_as(be, {N, OC}, DType::bf16, rng, 1e-3);
    Owned dx = make(be, {N, C}, DType::bf16), dx32 = make(be, {N, C});
    Owned x32 = f32_copy(be, x.t), dout32 = f32_copy(be, dout.t);
    be.reset_cast_counts();
    be.matmul_backward(dx.t, dw.t, db.t, dout.t, x.t, w.t, MatmulPrecision::native);
    twin.matmul_backward(dx32.t, dw32.t, db32.t, dout32.t, x32.t, w32.t, MatmulPrecision::native);
    expect_op_counts(be, TensorClass::gradient, {{dx, dx32}});  // fp32 gradients: no narrowing
    for (int64_t o = 0; o < OC; ++o)
      for (int64_t n = 0; n < N; ++n) {
        const double d = dout32.f()[n * OC + o];
        rb[o] += d, mb[o] += std::fabs(d);
        for (int64_t c = 0; c < C; ++c)
          rw[o * C + c] += d * x32.f()[n * C + c], mw[o * C + c] += std::fabs(d * x32.f()[n * C + c]);
      }
  }
  // each call: a sum of N products plus one add into dweight; two calls
  std::vector<double> tw(mw.size()), tb(mb.size());
  for (size_t i = 0; i < mw.size(); ++i) tw[i] = gamma32(2 * (N + 1)) * mw[i];
  for (size_t i = 0; i < mb.size(); ++i) tb[i] = gamma32(2 * N) * mb[i];
  check_output("dweight after two micro-batches", dw, dw32, rw, tw);
  check_output("dbias after two micro-batches", db, db32, rb, tb);
}

TEST_F(PrecisionOps, Attention) {
  const int64_t B = 2, T = 7, NH = 3, HS = 5, C = NH * HS, C3 = 3 * C;
  const double scale = 1 / std::sqrt(static_cast<double>(HS));
  const MatmulPrecision native = MatmulPrecision::native;
  for (const Policy& pol : kPolicies) {
    SCOPED_TRACE(pol.name);
    // The products' operand format is the activations' (both qkv and dout have that dtype):
    // the probabilities and score gradients are rounded to it (u_f relative, and in fp16 up to
    // half a subnormal absolute), which the fp32 twin does not do.
    const double uf = dtype_epsilon(pol.act) / 2, subf = dtype_traits(pol.act).min_subnormal / 2;
    Owned qkv = randn_as(be, {B, T, C3}, pol.act, rng);
    Owned out = make(be, {B, T, C}, pol.act), lse = make(be, {B, NH, T});
    Owned qkv32 = f32_copy(be, qkv.t), out32 = make(be, {B, T, C}), lse32 = make(be, {B, NH, T});
    be.reset_cast_counts();
    be.attention_forward(out.t, lse.t, qkv.t, NH, native);
    twin.attention_forward(out32.t, lse32.t, qkv32.t, NH, native);
    expect_op_counts(be, TensorClass::activation, {{out, out32}});
    // The scores of fp16/bf16 values are exact products summed in fp32, as the twin's: the
    // log-sum-exp (fp32, before any operand rounding) is the twin's, bit for bit.
    EXPECT_EQ(copy_of(lse), copy_of(lse32));
    // fp32 error, first order: a score s_j = scale q.k_j is off by ds_j <= gamma_{HS+3} scale
    // sum|q k_j| (HS products and adds, the product with scale, scale's own two roundings).
    // lse = m + log(sum_j exp(s_j - m)): each term off by ds_j + u|s_j - m| + 2u relative, the
    // sum by their largest plus gamma_{t+1}, so lse by that, plus u|log sum| (the log within
    // an ulp) and u|lse| (the add). p_j = exp(s_j - lse) is then off by ep_j = ds_j + dlse +
    // u|s_j - lse| + 2u relative, and out = sum_j p_j v_j by sum_j p_j |v_j| (ep_j + gamma_{t+2}).
    const float* x = qkv32.f();
    std::vector<double> P(B * NH * T * T, 0.0), EP(B * NH * T * T, 0.0);  // p and ep by row
    std::vector<double> ro(out.n()), to(out.n()), po(out.n()), rl(lse.n()), tl(lse.n());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t t = 0; t < T; ++t) {
          std::vector<double> s(t + 1), ds(t + 1);
          double mx = -INFINITY, dmax = 0, sum = 0, esum = 0;
          for (int64_t t2 = 0; t2 <= t; ++t2) {
            double dot = 0, mag = 0;
            for (int64_t i = 0; i < HS; ++i) {
              const double q = x[(b * T + t) * C3 + h * HS + i], k = x[(b * T + t2) * C3 + C + h * HS + i];
              dot += q * k, mag += std::fabs(q * k);
            }
            s[t2] = dot * scale, ds[t2] = gamma32(HS + 3) * mag * scale;
            mx = std::max(mx, s[t2]), dmax = std::max(dmax, ds[t2]);
          }
          for (int64_t t2 = 0; t2 <= t; ++t2) {
            sum += std::exp(s[t2] - mx);
            esum = std::max(esum, ds[t2] + dmax + kU * std::fabs(s[t2] - mx) + 2 * kU);
          }
          const double l = mx + std::log(sum);
          const double dlse = dmax + esum + gamma32(t + 1) + kU * std::log(sum) + kU * std::fabs(l) + kU;
          const int64_t row = (b * NH + h) * T + t;
          rl[row] = l, tl[row] = dlse;
          for (int64_t t2 = 0; t2 <= t; ++t2) {
            P[row * T + t2] = std::exp(s[t2] - l);
            EP[row * T + t2] = ds[t2] + dlse + kU * std::fabs(s[t2] - l) + 2 * kU;
          }
          for (int64_t i = 0; i < HS; ++i) {
            double o = 0, tol = 0, ptol = 0;
            for (int64_t t2 = 0; t2 <= t; ++t2) {
              const double v = std::fabs(x[(b * T + t2) * C3 + 2 * C + h * HS + i]);
              const double p = P[row * T + t2], ep = EP[row * T + t2];
              o += p * x[(b * T + t2) * C3 + 2 * C + h * HS + i];
              tol += p * v * (ep + gamma32(t + 2));
              ptol += (uf * p * (1 + ep) + subf) * v;
            }
            const int64_t io = (b * T + t) * C + h * HS + i;
            ro[io] = o, to[io] = tol, po[io] = ptol;
          }
        }
    check_output("attention out", out, out32, ro, to, &po);
    for (int64_t i = 0; i < lse.n(); ++i)
      ASSERT_NEAR(lse32.f()[i], rl[i], tl[i]) << "lse[" << i << "]";

    // backward: the probabilities recomputed from lse (off by ep_j relative, as above), then a
    // polynomial in dout, qkv and p: its fp32 error is at most gamma_n times the same
    // computation on magnitudes (no cancellation), n the longest chain of roundings: dout.v
    // (HS), sum_j p_j dp_j (T + 1), ds = p (dp - D) scale (5, scale's included), dq/dk/dv sums
    // (T + 1); plus, first order, what the errors of p carry: dp_j |dp_j - D| scale through ds_j
    // and p_j scale sum_k dp_k |dp_k| through D, and dp_j |dout| into dv.
    Owned dout = randn_as(be, {B, T, C}, pol.act, rng), dqkv = randn_as(be, {B, T, C3}, pol.act, rng);
    Owned dout32 = f32_copy(be, dout.t), dqkv32 = make(be, {B, T, C3});
    const float* d = dout32.f();
    std::vector<double> rg(dqkv.n(), 0.0), mg(dqkv.n(), 0.0), eg(dqkv.n(), 0.0), og(dqkv.n(), 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t row = (b * NH + h) * T + t;
          std::vector<double> dp(t + 1), dabs(t + 1);
          double D = 0, Dabs = 0, Derr = 0;
          for (int64_t t2 = 0; t2 <= t; ++t2) {
            const double p = P[row * T + t2], pe = p * EP[row * T + t2];
            double s = 0, sa = 0;
            for (int64_t i = 0; i < HS; ++i) {
              const double dv = d[(b * T + t) * C + h * HS + i];
              const double v = x[(b * T + t2) * C3 + 2 * C + h * HS + i];
              s += dv * v, sa += std::fabs(dv * v);
              const int64_t iv = (b * T + t2) * C3 + 2 * C + h * HS + i;
              rg[iv] += p * dv, mg[iv] += std::fabs(p * dv), eg[iv] += pe * std::fabs(dv);
              og[iv] += (uf * (p + pe) + subf) * std::fabs(dv);
            }
            dp[t2] = s, dabs[t2] = sa;
            D += p * s, Dabs += p * sa, Derr += pe * sa;
          }
          for (int64_t t2 = 0; t2 <= t; ++t2) {
            const double p = P[row * T + t2], pe = p * EP[row * T + t2];
            const double g = p * (dp[t2] - D) * scale;
            const double ga = p * (dabs[t2] + Dabs) * scale;
            const double ge = (pe * (dabs[t2] + Dabs) + p * Derr) * scale;
            const double gr = uf * (ga + ge) + subf;  // ds rounded to the operand format
            for (int64_t i = 0; i < HS; ++i) {
              const int64_t iq = (b * T + t) * C3 + h * HS + i, ik = (b * T + t2) * C3 + C + h * HS + i;
              rg[iq] += g * x[ik], mg[iq] += ga * std::fabs(x[ik]), eg[iq] += ge * std::fabs(x[ik]);
              rg[ik] += g * x[iq], mg[ik] += ga * std::fabs(x[iq]), eg[ik] += ge * std::fabs(x[iq]);
              og[iq] += gr * std::fabs(x[ik]);
              og[ik] += gr * std::fabs(x[iq]);
            }
          }
        }
    for (size_t i = 0; i < mg.size(); ++i) mg[i] = gamma32(HS + 2 * T + 10) * mg[i] + eg[i];
    be.reset_cast_counts();
    be.attention_backward(dqkv.t, dout.t, qkv.t, lse.t, NH, native);
    twin.attention_backward(dqkv32.t, dout32.t, qkv32.t, lse32.t, NH, native);
    expect_op_counts(be, TensorClass::gradient, {{dqkv, dqkv32}});
    check_output("attention dqkv", dqkv, dqkv32, rg, mg, &og);
  }
}

TEST_F(PrecisionOps, Gelu) {
  const int64_t n = 333;
  const double k = std::sqrt(2 / M_PI), cub = 0.044715;
  for (const Policy& pol : kPolicies) {
    SCOPED_TRACE(pol.name);
    Owned x = randn_as(be, {n}, pol.act, rng, 2.0), out = make(be, {n}, pol.act);
    Owned x32 = f32_copy(be, x.t), out32 = make(be, {n});
    be.reset_cast_counts();
    be.gelu_forward(out.t, x.t);
    twin.gelu_forward(out32.t, x32.t);
    expect_op_counts(be, TensorClass::activation, {{out, out32}});
    Owned dout = randn_as(be, {n}, pol.act, rng), dx = randn_as(be, {n}, pol.act, rng);
    Owned dout32 = f32_copy(be, dout.t), dx32 = make(be, {n});
    be.reset_cast_counts();
    be.gelu_backward(dx.t, x.t, dout.t);
    twin.gelu_backward(dx32.t, x32.t, dout32.t);
    expect_op_counts(be, TensorClass::gradient, {{dx, dx32}});
    // fp32 error: the argument a = k (v + c v^3) is off by 6u relative (its roundings and the
    // fp32 constants'), so tanh by 6u |a| sech^2(a); tanh as 1 - 2 / (exp(2a) + 1) adds 9u
    // absolute (expf within an ulp, the add, the division, 1 - r). gelu = 0.5 v (1 + tanh)
    // then carries 0.5 |v| (dth + 3u (1 + tanh)). The derivative 0.5 (1 + th) + 0.5 v sech2 k
    // (1 + 3 c v^2), sech2 = 1 - th^2 off by 2 dth + 2u, the product's 9 roundings, the sum's
    // and the product with dout.
    std::vector<double> rf(n), tf(n), rb(n), tb(n);
    for (int64_t i = 0; i < n; ++i) {
      const double v = x32.f()[i], a = k * (v + cub * v * v * v), th = std::tanh(a);
      const double sech2 = 1 - th * th;
      const double dth = 9 * kU + 6 * kU * std::fabs(a) * sech2;
      rf[i] = 0.5 * v * (1 + th);
      tf[i] = 0.5 * std::fabs(v) * (dth + 3 * kU * (1 + th));
      const double t1 = 0.5 * (1 + th), t2 = 0.5 * v * sech2 * k * (1 + 3 * cub * v * v);
      const double grad = t1 + t2, dv = dout32.f()[i];
      const double dgrad = 0.5 * dth + kU * t1 +
                           0.5 * std::fabs(v) * k * (1 + 3 * cub * v * v) *
                               (2 * dth + 2 * kU + 9 * kU * sech2) +
                           2 * kU * std::fabs(grad);
      rb[i] = grad * dv;
      tb[i] = std::fabs(dv) * dgrad;
    }
    check_output("gelu out", out, out32, rf, tf);
    check_output("gelu dinp", dx, dx32, rb, tb);
  }
}

// matmul_gelu_forward, matmul_backward_gelu and matmul_residual_forward are the two ops each
// fuses (backend.h), bit for bit and count for count, under every policy, fp32 and fp8 GEMMs;
// the backward's GELU and the residual add run in place on the CPU (the rounded product never
// has a tensor of its own), which must change nothing either.
// Two tensors of the same dtype and shape with the same bits, element for element.
void same_bits(const std::string& what, const Owned& a, const Owned& b) {
  ASSERT_EQ(a.t.bytes(), b.t.bytes());
  int64_t bad = 0;
  for (int64_t i = 0; i < a.n(); ++i) bad += raw_bits(a.t, i) != raw_bits(b.t, i);
  EXPECT_EQ(bad, 0) << what << ": elements that differ";
}

std::vector<CastCounts> counts_now(const Backend& b) {
  std::vector<CastCounts> c;
  for (int k = 0; k < kTensorClasses; ++k) c.push_back(b.cast_counts(static_cast<TensorClass>(k)));
  return c;
}

void expect_same(const std::vector<CastCounts>& a, const std::vector<CastCounts>& b) {
  for (int k = 0; k < kTensorClasses; ++k) {
    const char* name = tensor_class_name(static_cast<TensorClass>(k));
    EXPECT_EQ(a[k].values, b[k].values) << name;
    EXPECT_EQ(a[k].overflow, b[k].overflow) << name;
    EXPECT_EQ(a[k].underflow, b[k].underflow) << name;
  }
}

TEST_F(PrecisionOps, FusedMatmulOpsAreTheOpsTheyFuse) {
  const int64_t N = 13, C = 37, OC = 44;
  std::vector<Policy> policies(std::begin(kPolicies), std::end(kPolicies));
  policies.push_back({"fp32", DType::f32, DType::f32, DType::f32});
  for (const Policy& pol : policies)
    for (bool fp8 : {false, true}) {
      SCOPED_TRACE(std::string(pol.name) + (fp8 ? ", fp8 GEMMs" : ""));
      Owned x = randn_as(be, {N, C}, pol.act, rng), w = randn_as(be, {OC, C}, pol.weight, rng, 0.4);
      Owned bias = randn_as(be, {OC}, pol.weight, rng);
      MatmulSpec spec(fp8 ? MatmulPrecision::fp8 : MatmulPrecision::native);
      if (fp8) {
        spec.inp = {DType::e4m3, 1.1f * 448.0f / be.amax(x.t), nullptr};
        spec.weight = {DType::e4m3, 0.8f * 448.0f / be.amax(w.t), nullptr};
        spec.dout = {DType::e5m2, 1024.0f, nullptr};
      }
      Owned pre = make(be, {N, OC}, pol.act), out = make(be, {N, OC}, pol.act);
      Owned pre2 = make(be, {N, OC}, pol.act), out2 = make(be, {N, OC}, pol.act);
      be.reset_cast_counts();
      be.matmul_gelu_forward(out.t, pre.t, x.t, w.t, bias.t, spec);
      const auto fused = counts_now(be);
      be.reset_cast_counts();
      be.matmul_forward(pre2.t, x.t, w.t, bias.t, spec);
      be.gelu_forward(out2.t, pre2.t);
      expect_same(fused, counts_now(be));
      same_bits("pre", pre, pre2);
      same_bits("out", out, out2);
      int64_t zeros = 0;
      for (float v : test::widened(out.t)) zeros += v == 0.0f;
      EXPECT_LT(zeros, out.n() / 4) << "GELU of random products is mostly non-zero";

      // The residual stream plus the layer's output.
      Owned stream = randn_as(be, {N, OC}, pol.act, rng, 2.0);
      Owned sum = randn_as(be, {N, OC}, pol.act, rng), y = make(be, {N, OC}, pol.act);
      Owned sum2 = make(be, {N, OC}, pol.act);
      be.reset_cast_counts();
      be.matmul_residual_forward(sum.t, stream.t, x.t, w.t, bias.t, spec);
      const auto fused_r = counts_now(be);
      be.reset_cast_counts();
      be.matmul_forward(y.t, x.t, w.t, bias.t, spec);
      be.residual_forward(sum2.t, stream.t, y.t);
      expect_same(fused_r, counts_now(be));
      same_bits("residual sum", sum, sum2);

      // The LM head and the classifier (no bias; 3 padded columns), training and evaluating:
      // the gradient over the logits, or the logits themselves when dloss is 0.
      for (float dloss : {0.37f, 0.0f}) {
        const int vocab = static_cast<int>(OC) - 3;
        Owned targets = make(be, {N}, DType::i32);
        for (int64_t i = 0; i < N; ++i)
          static_cast<int32_t*>(targets.t.data)[i] = static_cast<int32_t>(rng.next_u64() % vocab);
        Owned logits = randn_as(be, {N, OC}, pol.act, rng), logits2 = make(be, {N, OC}, pol.act);
        Owned losses = make(be, {N}, DType::f32), losses2 = make(be, {N}, DType::f32);
        be.reset_cast_counts();
        be.matmul_crossentropy(losses.t, logits.t, x.t, w.t, targets.t, vocab, dloss, spec);
        const auto fused_c = counts_now(be);
        be.reset_cast_counts();
        be.matmul_forward(logits2.t, x.t, w.t, Tensor(), spec);
        be.crossentropy_forward_backward(losses2.t, logits2.t, targets.t, vocab, dloss);
        expect_same(fused_c, counts_now(be));
        same_bits(dloss != 0.0f ? "dlogits" : "logits", logits, logits2);
        same_bits("losses", losses, losses2);
        for (float l : test::widened(losses.t)) EXPECT_TRUE(std::isfinite(l) && l > 0.0f) << l;
        EXPECT_THROW(be.matmul_crossentropy(losses.t, logits.t, logits.t, w.t, targets.t, vocab,
                                            dloss, spec),
                     RuntimeError)
            << "logits overlapping inp";
        EXPECT_THROW(be.matmul_crossentropy(Tensor(logits.t.data, DType::f32, {N}), logits.t, x.t,
                                            w.t, targets.t, vocab, dloss, spec),
                     RuntimeError)
            << "logits overlapping losses";
      }

      // Backward: dweight, dbias accumulate onto the same starting values; dinp starts stale.
      Owned dout = randn_as(be, {N, OC}, pol.act, rng, 0.5);
      Owned dw = randn_as(be, {OC, C}, pol.grad, rng), db = randn_as(be, {OC}, pol.grad, rng);
      Owned dw2 = make(be, {OC, C}, pol.grad), db2 = make(be, {OC}, pol.grad);
      std::memcpy(dw2.t.data, dw.t.data, dw.t.bytes());
      std::memcpy(db2.t.data, db.t.data, db.t.bytes());
      Owned dx = randn_as(be, {N, C}, pol.act, rng), g = make(be, {N, C}, pol.act);
      Owned dx2 = make(be, {N, C}, pol.act);
      Owned gpre = randn_as(be, {N, C}, pol.act, rng, 2.0);  // the GELU's input
      be.reset_cast_counts();
      be.matmul_backward_gelu(dx.t, dw.t, db.t, dout.t, x.t, w.t, gpre.t, spec);
      const auto fusedb = counts_now(be);
      be.reset_cast_counts();
      be.matmul_backward(g.t, dw2.t, db2.t, dout.t, x.t, w.t, spec);
      be.gelu_backward(dx2.t, gpre.t, g.t);
      expect_same(fusedb, counts_now(be));
      same_bits("dinp", dx, dx2);
      same_bits("dweight", dw, dw2);
      same_bits("dbias", db, db2);
    }
  EXPECT_THROW(be.matmul_backward_gelu(Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
                                       Tensor(), MatmulPrecision::native),
               RuntimeError);
  // Overlapping outputs (or dinp over the GELU input it still has to read) are refused.
  Owned x = randn(be, {N, C}, rng), w = randn(be, {OC, C}, rng), y = make(be, {N, OC});
  Owned dw = make(be, {OC, C}), half = make(be, {2 * N, OC});
  EXPECT_THROW(be.matmul_gelu_forward(y.t, y.t, x.t, w.t, Tensor(), MatmulPrecision::native),
               RuntimeError);
  const Tensor lo = half.buf.view(0, DType::f32, {N, OC});
  const Tensor mid = half.buf.view(4 * (N * OC / 2), DType::f32, {N, OC});
  EXPECT_THROW(be.matmul_gelu_forward(lo, mid, x.t, w.t, Tensor(), MatmulPrecision::native),
               RuntimeError);
  EXPECT_THROW(be.matmul_backward_gelu(x.t, dw.t, Tensor(), y.t, x.t, w.t, x.t,
                                       MatmulPrecision::native),
               RuntimeError);
  Owned r = randn(be, {N, OC}, rng);
  EXPECT_THROW(be.matmul_residual_forward(r.t, r.t, x.t, w.t, Tensor(), MatmulPrecision::native),
               RuntimeError)
      << "out over the residual it still has to read";
  Owned sq = randn(be, {N, N}, rng), wsq = randn(be, {N, N}, rng), rsq = randn(be, {N, N}, rng);
  EXPECT_THROW(be.matmul_residual_forward(sq.t, rsq.t, sq.t, wsq.t, Tensor(),
                                          MatmulPrecision::native),
               RuntimeError)
      << "out over the input it still has to read";
}

// The record itself: what was written, for which inp and scale; forgotten with its memory.
TEST(Fp8InpCaches, RecordsTheLastWriteAndForgetsFreedMemory) {
  alignas(16) static uint8_t cache_bytes[64], other_bytes[64];
  alignas(16) static float inp_values[64];
  MatmulSpec spec(MatmulPrecision::fp8);
  spec.inp = {DType::e4m3, 2.0f, nullptr};
  spec.inp_cache = Tensor(cache_bytes, DType::e4m3, {8, 8});
  const Tensor inp(inp_values, DType::f32, {8, 8});
  Fp8InpCaches r;
  EXPECT_THROW(r.expect_holds("op", spec, inp), RuntimeError) << "never written";
  r.wrote(spec, inp);
  EXPECT_NO_THROW(r.expect_holds("op", spec, inp));
  MatmulSpec rescaled = spec;
  rescaled.inp.scale = 4.0f;
  EXPECT_THROW(r.expect_holds("op", rescaled, inp), RuntimeError);
  r.wrote(rescaled, inp);  // rewritten: the newer scale is what it holds
  EXPECT_NO_THROW(r.expect_holds("op", rescaled, inp));
  EXPECT_THROW(r.expect_holds("op", spec, inp), RuntimeError);
  MatmulSpec other = spec;
  other.inp_cache = Tensor(other_bytes, DType::e4m3, {8, 8});
  r.wrote(other, inp);
  r.forget(inp_values, sizeof inp_values);  // memory beside the caches
  EXPECT_NO_THROW(r.expect_holds("op", rescaled, inp));
  EXPECT_NO_THROW(r.expect_holds("op", other, inp));
  // Ranges that end where the cache starts, or start where it ends, leave it alone.
  r.forget(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(cache_bytes) - 8), 8);
  r.forget(cache_bytes + 64, 1);
  EXPECT_NO_THROW(r.expect_holds("op", rescaled, inp));
  r.wrote(other, inp);  // other's memory may begin right there, and was rightly forgotten
  r.forget(cache_bytes + 63, 1);  // the cache's last byte, freed or written over
  EXPECT_THROW(r.expect_holds("op", rescaled, inp), RuntimeError) << "part of it is gone";
  EXPECT_NO_THROW(r.expect_holds("op", other, inp)) << "another cache's record stays";
  r.wrote(spec, inp);
  r.forget(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(cache_bytes) - 8), 9);  // from below
  EXPECT_THROW(r.expect_holds("op", spec, inp), RuntimeError);
}

// MatmulSpec::inp_cache: a forward that leaves its quantised input for the backward gives the
// bits and counts of one that does not, and so does a backward that reads it instead of
// quantising inp again (here through the fused GELU ops, which the model uses), even with inp's
// memory overwritten in between. A cache that
// does not hold this inp under this format and scale is refused, before anything is written.
TEST_F(PrecisionOps, Fp8InputCacheGivesTheBitsOfQuantisingAgain) {
  const int64_t N = 24, C = 40, OC = 36;
  for (DType act : {DType::bf16, DType::f16, DType::f32})
    for (DType fi : {DType::e4m3, DType::e5m2}) {
      SCOPED_TRACE(std::string(dtype_name(act)) + " operands, " + dtype_name(fi) + " inp");
      Owned x = randn_as(be, {N, C}, act, rng), w = randn_as(be, {OC, C}, act, rng, 0.4);
      Owned bias = randn_as(be, {OC}, act, rng);
      MatmulSpec spec(MatmulPrecision::fp8);
      const float maxf = static_cast<float>(dtype_traits(fi).max_finite);
      // 1.5x: the largest third of inp saturates (counted overflows that the cache must keep).
      spec.inp = {fi, 1.5f * maxf / be.amax(x.t), nullptr};
      spec.weight = {DType::e4m3, 0.8f * 448.0f / be.amax(w.t), nullptr};
      spec.dout = {DType::e5m2, 4096.0f, nullptr};
      MatmulSpec cached = spec;
      Owned cache = make(be, {N, C}, fi);
      cached.inp_cache = cache.t;
      // The cached forward reads a copy of x that is overwritten before its backward: given the
      // cache, the backward reads nothing of inp but its shape and address.
      Owned xc = make(be, {N, C}, act);
      std::memcpy(xc.t.data, x.t.data, x.t.bytes());

      Owned pre = make(be, {N, OC}, act), out = make(be, {N, OC}, act);
      Owned pre2 = make(be, {N, OC}, act), out2 = make(be, {N, OC}, act);
      be.reset_cast_counts();
      be.matmul_gelu_forward(out.t, pre.t, xc.t, w.t, bias.t, cached);
      const auto with_cache = counts_now(be);
      EXPECT_GT(with_cache[static_cast<int>(TensorClass::activation)].overflow, 0);
      be.reset_cast_counts();
      be.matmul_gelu_forward(out2.t, pre2.t, x.t, w.t, bias.t, spec);
      expect_same(with_cache, counts_now(be));
      same_bits("pre", pre, pre2);
      same_bits("out", out, out2);

      Owned dout = randn_as(be, {N, OC}, act, rng, 0.5), gpre = randn_as(be, {N, C}, act, rng);
      Owned dw = randn_as(be, {OC, C}, DType::f32, rng), db = randn_as(be, {OC}, DType::f32, rng);
      Owned dw2 = make(be, {OC, C}), db2 = make(be, {OC});
      std::memcpy(dw2.t.data, dw.t.data, dw.t.bytes());
      std::memcpy(db2.t.data, db.t.data, db.t.bytes());
      Owned dx = make(be, {N, C}, act), dx2 = make(be, {N, C}, act);
      be.fill(xc.t, NAN);
      be.reset_cast_counts();
      be.matmul_backward_gelu(dx.t, dw.t, db.t, dout.t, xc.t, w.t, gpre.t, cached);
      const auto back_cached = counts_now(be);
      be.reset_cast_counts();
      be.matmul_backward_gelu(dx2.t, dw2.t, db2.t, dout.t, x.t, w.t, gpre.t, spec);
      expect_same(back_cached, counts_now(be));
      same_bits("dinp", dx, dx2);
      same_bits("dweight", dw, dw2);
      same_bits("dbias", db, db2);
      for (float v : test::widened(dw.t)) ASSERT_TRUE(std::isfinite(v));

      // Refused, with dweight left as it was: a cache written for another scale, for another
      // inp tensor, or never; of the wrong format or size, over inp, or under a native spec.
      const std::vector<float> dw_before = test::widened(dw.t);
      auto refused = [&](const char* what, const MatmulSpec& s, const Tensor& inp) {
        EXPECT_THROW(be.matmul_backward(dx.t, dw.t, db.t, dout.t, inp, w.t, s), RuntimeError)
            << what;
        EXPECT_EQ(test::widened(dw.t), dw_before) << what;
      };
      MatmulSpec other_scale = cached;
      other_scale.inp.scale *= 2.0f;
      refused("another scale", other_scale, xc.t);
      refused("another inp tensor (even with the values it had)", cached, x.t);
      Owned fresh = make(be, {N, C}, fi);
      MatmulSpec never = spec;
      never.inp_cache = fresh.t;
      refused("a cache no forward wrote", never, xc.t);
      Owned wrong = make(be, {N, C}, fi == DType::e4m3 ? DType::e5m2 : DType::e4m3);
      MatmulSpec wrong_format = spec;
      wrong_format.inp_cache = wrong.t;
      EXPECT_THROW(be.matmul_forward(pre.t, x.t, w.t, bias.t, wrong_format), RuntimeError);
      Owned small = make(be, {N - 1, C}, fi);
      MatmulSpec wrong_size = spec;
      wrong_size.inp_cache = small.t;
      EXPECT_THROW(be.matmul_forward(pre.t, x.t, w.t, bias.t, wrong_size), RuntimeError);
      MatmulSpec over_inp = spec;
      over_inp.inp_cache = Tensor(x.t.data, fi, {N, C});
      EXPECT_THROW(be.matmul_forward(pre.t, x.t, w.t, bias.t, over_inp), RuntimeError);
      MatmulSpec native(MatmulPrecision::native);
      native.inp_cache = cache.t;
      EXPECT_THROW(be.matmul_forward(pre.t, x.t, w.t, bias.t, native), RuntimeError);
      // The cache still serves the backward it was written for.
      EXPECT_NO_THROW(be.matmul_backward(dx.t, dw.t, db.t, dout.t, xc.t, w.t, cached));
      // Until it is written by other means (here a copy from the host): refused then.
      const std::vector<float> dw_now = test::widened(dw.t);
      const std::vector<uint8_t> zeros(static_cast<size_t>(N * C), 0);
      be.copy_from_host(cache.t, zeros.data());
      EXPECT_THROW(be.matmul_backward(dx.t, dw.t, db.t, dout.t, xc.t, w.t, cached), RuntimeError);
      EXPECT_EQ(test::widened(dw.t), dw_now);
    }
}

// layernorm_forward_fp8 (an Fp8Output) followed by a GEMM that reads its output as stored
// quantised is layernorm_forward into round_to followed by the GEMM quantising that: the same fp8
// values (the caches hold them), the same products, cast counts and amax; the GEMM given the fp8
// tensor leaves its spec's amax alone. The backward, from the cache or from the fp8 inp itself,
// gives the same bits too. Scales saturate the largest outputs, and three columns of tiny LN
// weights underflow, so both kinds of count are exercised.
TEST_F(PrecisionOps, Fp8OutputIsTheOpThenTheGemmsQuantisation) {
  const int64_t N = 21, C = 40, OC = 36;
  for (DType act : {DType::bf16, DType::f16, DType::f32})
    for (DType fi : {DType::e4m3, DType::e5m2}) {
      SCOPED_TRACE(std::string(dtype_name(act)) + " activations, " + dtype_name(fi));
      Owned x = randn_as(be, {N, C}, act, rng, 2.0, 0.5);
      // fp32 LayerNorm weights (as under fp32 master weights), three of them tiny: those
      // columns' outputs (~1e-10) underflow in fp16 or in fp8.
      Owned lw2 = randn_as(be, {C}, DType::f32, rng, 0.3, 1.0);
      Owned lb2 = randn_as(be, {C}, DType::f32, rng, 0.3);
      for (int c = 0; c < 3; ++c) lw2.f()[c] = 1e-10f, lb2.f()[c] = 0.0f;
      Owned w = randn_as(be, {OC, C}, act, rng, 0.4), bias = randn_as(be, {OC}, act, rng);

      // Unfused: the LayerNorm stored in act, the GEMM quantising it.
      Owned ln = make(be, {N, C}, act), mean = make(be, {N}), rstd = make(be, {N});
      be.layernorm_forward(ln.t, mean.t, rstd.t, x.t, lw2.t, lb2.t);
      const MatmulSpec spec = producer_fp8_spec(fi, be.amax(ln.t), be.amax(w.t));
      float amax_a = -1.0f, amax_b = -1.0f, untouched = -7.0f;
      MatmulSpec sa = spec, sb = spec;
      Owned cache_a = make(be, {N, C}, fi), cache_b = make(be, {N, C}, fi);
      sa.inp.amax = &amax_a;
      sa.inp_cache = cache_a.t;
      sb.inp.amax = &untouched;
      sb.inp_cache = cache_b.t;
      Owned out_a = make(be, {N, OC}, act), out_b = make(be, {N, OC}, act);
      be.reset_cast_counts();
      be.layernorm_forward(ln.t, mean.t, rstd.t, x.t, lw2.t, lb2.t);
      be.matmul_forward(out_a.t, ln.t, w.t, bias.t, sa);
      const auto counts_a = counts_now(be);

      // Fused: the LayerNorm stored quantised, the GEMM reading it as it is.
      Owned q = make(be, {N, C}, fi), mean_b = make(be, {N}), rstd_b = make(be, {N});
      Fp8Output fo{act, spec.inp};
      fo.q.amax = &amax_b;
      be.reset_cast_counts();
      be.layernorm_forward_fp8(q.t, mean_b.t, rstd_b.t, x.t, lw2.t, lb2.t, fo);
      be.matmul_forward(out_b.t, q.t, w.t, bias.t, sb);
      expect_same(counts_a, counts_now(be));
      const CastCounts ca = counts_a[static_cast<int>(TensorClass::activation)];
      EXPECT_GT(ca.overflow, 0);
      EXPECT_GT(ca.underflow, 0);
      EXPECT_EQ(ca.values, (act == DType::f32 ? 1 : 2) * N * C + (act == DType::f32 ? 0 : N * OC));
      EXPECT_EQ(amax_a, amax_b);
      EXPECT_EQ(untouched, -7.0f) << "a GEMM reading a stored quantised inp reports no amax";
      same_bits("mean", mean, mean_b);
      same_bits("rstd", rstd, rstd_b);
      same_bits("fp8 values (the caches)", cache_a, cache_b);
      same_bits("fp8 values (the fused output)", cache_a, q);
      same_bits("out", out_a, out_b);

      // The backward: from the caches, and from the inps themselves.
      Owned dout = randn_as(be, {N, OC}, act, rng, 0.5);
      for (bool cached : {true, false}) {
        SCOPED_TRACE(cached ? "backward from the caches" : "backward from the inps");
        MatmulSpec ba = sa, bb = sb;
        if (!cached) ba.inp_cache = bb.inp_cache = Tensor();
        Owned dx_a = make(be, {N, C}, act), dx_b = make(be, {N, C}, act);
        Owned dw_a = make(be, {OC, C}), dw_b = make(be, {OC, C});
        be.reset_cast_counts();
        be.matmul_backward(dx_a.t, dw_a.t, Tensor(), dout.t, ln.t, w.t, ba);
        const auto back_a = counts_now(be);
        be.reset_cast_counts();
        be.matmul_backward(dx_b.t, dw_b.t, Tensor(), dout.t, q.t, w.t, bb);
        expect_same(back_a, counts_now(be));
        same_bits("dinp", dx_a, dx_b);
        same_bits("dweight", dw_a, dw_b);
      }

      // A NaN in the input: the amax the fused op reports is NaN, as the GEMM's would be.
      Owned xn = make(be, {N, C}, act);
      std::memcpy(xn.t.data, x.t.data, x.t.bytes());
      store_rounded(xn.t, 5 * C + 7, NAN);
      float amax_nan = 0.0f;
      fo.q.amax = &amax_nan;
      be.layernorm_forward_fp8(q.t, mean_b.t, rstd_b.t, xn.t, lw2.t, lb2.t, fo);
      EXPECT_TRUE(std::isnan(amax_nan));

      // Refused: an output not of the format, a round_to not a float storage dtype, a bad
      // scale; a GEMM given an fp8 inp of another format than its spec's.
      Owned wrong = make(be, {N, C}, fi == DType::e4m3 ? DType::e5m2 : DType::e4m3);
      EXPECT_THROW(be.layernorm_forward_fp8(wrong.t, mean_b.t, rstd_b.t, x.t, lw2.t, lb2.t, fo),
                   RuntimeError);
      EXPECT_THROW(be.layernorm_forward_fp8(ln.t, mean_b.t, rstd_b.t, x.t, lw2.t, lb2.t, fo),
                   RuntimeError);
      Fp8Output bad = fo;
      bad.round_to = DType::e4m3;
      EXPECT_THROW(be.layernorm_forward_fp8(q.t, mean_b.t, rstd_b.t, x.t, lw2.t, lb2.t, bad),
                   RuntimeError);
      bad = fo;
      bad.q.scale = 0.0f;
      EXPECT_THROW(be.layernorm_forward_fp8(q.t, mean_b.t, rstd_b.t, x.t, lw2.t, lb2.t, bad),
                   RuntimeError);
      MatmulSpec other = spec;
      other.inp.format = fi == DType::e4m3 ? DType::e5m2 : DType::e4m3;
      if (other.inp.format == DType::e5m2) other.weight.format = DType::e4m3;
      EXPECT_THROW(be.matmul_forward(out_b.t, q.t, w.t, bias.t, other), RuntimeError);
      EXPECT_THROW(be.matmul_forward(out_b.t, q.t, w.t, bias.t, MatmulSpec()), RuntimeError);
    }
}

// The MLP's GELU stored quantised for mlp.c_proj (MatmulSpec::gelu_fp8: matmul_gelu_forward
// with an fp8 out), then c_proj reading it (matmul_residual_forward), is the unfused pair: the
// same pre, fp8 values (caches), sums, counts and amax. So is gelu_forward_fp8 alone.
TEST_F(PrecisionOps, Fp8GeluOutputIsTheGeluThenTheGemmsQuantisation) {
  const int64_t N = 19, C = 32, H = 48;  // H: the hidden width (c_fc's OC, c_proj's C)
  for (DType act : {DType::bf16, DType::f16, DType::f32})
    for (DType fi : {DType::e4m3, DType::e5m2}) {
      SCOPED_TRACE(std::string(dtype_name(act)) + " activations, " + dtype_name(fi));
      Owned x = randn_as(be, {N, C}, act, rng), wfc = randn_as(be, {H, C}, act, rng, 0.5);
      Owned bfc = randn_as(be, {H}, act, rng), wpr = randn_as(be, {C, H}, act, rng, 0.3);
      Owned bpr = randn_as(be, {C}, act, rng), res = randn_as(be, {N, C}, act, rng);
      // Unfused first, to pick c_proj's scale from the GELU's amax: its largest third saturates.
      Owned pre = make(be, {N, H}, act), g = make(be, {N, H}, act);
      const MatmulSpec fc(MatmulPrecision::native);
      be.matmul_gelu_forward(g.t, pre.t, x.t, wfc.t, bfc.t, fc);
      const MatmulSpec proj = producer_fp8_spec(fi, be.amax(g.t), be.amax(wpr.t));
      float amax_a = -1.0f, amax_b = -1.0f, untouched = -7.0f;
      MatmulSpec pa = proj, pb = proj;
      pa.inp.amax = &amax_a;
      pb.inp.amax = &untouched;
      Owned cache_a = make(be, {N, H}, fi), cache_b = make(be, {N, H}, fi);
      pa.inp_cache = cache_a.t;
      pb.inp_cache = cache_b.t;
      Owned out_a = make(be, {N, C}, act), out_b = make(be, {N, C}, act);
      be.reset_cast_counts();
      be.matmul_gelu_forward(g.t, pre.t, x.t, wfc.t, bfc.t, fc);
      be.matmul_residual_forward(out_a.t, res.t, g.t, wpr.t, bpr.t, pa);
      const auto counts_a = counts_now(be);

      Owned pre_b = make(be, {N, H}, act), q = make(be, {N, H}, fi);
      MatmulSpec fc_b = fc;
      fc_b.gelu_fp8 = Fp8Output{act, proj.inp};
      fc_b.gelu_fp8.q.amax = &amax_b;
      be.reset_cast_counts();
      be.matmul_gelu_forward(q.t, pre_b.t, x.t, wfc.t, bfc.t, fc_b);
      be.matmul_residual_forward(out_b.t, res.t, q.t, wpr.t, bpr.t, pb);
      expect_same(counts_a, counts_now(be));
      EXPECT_GT(counts_a[static_cast<int>(TensorClass::activation)].overflow, 0);
      EXPECT_EQ(amax_a, amax_b);
      EXPECT_EQ(untouched, -7.0f);
      same_bits("pre", pre, pre_b);
      same_bits("fp8 values (the caches)", cache_a, cache_b);
      same_bits("fp8 values (the fused output)", cache_a, q);
      same_bits("out", out_a, out_b);

      // gelu_forward_fp8 alone (which the default matmul_gelu_forward calls): its counts, the
      // rounding's and the quantisation's, and its amax.
      Owned q2 = make(be, {N, H}, fi);
      float amax_c = -1.0f;
      Fp8Output alone = fc_b.gelu_fp8;
      alone.q.amax = &amax_c;
      be.reset_cast_counts();
      be.gelu_forward_fp8(q2.t, pre_b.t, alone);
      const CastCounts c2 = be.cast_counts(TensorClass::activation);
      EXPECT_EQ(c2.values, (act == DType::f32 ? 1 : 2) * N * H);
      same_bits("gelu_forward_fp8", q, q2);
      EXPECT_EQ(amax_c, amax_b);
      // An fp8 out needs its Fp8Output's format.
      MatmulSpec wrong = fc_b;
      wrong.gelu_fp8.q.format = fi == DType::e4m3 ? DType::e5m2 : DType::e4m3;
      EXPECT_THROW(be.matmul_gelu_forward(q.t, pre_b.t, x.t, wfc.t, bfc.t, wrong), RuntimeError);
      EXPECT_THROW(be.gelu_forward_fp8(q.t, pre_b.t, wrong.gelu_fp8), RuntimeError);
    }
}

TEST_F(PrecisionOps, Residual) {
  for (const Policy& pol : kPolicies) {
    SCOPED_TRACE(pol.name);
    Owned a = randn_as(be, {3, 41}, pol.act, rng), b = randn_as(be, {3, 41}, pol.act, rng);
    Owned out = make(be, {3, 41}, pol.act);
    Owned a32 = f32_copy(be, a.t), b32 = f32_copy(be, b.t), out32 = make(be, {3, 41});
    be.reset_cast_counts();
    be.residual_forward(out.t, a.t, b.t);
    twin.residual_forward(out32.t, a32.t, b32.t);
    expect_op_counts(be, TensorClass::activation, {{out, out32}});
    std::vector<double> ref(out.n()), tol(out.n());
    for (int64_t i = 0; i < out.n(); ++i) {
      ref[i] = double(a32.f()[i]) + b32.f()[i];
      tol[i] = gamma32(1) * std::fabs(ref[i]);
    }
    check_output("residual out", out, out32, ref, tol);
  }
}

TEST_F(PrecisionOps, CrossEntropy) {
  const int64_t N = 6, V = 50, Vp = 64;
  const float dloss = 1.0f / N;
  for (const Policy& pol : kPolicies) {
    SCOPED_TRACE(pol.name);
    Owned logits = randn_as(be, {N, Vp}, pol.act, rng, 2.0), tgt = make(be, {N}, DType::i32);
    for (int64_t n = 0; n < N; ++n) tgt.i()[n] = static_cast<int32_t>(rng.below(V));
    for (int64_t n = 0; n < N; ++n)  // padding outside the softmax, whatever it holds
      for (int64_t i = V; i < Vp; ++i) store_rounded(logits.t, n * Vp + i, 1e4f);
    Owned logits32 = f32_copy(be, logits.t), losses = make(be, {N}), losses32 = make(be, {N});
    const auto x = copy_of(logits32);

    // dloss = 0: losses only; the logits stay as they are
    be.reset_cast_counts();
    be.crossentropy_forward_backward(losses.t, logits.t, tgt.t, V, 0.0f);
    expect_counts(be, ClassCounts{});
    for (int64_t i = 0; i < logits.n(); ++i) ASSERT_EQ(widened_at(logits.t, i), x[i]);

    be.reset_cast_counts();
    be.crossentropy_forward_backward(losses.t, logits.t, tgt.t, V, dloss);
    twin.crossentropy_forward_backward(losses32.t, logits32.t, tgt.t, V, dloss);
    expect_op_counts(be, TensorClass::gradient, {{logits, logits32}});
    // fp32 error, first order: sum_i exp(x_i - max) is off by e_S = 2u + u max|x_i - max| +
    // gamma_V relative, logsum = log(S) + max by d = e_S + 2u |log S| + u |logsum|, the loss by
    // d + u |loss|. p_i = exp(x_i - logsum) by d + u |x_i - logsum| + 2u relative, the gradient
    // dloss (p_i - [i = y]) by |dloss| (p_i e_p + u |p_i - [i = y]|) + u |grad|.
    std::vector<double> rl(N), tl(N), rg(logits.n(), 0.0), tg(logits.n(), 0.0);
    for (int64_t n = 0; n < N; ++n) {
      const float* row = x.data() + n * Vp;
      double mx = -INFINITY, sum = 0, spread = 0;
      for (int64_t i = 0; i < V; ++i) mx = std::max(mx, double(row[i]));
      for (int64_t i = 0; i < V; ++i) sum += std::exp(row[i] - mx), spread = std::max(spread, mx - row[i]);
      const double logsum = std::log(sum) + mx, y = tgt.i()[n];
      const double es = 2 * kU + kU * spread + gamma32(V);
      const double dl = es + 2 * kU * std::fabs(std::log(sum)) + kU * std::fabs(logsum);
      rl[n] = logsum - row[tgt.i()[n]];
      tl[n] = dl + kU * std::fabs(rl[n]);
      for (int64_t i = 0; i < V; ++i) {
        const double p = std::exp(row[i] - logsum), onehot = i == y ? 1.0 : 0.0;
        const double g = dloss * (p - onehot);
        rg[n * Vp + i] = g;
        tg[n * Vp + i] = dloss * (p * (dl + kU * std::fabs(row[i] - logsum) + 2 * kU) +
                                  kU * std::fabs(p - onehot)) +
                         kU * std::fabs(g);
      }
    }
    check_output("losses", losses, losses32, rl, tl);
    check_output("dlogits", logits, logits32, rg, tg);  // the padding: exactly 0
  }
}

// ---- fp8 GEMMs

namespace {

// What an fp8 GEMM multiplies for x: q = saturate(RNE(x * scale)) in fmt (the product in fp32),
// and the value it stands for, q / scale.
double dequantised(DType fmt, float x, float scale) {
  const float q = fmt == DType::e4m3 ? round_to_e4m3(x * scale) : round_to_e5m2(x * scale);
  return static_cast<double>(q) / scale;
}

std::vector<double> dequantised(DType fmt, const std::vector<float>& x, float scale) {
  std::vector<double> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = dequantised(fmt, x[i], scale);
  return r;
}

float amax_of(const std::vector<float>& x) {
  float m = 0;
  for (float v : x) m = std::max(m, std::fabs(v));
  return m;
}

int64_t saturated(DType fmt, const std::vector<float>& x, float scale) {
  return narrowing_counts(x, fmt, scale).overflow;
}

}  // namespace

// out = (q_x . q_w^T) / (s_x s_w) + bias: the fp64 GEMM of the dequantised operands, the bias
// unscaled; fp32 error gamma_{C+4} (the sum, the product with 1/s_x * 1/s_w in fp32 (three
// roundings), the bias add). amax of each operand reported exactly; the dout's left alone.
TEST_F(PrecisionOps, Fp8MatmulForward) {
  const int64_t N = 14, C = 37, OC = 45;
  for (DType storage : {DType::f32, DType::bf16, DType::f16})
    for (bool with_bias : {true, false}) {
      SCOPED_TRACE(std::string(dtype_name(storage)) + (with_bias ? ", with bias" : ", no bias"));
      Owned x = randn_as(be, {N, C}, storage, rng), w = randn_as(be, {OC, C}, storage, rng, 0.3);
      Owned bias = with_bias ? randn_as(be, {OC}, storage, rng, 3.0) : Owned{};
      Owned out = make(be, {N, OC}, storage), out32 = make(be, {N, OC});
      Owned x32 = f32_copy(be, x.t), w32 = f32_copy(be, w.t);
      Owned bias32 = with_bias ? f32_copy(be, bias.t) : Owned{};
      const auto xv = copy_of(x32), wv = copy_of(w32);
      // Scales as delayed scaling picks them, not powers of two: x's saturates its largest
      // values (amax_x * s_x = 1.3 * 448), w's leaves headroom.
      const float sx = 1.3f * 448.0f / amax_of(xv), sw = 0.7f * 448.0f / amax_of(wv);
      float amax_x = -1, amax_w = -1, amax_d = -1;
      MatmulSpec spec(MatmulPrecision::fp8);
      spec.inp = {DType::e4m3, sx, &amax_x};
      spec.weight = {DType::e4m3, sw, &amax_w};
      spec.dout = {DType::e5m2, 1.0f, &amax_d};
      MatmulSpec twin_spec = spec;
      twin_spec.inp.amax = twin_spec.weight.amax = twin_spec.dout.amax = nullptr;
      be.reset_cast_counts();
      be.matmul_forward(out.t, x.t, w.t, bias.t, spec);
      twin.matmul_forward(out32.t, x32.t, w32.t, bias32.t, twin_spec);
      EXPECT_EQ(amax_x, amax_of(xv));
      EXPECT_EQ(amax_w, amax_of(wv));
      EXPECT_EQ(amax_d, -1.0f) << "the forward has no dout";
      ASSERT_GT(saturated(DType::e4m3, xv, sx), 0);
      ClassCounts want;
      want[TensorClass::activation] = narrowing_counts(xv, DType::e4m3, sx);
      want.add(TensorClass::activation, out, out32);
      want[TensorClass::weight] = narrowing_counts(wv, DType::e4m3, sw);
      expect_counts(be, want);
      const auto bd = with_bias ? to_double(copy_of(bias32)) : std::vector<double>{};
      const MatmulRef r = matmul_ref(dequantised(DType::e4m3, xv, sx),
                                     dequantised(DType::e4m3, wv, sw), bias_rows(bd, N), N, C, OC, 4);
      check_output("fp8 out", out, out32, r.out, r.tol);
      // ...and that is not the unquantised product: e4m3 moves it by far more than the bound
      const MatmulRef exact = matmul_ref(to_double(xv), to_double(wv), bias_rows(bd, N), N, C, OC, 4);
      double moved = 0;
      for (int64_t i = 0; i < N * OC; ++i)
        moved = std::max(moved, std::fabs(exact.out[i] - r.out[i]) / r.tol[i]);
      EXPECT_GT(moved, 100.0);
    }
}

// Backward: dout quantised with its own format and scale (e5m2 in the hybrid recipe, e4m3 in the
// e4m3-only one), inp and weight again with the forward's scales; dinp = q_dout . q_w,
// dweight += q_dout^T . q_x; dbias sums dout as stored, unquantised. Only dout's amax is
// reported and only its quantisation is counted (as a gradient; so are the narrowed outputs).
TEST_F(PrecisionOps, Fp8MatmulBackward) {
  const int64_t N = 14, C = 37, OC = 45;
  for (DType storage : {DType::f32, DType::bf16})
    for (DType grad : {DType::f32, DType::bf16})
      for (DType dfmt : {DType::e5m2, DType::e4m3}) {
        SCOPED_TRACE(std::string("storage ") + dtype_name(storage) + ", weight gradients " +
                     dtype_name(grad) + ", dout " + dtype_name(dfmt));
        Owned x = randn_as(be, {N, C}, storage, rng), w = randn_as(be, {OC, C}, storage, rng, 0.3);
        Owned dout = randn_as(be, {N, OC}, storage, rng, 1e-3);
        Owned dx = randn_as(be, {N, C}, storage, rng);  // written: stale contents must go
        Owned dw = randn_as(be, {OC, C}, grad, rng, 1e-2), db = randn_as(be, {OC}, grad, rng, 1e-2);
        Owned x32 = f32_copy(be, x.t), w32 = f32_copy(be, w.t), dout32 = f32_copy(be, dout.t);
        Owned dx32 = make(be, {N, C}), dw32 = f32_copy(be, dw.t), db32 = f32_copy(be, db.t);
        const auto xv = copy_of(x32), wv = copy_of(w32), dv = copy_of(dout32);
        const float sx = 0.9f * 448.0f / amax_of(xv), sw = 0.7f * 448.0f / amax_of(wv);
        const float sd = 1.2f * static_cast<float>(dtype_traits(dfmt).max_finite) / amax_of(dv);
        float amax_x = -1, amax_w = -1, amax_d = -1;
        MatmulSpec spec(MatmulPrecision::fp8);
        spec.inp = {DType::e4m3, sx, &amax_x};
        spec.weight = {DType::e4m3, sw, &amax_w};
        spec.dout = {dfmt, sd, &amax_d};
        MatmulSpec twin_spec = spec;
        twin_spec.inp.amax = twin_spec.weight.amax = twin_spec.dout.amax = nullptr;
        const auto qd = dequantised(dfmt, dv, sd);
        const MatmulRef gx =
            matmul_ref(qd, transposed(dequantised(DType::e4m3, wv, sw), OC, C), {}, N, OC, C, 3);
        const MatmulRef gw = matmul_ref(transposed(qd, N, OC),
                                        transposed(dequantised(DType::e4m3, xv, sx), N, C),
                                        to_double(copy_of(dw32)), OC, N, C, 4);
        const MatmulRef gb = column_sums_ref(to_double(dv), to_double(copy_of(db32)), N, OC);
        be.reset_cast_counts();
        be.matmul_backward(dx.t, dw.t, db.t, dout.t, x.t, w.t, spec);
        twin.matmul_backward(dx32.t, dw32.t, db32.t, dout32.t, x32.t, w32.t, twin_spec);
        EXPECT_EQ(amax_d, amax_of(dv));
        EXPECT_EQ(amax_x, -1.0f) << "inp's amax is the forward's to report";
        EXPECT_EQ(amax_w, -1.0f) << "weight's amax is the forward's to report";
        ASSERT_GT(saturated(dfmt, dv, sd), 0);
        ClassCounts want;
        want[TensorClass::gradient] = narrowing_counts(dv, dfmt, sd);
        want.add(TensorClass::gradient, dx, dx32);
        want.add(TensorClass::gradient, dw, dw32);
        want.add(TensorClass::gradient, db, db32);
        expect_counts(be, want);
        check_output("fp8 dinp", dx, dx32, gx.out, gx.tol);
        check_output("fp8 dweight", dw, dw32, gw.out, gw.tol);
        check_output("fp8 dbias", db, db32, gb.out, gb.tol);
      }
}

// amax is max |x| before quantisation: NaN when x holds a NaN (whatever else it holds),
// infinity when it holds an infinity and no NaN.
TEST_F(PrecisionOps, Fp8AmaxSeesNaNAndInfinity) {
  const int64_t N = 9, C = 33, OC = 5;
  for (DType storage : {DType::f32, DType::bf16, DType::f16}) {
    SCOPED_TRACE(dtype_name(storage));
    Owned w = randn_as(be, {OC, C}, storage, rng), out = make(be, {N, OC});
    for (int kind = 0; kind < 3; ++kind) {  // NaN; -inf; NaN and +inf
      Owned x = randn_as(be, {N, C}, storage, rng);
      const int64_t i = static_cast<int64_t>(rng.below(x.n())), j = (i + 1 + rng.below(x.n() - 1)) % x.n();
      store_rounded(x.t, i, kind == 1 ? -INFINITY : NAN);
      if (kind == 2) store_rounded(x.t, j, INFINITY);
      float amax_x = -1, amax_w = -1;
      MatmulSpec spec(MatmulPrecision::fp8);
      spec.inp = {DType::e4m3, 1.0f, &amax_x};
      spec.weight = {DType::e4m3, 1.0f, &amax_w};
      be.matmul_forward(out.t, x.t, w.t, Tensor(), spec);
      if (kind == 1) {
        EXPECT_EQ(amax_x, INFINITY);
      } else {
        EXPECT_TRUE(std::isnan(amax_x)) << amax_x;
      }
      EXPECT_EQ(amax_w, amax_of(widened(w.t)));

      Owned dout = randn_as(be, {N, OC}, storage, rng), dx = make(be, {N, C}), dw = make(be, {OC, C});
      store_rounded(dout.t, static_cast<int64_t>(rng.below(dout.n())), kind == 1 ? -INFINITY : NAN);
      float amax_d = -1;
      spec.dout = {DType::e5m2, 1.0f, &amax_d};
      be.matmul_backward(dx.t, dw.t, Tensor(), dout.t, x.t, w.t, spec);
      if (kind == 1) {
        EXPECT_EQ(amax_d, INFINITY);
      } else {
        EXPECT_TRUE(std::isnan(amax_d)) << amax_d;
      }
    }
  }
}

// ---- saturation and underflow statistics on data of known distribution

// N(0, 1) operands quantised with scales that put the thresholds at known quantiles: overflow
// where |x| s > max_finite, i.e. |x| > max_finite / s, with probability P(|Z| > max_finite / s);
// underflow where |x| s <= min_subnormal / 2, with probability P(|Z| <= min_subnormal / (2 s)).
// The counts must be exactly those of the data, and those within binomial sampling error of the
// distribution's.
TEST_F(PrecisionOps, Fp8SaturationAndUnderflowFractionsOnNormalData) {
  const int64_t N = 4096, C = 64, n = N * C;  // 2^18 values
  Owned x = randn(be, {N, C}, rng);
  const auto xv = copy_of(x);
  const double z_over[] = {2.0, 2.5}, z_under = 0.5;  // e4m3, e5m2
  for (DType fmt : {DType::e4m3, DType::e5m2})
    for (bool over : {true, false}) {
      SCOPED_TRACE(std::string(dtype_name(fmt)) + (over ? " overflow" : " underflow"));
      const DTypeTraits tr = dtype_traits(fmt);
      const double z = fmt == DType::e4m3 ? z_over[0] : z_over[1];
      const float s = static_cast<float>(over ? tr.max_finite / z : tr.min_subnormal / 2 / z_under);
      MatmulSpec spec(MatmulPrecision::fp8);
      ClassCounts want;
      be.reset_cast_counts();
      if (fmt == DType::e4m3) {  // x as the forward's inp: an activation
        Owned w = randn(be, {1, C}, rng, 0.1), out = make(be, {N, 1});
        spec.inp = {fmt, s, nullptr};
        be.matmul_forward(out.t, x.t, w.t, Tensor(), spec);
        want[TensorClass::activation] = narrowing_counts(xv, fmt, s);
        want[TensorClass::weight] = narrowing_counts(copy_of(w), spec.weight.format);
      } else {  // x as the backward's dout: a gradient (the fp32 outputs are not narrowed)
        Owned x1 = randn(be, {N, 1}, rng), w1 = randn(be, {C, 1}, rng);
        Owned dx = make(be, {N, 1}), dw = make(be, {C, 1});
        spec.dout = {fmt, s, nullptr};
        be.matmul_backward(dx.t, dw.t, Tensor(), x.t, x1.t, w1.t, spec);
        want[TensorClass::gradient] = narrowing_counts(xv, fmt, s);
      }
      expect_counts(be, want);
      const CastCounts& data = want[fmt == DType::e4m3 ? TensorClass::activation : TensorClass::gradient];
      ASSERT_EQ(data.values, n);
      if (over)
        expect_binomial("saturated", data.overflow, n, normal_two_tail(z));
      else
        expect_binomial("flushed", data.underflow, n, 1 - normal_two_tail(z_under));
    }
}

// The thresholds exactly, on hand-picked values, for every narrowing (cast() and the fp8 GEMM
// operands): the largest finite value is no overflow, the next float up is (fp16's 65504 +
// 8 still rounds to 65504, e4m3's 464 to 448: both exceed the largest value); half the smallest
// subnormal is a tie that rounds to the even zero, the next float up rounds to the subnormal.
// Infinities and NaNs are not overflows of the cast (count_nonfinite reports them).
TEST_F(PrecisionOps, CastCountThresholdsAreExact) {
  for (DType d : {DType::f16, DType::bf16, DType::e4m3, DType::e5m2}) {
    SCOPED_TRACE(dtype_name(d));
    const DTypeTraits tr = dtype_traits(d);
    const float mx = static_cast<float>(tr.max_finite), half = static_cast<float>(tr.min_subnormal / 2);
    const float above = std::nextafter(mx, INFINITY), past_half = std::nextafter(half, INFINITY);
    // value, overflow?, underflow?
    struct Case { float v; int over, under; };
    std::vector<Case> cases = {
        {mx, 0, 0},         {-mx, 0, 0},       {above, 1, 0},         {-above, 1, 0},
        {FLT_MAX, 1, 0},    {half, 0, 1},      {-half, 0, 1},         {half / 3, 0, 1},
        {0x1p-149f, 0, 1},  {past_half, 0, 0}, {-past_half, 0, 0},    {2 * half, 0, 0},
        {0.0f, 0, 0},       {-0.0f, 0, 0},     {INFINITY, 0, 0},      {-INFINITY, 0, 0},
        {NAN, 0, 0},        {1.0f, 0, 0}};
    if (d == DType::f16) cases.push_back({65504.0f + 8.0f, 1, 0});
    if (d == DType::e4m3) cases.push_back({464.0f, 1, 0});
    CastCounts want;
    Owned src = make(be, {static_cast<int64_t>(cases.size())});
    for (size_t i = 0; i < cases.size(); ++i) {
      src.f()[i] = cases[i].v;
      want.values += 1, want.overflow += cases[i].over, want.underflow += cases[i].under;
    }
    Owned dst = make(be, src.t.shape, d);
    be.reset_cast_counts();
    be.cast(dst.t, src.t, TensorClass::weight);
    const CastCounts got = be.cast_counts(TensorClass::weight);
    EXPECT_EQ(got.values, want.values);
    EXPECT_EQ(got.overflow, want.overflow);
    EXPECT_EQ(got.underflow, want.underflow);
    for (size_t i = 0; i < cases.size(); ++i) {
      EXPECT_EQ(raw_bits(dst.t, i), narrow_bits(d, cases[i].v)) << cases[i].v;
      if (cases[i].under) {
        EXPECT_EQ(widened_at(dst.t, i), 0.0f) << cases[i].v;
      }
      if (cases[i].v == past_half) {
        EXPECT_EQ(widened_at(dst.t, i), 2 * half);
      }
      if (cases[i].over && d != DType::f16 && d != DType::bf16) {
        EXPECT_EQ(std::fabs(widened_at(dst.t, i)), mx) << "fp8 saturates";
      }
    }
    if (d != DType::e4m3 && d != DType::e5m2) continue;
    // the same values as an fp8 GEMM's input operand with scale 1 (NaN and inf left out: they
    // would make every output NaN, which is fine but not what this checks)
    std::vector<float> finite;
    for (const Case& c : cases)
      if (std::isfinite(c.v)) finite.push_back(c.v);
    Owned x = make(be, {1, static_cast<int64_t>(finite.size())}), w = make(be, {1, x.t.dim(1)});
    std::copy(finite.begin(), finite.end(), x.f());
    be.fill(w.t, 1.0f);
    Owned out = make(be, {1, 1});
    MatmulSpec spec(MatmulPrecision::fp8);
    spec.inp = {d, 1.0f, nullptr};
    spec.weight = {DType::e4m3, 1.0f, nullptr};
    be.reset_cast_counts();
    be.matmul_forward(out.t, x.t, w.t, Tensor(), spec);
    const CastCounts g8 = be.cast_counts(TensorClass::activation), w8 = narrowing_counts(finite, d);
    EXPECT_EQ(g8.values, static_cast<int64_t>(finite.size()));
    EXPECT_EQ(g8.overflow, w8.overflow);
    EXPECT_EQ(g8.underflow, w8.underflow);
    EXPECT_EQ(w8.overflow, want.overflow);  // the finite cases hold every overflow and underflow
    EXPECT_EQ(w8.underflow, want.underflow);
  }
}

// Plain fp16 narrowing of op outputs, by class: a forward output (residual_forward, an
// activation), a backward output (gelu_backward, a gradient), weights written by the optimizer.
// Overflow is |y| > 65504, underflow 0 < |y| <= 2^-25.
TEST_F(PrecisionOps, Fp16NarrowingStatisticsByTensorClass) {
  const int64_t n = 1 << 18;
  const double z_over = 2.0, z_under = 0.5;
  for (int which = 0; which < 4; ++which) {
    // N(0, sigma^2) values narrowed by: 0, 1 residual_forward (a + b from two N(0, sigma^2 / 2)
    // halves); 2 gelu_backward at x = 10 (gelu' is 1 in fp32: dinp = dout); 3 AdamW writing fp16
    // weights from an fp32 master (with updates far below the master's own spacing)
    const bool over = which != 1;
    const double sigma = over ? 65504.0 / z_over : 0x1p-25 / z_under;
    const TensorClass cls = which < 2 ? TensorClass::activation
                                      : which == 2 ? TensorClass::gradient : TensorClass::weight;
    SCOPED_TRACE(std::string(tensor_class_name(cls)) + (over ? " overflow" : " underflow"));
    Owned out = make(be, {n}, DType::f16), out32 = make(be, {n});
    be.reset_cast_counts();
    if (which < 2) {
      Owned a = randn(be, {n}, rng, sigma / std::sqrt(2.0)), b = randn(be, {n}, rng, sigma / std::sqrt(2.0));
      be.residual_forward(out.t, a.t, b.t);
      twin.residual_forward(out32.t, a.t, b.t);
    } else if (which == 2) {
      Owned x = make(be, {n}), dout = randn(be, {n}, rng, sigma);
      be.fill(x.t, 10.0f);
      be.gelu_backward(out.t, x.t, dout.t);
      twin.gelu_backward(out32.t, x.t, dout.t);
      ASSERT_EQ(copy_of(out32), copy_of(dout));
    } else {
      out32 = randn(be, {n}, rng, sigma);  // the master
      Owned g = randn(be, {n}, rng), m = make(be, {n}), v = make(be, {n});
      AdamWParams hp{1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f, 1, 1.0f};
      be.adamw_update(out.t, out32.t, g.t, m.t, v.t, hp, nullptr);
    }
    ClassCounts want;
    want[cls] = narrowing_counts(copy_of(out32), DType::f16);
    expect_counts(be, want);
    if (over)
      expect_binomial("overflowed", want[cls].overflow, n, normal_two_tail(z_over));
    else
      expect_binomial("flushed", want[cls].underflow, n, 1 - normal_two_tail(z_under));
  }
  be.reset_cast_counts();
  expect_counts(be, ClassCounts{});
}

// ---- dtype support: cast, amax, count_nonfinite, fill

TEST_F(PrecisionOps, CastBetweenEveryPairOfFloatDtypes) {
  const DType all[] = {DType::f32, DType::f16, DType::bf16, DType::e4m3, DType::e5m2};
  const int64_t n = 777;
  for (DType from : all)
    for (DType to : all) {
      SCOPED_TRACE(std::string(dtype_name(from)) + " -> " + dtype_name(to));
      // magnitudes from 2^-30 to 2^20: subnormals, flushes and overflows of the narrow formats
      Owned src = make(be, {n}, from);
      for (int64_t i = 0; i < n; ++i) {
        float v;
        do v = round_to(from, std::ldexp(static_cast<float>(rng.normal()), static_cast<int>(rng.below(51)) - 30));
        while (v == 0.0f);
        store_rounded(src.t, i, v);
      }
      const auto sv = widened(src.t);
      Owned dst = make(be, {n}, to);
      const TensorClass cls = static_cast<TensorClass>(rng.below(kTensorClasses));
      be.reset_cast_counts();
      be.cast(dst.t, src.t, cls);
      int64_t wrong = 0;
      for (int64_t i = 0; i < n; ++i) wrong += raw_bits(dst.t, i) != narrow_bits(to, sv[i]);
      EXPECT_EQ(wrong, 0) << "elements not RNE(widened source)";
      ClassCounts want;
      want[cls] = narrowing_counts(sv, to);
      expect_counts(be, want);
    }
}

TEST_F(PrecisionOps, AmaxAndCountNonfiniteOnEveryDtype) {
  const int64_t n = 1001;
  for (DType d : {DType::f32, DType::f16, DType::bf16, DType::e4m3, DType::e5m2}) {
    SCOPED_TRACE(dtype_name(d));
    Owned x = randn_as(be, {n}, d, rng, 3.0);
    EXPECT_EQ(be.amax(x.t), amax_of(widened(x.t)));
    EXPECT_EQ(be.count_nonfinite(x.t), 0);
    // a few non-finite values at distinct random places: infinities where the format has them
    // (stored without saturation: a saturating narrowing makes fp8 infinities finite)
    const bool has_inf = dtype_traits(d).has_inf;
    auto put = [&](int64_t i, float v) {
      if (d == DType::e5m2)
        static_cast<e5m2*>(x.t.data)[i] = e5m2_from_float(v, Saturation::none);
      else
        store_rounded(x.t, i, v);
    };
    std::vector<int64_t> at;
    while (at.size() < 5) {
      const int64_t i = static_cast<int64_t>(rng.below(n));
      if (std::find(at.begin(), at.end(), i) == at.end()) at.push_back(i);
    }
    if (has_inf) {
      put(at[0], INFINITY);
      put(at[1], -INFINITY);
      EXPECT_EQ(be.count_nonfinite(x.t), 2);
      EXPECT_EQ(be.amax(x.t), INFINITY);
    }
    for (size_t k = 2; k < at.size(); ++k) put(at[k], NAN);
    EXPECT_EQ(be.count_nonfinite(x.t), has_inf ? 5 : 3);
    EXPECT_TRUE(std::isnan(be.amax(x.t)));
  }
}

TEST_F(PrecisionOps, FillRoundsOnceToNearestEven) {
  const int64_t n = 300;
  struct Case { DType d; float v; float expect; };
  const Case cases[] = {
      {DType::bf16, 1.0f + 0x1p-8f + 0x1p-10f, 1.0f + 0x1p-7f},  // above the midpoint: up
      {DType::bf16, 1.0f + 0x1p-8f, 1.0f},                       // the midpoint: to even
      {DType::bf16, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-6f},         // the midpoint: to even (up)
      {DType::f16, 0.1f, 0.0999755859375f},
      {DType::f16, 70000.0f, INFINITY},
      {DType::e4m3, 500.0f, 448.0f},  // saturates
      {DType::e5m2, -3.3f, -3.5f},
      {DType::f32, 0.1f, 0.1f},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(dtype_name(c.d)) + " " + std::to_string(c.v));
    Owned t = randn_as(be, {n}, c.d, rng);
    be.fill(t.t, c.v);
    EXPECT_EQ(round_to(c.d, c.v), c.expect);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(widened_at(t.t, i), c.expect) << i;
  }
}

// ---- AdamW

namespace {

// fp64 AdamW on one element from the fp32 hyperparameters, with bounds on the fp32 arithmetic:
// m = b1 m0 + (1 - b1) g s (1 - b1 is exact in fp32 for b1 in [0.5, 1]) by gamma_3 of its
// magnitudes M, v by gamma_5 (all terms >= 0), mhat by gamma_5 c1 M, the denominator
// sqrt(vhat) + eps by gamma_9 relative, so the update lr (mhat / den + wd w) by
// gamma_12 lr (c1 M / den + |mhat / den| + wd |w|), and the new weight by that + u |w_new|.
struct AdamWRef {
  double m, v, upd, w;
  double tol_m, tol_v, tol_upd, tol_w;
};

AdamWRef adamw_ref(double w0, double g, double m0, double v0, const AdamWParams& p) {
  const double b1 = p.beta1, b2 = p.beta2, gi = g * p.grad_scale;
  AdamWRef r;
  r.m = b1 * m0 + (1 - b1) * gi;
  r.v = b2 * v0 + (1 - b2) * gi * gi;
  const double c1 = 1 / (1 - std::pow(b1, double(p.step))), c2 = 1 / (1 - std::pow(b2, double(p.step)));
  const double mag = b1 * std::fabs(m0) + (1 - b1) * std::fabs(gi);
  const double den = std::sqrt(r.v * c2) + p.eps, ratio = r.m * c1 / den;
  r.upd = p.lr * (ratio + p.weight_decay * w0);
  r.w = w0 - r.upd;
  r.tol_m = gamma32(3) * mag;
  r.tol_v = gamma32(5) * r.v;
  r.tol_upd = gamma32(12) * p.lr * (c1 * mag / den + std::fabs(ratio) + p.weight_decay * std::fabs(w0));
  r.tol_w = r.tol_upd + gamma32(1) * std::fabs(r.w);
  return r;
}

// Half a bf16 ulp of w as bf16 stores it: 2^(e - 8) for |w| in [2^e, 2^(e+1)), and half the
// smallest subnormal's spacing below the normal range.
double bf16_half_ulp(float w) {
  const float b = std::fabs(round_to_bf16(w));
  if (b < 0x1p-126f) return 0x1p-134;
  return std::ldexp(1.0, std::ilogb(b) - 8);
}

struct AdamWState {
  Owned param, master, grad, m, v;
};

// Optimizer state of n elements: weights ~ N(0, 1), gradients ~ N(0, 1), moments as after a
// few steps. `master`: an fp32 master copy, with the param its rounding.
AdamWState adamw_state(Backend& be, Rng& rng, int64_t n, DType param, bool master, DType grad) {
  AdamWState s;
  s.master = master ? randn(be, {n}, rng) : Owned{};
  s.param = master ? make(be, {n}, param) : randn_as(be, {n}, param, rng);
  if (master)
    for (int64_t i = 0; i < n; ++i) store_rounded(s.param.t, i, s.master.f()[i]);
  s.grad = randn_as(be, {n}, grad, rng);
  s.m = randn(be, {n}, rng, 0.1), s.v = randn(be, {n}, rng, 0.1);
  for (int64_t i = 0; i < n; ++i) s.v.f()[i] = std::fabs(s.v.f()[i]);
  return s;
}

// A copy in fresh tensors of the same dtypes.
AdamWState clone(Backend& be, const AdamWState& s) {
  auto dup = [&](const Owned& o) {
    if (!o.t.defined()) return Owned{};
    Owned c = make(be, o.t.shape, o.t.dtype);
    std::memcpy(c.t.data, o.t.data, o.t.bytes());
    return c;
  };
  return {dup(s.param), dup(s.master), dup(s.grad), dup(s.m), dup(s.v)};
}

void update(Backend& be, AdamWState& s, const AdamWParams& p, AdamWStats* stats = nullptr) {
  be.adamw_update(s.param.t, s.master.t, s.grad.t, s.m.t, s.v.t, p, stats);
}

const AdamWParams kHp{3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 7, 0.5f};

}  // namespace

// With an fp32 master: the master, m and v against fp64 AdamW; the parameter is the master
// rounded to nearest even, bit for bit, counted as weights. Gradients in fp32, bf16 or fp16 read
// widened: bit-identical to the same update from an fp32 copy of the gradient.
TEST_F(PrecisionOps, AdamWWithMasterWeights) {
  const int64_t n = 1001;
  for (DType param : {DType::bf16, DType::f16})
    for (DType grad : {DType::f32, DType::bf16, DType::f16}) {
      SCOPED_TRACE(std::string("param ") + dtype_name(param) + ", grad " + dtype_name(grad));
      AdamWState s = adamw_state(be, rng, n, param, true, grad);
      AdamWState s32 = clone(be, s);
      s32.grad = f32_copy(be, s.grad.t);
      const auto w0 = copy_of(s.master), g = widened(s.grad.t), m0 = copy_of(s.m), v0 = copy_of(s.v);
      AdamWStats stats;
      be.reset_cast_counts();
      update(be, s, kHp, &stats);
      update(twin, s32, kHp);
      expect_op_counts(be, TensorClass::weight, {{s.param, s.master}});
      EXPECT_EQ(stats.values, n);
      for (int64_t i = 0; i < n; ++i) {
        const AdamWRef r = adamw_ref(w0[i], g[i], m0[i], v0[i], kHp);
        ASSERT_LE(std::fabs(s.m.f()[i] - r.m), r.tol_m) << i;
        ASSERT_LE(std::fabs(s.v.f()[i] - r.v), r.tol_v) << i;
        ASSERT_LE(std::fabs(s.master.f()[i] - r.w), r.tol_w) << i;
        ASSERT_EQ(raw_bits(s.param.t, i), narrow_bits(param, s.master.f()[i])) << i;
      }
      EXPECT_EQ(copy_of(s.master), copy_of(s32.master)) << "a widened gradient is the fp32 one";
      EXPECT_EQ(copy_of(s.m), copy_of(s32.m));
      EXPECT_EQ(copy_of(s.v), copy_of(s32.v));
    }
}

// Without a master, bf16 weights with stochastic rounding: each result is one of the two bf16
// neighbours of the fp32 update (the same update on an fp32 copy of the weights), a function of
// (sr_seed, step, element) only - the same for another run or thread count, different for
// another seed or step - and counted as a weight cast.
TEST_F(PrecisionOps, AdamWStochasticRoundingPicksANeighbour) {
  const int64_t n = 4099;
  for (DType grad : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(std::string("grad ") + dtype_name(grad));
    AdamWParams hp = kHp;
    hp.stochastic_rounding = true;
    hp.sr_seed = rng.next_u64();
    const AdamWState s0 = adamw_state(be, rng, n, DType::bf16, false, grad);
    AdamWState s = clone(be, s0), exact = clone(be, s0);
    exact.param = f32_copy(be, s0.param.t);
    AdamWStats stats;
    be.reset_cast_counts();
    update(be, s, hp, &stats);
    update(twin, exact, hp);  // fp32 weights: the update itself, unrounded
    EXPECT_EQ(copy_of(s.m), copy_of(exact.m));
    EXPECT_EQ(copy_of(s.v), copy_of(exact.v));
    int64_t up = 0, inexact = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float y = exact.param.f()[i];
      const uint32_t toward_zero = narrow_bits(DType::f32, y) >> 16, got = raw_bits(s.param.t, i);
      const bool representable = (narrow_bits(DType::f32, y) & 0xFFFFu) == 0;
      inexact += !representable;
      if (representable) {
        ASSERT_EQ(got, toward_zero) << i << ": " << y << " is a bf16 value";
      } else {
        ASSERT_TRUE(got == toward_zero || got == toward_zero + 1)
            << i << ": " << y << " gave " << widened_at(s.param.t, i);
        up += got == toward_zero + 1;
      }
    }
    EXPECT_GT(up, 0);
    EXPECT_LT(up, inexact);
    expect_op_counts(be, TensorClass::weight, {{s.param, exact.param}});

    auto result = [&](Backend& b, const AdamWParams& p) {
      AdamWState c = clone(be, s0);
      update(b, c, p);
      std::vector<uint32_t> bits(n);
      for (int64_t i = 0; i < n; ++i) bits[i] = raw_bits(c.param.t, i);
      return bits;
    };
    const auto first = result(be, hp);
    CpuBackend one(1);
    EXPECT_EQ(first, result(be, hp)) << "another run";
    EXPECT_EQ(first, result(one, hp)) << "one thread";
    AdamWParams other_seed = hp, other_step = hp;
    other_seed.sr_seed ^= 1;
    other_step.step += 1;
    auto differing = [&](const std::vector<uint32_t>& b) {
      int64_t k = 0;
      for (int64_t i = 0; i < n; ++i) k += b[i] != first[i];
      return k;
    };
    // each inexact element picks its neighbour afresh: about a third of them differ
    EXPECT_GT(differing(result(be, other_seed)), inexact / 10) << "another seed";
    EXPECT_GT(differing(result(be, other_step)), inexact / 10) << "another step";
  }
}

// The weights stochastic rounding writes are narrowing casts like any other (counted as
// weights): an update past bf16's largest finite value is an overflow whichever neighbour (the
// largest value or infinity) it picks; a non-zero update that picks zero is a flush.
TEST_F(PrecisionOps, AdamWStochasticRoundingCountsOverflowsAndFlushes) {
  const int64_t n = 4096;
  const float bf16_max = static_cast<float>(dtype_traits(DType::bf16).max_finite);
  // first step from zero moments: mhat / (sqrt(vhat) + eps) = sign(g) exactly, so w - lr sign(g)
  for (int which = 0; which < 2; ++which) {
    SCOPED_TRACE(which == 0 ? "overflow" : "flush");
    const float w0 = which == 0 ? bf16_max : 0x1p-133f;    // bf16's largest; smallest subnormal
    const float lr = which == 0 ? 1e36f : 1.5f * 0x1p-134f;  // to max + 0.75 ulp; to 2^-135
    Owned param = make(be, {n}, DType::bf16), exact = make(be, {n}), g = make(be, {n});
    Owned m = make(be, {n}), v = make(be, {n}), m32 = make(be, {n}), v32 = make(be, {n});
    be.fill(param.t, w0);
    twin.fill(exact.t, w0);
    be.fill(g.t, which == 0 ? -1.0f : 1.0f);
    AdamWParams hp{lr, 0.9f, 0.95f, 1e-8f, 0.0f, 1, 1.0f, true, rng.next_u64()};
    be.reset_cast_counts();
    be.adamw_update(param.t, Tensor(), g.t, m.t, v.t, hp, nullptr);
    twin.adamw_update(exact.t, Tensor(), g.t, m32.t, v32.t, hp, nullptr);
    const float y = exact.f()[0];
    ASSERT_EQ(y, which == 0 ? bf16_max + 1e36f : 0x1p-135f);
    int64_t up = 0, zeros = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float got = widened_at(param.t, i);
      if (which == 0) {
        ASSERT_TRUE(got == bf16_max || got == INFINITY) << got;
        up += got == INFINITY;
      } else {
        ASSERT_TRUE(got == 0.0f || got == 0x1p-133f) << got;
        zeros += got == 0.0f;
      }
    }
    const CastCounts c = be.cast_counts(TensorClass::weight);
    EXPECT_EQ(c.values, n);
    EXPECT_EQ(c.overflow, which == 0 ? n : 0);
    EXPECT_EQ(c.underflow, zeros);
    // up with probability (y - lo) / ulp: ~0.75 past the maximum (the ulp is 2^120 there);
    // 2^-135 is a quarter of the way from 0 to 2^-133
    if (which == 0) expect_binomial("rounded to infinity", up, n, (double(y) - bf16_max) / 0x1p120);
    if (which == 1) expect_binomial("flushed to zero", zeros, n, 0.75);
  }
}

// Stochastic rounding is unbiased: many elements with the same fp32 update y between bf16
// neighbours lo < y < hi round up with probability (y - lo) / (hi - lo), so their mean is y
// within sampling error (hi - lo) sqrt(f (1 - f) / n). Three groups at different fractional
// positions f: weights 1.5, 3 and 0.75 (bf16 spacings 2^-7, 2^-6, 2^-8) moved by the same
// update lr ~ 0.3 * 2^-7 (first step, zero moments: mhat / sqrt(vhat) = 1).
TEST_F(PrecisionOps, AdamWStochasticRoundingIsUnbiased) {
  const int64_t per = 1 << 15;
  const float w0[] = {1.5f, 3.0f, 0.75f};
  const int64_t n = 3 * per;
  Owned param = make(be, {n}, DType::bf16), grad = make(be, {n}), m = make(be, {n}), v = make(be, {n});
  Owned exact = make(be, {n}), m32 = make(be, {n}), v32 = make(be, {n});
  for (int64_t i = 0; i < n; ++i) {
    store_rounded(param.t, i, w0[i / per]);
    exact.f()[i] = w0[i / per];
    grad.f()[i] = 0.25f;
  }
  AdamWParams hp{static_cast<float>(0.3 * 0x1p-7), 0.9f, 0.95f, 1e-8f, 0.0f, 1, 1.0f, true,
                 rng.next_u64()};
  be.adamw_update(param.t, Tensor(), grad.t, m.t, v.t, hp, nullptr);
  twin.adamw_update(exact.t, Tensor(), grad.t, m32.t, v32.t, hp, nullptr);
  for (int k = 0; k < 3; ++k) {
    const float y = exact.f()[k * per];
    // the neighbours: y truncated to bf16 (all positive here) and one bf16 ulp above
    const float lo = to_float(bf16::from_bits(static_cast<uint16_t>(narrow_bits(DType::f32, y) >> 16)));
    const double spacing = std::ldexp(1.0, std::ilogb(lo) - 7);
    const double f = (y - lo) / spacing;
    ASSERT_GT(f, 0.05);
    ASSERT_LT(f, 0.95);
    double mean = 0;
    for (int64_t i = k * per; i < (k + 1) * per; ++i) {
      ASSERT_EQ(exact.f()[i], y);
      mean += widened_at(param.t, i);
    }
    mean /= per;
    const double sd = spacing * std::sqrt(f * (1 - f) / per);
    EXPECT_LE(std::fabs(mean - y), 6 * sd)
        << "weight " << w0[k] << ": fp32 update " << y << " (fraction " << f << "), mean " << mean;
  }
}

// lost_updates counts exactly the elements whose update is smaller in magnitude than half a bf16
// ulp of the weight (as bf16 stores it), with or without a master, with or without stochastic
// rounding; never for fp16 weights. The expectation from the fp64 update; an element whose
// update is within its fp32 error bound of the threshold may go either way.
TEST_F(PrecisionOps, AdamWLostUpdates) {
  const int64_t n = 4096;
  AdamWParams hp = kHp;
  hp.lr = 4e-3f;  // updates around half an ulp of weights near 1: about half are lost
  for (bool master : {true, false})
    for (bool sr : {false, true}) {
      if (master && sr) continue;  // stochastic rounding is for weights without a master
      SCOPED_TRACE(std::string(master ? "master" : "no master") + (sr ? ", stochastic" : ""));
      hp.stochastic_rounding = sr;
      AdamWState s = adamw_state(be, rng, n, DType::bf16, master, DType::f32);
      const auto w0 = master ? copy_of(s.master) : widened(s.param.t);
      int64_t sure = 0, either = 0;
      for (int64_t i = 0; i < n; ++i) {
        const AdamWRef r = adamw_ref(w0[i], s.grad.f()[i], s.m.f()[i], s.v.f()[i], hp);
        const double h = bf16_half_ulp(w0[i]);
        if (std::fabs(std::fabs(r.upd) - h) <= r.tol_upd)
          ++either;
        else
          sure += std::fabs(r.upd) < h;
      }
      ASSERT_GT(sure, n / 10);
      ASSERT_LT(sure, n - n / 10);
      ASSERT_LT(either, n / 100);
      AdamWStats stats;
      stats.values = 5, stats.lost_updates = 3;  // accumulates
      update(be, s, hp, &stats);
      EXPECT_EQ(stats.values, 5 + n);
      EXPECT_GE(stats.lost_updates, 3 + sure);
      EXPECT_LE(stats.lost_updates, 3 + sure + either);
    }
  AdamWState s = adamw_state(be, rng, n, DType::f16, false, DType::f32);
  AdamWStats stats;
  update(be, s, hp, &stats);
  EXPECT_EQ(stats.values, n);
  EXPECT_EQ(stats.lost_updates, 0) << "counted for bf16 weights only";
}

// ---- sum_squares

// The squares of fp16/bf16/fp8 values are exact in fp64 and their sum is off by at most
// gamma_{n-1} (fp64) of itself.
TEST_F(PrecisionOps, SumSquaresOfWidenedValues) {
  const int64_t n = 40009;  // three chunks
  for (DType d : {DType::f16, DType::bf16, DType::e4m3, DType::e5m2}) {
    SCOPED_TRACE(dtype_name(d));
    Owned x = randn_as(be, {n}, d, rng, 3.0);
    double ref = 0;
    for (float v : widened(x.t)) ref += double(v) * v;
    const double got = be.sum_squares(x.t);
    EXPECT_NEAR(got, ref, n * 0x1p-53 * ref);
    CpuBackend one(1);
    EXPECT_EQ(one.sum_squares(x.t), got);
  }
}
