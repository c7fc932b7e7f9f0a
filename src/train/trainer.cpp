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
void check_memory(const Config& cfg) {
  const auto est = Gpt::estimate_memory(cfg.model, cfg.training.micro_batch, cfg.training.seq_len);
  const double total = est.state_bytes + est.activation_bytes;
  const double machine = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  if (machine > 0 && total > machine) {
    char msg[512];
    std::snprintf(msg, sizeof msg,
                  "this run needs about %.1f GiB (%.1f GiB of parameters, gradients and AdamW "
                  "state; %.1f GiB of activations) but the machine has %.1f GiB; reduce "
                  "model.n_layer, model.n_embd, model.vocab_size, model.max_seq_len, "
                  "training.micro_batch or training.seq_len",
                  total / (1 << 30), est.state_bytes / (1 << 30),
                  est.activation_bytes / (1 << 30), machine / (1 << 30));
    throw InputError(msg);
  }
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
  check_memory(cfg);
  std::unique_ptr<Backend> backend = make_backend(cfg.backend, cfg.threads);
  Gpt model(cfg.model, *backend);
  model.init_weights(cfg.model.init_seed, cfg.model.init_std);
  AdamW optimizer(cfg.optimizer, model, *backend);
  LrSchedule schedule(cfg.schedule, cfg.optimizer.lr, steps);
  data::BatchLoader train_loader(train_data, B, T, cfg.training.seed, /*shuffle=*/true);
  data::BatchLoader val_loader(val_data, B, T, cfg.training.seed, /*shuffle=*/false);

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

  TrainResult result;
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
