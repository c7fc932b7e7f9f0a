#include "train/trainer.h"

#include <spdlog/spdlog.h>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cmath>
#include <filesystem>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "io/metrics.h"
#include "io/run_dir.h"
#include "model/gpt.h"
#include "optim/adamw.h"
#include "optim/schedule.h"

namespace mpt {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const long total = static_cast<long>(s + 0.5);
  char buf[32];
  if (total >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", total / 3600, (total / 60) % 60);
  else
    std::snprintf(buf, sizeof buf, "%ldm%02lds", total / 60, total % 60);
  return buf;
}

// Mean loss over `batches` micro-batches of the validation split, from its beginning each time
// so that every evaluation sees the same tokens.
double evaluate(Gpt& model, data::BatchLoader& loader, int batches, int B, int T) {
  std::vector<int32_t> inputs(static_cast<size_t>(B) * T), targets(inputs.size());
  loader.reset();
  double sum = 0.0;
  for (int i = 0; i < batches; ++i) {
    loader.next(inputs.data(), targets.data());
    sum += model.forward(inputs.data(), targets.data(), B, T, 0.0f);
  }
  return sum / batches;
}

// Refuses, naming the keys, a run whose predicted memory exceeds this machine's, before
// allocating any of it (an allocation that large would fail midway or swap the machine to death).
void check_memory(const MemoryLedger& plan) {
  const double machine = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  if (machine > 0 && plan.total() > machine) {
    char msg[512];
    std::snprintf(msg, sizeof msg,
                  "this run needs about %.1f GiB (%.1f GiB of activations) but the machine has "
                  "%.1f GiB; reduce model.n_layer, model.n_embd, model.vocab_size, "
                  "model.max_seq_len, training.micro_batch or training.seq_len",
                  plan.total() / (1 << 30), plan.activations / (1 << 30), machine / (1 << 30));
    throw InputError(msg);
  }
}

void print_dry_run(const Config& cfg, const std::string& run_dir, const Backend& backend,
                   const data::TokenDataset& train, const data::TokenDataset& val,
                   const MemoryLedger& plan) {
  const ModelConfig& m = cfg.model;
  const int T = cfg.training.seq_len;
  std::printf("config OK: %s\n", cfg.source_path.empty() ? "(built-in default)" : cfg.source_path.c_str());
  std::printf("run directory   %s (not created: --dry-run)\n", run_dir.c_str());
  std::printf("model           %d layers, %d heads, width %d, vocab %d (padded %d), context %d\n",
              m.n_layer, m.n_head, m.n_embd, m.vocab_size, m.padded_vocab(), m.max_seq_len);
  std::printf("parameters      %.0f; %.3g training FLOPs/token\n", Gpt::param_count(m),
              Gpt::flops_per_token(m, T));
  std::printf("batch           %d x %d tokens x %d accumulation = %lld tokens/step, %lld steps\n",
              cfg.training.micro_batch, T, cfg.training.grad_accum,
              static_cast<long long>(int64_t(cfg.training.micro_batch) * T * cfg.training.grad_accum),
              static_cast<long long>(cfg.training.steps));
  std::printf("train data      %s\n", train.describe().c_str());
  std::printf("val data        %s\n", val.describe().c_str());
  std::printf("backend         %s (%s)\n", backend.name().c_str(),
              backend.device_description().c_str());
  std::printf("precision       %s\n", cfg.precision.c_str());
  std::printf("memory (predicted, %s):\n%s", backend.name().c_str(), plan.to_text().c_str());
  std::fflush(stdout);
}

}  // namespace

TrainResult train(const Config& cfg, const TrainOptions& opt) {
  const int B = cfg.training.micro_batch, T = cfg.training.seq_len;
  const int accum = cfg.training.grad_accum;
  const int64_t steps = cfg.training.steps;
  const int64_t tokens_per_step = static_cast<int64_t>(B) * T * accum;

  // ---- validate and build everything before the run directory exists
  const RunDirPlan plan = plan_run_dir(cfg, opt.run_dir);
  const int64_t min_tokens = static_cast<int64_t>(B) * T + 1;  // one micro-batch of windows
  data::TokenDataset train_data =
      data::TokenDataset::open(cfg.data.train, data::Split::train, cfg.model.vocab_size, min_tokens);
  data::TokenDataset val_data =
      data::TokenDataset::open(cfg.data.val, data::Split::val, cfg.model.vocab_size, min_tokens);
  data::BatchLoader train_loader(train_data, B, T, cfg.training.seed, /*shuffle=*/true);
  data::BatchLoader val_loader(val_data, B, T, cfg.training.seed, /*shuffle=*/false);
  LrSchedule schedule(cfg.schedule, cfg.optimizer.lr, steps);
  const MemoryLedger memory = Gpt::plan_memory(cfg.model, B, T);
  check_memory(memory);
  std::unique_ptr<Backend> backend = make_backend(cfg.backend, cfg.threads);
  TrainResult result;
  result.run_dir = plan.path;
  if (opt.dry_run) {
    print_dry_run(cfg, plan.path, *backend, train_data, val_data, memory);
    return result;
  }
  Gpt model(cfg.model, *backend);
  model.init_weights(cfg.model.init_seed, cfg.model.init_std);
  AdamW optimizer(cfg.optimizer, model, *backend);

  // ---- the run directory, then the start record
  const std::string run_dir = create_run_dir(plan, cfg);
  MetricsSink metrics((std::filesystem::path(run_dir) / "metrics.jsonl").string());
  metrics.write({{"event", "start"},
                 {"time", utc_timestamp()},
                 {"version", MPT_VERSION},
                 {"run_dir", run_dir},
                 {"backend", backend->name()},
                 {"device", backend->device_description()},
                 {"threads", backend->threads()},
                 {"precision", cfg.precision},
                 {"n_params", model.num_params()},
                 {"padded_vocab", model.padded_vocab()},
                 {"flops_per_token", model.flops_per_token(T)},
                 {"tokens_per_step", tokens_per_step},
                 {"memory", memory.to_json()},
                 {"train_data", train_data.describe()},
                 {"val_data", val_data.describe()},
                 {"config", config_to_json(cfg)}});
  spdlog::info("run directory {}", run_dir);
  spdlog::info("model: {} layers, {} heads, width {}, {} parameters; backend {} ({})",
               cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, model.num_params(),
               backend->name(), backend->device_description());
  spdlog::info("train data: {}; validation: {}", train_data.describe(), val_data.describe());

  const int eval_batches = cfg.training.eval_batches;
  auto run_eval = [&](int64_t step) {
    const double val = evaluate(model, val_loader, eval_batches, B, T);
    metrics.write({{"event", "eval"}, {"step", step}, {"val_loss", val}});
    spdlog::info("eval  step {:>6} | val_loss {:.4f}", step, val);
    return val;
  };

  result.run_dir = run_dir;
  result.final_val_loss = run_eval(0);

  std::vector<int32_t> inputs(static_cast<size_t>(B) * T), targets(inputs.size());
  const float dloss = 1.0f / static_cast<float>(static_cast<int64_t>(B) * T * accum);
  const auto t_start = Clock::now();
  // Step timings exclude evaluation and logging: they measure training alone.
  double interval_s = 0.0;
  int64_t interval_steps = 0;
  double last_loss = 0.0;

  for (int64_t step = 1; step <= steps; ++step) {
    const auto t_step = Clock::now();
    const double lr = schedule.at(step - 1);
    model.zero_grad();
    double loss = 0.0;
    for (int micro = 0; micro < accum; ++micro) {
      train_loader.next(inputs.data(), targets.data());
      loss += model.forward(inputs.data(), targets.data(), B, T, dloss);
      model.backward();
    }
    loss /= accum;
    const double norm = optimizer.grad_norm();
    if (!std::isfinite(loss) || !std::isfinite(norm)) {
      metrics.write({{"event", "end"}, {"time", utc_timestamp()}, {"status", "failed"},
                     {"step", step}, {"reason", "non-finite loss or gradient"}});
      throw RuntimeError("training diverged at step " + std::to_string(step) + ": loss " +
                         std::to_string(loss) + ", gradient norm " + std::to_string(norm) +
                         " (lower optimizer.lr or raise schedule.warmup_steps)");
    }
    optimizer.step(lr, optimizer.clip_scale(norm));
    last_loss = loss;
    interval_s += seconds_since(t_step);
    ++interval_steps;

    if (step == 1 || step % cfg.training.log_every == 0 || step == steps) {
      const double step_ms = 1000.0 * interval_s / interval_steps;
      const double tok_s = static_cast<double>(tokens_per_step * interval_steps) / interval_s;
      const double eta = (steps - step) * step_ms / 1000.0;
      metrics.write({{"step", step},
                     {"tokens", step * tokens_per_step},
                     {"loss", loss},
                     {"lr", lr},
                     {"grad_norm", norm},
                     {"step_ms", step_ms},
                     {"tokens_per_s", tok_s},
                     {"elapsed_s", seconds_since(t_start)}});
      spdlog::info("step {:>6}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | {:.0f} tok/s | ETA {}",
                   step, steps, loss, lr, norm, tok_s, format_duration(eta));
      interval_s = 0.0;
      interval_steps = 0;
    }
    const bool eval_due = cfg.training.eval_every > 0 && step % cfg.training.eval_every == 0;
    if (eval_due || step == steps) {
      result.final_val_loss = run_eval(step);
    }
  }

  result.steps = steps;
  result.final_loss = last_loss;
  metrics.write({{"event", "end"},
                 {"time", utc_timestamp()},
                 {"status", "completed"},
                 {"step", steps},
                 {"tokens", steps * tokens_per_step},
                 {"loss", last_loss},
                 {"val_loss", result.final_val_loss},
                 {"elapsed_s", seconds_since(t_start)}});
  spdlog::info("done: {} steps, final loss {:.4f}, val_loss {:.4f}, {:.1f} s", steps, last_loss,
               result.final_val_loss, seconds_since(t_start));
  return result;
}

}  // namespace mpt
