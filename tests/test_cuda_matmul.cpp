// The CUDA matmuls and attention.
//
// (a) Host-side: the pure planning functions of backend/cuda/matmul_plan.h (how each product
//     maps to a cuBLASLt GEMM, fp8's TN rule and its transposed copies, e5m2 in the B slot, the
//     rejection of e5m2 x e5m2, tf32 only for fp32 operands, the bias path, the algorithm
//     cache's key) and attention_plan.h (its six batched GEMMs, run on the host in fp64 from
//     the layouts they describe; chunking; scratch). No GPU needed.
// (b) GPU parity against CpuBackend (each test skips without a GPU): fresh random inputs,
//     awkward shapes (N = 37 rows), every precision; outputs surrounded by guard bytes that must
//     stay unchanged; no NaN/Inf; amax values and cast counts equal to the CPU's.
//
// Tolerances. CPU and GPU sum the same products in different orders (cuBLASLt's blocking vs
// OpenBLAS's), so per output element with S = sum of |products| (computed in fp64 on the host):
//   |gpu - cpu| <= rel * S * (1 + eps_d) + eps_d |cpu| + min_subnormal_d
// where eps_d is the output format's epsilon (both sides round their own fp32 value: at most an
// ulp apart after rounding; 0 for fp32) and rel is
//   fp32, fp16, bf16 native: 2 gamma_{K+2} (two fp32 sums of K terms, each within gamma of the
//                            exact sum; fp16/bf16 products are exact in fp32)
//   tf32: 2^-8 + 2 gamma   (operands rounded to 10 mantissa bits; should the GPU truncate where
//                           the CPU rounds to nearest, each operand differs by up to 1.5 tf32
//                           ulps (2^-10), a product by 3 ulps < 2^-8)
//   fp8:  2^-7 + 2 gamma   (the quantised operands are identical, products exact; Hopper's fp8
//                           Tensor Cores keep ~14 accumulator bits between fp32 promotions
//                           (cuda-crib.md §3): up to ~32 additions of 2^-13 relative error, 2^-8,
//                           doubled. A wrong layout or scale errs by O(S), far above this.)
// fp8 shapes keep M, N, K multiples of 16 (cuBLASLt's fp8 TN kernels need 16-byte-aligned
// leading dimensions of 1-byte elements).
// Attention: its products are GEMMs on both sides too, with the probabilities (and score
// gradients) rounded to the operand format in between; see run_attention_case for its bounds.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "cuda_test_util.h"
#include "test_util.h"
#if MPT_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_context.h"
#include "backend/cuda/attention_plan.h"
#include "backend/cuda/matmul_plan.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/workspace_plan.h"
#endif

namespace mpt {
namespace {

using test::Owned;

#if MPT_HAVE_CUDA
using namespace mpt::cuda;

// ---- (a) host-side planning

MatmulSpec fp8_spec(DType inp, DType weight, DType dout) {
  MatmulSpec s(MatmulPrecision::fp8);
  s.inp.format = inp;
  s.weight.format = weight;
  s.dout.format = dout;
  return s;
}

TEST(MatmulPlan, ForwardIsTNWithOutputChannelsAsRows) {
  const GemmPlan p = plan_matmul(MatmulOp::forward, 37, 48, 80, DType::bf16, DType::bf16,
                                 DType::bf16, MatmulPrecision::native);
  EXPECT_EQ(p.m, 80);
  EXPECT_EQ(p.n, 37);
  EXPECT_EQ(p.k, 48);
  EXPECT_TRUE(p.a.trans);
  EXPECT_FALSE(p.b.trans);
  EXPECT_EQ(p.a.source, MatmulOperand::weight);
  EXPECT_EQ(p.b.source, MatmulOperand::inp);
  EXPECT_EQ(p.a.rows, 48);
  EXPECT_EQ(p.a.cols, 80);
  EXPECT_EQ(p.a.ld, 48);
  EXPECT_EQ(p.b.rows, 48);
  EXPECT_EQ(p.b.cols, 37);
  EXPECT_EQ(p.b.ld, 48);
  EXPECT_EQ(p.ldd, 80);
  EXPECT_EQ(p.a.type, GemmType::bf16);
  EXPECT_EQ(p.b.type, GemmType::bf16);
  EXPECT_EQ(p.d_type, GemmType::f32);
  EXPECT_EQ(p.compute, GemmCompute::f32);
  EXPECT_FALSE(p.a.copy || p.b.copy || p.fp8);
  EXPECT_EQ(p.beta, 0.0f);
}

TEST(MatmulPlan, DgradIsNNAndWgradIsNTAccumulating) {
  const GemmPlan d = plan_matmul(MatmulOp::dgrad, 37, 48, 80, DType::f16, DType::f16, DType::f16,
                                 MatmulPrecision::native);
  EXPECT_EQ(d.m, 48);
  EXPECT_EQ(d.n, 37);
  EXPECT_EQ(d.k, 80);
  EXPECT_FALSE(d.a.trans);
  EXPECT_FALSE(d.b.trans);
  EXPECT_EQ(d.a.source, MatmulOperand::weight);
  EXPECT_EQ(d.b.source, MatmulOperand::dout);
  EXPECT_EQ(d.a.ld, 48);
  EXPECT_EQ(d.b.rows, 80);
  EXPECT_EQ(d.b.ld, 80);
  EXPECT_EQ(d.ldd, 48);
  EXPECT_EQ(d.beta, 0.0f);
  const GemmPlan w = plan_matmul(MatmulOp::wgrad, 37, 48, 80, DType::f16, DType::f16, DType::f16,
                                 MatmulPrecision::native);
  EXPECT_EQ(w.m, 48);
  EXPECT_EQ(w.n, 80);
  EXPECT_EQ(w.k, 37);
  EXPECT_FALSE(w.a.trans);
  EXPECT_TRUE(w.b.trans);
  EXPECT_EQ(w.a.source, MatmulOperand::inp);
  EXPECT_EQ(w.b.source, MatmulOperand::dout);
  EXPECT_EQ(w.a.rows, 48);
  EXPECT_EQ(w.a.cols, 37);
  EXPECT_EQ(w.b.rows, 80);
  EXPECT_EQ(w.b.cols, 37);
  EXPECT_EQ(w.ldd, 48);
  EXPECT_EQ(w.beta, 1.0f);
}

// Every layout's stored shape must hold op(X): rows = (trans ? k : m or n).
void expect_consistent(const GemmPlan& p) {
  EXPECT_EQ(p.a.rows, p.a.trans ? p.k : p.m);
  EXPECT_EQ(p.a.cols, p.a.trans ? p.m : p.k);
  EXPECT_EQ(p.b.rows, p.b.trans ? p.n : p.k);
  EXPECT_EQ(p.b.cols, p.b.trans ? p.k : p.n);
  EXPECT_GE(p.a.ld, p.a.rows);
  EXPECT_GE(p.b.ld, p.b.rows);
  EXPECT_GE(p.ldd, p.m);
}

TEST(MatmulPlan, LayoutsAreConsistentForEveryOpAndPrecision) {
  for (MatmulOp op : {MatmulOp::forward, MatmulOp::dgrad, MatmulOp::wgrad}) {
    for (MatmulPrecision prec : {MatmulPrecision::native, MatmulPrecision::tf32}) {
      expect_consistent(plan_matmul(op, 37, 48, 80, DType::f32, DType::f32, DType::f32, prec));
    }
    expect_consistent(plan_matmul(op, 48, 64, 96, DType::bf16, DType::f32, DType::bf16,
                                  fp8_spec(DType::e4m3, DType::e4m3, DType::e5m2)));
  }
}

TEST(MatmulPlan, Fp8IsAlwaysTNWithTransposedCopiesAndTheGradientInB) {
  const MatmulSpec s = fp8_spec(DType::e4m3, DType::e4m3, DType::e5m2);
  const GemmPlan f = plan_matmul(MatmulOp::forward, 48, 64, 96, DType::bf16, DType::bf16,
                                 DType::bf16, s);
  const GemmPlan d = plan_matmul(MatmulOp::dgrad, 48, 64, 96, DType::bf16, DType::bf16,
                                 DType::bf16, s);
  const GemmPlan w = plan_matmul(MatmulOp::wgrad, 48, 64, 96, DType::bf16, DType::bf16,
                                 DType::bf16, s);
  for (const GemmPlan* p : {&f, &d, &w}) {
    EXPECT_TRUE(p->fp8);
    EXPECT_TRUE(p->a.trans) << "fp8 needs TN";
    EXPECT_FALSE(p->b.trans) << "fp8 needs TN";
    EXPECT_TRUE(p->a.copy && p->b.copy);
    EXPECT_EQ(p->compute, GemmCompute::f32);
    EXPECT_EQ(p->d_type, GemmType::f32);
  }
  EXPECT_EQ(f.a.type, GemmType::e4m3);
  EXPECT_EQ(f.b.type, GemmType::e4m3);
  EXPECT_FALSE(f.a.transposed_copy || f.b.transposed_copy);
  // dgrad: A = W^T (C, OC) row-major = column-major OC x C; B = dout as stored.
  EXPECT_TRUE(d.a.transposed_copy);
  EXPECT_EQ(d.a.source, MatmulOperand::weight);
  EXPECT_EQ(d.a.rows, 96);
  EXPECT_EQ(d.a.cols, 64);
  EXPECT_EQ(d.a.ld, 96);
  EXPECT_FALSE(d.b.transposed_copy);
  EXPECT_EQ(d.b.source, MatmulOperand::dout);
  EXPECT_EQ(d.b.type, GemmType::e5m2);
  EXPECT_EQ(d.a.type, GemmType::e4m3);
  // wgrad: A = x^T (C, N), B = dout^T (OC, N), both K (= N) major.
  EXPECT_TRUE(w.a.transposed_copy && w.b.transposed_copy);
  EXPECT_EQ(w.a.source, MatmulOperand::inp);
  EXPECT_EQ(w.b.source, MatmulOperand::dout);
  EXPECT_EQ(w.a.ld, 48);
  EXPECT_EQ(w.b.ld, 48);
  EXPECT_EQ(w.b.type, GemmType::e5m2);
  EXPECT_EQ(w.beta, 1.0f);
}

TEST(MatmulPlan, E5m2TimesE5m2IsRejected) {
  const MatmulSpec both = fp8_spec(DType::e5m2, DType::e5m2, DType::e5m2);
  for (MatmulOp op : {MatmulOp::forward, MatmulOp::dgrad, MatmulOp::wgrad})
    EXPECT_THROW(plan_matmul(op, 48, 64, 96, DType::bf16, DType::bf16, DType::bf16, both),
                 RuntimeError);
  // e5m2 inp and weight is rejected even with an e4m3 dout (the forward could not run).
  EXPECT_THROW(plan_matmul(MatmulOp::wgrad, 48, 64, 96, DType::bf16, DType::bf16, DType::bf16,
                           fp8_spec(DType::e5m2, DType::e5m2, DType::e4m3)),
               RuntimeError);
  // An e5m2 weight with an e5m2 gradient: dgrad is e5m2 x e5m2.
  EXPECT_THROW(plan_matmul(MatmulOp::dgrad, 48, 64, 96, DType::bf16, DType::bf16, DType::bf16,
                           fp8_spec(DType::e4m3, DType::e5m2, DType::e5m2)),
               RuntimeError);
  // e4m3-only and the hybrid recipe are accepted.
  EXPECT_NO_THROW(plan_matmul(MatmulOp::dgrad, 48, 64, 96, DType::bf16, DType::bf16, DType::bf16,
                              fp8_spec(DType::e4m3, DType::e4m3, DType::e4m3)));
  // The forward ignores dout's format (it does not read dout).
  EXPECT_NO_THROW(plan_matmul(MatmulOp::forward, 48, 64, 96, DType::bf16, DType::bf16,
                              DType::bf16, fp8_spec(DType::e4m3, DType::e4m3, DType::bf16)));
  EXPECT_THROW(plan_matmul(MatmulOp::dgrad, 48, 64, 96, DType::bf16, DType::bf16, DType::bf16,
                           fp8_spec(DType::e4m3, DType::e4m3, DType::bf16)),
               RuntimeError);
  // fp8 operands are quantised from fp32/fp16/bf16 tensors, but for an inp stored quantised in
  // the spec's inp format, which the forward reads in place.
  EXPECT_THROW(plan_matmul(MatmulOp::forward, 48, 64, 96, DType::e5m2, DType::bf16, DType::bf16,
                           fp8_spec(DType::e4m3, DType::e4m3, DType::e5m2)),
               RuntimeError);
  EXPECT_THROW(plan_matmul(MatmulOp::forward, 48, 64, 96, DType::bf16, DType::e4m3, DType::bf16,
                           fp8_spec(DType::e4m3, DType::e4m3, DType::e5m2)),
               RuntimeError);
  EXPECT_THROW(plan_matmul(MatmulOp::wgrad, 48, 64, 96, DType::e4m3, DType::bf16, DType::e5m2,
                           fp8_spec(DType::e4m3, DType::e4m3, DType::e5m2)),
               RuntimeError);
  const MatmulSpec e4 = fp8_spec(DType::e4m3, DType::e4m3, DType::e5m2);
  const GemmPlan f = plan_matmul(MatmulOp::forward, 48, 64, 96, DType::e4m3, DType::bf16,
                                 DType::e4m3, e4);
  EXPECT_FALSE(f.b.copy);  // inp read in place
  EXPECT_TRUE(f.a.copy);   // the weight quantised
  EXPECT_EQ(f.b.type, GemmType::e4m3);
  const GemmPlan w = plan_matmul(MatmulOp::wgrad, 48, 64, 96, DType::e4m3, DType::bf16,
                                 DType::bf16, e4);
  EXPECT_TRUE(w.a.transposed_copy);  // inp^T: the cache, or a transposed copy
  EXPECT_EQ(w.a.type, GemmType::e4m3);
}

TEST(MatmulPlan, Tf32OnlyForFp32OperandsAndMixedDtypesAreWidened) {
  const GemmPlan f32 = plan_matmul(MatmulOp::forward, 37, 48, 80, DType::f32, DType::f32,
                                   DType::f32, MatmulPrecision::tf32);
  EXPECT_EQ(f32.compute, GemmCompute::f32_fast_tf32);
  const GemmPlan n32 = plan_matmul(MatmulOp::forward, 37, 48, 80, DType::f32, DType::f32,
                                   DType::f32, MatmulPrecision::native);
  EXPECT_EQ(n32.compute, GemmCompute::f32);
  const GemmPlan b16 = plan_matmul(MatmulOp::forward, 37, 48, 80, DType::bf16, DType::bf16,
                                   DType::bf16, MatmulPrecision::tf32);
  EXPECT_EQ(b16.compute, GemmCompute::f32) << "FAST_TF32 is valid only with fp32 A, B, C";
  EXPECT_EQ(b16.a.type, GemmType::bf16);
  // bf16 activations with fp32 weights: the bf16 operand is widened (exact) into an fp32 copy.
  const GemmPlan mix = plan_matmul(MatmulOp::forward, 37, 48, 80, DType::bf16, DType::f32,
                                   DType::bf16, MatmulPrecision::tf32);
  EXPECT_EQ(mix.a.type, GemmType::f32);
  EXPECT_EQ(mix.b.type, GemmType::f32);
  EXPECT_FALSE(mix.a.copy);
  EXPECT_TRUE(mix.b.copy);
  EXPECT_EQ(mix.compute, GemmCompute::f32_fast_tf32);
  EXPECT_EQ(native_pair_type(DType::f16, DType::bf16), GemmType::f32);
  EXPECT_EQ(native_pair_type(DType::f16, DType::f16), GemmType::f16);
  EXPECT_THROW(native_pair_type(DType::e4m3, DType::e4m3), RuntimeError);
}

TEST(MatmulPlan, BiasGoesToTheEpilogueOnlyWhereCublasLtTakesIt) {
  const uintptr_t aligned = 0x10000, odd = 0x10002;
  EXPECT_EQ(bias_path(false, true, false, DType::f32, aligned), BiasPath::none);
  EXPECT_EQ(bias_path(true, true, false, DType::f32, aligned), BiasPath::epilogue);
  EXPECT_EQ(bias_path(true, true, false, DType::bf16, aligned), BiasPath::store_kernel);
  EXPECT_EQ(bias_path(true, true, true, DType::bf16, aligned), BiasPath::epilogue);
  EXPECT_EQ(bias_path(true, true, true, DType::f32, aligned), BiasPath::store_kernel);
  EXPECT_EQ(bias_path(true, true, false, DType::f32, odd), BiasPath::store_kernel)
      << "a misaligned bias faults in the epilogue";
  EXPECT_EQ(bias_path(true, false, false, DType::f32, aligned), BiasPath::store_kernel)
      << "a staged (counted) output adds the bias in its store";
}

// MPT_GEMM_OUT: how a GEMM's bf16 output is made; a misspelt value is refused by name.
TEST(MatmulPlan, GemmOutputModeComesFromMptGemmOut) {
  EXPECT_EQ(gemm_out_for(nullptr), GemmOut::staged);
  EXPECT_EQ(gemm_out_for(""), GemmOut::staged);
  EXPECT_EQ(gemm_out_for("staged"), GemmOut::staged);
  EXPECT_EQ(gemm_out_for("direct"), GemmOut::direct);
  EXPECT_STREQ(gemm_out_name(GemmOut::direct), "direct");
  EXPECT_STREQ(gemm_out_name(GemmOut::staged), "staged");
  for (const char* bad : {"Direct", "1", "fp32"}) {
    try {
      gemm_out_for(bad);
      ADD_FAILURE() << "MPT_GEMM_OUT=" << bad << " accepted";
    } catch (const RuntimeError& e) {
      EXPECT_NE(std::string(e.what()).find("MPT_GEMM_OUT"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(std::string("'") + bad + "'"), std::string::npos)
          << e.what();
    }
  }
  {
    test::ScopedEnv direct("MPT_GEMM_OUT", "direct");
    EXPECT_EQ(gemm_out(), GemmOut::direct);
  }
  {
    test::ScopedEnv unset("MPT_GEMM_OUT", nullptr);
    EXPECT_EQ(gemm_out(), GemmOut::staged);
  }
}

// Only bf16 outputs are written by the GEMM, and only under GemmOut::direct, by GEMMs of bf16 or
// fp8 operands (cuBLASLt has no fp32-operand GEMM with a bf16 D), with no bias or a bias
// cuBLASLt's epilogue takes for bf16 D (bf16, 16-byte aligned).
TEST(MatmulPlan, OnlyBf16OutputsAreWrittenByTheGemmWhenAsked) {
  const uintptr_t al = 0x10000, odd = 0x10008;
  constexpr DType F = DType::f32, B = DType::bf16, H = DType::f16;
  const GemmPlan bb = plan_matmul(MatmulOp::forward, 64, 96, 160, B, B, B, MatmulPrecision::native);
  const GemmPlan q = plan_matmul(MatmulOp::dgrad, 64, 96, 160, B, B, B, MatmulPrecision::fp8);
  const GemmPlan mixed = plan_matmul(MatmulOp::forward, 64, 96, 160, B, F, B, MatmulPrecision::native);
  ASSERT_TRUE(q.fp8);
  ASSERT_EQ(mixed.a.type, GemmType::f32) << "bf16 activations, fp32 weights: widened";
  EXPECT_TRUE(gemm_writes_output(bb, B, GemmOut::direct, false, F, 0, true));
  EXPECT_TRUE(gemm_writes_output(bb, B, GemmOut::direct, true, B, al, true));
  EXPECT_TRUE(gemm_writes_output(q, B, GemmOut::direct, true, B, al, true));
  EXPECT_FALSE(gemm_writes_output(mixed, B, GemmOut::direct, false, F, 0, true)) << "fp32 operands";
  EXPECT_FALSE(gemm_writes_output(bb, B, GemmOut::direct, true, F, al, true)) << "an fp32 bias";
  EXPECT_FALSE(gemm_writes_output(bb, B, GemmOut::direct, true, B, odd, true)) << "a misaligned bias";
  EXPECT_FALSE(gemm_writes_output(bb, B, GemmOut::staged, false, F, 0, true));
  const GemmPlan hh = plan_matmul(MatmulOp::forward, 64, 96, 160, H, H, H, MatmulPrecision::native);
  EXPECT_FALSE(gemm_writes_output(hh, H, GemmOut::direct, false, F, 0, true)) << "fp16 underflows";
  EXPECT_FALSE(gemm_writes_output(bb, F, GemmOut::direct, false, F, 0, true)) << "fp32 is never staged";
  // What a run records (the start record's gemm_output).
  const auto NATIVE = MatmulPrecision::native, FP8 = MatmulPrecision::fp8;
  EXPECT_STREQ(gemm_output_kind(F, F, MatmulPrecision::tf32, GemmOut::direct, true), "fp32");
  EXPECT_STREQ(gemm_output_kind(B, B, NATIVE, GemmOut::direct, true), "direct");
  EXPECT_STREQ(gemm_output_kind(B, B, FP8, GemmOut::direct, true), "direct");
  EXPECT_STREQ(gemm_output_kind(B, B, NATIVE, GemmOut::staged, true), "staged");
  EXPECT_STREQ(gemm_output_kind(B, F, NATIVE, GemmOut::direct, true), "staged") << "fp32 operands";
  // fp32 biases (the weights' dtype) or no epilogues: the biased outputs stay staged.
  EXPECT_STREQ(gemm_output_kind(B, F, FP8, GemmOut::direct, true), "partly direct");
  EXPECT_STREQ(gemm_output_kind(B, B, NATIVE, GemmOut::direct, false), "partly direct");
  EXPECT_STREQ(gemm_output_kind(H, H, NATIVE, GemmOut::direct, true), "staged");
}

TEST(MatmulPlan, GeluGoesToTheEpilogueOnlyWhereCublasLtTakesIt) {
  constexpr DType F = DType::f32, B = DType::bf16, H = DType::f16;
  const uintptr_t al = 0x10000, al8 = 0x10008;  // 256- and 8-byte aligned
  using G = GeluPath;
  auto fwd = [](int64_t OC, MatmulPrecision prec, DType d = DType::f32) {
    return plan_matmul(MatmulOp::forward, 37, 48, OC, d, d, d, prec);
  };
  auto dgrad = [](int64_t C, MatmulPrecision prec, DType d = DType::f32) {
    return plan_matmul(MatmulOp::dgrad, 37, C, 80, d, d, d, prec);
  };
  const MatmulPrecision TF = MatmulPrecision::tf32, NAT = MatmulPrecision::native,
                        FP8 = MatmulPrecision::fp8;
  // Forward: fp32 pre and out written by a tf32 GEMM, the bias in the epilogue too.
  EXPECT_EQ(gelu_forward_path(fwd(3072, TF), F, F, al, true, F, al), G::epilogue);
  EXPECT_EQ(gelu_forward_path(fwd(3072, TF), F, F, al, false, F, 0), G::epilogue);
  EXPECT_EQ(gelu_forward_path(fwd(3072, NAT), F, F, al, true, F, al), G::separate)
      << "fp32 GEMMs keep the exact GELU kernel";
  EXPECT_EQ(gelu_forward_path(fwd(3076, TF), F, F, al, true, F, al), G::separate)
      << "the aux leading dimension (D's) must be divisible by 8";
  EXPECT_EQ(gelu_forward_path(fwd(3072, TF), F, F, al8, true, F, al), G::separate)
      << "an aux pointer below 16-byte alignment";
  EXPECT_EQ(gelu_forward_path(fwd(3072, TF), F, F, al, true, B, al), G::separate)
      << "a bias the epilogue does not take must still be added before the GELU";
  EXPECT_EQ(gelu_forward_path(fwd(3072, TF), F, F, al, true, F, al8), G::separate)
      << "a misaligned bias faults in the epilogue";
  EXPECT_EQ(gelu_forward_path(fwd(3072, FP8, B), F, F, al, true, B, al), G::separate)
      << "no fp32 GELU aux promised for fp8 GEMMs";
  // 16-bit outputs are staged in fp32 and rounded by the counting store kernel, which applies
  // the GELU too (any leading dimension, alignment or GEMM precision).
  EXPECT_EQ(gelu_forward_path(fwd(37, NAT, B), B, B, al8 + 2, true, B, al8 + 2), G::store_kernel);
  EXPECT_EQ(gelu_forward_path(fwd(3072, FP8, H), H, H, al, true, B, al), G::store_kernel);
  // Mixed pre/out dtypes: the separate kernel.
  EXPECT_EQ(gelu_forward_path(fwd(3072, TF), B, F, al, true, F, al), G::separate);
  EXPECT_EQ(gelu_forward_path(fwd(3072, TF), F, B, al, true, F, al), G::separate);
  EXPECT_EQ(gelu_forward_path(fwd(3072, NAT, B), B, H, al, true, B, al), G::separate);

  // Backward (the dgrad GEMM's D is dinp (C x N), the aux its GELU input).
  EXPECT_EQ(gelu_backward_path(dgrad(3072, TF), F, F, al), G::epilogue);
  EXPECT_EQ(gelu_backward_path(dgrad(3072, NAT), F, F, al), G::separate);
  EXPECT_EQ(gelu_backward_path(dgrad(3074, TF), F, F, al), G::separate);
  EXPECT_EQ(gelu_backward_path(dgrad(3072, TF), F, F, al8), G::separate);
  EXPECT_EQ(gelu_backward_path(dgrad(3072, FP8, B), F, F, al), G::separate) << "DGELU with fp8";
  EXPECT_EQ(gelu_backward_path(dgrad(3072, TF), F, B, al), G::separate) << "the aux type is D's";
  EXPECT_EQ(gelu_backward_path(dgrad(37, FP8, B), B, B, al8 + 2), G::store_kernel);
  EXPECT_EQ(gelu_backward_path(dgrad(3072, NAT, H), H, F, al), G::store_kernel)
      << "the store kernel reads a GELU input of any float dtype";

  EXPECT_STREQ(gemm_epilogue_name(GemmEpilogue::gelu_aux_bias), "GELU_AUX_BIAS");
  EXPECT_STREQ(gemm_epilogue_name(GemmEpilogue::dgelu), "DGELU");
  EXPECT_STREQ(gemm_epilogue_name(GemmEpilogue::none), "");
}

TEST(MatmulPlan, BiasGradientFromTheEpilogueOnlyWhereTheGemmReadsDoutAsStored) {
  auto wgrad = [](MatmulPrecision prec, DType d) {
    return plan_matmul(MatmulOp::wgrad, 37, 48, 80, d, d, d, prec);
  };
  EXPECT_TRUE(dbias_in_epilogue(wgrad(MatmulPrecision::native, DType::f32)));
  EXPECT_TRUE(dbias_in_epilogue(wgrad(MatmulPrecision::native, DType::bf16)));
  EXPECT_TRUE(dbias_in_epilogue(wgrad(MatmulPrecision::native, DType::f16)));
  // bf16 activations under tf32 read natively (tf32 applies to fp32 operands only)
  EXPECT_TRUE(dbias_in_epilogue(wgrad(MatmulPrecision::tf32, DType::bf16)));
  EXPECT_FALSE(dbias_in_epilogue(wgrad(MatmulPrecision::tf32, DType::f32)))
      << "the GEMM may reduce dout's tf32 roundings";
  EXPECT_FALSE(dbias_in_epilogue(wgrad(MatmulPrecision::fp8, DType::bf16)))
      << "the GEMM reads dout quantised";
  const GemmPlan dgrad = plan_matmul(MatmulOp::dgrad, 37, 48, 80, DType::f32, DType::f32,
                                     DType::f32, MatmulPrecision::native);
  EXPECT_FALSE(dbias_in_epilogue(dgrad)) << "only wgrad's B is dout";
  EXPECT_STREQ(gemm_epilogue_name(GemmEpilogue::bgradb), "BGRADB");
}

// Every element of every row is one thread's, once: the columns by blockIdx.x and threadIdx.x,
// the rows by blockIdx.y in steps of grid_y.
TEST(MatmulPlan, StoreLaunchCoversEachElementOnce) {
  for (int64_t rows : {1, 5, 37, 16384, 70000})
    for (int64_t cols : {1, 3, 12, 45, 768, 3072, 50304})
      for (bool aligned : {true, false}) {
        SCOPED_TRACE("rows " + std::to_string(rows) + " cols " + std::to_string(cols) +
                     (aligned ? " aligned" : ""));
        const StoreLaunch l = store_launch(rows, cols, aligned);
        EXPECT_EQ(l.vec, aligned && cols % 4 == 0 ? 4 : 1);
        EXPECT_EQ(l.threads % 32, 0u);
        EXPECT_LE(l.threads, 256u);
        EXPECT_GE(l.grid_y, 1u);
        EXPECT_LE(l.grid_y, 65535u);
        EXPECT_LE(int64_t(l.grid_y), rows);
        // columns: thread t of block bx starts at (bx threads + t) vec
        const int64_t covered = int64_t(l.grid_x) * l.threads * l.vec;
        EXPECT_GE(covered, cols);
        EXPECT_LT(covered - cols, int64_t(l.grid_x) * 32 * l.vec) << "a whole warp per block idle";
        // rows: blockIdx.y + j grid_y for j = 0, 1, ...: all of them, each once
        std::vector<int> seen(rows, 0);
        for (int64_t by = 0; by < l.grid_y; ++by)
          for (int64_t r = by; r < rows; r += l.grid_y) ++seen[r];
        EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), rows);
      }
}

TEST(MatmulPlan, StoreLaunchSpreadsColumnsEvenly) {
  const StoreLaunch a = store_launch(16384, 2304, true);  // 576 column threads
  EXPECT_EQ(a.grid_x, 3u);
  EXPECT_EQ(a.threads, 192u);
  const StoreLaunch b = store_launch(16384, 768, true);
  EXPECT_EQ(b.grid_x, 1u);
  EXPECT_EQ(b.threads, 192u);
  const StoreLaunch c = store_launch(16384, 50304, true);
  EXPECT_EQ(c.grid_x, 50u);
  EXPECT_EQ(c.threads, 256u);
  EXPECT_EQ(c.grid_y, 16384u);
  const StoreLaunch d = store_launch(7, 45, true);  // not a multiple of 4: one per thread
  EXPECT_EQ(d.vec, 1);
  EXPECT_EQ(d.threads, 64u);
}

TEST(MatmulPlan, QuantiseTakesTheStripKernelWhereItsLoadsAndStoresFit) {
  // bf16 (768 x 2304, 256-aligned): 16-byte loads of 8 elements, one block row per dbias chunk.
  QuantiseLaunch l = quantise_launch(16384, 2304, 2, 256, 256, true);
  EXPECT_TRUE(l.strip);
  EXPECT_EQ(l.vec, 8);
  EXPECT_EQ(l.grid_x, 36u);
  EXPECT_EQ(int64_t(l.grid_y), dbias_chunks(16384));
  l = quantise_launch(48, 96, 4, 16, 256, true);  // fp32: 4 per load; one chunk of 48 rows
  EXPECT_TRUE(l.strip);
  EXPECT_EQ(l.vec, 4);
  EXPECT_EQ(l.grid_x, 2u);
  EXPECT_EQ(l.grid_y, 1u);
  // The element kernel: a column count that splits a load, an operand 8 bytes off, a transposed
  // copy of rows that are not whole groups of 16 (a row-major copy alone does not mind).
  EXPECT_FALSE(quantise_launch(48, 100, 2, 256, 256, true).strip);
  EXPECT_TRUE(quantise_launch(48, 100, 4, 256, 256, true).strip);  // fp32: 100 = 25 loads of 4
  EXPECT_FALSE(quantise_launch(48, 96, 2, 8, 256, true).strip);
  EXPECT_FALSE(quantise_launch(48, 96, 2, 256, 8, true).strip) << "a copy 8 bytes off";
  EXPECT_FALSE(quantise_launch(40, 96, 2, 256, 256, true).strip);
  EXPECT_TRUE(quantise_launch(40, 96, 2, 256, 256, false).strip);
  EXPECT_FALSE(quantise_launch(0, 96, 2, 256, 256, false).strip) << "no rows: nothing to launch";
  const QuantiseLaunch e = quantise_launch(37, 45, 2, 256, 256, false);
  EXPECT_FALSE(e.strip);
  EXPECT_EQ(e.grid_x, 2u);
  EXPECT_EQ(e.grid_y, 2u);
  EXPECT_THROW(quantise_launch(int64_t{65536} * 32 + 1, 16, 2, 2, 256, false), RuntimeError)
      << "the element kernel's grid";
  EXPECT_TRUE(quantise_launch(int64_t{65536} * 32 + 1, 16, 2, 256, 256, false).strip);
  EXPECT_THROW(quantise_launch(16, 16, 1, 256, 256, false), RuntimeError) << "fp8 is not quantised again";
}

// Within a strip, every element is loaded by one thread once and, in a transposed copy, written
// by one thread once; over a grid, the strips and their sub-tiles cover every element once.
template <int V>
void check_quantise_strip_maps() {
  using Map = QuantiseStrip<V>;
  SCOPED_TRACE("V = " + std::to_string(V));
  std::vector<int> loads(kQuantiseSubRows * kQuantiseCols, 0), writes(loads.size(), 0);
  for (int t = 0; t < kQuantiseThreads; ++t) {
    ASSERT_LT(Map::load_row(t, 0), Map::kRowsPerPass) << "the column sums' row of thread " << t;
    ASSERT_EQ(Map::load_col(t) % V, 0);
    for (int p = 0; p < Map::kPasses; ++p)
      for (int k = 0; k < V; ++k) ++loads[Map::load_row(t, p) * kQuantiseCols + Map::load_col(t) + k];
    ASSERT_EQ(Map::tr_row(t) % 16, 0);
    for (int k = 0; k < 16; ++k) ++writes[(Map::tr_row(t) + k) * kQuantiseCols + Map::tr_col(t)];
  }
  EXPECT_EQ(std::count(loads.begin(), loads.end(), 1), int64_t(loads.size()));
  EXPECT_EQ(std::count(writes.begin(), writes.end(), 1), int64_t(writes.size()));
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{528, 96}, {48, 64}, {1000, 200}, {16, 8}}) {
    const QuantiseLaunch l = quantise_launch(rows, cols, 16 / V, 256, 256, false);
    ASSERT_TRUE(l.strip);
    std::vector<int> seen(rows * cols, 0);
    for (unsigned bx = 0; bx < l.grid_x; ++bx)
      for (unsigned by = 0; by < l.grid_y; ++by)
        for (int64_t sub = 0; sub < kDbiasRows / kQuantiseSubRows; ++sub) {
          const int64_t r0 = by * kDbiasRows + sub * kQuantiseSubRows;
          if (r0 >= rows) break;
          for (int t = 0; t < kQuantiseThreads; ++t)
            for (int p = 0; p < Map::kPasses; ++p) {
              const int64_t r = r0 + Map::load_row(t, p), c = bx * kQuantiseCols + Map::load_col(t);
              if (r < rows && c < cols)
                for (int k = 0; k < V; ++k) ++seen[r * cols + c + k];
            }
        }
    EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), rows * cols) << rows << " x " << cols;
  }
}

TEST(MatmulPlan, QuantiseStripMapsCoverEachElementOnce) {
  check_quantise_strip_maps<8>();
  check_quantise_strip_maps<4>();
}

TEST(MatmulPlan, ResidualJoinsTheStoreOfA16BitOutputOfItsDtype) {
  EXPECT_TRUE(residual_in_store(DType::bf16, DType::bf16));
  EXPECT_TRUE(residual_in_store(DType::f16, DType::f16));
  EXPECT_FALSE(residual_in_store(DType::f32, DType::f32)) << "fp32 outputs are not staged";
  EXPECT_FALSE(residual_in_store(DType::bf16, DType::f32));
  EXPECT_FALSE(residual_in_store(DType::bf16, DType::f16));
}

TEST(MatmulPlan, PointerAlignmentIsTheLargestPowerOfTwoUpTo256) {
  EXPECT_EQ(pointer_alignment(0x1000), 256u);
  EXPECT_EQ(pointer_alignment(0x1080), 128u);
  EXPECT_EQ(pointer_alignment(0x1010), 16u);
  EXPECT_EQ(pointer_alignment(0x1002), 2u);
  EXPECT_EQ(pointer_alignment(0x1001), 1u);
}

// A batched operand is only as aligned as its least aligned batch start: attention's GEMM path
// with an odd T * head size gives 16-bit batches 2-byte-aligned starts after an aligned base.
TEST(MatmulPlan, BatchedOperandsAreAsAlignedAsEveryBatchStart) {
  EXPECT_EQ(operand_alignment(0x1000, 1, 77, GemmType::bf16), 256u) << "one GEMM: its base";
  EXPECT_EQ(operand_alignment(0x1000, 4, 77, GemmType::bf16), 2u) << "77 bf16 = 154 bytes";
  EXPECT_EQ(operand_alignment(0x1000, 4, 77, GemmType::f32), 4u);
  EXPECT_EQ(operand_alignment(0x1000, 4, 64 * 1024, GemmType::bf16), 256u);
  EXPECT_EQ(operand_alignment(0x1000, 4, 24, GemmType::bf16), 16u) << "48-byte steps";
  EXPECT_EQ(operand_alignment(0x1010, 4, 64 * 1024, GemmType::f32), 16u) << "the base's";
  EXPECT_EQ(operand_alignment(0x1000, 4, 0, GemmType::f32), 256u) << "a broadcast operand";
}

TEST(MatmulPlan, CacheKeysAreEqualExactlyWhenTheGemmIsTheSame) {
  const GemmPlan p = plan_matmul(MatmulOp::forward, 37, 48, 80, DType::bf16, DType::bf16,
                                 DType::bf16, MatmulPrecision::native);
  const GemmKey k = gemm_key(p, GemmEpilogue::none, 256, 256, 256);
  EXPECT_EQ(k, gemm_key(p, GemmEpilogue::none, 256, 256, 256));
  EXPECT_EQ(GemmKeyHash{}(k), GemmKeyHash{}(gemm_key(p, GemmEpilogue::none, 256, 256, 256)));
  EXPECT_NE(k, gemm_key(p, GemmEpilogue::bias, 256, 256, 256));
  // The GELU epilogues: each its own key, and the aux pointer's alignment is part of it.
  // The epilogues: each its own key, and the bias and aux pointers' alignments are part of it.
  const GemmKey ga = gemm_key(p, GemmEpilogue::gelu_aux_bias, 256, 256, 256, 256, 256);
  EXPECT_NE(ga, gemm_key(p, GemmEpilogue::gelu_aux, 256, 256, 256, 0, 256));
  EXPECT_NE(ga, gemm_key(p, GemmEpilogue::dgelu, 256, 256, 256, 0, 256));
  EXPECT_NE(ga, gemm_key(p, GemmEpilogue::gelu_aux_bias, 256, 256, 256, 256, 16));
  EXPECT_NE(ga, gemm_key(p, GemmEpilogue::gelu_aux_bias, 256, 256, 256, 16, 256));
  EXPECT_NE(gemm_key(p, GemmEpilogue::bias, 256, 256, 256, 256),
            gemm_key(p, GemmEpilogue::bias, 256, 256, 256, 16))
      << "an algorithm chosen for an aligned bias may fault on a less aligned one";
  EXPECT_NE(gemm_key(p, GemmEpilogue::bgradb, 256, 256, 256, 256), k);
  // BIAS_DATA_TYPE narrows what the heuristic returns: part of the key with a bias, not without.
  EXPECT_NE(gemm_key(p, GemmEpilogue::bias, 256, 256, 256, 256, 0, GemmType::bf16),
            gemm_key(p, GemmEpilogue::bias, 256, 256, 256, 256, 0, GemmType::f32));
  EXPECT_NE(GemmKeyHash{}(gemm_key(p, GemmEpilogue::bias, 256, 256, 256, 256, 0, GemmType::bf16)),
            GemmKeyHash{}(gemm_key(p, GemmEpilogue::bias, 256, 256, 256, 256, 0, GemmType::f32)));
  EXPECT_EQ(gemm_key(p, GemmEpilogue::none, 256, 256, 256, 0, 0, GemmType::bf16), k)
      << "no bias pointer, no bias dtype";
  EXPECT_NE(gemm_key(p, GemmEpilogue::bias, 256, 256, 256, 256, 0, GemmType::bf16).str().find(
                " bias=bf16"),
            std::string::npos);
  EXPECT_NE(ga.str().find("epilogue=GELU_AUX_BIAS"), std::string::npos) << ga.str();
  EXPECT_NE(ga.str().find("align(bias)=256 align(aux)=256"), std::string::npos) << ga.str();
  EXPECT_NE(k, gemm_key(p, GemmEpilogue::none, 16, 256, 256));
  EXPECT_NE(k, gemm_key(p, GemmEpilogue::none, 256, 256, 2));
  const GemmPlan q = plan_matmul(MatmulOp::forward, 38, 48, 80, DType::bf16, DType::bf16,
                                 DType::bf16, MatmulPrecision::native);
  EXPECT_NE(k, gemm_key(q, GemmEpilogue::none, 256, 256, 256));
  const GemmPlan t = plan_matmul(MatmulOp::forward, 37, 48, 80, DType::f32, DType::f32,
                                 DType::f32, MatmulPrecision::tf32);
  const GemmPlan n = plan_matmul(MatmulOp::forward, 37, 48, 80, DType::f32, DType::f32,
                                 DType::f32, MatmulPrecision::native);
  EXPECT_NE(gemm_key(t, GemmEpilogue::none, 256, 256, 256),
            gemm_key(n, GemmEpilogue::none, 256, 256, 256));
  GemmKey b = k;
  b.batch = 2;
  EXPECT_NE(k, b);
  GemmAlgoCache cache;
  cache[k].workspace = 7;
  cache[gemm_key(p, GemmEpilogue::bias, 256, 256, 256)].workspace = 9;
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(cache.at(gemm_key(p, GemmEpilogue::none, 256, 256, 256)).workspace, 7u);
  EXPECT_NE(k.str().find("m=80 n=37 k=48"), std::string::npos) << k.str();
}

TEST(MatmulPlan, WorkspaceAndCopySizes) {
  EXPECT_EQ(lt_workspace_size(9), size_t{32} << 20);
  EXPECT_EQ(operand_copy_bytes(1, GemmType::e4m3), 256u);
  EXPECT_EQ(operand_copy_bytes(256, GemmType::e4m3), 256u);
  EXPECT_EQ(operand_copy_bytes(65, GemmType::f32), 512u);
  EXPECT_EQ(operand_copy_bytes(0, GemmType::f32), 0u);
}

// ---- attention plans (attention_plan.h)

// A GemmPlan run on the host in fp64, as cuBLASLt reads it: column-major, op N/T, strided batches.
void host_gemm(const GemmPlan& p, const std::vector<double>& A, const std::vector<double>& Bm,
               std::vector<double>& D) {
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = 0; j < p.n; ++j) {
        double s = 0;
        for (int64_t kk = 0; kk < p.k; ++kk) {
          const double a = A.at(b * p.stride_a + (p.a.trans ? kk + i * p.a.ld : i + kk * p.a.ld));
          const double x = Bm.at(b * p.stride_b + (p.b.trans ? j + kk * p.b.ld : kk + j * p.b.ld));
          s += a * x;
        }
        double& d = D.at(b * p.stride_d + i + j * p.ldd);
        d = p.alpha * s + p.beta * d;
      }
}

TEST(AttentionPlan, EachGemmComputesItsProductFromTheHeadMajorAndSquareLayouts) {
  const int64_t H = 3, T = 11, HS = 5, Tp = attention_ld(T);
  ASSERT_EQ(Tp, 16);
  Rng rng(test::fresh_seed());
  auto heads = [&] {  // (H, T, HS) row-major
    std::vector<double> v(H * T * HS);
    for (double& x : v) x = rng.normal();
    return v;
  };
  auto square = [&] {  // (H, T, Tp) row-major; the padding columns hold NaN: never read
    std::vector<double> v(H * T * Tp, NAN);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t u = 0; u < T; ++u) v[(h * T + t) * Tp + u] = rng.normal();
    return v;
  };
  const std::vector<double> Q = heads(), K = heads(), V = heads(), G = heads(), P = square(),
                            dS = square();
  auto hm = [&](const std::vector<double>& x, int64_t h, int64_t t, int64_t i) {
    return x[(h * T + t) * HS + i];
  };
  auto sq = [&](const std::vector<double>& x, int64_t h, int64_t t, int64_t u) {
    return x[(h * T + t) * Tp + u];
  };
  const float scale = 0.375f;
  for (OperandFormat f : {OperandFormat::f32, OperandFormat::tf32, OperandFormat::f16,
                          OperandFormat::bf16}) {
    SCOPED_TRACE(operand_format_name(f));
    for (AttentionGemm g : {AttentionGemm::scores, AttentionGemm::out, AttentionGemm::dprobs,
                            AttentionGemm::dq, AttentionGemm::dk, AttentionGemm::dv}) {
      SCOPED_TRACE(attention_gemm_name(g));
      const GemmPlan p = plan_attention_gemm(g, H, T, HS, f, scale);
      expect_consistent(p);
      EXPECT_EQ(p.batch, H);
      EXPECT_EQ(p.a.type, attention_gemm_type(f));
      EXPECT_EQ(p.b.type, attention_gemm_type(f));
      EXPECT_EQ(p.d_type, GemmType::f32);
      EXPECT_EQ(p.compute, f == OperandFormat::tf32 ? GemmCompute::f32_fast_tf32 : GemmCompute::f32);
      EXPECT_EQ(p.beta, 0.0f);
      EXPECT_EQ(p.alpha, g == AttentionGemm::scores ? scale : 1.0f);
      const bool square_out = g == AttentionGemm::scores || g == AttentionGemm::dprobs;
      const std::vector<double>* a = nullptr;
      const std::vector<double>* b = nullptr;
      switch (g) {
        case AttentionGemm::scores: a = &K, b = &Q; break;
        case AttentionGemm::out: a = &V, b = &P; break;
        case AttentionGemm::dprobs: a = &V, b = &G; break;
        case AttentionGemm::dq: a = &K, b = &dS; break;
        case AttentionGemm::dk: a = &Q, b = &dS; break;
        case AttentionGemm::dv: a = &G, b = &P; break;
      }
      const double sentinel = 12345.0;  // in D's padding: must stay
      std::vector<double> D(square_out ? H * T * Tp : H * T * HS, sentinel);
      host_gemm(p, *a, *b, D);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < T; ++t) {
          if (square_out) {
            for (int64_t u = 0; u < Tp; ++u) {
              double want = sentinel;
              if (u < T) {
                want = 0;
                for (int64_t i = 0; i < HS; ++i)
                  want += g == AttentionGemm::scores ? hm(Q, h, t, i) * hm(K, h, u, i)
                                                     : hm(G, h, t, i) * hm(V, h, u, i);
                if (g == AttentionGemm::scores) want *= scale;
              }
              ASSERT_NEAR(D[(h * T + t) * Tp + u], want, 1e-9 * (1 + std::fabs(want)))
                  << "h " << h << " t " << t << " u " << u;
            }
          } else {
            for (int64_t i = 0; i < HS; ++i) {
              double want = 0;
              for (int64_t u = 0; u < T; ++u) {
                switch (g) {
                  case AttentionGemm::out: want += sq(P, h, t, u) * hm(V, h, u, i); break;
                  case AttentionGemm::dq: want += sq(dS, h, t, u) * hm(K, h, u, i); break;
                  case AttentionGemm::dk: want += sq(dS, h, u, t) * hm(Q, h, u, i); break;
                  case AttentionGemm::dv: want += sq(P, h, u, t) * hm(G, h, u, i); break;
                  default: break;
                }
              }
              ASSERT_NEAR(D[(h * T + t) * HS + i], want, 1e-9 * (1 + std::fabs(want)))
                  << "h " << h << " t " << t << " i " << i;
            }
          }
        }
    }
  }
  EXPECT_THROW(plan_attention_gemm(AttentionGemm::scores, 0, T, HS, OperandFormat::f32, 1),
               RuntimeError);
  EXPECT_THROW(plan_attention_gemm(AttentionGemm::scores, 65536, T, HS, OperandFormat::f32, 1),
               RuntimeError) << "many cuBLASLt kernels take at most 65535 batched GEMMs";
}

TEST(AttentionPlan, ChunksKeepOneScoreBufferWithinTheCapAndBatchesWithin65535) {
  EXPECT_EQ(attention_ld(1), 8);
  EXPECT_EQ(attention_ld(32), 32);
  EXPECT_EQ(attention_ld(37), 40);
  // GPT-2 124M at T = 1024: 12 x 1024 x 1024 x 4 bytes = 48 MiB per batch element; 512 MiB
  // takes 10 of them.
  EXPECT_EQ(attention_batch_chunk(16, 12, 1024), 10);
  EXPECT_EQ(attention_batch_chunk(8, 12, 1024), 8);
  EXPECT_EQ(attention_batch_chunk(4, 4, 32), 4);
  EXPECT_EQ(attention_batch_chunk(3, 12, 8192), 1) << "one element over the cap still runs";
  EXPECT_EQ(attention_batch_chunk(100000, 1, 8), 65535);
  EXPECT_EQ(attention_batch_chunk(100000, 4, 8), 16383);
  for (int64_t T : {7, 64, 1000, 2048})
    for (int64_t NH : {1, 3, 12, 25}) {
      const int64_t c = attention_batch_chunk(64, NH, T);
      EXPECT_GE(c, 1);
      if (c > 1) {
        EXPECT_LE(double(c * NH * T * attention_ld(T) * 4), double(kAttentionChunkBytes));
      }
      if (c < 64) {
        EXPECT_GT(double((c + 1) * NH * T * attention_ld(T) * 4), double(kAttentionChunkBytes));
      }
    }
}

TEST(AttentionPlan, ScratchByRole) {
  // 2 batch elements, 3 heads, T = 11 (Tp 16), HS = 5: squares of 2*3*11*16 = 1056 elements,
  // head-major tensors of 2*3*11*5 = 330; each buffer rounded up to 256 bytes.
  const AttentionScratch f = attention_scratch(false, 2, 3, 11, 5, OperandFormat::f32);
  EXPECT_EQ(f.scores, 4352u);  // 1056 x 4 = 4224 -> 4352
  EXPECT_EQ(f.grads, 0u);
  EXPECT_EQ(f.operands, 0u) << "fp32 probabilities overwrite the scores";
  EXPECT_EQ(f.heads, 3 * 1536u);  // q, k, v: 330 x 4 = 1320 -> 1536
  EXPECT_EQ(f.result, 1536u);
  const AttentionScratch b = attention_scratch(true, 2, 3, 11, 5, OperandFormat::bf16);
  EXPECT_EQ(b.scores, 4352u);
  EXPECT_EQ(b.grads, 4352u);
  EXPECT_EQ(b.operands, 2 * 2304u);  // P and dS in bf16: 2112 -> 2304
  EXPECT_EQ(b.heads, 4 * 768u);      // q, k, v, dout in bf16: 660 -> 768
  EXPECT_EQ(b.result, 3 * 1536u);    // dq, dk, dv in fp32
  EXPECT_EQ(attention_scratch(true, 2, 3, 11, 5, OperandFormat::tf32).operands, 0u);
}

// ---- (b) GPU parity against the CPU backend

constexpr uint8_t kSentinel = 0x7B;
constexpr int64_t kGuard = 128;  // elements before and after every GPU tensor
constexpr double kU = 0x1p-24;
double gamma32(double n) { return n * kU / (1.0 - n * kU); }

// A GPU tensor with guard bytes around it.
struct Dev {
  Buffer buf;
  Tensor t;
  size_t pre = 0, total = 0;
};

// The CUDA context of the backend under test; null in the CPU self-check (MPT_GPU_TESTS_ON_CPU),
// which has no op profile: the checks of which kernel ran are left out there.
Context* context_of(Backend& b) {
  auto* cuda = dynamic_cast<CudaBackend*>(&b);
  if (!cuda && !test::gpu_tests_on_cpu())
    ADD_FAILURE() << "the backend under test is not the CUDA backend: no kernel check may be skipped";
  return cuda ? &cuda->context() : nullptr;
}

// `skew`: elements added to the guard before the tensor (its address off 16-byte alignment).
Dev to_gpu(Backend& gpu, const Tensor& h, int64_t skew = 0) {
  Dev d;
  const size_t es = dtype_size(h.dtype);
  d.pre = (kGuard + skew) * es;
  d.total = (2 * d.pre + h.bytes() + 3) / 4 * 4;
  d.buf = gpu.allocate(d.total);
  std::vector<uint8_t> fill(d.total, kSentinel);
  gpu.copy_from_host(Tensor(d.buf.data(), DType::e4m3, {static_cast<int64_t>(d.total)}), fill.data());
  d.t = d.buf.view(d.pre, h.dtype, h.shape);
  gpu.copy_from_host(d.t, h.data);
  return d;
}

// The tensor's values widened; the guard bytes checked.
std::vector<float> from_gpu(Backend& gpu, const Dev& d, const std::string& what) {
  std::vector<uint8_t> all(d.total);
  gpu.copy_to_host(all.data(), Tensor(d.buf.data(), DType::e4m3, {static_cast<int64_t>(d.total)}));
  int64_t bad = 0;
  for (size_t i = 0; i < d.total; ++i)
    if ((i < d.pre || i >= d.pre + d.t.bytes()) && all[i] != kSentinel) ++bad;
  EXPECT_EQ(bad, 0) << what << ": bytes outside the tensor were written";
  return test::widened(Tensor(all.data() + d.pre, d.t.dtype, d.t.shape));
}

// |gpu - cpu| <= tol[i] + eps_d |cpu| + min_subnormal_d, no NaN/Inf.
void expect_close(const std::string& what, const std::vector<float>& gpu,
                  const std::vector<float>& cpu, const std::vector<double>& tol, DType d) {
  ASSERT_EQ(gpu.size(), cpu.size());
  const DTypeTraits tr = dtype_traits(d);
  const double eps = d == DType::f32 ? 0.0 : tr.epsilon, sub = d == DType::f32 ? 0.0 : tr.min_subnormal;
  int64_t bad = 0, nonfinite = 0;
  for (size_t i = 0; i < gpu.size(); ++i) {
    if (!std::isfinite(gpu[i])) {
      ++nonfinite;
      continue;
    }
    const double err = std::fabs(double(gpu[i]) - double(cpu[i]));
    const double bound = tol[i] * (1.0 + eps) + eps * std::fabs(double(cpu[i])) + sub;
    if (err > bound && bad++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: gpu " << gpu[i] << " cpu " << cpu[i] << " err "
                    << err << " > " << bound;
  }
  EXPECT_EQ(nonfinite, 0) << what << ": NaN or Inf in the GPU result";
  EXPECT_EQ(bad, 0) << what << ": elements outside tolerance";
}

void expect_same_counts(Backend& gpu, Backend& cpu, const std::string& what) {
  for (int k = 0; k < kTensorClasses; ++k) {
    const TensorClass c = static_cast<TensorClass>(k);
    const CastCounts g = gpu.cast_counts(c), h = cpu.cast_counts(c);
    EXPECT_EQ(g.values, h.values) << what << " " << tensor_class_name(c);
    EXPECT_EQ(g.overflow, h.overflow) << what << " " << tensor_class_name(c);
    EXPECT_EQ(g.underflow, h.underflow) << what << " " << tensor_class_name(c);
  }
}

// A backend's cast counts now, by tensor class; two such records compared.
std::vector<CastCounts> counts_now(const Backend& be) {
  std::vector<CastCounts> c;
  for (int k = 0; k < kTensorClasses; ++k) c.push_back(be.cast_counts(TensorClass(k)));
  return c;
}

void expect_same_counts(const std::vector<CastCounts>& a, const std::vector<CastCounts>& b,
                        const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t k = 0; k < a.size(); ++k) {
    const char* c = tensor_class_name(TensorClass(k));
    EXPECT_EQ(a[k].values, b[k].values) << what << " " << c;
    EXPECT_EQ(a[k].overflow, b[k].overflow) << what << " " << c;
    EXPECT_EQ(a[k].underflow, b[k].underflow) << what << " " << c;
  }
}

struct MatmulCase {
  const char* name;
  MatmulPrecision prec;
  DType inp, weight, bias, out, dout, dinp, dweight, dbias;
  int64_t N, C, OC;
  DType fi = DType::e4m3, fw = DType::e4m3, fd = DType::e5m2;  // fp8 formats
  int64_t skew = 0;  // every GPU tensor this many elements off its aligned place (to_gpu)
};

float amax_host(const Tensor& t) {
  float m = 0;
  for (float v : test::widened(t)) m = std::max(m, std::fabs(v));
  return m;
}

// The GEMMs' error bound relative to the sum of the products' magnitudes: fp32 sums in any
// order (Higham's gamma), tf32's operand rounding, fp8's (the same quantised values on both
// backends, but the scaled products summed in another order; `inflate` covers the scales).
struct ProductTol {
  double rel = 0, inflate = 1;
};
ProductTol product_tol(MatmulPrecision prec, int64_t N, int64_t C, int64_t OC) {
  ProductTol t;
  t.rel = 2.0 * gamma32(double(std::max({N, C, OC})) + 2.0);
  if (prec == MatmulPrecision::tf32) t.rel += 0x1p-8;
  if (prec == MatmulPrecision::fp8) t.rel += 0x1p-7, t.inflate = 1.25;
  return t;
}

// Per element of x (N, C) . w (OC, C)^T + b (b may be empty).
std::vector<double> forward_tol(const std::vector<float>& xv, const std::vector<float>& wv,
                                const std::vector<float>& bv, int64_t N, int64_t C, int64_t OC,
                                ProductTol pt) {
  std::vector<double> tol(N * OC);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < OC; ++o) {
      double s = 0;
      for (int64_t i = 0; i < C; ++i) s += std::fabs(double(xv[n * C + i]) * wv[o * C + i]);
      tol[n * OC + o] = pt.rel * (pt.inflate * s + (bv.empty() ? 0.0 : std::fabs(bv[o])));
    }
  return tol;
}

// Per element of dout (N, OC) . w (OC, C).
std::vector<double> dgrad_tol(const std::vector<float>& dv, const std::vector<float>& wv,
                              int64_t N, int64_t C, int64_t OC, ProductTol pt) {
  std::vector<double> tol(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < C; ++i) {
      double s = 0;
      for (int64_t o = 0; o < OC; ++o) s += std::fabs(double(dv[n * OC + o]) * wv[o * C + i]);
      tol[n * C + i] = pt.rel * pt.inflate * s;
    }
  return tol;
}

void run_matmul_case(const MatmulCase& c) {
  SCOPED_TRACE(c.name);
  const uint64_t seed = test::fresh_seed();
  Rng rng(seed);
  CpuBackend cpu(2);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  const int64_t N = c.N, C = c.C, OC = c.OC;
  Owned x = test::randn_as(cpu, {N, C}, c.inp, rng);
  Owned w = test::randn_as(cpu, {OC, C}, c.weight, rng, 0.5);
  Owned b = test::randn_as(cpu, {OC}, c.bias, rng);
  Owned out = test::make(cpu, {N, OC}, c.out);
  Owned dout = test::randn_as(cpu, {N, OC}, c.dout, rng);
  Owned dx = test::make(cpu, {N, C}, c.dinp);
  Owned dw = test::randn_as(cpu, {OC, C}, c.dweight, rng, 0.1);  // accumulated into
  Owned db = test::randn_as(cpu, {OC}, c.dbias, rng, 0.1);
  const int64_t sk = c.skew;
  Dev gx = to_gpu(*gpu, x.t, sk), gw = to_gpu(*gpu, w.t, sk), gb = to_gpu(*gpu, b.t, sk),
      gout = to_gpu(*gpu, out.t, sk), gdout = to_gpu(*gpu, dout.t, sk), gdx = to_gpu(*gpu, dx.t, sk),
      gdw = to_gpu(*gpu, dw.t, sk), gdb = to_gpu(*gpu, db.t, sk);
  const std::vector<float> xv = test::widened(x.t), wv = test::widened(w.t),
                           bv = test::widened(b.t), dv = test::widened(dout.t),
                           dw0 = test::widened(dw.t), db0 = test::widened(db.t);

  MatmulSpec spec(c.prec);
  float amax_cpu[3] = {-1, -1, -1}, amax_gpu[3] = {-1, -1, -1};
  if (c.prec == MatmulPrecision::fp8) {
    auto maxf = [](DType f) { return static_cast<float>(dtype_traits(f).max_finite); };
    spec.inp = {c.fi, 1.2f * maxf(c.fi) / amax_host(x.t), nullptr};
    spec.weight = {c.fw, 0.7f * maxf(c.fw) / amax_host(w.t), nullptr};
    spec.dout = {c.fd, 1.1f * maxf(c.fd) / amax_host(dout.t), nullptr};
  }
  const ProductTol pt = product_tol(c.prec, N, C, OC);
  const double rel = pt.rel, inflate = pt.inflate;

  // forward
  MatmulSpec sc = spec, sg = spec;
  sc.inp.amax = &amax_cpu[0], sc.weight.amax = &amax_cpu[1], sc.dout.amax = &amax_cpu[2];
  sg.inp.amax = &amax_gpu[0], sg.weight.amax = &amax_gpu[1], sg.dout.amax = &amax_gpu[2];
  cpu.reset_cast_counts();
  gpu->reset_cast_counts();
  cpu.matmul_forward(out.t, x.t, w.t, b.t, sc);
  gpu->matmul_forward(gout.t, gx.t, gw.t, gb.t, sg);
  if (!test::gpu_tests_on_cpu()) {
    EXPECT_EQ(amax_gpu[0], -1.0f) << "a GPU writes the amaxes at collect_stats(), not before";
  }
  gpu->collect_stats();
  {
    const std::vector<double> tol = forward_tol(xv, wv, bv, N, C, OC, pt);
    expect_close("out", from_gpu(*gpu, gout, "out"), test::widened(out.t), tol, c.out);
    expect_same_counts(*gpu, cpu, "forward");
    for (int i = 0; i < 3; ++i) EXPECT_EQ(amax_gpu[i], amax_cpu[i]) << "forward amax " << i;
  }

  // backward
  amax_cpu[0] = amax_cpu[1] = amax_cpu[2] = amax_gpu[0] = amax_gpu[1] = amax_gpu[2] = -1;
  cpu.reset_cast_counts();
  gpu->reset_cast_counts();
  cpu.matmul_backward(dx.t, dw.t, db.t, dout.t, x.t, w.t, sc);
  Context* ctx = context_of(*gpu);
  if (ctx) ctx->start_profile();
  gpu->matmul_backward(gdx.t, gdw.t, gdb.t, gdout.t, gx.t, gw.t, sg);
  if (ctx) {
    // Which path gave dbias (matmul_plan.h dbias_in_epilogue): the wgrad GEMM's BGRADB epilogue
    // unless the column-sum kernels ran (the fallback where cuBLASLt has no algorithm); under
    // fp8 the kernel that quantises dout, where its strip kernel runs.
    bool kernels = false, quantise = false;
    for (const OpTime& o : ctx->stop_profile().sorted()) {
      kernels |= o.op == "matmul_backward: dbias partial sums";
      quantise |= o.op == "matmul: fp8 quantise + dbias partial sums";
    }
    const bool planned = dbias_in_epilogue(
        plan_matmul(MatmulOp::wgrad, N, C, OC, c.inp, c.weight, c.dout, spec));
    if (c.prec == MatmulPrecision::fp8) {
      const bool strip = quantise_launch(N, OC, dtype_size(c.dout), pointer_alignment(
          reinterpret_cast<uintptr_t>(gdout.t.data)), 256, true).strip;
      EXPECT_EQ(quantise, strip) << "dbias summed by the quantise kernel";
      EXPECT_EQ(kernels, !strip) << "dbias by the column-sum kernels";
    } else if (!planned) {
      EXPECT_TRUE(kernels) << "dbias by the column-sum kernels";
    }
    std::printf("[ bgradb   ] %s: dbias by %s%s\n", c.name,
                quantise  ? "the fp8 quantise kernel"
                : kernels ? "the column-sum kernels"
                          : "BGRADB",
                planned && kernels ? " (BGRADB planned; cuBLASLt has no algorithm for it)" : "");
  }
  gpu->collect_stats();
  {
    const std::vector<double> tx = dgrad_tol(dv, wv, N, C, OC, pt);
    std::vector<double> tw(OC * C), tb(OC);
    for (int64_t o = 0; o < OC; ++o) {
      double sb = std::fabs(db0[o]);
      for (int64_t n = 0; n < N; ++n) sb += std::fabs(dv[n * OC + o]);
      tb[o] = 2 * gamma32(double(N) + 2) * sb;
      for (int64_t i = 0; i < C; ++i) {
        double s = 0;
        for (int64_t n = 0; n < N; ++n) s += std::fabs(double(dv[n * OC + o]) * xv[n * C + i]);
        tw[o * C + i] = rel * (inflate * s + std::fabs(dw0[o * C + i]));
      }
    }
    expect_close("dinp", from_gpu(*gpu, gdx, "dinp"), test::widened(dx.t), tx, c.dinp);
    expect_close("dweight", from_gpu(*gpu, gdw, "dweight"), test::widened(dw.t), tw, c.dweight);
    expect_close("dbias", from_gpu(*gpu, gdb, "dbias"), test::widened(db.t), tb, c.dbias);
    expect_same_counts(*gpu, cpu, "backward");
    for (int i = 0; i < 3; ++i) EXPECT_EQ(amax_gpu[i], amax_cpu[i]) << "backward amax " << i;
  }
  // Inputs are left alone.
  EXPECT_EQ(from_gpu(*gpu, gx, "inp"), xv);
  EXPECT_EQ(from_gpu(*gpu, gw, "weight"), wv);
  EXPECT_EQ(from_gpu(*gpu, gdout, "dout"), dv);
}

constexpr DType F32 = DType::f32, F16 = DType::f16, BF = DType::bf16;
constexpr MatmulPrecision NAT = MatmulPrecision::native, TF = MatmulPrecision::tf32,
                          FP8 = MatmulPrecision::fp8;

TEST(CudaMatmul, Fp32Native) {
  MPT_REQUIRE_GPU();
  run_matmul_case({"fp32", NAT, F32, F32, F32, F32, F32, F32, F32, F32, 37, 48, 80});
  run_matmul_case({"fp32 small odd", NAT, F32, F32, F32, F32, F32, F32, F32, F32, 5, 20, 12});
  // More rows than one dbias chunk (256).
  run_matmul_case({"fp32 tall", NAT, F32, F32, F32, F32, F32, F32, F32, F32, 601, 24, 40});
}

TEST(CudaMatmul, Tf32) {
  MPT_REQUIRE_GPU();
  run_matmul_case({"tf32", TF, F32, F32, F32, F32, F32, F32, F32, F32, 37, 48, 80});
  run_matmul_case({"tf32 bf16 acts fp32 weights", TF, BF, F32, F32, BF, BF, BF, F32, F32, 37, 48, 80});
}

TEST(CudaMatmul, Fp16) {
  MPT_REQUIRE_GPU();
  run_matmul_case({"all fp16", NAT, F16, F16, F16, F16, F16, F16, F16, F16, 37, 48, 80});
  run_matmul_case({"fp16, fp32 weight grads", NAT, F16, F16, F16, F16, F16, F16, F32, F32, 37, 40, 72});
}

TEST(CudaMatmul, Bf16) {
  MPT_REQUIRE_GPU();
  run_matmul_case({"all bf16", NAT, BF, BF, BF, BF, BF, BF, BF, BF, 37, 48, 80});
  run_matmul_case({"bf16 acts, fp32 weights", NAT, BF, F32, F32, BF, BF, BF, F32, F32, 37, 48, 80});
  run_matmul_case({"bf16, fp32 out", NAT, BF, BF, F32, F32, BF, F32, F32, F32, 5, 20, 12});
  // fp32 output with a bf16 bias: no epilogue takes it; the store kernel adds it in place.
  run_matmul_case({"bf16, fp32 out, bf16 bias", NAT, BF, BF, BF, F32, BF, F32, F32, BF, 37, 48, 80});
  // Widths not multiples of 4: the store kernel's one-element path (forward 83, dgrad 45).
  run_matmul_case({"bf16 odd widths", NAT, BF, BF, BF, BF, BF, BF, BF, BF, 37, 45, 83});
  run_matmul_case({"bf16 odd widths, fp32 out", NAT, BF, BF, F32, F32, BF, F32, F32, F32, 37, 45, 83});
  // More rows than a grid's y dimension (65535): the store kernel's row loop.
  run_matmul_case({"bf16, 70001 rows", NAT, BF, BF, BF, BF, BF, BF, F32, F32, 70001, 8, 12});
}

// A spec of precision `prec`; under fp8 with scales as delayed scaling picks them from the
// operands' amaxes (inp saturating its largest values a little, weight with headroom; dout only
// when given).
MatmulSpec spec_for(MatmulPrecision prec, Backend& cpu, const Tensor& x, const Tensor& w,
                    const Tensor& dout) {
  MatmulSpec spec(prec);
  if (prec != MatmulPrecision::fp8) return spec;
  spec.inp = {DType::e4m3, 1.1f * 448.0f / cpu.amax(x), nullptr};
  spec.weight = {DType::e4m3, 0.8f * 448.0f / cpu.amax(w), nullptr};
  if (dout.defined()) spec.dout = {DType::e5m2, 0.9f * 57344.0f / cpu.amax(dout), nullptr};
  return spec;
}

// matmul_gelu_forward and matmul_backward_gelu (the MLP's c_fc and its GELU, c_proj's backward
// and the GELU's): against the CPU (whose fused ops are the separate ops, PrecisionOps.
// MatmulGeluOpsAreTheMatmulAndTheGelu), and with 16-bit outputs bit for bit against the GPU's
// own separate ops, since the store kernel applies the GELU kernels' expressions to the same
// rounded values; so with fp32 GEMMs, which keep the separate kernels. tf32 GEMMs with fp32
// outputs take cuBLASLt's GELU epilogues where the leading dimensions allow (multiples of 8):
// their accuracy is undocumented, so the tolerance assumes the hardware tanh's (relative error
// 2^-10.987, PTX ISA tanh.approx.f32) and the test prints what it measured.
struct GeluCase {
  const char* name;
  MatmulPrecision prec;
  DType act, weight, grad;
  int64_t N, C, OC;
  bool bias = true;
};

// Whether an op profile's launch is matmul.cu's store kernel `name`, staged or reading a bf16
// output the GEMM wrote (" (direct)": device-check runs the CudaMatmul tests once more under
// MPT_GEMM_OUT=direct).
bool is_store(const std::string& op, const std::string& name) {
  return op == name || op == name + " (direct)";
}

// The path a fused op took, from the launches the op profile saw (named as matmul.cu and gelu.cu
// name them): the store kernel's, the separate GELU kernel's, or neither (the GEMM's epilogue).
GeluPath path_taken(const OpProfileTable& t, const std::string& store, const std::string& gelu) {
  bool s = false, g = false;
  for (const OpTime& o : t.sorted()) s |= is_store(o.op, store), g |= o.op == gelu;
  EXPECT_FALSE(s && g) << "both the fused store and the separate GELU ran";
  return s ? GeluPath::store_kernel : g ? GeluPath::separate : GeluPath::epilogue;
}

const char* path_name(GeluPath p) {
  return p == GeluPath::epilogue ? "epilogue" : p == GeluPath::store_kernel ? "store kernel" : "separate";
}

void run_gelu_case(const GeluCase& c) {
  SCOPED_TRACE(c.name);
  Rng rng(test::fresh_seed());
  CpuBackend cpu(2);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  const int64_t N = c.N, C = c.C, OC = c.OC;
  const bool narrow = c.act != DType::f32;
  Owned x = test::randn_as(cpu, {N, C}, c.act, rng), w = test::randn_as(cpu, {OC, C}, c.weight, rng, 0.3);
  Owned b = c.bias ? test::randn_as(cpu, {OC}, c.weight, rng) : Owned{};
  Owned dout = test::randn_as(cpu, {N, OC}, c.act, rng);
  Owned gpre = test::randn_as(cpu, {N, C}, c.act, rng, 2.0);  // the backward's GELU input
  Owned dw0 = test::randn_as(cpu, {OC, C}, c.grad, rng, 0.1), db0 = test::randn_as(cpu, {OC}, c.grad, rng, 0.1);
  const MatmulSpec spec = spec_for(c.prec, cpu, x.t, w.t, dout.t);
  const std::vector<float> xv = test::widened(x.t), wv = test::widened(w.t),
                           bv = c.bias ? test::widened(b.t) : std::vector<float>{},
                           dv = test::widened(dout.t), pv = test::widened(gpre.t);
  const ProductTol pt = product_tol(c.prec, N, C, OC);
  const double eps = narrow ? dtype_traits(c.act).epsilon : 0.0;
  // |gelu'| <= 1.13. Our GELU kernels' fp32 error: within 1e-5 (1 + |v|) (expf's and the
  // roundings'; PrecisionOps.Gelu derives the CPU's exactly). An epilogue's: a tanh off by d
  // relative moves 0.5 v (1 + th) by 0.5 |v| d and the derivative
  // 0.5 (1 + th) + 0.5 v (1 - th^2) k (1 + 3 c v^2) by 0.5 d + |v| k (1 + 3 c v^2) d.
  constexpr double kSlope = 1.13, kOurs = 1e-5, kTanhApprox = 4.93e-4;  // 2^-10.987
  constexpr double kK = 0.7978845608028654, kC = 0.044715;
  auto gelu_err = [&](bool epilogue, double v) {
    return kOurs * (1 + std::fabs(v)) + (epilogue ? 0.5 * std::fabs(v) * kTanhApprox : 0.0);
  };
  auto dgelu_err = [&](bool epilogue, double v) {
    return kOurs * (1 + std::fabs(v)) +
           (epilogue ? (0.5 + std::fabs(v) * kK * (1 + 3 * kC * v * v)) * kTanhApprox : 0.0);
  };
  // The largest |fused - separate| of an epilogue, relative to the epilogue part of its bound.
  double epi_worst_f = 0, epi_worst_b = 0;

  // ---- forward
  Owned pre = test::make(cpu, {N, OC}, c.act), out = test::make(cpu, {N, OC}, c.act);
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t);
  Dev gb = c.bias ? to_gpu(*gpu, b.t) : Dev{};
  Dev gp_f = to_gpu(*gpu, pre.t), go_f = to_gpu(*gpu, out.t);  // fused
  Dev gp_s = to_gpu(*gpu, pre.t), go_s = to_gpu(*gpu, out.t);  // separate
  const GeluPath want_f =
      gelu_forward_path(plan_matmul(MatmulOp::forward, N, C, OC, c.act, c.weight, c.act, spec),
                        c.act, c.act, reinterpret_cast<uintptr_t>(gp_f.t.data), c.bias, c.weight,
                        reinterpret_cast<uintptr_t>(gb.t.data));
  cpu.reset_cast_counts();
  gpu->reset_cast_counts();
  cpu.matmul_gelu_forward(out.t, pre.t, x.t, w.t, b.t, spec);
  if (ctx) ctx->start_profile();
  gpu->matmul_gelu_forward(go_f.t, gp_f.t, gx.t, gw.t, gb.t, spec);
  const GeluPath ran_f =
      ctx ? path_taken(ctx->stop_profile(), "matmul: store output + gelu", "gelu_forward") : want_f;
  // An epilogue cuBLASLt has no algorithm for falls back to the separate kernel (reported below).
  if (want_f != GeluPath::epilogue) {
    EXPECT_EQ(path_name(ran_f), std::string(path_name(want_f)));
  }
  const bool epi_f = ran_f == GeluPath::epilogue;
  expect_same_counts(*gpu, cpu, "matmul_gelu_forward");
  const std::vector<float> pre_c = test::widened(pre.t), out_c = test::widened(out.t);
  const std::vector<double> tp = forward_tol(xv, wv, bv, N, C, OC, pt);
  std::vector<double> to(N * OC);
  for (int64_t i = 0; i < N * OC; ++i)
    to[i] = kSlope * (tp[i] + eps * std::fabs(pre_c[i])) + gelu_err(epi_f, pre_c[i]);
  const std::vector<float> pre_f = from_gpu(*gpu, gp_f, "pre"), out_f = from_gpu(*gpu, go_f, "out");
  expect_close("pre", pre_f, pre_c, tp, c.act);
  expect_close("out", out_f, out_c, to, c.act);
  gpu->matmul_forward(gp_s.t, gx.t, gw.t, gb.t, spec);
  gpu->gelu_forward(go_s.t, gp_s.t);
  const std::vector<float> out_s = from_gpu(*gpu, go_s, "separate out");
  if (!epi_f) {
    EXPECT_EQ(pre_f, from_gpu(*gpu, gp_s, "separate pre")) << "the fused store's pre";
    EXPECT_EQ(out_f, out_s) << "the fused store's GELU";
  } else {
    // The epilogue's GELU against our kernel's on the epilogue's own pre.
    for (int64_t i = 0; i < N * OC; ++i) {
      const double v = pre_f[i], ours = 0.5 * v * (1 + std::tanh(kK * (v + kC * v * v * v)));
      epi_worst_f = std::max(epi_worst_f, std::fabs(out_f[i] - ours) / (0.5 * std::fabs(v) * kTanhApprox + 1e-30));
    }
  }

  // ---- backward: dinp = gelu'(gpre) * (dout . w), dweight and dbias accumulate
  Owned dx = test::randn_as(cpu, {N, C}, c.act, rng);  // stale: dinp writes
  Owned dw = test::make(cpu, {OC, C}, c.grad), db = test::make(cpu, {OC}, c.grad);
  std::memcpy(dw.t.data, dw0.t.data, dw0.t.bytes());
  std::memcpy(db.t.data, db0.t.data, db0.t.bytes());
  Owned g = test::make(cpu, {N, C}, c.act), dx_c = test::make(cpu, {N, C}, c.act);
  Dev gdout = to_gpu(*gpu, dout.t), gpre_d = to_gpu(*gpu, gpre.t);
  Dev gdx_f = to_gpu(*gpu, dx.t), gdw_f = to_gpu(*gpu, dw.t), gdb_f = to_gpu(*gpu, db.t);
  Dev gg = to_gpu(*gpu, g.t), gdx_s = to_gpu(*gpu, dx.t), gdw_s = to_gpu(*gpu, dw.t),
      gdb_s = to_gpu(*gpu, db.t);
  const GeluPath want_b =
      gelu_backward_path(plan_matmul(MatmulOp::dgrad, N, C, OC, c.act, c.weight, c.act, spec),
                         c.act, c.act, reinterpret_cast<uintptr_t>(gpre_d.t.data));
  cpu.reset_cast_counts();
  gpu->reset_cast_counts();
  // The CPU as separate ops, to keep the rounded product g for the tolerance.
  cpu.matmul_backward(g.t, dw.t, db.t, dout.t, x.t, w.t, spec);
  cpu.gelu_backward(dx_c.t, gpre.t, g.t);
  if (ctx) ctx->start_profile();
  gpu->matmul_backward_gelu(gdx_f.t, gdw_f.t, gdb_f.t, gdout.t, gx.t, gw.t, gpre_d.t, spec);
  const GeluPath ran_b =
      ctx ? path_taken(ctx->stop_profile(), "matmul: store dgrad + gelu backward", "gelu_backward")
          : want_b;
  if (want_b != GeluPath::epilogue) {
    EXPECT_EQ(path_name(ran_b), std::string(path_name(want_b)));
  }
  const bool epi_b = ran_b == GeluPath::epilogue;
  expect_same_counts(*gpu, cpu, "matmul_backward_gelu");
  const std::vector<float> gv = test::widened(g.t);
  const std::vector<double> tg = dgrad_tol(dv, wv, N, C, OC, pt);
  std::vector<double> tx(N * C);
  for (int64_t i = 0; i < N * C; ++i)
    tx[i] = kSlope * (tg[i] + eps * std::fabs(gv[i])) + std::fabs(gv[i]) * dgelu_err(epi_b, pv[i]);
  const std::vector<float> dx_f = from_gpu(*gpu, gdx_f, "dinp");
  expect_close("dinp", dx_f, test::widened(dx_c.t), tx, c.act);
  // dweight, dbias: the plain matmul_backward's (CudaMatmul.* check them against the CPU);
  // the separate GPU ops give the same bits.
  gpu->matmul_backward(gg.t, gdw_s.t, gdb_s.t, gdout.t, gx.t, gw.t, spec);
  gpu->gelu_backward(gdx_s.t, gpre_d.t, gg.t);
  EXPECT_EQ(from_gpu(*gpu, gdw_f, "dweight"), from_gpu(*gpu, gdw_s, "separate dweight"));
  EXPECT_EQ(from_gpu(*gpu, gdb_f, "dbias"), from_gpu(*gpu, gdb_s, "separate dbias"));
  const std::vector<float> dx_s = from_gpu(*gpu, gdx_s, "separate dinp");
  if (!epi_b) {
    EXPECT_EQ(dx_f, dx_s) << "the fused dgrad store";
  } else {
    // DGELU against our kernel on the plain dgrad GEMM's product (whose summation order may
    // differ slightly: fp32 rounding, far below the bound).
    for (int64_t i = 0; i < N * C; ++i) {
      const double v = pv[i], part = (0.5 + std::fabs(v) * kK * (1 + 3 * kC * v * v)) * kTanhApprox;
      // the two GEMMs' summation orders may differ: their slack joins the denominator
      epi_worst_b = std::max(epi_worst_b, std::fabs(dx_f[i] - dx_s[i]) /
                                              (std::fabs(gv[i]) * part + kSlope * tg[i] + 1e-30));
    }
  }
  if (want_f == GeluPath::epilogue || want_b == GeluPath::epilogue)
    std::printf("[ gelu epi ] %s: forward %s (planned epilogue: %s), backward %s (%s); error / "
                "hardware-tanh bound: GELU %.3g, derivative %.3g\n",
                c.name, path_name(ran_f), want_f == GeluPath::epilogue ? "yes" : "no",
                path_name(ran_b), want_b == GeluPath::epilogue ? "yes" : "no", epi_worst_f,
                epi_worst_b);
  // Inputs are left alone.
  EXPECT_EQ(from_gpu(*gpu, gpre_d, "gelu_pre"), pv);
  EXPECT_EQ(from_gpu(*gpu, gdout, "dout"), dv);
}

TEST(CudaMatmul, GeluFusionsMatchTheSeparateOpsAndTheCpu) {
  MPT_REQUIRE_GPU();
  run_gelu_case({"fp32", NAT, F32, F32, F32, 37, 48, 80});
  // tf32: leading dimensions 80 (forward) and 48 (backward) take the GELU epilogues; 12 and 20
  // do not (not multiples of 8): the separate kernels, the derivative in place.
  run_gelu_case({"tf32 epilogues", TF, F32, F32, F32, 37, 48, 80});
  run_gelu_case({"tf32 epilogues, no bias (GELU_AUX)", TF, F32, F32, F32, 24, 40, 64, false});
  run_gelu_case({"tf32 separate", TF, F32, F32, F32, 5, 20, 12});
  run_gelu_case({"bf16", NAT, BF, BF, BF, 37, 48, 80});
  run_gelu_case({"bf16, fp32 weights and grads", NAT, BF, F32, F32, 37, 44, 76});
  run_gelu_case({"bf16 odd widths", NAT, BF, BF, BF, 29, 45, 83});
  run_gelu_case({"fp16", NAT, F16, F16, F32, 29, 20, 12});
  run_gelu_case({"fp8 hybrid, bf16", FP8, BF, BF, F32, 48, 64, 96});
}

// MPT_LT_EPILOGUES=0: no cuBLASLt epilogue runs (the op profile sees our kernels do their work)
// and the results are still the CPU's.
TEST(CudaMatmul, WithoutEpiloguesOurKernelsDoTheirWork) {
  MPT_REQUIRE_CUDA_BACKEND();
  test::ScopedEnv off("MPT_LT_EPILOGUES", "0");  // read when the backend's context is made
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  ASSERT_FALSE(ctx->lt_epilogues());
  Rng rng(test::fresh_seed());
  const int64_t N = 37, C = 48, OC = 80;
  Owned x = test::randn_as(cpu, {N, C}, F32, rng), w = test::randn_as(cpu, {OC, C}, F32, rng, 0.3);
  Owned b = test::randn_as(cpu, {OC}, F32, rng), dout = test::randn_as(cpu, {N, OC}, F32, rng);
  Owned pre = test::make(cpu, {N, OC}, F32), out = test::make(cpu, {N, OC}, F32);
  Owned dx = test::make(cpu, {N, C}, F32), dw = test::make(cpu, {OC, C}, F32), db = test::make(cpu, {OC}, F32);
  Owned gp = test::randn_as(cpu, {N, C}, F32, rng);
  cpu.fill(dw.t, 0.0f);
  cpu.fill(db.t, 0.0f);
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), gb = to_gpu(*gpu, b.t), gd = to_gpu(*gpu, dout.t),
      gpre = to_gpu(*gpu, pre.t), gout = to_gpu(*gpu, out.t), gdx = to_gpu(*gpu, dx.t),
      gdw = to_gpu(*gpu, dw.t), gdb = to_gpu(*gpu, db.t), ggp = to_gpu(*gpu, gp.t);
  if (ctx) ctx->start_profile();
  // tf32 with fp32 outputs: the GELU and bias epilogues' case; native fp32: BGRADB's.
  gpu->matmul_gelu_forward(gout.t, gpre.t, gx.t, gw.t, gb.t, TF);
  gpu->matmul_backward_gelu(gdx.t, gdw.t, gdb.t, gd.t, gx.t, gw.t, ggp.t, NAT);
  bool gelu_kernel = false, dgelu_kernel = false, bias_store = false, dbias_kernels = false;
  for (const OpTime& o : ctx->stop_profile().sorted()) {
    gelu_kernel |= o.op == "gelu_forward";
    dgelu_kernel |= o.op == "gelu_backward";
    bias_store |= o.op == "matmul: store output";
    dbias_kernels |= o.op == "matmul_backward: dbias partial sums";
  }
  EXPECT_TRUE(gelu_kernel && dgelu_kernel && bias_store && dbias_kernels)
      << gelu_kernel << dgelu_kernel << bias_store << dbias_kernels;
  cpu.matmul_gelu_forward(out.t, pre.t, x.t, w.t, b.t, TF);
  cpu.matmul_backward_gelu(dx.t, dw.t, db.t, dout.t, x.t, w.t, gp.t, NAT);
  const ProductTol tf = product_tol(TF, N, C, OC), nat = product_tol(NAT, N, C, OC);
  const std::vector<double> tp = forward_tol(test::widened(x.t), test::widened(w.t), test::widened(b.t), N, C, OC, tf);
  expect_close("pre", from_gpu(*gpu, gpre, "pre"), test::widened(pre.t), tp, F32);
  std::vector<double> to(tp.size()), tx = dgrad_tol(test::widened(dout.t), test::widened(w.t), N, C, OC, nat);
  const std::vector<float> prev = test::widened(pre.t), gpv = test::widened(gp.t);
  for (size_t i = 0; i < to.size(); ++i) to[i] = 1.13 * tp[i] + 1e-5 * (1 + std::fabs(prev[i]));
  // gelu' within 1.13, and its own fp32 error 1e-5 (1 + |v|) times |g| <= sum |dout w| = tx / rel
  for (size_t i = 0; i < tx.size(); ++i)
    tx[i] = 1.13 * tx[i] + 1e-5 * (tx[i] / nat.rel) * (1 + std::fabs(gpv[i]));
  expect_close("out", from_gpu(*gpu, gout, "out"), test::widened(out.t), to, F32);
  expect_close("dinp", from_gpu(*gpu, gdx, "dinp"), test::widened(dx.t), tx, F32);
  std::vector<double> tb(OC, 2 * gamma32(double(N) + 2) * N * 4.0);
  expect_close("dbias", from_gpu(*gpu, gdb, "dbias"), test::widened(db.t), tb, F32);
}

// MatmulSpec::exact_gelu (training.recompute): where tf32's GELU would come from cuBLASLt's
// epilogue (this shape takes it: GeluFusionsMatchTheSeparateOpsAndTheCpu), the GELU is our
// kernel's instead, bit for bit what gelu_forward gives from the pre-activation, which the
// backward's recomputation will give again.
TEST(CudaMatmul, ExactGeluIsGeluForwardsOwn) {
  MPT_REQUIRE_CUDA_BACKEND();
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  Rng rng(test::fresh_seed());
  const int64_t N = 37, C = 48, OC = 80;
  Owned x = test::randn_as(cpu, {N, C}, F32, rng), w = test::randn_as(cpu, {OC, C}, F32, rng, 0.3);
  Owned b = test::randn_as(cpu, {OC}, F32, rng), o = test::make(cpu, {N, OC}, F32);
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), gb = to_gpu(*gpu, b.t),
      gpre = to_gpu(*gpu, o.t), gout = to_gpu(*gpu, o.t), again = to_gpu(*gpu, o.t);
  MatmulSpec spec = TF;
  spec.exact_gelu = true;
  if (ctx) ctx->start_profile();
  gpu->matmul_gelu_forward(gout.t, gpre.t, gx.t, gw.t, gb.t, spec);
  EXPECT_EQ(path_taken(ctx->stop_profile(), "matmul: store output + gelu", "gelu_forward"),
            GeluPath::separate);
  gpu->gelu_forward(again.t, gpre.t);
  EXPECT_EQ(from_gpu(*gpu, gout, "out"), from_gpu(*gpu, again, "gelu_forward(pre)"));
}

// backend.h assumes, with the CPU's emulation, that tf32 GEMMs round fp32 operands to tf32
// (10 mantissa bits) to nearest even; NVIDIA documents no rounding mode for it. Each probe is an
// operand times 1.0 (exact in tf32), on values the candidates round apart (u = 2^-10, tf32's
// unit at 1): 1 + u/2 (a tie below an even mantissa), 1 + 3u/2 (a tie below an odd one) and
// 1 + u/2 + 2^-20 (just above a tie). Reports "[ tf32 round ]" (collected by device-check);
// asserts only that the results are one of round to nearest even, half away from zero,
// truncation, or the operand unrounded (no Tensor Core path at this shape).
TEST(CudaMatmul, ReportsHowTf32RoundsOperands) {
  MPT_REQUIRE_GPU();
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  const int64_t N = 16, C = 16, OC = 16;
  const float u = std::ldexp(1.0f, -10);
  const float probe[3] = {1 + u / 2, 1 + u + u / 2, 1 + u / 2 + std::ldexp(1.0f, -20)};
  struct Mode {
    const char* name;
    float want[3];
  };
  const Mode modes[4] = {{"round to nearest even (as the CPU emulates)", {1, 1 + 2 * u, 1 + u}},
                         {"round half away from zero", {1 + u, 1 + 2 * u, 1 + u}},
                         {"truncation", {1, 1 + u, 1}},
                         {"none (operands unrounded)", {probe[0], probe[1], probe[2]}}};
  Owned x = test::make(cpu, {N, C}, F32), w = test::make(cpu, {OC, C}, F32);
  Owned o = test::make(cpu, {N, OC}, F32);
  cpu.fill(x.t, 0.0f);
  cpu.fill(w.t, 0.0f);
  for (int i = 0; i < 3; ++i) static_cast<float*>(x.t.data)[i * C] = probe[i];
  for (int64_t j = 0; j < OC; ++j) static_cast<float*>(w.t.data)[j * C] = 1.0f;
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), go = to_gpu(*gpu, o.t);
  gpu->matmul_forward(go.t, gx.t, gw.t, Tensor(), TF);
  const std::vector<float> got = from_gpu(*gpu, go, "out");
  const Mode* seen = nullptr;
  for (const Mode& m : modes) {
    bool all = true;
    for (int i = 0; i < 3; ++i)
      for (int64_t j = 0; j < OC; ++j) all = all && got[i * OC + j] == m.want[i];
    if (all && !seen) seen = &m;
  }
  std::printf("[ tf32 round ] fp32 operands of tf32 GEMMs: %s; results %.9g %.9g %.9g\n",
              seen ? seen->name : "none of the candidates", got[0], got[OC], got[2 * OC]);
  EXPECT_NE(seen, nullptr) << "results " << got[0] << " " << got[OC] << " " << got[2 * OC];
}

// For the choice the next speed step hinges on (writing 16-bit GEMM outputs directly, without
// the fp32 staging whose purpose is exact cast counts): whether cuBLASLt's GEMMs keep results
// that are fp32 subnormals or flush them to zero. bf16 shares fp32's range, so a bf16 output
// underflows only from such a result. Reports what it sees ("[ subnormal ]", collected by
// device-check); asserts only that each result is the exact one or zero.
TEST(CudaMatmul, ReportsWhetherGemmsKeepSubnormalResults) {
  test::ScopedEnv staged("MPT_GEMM_OUT", "staged");  // its reference is the staged store
  MPT_REQUIRE_GPU();
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  const int64_t N = 16, C = 16, OC = 16;
  const float tiny = std::ldexp(1.0f, -70), exact = std::ldexp(1.0f, -136);  // 16 x 2^-140
  for (DType in : {BF, F32}) {
    Owned x = test::make(cpu, {N, C}, in), w = test::make(cpu, {OC, C}, in);
    cpu.fill(x.t, tiny);
    cpu.fill(w.t, tiny);
    Owned o32 = test::make(cpu, {N, OC}, F32), o16 = test::make(cpu, {N, OC}, BF);
    Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), go32 = to_gpu(*gpu, o32.t),
        go16 = to_gpu(*gpu, o16.t);
    gpu->matmul_forward(go32.t, gx.t, gw.t, Tensor(), NAT);  // D written directly, fp32
    int64_t kept = 0, zero = 0;
    for (float v : from_gpu(*gpu, go32, "fp32 out")) {
      kept += v == exact;
      zero += v == 0.0f;
    }
    EXPECT_EQ(kept + zero, N * OC) << "each result exact or flushed";
    // bf16 out: staged in fp32, rounded to 0 by the store kernel: an underflow is counted only
    // if the staged result was kept.
    gpu->reset_cast_counts();
    cpu.reset_cast_counts();
    gpu->matmul_forward(go16.t, gx.t, gw.t, Tensor(), NAT);
    cpu.matmul_forward(o16.t, x.t, w.t, Tensor(), NAT);
    std::printf("[ subnormal ] %s GEMM: fp32 results %lld kept, %lld flushed to zero; bf16 "
                "outputs' underflows counted: GPU %llu, CPU %llu (of %lld)\n",
                dtype_name(in), static_cast<long long>(kept), static_cast<long long>(zero),
                static_cast<unsigned long long>(gpu->cast_counts(TensorClass::activation).underflow),
                static_cast<unsigned long long>(cpu.cast_counts(TensorClass::activation).underflow),
                static_cast<long long>(N * OC));
  }
}

// The question that decides whether 16-bit GEMM outputs could skip their fp32 staging (the
// largest speed item left, matmul.cu): does cuBLASLt writing fp16/bf16 D itself, without and
// with its BIAS epilogue, give the bits our store kernel gives from the fp32 product? Reported
// (`[ direct 16-bit ]`, collected by device-check), not asserted: the staged path stays what
// runs either way. Random products of a layer's size, with ties to even made likely by short
// operands (bf16 inputs: products exact, sums rounded once to fp32 before the narrowing).
TEST(CudaMatmul, ReportsWhetherDirect16BitOutputsMatchTheStagedStore) {
  test::ScopedEnv staged("MPT_GEMM_OUT", "staged");  // its reference is the staged store
  MPT_REQUIRE_CUDA_BACKEND();
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  Rng rng(test::fresh_seed());
  const int64_t N = 256, C = 192, OC = 320;
  for (DType dt : {BF, F16}) {
    Owned x = test::randn_as(cpu, {N, C}, dt, rng), w = test::randn_as(cpu, {OC, C}, dt, rng, 0.2);
    Owned b = test::randn_as(cpu, {OC}, dt, rng), o = test::make(cpu, {N, OC}, dt);
    Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), gb = to_gpu(*gpu, b.t);
    Dev staged = to_gpu(*gpu, o.t), staged_b = to_gpu(*gpu, o.t), direct = to_gpu(*gpu, o.t);
    auto bits = [&](const Dev& d) {
      std::vector<uint16_t> h(static_cast<size_t>(N * OC));
      gpu->copy_to_host(h.data(), d.t);
      return h;
    };
    gpu->matmul_forward(staged.t, gx.t, gw.t, Tensor(), NAT);
    gpu->matmul_forward(staged_b.t, gx.t, gw.t, gb.t, NAT);
    GemmPlan p = plan_matmul(MatmulOp::forward, N, C, OC, dt, dt, dt, MatmulSpec(NAT));
    ASSERT_FALSE(p.a.copy || p.b.copy) << "same-dtype 16-bit operands are read as stored";
    p.d_type = dt == BF ? GemmType::bf16 : GemmType::f16;
    std::string report;
    for (bool with_bias : {false, true}) {
      GemmArgs g;
      g.a = gw.t.data;
      g.b = gx.t.data;
      g.d = static_cast<float*>(direct.t.data);  // written as p.d_type says
      if (with_bias) {
        g.epilogue = GemmEpilogue::bias;
        g.bias = gb.t.data;
        g.bias_dtype = dt;
      }
      const bool ran = run_gemm(*ctx, p, g, "direct 16-bit output", /*may_fail=*/true);
      std::string line = with_bias ? "with BIAS: " : "plain: ";
      if (!ran) {
        report += line + "refused by cuBLASLt; ";
        continue;
      }
      const std::vector<uint16_t> got = bits(direct), want = bits(with_bias ? staged_b : staged);
      int64_t differ = 0, nonfinite = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        differ += got[i] != want[i];
        nonfinite += (got[i] & (dt == BF ? 0x7F80 : 0x7C00)) == (dt == BF ? 0x7F80 : 0x7C00);
      }
      EXPECT_EQ(nonfinite, 0) << line;
      report += line + std::to_string(differ) + " of " + std::to_string(got.size()) +
                " elements differ from the staged store; ";
    }
    std::printf("[ direct 16-bit ] %s D: %s\n", dtype_name(dt), report.c_str());
  }
}

// MPT_GEMM_OUT=direct (matmul_plan.h, GemmOut) against the staged default, op by op, on the
// same inputs. Which path ran is read from the op profile: the aligned layer shapes must take
// the direct GEMMs (one "(direct)" store or count per op); an odd width may be refused by
// cuBLASLt (then the staged path runs: reported, not asserted). The cast counts must be the
// staged ones (no value here is near the ends of fp32's range). The values may differ by the
// GEMM's summation order (cuBLASLt may choose another algorithm for a bf16 D): the plain
// outputs must be within that (twice the GEMM's error bound, plus a bf16 rounding), and the
// fp32 weight and bias gradients, whose GEMMs are the same in both modes, equal; how many
// 16-bit elements differ at all is printed ([ direct out ]: none where cuBLASLt rounds as our
// store does and sums in the same order). The fused outputs' values are checked against the CPU
// by the rest of this suite, which device-check runs once more under MPT_GEMM_OUT=direct.
void run_direct_case(const char* name, MatmulPrecision prec, int64_t N, int64_t C, int64_t OC,
                     bool must_run) {
  SCOPED_TRACE(name);
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  Rng rng(test::fresh_seed());
  const int vocab = static_cast<int>(OC) - 3;  // the classifier's padded columns
  Owned x = test::randn_as(cpu, {N, C}, BF, rng), w = test::randn_as(cpu, {OC, C}, BF, rng, 0.2);
  Owned b = test::randn_as(cpu, {OC}, BF, rng), stream = test::randn_as(cpu, {N, OC}, BF, rng);
  Owned dout = test::randn_as(cpu, {N, OC}, BF, rng), gelu_in = test::randn_as(cpu, {N, C}, BF, rng);
  Owned stale_o = test::randn_as(cpu, {N, OC}, BF, rng), stale_i = test::randn_as(cpu, {N, C}, BF, rng);
  Owned dw = test::randn_as(cpu, {OC, C}, F32, rng), db = test::randn_as(cpu, {OC}, F32, rng);
  Owned tg = test::make(cpu, {N}, DType::i32), losses = test::make(cpu, {N}, F32);
  for (int64_t i = 0; i < N; ++i)
    static_cast<int32_t*>(tg.t.data)[i] = static_cast<int32_t>(rng.next_u64() % vocab);
  const MatmulSpec spec = spec_for(prec, cpu, x.t, w.t, dout.t);
  const Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), gb = to_gpu(*gpu, b.t),
            gstream = to_gpu(*gpu, stream.t), gdout = to_gpu(*gpu, dout.t),
            ggelu_in = to_gpu(*gpu, gelu_in.t), gtg = to_gpu(*gpu, tg.t);
  struct Run {
    std::vector<std::vector<float>> values;  // every output, in the order the ops write them
    std::vector<std::vector<uint8_t>> bits;
    std::vector<CastCounts> counts;  // per op and tensor class
    int64_t direct_launches = 0;
  };
  auto run = [&](const char* mode) {
    test::ScopedEnv env("MPT_GEMM_OUT", mode);
    Run r;
    std::vector<Dev> outs;
    auto out = [&](const Owned& like) { return outs.emplace_back(to_gpu(*gpu, like.t)).t; };
    if (ctx) ctx->start_profile();
    auto op = [&](const std::function<void()>& f) {
      gpu->reset_cast_counts();
      f();
      gpu->collect_stats();
      for (int k = 0; k < kTensorClasses; ++k)
        r.counts.push_back(gpu->cast_counts(static_cast<TensorClass>(k)));
    };
    // The outputs, numbered as `outs` holds them: 0, 1 the forwards; 2, 3 GELU's pre and out;
    // 4 the residual sum; 5, 6 the logits' gradients and the losses; 7, 8, 9 and 10, 11, 12
    // dinp, dweight, dbias of the two backwards.
    op([&] { gpu->matmul_forward(out(stale_o), gx.t, gw.t, gb.t, spec); });
    op([&] { gpu->matmul_forward(out(stale_o), gx.t, gw.t, Tensor(), spec); });
    op([&] {
      const Tensor pre = out(stale_o), g = out(stale_o);
      gpu->matmul_gelu_forward(g, pre, gx.t, gw.t, gb.t, spec);
    });
    op([&] { gpu->matmul_residual_forward(out(stale_o), gstream.t, gx.t, gw.t, gb.t, spec); });
    op([&] {
      const Tensor logits = out(stale_o), l = out(losses);
      gpu->matmul_crossentropy(l, logits, gx.t, gw.t, gtg.t, vocab, 0.37f, spec);
    });
    op([&] {
      const Tensor dx = out(stale_i), gdw = out(dw), gdb = out(db);
      gpu->matmul_backward(dx, gdw, gdb, gdout.t, gx.t, gw.t, spec);
    });
    op([&] {
      const Tensor dx = out(stale_i), gdw = out(dw), gdb = out(db);
      gpu->matmul_backward_gelu(dx, gdw, gdb, gdout.t, gx.t, gw.t, ggelu_in.t, spec);
    });
    if (ctx)
      for (const OpTime& o : ctx->stop_profile().sorted())
        if (o.op.size() > 9 && o.op.compare(o.op.size() - 9, 9, "(direct)") == 0)
          r.direct_launches += o.launches;
    for (const Dev& d : outs) {
      r.values.push_back(from_gpu(*gpu, d, "output"));  // the guard bytes checked too
      std::vector<uint8_t> h(d.t.bytes());
      gpu->copy_to_host(h.data(), d.t);
      r.bits.push_back(std::move(h));
    }
    return r;
  };
  const Run staged = run("staged"), direct = run("direct");
  EXPECT_EQ(staged.direct_launches, 0);
  if (must_run && ctx) {
    EXPECT_EQ(direct.direct_launches, 7) << "every bf16 output written by its GEMM";
  }
  ASSERT_EQ(staged.counts.size(), direct.counts.size());
  for (size_t i = 0; i < staged.counts.size(); ++i) {
    EXPECT_EQ(direct.counts[i].values, staged.counts[i].values) << "op " << i / kTensorClasses;
    EXPECT_EQ(direct.counts[i].overflow, staged.counts[i].overflow) << "op " << i / kTensorClasses;
    EXPECT_EQ(direct.counts[i].underflow, staged.counts[i].underflow) << "op " << i / kTensorClasses;
  }
  ASSERT_EQ(staged.values.size(), 13u);
  ASSERT_EQ(direct.values.size(), 13u);
  const ProductTol pt = product_tol(prec, N, C, OC);
  const std::vector<float> xv = test::widened(x.t), wv = test::widened(w.t), bv = test::widened(b.t),
                           dv = test::widened(dout.t), no_bias(OC, 0.0f);
  auto twice = [](std::vector<double> t) {
    for (double& v : t) v *= 2;
    return t;
  };
  const std::vector<double> tb = twice(forward_tol(xv, wv, bv, N, C, OC, pt)),
                            tn = twice(forward_tol(xv, wv, no_bias, N, C, OC, pt)),
                            td = twice(dgrad_tol(dv, wv, N, C, OC, pt));
  expect_close("forward", direct.values[0], staged.values[0], tb, BF);
  expect_close("forward without bias", direct.values[1], staged.values[1], tn, BF);
  expect_close("gelu pre", direct.values[2], staged.values[2], tb, BF);
  expect_close("dinp", direct.values[7], staged.values[7], td, BF);
  for (size_t i : {8, 9, 11, 12}) {
    EXPECT_EQ(direct.bits[i], staged.bits[i]) << "output " << i << ": fp32 gradients";
  }
  std::string differ;
  for (size_t i : {0, 1, 2, 3, 4, 5, 7, 10}) {
    int64_t n = 0;
    for (size_t j = 0; j < staged.bits[i].size(); j += 2)
      n += std::memcmp(&staged.bits[i][j], &direct.bits[i][j], 2) != 0;
    differ += " " + std::to_string(n);
  }
  std::printf("[ direct out ] %s: %lld of 7 outputs written by their GEMMs; 16-bit elements "
              "differing from the staged ones (forward, forward without bias, GELU pre, GELU, "
              "residual sum, dlogits, dinp, dinp through GELU):%s\n",
              name, static_cast<long long>(direct.direct_launches), differ.c_str());
}

TEST(CudaMatmul, DirectBf16OutputsHaveTheStagedCountsAndValues) {
  MPT_REQUIRE_GPU();  // the CPU self-check runs the test's own logic (both ways the same there)
  run_direct_case("bf16", NAT, 64, 96, 160, true);
  run_direct_case("fp8 hybrid, bf16 outputs", FP8, 64, 96, 160, true);
  run_direct_case("bf16 odd widths", NAT, 37, 45, 83, false);
}

// The direct path's counts from the stored bf16 value (CastTally::add_stored): an infinity the
// GEMM produced from finite operands counts as an overflow, as the staged store counts the
// finite fp32 value above bf16's range that it rounds to infinity. Row 1's sum overflows fp32
// itself, so the staged store sees an infinite input, which it does not count: the difference
// matmul_plan.h names.
TEST(CudaMatmul, DirectBf16OutputsCountInfinitiesAsOverflows) {
  MPT_REQUIRE_CUDA_BACKEND();
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  const int64_t N = 16, C = 16, OC = 16;
  Owned x = test::make(cpu, {N, C}, BF), w = test::make(cpu, {OC, C}, BF), o = test::make(cpu, {N, OC}, BF);
  cpu.fill(x.t, 0.0f);
  cpu.fill(w.t, 1.0f);
  // Row 0 of x: 2^100 in every column, so row 0 of the output is 16 x 2^100 (finite, fine);
  // row 1: 2^127, so 16 x 2^127 = 2^131 overflows fp32 inside the GEMM.
  for (int64_t c = 0; c < C; ++c) {
    static_cast<uint16_t*>(x.t.data)[c] = 0x7180;            // 2^100
    static_cast<uint16_t*>(x.t.data)[C + c] = 0x7F00;        // 2^127
  }
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), go = to_gpu(*gpu, o.t);
  for (const char* mode : {"staged", "direct"}) {
    test::ScopedEnv env("MPT_GEMM_OUT", mode);
    gpu->reset_cast_counts();
    gpu->matmul_forward(go.t, gx.t, gw.t, Tensor(), NAT);
    const CastCounts c = gpu->cast_counts(TensorClass::activation);
    const std::vector<float> y = from_gpu(*gpu, go, "out");
    int64_t inf = 0;
    for (float v : y) inf += std::isinf(v);
    EXPECT_EQ(inf, OC) << mode << ": row 1 is infinite";
    EXPECT_EQ(c.values, N * OC) << mode;
    EXPECT_EQ(c.underflow, 0) << mode;
    // staged: fp32 already infinite, not a cast's overflow; direct: counted from the stored value
    EXPECT_EQ(c.overflow, std::string(mode) == "direct" ? OC : 0) << mode;
  }
}

// matmul_residual_forward: the residual add joins the store kernel for 16-bit outputs and
// follows the GEMM otherwise. The same bits as matmul_forward then residual_forward on the GPU,
// the CPU's values within the GEMM's tolerance, the CPU's counts, the residual left alone.
// res: the residual stream's dtype (act when undefined); skew: its start past alignment, in
// elements.
void run_residual_case(const char* name, MatmulPrecision prec, DType act, DType weight,
                       int64_t N, int64_t C, int64_t OC, DType res = DType::i32,
                       int64_t skew = 0) {
  SCOPED_TRACE(name);
  if (res == DType::i32) res = act;
  Rng rng(test::fresh_seed());
  CpuBackend cpu(2);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  Owned x = test::randn_as(cpu, {N, C}, act, rng), w = test::randn_as(cpu, {OC, C}, weight, rng, 0.3);
  Owned b = test::randn_as(cpu, {OC}, weight, rng), stream = test::randn_as(cpu, {N, OC}, res, rng, 2.0);
  Owned sum = test::randn_as(cpu, {N, OC}, act, rng);  // stale: out writes
  Owned y = test::make(cpu, {N, OC}, act);
  const MatmulSpec spec = spec_for(prec, cpu, x.t, w.t, Tensor());
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), gb = to_gpu(*gpu, b.t),
      gsum = to_gpu(*gpu, sum.t), gy = to_gpu(*gpu, y.t), gsum2 = to_gpu(*gpu, sum.t);
  const Dev gstream = to_gpu(*gpu, stream.t, skew);
  cpu.matmul_forward(y.t, x.t, w.t, b.t, spec);  // y: for the tolerance
  cpu.reset_cast_counts();
  gpu->reset_cast_counts();
  cpu.matmul_residual_forward(sum.t, stream.t, x.t, w.t, b.t, spec);
  if (ctx) ctx->start_profile();
  gpu->matmul_residual_forward(gsum.t, gstream.t, gx.t, gw.t, gb.t, spec);
  if (ctx) {
    bool fused = false, separate = false;
    for (const OpTime& o : ctx->stop_profile().sorted()) {
      fused |= is_store(o.op, "matmul: store output + residual");
      separate |= o.op == "residual_forward";
    }
    EXPECT_EQ(fused, residual_in_store(act, res)) << "the add joins a 16-bit store of its dtype";
    EXPECT_NE(fused, separate) << "the add runs once: in the store or after it";
  }
  expect_same_counts(*gpu, cpu, "matmul_residual_forward");
  const std::vector<float> xv = test::widened(x.t), wv = test::widened(w.t), bv = test::widened(b.t),
                           yv = test::widened(y.t);
  const double eps = act == DType::f32 ? 0.0 : dtype_traits(act).epsilon;
  std::vector<double> tol = forward_tol(xv, wv, bv, N, C, OC, product_tol(prec, N, C, OC));
  for (int64_t i = 0; i < N * OC; ++i) tol[i] += eps * std::fabs(yv[i]);  // y's rounding
  const std::vector<float> got = from_gpu(*gpu, gsum, "sum");
  expect_close("sum", got, test::widened(sum.t), tol, act);
  gpu->matmul_forward(gy.t, gx.t, gw.t, gb.t, spec);
  gpu->residual_forward(gsum2.t, gstream.t, gy.t);
  EXPECT_EQ(got, from_gpu(*gpu, gsum2, "separate sum"));
  EXPECT_EQ(from_gpu(*gpu, gstream, "residual"), test::widened(stream.t))
      << "the residual is read only";
}

TEST(CudaMatmul, ResidualFusionMatchesTheSeparateOps) {
  MPT_REQUIRE_GPU();
  run_residual_case("bf16", NAT, BF, BF, 37, 48, 80);
  run_residual_case("bf16 odd widths", NAT, BF, BF, 29, 45, 83);
  run_residual_case("fp16, fp32 weights", NAT, F16, F32, 37, 44, 76);
  run_residual_case("fp32", NAT, F32, F32, 37, 48, 80);
  run_residual_case("fp8 hybrid", FP8, BF, BF, 48, 64, 96);
  // A residual 2 bytes past alignment: the store's one-element path, the same bits.
  run_residual_case("bf16, misaligned residual", NAT, BF, BF, 37, 48, 80, BF, 1);
  // Residual and output of different dtypes: the add after the store, in place.
  run_residual_case("bf16 out, fp32 residual", NAT, BF, BF, 37, 48, 80, F32);
  run_residual_case("fp32 out, bf16 residual", NAT, F32, F32, 37, 48, 80, BF);
}

// matmul_crossentropy (the LM head and the classifier): with 16-bit logits the classifier rounds
// the GEMM's fp32 product itself; bit for bit and count for count the two separate ops on the
// GPU, training (dlogits) and evaluating (the logits), and the losses close to the CPU's.
// skew: the logits' start past alignment, in elements (the classifier's one-element path).
void run_classifier_case(const char* name, MatmulPrecision prec, DType act, DType weight,
                         int64_t N, int64_t C, int64_t Vp, int64_t skew = 0) {
  SCOPED_TRACE(name);
  Rng rng(test::fresh_seed());
  CpuBackend cpu(2);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  const int vocab = static_cast<int>(Vp) - 5;  // 5 padded columns
  Owned x = test::randn_as(cpu, {N, C}, act, rng), w = test::randn_as(cpu, {Vp, C}, weight, rng, 0.3);
  Owned tg = test::make(cpu, {N}, DType::i32);
  for (int64_t i = 0; i < N; ++i)
    static_cast<int32_t*>(tg.t.data)[i] = static_cast<int32_t>(rng.next_u64() % vocab);
  Owned stale = test::randn_as(cpu, {N, Vp}, act, rng);  // logits write
  const MatmulSpec spec = spec_for(prec, cpu, x.t, w.t, Tensor());
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), gt = to_gpu(*gpu, tg.t);
  const bool narrow = act != DType::f32;
  for (float dloss : {0.61f, 0.0f}) {
    SCOPED_TRACE(dloss != 0.0f ? "training" : "evaluating");
    Owned logits = test::make(cpu, {N, Vp}, act), losses = test::make(cpu, {N}, DType::f32);
    std::memcpy(logits.t.data, stale.t.data, stale.t.bytes());
    cpu.reset_cast_counts();
    cpu.matmul_crossentropy(losses.t, logits.t, x.t, w.t, tg.t, vocab, dloss, spec);
    const Dev fused = to_gpu(*gpu, stale.t, skew), separate = to_gpu(*gpu, stale.t, skew);
    Dev gl = to_gpu(*gpu, losses.t), gl2 = to_gpu(*gpu, losses.t);
    gpu->reset_cast_counts();
    if (ctx) ctx->start_profile();
    gpu->matmul_crossentropy(gl.t, fused.t, gx.t, gw.t, gt.t, vocab, dloss, spec);
    if (ctx) {
      bool from_product = false, store = false, direct = false;
      for (const OpTime& o : ctx->stop_profile().sorted()) {
        from_product |= o.op == "crossentropy (logits from the fp32 product)";
        store |= o.op == "matmul: store output";
        direct |= o.op == "crossentropy (counting the GEMM's logits) (direct)";
      }
      // Under MPT_GEMM_OUT=direct the GEMM writes bf16 logits itself, which the classifier
      // counts and reads in place (where cuBLASLt takes that GEMM).
      if (gemm_out() == GemmOut::staged) {
        EXPECT_FALSE(direct);
      }
      EXPECT_EQ(from_product, narrow && !direct) << "16-bit logits come from the product";
      EXPECT_EQ(store, false) << "no separate store of the logits";
    }
    expect_same_counts(*gpu, cpu, "matmul_crossentropy");
    const std::vector<CastCounts> fused_counts = {gpu->cast_counts(TensorClass::activation),
                                                  gpu->cast_counts(TensorClass::gradient)};
    gpu->reset_cast_counts();
    gpu->matmul_forward(separate.t, gx.t, gw.t, Tensor(), spec);
    gpu->crossentropy_forward_backward(gl2.t, separate.t, gt.t, vocab, dloss);
    const std::vector<CastCounts> sep_counts = {gpu->cast_counts(TensorClass::activation),
                                                gpu->cast_counts(TensorClass::gradient)};
    for (int k = 0; k < 2; ++k) {
      EXPECT_EQ(fused_counts[k].values, sep_counts[k].values) << k;
      EXPECT_EQ(fused_counts[k].overflow, sep_counts[k].overflow) << k;
      EXPECT_EQ(fused_counts[k].underflow, sep_counts[k].underflow) << k;
    }
    auto bits = [&](const Tensor& t) {
      std::vector<uint8_t> h(t.bytes());
      gpu->copy_to_host(h.data(), t);
      return h;
    };
    EXPECT_EQ(bits(fused.t), bits(separate.t)) << (dloss != 0.0f ? "dlogits" : "logits");
    const std::vector<float> got = from_gpu(*gpu, gl, "losses");
    EXPECT_EQ(got, from_gpu(*gpu, gl2, "separate losses"));
    // Against the CPU: the logits' GEMM differs in summation order (and so, by an ulp of the
    // logits' format, in rounding), which moves a loss by at most about twice the logits' error.
    const std::vector<float> ref = test::widened(losses.t);
    // (tf32: the operands' rounding, 2^-11 relative, may differ from the CPU's in its ties.)
    const double eps = narrow ? dtype_traits(act).epsilon : prec == TF ? 0x1p-10 : 1e-5;
    int64_t zeros = 0;
    for (int64_t i = 0; i < N; ++i) {
      ASSERT_TRUE(std::isfinite(got[i])) << i;
      EXPECT_NEAR(got[i], ref[i], 4 * eps * (1.0 + std::fabs(ref[i])) + 1e-4) << "loss " << i;
      zeros += got[i] == 0.0f;
    }
    EXPECT_LT(zeros, N / 4);
  }
}

TEST(CudaMatmul, ClassifierFusionMatchesTheSeparateOps) {
  MPT_REQUIRE_GPU();
  run_classifier_case("bf16", NAT, BF, BF, 37, 48, 112);
  run_classifier_case("bf16, odd width", NAT, BF, BF, 37, 48, 107);
  run_classifier_case("bf16, misaligned logits", NAT, BF, BF, 29, 40, 112, 1);
  // Rows 8-byte aligned only, and widths of 4 but not 8 elements: one element per access, as
  // the separate classifier takes them (the threads must split each row alike).
  run_classifier_case("bf16, 8-byte aligned logits", NAT, BF, BF, 29, 40, 112, 4);
  run_classifier_case("bf16, rows of 100", NAT, BF, BF, 29, 40, 100);
  run_classifier_case("fp16, fp32 weights", NAT, F16, F32, 37, 44, 96);
  run_classifier_case("fp32", NAT, F32, F32, 37, 48, 112);
  run_classifier_case("tf32", TF, F32, F32, 37, 48, 107);
  run_classifier_case("fp8 hybrid", FP8, BF, BF, 48, 64, 96);
  // More columns than the block has threads times 4: each thread's several accesses per row.
  run_classifier_case("bf16, wide rows", NAT, BF, BF, 9, 32, 5008);
}

// Outputs that start 2 bytes past an aligned address, widths multiples of 4: the store kernel's
// one-element path (StoreLaunch::vec 1), with the bits of aligned outputs, fused GELU included.
TEST(CudaMatmul, MisalignedOutputsGiveTheAlignedBits) {
  // The staged store's claim: under MPT_GEMM_OUT=direct a misaligned D is another GEMM key, whose
  // algorithm may sum in another order.
  test::ScopedEnv staged("MPT_GEMM_OUT", "staged");
  MPT_REQUIRE_GPU();
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Rng rng(test::fresh_seed());
  const int64_t N = 24, C = 32, OC = 40;
  Owned x = test::randn_as(cpu, {N, C}, BF, rng), w = test::randn_as(cpu, {OC, C}, BF, rng, 0.3);
  Owned b = test::randn_as(cpu, {OC}, BF, rng);
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), gb = to_gpu(*gpu, b.t);
  const size_t bytes = size_t(N * OC) * 2;
  Buffer buf = gpu->allocate(4 * bytes + 64);
  auto view = [&](int k, size_t skew) { return buf.view(k * (bytes + 16) + skew, BF, {N, OC}); };
  const Tensor pre_a = view(0, 0), out_a = view(1, 0), pre_m = view(2, 2), out_m = view(3, 2);
  auto host = [&](const Tensor& t) {
    std::vector<uint16_t> h(t.numel());
    gpu->copy_to_host(h.data(), t);
    return h;
  };
  gpu->matmul_forward(pre_a, gx.t, gw.t, gb.t, NAT);
  gpu->matmul_forward(pre_m, gx.t, gw.t, gb.t, NAT);
  EXPECT_EQ(host(pre_a), host(pre_m)) << "matmul_forward";
  gpu->matmul_gelu_forward(out_a, pre_a, gx.t, gw.t, gb.t, NAT);
  gpu->matmul_gelu_forward(out_m, pre_m, gx.t, gw.t, gb.t, NAT);
  EXPECT_EQ(host(pre_a), host(pre_m)) << "matmul_gelu_forward pre";
  EXPECT_EQ(host(out_a), host(out_m)) << "matmul_gelu_forward out";
  int64_t zeros = 0;
  for (uint16_t v : host(out_a)) zeros += (v & 0x7FFF) == 0;
  EXPECT_LT(zeros, N * OC / 4);
}

TEST(CudaMatmul, Fp8Hybrid) {
  MPT_REQUIRE_GPU();
  // bf16 bias with an fp32 output: the epilogue path; bf16 output: the store kernel's bias.
  run_matmul_case({"fp8 hybrid, fp32 out", FP8, BF, F32, BF, F32, BF, BF, F32, F32, 48, 64, 96});
  run_matmul_case({"fp8 hybrid, bf16", FP8, BF, BF, BF, BF, BF, BF, BF, BF, 48, 64, 96});
  run_matmul_case({"fp8 hybrid, fp16", FP8, F16, F16, F16, F16, F16, F16, F32, F32, 32, 48, 16});
  run_matmul_case({"fp8 hybrid, tall", FP8, BF, BF, BF, BF, BF, BF, F32, F32, 528, 32, 48});
  // 10 chunks of dbias partial sums: more than the final kernel's 8 warps.
  run_matmul_case({"fp8 hybrid, 2320 rows", FP8, BF, BF, BF, BF, BF, BF, F32, F32, 2320, 32, 48});
  // fp32 operands: the quantise kernel's 4-element loads.
  run_matmul_case({"fp8 hybrid, fp32 operands", FP8, F32, F32, F32, F32, F32, F32, F32, F32, 304, 64, 80});
}

// Operands 2 bytes off 16-byte alignment: quantised by the element kernel (no 16-byte loads),
// with dbias from the column-sum kernels (run_matmul_case checks which ran); the same results.
TEST(CudaMatmul, Fp8OperandsOffAlignmentTakeTheElementKernel) {
  MPT_REQUIRE_GPU();
  MatmulCase c{"fp8 hybrid, skewed", FP8, BF, BF, BF, BF, BF, BF, BF, BF, 48, 64, 96};
  c.skew = 1;
  run_matmul_case(c);
}

TEST(CudaMatmul, Fp8E4m3Only) {
  MPT_REQUIRE_GPU();
  MatmulCase c{"fp8 e4m3", FP8, BF, F32, F32, F32, BF, BF, F32, F32, 48, 64, 96};
  c.fd = DType::e4m3;
  run_matmul_case(c);
}

// MatmulSpec::inp_cache on the GPU: the forward's quantise pass also writes the transposed
// copy of inp, which the backward's wgrad GEMM reads instead of quantising inp again (inp's
// memory overwritten in between). The bits and counts of the same ops without the cache, one
// quantise launch fewer in the backward, and a cache written under another scale refused.
void run_inp_cache_case(const char* name, DType act, int64_t N, int64_t C, int64_t OC) {
  SCOPED_TRACE(name);
  Rng rng(test::fresh_seed());
  CpuBackend cpu(2);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  Owned x = test::randn_as(cpu, {N, C}, act, rng), w = test::randn_as(cpu, {OC, C}, act, rng, 0.3);
  Owned b = test::randn_as(cpu, {OC}, act, rng), dout = test::randn_as(cpu, {N, OC}, act, rng);
  Owned gp = test::randn_as(cpu, {N, C}, act, rng, 2.0);  // the GELU's input, for the backward
  Owned dw0 = test::randn_as(cpu, {OC, C}, F32, rng, 0.1), db0 = test::randn_as(cpu, {OC}, F32, rng, 0.1);
  Owned zero_cache = test::make(cpu, {N, C}, DType::e4m3);
  Owned outs = test::make(cpu, {N, OC}, act), dxs = test::make(cpu, {N, C}, act);
  const MatmulSpec spec = spec_for(FP8, cpu, x.t, w.t, dout.t);
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), gb = to_gpu(*gpu, b.t),
      gdout = to_gpu(*gpu, dout.t), gpre = to_gpu(*gpu, gp.t);
  // 256-byte aligned, as the model's arena and the scratch copy it replaces: the wgrad GEMM's
  // algorithm is chosen per alignment, and the bits are compared with the scratch path's.
  const Dev cache = to_gpu(*gpu, zero_cache.t, 128);
  MatmulSpec cached = spec;
  cached.inp_cache = cache.t;
  struct Run {
    std::vector<float> pre, out, dx, dw, db;
    std::vector<CastCounts> counts;
    int quantise_launches = 0;  // in the backward
  };
  // With the cache, the forward reads a copy of x that is overwritten before the backward
  // (which then reads nothing of inp but its shape and address).
  Dev gxc = to_gpu(*gpu, x.t);
  auto run = [&](const MatmulSpec& s) {
    Run r;
    Dev pre = to_gpu(*gpu, outs.t), out = to_gpu(*gpu, outs.t), dx = to_gpu(*gpu, dxs.t),
        dw = to_gpu(*gpu, dw0.t), db = to_gpu(*gpu, db0.t);
    const Tensor xin = s.inp_cache.defined() ? gxc.t : gx.t;
    gpu->reset_cast_counts();
    gpu->matmul_gelu_forward(out.t, pre.t, xin, gw.t, gb.t, s);
    if (s.inp_cache.defined()) gpu->fill(xin, NAN);
    if (ctx) ctx->start_profile();
    gpu->matmul_backward_gelu(dx.t, dw.t, db.t, gdout.t, xin, gw.t, gpre.t, s);
    for (const OpTime& o : ctx->stop_profile().sorted())
      if (o.op == "matmul: fp8 quantise") r.quantise_launches = static_cast<int>(o.launches);
    r.counts = counts_now(*gpu);
    r.pre = from_gpu(*gpu, pre, "pre");
    r.out = from_gpu(*gpu, out, "out");
    r.dx = from_gpu(*gpu, dx, "dinp");
    r.dw = from_gpu(*gpu, dw, "dweight");
    r.db = from_gpu(*gpu, db, "dbias");
    return r;
  };
  const Run with = run(cached), without = run(spec);
  EXPECT_EQ(with.pre, without.pre);
  EXPECT_EQ(with.out, without.out);
  EXPECT_EQ(with.dx, without.dx);
  EXPECT_EQ(with.dw, without.dw);
  EXPECT_EQ(with.db, without.db);
  for (float v : with.dw) ASSERT_TRUE(std::isfinite(v));
  expect_same_counts(with.counts, without.counts, "with the cache against without");
  // Without the cache the backward quantises weight^T and inp^T (dout's pass also sums dbias).
  EXPECT_EQ(without.quantise_launches, 2);
  EXPECT_EQ(with.quantise_launches, 1) << "inp is not quantised again";
  MatmulSpec other = cached;
  other.inp.scale *= 2.0f;
  Dev dw = to_gpu(*gpu, dw0.t), db = to_gpu(*gpu, db0.t), dx = to_gpu(*gpu, dxs.t);
  EXPECT_THROW(gpu->matmul_backward(dx.t, dw.t, db.t, gdout.t, gxc.t, gw.t, other), RuntimeError);
  EXPECT_EQ(from_gpu(*gpu, dw, "dweight"), test::widened(dw0.t)) << "refused before any write";
  // Written over from the host, the cache no longer holds what its forward wrote: refused too.
  EXPECT_NO_THROW(ctx->fp8_inp_caches().expect_holds("before", cached, gxc.t));
  gpu->copy_from_host(cache.t, zero_cache.t.data);
  EXPECT_THROW(gpu->matmul_backward(dx.t, dw.t, db.t, gdout.t, gxc.t, gw.t, cached), RuntimeError);
  EXPECT_EQ(from_gpu(*gpu, dw, "dweight"), test::widened(dw0.t)) << "refused before any write";
}

TEST(CudaMatmul, Fp8InputCacheGivesTheBitsOfQuantisingAgain) {
  MPT_REQUIRE_CUDA_BACKEND();  // the CUDA backend's own cache and quantise launches
  run_inp_cache_case("bf16", BF, 48, 64, 96);
  run_inp_cache_case("bf16, tall (3 strips of rows)", BF, 528, 32, 48);
  run_inp_cache_case("fp16", F16, 32, 48, 16);
  run_inp_cache_case("fp32 operands", F32, 304, 64, 80);
}

// layernorm_forward_fp8 (backend.h, Fp8Output) followed by a GEMM that reads its output as
// stored quantised, against layernorm_forward into the activations' dtype followed by the GEMM
// quantising that, on the same GPU: the same fp8 values (the caches), products, counts and amax,
// the backward's bits from the caches and from the inps themselves; the GEMM reading the fp8
// tensor leaves its spec's amax alone and (on the CUDA backend) launches no quantise pass for
// it. Then the fused op against the CPU's: statistics and counts equal, fp8 values within one
// unit of the format (the LayerNorm's fp32 arithmetic may round across a boundary).
void run_layernorm_fp8_case(DType act, DType fi, int64_t N, int64_t C, int64_t OC) {
  SCOPED_TRACE(std::string(dtype_name(act)) + " activations, " + dtype_name(fi) + ", " +
               std::to_string(N) + " x " + std::to_string(C));
  Rng rng(test::fresh_seed());
  CpuBackend cpu(2);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  Owned x = test::randn_as(cpu, {N, C}, act, rng, 2.0, 0.5);
  // Three columns of tiny LayerNorm weights (outputs ~1e-10) underflow in fp16 or in fp8.
  Owned lw = test::randn_as(cpu, {C}, F32, rng, 0.3, 1.0), lb = test::randn_as(cpu, {C}, F32, rng, 0.3);
  for (int c = 0; c < 3; ++c) lw.f()[c] = 1e-10f, lb.f()[c] = 0.0f;
  Owned w = test::randn_as(cpu, {OC, C}, act, rng, 0.3), b = test::randn_as(cpu, {OC}, act, rng);
  Owned dout = test::randn_as(cpu, {N, OC}, act, rng);
  Owned ln = test::make(cpu, {N, C}, act), mean = test::make(cpu, {N}), rstd = test::make(cpu, {N});
  cpu.layernorm_forward(ln.t, mean.t, rstd.t, x.t, lw.t, lb.t);
  MatmulSpec spec = test::producer_fp8_spec(fi, cpu.amax(ln.t), cpu.amax(w.t));
  spec.dout.scale = 0.9f * 57344.0f / cpu.amax(dout.t);
  Owned zeros = test::make(cpu, {N, C}, fi), outs = test::make(cpu, {N, OC}, act);
  Dev gx = to_gpu(*gpu, x.t), glw = to_gpu(*gpu, lw.t), glb = to_gpu(*gpu, lb.t),
      gw = to_gpu(*gpu, w.t), gb = to_gpu(*gpu, b.t), gdout = to_gpu(*gpu, dout.t);
  // fp8 tensors 256-byte aligned (skew 128 bytes on a 128-byte guard), as the model's arena and
  // the scratch copies: the GEMMs' algorithms are chosen per alignment, and bits are compared.
  Dev gln = to_gpu(*gpu, ln.t), gq = to_gpu(*gpu, zeros.t, 128), ca = to_gpu(*gpu, zeros.t, 128),
      cb = to_gpu(*gpu, zeros.t, 128);
  Dev gmean_a = to_gpu(*gpu, mean.t), grstd_a = to_gpu(*gpu, rstd.t), gmean_b = to_gpu(*gpu, mean.t),
      grstd_b = to_gpu(*gpu, rstd.t), out_a = to_gpu(*gpu, outs.t), out_b = to_gpu(*gpu, outs.t);
  auto quantise_launches = [&](const OpProfileTable& t, const char* name) {
    int64_t n = 0;
    for (const OpTime& o : t.sorted())
      if (o.op == name) n = o.launches;
    return n;
  };
  float amax_a = -1.0f, amax_b = -1.0f, untouched = -7.0f;
  MatmulSpec sa = spec, sb = spec;
  sa.inp.amax = &amax_a;
  sa.inp_cache = ca.t;
  sb.inp.amax = &untouched;
  sb.inp_cache = cb.t;
  Fp8Output fo{act, spec.inp};
  fo.q.amax = &amax_b;

  gpu->reset_cast_counts();
  if (ctx) ctx->start_profile();
  gpu->layernorm_forward(gln.t, gmean_a.t, grstd_a.t, gx.t, glw.t, glb.t);
  gpu->matmul_forward(out_a.t, gln.t, gw.t, gb.t, sa);
  gpu->collect_stats();
  if (ctx) {
    EXPECT_EQ(quantise_launches(ctx->stop_profile(), "matmul: fp8 quantise"), 2);
  }
  const auto counts_a = counts_now(*gpu);
  gpu->reset_cast_counts();
  if (ctx) ctx->start_profile();
  gpu->layernorm_forward_fp8(gq.t, gmean_b.t, grstd_b.t, gx.t, glw.t, glb.t, fo);
  gpu->matmul_forward(out_b.t, gq.t, gw.t, gb.t, sb);
  gpu->collect_stats();
  if (ctx) {
    const OpProfileTable t = ctx->stop_profile();
    EXPECT_EQ(quantise_launches(t, "matmul: fp8 quantise"), 1) << "the weight's only";
    EXPECT_EQ(quantise_launches(t, "matmul: fp8 transpose (inp stored quantised)"), 1);
  }
  const auto counts_b = counts_now(*gpu);
  expect_same_counts(counts_a, counts_b, "fused against unfused");
  const CastCounts acts = counts_b[static_cast<int>(TensorClass::activation)];
  EXPECT_GT(acts.overflow, 0);
  EXPECT_GT(acts.underflow, 0);
  EXPECT_EQ(amax_a, amax_b);
  EXPECT_GT(amax_b, 0.0f);
  EXPECT_EQ(untouched, -7.0f) << "a GEMM reading a stored quantised inp reports no amax";
  EXPECT_EQ(from_gpu(*gpu, gmean_a, "mean"), from_gpu(*gpu, gmean_b, "mean (fp8)"));
  EXPECT_EQ(from_gpu(*gpu, grstd_a, "rstd"), from_gpu(*gpu, grstd_b, "rstd (fp8)"));
  EXPECT_EQ(from_gpu(*gpu, ca, "cache"), from_gpu(*gpu, cb, "cache (fp8)"));
  EXPECT_EQ(from_gpu(*gpu, out_a, "out"), from_gpu(*gpu, out_b, "out (fp8)"));

  for (bool cached : {true, false}) {
    SCOPED_TRACE(cached ? "backward from the caches" : "backward from the inps");
    MatmulSpec ba = sa, bb = sb;
    if (!cached) ba.inp_cache = bb.inp_cache = Tensor();
    Owned dxs = test::make(cpu, {N, C}, act), dws = test::randn_as(cpu, {OC, C}, F32, rng, 0.1);
    Dev dx_a = to_gpu(*gpu, dxs.t), dx_b = to_gpu(*gpu, dxs.t), dw_a = to_gpu(*gpu, dws.t),
        dw_b = to_gpu(*gpu, dws.t);
    gpu->matmul_backward(dx_a.t, dw_a.t, Tensor(), gdout.t, gln.t, gw.t, ba);
    gpu->matmul_backward(dx_b.t, dw_b.t, Tensor(), gdout.t, gq.t, gw.t, bb);
    EXPECT_EQ(from_gpu(*gpu, dx_a, "dinp"), from_gpu(*gpu, dx_b, "dinp (fp8)"));
    const std::vector<float> dw = from_gpu(*gpu, dw_a, "dweight");
    EXPECT_EQ(dw, from_gpu(*gpu, dw_b, "dweight (fp8)"));
    for (float v : dw) ASSERT_TRUE(std::isfinite(v));
  }

  // Against the CPU's fused op.
  Owned q = test::make(cpu, {N, C}, fi), mean_c = test::make(cpu, {N}), rstd_c = test::make(cpu, {N});
  float amax_c = -1.0f;
  cpu.reset_cast_counts();
  gpu->reset_cast_counts();
  fo.q.amax = &amax_c;
  cpu.layernorm_forward_fp8(q.t, mean_c.t, rstd_c.t, x.t, lw.t, lb.t, fo);
  fo.q.amax = &amax_b;
  gpu->layernorm_forward_fp8(gq.t, gmean_b.t, grstd_b.t, gx.t, glw.t, glb.t, fo);
  gpu->collect_stats();
  expect_same_counts(*gpu, cpu, "layernorm_forward_fp8");
  const std::vector<double> none(static_cast<size_t>(N * C), 0.0);
  expect_close("fp8 values", from_gpu(*gpu, gq, "fp8 values"), test::widened(q.t), none, fi);
  expect_close("amax", {amax_b}, {amax_c}, {0.0}, act);
  // Sums of C terms in another order: gamma_C times their magnitudes (|x| < 10, rstd < 1).
  const std::vector<double> stat_tol(static_cast<size_t>(N), gamma32(double(C)) * 10);
  expect_close("mean", from_gpu(*gpu, gmean_b, "mean"), test::widened(mean_c.t), stat_tol, F32);
  expect_close("rstd", from_gpu(*gpu, grstd_b, "rstd"), test::widened(rstd_c.t), stat_tol, F32);
}

// The MLP's GELU stored quantised for mlp.c_proj (MatmulSpec::gelu_fp8) against the GELU stored
// in the activations' dtype for c_proj to quantise, on the same GPU: c_fc's pre, the fp8 values
// (the caches), c_proj's sums, counts and amax, bit for bit; with 16-bit activations the store
// kernel does it (kGeluFp8), with fp32 ones gelu_forward_fp8 after the store. Then against the
// CPU: the fp8 values within a unit of the format (the GEMMs sum in another order), the amax
// within the activations' dtype.
// `skew`: pre this many elements off its aligned place (the store kernel's one-element path);
// `qskew`: the fp8 GELU output this many bytes off 256-byte alignment (the store kernel's
// one-element path too, and c_proj's GEMM, which wants 16-byte aligned fp8 operands, reading it
// through an aligned copy).
void run_gelu_fp8_case(DType act, DType fi, int64_t N, int64_t C, int64_t H, int64_t skew = 0,
                       int64_t qskew = 0) {
  SCOPED_TRACE(std::string(dtype_name(act)) + " activations, " + dtype_name(fi) + ", " +
               std::to_string(N) + " x " + std::to_string(C) + " x " + std::to_string(H));
  Rng rng(test::fresh_seed());
  CpuBackend cpu(2);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Context* ctx = context_of(*gpu);
  Owned x = test::randn_as(cpu, {N, C}, act, rng), wfc = test::randn_as(cpu, {H, C}, act, rng, 0.5);
  Owned bfc = test::randn_as(cpu, {H}, act, rng), wpr = test::randn_as(cpu, {C, H}, act, rng, 0.3);
  Owned bpr = test::randn_as(cpu, {C}, act, rng), res = test::randn_as(cpu, {N, C}, act, rng);
  Owned pre = test::make(cpu, {N, H}, act), g = test::make(cpu, {N, H}, act);
  const MatmulSpec fc = spec_for(FP8, cpu, x.t, wfc.t, Tensor());
  cpu.matmul_gelu_forward(g.t, pre.t, x.t, wfc.t, bfc.t, fc);
  const MatmulSpec proj = test::producer_fp8_spec(fi, cpu.amax(g.t), cpu.amax(wpr.t));
  Owned zeros = test::make(cpu, {N, H}, fi), outs = test::make(cpu, {N, C}, act);
  Dev gx = to_gpu(*gpu, x.t), gwfc = to_gpu(*gpu, wfc.t), gbfc = to_gpu(*gpu, bfc.t),
      gwpr = to_gpu(*gpu, wpr.t), gbpr = to_gpu(*gpu, bpr.t), gres = to_gpu(*gpu, res.t);
  Dev pre_a = to_gpu(*gpu, pre.t, skew), pre_b = to_gpu(*gpu, pre.t, skew), ga = to_gpu(*gpu, g.t);
  Dev gq = to_gpu(*gpu, zeros.t, 128 + qskew), ca = to_gpu(*gpu, zeros.t, 128),
      cb = to_gpu(*gpu, zeros.t, 128);
  Dev out_a = to_gpu(*gpu, outs.t), out_b = to_gpu(*gpu, outs.t);
  float amax_a = -1.0f, amax_b = -1.0f, untouched = -7.0f;
  MatmulSpec pa = proj, pb = proj, fc_b = fc;
  pa.inp.amax = &amax_a;
  pa.inp_cache = ca.t;
  pb.inp.amax = &untouched;
  pb.inp_cache = cb.t;
  fc_b.gelu_fp8 = Fp8Output{act, proj.inp};
  fc_b.gelu_fp8.q.amax = &amax_b;
  gpu->reset_cast_counts();
  gpu->matmul_gelu_forward(ga.t, pre_a.t, gx.t, gwfc.t, gbfc.t, fc);
  gpu->matmul_residual_forward(out_a.t, gres.t, ga.t, gwpr.t, gbpr.t, pa);
  gpu->collect_stats();
  const auto counts_a = counts_now(*gpu);
  gpu->reset_cast_counts();
  if (ctx) ctx->start_profile();
  gpu->matmul_gelu_forward(gq.t, pre_b.t, gx.t, gwfc.t, gbfc.t, fc_b);
  gpu->matmul_residual_forward(out_b.t, gres.t, gq.t, gwpr.t, gbpr.t, pb);
  gpu->collect_stats();
  if (ctx) {
    bool fused_store = false, separate = false;
    for (const OpTime& o : ctx->stop_profile().sorted()) {
      fused_store |= o.op == "matmul: store output + gelu (fp8)";
      separate |= o.op == "gelu_forward_fp8";
    }
    EXPECT_EQ(fused_store, act != F32) << "the store kernel quantises a 16-bit GELU";
    EXPECT_EQ(separate, act == F32);
  }
  const auto counts_b = counts_now(*gpu);
  expect_same_counts(counts_a, counts_b, "fused against unfused");
  EXPECT_GT(counts_b[static_cast<int>(TensorClass::activation)].overflow, 0);
  EXPECT_EQ(amax_a, amax_b);
  EXPECT_GT(amax_b, 0.0f);
  EXPECT_EQ(untouched, -7.0f) << "a GEMM reading a stored quantised inp reports no amax";
  EXPECT_EQ(from_gpu(*gpu, pre_a, "pre"), from_gpu(*gpu, pre_b, "pre (fp8 GELU)"));
  EXPECT_EQ(from_gpu(*gpu, ca, "cache"), from_gpu(*gpu, cb, "cache (fp8 GELU)"));
  EXPECT_EQ(from_gpu(*gpu, out_a, "out"), from_gpu(*gpu, out_b, "out (fp8 GELU)"));

  // Against the CPU's (the composition): fp8 values within a unit of the format, where the
  // GEMM's summation order moved pre across a rounding boundary.
  Owned q = test::make(cpu, {N, H}, fi), pre_c = test::make(cpu, {N, H}, act);
  MatmulSpec fc_c = fc_b;
  float amax_c = -1.0f;
  fc_c.gelu_fp8.q.amax = &amax_c;
  cpu.matmul_gelu_forward(q.t, pre_c.t, x.t, wfc.t, bfc.t, fc_c);
  const std::vector<double> none(static_cast<size_t>(N * H), 0.0);
  expect_close("fp8 values", from_gpu(*gpu, gq, "fp8 values"), test::widened(q.t), none, fi);
  expect_close("amax", {amax_b}, {amax_c}, {0.0}, act);
}

TEST(CudaMatmul, GeluFp8OutputIsTheGeluThenTheGemmsQuantisation) {
  MPT_REQUIRE_GPU();
  run_gelu_fp8_case(BF, DType::e4m3, 48, 64, 256);
  run_gelu_fp8_case(BF, DType::e5m2, 32, 48, 64);
  run_gelu_fp8_case(F16, DType::e4m3, 32, 32, 128);
  run_gelu_fp8_case(F32, DType::e4m3, 16, 32, 64);
  // pre off 8-byte alignment, then the fp8 output off 4-byte alignment.
  run_gelu_fp8_case(BF, DType::e4m3, 32, 48, 80, 1);
  run_gelu_fp8_case(BF, DType::e4m3, 32, 48, 80, 0, 1);
}

TEST(CudaMatmul, LayerNormFp8OutputIsLayerNormThenTheGemmsQuantisation) {
  MPT_REQUIRE_GPU();
  run_layernorm_fp8_case(BF, DType::e4m3, 48, 64, 96);
  run_layernorm_fp8_case(BF, DType::e5m2, 48, 64, 96);
  run_layernorm_fp8_case(F16, DType::e4m3, 32, 48, 16);
  run_layernorm_fp8_case(F32, DType::e4m3, 64, 32, 48);
  // GPT-2's width (the register kernel of 24 columns a lane) and rows over several tiles.
  run_layernorm_fp8_case(BF, DType::e4m3, 528, 768, 64);
  // A row too wide for the register kernels: the loop kernel.
  run_layernorm_fp8_case(BF, DType::e4m3, 32, 1040, 32);
}

TEST(CudaMatmul, Fp8E5m2TimesE5m2Throws) {
  MPT_REQUIRE_CUDA_BACKEND();  // cuBLASLt has no such GEMM; the CPU emulates any pair
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  CpuBackend cpu(1);
  Rng rng(1);
  Owned x = test::randn_as(cpu, {16, 16}, BF, rng), w = test::randn_as(cpu, {16, 16}, BF, rng),
        o = test::make(cpu, {16, 16}, BF);
  Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), go = to_gpu(*gpu, o.t);
  MatmulSpec s(FP8);
  s.inp.format = s.weight.format = DType::e5m2;
  EXPECT_THROW(gpu->matmul_forward(go.t, gx.t, gw.t, Tensor(), s), RuntimeError);
  EXPECT_THROW(gpu->matmul_backward(go.t, go.t, Tensor(), go.t, gx.t, gw.t, s), RuntimeError);
}

// amax is max |x| before quantisation: NaN when x holds a NaN, inf with an infinity, as on the
// CPU; the casts of non-finite values are not counted as overflows or underflows.
TEST(CudaMatmul, Fp8AmaxSeesNaNAndInfinity) {
  MPT_REQUIRE_GPU();
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  CpuBackend cpu(1);
  for (float bad : {INFINITY, NAN}) {
    for (DType dt : {F32, BF}) {
      Rng rng(7);
      Owned x = test::randn_as(cpu, {32, 16}, dt, rng), w = test::randn_as(cpu, {16, 16}, dt, rng),
            o = test::make(cpu, {32, 16}, F32);
      test::store_rounded(x.t, 37, bad);
      Dev gx = to_gpu(*gpu, x.t), gw = to_gpu(*gpu, w.t), go = to_gpu(*gpu, o.t);
      float ac[2] = {-1, -1}, ag[2] = {-1, -1};
      MatmulSpec sc(FP8), sg(FP8);
      sc.inp = {DType::e4m3, 1.0f, &ac[0]};
      sc.weight = {DType::e4m3, 1.0f, &ac[1]};
      sg.inp = {DType::e4m3, 1.0f, &ag[0]};
      sg.weight = {DType::e4m3, 1.0f, &ag[1]};
      cpu.reset_cast_counts();
      gpu->reset_cast_counts();
      cpu.matmul_forward(o.t, x.t, w.t, Tensor(), sc);
      gpu->matmul_forward(go.t, gx.t, gw.t, Tensor(), sg);
      gpu->collect_stats();  // the amaxes reach the host here
      if (std::isnan(bad)) {
        EXPECT_TRUE(std::isnan(ag[0])) << ag[0];
      } else {
        EXPECT_EQ(ag[0], INFINITY);
      }
      EXPECT_EQ(std::isnan(ag[0]), std::isnan(ac[0]));
      if (!std::isnan(ac[0])) {
        EXPECT_EQ(ag[0], ac[0]);
      }
      EXPECT_EQ(ag[1], ac[1]);
      expect_same_counts(*gpu, cpu, "fp8 forward with a non-finite input");
      from_gpu(*gpu, go, "out");  // guards only: the output holds the non-finite value's effects
    }
  }
}

// More fp8 GEMMs than the Context's 4096 amax report words before one collect_stats(): the
// pending reports are collected when the words run out, and every amax still reaches its own
// host float, equal to the CPU's.
TEST(CudaMatmul, Fp8AmaxReportsOutnumberingThePoolAllArrive) {
  MPT_REQUIRE_GPU();
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Rng rng(test::fresh_seed());
  const int64_t N = 16, C = 16, OC = 16;
  constexpr int kCalls = 2100;  // two reports each: 4200 > 4096
  std::vector<Owned> xs;
  std::vector<Dev> gxs;
  for (int i = 0; i < 8; ++i) {  // a few different inputs, cycled
    xs.push_back(test::randn_as(cpu, {N, C}, BF, rng, 0.5 + i));
    gxs.push_back(to_gpu(*gpu, xs.back().t));
  }
  Owned w = test::randn_as(cpu, {OC, C}, BF, rng);
  Owned o = test::make(cpu, {N, OC}, F32);
  Dev gw = to_gpu(*gpu, w.t), go = to_gpu(*gpu, o.t);
  std::vector<float> ag(2 * kCalls, -1.0f), ac(2 * kCalls, -1.0f);
  for (int i = 0; i < kCalls; ++i) {
    MatmulSpec sc(FP8), sg(FP8);
    sc.inp = {DType::e4m3, 1.0f, &ac[2 * i]};
    sc.weight = {DType::e4m3, 1.0f, &ac[2 * i + 1]};
    sg.inp = {DType::e4m3, 1.0f, &ag[2 * i]};
    sg.weight = {DType::e4m3, 1.0f, &ag[2 * i + 1]};
    cpu.matmul_forward(o.t, xs[i % 8].t, w.t, Tensor(), sc);
    gpu->matmul_forward(go.t, gxs[i % 8].t, gw.t, Tensor(), sg);
  }
  gpu->collect_stats();
  int64_t bad = 0;
  for (int i = 0; i < 2 * kCalls; ++i)
    if (ag[i] != ac[i] && bad++ < 3) ADD_FAILURE() << "amax " << i << ": gpu " << ag[i] << " cpu " << ac[i];
  EXPECT_EQ(bad, 0);
}

// ---- attention

struct AttCase {
  const char* name;
  DType qkv, out, dout, dqkv;
  int64_t B, T, NH, HS;
  MatmulPrecision prec = MatmulPrecision::native;
};

// Tolerances (fp64 on the host, per element), from the reference semantics of backend.h with
// the CPU's p, and the ways the two backends may differ:
//  - a score: both sum HS products in fp32 in different orders, 2 gamma_{HS+2} scale sum|q k|
//    (tf32: plus 2^-9 relative per product, should the GPU round operands differently);
//  - lse: the largest score difference of its row plus 16 ulps (log, exp, the sums' orders);
//  - p = exp(s - lse): relative ep = ds + dlse + 4u |s - lse| + 4u;
//  - a product's operand rounded to fp16/bf16 (or tf32) from two fp32 values that differ: up to
//    one unit of the format apart, 2 u_f relative, plus a subnormal's half;
//  - each output sum: 2 gamma_{T+2} of its sum of magnitudes (orders differ).
void run_attention_case(const AttCase& c) {
  SCOPED_TRACE(c.name);
  Rng rng(test::fresh_seed());
  CpuBackend cpu(2);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  const int64_t B = c.B, T = c.T, NH = c.NH, HS = c.HS, C = NH * HS;
  Owned qkv = test::randn_as(cpu, {B, T, 3 * C}, c.qkv, rng);
  Owned out = test::make(cpu, {B, T, C}, c.out);
  Owned lse = test::make(cpu, {B, NH, T}, F32);
  Owned dout = test::randn_as(cpu, {B, T, C}, c.dout, rng);
  Owned dqkv = test::make(cpu, {B, T, 3 * C}, c.dqkv);
  Dev gq = to_gpu(*gpu, qkv.t), gout = to_gpu(*gpu, out.t), glse = to_gpu(*gpu, lse.t),
      gd = to_gpu(*gpu, dout.t), gdq = to_gpu(*gpu, dqkv.t);
  const std::vector<float> x = test::widened(qkv.t), g = test::widened(dout.t);
  const double scale = 1.0 / std::sqrt(double(HS));
  const OperandFormat ff = attention_operand_format(c.qkv, c.qkv, c.prec);
  const OperandFormat fb = attention_operand_format(c.qkv, c.dout, c.prec);
  auto unit = [](OperandFormat f) {  // u_f and half the smallest subnormal
    switch (f) {
      case OperandFormat::f16: return std::pair<double, double>{0x1p-11, 0x1p-25};
      case OperandFormat::bf16: return std::pair<double, double>{0x1p-8, 0x1p-134};
      case OperandFormat::tf32: return std::pair<double, double>{0x1p-11, 0.0};
      case OperandFormat::f32: break;
    }
    return std::pair<double, double>{0.0, 0.0};
  };
  const double tf32_prod = c.prec == MatmulPrecision::tf32 && c.qkv == F32 ? 0x1p-9 : 0.0;
  auto X = [&](int64_t b, int64_t t, int64_t j) { return double(x[(b * T + t) * 3 * C + j]); };
  auto G = [&](int64_t b, int64_t t, int64_t j) { return double(g[(b * T + t) * C + j]); };

  cpu.reset_cast_counts();
  gpu->reset_cast_counts();
  cpu.attention_forward(out.t, lse.t, qkv.t, static_cast<int>(NH), c.prec);
  gpu->attention_forward(gout.t, glse.t, gq.t, static_cast<int>(NH), c.prec);
  const std::vector<float> l = test::widened(lse.t);
  // p and its relative tolerance ep, per (b, h, t, t2 <= t), from the CPU's lse.
  std::vector<double> P(B * NH * T * T, 0.0), EP(B * NH * T * T, 0.0), tl(B * NH * T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (b * NH + h) * T + t;
        std::vector<double> s(t + 1), ds(t + 1);
        double dmax = 0;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          double dot = 0, mag = 0;
          for (int64_t i = 0; i < HS; ++i) {
            const double a = X(b, t, h * HS + i) * X(b, t2, C + h * HS + i);
            dot += a, mag += std::fabs(a);
          }
          s[t2] = dot * scale;
          ds[t2] = (2 * gamma32(HS + 2) + tf32_prod) * mag * scale + 2 * kU * std::fabs(s[t2]);
          dmax = std::max(dmax, ds[t2]);
        }
        const double dl = dmax + 16 * kU * (1 + std::fabs(l[row]));
        tl[row] = dl;
        for (int64_t t2 = 0; t2 <= t; ++t2) {
          P[row * T + t2] = std::exp(s[t2] - l[row]);
          EP[row * T + t2] = ds[t2] + dl + 4 * kU * std::fabs(s[t2] - l[row]) + 4 * kU;
        }
      }
  {
    expect_close("lse", from_gpu(*gpu, glse, "lse"), l, tl, F32);
    const auto [uf, subf] = unit(ff);
    std::vector<double> to(B * T * C);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t row = (b * NH + h) * T + t;
          for (int64_t i = 0; i < HS; ++i) {
            double tol = 0;
            for (int64_t t2 = 0; t2 <= t; ++t2) {
              const double p = P[row * T + t2], ep = EP[row * T + t2];
              const double v = std::fabs(X(b, t2, 2 * C + h * HS + i));
              tol += v * (p * (ep + 2 * uf * (1 + ep) + 2 * gamma32(T + 2) + tf32_prod) + 2 * subf);
            }
            to[(b * T + t) * C + h * HS + i] = tol;
          }
        }
    expect_close("attention out", from_gpu(*gpu, gout, "attention out"), test::widened(out.t), to, c.out);
    expect_same_counts(*gpu, cpu, "attention forward");
  }

  cpu.reset_cast_counts();
  gpu->reset_cast_counts();
  cpu.attention_backward(dqkv.t, dout.t, qkv.t, lse.t, static_cast<int>(NH), c.prec);
  // The GPU's backward reads the CPU's lse: its own differs by the sums' orders.
  gpu->copy_from_host(glse.t, lse.t.data);
  gpu->attention_backward(gdq.t, gd.t, gq.t, glse.t, static_cast<int>(NH), c.prec);
  {
    const auto [uf, subf] = unit(fb);
    std::vector<double> tol(B * T * 3 * C, 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h) {
        std::vector<double> DS(T * T, 0.0), DSE(T * T, 0.0);  // |ds| bound and its tolerance
        for (int64_t t = 0; t < T; ++t) {
          const int64_t row = (b * NH + h) * T + t;
          std::vector<double> dp(t + 1), edp(t + 1);
          double Dabs = 0, Derr = 0, Dmag = 0;
          for (int64_t t2 = 0; t2 <= t; ++t2) {
            double s = 0, mag = 0;
            for (int64_t i = 0; i < HS; ++i) {
              const double a = G(b, t, h * HS + i) * X(b, t2, 2 * C + h * HS + i);
              s += a, mag += std::fabs(a);
            }
            dp[t2] = s;
            edp[t2] = (2 * gamma32(HS + 2) + tf32_prod) * mag;
            const double p = P[row * T + t2];
            Dabs += p * std::fabs(s), Dmag += p * mag;
            Derr += p * (EP[row * T + t2] * mag + edp[t2]);
          }
          Derr += 2 * gamma32(T + 2) * Dmag;
          for (int64_t t2 = 0; t2 <= t; ++t2) {
            const double p = P[row * T + t2], ep = EP[row * T + t2];
            const double mag = std::fabs(dp[t2]) + Dabs;
            const double e = scale * (p * ep * (mag + edp[t2]) + p * (edp[t2] + Derr)) + 8 * kU * p * mag * scale;
            DS[t * T + t2] = p * mag * scale;
            DSE[t * T + t2] = e + 2 * uf * (p * mag * scale + e) + 2 * subf;
          }
        }
        for (int64_t t = 0; t < T; ++t)
          for (int64_t i = 0; i < HS; ++i) {
            double tq = 0, tk = 0, tv = 0;
            for (int64_t u = 0; u <= t; ++u)  // dq[t] = sum_{u <= t} ds[t,u] k[u]
              tq += (DSE[t * T + u] + 2 * gamma32(T + 2) * DS[t * T + u]) * std::fabs(X(b, u, C + h * HS + i)) +
                    tf32_prod * DS[t * T + u] * std::fabs(X(b, u, C + h * HS + i));
            for (int64_t u = t; u < T; ++u) {  // dk[t] = sum_{u >= t} ds[u,t] q[u]; dv likewise
              const int64_t ru = (b * NH + h) * T + u;
              const double p = P[ru * T + t], ep = EP[ru * T + t];
              tk += (DSE[u * T + t] + (2 * gamma32(T + 2) + tf32_prod) * DS[u * T + t]) *
                    std::fabs(X(b, u, h * HS + i));
              tv += std::fabs(G(b, u, h * HS + i)) *
                    (p * (ep + 2 * uf * (1 + ep) + 2 * gamma32(T + 2) + tf32_prod) + 2 * subf);
            }
            const int64_t base = (b * T + t) * 3 * C + h * HS + i;
            tol[base] = tq, tol[base + C] = tk, tol[base + 2 * C] = tv;
          }
      }
    expect_close("dqkv", from_gpu(*gpu, gdq, "dqkv"), test::widened(dqkv.t), tol, c.dqkv);
    expect_same_counts(*gpu, cpu, "attention backward");
  }
  EXPECT_EQ(from_gpu(*gpu, gq, "qkv"), x);
}

TEST(CudaAttention, MatchesCpu) {
  MPT_REQUIRE_GPU();
  run_attention_case({"fp32", F32, F32, F32, F32, 2, 37, 3, 16});
  run_attention_case({"tf32", F32, F32, F32, F32, 2, 37, 3, 16, MatmulPrecision::tf32});
  run_attention_case({"bf16", BF, BF, BF, BF, 2, 37, 3, 16});
  run_attention_case({"fp16", F16, F16, F16, F16, 1, 45, 2, 40});
  run_attention_case({"bf16 qkv, fp32 out and dout", BF, F32, F32, BF, 2, 33, 4, 8});
  run_attention_case({"fp32 head size 64", F32, F32, F32, F32, 1, 70, 2, 64});
  run_attention_case({"bf16 head size 64, T = 1", BF, BF, BF, BF, 3, 1, 2, 64});
}

// A batch element's attention does not depend on the rest of the batch. With `gemm`, several
// passes over the batch (attention_batch_chunk) give what one pass per element gives: at
// T = 1024 with 4 heads a batch element's fp32 scores take 16 MiB, so 512 MiB holds 32 of them
// and a batch of 33 runs as a pass of 32 (a batch of 128 GEMMs) and a pass of 1. Elements of
// both passes (the first, the last of the first pass, the one of the second) are compared with
// the element run alone. The GEMM algorithm may differ with the batch count, so within fp32
// noise rather than bit for bit (bf16 probabilities can round to the next value: 2^-8). The
// fused kernels do the same work per (b, h) whatever the batch: bit for bit.
void run_batch_against_elements_alone(AttentionKernel kernel) {
  const int64_t B = 33, T = 1024, NH = 4, HS = 8, C = NH * HS;
  ASSERT_EQ(attention_batch_chunk(B, NH, T), 32);
  Rng rng(test::fresh_seed());
  CpuBackend cpu(1);
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  Owned qkv = test::randn_as(cpu, {B, T, 3 * C}, BF, rng);
  Owned dout = test::randn_as(cpu, {B, T, C}, BF, rng);
  Dev gq = to_gpu(*gpu, qkv.t), gd = to_gpu(*gpu, dout.t);
  Owned o = test::make(cpu, {B, T, C}, BF), l = test::make(cpu, {B, NH, T}, F32),
        dq = test::make(cpu, {B, T, 3 * C}, BF);
  Dev go = to_gpu(*gpu, o.t), gl = to_gpu(*gpu, l.t), gdq = to_gpu(*gpu, dq.t);
  gpu->attention_forward(go.t, gl.t, gq.t, static_cast<int>(NH), MatmulPrecision::native);
  gpu->attention_backward(gdq.t, gd.t, gq.t, gl.t, static_cast<int>(NH), MatmulPrecision::native);
  const std::vector<float> all_o = from_gpu(*gpu, go, "out"), all_l = from_gpu(*gpu, gl, "lse"),
                           all_dq = from_gpu(*gpu, gdq, "dqkv");
  for (int64_t b : {int64_t{0}, int64_t{31}, B - 1}) {
    SCOPED_TRACE("batch element " + std::to_string(b));
    Owned q1 = test::make(cpu, {1, T, 3 * C}, BF), d1 = test::make(cpu, {1, T, C}, BF);
    std::memcpy(q1.t.data, static_cast<const char*>(qkv.t.data) + b * T * 3 * C * 2, T * 3 * C * 2);
    std::memcpy(d1.t.data, static_cast<const char*>(dout.t.data) + b * T * C * 2, T * C * 2);
    Owned o1 = test::make(cpu, {1, T, C}, BF), l1 = test::make(cpu, {1, NH, T}, F32),
          dq1 = test::make(cpu, {1, T, 3 * C}, BF);
    Dev gq1 = to_gpu(*gpu, q1.t), gd1 = to_gpu(*gpu, d1.t), go1 = to_gpu(*gpu, o1.t),
        gl1 = to_gpu(*gpu, l1.t), gdq1 = to_gpu(*gpu, dq1.t);
    gpu->attention_forward(go1.t, gl1.t, gq1.t, static_cast<int>(NH), MatmulPrecision::native);
    gpu->attention_backward(gdq1.t, gd1.t, gq1.t, gl1.t, static_cast<int>(NH),
                            MatmulPrecision::native);
    const std::vector<float> one_o = from_gpu(*gpu, go1, "out"), one_l = from_gpu(*gpu, gl1, "lse"),
                             one_dq = from_gpu(*gpu, gdq1, "dqkv");
    auto expect_near = [&](const char* what, const std::vector<float>& all, int64_t per,
                           const std::vector<float>& one, double rel) {
      int64_t bad = 0;
      if (kernel == AttentionKernel::flash) rel = 0;
      for (int64_t i = 0; i < per; ++i) {
        const double a = all[b * per + i], o1v = one[i];
        if (!(std::fabs(a - o1v) <= rel * (1 + std::fabs(o1v))) && bad++ < 3)
          ADD_FAILURE() << what << "[" << i << "]: batched " << a << ", alone " << o1v;
      }
      EXPECT_EQ(bad, 0) << what;
    };
    expect_near("lse", all_l, NH * T, one_l, 1e-5);
    expect_near("out", all_o, T * C, one_o, 2e-2);
    expect_near("dqkv", all_dq, T * 3 * C, one_dq, 5e-2);
  }
}

TEST(CudaAttention, ChunkedBatchMatchesOnePassPerElement) {
  MPT_REQUIRE_GPU();
  test::ScopedEnv gemm("MPT_ATTENTION", "gemm");
  run_batch_against_elements_alone(AttentionKernel::gemm);
}

TEST(CudaAttention, FusedKernelsGiveEachElementTheBitsItGetsAlone) {
  MPT_REQUIRE_GPU();
  run_batch_against_elements_alone(AttentionKernel::flash);
}

// The fused kernels (attention_plan.h) over several tiles: T not a multiple of the 64-row tile
// (the last tile zero-padded), exactly one tile, head sizes padded to 32, 64 and 128 (loaded 8
// elements at a time, or one by one), an fp32 output beside bf16 operands.
TEST(CudaAttention, FusedKernelsMatchCpuAcrossTiles) {
  MPT_REQUIRE_GPU();
  ASSERT_EQ(attention_kernel(OperandFormat::bf16, 64), AttentionKernel::flash);
  run_attention_case({"bf16 T = 200 (4 tiles), head 64", BF, BF, BF, BF, 2, 200, 2, 64});
  run_attention_case({"fp16 T = 130, head 128", F16, F16, F16, F16, 1, 130, 2, 128});
  run_attention_case({"bf16 T = 97, head 24, fp32 out and dqkv", BF, F32, BF, F32, 2, 97, 3, 24});
  run_attention_case({"bf16 T = 64, head 32", BF, BF, BF, BF, 1, 64, 4, 32});
  // A head size that is not a multiple of 8: the tiles load element by element.
  run_attention_case({"fp16 T = 70, head 12", F16, F16, F16, F16, 2, 70, 2, 12});
}

// The GEMM path in 16 bits, which MPT_ATTENTION=gemm and head sizes above 128 take.
TEST(CudaAttention, GemmPathMatchesCpuIn16Bits) {
  MPT_REQUIRE_GPU();
  run_attention_case({"bf16 head 136 (above the fused kernels')", BF, BF, BF, BF, 1, 20, 1, 136});
  test::ScopedEnv gemm("MPT_ATTENTION", "gemm");
  run_attention_case({"bf16", BF, BF, BF, BF, 2, 37, 3, 16});
  run_attention_case({"fp16", F16, F16, F16, F16, 1, 45, 2, 40});
  run_attention_case({"bf16 T = 200, head 64", BF, BF, BF, BF, 1, 200, 2, 64});
}

TEST(CudaAttention, RejectsANonFp32LseAndFp8) {
  MPT_REQUIRE_GPU();
  std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(0);
  CpuBackend cpu(1);
  Owned q = test::make(cpu, {1, 4, 12}, F32), o = test::make(cpu, {1, 4, 4}, F32),
        a = test::make(cpu, {1, 2, 4}, BF), l = test::make(cpu, {1, 2, 4}, F32);
  Dev gq = to_gpu(*gpu, q.t), go = to_gpu(*gpu, o.t), ga = to_gpu(*gpu, a.t), gl = to_gpu(*gpu, l.t);
  EXPECT_THROW(gpu->attention_forward(go.t, ga.t, gq.t, 2, MatmulPrecision::native), RuntimeError);
  EXPECT_THROW(gpu->attention_forward(go.t, gl.t, gq.t, 2, MatmulPrecision::fp8), RuntimeError);
}

#else
TEST(CudaMatmul, SkippedWithoutCuda) { GTEST_SKIP() << test::gpu_unavailable_reason(); }
#endif

}  // namespace
}  // namespace mpt
