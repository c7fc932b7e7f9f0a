// The whole model on the GPU against the CPU reference: one forward/backward at a tiny size
// (loss and every gradient), then 50 training steps per precision policy whose losses must stay
// within a per-policy band of the CPU's. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cuda_test_util.h"
#include "test_util.h"
#include "core/rng.h"
#include "data/corpus.h"
#include "backend/gpu_peaks.h"
#include "config/config.h"
#include "model/cuda_workspace.h"
#include "backend/op_cost.h"
#include "model/gpt.h"
#include "optim/adamw.h"
#include "precision/policy.h"
#include "train/device_metrics.h"
#include "train/trainer.h"

namespace mpt {
namespace {

ModelConfig tiny() { return test::tiny_gpu_model(); }
constexpr int kB = test::kTinyB, kT = test::kTinyT;

struct Batches {
  std::vector<std::vector<int32_t>> in, tg;
};

Batches corpus_batches(int n) {
  const auto& corpus = data::builtin_corpus_tokens(data::Split::train);
  Batches b;
  size_t pos = 0;
  for (int s = 0; s < n; ++s) {
    std::vector<int32_t> in(kB * kT), tg(kB * kT);
    for (int i = 0; i < kB * kT; ++i) {
      in[i] = corpus[pos + i];
      tg[i] = corpus[pos + i + 1];
    }
    pos += kB * kT;
    b.in.push_back(in);
    b.tg.push_back(tg);
  }
  return b;
}

std::vector<float> host_f32(Backend& be, Tensor t) {
  // Widen on the backend (exact), then copy.
  Buffer buf = be.allocate(t.numel() * sizeof(float));
  Tensor f = buf.view(0, DType::f32, t.shape);
  be.cast(f, t, TensorClass::gradient);
  std::vector<float> h(t.numel());
  be.copy_to_host(h.data(), f);
  return h;
}

// One forward and backward from the same weights and batch on both backends, per policy: the
// loss, and every parameter's gradient as a whole tensor (relative L2 error). fp32 differs from
// the CPU only in summation order (cuBLAS vs OpenBLAS, block reductions): far below 1e-4. The
// other policies round at the same points on both backends, and an fp32 sum that lands on the
// other side of a rounding boundary there moves one element by an ulp of its format, which the
// layers below carry on: bounds of a few of the format's units (tf32 2^-11, fp16 2^-11, bf16
// 2^-8; fp8's GEMM operands e4m3 2^-4) over the whole tensor. These paths are the ones only
// 16-bit training takes (the fused attention, the fused GELU backward, the staged classifier,
// fp8's input caches) and checked here against the CPU as a whole model.
struct GradBand {
  const char* policy;
  double loss, grad;
};
class CudaTrainGradients : public ::testing::TestWithParam<GradBand> {};

TEST_P(CudaTrainGradients, OneStepMatchesTheCpu) {
  MPT_REQUIRE_GPU();
  const GradBand band = GetParam();
  auto gpu = test::gpu_backend_under_test(1);
  CpuBackend cpu(1);
  const PrecisionPolicy policy = PrecisionPolicy::preset(band.policy);
  Gpt mc(tiny(), cpu, policy), mg(tiny(), *gpu, policy);
  mc.init_weights(7, 0.02);
  mg.init_weights(7, 0.02);
  const Batches b = corpus_batches(1);
  mc.zero_grad();
  mg.zero_grad();
  const float lc = mc.forward(b.in[0].data(), b.tg[0].data(), kB, kT, 1.0f / (kB * kT));
  const float lg = mg.forward(b.in[0].data(), b.tg[0].data(), kB, kT, 1.0f / (kB * kT));
  ASSERT_TRUE(std::isfinite(lg));
  EXPECT_NEAR(lg, lc, band.loss * std::fabs(lc));
  mc.backward();
  mg.backward();
  for (size_t i = 0; i < mc.params().size(); ++i) {
    const auto gc = host_f32(cpu, mc.grad(i)), gg = host_f32(*gpu, mg.grad(i));
    double num = 0, den = 0;
    for (size_t j = 0; j < gc.size(); ++j) {
      ASSERT_TRUE(std::isfinite(gg[j])) << mc.params()[i].name << "[" << j << "]";
      num += (gg[j] - gc[j]) * double(gg[j] - gc[j]);
      den += double(gc[j]) * gc[j];
    }
    ASSERT_GT(den, 0.0) << mc.params()[i].name << ": a gradient of zeros tests nothing";
    const double rel = std::sqrt(num / den);
    EXPECT_LT(rel, band.grad) << mc.params()[i].name;
    std::printf("[ grad rel ] %s %s %.3g\n", band.policy, mc.params()[i].name.c_str(), rel);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Policies, CudaTrainGradients,
    ::testing::Values(GradBand{"fp32", 1e-4, 1e-4}, GradBand{"tf32", 2e-3, 1e-2},
                      GradBand{"fp16", 5e-3, 3e-2}, GradBand{"bf16", 1e-2, 5e-2},
                      GradBand{"bf16-pure", 1e-2, 5e-2}, GradBand{"fp8", 3e-2, 1e-1}),
    [](const ::testing::TestParamInfo<GradBand>& i) {
      std::string s = i.param.policy;
      for (char& c : s) c = c == '-' ? '_' : c;
      return s;
    });

// 50 steps from the same weights and batches on both backends; the GPU's per-step losses stay
// within a band of the CPU's that grows with the policy's rounding: the two differ only in
// summation order, which low-precision roundings amplify.
class CudaTrainPolicy : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaTrainPolicy, FiftyStepsTrackTheCpu) {
  MPT_REQUIRE_GPU();
  const std::string name = GetParam();
  const double band = name == "fp32" ? 1e-4 : name == "tf32" ? 5e-3 : name == "fp8" ? 3e-2 : 1e-2;
  auto gpu = test::gpu_backend_under_test(1);
  CpuBackend cpu(1);
  const PrecisionPolicy policy = PrecisionPolicy::preset(name);
  const Batches b = corpus_batches(50);
  std::vector<float> losses[2];
  Backend* bes[2] = {&cpu, gpu.get()};
  for (int k = 0; k < 2; ++k) {
    Gpt model(tiny(), *bes[k], policy);
    model.init_weights(11, 0.02);
    OptimizerConfig oc;
    AdamW opt(oc, model, *bes[k]);
    for (int s = 0; s < 50; ++s) {
      model.zero_grad();
      // fp16 without loss scaling at this size and learning rate does not overflow.
      losses[k].push_back(model.forward(b.in[s].data(), b.tg[s].data(), kB, kT, 1.0f / (kB * kT)));
      model.backward();
      opt.step(1e-3, opt.clip_scale(opt.grad_norm()));
      model.end_step();
    }
  }
  for (int s = 0; s < 50; ++s) {
    ASSERT_TRUE(std::isfinite(losses[1][s])) << "step " << s;
    EXPECT_NEAR(losses[1][s], losses[0][s], band * losses[0][s]) << name << " step " << s;
  }
  EXPECT_LT(losses[1].back(), losses[1].front() - 0.5) << "the GPU run learns";
}

INSTANTIATE_TEST_SUITE_P(Policies, CudaTrainPolicy,
                         ::testing::Values("fp32", "tf32", "fp16", "bf16", "bf16-pure", "fp8"),
                         test::PolicyTestName());

// training.recompute on the GPU, as on the CPU (test_model's RecomputePerPolicy): three steps
// with the GELU and LayerNorm outputs recomputed in the backward give the losses, gradients,
// weights and cast counts of keeping them, bit for bit. Not tf32: there a recomputing block's
// GEMM runs without cuBLASLt's GELU epilogue (MatmulSpec::exact_gelu), which rounds otherwise.
// fp8 with its first and last blocks in bf16 (three blocks): only those two recompute.
class CudaRecompute : public ::testing::TestWithParam<std::string> {};

// Three training steps on a fresh GPU backend from fixed weights and batches: each step's loss
// and cast counts, the last step's gradients, the final weights; and the workspace the backend
// grew to against cuda_workspace_bytes' prediction (after an evaluation pass too).
struct ThreeSteps {
  std::vector<float> losses, grads;
  std::vector<CastCounts> counts;
  std::string params;
  double workspace = 0, predicted_workspace = 0;
  float eval_loss = 0;  // an evaluation pass after the steps
};

// `obs`: sees the model's ops (a TracingBackend between them and the GPU backend).
ThreeSteps three_steps(const ModelConfig& m, const PrecisionPolicy& policy, Recompute recompute,
                       OpObserver* obs = nullptr) {
  const Batches b = corpus_batches(3);
  ThreeSteps r;
  const std::unique_ptr<Backend> device = test::gpu_backend_under_test(1);
  TracingBackend traced(*device, obs);
  Backend* gpu = obs ? static_cast<Backend*>(&traced) : device.get();
  Gpt model(m, *gpu, policy, recompute);
  model.init_weights(5, 0.02);
  OptimizerConfig oc;
  AdamW opt(oc, model, *gpu);
  for (int s = 0; s < 3; ++s) {
    gpu->reset_cast_counts();
    model.zero_grad();
    r.losses.push_back(model.forward(b.in[s].data(), b.tg[s].data(), kB, kT, 1.0f / (kB * kT)));
    model.backward();
    for (int c = 0; c < kTensorClasses; ++c)
      r.counts.push_back(gpu->cast_counts(static_cast<TensorClass>(c)));
    if (s == 2) r.grads = host_f32(*gpu, model.all_grads());
    opt.step(1e-3, opt.clip_scale(opt.grad_norm()));
    model.end_step();
  }
  r.params.resize(model.all_params().bytes());
  gpu->copy_to_host(r.params.data(), model.all_params());
  r.eval_loss = model.forward(b.in[0].data(), b.tg[0].data(), kB, kT, 0.0f);
  gpu->synchronize();
  r.workspace = double(gpu->workspace_bytes());
  if (const int cc = gpu->gpu_info().cc_major) {
    MemoryLedger plan = Gpt::plan_memory(m, kB, kT, policy, 1, false, recompute);
    r.predicted_workspace = cuda_workspace_bytes(m, kB, kT, policy, plan, cc);
  }
  return r;
}

void expect_same_counts(const ThreeSteps& a, const ThreeSteps& b) {
  ASSERT_EQ(a.counts.size(), b.counts.size());
  for (size_t i = 0; i < a.counts.size(); ++i) {
    EXPECT_EQ(a.counts[i].values, b.counts[i].values) << i;
    EXPECT_EQ(a.counts[i].overflow, b.counts[i].overflow) << i;
    EXPECT_EQ(a.counts[i].underflow, b.counts[i].underflow) << i;
  }
}

// The same steps, bit for bit: losses, cast counts, gradients and weights.
void expect_same_steps(const ThreeSteps& a, const ThreeSteps& b) {
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t s = 0; s < a.losses.size(); ++s) {
    ASSERT_TRUE(std::isfinite(a.losses[s]));
    EXPECT_EQ(std::memcmp(&a.losses[s], &b.losses[s], sizeof(float)), 0) << "step " << s;
  }
  expect_same_counts(a, b);
  ASSERT_EQ(a.grads.size(), b.grads.size());
  EXPECT_EQ(std::memcmp(a.grads.data(), b.grads.data(), a.grads.size() * sizeof(float)), 0);
  EXPECT_EQ(a.params, b.params);
}

TEST_P(CudaRecompute, GivesTheStepsOfKeepingTheActivations) {
  MPT_REQUIRE_GPU();
  const bool mixed = GetParam() == "fp8_bf16_ends";
  PrecisionPolicy policy = PrecisionPolicy::preset(mixed ? "fp8" : GetParam());
  policy.fp8.first_last_blocks_bf16 = mixed;
  ModelConfig m = tiny();
  m.n_layer = 3;
  expect_same_steps(three_steps(m, policy, Recompute::none),
                    three_steps(m, policy, Recompute::gelu_layernorm));
}

INSTANTIATE_TEST_SUITE_P(Policies, CudaRecompute,
                         ::testing::Values("fp32", "fp16", "bf16", "bf16-pure", "fp8_bf16_ends"),
                         test::PolicyTestName());

// MPT_GEMM_OUT=direct (matmul_plan.h, GemmOut): the GEMMs writing bf16 outputs themselves give
// the staged default's steps, up to the GEMMs' summation order (cuBLASLt may choose other
// algorithms for a bf16 D, and an element that then rounds the other way moves what follows by
// a bf16 unit). Where the steps come out bit for bit alike, so must every cast count. Otherwise
// the same number of casts, and what the difference may move: the losses (1e-3 relative, fp8
// 1e-2), the last step's gradients (relative L2 1e-2, a fifth of the bf16 band against the CPU
// in CudaTrainGradients; fp8 0.1, its band, since a changed amax rescales every later fp8 cast),
// each weight by at most what AdamW can move it in these steps (3 lr a step) plus two bf16
// units; fp8's over- and underflow counts then move with its scales (printed, not compared). The
// printed figures ([ direct steps ]) are what to tighten these to. The workspace each grows to
// is its prediction, smaller with direct outputs (bf16-pure keeps fp32 staging for its weight
// gradients).
class CudaDirectOutputs : public ::testing::TestWithParam<std::string> {};

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    n += double(b[i]) * b[i];
  }
  return n > 0 ? std::sqrt(d / n) : std::sqrt(d);
}

TEST_P(CudaDirectOutputs, GiveTheStepsOfStagedOutputs) {
  MPT_REQUIRE_GPU();
  const PrecisionPolicy policy = PrecisionPolicy::preset(GetParam());
  const bool fp8 = policy.matmul == MatmulPrecision::fp8;
  ThreeSteps staged, direct;
  {
    test::ScopedEnv env("MPT_GEMM_OUT", "staged");
    staged = three_steps(tiny(), policy, Recompute::none);
  }
  {
    test::ScopedEnv env("MPT_GEMM_OUT", "direct");
    direct = three_steps(tiny(), policy, Recompute::none);
  }
  ASSERT_EQ(staged.losses.size(), direct.losses.size());
  ASSERT_EQ(staged.grads.size(), direct.grads.size());
  ASSERT_EQ(staged.params.size(), direct.params.size());
  const bool same = staged.losses == direct.losses && staged.grads == direct.grads &&
                    staged.params == direct.params;
  if (same) {
    expect_same_counts(staged, direct);
  } else {
    ASSERT_EQ(staged.counts.size(), direct.counts.size());
    for (size_t i = 0; i < staged.counts.size(); ++i)
      EXPECT_EQ(direct.counts[i].values, staged.counts[i].values) << i;
    if (!fp8) expect_same_counts(staged, direct);
  }
  double worst_loss = 0;
  for (size_t s = 0; s < staged.losses.size(); ++s) {
    ASSERT_TRUE(std::isfinite(staged.losses[s]) && std::isfinite(direct.losses[s])) << s;
    worst_loss = std::max(worst_loss, std::fabs(double(direct.losses[s]) - staged.losses[s]) /
                                          std::fabs(double(staged.losses[s])));
  }
  const double grads = rel_l2(direct.grads, staged.grads);
  // The weights as stored (bf16 for these policies), widened.
  auto widen = [&](const std::string& bytes) {
    return test::widened(Tensor(const_cast<char*>(bytes.data()), policy.param,
                                {static_cast<int64_t>(bytes.size() / dtype_size(policy.param))}));
  };
  const std::vector<float> wd = widen(direct.params), ws = widen(staged.params);
  const double lr = 1e-3, unit = dtype_traits(policy.param).epsilon;  // three_steps' rate
  int64_t beyond = 0;
  for (size_t i = 0; i < ws.size(); ++i)
    beyond += !(std::fabs(double(wd[i]) - ws[i]) <= 3 * lr * 3 + 2 * unit * std::fabs(ws[i]));
  std::printf("[ direct steps ] %s: %s; loss rel %.3g, gradients rel L2 %.3g, weights rel L2 "
              "%.3g\n",
              GetParam().c_str(), same ? "bit for bit" : "different bits", worst_loss, grads,
              rel_l2(wd, ws));
  EXPECT_LE(worst_loss, fp8 ? 1e-2 : 1e-3);
  EXPECT_LE(grads, fp8 ? 0.1 : 1e-2);
  EXPECT_EQ(beyond, 0) << "weights moved further than AdamW moves them in three steps";
  if (!test::gpu_tests_on_cpu()) {
    EXPECT_EQ(staged.workspace, staged.predicted_workspace) << "staged";
    EXPECT_EQ(direct.workspace, direct.predicted_workspace) << "direct";
    EXPECT_LT(direct.workspace, staged.workspace) << "no fp32 staging of the outputs";
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, CudaDirectOutputs,
                         ::testing::Values("bf16", "bf16-pure", "fp8"), test::PolicyTestName());

// The fp8 LayerNorms and GELU stored quantised for their GEMMs (Gpt::fp8_producers) give the
// steps of storing them in 16 bits for the GEMMs to quantise (MPT_FP8_PRODUCERS=0), bit for bit:
// the same kernels' arithmetic, and the GEMMs read fp8 operands as aligned as the scratch copies
// they replace (the model's arena is 256-byte aligned), so the same algorithms. Every block in
// fp8, the ends in bf16, and the LM head in fp8 (its GEMM and classifier reading ln_f's fp8
// output). The workspace each grows to is its prediction.
class CountFp8Outputs : public OpObserver {
 public:
  void after(const OpCost& c) override { n += c.op == "layernorm_forward_fp8"; }
  int n = 0;
};

TEST(CudaFp8Producers, GiveTheStepsOfTheUnfusedModel) {
  MPT_REQUIRE_GPU();
  struct Case {
    const char* name;
    bool ends, head;
  };
  for (const Case& c : {Case{"every block in fp8", false, false},
                        Case{"first and last blocks in bf16", true, false},
                        Case{"the LM head in fp8", false, true}}) {
    SCOPED_TRACE(c.name);
    PrecisionPolicy policy = PrecisionPolicy::preset("fp8");
    policy.fp8.first_last_blocks_bf16 = c.ends;
    policy.fp8.lm_head_fp8 = c.head;
    ModelConfig m = tiny();
    m.n_layer = 3;
    ThreeSteps fused, plain;
    CountFp8Outputs ops;
    {
      test::ScopedEnv env("MPT_FP8_PRODUCERS", "1");
      fused = three_steps(m, policy, Recompute::none, &ops);
    }
    {
      test::ScopedEnv env("MPT_FP8_PRODUCERS", "0");
      plain = three_steps(m, policy, Recompute::none);
    }
    // Two LayerNorms a fp8 block (and ln_f under an fp8 head) in each of three steps and the
    // evaluation pass.
    EXPECT_EQ(ops.n, 4 * (2 * (c.ends ? 1 : 3) + (c.head ? 1 : 0)));
    expect_same_steps(fused, plain);
    EXPECT_EQ(fused.eval_loss, plain.eval_loss);
    if (fused.predicted_workspace > 0) {  // 0: the CPU self-check, no CUDA workspace to predict
      EXPECT_EQ(fused.workspace, fused.predicted_workspace);
    }
  }
}

// The memory ledger's CUDA terms against the GPU's own count, per policy: after training steps
// and an evaluation pass, the workspace is what cuda_workspace_bytes predicts (the host-side
// figures of test_cuda.cpp), and the counted peak is the ledger's total.
class CudaMemoryLedger : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaMemoryLedger, CountedPeakAndWorkspaceAreThePrediction) {
  MPT_REQUIRE_CUDA_BACKEND();
  const PrecisionPolicy policy = PrecisionPolicy::preset(GetParam());
  const std::unique_ptr<Backend> gpu = test::gpu_backend_under_test(1);
  Backend& be = *gpu;
  const Batches b = corpus_batches(3);
  {
    Gpt model(tiny(), be, policy);
    model.init_weights(3, 0.02);
    OptimizerConfig oc;
    AdamW opt(oc, model, be);
    for (int s = 0; s < 3; ++s) {
      model.zero_grad();
      model.forward(b.in[s].data(), b.tg[s].data(), kB, kT, 1.0f / (kB * kT));
      model.backward();
      opt.step(1e-3, opt.clip_scale(opt.grad_norm()));
      model.end_step();
    }
    model.forward(b.in[0].data(), b.tg[0].data(), kB, kT, 0.0f);
    be.synchronize();
    MemoryLedger plan = Gpt::plan_memory(tiny(), kB, kT, policy);
    plan.workspace = cuda_workspace_bytes(tiny(), kB, kT, policy, plan, be.gpu_info().cc_major);
    EXPECT_EQ(double(be.workspace_bytes()), plan.workspace);
    const MemoryUsage used = be.memory_usage();
    EXPECT_EQ(double(used.peak_bytes), plan.total());
    EXPECT_GE(used.device_used_bytes, used.bytes) << "the driver sees at least what we count";
    EXPECT_GT(used.device_total_bytes, used.device_used_bytes);
  }
  EXPECT_EQ(be.memory_usage().bytes, be.workspace_bytes()) << "released Buffers leave the count";
}

INSTANTIATE_TEST_SUITE_P(Policies, CudaMemoryLedger,
                         ::testing::Values("fp32", "tf32", "fp16", "bf16", "bf16-pure", "fp8"),
                         test::PolicyTestName());

// mpt train on the GPU: the start record holds the GPU's bf16 peak, every step record an MFU in
// (0, 1], and the memory event the counted peak against the ledger (within the margin).
TEST(CudaTrain, TrainerRecordsMfuAndMemoryAgainstThePlan) {
  MPT_REQUIRE_CUDA_BACKEND();
  const std::string dir = ::testing::TempDir() + "mpt_cuda_metrics_run";
  std::filesystem::remove_all(dir);
  const Config cfg = load_config(test::source_dir() + "/configs/default.yaml",
                                 {"backend=cuda", "precision=bf16", "training.steps=6",
                                  "training.log_every=2", "training.eval_every=0",
                                  "training.eval_batches=1", "checkpoint.every=0"});
  TrainOptions opt;
  opt.run_dir = dir;
  train(cfg, opt);
  std::ifstream f(dir + "/metrics.jsonl");
  std::vector<nlohmann::json> recs;
  for (std::string line; std::getline(f, line);) recs.push_back(nlohmann::json::parse(line));
  ASSERT_FALSE(recs.empty());
  const nlohmann::json& start = recs.front();
  const std::string gpu = test::gpu_backend_under_test(1)->gpu_info().gpu_name;
  const double peak = peak_flops(gpu, "bf16");
  EXPECT_EQ(start["peak_flops_format"], "bf16");
  EXPECT_EQ(start["attention_kernel"], "flash") << "bf16 operands, heads of at most 128";
  if (peak > 0) EXPECT_EQ(start["peak_flops"].get<double>(), peak);
  else EXPECT_TRUE(start["peak_flops"].is_null()) << gpu << " is not in gpu_peaks' table";
  int steps = 0, memory_events = 0;
  for (const auto& r : recs) {
    if (!r.contains("event")) {
      ++steps;
      if (peak > 0) {
        ASSERT_TRUE(r["mfu"].is_number()) << r.dump();
        EXPECT_GT(r["mfu"].get<double>(), 0.0);
        EXPECT_LE(r["mfu"].get<double>(), 1.0);
      }
      EXPECT_GT(r["peak_memory_bytes"].get<double>(), 0.0);
      EXPECT_GE(r["device_memory_bytes"].get<double>(), r["memory_bytes"].get<double>());
    } else if (r["event"] == "memory") {
      ++memory_events;
      EXPECT_LE(r["memory_vs_plan"].get<double>(), 1.0 + kMemoryPlanMargin) << r.dump();
      EXPECT_GT(r["memory_vs_plan"].get<double>(), 0.9) << r.dump();
    }
  }
  EXPECT_EQ(steps, 4);  // steps 1, 2, 4, 6
  EXPECT_EQ(memory_events, 1);
}

std::vector<nlohmann::json> step_records(const std::string& run_dir) {
  std::ifstream f(run_dir + "/metrics.jsonl");
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) {
    nlohmann::json r = nlohmann::json::parse(line);
    if (!r.contains("event")) out.push_back(r);
  }
  return out;
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Checkpoints on the GPU: the CUDA backend's tensors reach the files one at a time (fetched as
// the writer reaches them), and a run stopped at step 3 and resumed goes on exactly as a
// straight run: the same losses, and the same bytes in the final checkpoint.
class CudaResume : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaResume, ContinuesExactlyAsAStraightRun) {
  MPT_REQUIRE_GPU();
  const std::string root = ::testing::TempDir() + "mpt_cuda_resume_" + GetParam();
  std::filesystem::remove_all(root);
  auto config = [&](int steps) {
    return load_config(test::source_dir() + "/configs/default.yaml",
                       {test::gpu_tests_on_cpu() ? "backend=cpu" : "backend=cuda",
                        std::string("precision=") + GetParam(),
                        "training.steps=" + std::to_string(steps), "training.log_every=1",
                        "training.eval_every=0", "training.eval_batches=1",
                        "checkpoint.every=3", "checkpoint.keep_last=3"});
  };
  TrainOptions straight;
  straight.run_dir = root + "/straight";
  train(config(6), straight);
  TrainOptions split;
  split.run_dir = root + "/split";
  train(config(3), split);
  split.resume = true;
  train(config(6), split);
  const auto a = step_records(straight.run_dir), b = step_records(split.run_dir);
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]["step"], b[i]["step"]);
    EXPECT_EQ(a[i]["loss"].get<double>(), b[i]["loss"].get<double>()) << "step " << a[i]["step"];
  }
  const std::string last = "/checkpoints/step_00000006/";
  for (const char* f : {"model.safetensors", "optimizer.safetensors"}) {
    const std::string x = file_bytes(straight.run_dir + last + f);
    EXPECT_FALSE(x.empty()) << f;
    EXPECT_TRUE(x == file_bytes(split.run_dir + last + f)) << f << " differs";
  }
  std::filesystem::remove_all(root);
}

INSTANTIATE_TEST_SUITE_P(Policies, CudaResume, ::testing::Values("fp32", "fp16", "bf16", "fp8"),
                         test::PolicyTestName());

}  // namespace
}  // namespace mpt
