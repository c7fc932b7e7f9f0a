// The whole model on the GPU against the CPU reference: one forward/backward at a tiny size
// (loss and every gradient), then 50 training steps per precision policy whose losses must stay
// within a per-policy band of the CPU's. Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cuda_test_util.h"
#include "core/rng.h"
#include "data/corpus.h"
#include "model/gpt.h"
#include "optim/adamw.h"
#include "precision/policy.h"

namespace mpt {
namespace {

// Multiples of 16 in every matmul dimension (cuBLASLt's fp8 requirement), otherwise small.
ModelConfig tiny() {
  ModelConfig m;
  m.n_layer = 2;
  m.n_head = 4;
  m.n_embd = 64;
  m.vocab_size = 256;
  m.max_seq_len = 32;
  return m;
}

constexpr int kB = 4, kT = 32;

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

TEST(CudaTrain, ForwardBackwardMatchesTheCpuInFp32) {
  MPT_REQUIRE_GPU();
  auto gpu = make_backend("cuda", 1);
  CpuBackend cpu(1);
  const PrecisionPolicy policy = PrecisionPolicy::preset("fp32");
  Gpt mc(tiny(), cpu, policy), mg(tiny(), *gpu, policy);
  mc.init_weights(7, 0.02);
  mg.init_weights(7, 0.02);
  const Batches b = corpus_batches(1);
  mc.zero_grad();
  mg.zero_grad();
  const float lc = mc.forward(b.in[0].data(), b.tg[0].data(), kB, kT, 1.0f / (kB * kT));
  const float lg = mg.forward(b.in[0].data(), b.tg[0].data(), kB, kT, 1.0f / (kB * kT));
  ASSERT_TRUE(std::isfinite(lg));
  EXPECT_NEAR(lg, lc, 1e-4 * std::fabs(lc));
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
    // Summation order differs (cuBLAS vs OpenBLAS, block reductions): fp32 relative error of the
    // whole tensor far below 1e-4.
    EXPECT_LT(std::sqrt(num / std::max(den, 1e-30)), 1e-4) << mc.params()[i].name;
  }
}

// 50 steps from the same weights and batches on both backends; the GPU's per-step losses stay
// within a band of the CPU's that grows with the policy's rounding: the two differ only in
// summation order, which low-precision roundings amplify.
class CudaTrainPolicy : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaTrainPolicy, FiftyStepsTrackTheCpu) {
  MPT_REQUIRE_GPU();
  const std::string name = GetParam();
  const double band = name == "fp32" ? 1e-4 : name == "tf32" ? 5e-3 : name == "fp8" ? 3e-2 : 1e-2;
  auto gpu = make_backend("cuda", 1);
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
                         [](const auto& info) {
                           std::string s = info.param;
                           for (char& c : s) c = c == '-' ? '_' : c;
                           return s;
                         });

}  // namespace
}  // namespace mpt
