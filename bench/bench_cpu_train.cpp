// CPU training throughput on the reference shape: GPT with 4 layers, width 256, 4 heads,
// vocab 256, sequence 64, micro-batch 4, fp32. Times whole optimizer steps (forward, backward,
// clipping, AdamW), after warm-up, and prints tokens/s with the median of several repeats.
//
//   build/bench/bench_cpu_train [--threads N] [--steps N] [--repeats N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/rng.h"
#include "data/corpus.h"
#include "model/gpt.h"
#include "optim/adamw.h"

using namespace mpt;

int main(int argc, char** argv) {
  int threads = 2, steps = 20, repeats = 5, layers = 4, width = 256, heads = 4, B = 4, T = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    const char* k = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (!std::strcmp(k, "--threads")) threads = v;
    else if (!std::strcmp(k, "--steps")) steps = v;
    else if (!std::strcmp(k, "--repeats")) repeats = v;
    else if (!std::strcmp(k, "--layers")) layers = v;
    else if (!std::strcmp(k, "--width")) width = v;
    else if (!std::strcmp(k, "--batch")) B = v;
    else {
      std::fprintf(stderr, "unknown option %s\n", k);
      return 2;
    }
  }
  ModelConfig m;
  m.n_layer = layers;
  m.n_embd = width;
  m.n_head = heads;
  m.vocab_size = 256;
  m.max_seq_len = T;
  CpuBackend be(threads);
  Gpt model(m, be);
  model.init_weights(1, 0.02);
  OptimizerConfig oc;
  AdamW opt(oc, model, be);

  // Real text from the built-in corpus, consecutive windows.
  const auto& corpus = data::builtin_corpus_tokens(data::Split::train);
  std::vector<int32_t> in(B * T), tg(B * T);
  size_t pos = 0;
  auto next_batch = [&] {
    if (pos + B * T + 1 > corpus.size()) pos = 0;
    for (int i = 0; i < B * T; ++i) {
      in[i] = corpus[pos + i];
      tg[i] = corpus[pos + i + 1];
    }
    pos += B * T;
  };
  float loss = 0;
  auto one_step = [&] {
    next_batch();
    model.zero_grad();
    loss = model.forward(in.data(), tg.data(), B, T, 1.0f / (B * T));
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
  std::printf("shape: layers=%d width=%d heads=%d vocab=256 seq=%d batch=%d fp32, threads=%d\n",
              layers, width, heads, T, B, be.threads());
  std::printf("params: %lld, flops/token: %.3g\n", static_cast<long long>(model.num_params()),
              model.flops_per_token(T));
  std::printf("tokens/s: median %.0f (min %.0f, max %.0f) over %d repeats of %d steps; "
              "last loss %.3f\n",
              rates[rates.size() / 2], rates.front(), rates.back(), repeats, steps, loss);
  std::printf("achieved: %.1f GFLOP/s\n", rates[rates.size() / 2] * model.flops_per_token(T) / 1e9);
  return 0;
}
