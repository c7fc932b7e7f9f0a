#include "train/trainer.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/attention_plan.h"
#include "backend/cuda/matmul_plan.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/text.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "dist/communicator.h"
#include "dist/launch.h"
#if MPT_HAVE_NCCL
#include "dist/nccl_communicator.h"
#endif
#include "io/checkpoint.h"
#include "io/files.h"
#include "io/metrics.h"
#include "io/run_dir.h"
#include "model/cuda_workspace.h"
#include "model/gpt.h"
#include "optim/adamw.h"
#include "optim/schedule.h"
#include "precision/loss_scaler.h"
#include "precision/policy.h"
#include "train/checkpoint_tensors.h"
#include "train/data_parallel.h"
#include "train/device_metrics.h"
#include "train/numerics.h"
#include "train/signals.h"

namespace fs = std::filesystem;

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
// so that every evaluation sees the same tokens; nothing when `stop` (if given), asked before
// every `stop_every`-th batch, says so (a stop signal: an evaluation may be long).
std::optional<double> evaluate(Gpt& model, data::BatchLoader& loader, int batches, int B, int T,
                               const std::function<bool()>& stop = nullptr, int stop_every = 1) {
  std::vector<int32_t> inputs(static_cast<size_t>(B) * T), targets(inputs.size());
  loader.reset();
  double sum = 0.0;
  for (int i = 0; i < batches; ++i) {
    if (stop && i % stop_every == 0 && stop()) return std::nullopt;
    loader.next(inputs.data(), targets.data());
    sum += model.forward(inputs.data(), targets.data(), B, T, 0.0f);
  }
  return sum / batches;
}

// Why a run whose predicted memory exceeds what its backend has (the GPU's, or the machine's
// within its cgroup limit: memory_shortfall, host_memory) cannot start, naming the keys; "" when
// it fits. Checked before any of it is allocated (an allocation that large would fail midway or
// swap the machine to death).
std::string memory_refusal(const MemoryLedger& plan, const Backend& backend, int ranks_on_node) {
  return memory_shortfall(plan, backend.memory_usage(), backend.gpu_info(), host_memory(),
                          ranks_on_node);
}

// Paths reach JSON records (the start record, state.json), which hold UTF-8 text only: refused
// with InputError, naming `what`, before anything is created.
void require_utf8(const char* what, const std::string& path) {
  if (!valid_utf8(path))
    throw InputError(std::string(what) + " " + path +
                     ": not valid UTF-8 text (mpt's records are JSON, which holds UTF-8 only)");
}

// One line: what each role is stored in, for the log and --dry-run.
std::string describe_policy(const PrecisionPolicy& p) {
  std::string s = std::string("weights ") + dtype_name(p.param) +
                  (p.master_weights ? " (fp32 master)" : "") +
                  (p.stochastic_rounding ? " (stochastic rounding)" : "") + ", activations " +
                  dtype_name(p.activation) + ", gradients " + dtype_name(p.grad) + ", matmuls " +
                  matmul_precision_name(p.matmul) + ", loss scaling " + p.loss_scale.mode;
  if (p.matmul == MatmulPrecision::fp8)
    s += std::string(", fp8 ") + (p.fp8.hybrid ? "hybrid" : "e4m3") + " " + p.fp8.scaling.recipe +
         " scaling";
  return s;
}

// The stream of stochastic rounding's random bits, derived from the data seed.
constexpr uint64_t kStochasticRoundingStream = 0x5352;  // "SR"

void print_dry_run(const Config& cfg, int accum, int world, const std::string& run_dir,
                   const Backend& backend,
                   const data::TokenDataset& train, const data::TokenDataset& val,
                   const MemoryLedger& plan,
                   const PrecisionPolicy& policy, const std::vector<std::string>& warnings) {
  const ModelConfig& m = cfg.model;
  const int T = cfg.training.seq_len;
  std::printf("config OK: %s\n", cfg.source_path.empty() ? "(built-in default)" : cfg.source_path.c_str());
  std::printf("run directory   %s (not created: --dry-run)\n", run_dir.c_str());
  std::printf("model           %d layers, %d heads, width %d, vocab %d (padded %d), context %d\n",
              m.n_layer, m.n_head, m.n_embd, m.vocab_size, m.padded_vocab(), m.max_seq_len);
  std::printf("parameters      %.0f; %.3g training FLOPs/token\n", Gpt::param_count(m),
              Gpt::flops_per_token(m, T));
  std::printf("batch           %d x %d tokens x %d accumulation x %d process(es) = %lld "
              "tokens/step, %lld steps\n",
              cfg.training.micro_batch, T, accum, world,
              static_cast<long long>(int64_t(cfg.training.micro_batch) * T * accum * world),
              static_cast<long long>(cfg.training.steps));
  std::printf("train data      %s\n", train.describe().c_str());
  std::printf("val data        %s\n", val.describe().c_str());
  std::printf("backend         %s (%s)\n", backend.name().c_str(),
              backend.device_description().c_str());
  std::printf("precision       %s: %s\n", cfg.precision.c_str(), describe_policy(policy).c_str());
  for (const auto& w : warnings) std::printf("  warning: %s\n", w.c_str());
  std::string recompute;
  if (cfg.training.recompute != "none") {
    const int n = Gpt::recomputing_blocks(m, policy, recompute_from_name(cfg.training.recompute));
    recompute = ", training.recompute " + cfg.training.recompute + " in " +
                (n == 0 ? std::string("no block: all are in fp8")
                        : std::to_string(n) + " of " + std::to_string(m.n_layer) + " blocks");
  }
  std::printf("memory (predicted, %s%s):\n%s", backend.name().c_str(), recompute.c_str(),
              plan.to_text().c_str());
  std::fflush(stdout);
}

// Keys a resumed run may change; every other key must equal the checkpoint's
// (docs/checkpoints.md says why each of these is safe).
const std::set<std::string>& resume_safe_keys() {
  static const std::set<std::string> keys = {
      "training.steps",   "training.log_every",    "training.eval_every",
      "training.eval_batches", "checkpoint.every", "checkpoint.keep_last",
      "checkpoint.keep_every", "output.dir",       "output.name",
      "threads",          "backend",               "distributed.zero_stage",
      "training.recompute"};
  return keys;
}

void check_resume_compatible(const nlohmann::json& saved, const nlohmann::json& now,
                             const std::string& ckpt_dir) {
  std::map<std::string, nlohmann::json> a = flatten_config(saved), b = flatten_config(now);
  // A key the checkpoint lacks was added by a later version of mpt: the checkpoint's run had
  // its default. Keys only the checkpoint has differ from anything.
  const Config default_config;
  const std::map<std::string, nlohmann::json> defaults =
      flatten_config(config_to_json(default_config));
  for (const auto& [k, v] : b)
    if (!a.count(k)) a.emplace(k, defaults.count(k) ? defaults.at(k) : nullptr);
  for (const auto& [k, v] : a) b.emplace(k, nullptr);
  std::string diffs;
  for (const auto& [key, was] : a)
    if (was != b[key] && !resume_safe_keys().count(key))
      diffs += "\n  " + key + ": checkpoint has " + was.dump() + ", config has " + b[key].dump();
  if (!diffs.empty())
    throw InputError("cannot resume from " + ckpt_dir +
                     ": the config changes keys that must stay as they were:" + diffs +
                     "\n(keys that may change on resume: " +
                     join({resume_safe_keys().begin(), resume_safe_keys().end()}, ", ") + ")");
}

// `path` (a checkpoint of the run) relative to `run_dir`, as the records give it; either may be
// relative to the working directory or absolute.
std::string relative_to_run(const std::string& path, const std::string& run_dir) {
  auto normal = [](const std::string& p) {
    fs::path n = fs::absolute(p).lexically_normal();
    return n.filename().empty() ? n.parent_path() : n;  // "dir/" is "dir"
  };
  return normal(path).lexically_relative(normal(run_dir)).string();
}

// Where a resumed run continues, and from which checkpoint.
struct ResumePoint {
  std::string run_dir;
  bool same_run;  // the checkpoint is one of run_dir's own (else run_dir is a new run: a fork)
  Checkpoint ckpt;
};

ResumePoint locate_resume(const Config& cfg, const TrainOptions& opt) {
  if (!opt.resume_from.empty()) {
    if (fs::is_regular_file(opt.resume_from))
      throw InputError("--resume " + opt.resume_from +
                       ": a file, not a checkpoint directory (put --resume after the config file, "
                       "or give it a path to runs/NAME/checkpoints/step_NNNNNNNN)");
    Checkpoint c = load_checkpoint(opt.resume_from);
    fs::path p = fs::absolute(opt.resume_from).lexically_normal();
    if (p.filename().empty()) p = p.parent_path();
    // A checkpoint at RUN/checkpoints/step_N belongs to RUN.
    const bool in_run = p.parent_path().filename() == "checkpoints";
    const fs::path own_run = p.parent_path().parent_path();
    std::error_code ec;
    const bool same = in_run && (opt.run_dir.empty() || (fs::exists(opt.run_dir, ec) &&
                                                         fs::equivalent(own_run, opt.run_dir, ec)));
    int64_t step = 0;
    if (same && !parse_step_name(p.filename().string(), &step))
      throw InputError("--resume " + opt.resume_from +
                       ": continuing a run in place takes one of its committed checkpoints, "
                       "named step_NNNNNNNN; to start another run from this one, give --run-dir "
                       "naming a new directory");
    if (opt.run_dir.empty()) {
      if (!in_run)
        throw InputError("--resume " + opt.resume_from +
                         ": not inside a run's checkpoints/ directory; give --run-dir for the "
                         "run to continue in");
      return {own_run.string(), true, std::move(c)};
    }
    return {opt.run_dir, same, std::move(c)};
  }
  std::string run_dir = opt.run_dir;
  if (run_dir.empty()) {
    if (cfg.output.name.empty())
      throw InputError("--resume needs to know the run: give --run-dir, output.name, or the "
                       "checkpoint's path (--resume runs/NAME/checkpoints/step_NNNNNNNN)");
    run_dir = (fs::path(cfg.output.dir) / cfg.output.name).string();
  }
  return {run_dir, true, CheckpointManager::load_latest(run_dir)};
}

// What the training data is, for a checkpoint: resuming on other data would silently change
// the batch order, so the sources and their sizes are saved and compared.
nlohmann::json data_identity(const data::TokenDataset& d) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& s : d.sources()) out.push_back({{"source", s.name}, {"tokens", s.size}});
  return out;
}

// `numerics`: the monitor that continues the checkpoint's interval counts (rank 0's; null on
// the other ranks).
void restore(Backend& be, Gpt& model, AdamW& optimizer, LossScaler& scaler,
             NumericsMonitor* numerics, const Checkpoint& c) {
  restore_tensors(be, model, optimizer, c);
  optimizer.set_steps_taken(c.state.optimizer_step);
  // The loss scale and fp8 amax histories continue where they were (checkpoints of runs that
  // keep neither have none).
  const nlohmann::json& num = c.state.numerics;
  if (num.is_object() && num.contains("loss_scaler"))
    scaler.load_state(num.at("loss_scaler"));
  else if (model.policy().uses_loss_scaling())  // every checkpoint of ours writes one
    throw InputError(c.dir + ": state.json has no loss scaler state, which this policy needs");
  // The counts since the last step record (checkpoints before this field had none: the next
  // record then counts from the resume).
  if (numerics && num.is_object() && num.contains("interval"))
    numerics->load_interval_state(num.at("interval"), c.dir + "/state.json");
  if (!model.fp8_gemms().empty()) {
    if (!num.is_object() || !num.contains("fp8"))
      throw InputError(c.dir + ": state.json has no fp8 scaling state, which this policy needs");
    model.load_fp8_state(num.at("fp8"));
  }
}

// Replays the step's micro-batches with a check after every op, to name the op that first
// produced a NaN or infinity. The CPU and CUDA backends are deterministic, so the replay
// computes what the step computed. Leaves the gradients undefined (the step is being skipped).
std::optional<NonFiniteSite> locate_nonfinite(Gpt& model,
                                              const std::vector<std::vector<int32_t>>& inputs,
                                              const std::vector<std::vector<int32_t>>& targets,
                                              int B, int T, float dloss) {
  model.zero_grad();
  model.trace_nonfinite(true);
  for (size_t i = 0; i < inputs.size() && !model.first_nonfinite(); ++i) {
    model.forward(inputs[i].data(), targets[i].data(), B, T, dloss);
    model.backward();
  }
  std::optional<NonFiniteSite> site = model.first_nonfinite();
  model.trace_nonfinite(false);
  return site;
}

}  // namespace

// Micro-batches each process accumulates per optimizer step: training.grad_accum, or what
// training.global_batch_tokens asks of `world` processes (InputError when it does not divide).
int micro_batches_per_step(const TrainingConfig& t, int world) {
  if (t.global_batch_tokens == 0) return t.grad_accum;
  const int64_t per = static_cast<int64_t>(t.micro_batch) * t.seq_len * world;
  if (t.global_batch_tokens % per != 0)
    throw InputError("training.global_batch_tokens: " + std::to_string(t.global_batch_tokens) +
                     " is not a multiple of micro_batch x seq_len x processes (" +
                     std::to_string(t.micro_batch) + " x " + std::to_string(t.seq_len) + " x " +
                     std::to_string(world) + " = " + std::to_string(per) +
                     " tokens per micro-batch over all processes)");
  const int64_t accum = t.global_batch_tokens / per;
  if (accum > std::numeric_limits<int>::max())
    throw InputError("training.global_batch_tokens: " + std::to_string(t.global_batch_tokens) +
                     " needs more than 2^31 micro-batches per step; raise training.micro_batch");
  return static_cast<int>(accum);
}

// Compares this rank's resolved config and training data with rank 0's (broadcast), and throws
// on every rank when any rank differs: on a differing rank naming the keys, elsewhere pointing
// at the rank that differs.
static void check_same_config_on_every_rank(dist::Communicator& comm, const Config& cfg,
                                            const nlohmann::json& data) {
  const nlohmann::json mine_json = {{"config", config_to_json(cfg)}, {"train_data", data}};
  const std::string mine = mine_json.dump();
  uint64_t len = mine.size();
  comm.broadcast(&len, sizeof len, 0);
  std::string root(len, '\0');
  if (comm.rank() == 0) root = mine;
  comm.broadcast(root.data(), len, 0);
  std::vector<float> differs(comm.world_size(), 0.0f);
  differs[comm.rank()] = root == mine ? 0.0f : 1.0f;
  comm.all_reduce_max(differs.data(), differs.size());
  std::string which;
  for (int r = 0; r < comm.world_size(); ++r)
    if (differs[r] != 0.0f) which += (which.empty() ? "" : ", ") + std::to_string(r);
  if (which.empty()) return;
  if (root == mine)
    throw InputError("the ranks do not train the same thing: rank(s) " + which +
                     " resolved a different config or training data than rank 0");
  const nlohmann::json theirs = nlohmann::json::parse(root);
  std::string keys;
  const auto a = flatten_config(theirs["config"]), b = flatten_config(mine_json["config"]);
  for (const auto& [k, v] : a)
    if (!b.count(k) || b.at(k) != v) keys += (keys.empty() ? "" : ", ") + k;
  if (theirs["train_data"] != data)
    keys += std::string(keys.empty() ? "" : ", ") + "the training data";
  throw InputError("rank " + std::to_string(comm.rank()) + " differs from rank 0 in: " + keys);
}

// train() within a job of comm.world_size() processes (one without a launcher). `signals`:
// installed before the job's communicator was made, so that a stop signal during start-up
// stops the run (in the evaluation at step 0, or a resumed run after its first step).
static TrainResult train_in_job(const Config& cfg, const TrainOptions& opt,
                                dist::Communicator& comm, const StopSignals& signals) {
  const int B = cfg.training.micro_batch, T = cfg.training.seq_len;
  const int64_t steps = cfg.training.steps;
  const FaultPlan faults = FaultPlan::from_env();
  std::vector<std::string> policy_warnings;
  const PrecisionPolicy policy = PrecisionPolicy::from_config(cfg, &policy_warnings);

  // ---- validate and build everything before anything is written
  // Data parallel: under a launcher every rank trains the same model on its rows of each global
  // micro-batch (B x world_size windows); gradients are summed across ranks, so every rank holds
  // the same gradients, takes the same decisions (skip, clip) and the same optimizer step. Rank 0
  // alone writes the run directory, metrics and checkpoints.
  const int world = comm.world_size(), rank = comm.rank();
  const bool writer = rank == 0;
  const int accum = micro_batches_per_step(cfg.training, world);
  const int64_t tokens_per_step = static_cast<int64_t>(B) * T * accum * world;
  // Every rank logs; the others' lines say which rank they come from.
  if (world > 1)
    spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [rank " + std::to_string(rank) + "] [%l] %v");
  std::optional<ResumePoint> resume;
  RunDirPlan plan;
  if (opt.resume) {
    resume = locate_resume(cfg, opt);
    check_resume_compatible(resume->ckpt.state.config, config_to_json(cfg), resume->ckpt.dir);
    // The global micro-batch (B x processes) and so the data order depend on the job's size.
    const int saved_world = resume->ckpt.state_json.value("world_size", 1);
    if (saved_world != world)
      throw InputError("cannot resume from " + resume->ckpt.dir + " with " +
                       std::to_string(world) + " process(es): it was written by a job of " +
                       std::to_string(saved_world) + " (the global batch and the data order " +
                       "depend on it); resume with " + std::to_string(saved_world));
    if (resume->ckpt.state.step >= steps)
      throw InputError("nothing to resume: " + resume->ckpt.dir + " is at step " +
                       std::to_string(resume->ckpt.state.step) + " and training.steps is " +
                       std::to_string(steps) + " (raise training.steps to train further" +
                       (resume->ckpt.state.eval_pending
                            ? "; the evaluation a stop cut short at that step runs first"
                            : "") +
                       ")");
    // A fork into another directory claims it like a new run: never someone else's run.
    plan = resume->same_run ? RunDirPlan{resume->run_dir, false, {}}
                            : plan_run_dir(cfg, resume->run_dir);
  } else {
    plan = plan_run_dir(cfg, opt.run_dir);
  }
  const int64_t min_tokens = static_cast<int64_t>(B) * T + 1;  // one micro-batch of windows
  data::TokenDataset train_data =
      data::TokenDataset::open(cfg.data.train, data::Split::train, cfg.model.vocab_size, min_tokens);
  data::TokenDataset val_data =
      data::TokenDataset::open(cfg.data.val, data::Split::val, cfg.model.vocab_size, min_tokens);
  // Paths derived from the inputs too (the run directory named after the config file, shards a
  // glob found, a checkpoint resolved against the working directory).
  require_utf8("run directory", plan.path);
  if (resume) require_utf8("checkpoint", resume->ckpt.dir);
  for (const data::TokenDataset* d : {&train_data, &val_data})
    for (const auto& source : d->sources()) require_utf8("data shard", source.name);
  // The loader draws the global micro-batch; this rank takes rows [rank*B, (rank+1)*B).
  data::BatchLoader train_loader(train_data, B * world, T, cfg.training.seed, /*shuffle=*/true);
  data::BatchLoader val_loader(val_data, B, T, cfg.training.seed, /*shuffle=*/false);
  LrSchedule schedule(cfg.schedule, cfg.optimizer.lr, steps);
  if (resume && resume->ckpt.state_json.contains("train_data") &&
      resume->ckpt.state_json["train_data"] != data_identity(train_data))
    throw InputError("cannot resume from " + resume->ckpt.dir +
                     ": the training data changed (the checkpoint was trained on " +
                     resume->ckpt.state_json["train_data"].dump() + ", data.train now gives " +
                     data_identity(train_data).dump() +
                     "); the batch order would not continue");
  // ZeRO-1 shards the optimizer state over the processes (with one process it changes nothing).
  const bool zero = cfg.distributed.zero_stage == 1 && world > 1;
  const Recompute recompute = recompute_from_name(cfg.training.recompute);
  MemoryLedger memory = Gpt::plan_memory(cfg.model, B, T, policy, world, zero, recompute);
  // One GPU per rank: the NCCL communicator's (its local rank's).
  std::unique_ptr<Backend> backend = make_backend(cfg.backend, cfg.threads, comm.device());
  // Which attention kernels run (the CUDA backend's fused ones or its GEMM path; the CPU has
  // one): their numerics differ within the op's tolerance, so a run records it.
  std::string attention_kernel = "reference";
  // How the GEMMs' 16-bit outputs are made (matmul_plan.h, GemmOut): the counts of their casts
  // differ between the two ways in corner cases only, but a run says which it asked for.
  std::string gemm_output = "reference";
  if (const int cc = backend->gpu_info().cc_major) {  // the workspace is the CUDA backend's
    memory.workspace = cuda_workspace_bytes(cfg.model, B, T, policy, memory, cc);
    attention_kernel = cuda::attention_kernel_name(cuda::attention_kernel(
        attention_operand_format(policy.activation, policy.activation, policy.unquantised_matmul()),
        cfg.model.n_embd / cfg.model.n_head));
    // (a misspelt MPT_GEMM_OUT is refused here, before the run directory is made)
    gemm_output = cuda::gemm_output_kind(policy.activation, policy.param, policy.matmul,
                                         cuda::gemm_out(), cuda::lt_epilogues_enabled());
  }
  // A misspelt MPT_FP8_PRODUCERS is refused here too, before the run directory is made (Gpt
  // reads it).
  fp8_producers_from_env(std::getenv("MPT_FP8_PRODUCERS"));
  // With the CUDA workspace. A dry run shows the model, data and ledger first, then refuses.
  const std::string too_big = memory_refusal(memory, *backend, comm.ranks_on_node());
  if (!too_big.empty() && !opt.dry_run) throw InputError(too_big);
  TrainResult result;
  result.run_dir = plan.path;
  if (opt.dry_run) {
    print_dry_run(cfg, accum, world, plan.path, *backend, train_data, val_data, memory, policy,
                  policy_warnings);
    if (!too_big.empty()) throw InputError(too_big);
    return result;
  }
  Gpt model(cfg.model, *backend, policy, recompute);
  model.init_weights(cfg.model.init_seed, cfg.model.init_std);
  const size_t slab = static_cast<size_t>(model.all_grads().numel());
  const std::vector<SlabRange> zero_shards =
      zero ? zero_ranges(slab, world) : std::vector<SlabRange>{{0, slab}};
  AdamW optimizer(cfg.optimizer, model, *backend, zero_shards[zero ? rank : 0]);
  std::optional<GradientReducer> gradient_reducer;
  if (world > 1) gradient_reducer.emplace(comm, *backend, model.all_grads());
  optimizer.set_rounding_seed(derive_seed(cfg.training.seed, kStochasticRoundingStream));
  LossScaler scaler(policy.loss_scale);
  NumericsMonitor numerics(model.policy(), *backend, model);
  DeviceMetrics device_metrics(*backend, policy, model.flops_per_token(T), memory, world);
  int64_t start_step = 0;
  std::string resumed_from;
  bool continue_in_place = false;
  bool resume_eval_pending = false;  // the checkpoint's evaluation was cut short: run it first
  if (resume) {
    restore(*backend, model, optimizer, scaler, writer ? &numerics : nullptr, resume->ckpt);
    backend->reset_cast_counts();  // rewriting the weights from the master is not training
    train_loader.seek({resume->ckpt.state.data_epoch, resume->ckpt.state.data_sample});
    start_step = resume->ckpt.state.step;
    resumed_from = resume->ckpt.dir;
    continue_in_place = resume->same_run;
    resume_eval_pending = resume->ckpt.state.eval_pending;
    resume.reset();  // the checkpoint's bytes are in the model now; free the host copy
  }
  // ZeRO-1: from here on this process keeps its range of the master weights (restored or
  // initial), and the model none.
  optimizer.take_master_shard();
  backend->reset_cast_counts();  // moving the master is not training
  // The memory ledger predicts training's footprint: under ZeRO-1 the whole master the model
  // held until now (initialised or restored) is not part of it.
  if (optimizer.sharded()) backend->reset_peak_memory();

  // ---- every rank agrees on what it trains (this also waits until every rank has validated
  // its inputs: a rank that failed above has ended the job before anything is written)
  if (world > 1) check_same_config_on_every_rank(comm, cfg, data_identity(train_data));

  // ---- the run directory, then the start record
  // Only rank 0 touches the run directory.
  const std::string run_dir =
      continue_in_place || !writer ? plan.path : create_run_dir(plan, cfg);
  result.run_dir = run_dir;
  std::optional<RunLock> lock;
  std::optional<CheckpointManager> checkpoints;
  std::optional<MetricsSink> metrics_file;
  if (writer) {
    lock.emplace(run_dir);
    if (continue_in_place)  // the resolved config may differ in the keys resuming may change
      write_file_atomic((fs::path(run_dir) / "config.yaml").string(), config_to_yaml(cfg));
    checkpoints.emplace(run_dir, cfg.checkpoint, faults);
    metrics_file.emplace((fs::path(run_dir) / "metrics.jsonl").string(), /*append=*/true);
    // Continuing from an older checkpoint of this run abandons the newer ones: `latest` moves
    // back to it first, so that it never names a checkpoint the replay is about to replace.
    // Last of the start-up steps that can fail (the metrics file opened above), so that a
    // resume that cannot start deletes nothing.
    if (continue_in_place) checkpoints->restart_from(resumed_from);
  }
  auto emit = [&](const nlohmann::json& record) {
    if (metrics_file) metrics_file->write(record);
  };
  nlohmann::json start = {{"event", "start"},
                          {"time", utc_timestamp()},
                          {"version", MPT_VERSION},
                          {"run_dir", run_dir},
                          {"backend", backend->name()},
                          {"device", backend->device_description()},
                          {"threads", backend->threads()},
                          {"attention_kernel", attention_kernel},
                          {"gemm_output", gemm_output},
                          {"fp8_producers", model.fp8_producers()},
                          {"precision", policy.to_json()},
                          {"precision_warnings", policy_warnings},
                          {"n_params", model.num_params()},
                          {"padded_vocab", model.padded_vocab()},
                          {"flops_per_token", model.flops_per_token(T)},
                          {"tokens_per_step", tokens_per_step},
                          {"world_size", world},
                          {"memory", memory.to_json()},
                          {"train_data", train_data.describe()},
                          {"val_data", val_data.describe()},
                          {"config", config_to_json(cfg)}};
  start.update(device_metrics.start_fields());
  if (!resumed_from.empty()) {
    start["resumed_from"] = resumed_from;
    start["resume_step"] = start_step;
  }
  emit(start);
  if (writer) spdlog::info("run directory {}", run_dir);
  if (!resumed_from.empty()) spdlog::info("resumed from {} at step {}", resumed_from, start_step);
  spdlog::info("model: {} layers, {} heads, width {}, {} parameters; backend {} ({})",
               cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, model.num_params(),
               backend->name(), backend->device_description());
  spdlog::info("train data: {}; validation: {}", train_data.describe(), val_data.describe());
  spdlog::info("precision {}: {}", policy.name, describe_policy(policy));
  if (world > 1)
    spdlog::info("data parallel: {} processes x {} sequences x {} micro-batches per step; {}",
                 world, B, accum,
                 zero ? fmt::format("ZeRO-1: this process keeps and updates elements [{}, {}) of "
                                    "the {} of the optimizer state",
                                    optimizer.range().begin, optimizer.range().end, slab)
                      : std::string("every process keeps the whole optimizer state"));
  for (const auto& w : policy_warnings) spdlog::warn("precision: {}", w);

  const int eval_batches = cfg.training.eval_batches;
  // The evaluation due at a step; nothing when `interruptible` and a stop signal cut it short.
  // Under several processes the job decides before each batch (any rank's signal cuts it on
  // every rank at the same batch: no rank waits in a collective for another's evaluation). Not
  // interruptible: the last step's (a signal during the last step changes nothing).
  // `val_finite`: whether the loss is finite on every rank (each evaluates for itself, and the
  // decisions taken on it, such as checkpoint(), are collective).
  bool val_finite = true;
  auto run_eval = [&](int64_t step, bool interruptible) -> std::optional<double> {
    // Evaluation's casts are not training's: keep them out of the step records.
    numerics.collect();
    std::function<bool()> stop_requested;
    if (interruptible)
      stop_requested = [&] {
        float stop = signals.requested() != 0 || faults.stop_in_eval_at_step == step ? 1.0f : 0.0f;
        if (world > 1) comm.all_reduce_max(&stop, 1);
        return stop != 0.0f;
      };
    // Several processes ask together (a collective) every 8 batches: a stop waits at most that.
    std::optional<double> val = evaluate(model, val_loader, eval_batches, B, T, stop_requested,
                                         world > 1 ? 8 : 1);
    numerics.discard();
    if (val) {
      float bad = std::isfinite(*val) ? 0.0f : 1.0f;
      if (world > 1) comm.all_reduce_max(&bad, 1);
      val_finite = bad == 0.0f;
    }
    if (!val) {
      spdlog::warn("eval at step {} cut short by a stop signal; a resume runs it first", step);
      return val;
    }
    emit({{"event", "eval"}, {"step", step}, {"val_loss", json_number(*val)}});
    spdlog::info("eval  step {:>6} | val_loss {:.4f}", step, *val);
    return val;
  };
  bool eval_pending = false;  // the evaluation due at the current step was cut short
  auto checkpoint = [&](int64_t step) {
    CheckpointState st;
    st.step = step;
    st.tokens = step * tokens_per_step;
    st.optimizer_step = optimizer.steps_taken();
    const data::LoaderCursor cur = train_loader.cursor();
    st.data_epoch = cur.epoch;
    st.data_sample = cur.sample;
    st.config = config_to_json(cfg);
    st.train_data = data_identity(train_data);
    st.numerics = {{"loss_scaler", scaler.state()},
                   {"fp8", model.fp8_state()},
                   {"interval", numerics.interval_state(world > 1 ? &comm : nullptr, zero)}};
    st.world_size = world;
    st.eval_pending = eval_pending;
    // Rank 0 saves. Every rank holds the same weights; under ZeRO-1 the others send their parts
    // of the optimizer state to rank 0 one tensor at a time while it writes.
    std::optional<CheckpointTensors> tensors;
    if (optimizer.sharded()) tensors = checkpoint_tensors(*backend, model, optimizer, &comm);
    if (!writer) {
      if (tensors) tensors->serve();
      return std::string();
    }
    if (!tensors) tensors = checkpoint_tensors(*backend, model, optimizer);
    const std::string dir = checkpoints->save(st, tensors->weights, tensors->moments);
    tensors->saved();
    spdlog::info("checkpoint {}", dir);
    // Relative to the run directory, so the records stay true when the run is moved.
    const std::string rel = relative_to_run(dir, run_dir);
    emit({{"event", "checkpoint"}, {"step", step}, {"path", rel}});
    return rel;
  };

  // The step's micro-batches, kept for a replay when the step turns out non-finite.
  std::vector<std::vector<int32_t>> inputs(accum, std::vector<int32_t>(static_cast<size_t>(B) * T));
  std::vector<std::vector<int32_t>> targets = inputs;
  // Under several processes: the global micro-batch the loader draws, of which this rank's rows
  // are copied into inputs/targets.
  std::vector<int32_t> global_inputs(world > 1 ? static_cast<size_t>(B) * T * world : 0);
  std::vector<int32_t> global_targets = global_inputs;
  // The loss of a step is the mean over its B*T*accum tokens; each token's gradient carries the
  // loss scale.
  const double tokens_per_step_f = static_cast<double>(tokens_per_step);
  const auto t_start = Clock::now();
  // Step timings exclude evaluation, logging and checkpoints: they measure training alone.
  double interval_s = 0.0;
  double interval_comm_s = 0.0;  // of which in collectives (several processes)
  int64_t interval_steps = 0;
  double last_loss = 0.0;
  // In place: the run's own checkpoints/step_N (however the path to it was spelled: relative,
  // through a symlink, with a trailing slash).
  std::string last_checkpoint;
  bool save_waiting = false;  // a due checkpoint put off until the loss is finite again
  if (continue_in_place) {
    fs::path p = fs::path(resumed_from).lexically_normal();
    if (p.filename().empty()) p = p.parent_path();
    last_checkpoint = (fs::path("checkpoints") / p.filename()).string();
  }
  int64_t current_step = start_step;
  // A signal that stops the run after `step` (a checkpoint saved or not, as decided before).
  auto end_stopped = [&](int64_t step, int sig) {
    emit({{"event", "end"},
          {"time", utc_timestamp()},
          {"status", "stopped"},
          {"signal", sig},
          {"step", step},
          {"tokens", step * tokens_per_step},
          {"checkpoint", last_checkpoint}});
    spdlog::warn("stopped by signal {} after step {}; continue with --resume", sig, step);
    result.steps = step;
    result.final_loss = last_loss;
    result.stopped_by_signal = sig;
    return result;
  };
  // A due checkpoint not saved, the model's loss not being finite: the next save waits for a
  // finite one. `loss`: the step's (null when unknown), `val`: the validation loss if measured.
  auto skip_checkpoint = [&](int64_t step, const nlohmann::json& loss,
                             const std::optional<double>& val) {
    save_waiting = true;
    emit({{"event", "checkpoint_skipped"},
          {"step", step},
          {"loss", loss},
          {"val_loss", val ? json_number(*val) : nlohmann::json()},
          {"last_checkpoint", last_checkpoint}});
    spdlog::warn("step {}: checkpoint not saved: the loss is not finite; the last checkpoint is {}",
                 step, last_checkpoint.empty() ? std::string("none") : last_checkpoint);
  };
  // The job's stop signal after a step (0: none): a signal to any rank stops every rank.
  auto agreed_signal = [&](int sig) {
    if (world > 1) {
      float s = static_cast<float>(sig);
      comm.all_reduce_max(&s, 1);
      sig = static_cast<int>(s);
    }
    return sig;
  };

  try {
    // The evaluation before the first step: at step 0, or the one a stop cut short at the
    // checkpoint resumed from. Cut short again, the run stops at once: a new run (or a fork)
    // saves its starting point with the evaluation pending; in place, the checkpoint resumed
    // from already says so.
    if (resumed_from.empty() || resume_eval_pending) {
      const std::optional<double> val = run_eval(start_step, start_step < steps);
      eval_pending = !val;
      if (val) result.final_val_loss = *val;
      if (eval_pending) {
        const int sig = agreed_signal(
            faults.stop_in_eval_at_step == start_step ? SIGTERM : signals.requested());
        if (!continue_in_place) last_checkpoint = checkpoint(start_step);
        return end_stopped(start_step, sig);
      }
      if (resume_eval_pending && !val_finite) {
        // As the straight run would have decided at this step, had its evaluation finished:
        // the checkpoint resumed from stays, but the next one waits for a finite loss. (That
        // step's training loss is not kept in the checkpoint.)
        skip_checkpoint(start_step, nullptr, val);
      }
    }
    for (int64_t step = start_step + 1; step <= steps; ++step) {
      current_step = step;
      const auto t_step = Clock::now();
      const double lr = schedule.at(step - 1);
      // The loss scale enters as the classifier's dloss: every gradient comes out times it.
      const double scale = scaler.scale();
      const float dloss = static_cast<float>(scale / tokens_per_step_f);
      model.zero_grad();
      double loss = 0.0;
      for (int micro = 0; micro < accum; ++micro) {
        if (world == 1) {
          train_loader.next(inputs[micro].data(), targets[micro].data());
        } else {
          train_loader.next(global_inputs.data(), global_targets.data());
          const size_t row0 = static_cast<size_t>(rank) * B * T, n = static_cast<size_t>(B) * T;
          std::copy_n(global_inputs.begin() + row0, n, inputs[micro].begin());
          std::copy_n(global_targets.begin() + row0, n, targets[micro].begin());
        }
        loss += model.forward(inputs[micro].data(), targets[micro].data(), B, T, dloss);
        model.backward();
      }
      loss /= accum;
      if (faults.nonfinite_at_step == step) {  // fault injection: an overflow in this process
        const Tensor g = model.all_grads();
        backend->fill(Tensor(g.data, g.dtype, {1}), INFINITY);
      }
      if (world > 1) {
        // dloss divides by the global token count, so the sum over ranks is the mean gradient.
        const auto t_comm = Clock::now();
        // The reduced gradients are the same on every rank, and so is rounding them back into
        // 16 bits: counted once, by rank 0 (the other ranks drop the counts of that cast).
        const bool drop_narrowing = rank != 0 && model.all_grads().dtype != DType::f32;
        if (drop_narrowing) numerics.collect();
        gradient_reducer->all_reduce();
        if (drop_narrowing) numerics.discard();
        comm.all_reduce_mean(&loss, 1);
        // On a GPU the collectives were only enqueued: wait for them, so that comm_ms is their
        // time (the gradient norm below would wait for them anyway).
        if (!backend->host_accessible()) backend->synchronize();
        interval_comm_s += seconds_since(t_comm);
      }
      // One pass over the (scaled) gradients gives both the norm and the overflow check: the
      // norm is finite exactly when every gradient is.
      const double scaled_norm = optimizer.grad_norm();
      const double norm = scaled_norm / scale;
      const bool nonfinite = !std::isfinite(loss) || !std::isfinite(scaled_norm);
      if (nonfinite) {
        numerics.collect();
        const auto site = locate_nonfinite(model, inputs, targets, B, T, dloss);
        numerics.discard();
        nlohmann::json ev = {{"event", "nonfinite"},
                             {"step", step},
                             {"loss_scale", scale},
                             {"loss", json_number(loss)}};
        if (site) {
          ev["layer"] = site->layer;
          ev["op"] = site->op;
          ev["tensor"] = site->tensor;
          ev["pass"] = site->backward ? "backward" : "forward";
          ev["nonfinite_values"] = site->count;
        } else {
          ev["op"] = nullptr;  // every op's output was finite: the sum of the gradients overflowed
        }
        emit(ev);
        spdlog::warn("step {}: non-finite {} (loss scale {}){}; step skipped", step,
                     site ? site->tensor : std::string("gradient norm"), scale,
                     site ? fmt::format(" first in {} of layer {}", site->op, site->layer) : "");
      }
      bool skip = false;
      try {
        skip = scaler.update(nonfinite);
      } catch (const RuntimeError& e) {
        throw RuntimeError("training diverged at step " + std::to_string(step) + ": " + e.what());
      }
      if (world > 1 && !model.fp8_gemms().empty()) {
        // Every rank records the amax of the whole global batch: the same scales everywhere.
        std::vector<float> amaxes = model.fp8_step_amaxes();
        comm.all_reduce_max(amaxes.data(), amaxes.size());
        model.set_fp8_step_amaxes(amaxes);
      }
      model.end_step();
      if (!skip) {
        optimizer.step(lr, static_cast<float>(1.0 / scale) * optimizer.clip_scale(norm));
        if (zero) {  // each rank updated its range of the weights
          const auto t_comm = Clock::now();
          gather_parameters(comm, *backend, model.all_params(), zero_shards);
          if (!backend->host_accessible()) backend->synchronize();  // as above: time the gather
          interval_comm_s += seconds_since(t_comm);
        }
      }
      numerics.after_step(skip ? nullptr : &optimizer.last_stats());
      last_loss = loss;  // the step's own, skipped or not: a diverged run's says so
      interval_s += seconds_since(t_step);
      ++interval_steps;

      if (step == 1 || step % cfg.training.log_every == 0 || step == steps) {
        const double step_ms = 1000.0 * interval_s / interval_steps;
        const double tok_s = static_cast<double>(tokens_per_step * interval_steps) / interval_s;
        const double eta = (steps - step) * step_ms / 1000.0;
        nlohmann::json rec = {{"step", step},
                              {"tokens", step * tokens_per_step},
                              {"loss", json_number(loss)},
                              {"lr", lr},
                              {"grad_norm", json_number(norm)},
                              {"loss_scale", scale},
                              {"skipped", skip},
                              {"skipped_total", scaler.skipped_total()},
                              {"step_ms", step_ms},
                              {"tokens_per_s", tok_s},
                              {"elapsed_s", seconds_since(t_start)}};
        if (world > 1) {
          // Time in the gradient all-reduce (and ZeRO-1's weight gather), waiting for the
          // slowest rank included.
          rec["comm_ms"] = 1000.0 * interval_comm_s / interval_steps;
          numerics.combine_processes(comm, zero);
        }
        rec.update(device_metrics.step_fields(tok_s));
        rec.update(numerics.take_record());
        emit(rec);
        if (policy.uses_loss_scaling())
          spdlog::info("step {:>6}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | scale {:g} | "
                       "skipped {} | {:.0f} tok/s | ETA {}",
                       step, steps, loss, lr, norm, scale, scaler.skipped_total(), tok_s,
                       format_duration(eta));
        else
          spdlog::info("step {:>6}/{} | loss {:.4f} | lr {:.2e} | norm {:.3f} | {:.0f} tok/s | ETA {}",
                       step, steps, loss, lr, norm, tok_s, format_duration(eta));
        interval_s = 0.0;
        interval_comm_s = 0.0;
        interval_steps = 0;
      }
      if (auto ev = device_metrics.memory_check(step)) emit(*ev);
      const bool eval_due = cfg.training.eval_every > 0 && step % cfg.training.eval_every == 0;
      const bool eval_now = eval_due || step == steps;
      std::optional<double> val;
      if (eval_now) val = run_eval(step, step < steps);
      if (val) result.final_val_loss = *val;
      eval_pending = eval_now && !val;  // then a signal is pending: the run stops below
      // A run whose model ends unable to give a finite loss did not train (a short run can
      // skip every step after its weights broke without reaching the loss scaler's limit): it
      // fails, without saving the broken weights over the last checkpoint.
      if (step == steps && !val_finite)
        throw RuntimeError("training diverged: the validation loss after the last step (" +
                           std::to_string(step) + ") is not finite; the last checkpoint is " +
                           (last_checkpoint.empty() ? std::string("none") : last_checkpoint));

      const bool fault_stop = faults.preempt_at_step == step || faults.stop_in_eval_at_step == step;
      const int sig = agreed_signal(fault_stop ? SIGTERM : signals.requested());
      const bool save_due =
          (cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0) || step == steps;
      // A signal during the last step changes nothing: the run is complete and saved.
      const bool stop = sig != 0 && step < steps;
      // A model that no longer gives a finite loss is not saved: through retention its
      // checkpoints would push out the good ones, the only way back. A due save waits for a step
      // whose loss (and validation loss, where one was just measured) is finite; a stop then
      // saves nothing, and the last checkpoint stays the one to resume from. (The last step's
      // validation loss is finite here: it was checked above.)
      const bool healthy = step == steps || (std::isfinite(loss) && (!val || val_finite));
      if ((save_due || stop || save_waiting) && healthy) {
        last_checkpoint = checkpoint(step);
        save_waiting = false;
      } else if ((save_due || stop) && !healthy) {
        skip_checkpoint(step, json_number(loss), val);
      }
      if (stop) return end_stopped(step, sig);
    }
  } catch (const std::exception& e) {
    emit({{"event", "end"},
                   {"time", utc_timestamp()},
                   {"status", "failed"},
                   {"step", current_step},
                   {"reason", e.what()},
                   {"checkpoint", last_checkpoint}});
    throw;
  }

  result.steps = steps;
  result.final_loss = last_loss;
  emit({{"event", "end"},
                 {"time", utc_timestamp()},
                 {"status", "completed"},
                 {"step", steps},
                 {"tokens", steps * tokens_per_step},
                 {"loss", json_number(last_loss)},
                 {"val_loss", json_number(result.final_val_loss)},
                 {"checkpoint", last_checkpoint},
                 {"elapsed_s", seconds_since(t_start)}});
  spdlog::info("done: {} steps, final loss {:.4f}, val_loss {:.4f}, {:.1f} s", steps, last_loss,
               result.final_val_loss, seconds_since(t_start));
  return result;
}

// The job's communicator: MPI (or none, for one process) for host memory; NCCL when several
// processes train on GPUs.
static std::unique_ptr<dist::Communicator> make_job_communicator(const Config& cfg) {
  const dist::Placement placement = dist::detect_placement();
  std::unique_ptr<dist::Communicator> host = dist::make_communicator(placement);
  if (placement.world_size == 1) return host;
  // Every rank must choose the same: `backend: auto` decides per machine, and a job whose nodes
  // differ would have some ranks start NCCL while the others do not.
  const float gpu = backend_is_cuda(cfg.backend) ? 1.0f : 0.0f;
  float seen[2] = {gpu, -gpu};  // max and -min over the ranks
  host->all_reduce_max(seen, 2);
  if (seen[0] != -seen[1])
    throw InputError("backend '" + cfg.backend + "' resolves to the GPU on some ranks and to the "
                     "CPU on others (some nodes have no usable GPU); set backend: cpu or cuda");
  if (gpu == 0.0f) return host;
#if MPT_HAVE_NCCL
  return std::make_unique<dist::NcclCommunicator>(std::move(host), placement);
#else
  throw InputError("backend '" + cfg.backend + "' (a GPU) under " +
                   std::to_string(placement.world_size) +
                   " processes needs NCCL, and this mpt was built without it (CMake found no "
                   "nccl.h and libnccl; see MPT_NCCL)");
#endif
}

TrainResult train(const Config& cfg, const TrainOptions& opt) {
  // Stop signals count from here: one that arrives while the job starts (MPI, NCCL) or the run
  // is set up stops it with a checkpoint (in the evaluation at step 0, or a resumed run after
  // its first step).
  const StopSignals signals;
  require_utf8("--run-dir", opt.run_dir);
  require_utf8("--resume", opt.resume_from);
  const std::unique_ptr<dist::Communicator> comm = make_job_communicator(cfg);
  signals.keep_installed();
  if (comm->world_size() == 1) return train_in_job(cfg, opt, *comm, signals);
  try {
    return train_in_job(cfg, opt, *comm, signals);
  } catch (const std::exception& e) {
    // The other ranks may be waiting in a collective this rank will never join: end the whole
    // job now (MPI_Abort), naming the rank, instead of leaving them to hang.
    const auto* err = dynamic_cast<const Error*>(&e);
    const int code = static_cast<int>(err ? err->code() : ExitCode::runtime_failure);
    std::fprintf(stderr, "mpt: error: rank %d of %d failed: %s\n", comm->rank(),
                 comm->world_size(), e.what());
    comm->abort(code);
    throw;  // not reached: abort() ends the process
  }
}

}  // namespace mpt
