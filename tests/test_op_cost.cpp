// Op costs and floors (backend/op_cost.h): the tracing backend changes nothing of a step, a
// shape-only trace is the trace of an executed step, the costs follow the ops' contracts (FLOPs
// of a step: 6 x the matmul weights per token plus causal attention's), and floors are the
// larger of bytes and products over the ceilings.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/op_cost.h"
#include "model/gpt.h"
#include "optim/adamw.h"
#include "precision/policy.h"
#include "test_util.h"

using namespace mpt;
using namespace mpt::test;

namespace {

// "fp8_bf16_ends": fp8 with its first and last blocks in bf16.
PrecisionPolicy policy_named(const std::string& name) {
  const bool ends = name == "fp8_bf16_ends";
  PrecisionPolicy p = PrecisionPolicy::preset(ends ? "fp8" : name);
  p.fp8.first_last_blocks_bf16 = ends;
  return p;
}

ModelConfig small_model() {
  ModelConfig m;
  m.n_layer = 3;
  m.n_head = 2;
  m.n_embd = 16;  // fp8 GEMMs want multiples of 16
  m.vocab_size = 37;
  m.vocab_pad_multiple = 16;  // 48
  m.max_seq_len = 8;
  return m;
}

// Every cost an observer sees, in order.
struct Recorder : OpObserver {
  std::vector<OpCost> seen;
  int before_calls = 0;
  void before(const OpCost&) override { ++before_calls; }
  void after(const OpCost& c) override { seen.push_back(c); }
};

// `steps` training steps as the trainer takes them (zero, forward, backward, fp8 amaxes in, clip,
// AdamW), on random tokens from `seed`; the losses.
std::vector<float> train(Gpt& g, AdamW& opt, int B, int T, uint64_t seed, int steps) {
  Rng rng(seed);
  std::vector<float> losses;
  for (int s = 0; s < steps; ++s) {
    const auto in = random_tokens(rng, size_t(B) * T, g.config().vocab_size);
    const auto tg = random_tokens(rng, size_t(B) * T, g.config().vocab_size);
    g.zero_grad();
    losses.push_back(g.forward(in.data(), tg.data(), B, T, 1.0f / float(B * T)));
    g.backward();
    g.end_step();
    opt.step(1e-2f, opt.clip_scale(opt.grad_norm()));
  }
  return losses;
}

class TracedStep : public ::testing::TestWithParam<std::string> {};

// Tracing forwards every call: the losses, gradients, weights, cast counts and fp8 state of a
// traced run are those of the untraced one, bit for bit; and the observer saw each op once
// before and once after.
TEST_P(TracedStep, ChangesNothingOfTheStep) {
  const PrecisionPolicy policy = policy_named(GetParam());
  const ModelConfig m = small_model();
  const uint64_t seed = fresh_seed();
  CpuBackend plain(1), inner(1);
  Recorder rec;
  TracingBackend traced(inner, &rec);
  Gpt a(m, plain, policy), b(m, traced, policy);
  OptimizerConfig oc;
  AdamW opt_a(oc, a, plain), opt_b(oc, b, traced);
  a.init_weights(seed, 0.02);
  b.init_weights(seed, 0.02);
  opt_a.set_rounding_seed(seed + 1);
  opt_b.set_rounding_seed(seed + 1);
  const auto la = train(a, opt_a, 2, 8, seed + 2, 2);
  const auto lb = train(b, opt_b, 2, 8, seed + 2, 2);
  ASSERT_EQ(la.size(), lb.size());
  for (size_t i = 0; i < la.size(); ++i) {
    EXPECT_TRUE(std::isfinite(la[i]));
    EXPECT_EQ(std::memcmp(&la[i], &lb[i], sizeof(float)), 0) << "step " << i + 1;
  }
  EXPECT_EQ(std::memcmp(a.all_grads().data, b.all_grads().data, a.all_grads().bytes()), 0);
  EXPECT_EQ(std::memcmp(a.all_params().data, b.all_params().data, a.all_params().bytes()), 0);
  EXPECT_EQ(a.fp8_state(), b.fp8_state());
  for (int c = 0; c < kTensorClasses; ++c) {
    const CastCounts x = plain.cast_counts(TensorClass(c)), y = traced.cast_counts(TensorClass(c));
    EXPECT_EQ(x.values, y.values);
    EXPECT_EQ(x.overflow, y.overflow);
    EXPECT_EQ(x.underflow, y.underflow);
  }
  EXPECT_EQ(rec.before_calls, int(rec.seen.size()));
  EXPECT_GT(rec.seen.size(), 20u);
}

// A shape-only trace (nothing executed, no tensor memory) is the trace of the executed step:
// the same ops in the same order with the same costs, so bench_step_floor's figures are those of
// the step a GPU runs. Its allocations sum to what the executed model holds.
TEST_P(TracedStep, ShapeOnlyTraceIsTheExecutedOne) {
  const PrecisionPolicy policy = policy_named(GetParam());
  const ModelConfig m = small_model();
  for (const Recompute r : {Recompute::none, Recompute::gelu_layernorm}) {
    SCOPED_TRACE(r == Recompute::none ? "recompute none" : "recompute gelu+layernorm");
    CpuBackend inner(1);
    Recorder run, dry;
    TracingBackend executed(inner, &run);
    TracingBackend shapes = TracingBackend::shape_only(&dry);
    EXPECT_FALSE(shapes.executes());
    size_t held_run = 0, held_dry = 0;
    {
      Gpt a(m, executed, policy, r), b(m, shapes, policy, r);
      OptimizerConfig oc;
      AdamW opt_a(oc, a, executed), opt_b(oc, b, shapes);
      a.init_weights(7, 0.02);
      b.init_weights(7, 0.02);
      train(a, opt_a, 3, 8, 11, 2);
      train(b, opt_b, 3, 8, 11, 2);
      held_run = inner.memory_usage().bytes - inner.workspace_bytes();
      held_dry = shapes.memory_usage().bytes;
    }
    EXPECT_EQ(held_dry, held_run);
    EXPECT_EQ(shapes.memory_usage().bytes, 0u);  // every reservation released with its Buffer
    ASSERT_EQ(run.seen.size(), dry.seen.size());
    for (size_t i = 0; i < run.seen.size(); ++i) {
      const OpCost &x = run.seen[i], &y = dry.seen[i];
      ASSERT_EQ(x.op, y.op) << "call " << i;
      EXPECT_EQ(x.bytes, y.bytes) << x.op << ", call " << i;
      EXPECT_EQ(x.host_bytes, y.host_bytes) << x.op << ", call " << i;
      EXPECT_EQ(x.flops, y.flops) << x.op << ", call " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, TracedStep,
                         ::testing::Values("fp32", "tf32", "fp16", "bf16", "bf16-pure", "fp8",
                                           "fp8_bf16_ends"),
                         policy_test_name);

// The products of one training step: the matmuls do 6 FLOPs per weight and token (2 forward,
// 4 backward), over the four matrices of each block and the tied head (Vp x C), and causal
// attention 7 products of B C T (T + 1) FLOPs per block; each in its policy's format (fp8's
// head in bf16 unless fp8.lm_head asks for fp8).
TEST(OpCost, StepFlopsAreSixPerMatmulWeightAndTokenPlusCausalAttention) {
  ModelConfig m = small_model();
  m.n_embd = 32;
  m.n_head = 4;
  m.max_seq_len = 24;
  const int B = 3, T = 24;
  const double C = m.n_embd, L = m.n_layer, N = double(B) * T;
  for (const std::string name : {"fp32", "tf32", "bf16", "fp16", "fp8", "fp8_bf16_ends"}) {
    SCOPED_TRACE(name);
    const PrecisionPolicy policy = policy_named(name);
    CostTable table;
    TracingBackend shapes = TracingBackend::shape_only(&table);
    Gpt g(m, shapes, policy);
    const double Vp = g.padded_vocab();
    g.init_weights(1, 0.02);
    OptimizerConfig oc;
    AdamW opt(oc, g, shapes);
    table.clear();
    train(g, opt, B, T, 3, 1);
    double attention = 0, matmuls = 0;
    std::array<double, kPeakFormats> by_format{};
    for (const OpTotals& t : table.rows()) {
      (t.cost.op.rfind("attention", 0) == 0 ? attention : matmuls) += t.cost.total_flops();
      for (int f = 0; f < kPeakFormats; ++f) by_format[f] += t.cost.flops[f];
    }
    EXPECT_EQ(matmuls, 6 * N * (L * 12 * C * C + Vp * C));
    EXPECT_EQ(attention, L * 7 * double(B) * C * T * (T + 1));
    EXPECT_EQ(table.total().cost.total_flops(), matmuls + attention);
    const auto at = [&](PeakFormat f) { return by_format[static_cast<int>(f)]; };
    const double head = 6 * N * Vp * C, attn_all = attention;
    if (name == "fp8" || name == "fp8_bf16_ends") {
      const double fp8_blocks = name == "fp8" ? L : L - 2;
      EXPECT_EQ(at(PeakFormat::fp8), 6 * N * fp8_blocks * 12 * C * C);
      EXPECT_EQ(at(PeakFormat::bf16), matmuls + attn_all - at(PeakFormat::fp8));
      EXPECT_GE(at(PeakFormat::bf16), head + attn_all);
    } else {
      const PeakFormat f = name == "fp32"   ? PeakFormat::fp32
                           : name == "tf32" ? PeakFormat::tf32
                           : name == "fp16" ? PeakFormat::fp16
                                            : PeakFormat::bf16;
      EXPECT_EQ(at(f), matmuls + attention) << peak_format_name(f);
    }
  }
}

// Bytes as each op's contract moves them: inputs read once, outputs written once, accumulated
// outputs read and written; FLOPs by the products' format.
TEST(OpCost, BytesFollowTheOpsContractsAndDtypes) {
  CpuBackend be(1);
  const auto t = [&](DType d, Shape s) { return make(be, s, d); };
  // matmul_forward: inp (2,5,8) bf16, weight (6,8) bf16, fp32 bias, out (2,5,6) bf16.
  auto inp = t(DType::bf16, {2, 5, 8}), w = t(DType::bf16, {6, 8}), bias = t(DType::f32, {6}),
       out = t(DType::bf16, {2, 5, 6});
  OpCost c = op_cost::matmul_forward("matmul_forward", out.t, inp.t, w.t, bias.t,
                                     MatmulSpec(MatmulPrecision::native));
  EXPECT_EQ(c.bytes, 80 * 2 + 48 * 2 + 6 * 4 + 60 * 2);
  EXPECT_EQ(c.flops[int(PeakFormat::bf16)], 2.0 * 10 * 8 * 6);
  EXPECT_EQ(c.total_flops(), 2.0 * 10 * 8 * 6);
  c = op_cost::matmul_forward("matmul_forward", out.t, inp.t, w.t, Tensor(),
                              MatmulSpec(MatmulPrecision::fp8));
  EXPECT_EQ(c.bytes, 80 * 2 + 48 * 2 + 60 * 2);
  EXPECT_EQ(c.flops[int(PeakFormat::fp8)], 2.0 * 10 * 8 * 6);
  // fp32 tensors: fp32 products, or tf32 ones.
  auto inp32 = t(DType::f32, {10, 8}), w32 = t(DType::f32, {6, 8}), out32 = t(DType::f32, {10, 6});
  c = op_cost::matmul_forward("m", out32.t, inp32.t, w32.t, Tensor(), MatmulPrecision::tf32);
  EXPECT_EQ(c.flops[int(PeakFormat::tf32)], 2.0 * 10 * 8 * 6);
  // matmul_backward: dinp written, dweight (fp32) and dbias accumulated, two products.
  auto dinp = t(DType::bf16, {2, 5, 8}), dw = t(DType::f32, {6, 8}), db = t(DType::f32, {6}),
       dout = t(DType::bf16, {2, 5, 6});
  c = op_cost::matmul_backward("matmul_backward", dinp.t, dw.t, db.t, dout.t, inp.t, w.t,
                               MatmulPrecision::native);
  EXPECT_EQ(c.bytes, (60 * 2 + 80 * 2 + 48 * 2) + 80 * 2 + 2 * (48 * 4 + 6 * 4));
  EXPECT_EQ(c.flops[int(PeakFormat::bf16)], 2 * 2.0 * 10 * 8 * 6);
  c = op_cost::matmul_backward("matmul_backward", Tensor(), dw.t, Tensor(), dout.t, inp.t, w.t,
                               MatmulPrecision::native);
  EXPECT_EQ(c.bytes, (60 * 2 + 80 * 2 + 48 * 2) + 2 * (48 * 4));
  EXPECT_EQ(c.total_flops(), 2.0 * 10 * 8 * 6);  // no input gradient asked for
  // The fused forms: the matmul's bytes and the tensor each adds (pre and out both written; the
  // residual read; the GELU's input read).
  auto pre = t(DType::bf16, {2, 5, 6}), res = t(DType::bf16, {2, 5, 6});
  const double fwd = 80 * 2 + 48 * 2 + 6 * 4 + 60 * 2;
  EXPECT_EQ(op_cost::matmul_gelu_forward(out.t, pre.t, inp.t, w.t, bias.t, MatmulPrecision::native)
                .bytes, fwd + 60 * 2);
  EXPECT_EQ(op_cost::matmul_residual_forward(out.t, res.t, inp.t, w.t, bias.t,
                                             MatmulPrecision::native).bytes, fwd + 60 * 2);
  auto gpre = t(DType::bf16, {2, 5, 8});
  EXPECT_EQ(op_cost::matmul_backward_gelu(dinp.t, dw.t, db.t, dout.t, inp.t, w.t, gpre.t,
                                          MatmulPrecision::native).bytes,
            (60 * 2 + 80 * 2 + 48 * 2) + 80 * 2 + 2 * (48 * 4 + 6 * 4) + 80 * 2);
  // fp8 with an input cache: the forward writes it (a byte an element), the backward reads it
  // instead of inp.
  auto cache = t(DType::e4m3, {80});
  MatmulSpec fp8(MatmulPrecision::fp8);
  fp8.inp_cache = cache.t;
  EXPECT_EQ(op_cost::matmul_forward("m", out.t, inp.t, w.t, Tensor(), fp8).bytes,
            80 * 2 + 48 * 2 + 60 * 2 + 80);
  EXPECT_EQ(op_cost::matmul_residual_forward(out.t, res.t, inp.t, w.t, Tensor(), fp8).bytes,
            80 * 2 + 48 * 2 + 60 * 2 + 80 + 60 * 2);
  c = op_cost::matmul_backward("matmul_backward", dinp.t, dw.t, Tensor(), dout.t, inp.t, w.t, fp8);
  EXPECT_EQ(c.bytes, (60 * 2 + 80 + 48 * 2) + 80 * 2 + 2 * (48 * 4));
  EXPECT_EQ(c.flops[int(PeakFormat::fp8)], 2 * 2.0 * 10 * 8 * 6);
  // LayerNorm: fp32 statistics written forward, read backward; the backward accumulates dinp,
  // dweight and dbias.
  auto x = t(DType::bf16, {10, 8}), g = t(DType::bf16, {8}), be_ = t(DType::bf16, {8}),
       y = t(DType::bf16, {10, 8}), mean = t(DType::f32, {10}), rstd = t(DType::f32, {10});
  EXPECT_EQ(op_cost::layernorm_forward("layernorm_forward", y.t, mean.t, rstd.t, x.t, g.t, be_.t).bytes,
            160 + 16 + 16 + 160 + 40 + 40);
  auto dx = t(DType::bf16, {10, 8}), dg = t(DType::f32, {8}), dbeta = t(DType::f32, {8});
  EXPECT_EQ(op_cost::layernorm_backward(dx.t, dg.t, dbeta.t, y.t, x.t, g.t, mean.t, rstd.t).bytes,
            (160 + 160 + 16 + 40 + 40) + 2 * (160 + 32 + 32));
  // The embedding: a wte row per token (at most every row), a wpe row per position.
  auto emb = t(DType::bf16, {2, 5, 8}), ids = t(DType::i32, {2, 5}), wte = t(DType::bf16, {48, 8}),
       wpe = t(DType::bf16, {9, 8}), wte4 = t(DType::bf16, {4, 8});
  EXPECT_EQ(op_cost::embedding_forward(emb.t, ids.t, wte.t, wpe.t).bytes,
            40 + 10 * 16 + 5 * 16 + 160);
  EXPECT_EQ(op_cost::embedding_forward(emb.t, ids.t, wte4.t, wpe.t).bytes,
            40 + 4 * 16 + 5 * 16 + 160);
  // The head and the classifier as one op: the logits written once, never read.
  auto hin = t(DType::bf16, {10, 8}), head = t(DType::bf16, {48, 8}), hloss = t(DType::f32, {10}),
       hlogits = t(DType::bf16, {10, 48}), htg = t(DType::i32, {10});
  c = op_cost::matmul_crossentropy(hloss.t, hlogits.t, hin.t, head.t, htg.t,
                                   MatmulPrecision::native);
  EXPECT_EQ(c.bytes, (160 + 768 + 40) + (40 + 960));
  EXPECT_EQ(c.flops[int(PeakFormat::bf16)], 2.0 * 10 * 8 * 48);
  // AdamW: with a master, the weights are only written; without, updated in place.
  auto p16 = t(DType::bf16, {100}), master = t(DType::f32, {100}), g32 = t(DType::f32, {100}),
       mm = t(DType::f32, {100}), vv = t(DType::f32, {100});
  EXPECT_EQ(op_cost::adamw_update(p16.t, master.t, g32.t, mm.t, vv.t).bytes,
            400 + 2 * (400 + 400 + 400) + 200);
  EXPECT_EQ(op_cost::adamw_update(p16.t, Tensor(), g32.t, mm.t, vv.t).bytes,
            400 + 2 * (400 + 400 + 200));
  // The optimizer step's one call: the sum over its tensors, as one op.
  const OpCost many = op_cost::adamw_update_many(
      {{p16.t, master.t, g32.t, mm.t, vv.t, {}}, {p16.t, Tensor(), g32.t, mm.t, vv.t, {}}});
  EXPECT_EQ(many.op, "adamw_update_many");
  EXPECT_EQ(many.bytes, 400 + 2 * (400 + 400 + 400) + 200 + 400 + 2 * (400 + 400 + 200));
  // The classifier writes its gradient over the logits only when asked for one.
  auto losses = t(DType::f32, {10}), logits = t(DType::bf16, {10, 48}), tg = t(DType::i32, {10});
  EXPECT_EQ(op_cost::crossentropy(losses.t, logits.t, tg.t, 0.0f).bytes, 960 + 40 + 40);
  EXPECT_EQ(op_cost::crossentropy(losses.t, logits.t, tg.t, 0.1f).bytes, 960 + 40 + 40 + 960);
  // The embedding's backward: at most one dwte row per token, or every row.
  auto tokens = t(DType::i32, {2, 5}), dwte = t(DType::f32, {48, 8}), dwpe = t(DType::f32, {9, 8}),
       demb = t(DType::bf16, {2, 5, 8});
  EXPECT_EQ(op_cost::embedding_backward(dwte.t, dwpe.t, demb.t, tokens.t).bytes,
            160 + 40 + 2 * (10 * 8 * 4 + 5 * 8 * 4));
  auto few = t(DType::f32, {4, 8});
  EXPECT_EQ(op_cost::embedding_backward(few.t, dwpe.t, demb.t, tokens.t).bytes,
            160 + 40 + 2 * (4 * 8 * 4 + 5 * 8 * 4));
  // Attention: causal products, bf16 operands; the backward's five against the forward's two.
  auto qkv = t(DType::bf16, {2, 5, 24}), att = t(DType::bf16, {2, 5, 8}),
       lse = t(DType::f32, {2, 2, 5}), dqkv = t(DType::bf16, {2, 5, 24});
  c = op_cost::attention_forward(att.t, lse.t, qkv.t, MatmulPrecision::native);
  EXPECT_EQ(c.flops[int(PeakFormat::bf16)], 2 * 2.0 * 8 * 5 * 6);
  EXPECT_EQ(c.bytes, 240 * 2 + 80 * 2 + 20 * 4);
  c = op_cost::attention_backward(dqkv.t, att.t, qkv.t, lse.t, MatmulPrecision::native);
  EXPECT_EQ(c.flops[int(PeakFormat::bf16)], 5 * 2.0 * 8 * 5 * 6);
  EXPECT_EQ(c.bytes, 80 * 2 + 240 * 2 + 20 * 4 + 240 * 2);
}

// The floor is the larger of the bytes' time and the products' (summed over formats); a format
// without a rate, or no bandwidth, is refused by name rather than read as free.
TEST(OpCost, FloorIsTheLargerOfBytesAndProducts) {
  Ceilings ceil;
  ceil.bytes_per_s = 1e12;
  ceil.flops_per_s[int(PeakFormat::bf16)] = 1e15;
  ceil.flops_per_s[int(PeakFormat::fp8)] = 2e15;
  OpCost c;
  c.op = "x";
  c.bytes = 4e9;  // 4 ms of bytes
  c.flops[int(PeakFormat::bf16)] = 1e12;  // 1 ms
  EXPECT_DOUBLE_EQ(floor_seconds(c, ceil), 4e-3);
  EXPECT_TRUE(memory_bound(c, ceil));
  c.flops[int(PeakFormat::fp8)] = 8e12;  // + 4 ms: 5 ms of products
  EXPECT_DOUBLE_EQ(floor_seconds(c, ceil), 5e-3);
  EXPECT_FALSE(memory_bound(c, ceil));
  c.flops[int(PeakFormat::tf32)] = 1;
  try {
    floor_seconds(c, ceil);
    ADD_FAILURE() << "no tf32 rate: expected a refusal";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("tf32"), std::string::npos) << e.what();
  }
  c.flops[int(PeakFormat::tf32)] = 0;
  OpCost copy;
  copy.op = "copy_from_host";
  copy.host_bytes = 5e10;
  EXPECT_EQ(floor_seconds(copy, ceil), 0.0);  // no host bandwidth given: no floor
  ceil.host_bytes_per_s = 5e10;
  EXPECT_DOUBLE_EQ(floor_seconds(copy, ceil), 1.0);
  ceil.bytes_per_s = 0;
  EXPECT_THROW(floor_seconds(c, ceil), RuntimeError);
}

TEST(OpCost, TableSumsPerOpInTheOrderOpsFirstAppear) {
  CostTable t;
  OpCost a, b;
  a.op = "b_op";
  a.bytes = 10;
  a.flops[int(PeakFormat::bf16)] = 3;
  b.op = "a_op";
  b.bytes = 1;
  t.add(a, 2.0);
  t.add(b, 0.5);
  t.after(a);  // as an observer: no time
  const auto rows = t.rows();
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].cost.op, "b_op");
  EXPECT_EQ(rows[0].calls, 2);
  EXPECT_EQ(rows[0].cost.bytes, 20);
  EXPECT_EQ(rows[0].cost.flops[int(PeakFormat::bf16)], 6);
  EXPECT_EQ(rows[0].measured_ms, 2.0);
  EXPECT_EQ(rows[1].cost.op, "a_op");
  const OpTotals all = t.total();
  EXPECT_EQ(all.cost.op, "step");
  EXPECT_EQ(all.calls, 3);
  EXPECT_EQ(all.cost.bytes, 21);
  EXPECT_EQ(all.measured_ms, 2.5);
  t.clear();
  EXPECT_TRUE(t.rows().empty());
  // With ceilings, each call's floor is added: one call bound by bytes and one by products sum
  // to more than the floor of their summed costs.
  Ceilings ceil;
  ceil.bytes_per_s = 1e9;
  ceil.flops_per_s[int(PeakFormat::bf16)] = 1e12;
  CostTable f(ceil);
  OpCost bytes_heavy, math_heavy;
  bytes_heavy.op = math_heavy.op = "m";
  bytes_heavy.bytes = 2e9;  // 2 s
  math_heavy.flops[int(PeakFormat::bf16)] = 3e12;  // 3 s
  f.add(bytes_heavy, 0);
  f.add(math_heavy, 0);
  EXPECT_DOUBLE_EQ(f.rows()[0].floor_s, 5.0);
  EXPECT_DOUBLE_EQ(f.rows()[0].memory_floor_s, 2.0);
  EXPECT_FALSE(f.rows()[0].mostly_memory_bound());  // 3 s of the 5 from products
  EXPECT_DOUBLE_EQ(floor_seconds(f.rows()[0].cost, ceil), 3.0);
  EXPECT_DOUBLE_EQ(f.total().floor_s, 5.0);
}

// A backend that answers the virtuals Backend gives defaults for in its own way, so that the
// test sees whether TracingBackend passes them on rather than taking the defaults (today's
// defaulted virtuals: a new one needs its line here and its override in TracingBackend).
class SpyBackend : public CpuBackend {
 public:
  SpyBackend() : CpuBackend(1) {}
  void copy_ids_from_host(Tensor dst, const int32_t* src) override {
    ++ids;
    CpuBackend::copy_ids_from_host(dst, src);
  }
  void* stream() const override { return const_cast<int*>(&marker); }
  GpuInfo gpu_info() const override { return {"spy", 9, 0}; }
  void collect_stats() override { ++collected; }
  void matmul_gelu_forward(Tensor, Tensor, Tensor, Tensor, Tensor, const MatmulSpec&) override {
    ++fused;
  }
  void matmul_residual_forward(Tensor, Tensor, Tensor, Tensor, Tensor,
                               const MatmulSpec&) override {
    ++fused;
  }
  void matmul_backward_gelu(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                            const MatmulSpec&) override {
    ++fused;
  }
  void matmul_crossentropy(Tensor, Tensor, Tensor, Tensor, Tensor, int, float,
                           const MatmulSpec&) override {
    ++fused;
  }
  int ids = 0, collected = 0, fused = 0;
  int marker = 0;
};

TEST(TracingBackend, PassesOnTheVirtualsThatHaveDefaults) {
  SpyBackend spy;
  CostTable table;
  TracingBackend tb(spy, &table);
  auto ids = make(tb, {4}, DType::i32);
  const int32_t host[4] = {1, 2, 3, 4};
  tb.copy_ids_from_host(ids.t, host);
  EXPECT_EQ(spy.ids, 1);
  EXPECT_EQ(ids.i()[3], 4);
  EXPECT_EQ(tb.stream(), spy.stream());
  EXPECT_EQ(tb.gpu_info().gpu_name, "spy");
  tb.collect_stats();
  EXPECT_EQ(spy.collected, 1);
  // The spy's fused ops do nothing: only whether they are reached counts.
  const Tensor none;
  auto x = make(tb, {2, 2});
  tb.matmul_gelu_forward(none, none, x.t, x.t, none, MatmulSpec());
  tb.matmul_residual_forward(none, none, x.t, x.t, none, MatmulSpec());
  tb.matmul_backward_gelu(none, none, none, x.t, x.t, x.t, none, MatmulSpec());
  tb.matmul_crossentropy(none, none, x.t, x.t, none, 1, 0.0f, MatmulSpec());
  EXPECT_EQ(spy.fused, 4);
  // Cast statistics are the inner backend's.
  auto wide = make(tb, {3}), narrow = make(tb, {3}, DType::f16);
  wide.f()[0] = 1e6f;  // overflows fp16
  wide.f()[1] = 1e-9f;  // underflows
  wide.f()[2] = 1.0f;
  tb.cast(narrow.t, wide.t, TensorClass::activation);
  EXPECT_EQ(tb.cast_counts(TensorClass::activation).overflow, 1);
  EXPECT_EQ(tb.cast_counts(TensorClass::activation).underflow, 1);
  tb.set_cast_counting(false);
  EXPECT_FALSE(spy.cast_counting());
  tb.reset_cast_counts();
  EXPECT_EQ(spy.cast_counts(TensorClass::activation).values, 0);
  EXPECT_EQ(tb.memory_usage().bytes, spy.memory_usage().bytes);
  EXPECT_EQ(tb.name(), "cpu");
  // What the table saw: the upload (host bytes), the fused ops, the cast.
  std::vector<std::string> ops;
  for (const OpTotals& r : table.rows()) ops.push_back(r.cost.op);
  EXPECT_EQ(ops, (std::vector<std::string>{"copy_ids_from_host", "collect_stats",
                                           "matmul_gelu_forward", "matmul_residual_forward",
                                           "matmul_backward_gelu", "matmul_crossentropy", "cast"}));
  EXPECT_EQ(table.rows()[0].cost.host_bytes, 16);
}

}  // namespace
