// CPU training throughput on the reference shape: GPT with 4 layers, width 256, 4 heads,
// vocab 256, sequence 64, micro-batch 4, fp32. Times whole optimizer steps (forward, backward,
// clipping, AdamW) after warm-up and prints tokens/s, the median of several repeats, for:
//   mpt          the CPU backend as shipped (OpenBLAS sgemm, OpenMP loops), N threads
//   mpt-1thread  the same on one thread
//   loop-matmul  baseline: the same trainer with matmuls as plain OpenMP loops, the way a plain
//                C reference trainer (llm.c's train_gpt2.c) computes them, N threads
//   mpt tf32     the tf32 policy (matmul operands rounded to tf32 before sgemm), N threads
// and the ratios against the baseline, all measured in the same run.
//
//   build/bench/bench_cpu_train [--threads N] [--steps N] [--repeats N] [--policy NAME
//                               [--recompute 1]]
//
// --policy NAME measures only fp32 (before and after) and that policy: a short run for profiling
// one policy (perf record) or for repeating one ratio. With --recompute 1, that policy (before
// and after) against itself with training.recompute gelu+layernorm.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "bench_common.h"
#include "core/rng.h"
#include "data/corpus.h"
#include "model/gpt.h"
#include "optim/adamw.h"
#include "precision/policy.h"

using namespace mpt;

namespace {

// Baseline: matmuls as plain loops, parallel over rows, in the style of a plain C trainer.
class LoopMatmulBackend : public CpuBackend {
 public:
  using CpuBackend::CpuBackend;
  void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias,
                      const MatmulSpec&) override {
    const int64_t C = inp.dim(-1), N = inp.numel() / C, OC = weight.dim(0);
    const float *x = inp.as<float>(), *w = weight.as<float>();
    const float* b = bias.defined() ? bias.as<float>() : nullptr;
    float* o = out.as<float>();
#pragma omp parallel for schedule(static) num_threads(threads())
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < OC; ++k) {
        float s = b ? b[k] : 0.0f;
        for (int64_t c = 0; c < C; ++c) s += x[n * C + c] * w[k * C + c];
        o[n * OC + k] = s;
      }
  }
  void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                       Tensor weight, const MatmulSpec&) override {
    const int64_t C = inp.dim(-1), N = inp.numel() / C, OC = weight.dim(0);
    const float *x = inp.as<float>(), *w = weight.as<float>(), *d = dout.as<float>();
    float* dx = dinp.as<float>();
    float* dw = dweight.as<float>();
    float* db = dbias.defined() ? dbias.as<float>() : nullptr;
#pragma omp parallel for schedule(static) num_threads(threads())
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) dx[n * C + c] = 0.0f;
      for (int64_t k = 0; k < OC; ++k)
        for (int64_t c = 0; c < C; ++c) dx[n * C + c] += d[n * OC + k] * w[k * C + c];
    }
#pragma omp parallel for schedule(static) num_threads(threads())
    for (int64_t k = 0; k < OC; ++k)
      for (int64_t n = 0; n < N; ++n) {
        const float g = d[n * OC + k];
        if (db) db[k] += g;
        for (int64_t c = 0; c < C; ++c) dw[k * C + c] += g * x[n * C + c];
      }
  }
};

struct BenchShape {
  int layers, width, heads, B, T;
};

// Median tokens/s of `repeats` timings of `steps` optimizer steps on `be`.
double measure(Backend& be, const PrecisionPolicy& policy, const BenchShape& sh, int steps,
               int repeats, double* flops_per_token, int64_t* n_params,
               Recompute recompute = Recompute::none) {
  ModelConfig m;
  m.n_layer = sh.layers;
  m.n_embd = sh.width;
  m.n_head = sh.heads;
  m.vocab_size = 256;
  m.max_seq_len = sh.T;
  Gpt model(m, be, policy, recompute);
  model.init_weights(1, 0.02);
  OptimizerConfig oc;
  AdamW opt(oc, model, be);
  const int B = sh.B, T = sh.T;
  // Real text from the built-in corpus, consecutive windows.
  const auto& corpus = data::builtin_corpus_tokens(data::Split::train);
  std::vector<int32_t> in(B * T), tg(B * T);
  size_t pos = 0;
  auto one_step = [&] {
    if (pos + B * T + 1 > corpus.size()) pos = 0;
    for (int i = 0; i < B * T; ++i) {
      in[i] = corpus[pos + i];
      tg[i] = corpus[pos + i + 1];
    }
    pos += B * T;
    model.zero_grad();
    model.forward(in.data(), tg.data(), B, T, 1.0f / (B * T));
    model.backward();
    opt.step(1e-3, opt.clip_scale(opt.grad_norm()));
  };
  for (int i = 0; i < 3; ++i) one_step();  // warm-up: first-touch pages, thread pools
  std::vector<double> rates;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) one_step();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rates.push_back(double(B) * T * steps / dt);
  }
  std::sort(rates.begin(), rates.end());
  *flops_per_token = model.flops_per_token(T);
  *n_params = model.num_params();
  return rates[rates.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, steps = 10, repeats = 5, layers = 4, width = 256, heads = 4, B = 4, T = 64;
  // --policy P: measure just P against fp32; --policy P --recompute 1: P with training.recompute
  // gelu+layernorm against P itself (measured before and after, as fp32 is).
  std::string only;
  bool recompute_only = false;
  const char* const usage =
      "usage: bench_cpu_train [--threads N] [--steps N] [--repeats N] [--layers N] [--width N] "
      "[--batch N] [--policy P [--recompute 1]]\n";
  const int rc = bench::for_each_option(argc, argv, "bench_cpu_train", usage,
                                        [&](const std::string& k, const std::string& v) {
    if (k == "--policy") {
      try {
        (void)PrecisionPolicy::preset(v);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_cpu_train: --policy: %s\n", e.what());
        return 2;
      }
      only = v;
      return -1;
    }
    const long lo = k == "--recompute" ? 0 : 1;
    const std::optional<long> x = bench::whole_number(v, lo, 1000000);
    if (!x) {
      std::fprintf(stderr, "bench_cpu_train: %s %s: expected a whole number from %ld to 1000000\n%s",
                   k.c_str(), v.c_str(), lo, usage);
      return 2;
    }
    const int n = static_cast<int>(*x);
    if (k == "--threads") threads = n;
    else if (k == "--steps") steps = n;
    else if (k == "--repeats") repeats = n;
    else if (k == "--layers") layers = n;
    else if (k == "--width") width = n;
    else if (k == "--batch") B = n;
    else if (k == "--recompute") recompute_only = n != 0;
    else {
      std::fprintf(stderr, "bench_cpu_train: unknown option %s\n%s", k.c_str(), usage);
      return 2;
    }
    return -1;
  });
  if (rc >= 0) return rc;
  if (width % heads != 0) {
    std::fprintf(stderr, "bench_cpu_train: --width %d: expected a multiple of the %d heads\n",
                 width, heads);
    return 2;
  }
  if (recompute_only && only.empty()) {
    std::fprintf(stderr, "bench_cpu_train: --recompute 1 needs --policy P\n");
    return 2;
  }
  const BenchShape sh{layers, width, heads, B, T};
  double fpt = 0;
  int64_t n_params = 0;
  CpuBackend mpt_be(threads), one_be(1);
  LoopMatmulBackend base_be(threads);
  const PrecisionPolicy fp32 = PrecisionPolicy::preset("fp32");
  if (!only.empty() && recompute_only) {
    const PrecisionPolicy p = PrecisionPolicy::preset(only);  // throws on an unknown name
    const double before = measure(mpt_be, p, sh, steps, repeats, &fpt, &n_params);
    const double r = measure(mpt_be, p, sh, steps, repeats, &fpt, &n_params,
                             Recompute::gelu_layernorm);
    const double after = measure(mpt_be, p, sh, steps, repeats, &fpt, &n_params);
    std::printf("%s %.0f tokens/s (before), %.0f (after); with training.recompute "
                "gelu+layernorm %.0f tokens/s: %.3fx the step time\n",
                only.c_str(), before, after, r, 0.5 * (before + after) / r);
    return 0;
  }
  if (!only.empty()) {
    const PrecisionPolicy p = PrecisionPolicy::preset(only);  // throws on an unknown name
    const double before = measure(mpt_be, fp32, sh, steps, repeats, &fpt, &n_params);
    const double r = measure(mpt_be, p, sh, steps, repeats, &fpt, &n_params);
    const double after = measure(mpt_be, fp32, sh, steps, repeats, &fpt, &n_params);
    std::printf("fp32 %.0f tokens/s (before), %.0f (after); %s %.0f tokens/s: %.2fx fp32's step "
                "time\n", before, after, only.c_str(), r, 0.5 * (before + after) / r);
    return 0;
  }
  const double base = measure(base_be, fp32, sh, steps, repeats, &fpt, &n_params);
  const double rate = measure(mpt_be, fp32, sh, steps, repeats, &fpt, &n_params);
  const double rate1 = measure(one_be, fp32, sh, steps, repeats, &fpt, &n_params);
  // Every precision policy against fp32, in the same run. fp32 is measured before and after
  // the policies and the two averaged, so that a drift of the machine's speed during the run
  // shows up (as a difference between the two) instead of biasing the ratios.
  std::vector<std::pair<std::string, double>> policy_rates;
  for (const auto& name : PrecisionPolicy::preset_names()) {
    if (name == "fp32") continue;
    policy_rates.push_back(
        {name, measure(mpt_be, PrecisionPolicy::preset(name), sh, steps, repeats, &fpt, &n_params)});
  }
  // What the numerics statistics cost: bf16 with the cast counting switched off.
  mpt_be.set_cast_counting(false);
  const double rate_bf16_nocount =
      measure(mpt_be, PrecisionPolicy::preset("bf16"), sh, steps, repeats, &fpt, &n_params);
  mpt_be.set_cast_counting(true);
  // What training.recompute costs: bf16 recomputing its GELU and LayerNorm outputs.
  const double rate_bf16_recompute =
      measure(mpt_be, PrecisionPolicy::preset("bf16"), sh, steps, repeats, &fpt, &n_params,
              Recompute::gelu_layernorm);
  const double rate_after = measure(mpt_be, fp32, sh, steps, repeats, &fpt, &n_params);
  const double fp32_rate = 0.5 * (rate + rate_after);
  std::printf("shape: layers=%d width=%d heads=%d vocab=256 seq=%d batch=%d; "
              "%lld params, %.3g FLOPs/token\n",
              layers, width, heads, T, B, static_cast<long long>(n_params), fpt);
  std::printf("median of %d repeats x %d steps each\n", repeats, steps);
  std::printf("%-22s %8s %10s %10s %8s\n", "variant", "threads", "tokens/s", "GFLOP/s",
              "vs loop");
  auto row = [&](const std::string& name, int th, double r) {
    std::printf("%-22s %8d %10.0f %10.1f %7.2fx\n", name.c_str(), th, r, r * fpt / 1e9, r / base);
  };
  row("loop-matmul fp32", base_be.threads(), base);
  row("mpt fp32", mpt_be.threads(), rate);
  row("mpt fp32 (again, last)", mpt_be.threads(), rate_after);
  row("mpt fp32 1 thread", 1, rate1);
  for (const auto& [name, r] : policy_rates) row("mpt " + name, mpt_be.threads(), r);
  row("mpt bf16, no counting", mpt_be.threads(), rate_bf16_nocount);
  row("mpt bf16, recompute", mpt_be.threads(), rate_bf16_recompute);
  std::printf("\nstep time relative to fp32 (mean of the two fp32 measurements; they differ by "
              "%.1f%%):\n", 100.0 * std::fabs(rate - rate_after) / fp32_rate);
  for (const auto& [name, r] : policy_rates)
    std::printf("  %-10s %.2fx\n", name.c_str(), fp32_rate / r);
  double bf16_rate = 0;
  for (const auto& [name, r] : policy_rates)
    if (name == "bf16") bf16_rate = r;
  std::printf("cast statistics: bf16 step time %.3fx without them\n",
              rate_bf16_nocount / bf16_rate);
  std::printf("training.recompute gelu+layernorm: bf16 step time %.3fx\n",
              bf16_rate / rate_bf16_recompute);
  return 0;
}
