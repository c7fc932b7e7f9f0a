#include "compare/policies.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <thread>

#include "compare/compare.h"
#include "core/error.h"
#include "core/text.h"
#include "io/checkpoint.h"
#include "io/files.h"
#include "io/run_dir.h"
#include "train/signals.h"
#include "train/trainer.h"

namespace mpt::compare {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kPlanFile = "compare-plan.json";

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t");
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(" \t") - a + 1);
}

// ---- training processes

struct ChildResult {
  int exit_code = -1;   // when the child exited
  int term_signal = 0;  // when a signal ended it
  int64_t peak_rss_bytes = 0;
};

// Runs `body` in a forked child and waits for it, forwarding the parent's stop signal. The
// child's exit code is body's result, or the ExitCode of what it threw (the error printed as
// `mpt train` prints it). `quiet`: the child's stdout goes to /dev/null.
//
// The child keeps the parent's descriptors, the comparison directory's lock among them, so that
// a training process left behind by a killed parent still holds the directory.
ChildResult run_in_child(const std::function<int()>& body, const StopSignals& signals, bool quiet) {
  std::fflush(nullptr);  // else the child would write the parent's buffered output again
  const pid_t pid = ::fork();
  if (pid < 0)
    throw RuntimeError(std::string("cannot start a training process: fork: ") + std::strerror(errno));
  if (pid == 0) {
    int code = static_cast<int>(ExitCode::runtime_failure);
    try {
      if (quiet) {
        const int fd = ::open("/dev/null", O_WRONLY);
        if (fd >= 0) ::dup2(fd, STDOUT_FILENO), ::close(fd);
      }
      code = body();
    } catch (const Error& e) {
      std::fprintf(stderr, "mpt: error: %s\n", e.what());
      code = static_cast<int>(e.code());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "mpt: error: %s\n", e.what());
    }
    std::fflush(nullptr);
    ::_exit(code);  // not exit(): the static destructors and atexit handlers are the parent's
  }
  int status = 0;
  struct rusage ru {};
  for (;;) {
    const pid_t r = ::wait4(pid, &status, WNOHANG, &ru);
    if (r == pid) break;
    if (r < 0 && errno != EINTR)
      throw RuntimeError(std::string("waiting for the training process: ") + std::strerror(errno));
    // A `kill PID` reaches the parent alone. Forwarded at every poll, not once: a child that
    // gets it before its trainer has installed the handlers loses it (they start afresh), and
    // the trainer keeps only the first signal anyway.
    if (const int sig = signals.requested()) ::kill(pid, sig);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ChildResult res;
  if (WIFEXITED(status)) res.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) res.term_signal = WTERMSIG(status);
  res.peak_rss_bytes = static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux counts KiB
  return res;
}

int train_in_child(const Config& cfg, const TrainOptions& opt) {
  const TrainResult r = train(cfg, opt);
  return static_cast<int>(r.stopped_by_signal ? ExitCode::stopped : ExitCode::ok);
}

// Adds one training process's peak to RUN/peak_memory.json (a resumed run has one per process;
// its peak is the largest).
void record_peak(const std::string& run_dir, int64_t bytes) {
  const std::string file = (fs::path(run_dir) / kPeakMemoryFile).string();
  json processes = json::array();
  {
    std::ifstream f(file);
    const json old = f ? json::parse(f, nullptr, false) : json();
    if (old.is_object() && old.contains("processes") && old["processes"].is_array())
      processes = old["processes"];
  }
  processes.push_back(bytes);
  int64_t peak = 0;
  for (const auto& p : processes)
    if (p.is_number_integer()) peak = std::max(peak, p.get<int64_t>());
  const json j = {{"measure", "peak resident set size of the training process (getrusage "
                              "ru_maxrss via wait4), in bytes"},
                  {"peak_rss_bytes", peak},
                  {"processes", processes}};
  write_file_atomic(file, j.dump(2) + "\n");
}

// ---- the state of a run directory

// The status of the run's newest training process: its end record's, or "" when the newest
// start record has no end record after it (a crash) or there are no records.
std::string last_status(const std::string& run_dir) {
  std::ifstream f(fs::path(run_dir) / "metrics.jsonl");
  std::string line, status;
  while (std::getline(f, line)) {
    const json r = json::parse(line, nullptr, false);
    if (!r.is_object() || !r.contains("event") || !r["event"].is_string()) continue;
    if (r["event"] == "start") status.clear();
    if (r["event"] == "end" && r.contains("status") && r["status"].is_string()) status = r["status"];
  }
  return status;
}

struct Usable {
  std::string dir;  // "" when none
  int64_t step = 0;
  std::string why_not;
};

// The newest checkpoint of the run that verifies: `latest`, else the step directories from the
// newest down (a crash can leave `latest` naming one that does not verify).
Usable usable_checkpoint(const std::string& run_dir) {
  try {
    const Checkpoint c = CheckpointManager::load_latest(run_dir);
    return {c.dir, c.state.step, ""};
  } catch (const InputError& e) {
    std::vector<fs::path> steps;
    std::error_code ec;
    int64_t step = 0;
    for (const auto& entry : fs::directory_iterator(fs::path(run_dir) / "checkpoints", ec))
      if (entry.is_directory(ec) && parse_step_name(entry.path().filename().string(), &step))
        steps.push_back(entry.path());
    std::sort(steps.rbegin(), steps.rend());  // step_NNNNNNNN: by name is by step
    for (const auto& p : steps) {
      try {
        const Checkpoint c = load_checkpoint(p.string());
        return {c.dir, c.state.step, ""};
      } catch (const InputError&) {
      }
    }
    return {"", 0, e.what()};
  }
}

// Moves a run that cannot be continued to <out>/abandoned/, so that a new start never mixes
// with what it left.
std::string move_aside(const PlannedRun& r, const std::string& out) {
  const fs::path dir = fs::path(out) / "abandoned";
  std::error_code ec;
  fs::create_directories(dir, ec);
  const std::string stem = r.name + "-" + utc_now("%Y%m%d-%H%M%S");
  fs::path to = dir / stem;
  for (int i = 2; fs::exists(to, ec); ++i) to = dir / (stem + "-" + std::to_string(i));
  if (!ec) fs::rename(r.dir, to, ec);
  if (ec) throw RuntimeError(r.dir + ": cannot move it to " + to.string() + ": " + ec.message());
  sync_directory(dir.string());
  sync_directory((fs::path(out) / "runs").string());
  return to.string();
}

// ---- the comparison directory

// Whether <out> already holds this plan (true) or nothing yet (false). InputError when it
// holds another plan, or files that are not a comparison's.
bool holds_plan(const PoliciesPlan& plan) {
  const std::string& out = plan.options.out;
  std::error_code ec;
  if (!fs::exists(out, ec)) return false;
  if (!fs::is_directory(out, ec)) throw InputError("--out " + out + ": exists and is not a directory");
  const std::string file = (fs::path(out) / kPlanFile).string();
  if (!fs::exists(file, ec)) {
    for (const auto& e : fs::directory_iterator(out, ec))
      if (e.path().filename() != ".lock")
        throw InputError("--out " + out + ": holds files but no " + kPlanFile +
                         ", so it is not a comparison made by --policies; give a new or empty "
                         "directory");
    return false;
  }
  std::ifstream f(file);
  const json saved = json::parse(f, nullptr, false);
  if (!saved.is_object())
    throw InputError(file + ": not a comparison plan (not a JSON object); give another --out");
  if (saved == plan.manifest) return true;
  const auto was = flatten_config(saved), now = flatten_config(plan.manifest);
  std::string diffs;
  for (const auto& key : differing_keys({saved, plan.manifest})) {
    const auto a = was.find(key), b = now.find(key);
    diffs += "\n  " + key + ": " + (a == was.end() ? "(none)" : a->second.dump()) + " there, " +
             (b == now.end() ? "(none)" : b->second.dump()) + " in this command";
  }
  throw InputError("--out " + out + " holds a comparison planned differently (" + file + "):" +
                   diffs +
                   "\nrun the command that made it to continue it, or give another --out");
}

// Runs every policy's config through the trainer's own checks (data, backend, memory) as a dry
// run, before anything is created. In child processes, so that the dry run's printout stays
// off the terminal (and no OpenMP runs in the parent).
void validate_runs(const PoliciesPlan& plan, const StopSignals& signals) {
  for (const auto& r : plan.runs) {
    if (r.seed_index != 1) continue;  // a data seed changes nothing these checks look at
    TrainOptions opt;
    opt.run_dir = r.dir;
    opt.dry_run = true;
    const ChildResult res = run_in_child([&] { return train_in_child(r.cfg, opt); }, signals, true);
    if (res.exit_code == 0) continue;
    if (res.exit_code == static_cast<int>(ExitCode::bad_input))
      throw InputError("--policies " + r.policy + ": the run cannot start (the error above); " +
                       "nothing was created");
    throw RuntimeError("--policies " + r.policy + ": checking the run failed (" +
                       (res.term_signal ? std::string("signal ") + strsignal(res.term_signal)
                                        : "exit code " + std::to_string(res.exit_code)) +
                       ")");
  }
}

}  // namespace

std::vector<std::string> parse_policy_list(const std::string& text) {
  std::vector<std::string> out;
  size_t start = 0;
  for (;;) {
    const size_t comma = text.find(',', start);
    const std::string item =
        trim(text.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (item.empty())
      throw InputError("--policies '" + text + "': an empty policy name (write them as fp32,tf32)");
    if (contains(out, item))
      throw InputError("--policies " + text + ": '" + item + "' is listed twice");
    out.push_back(item);
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

PoliciesPlan plan_policies(const PoliciesOptions& o) {
  if (o.policies.empty()) throw InputError("--policies: no policy given");
  if (o.seeds < 1)
    throw InputError("--seeds " + std::to_string(o.seeds) +
                     ": must be at least 1 (runs of the baseline policy, one per data seed)");
  if (o.out.empty())
    throw InputError("--policies needs --out DIR: the comparison directory that holds the runs, "
                     "compare.json and compare.svg");
  for (const auto& s : o.sets)
    if (trim(s.substr(0, s.find('='))) == "precision")
      throw InputError("--set " + s + ": each run's precision comes from --policies");
  const std::string baseline = o.baseline.empty() ? o.policies.front() : o.baseline;
  if (!contains(o.policies, baseline))
    throw InputError("--baseline " + baseline + ": not one of --policies (" + join(o.policies, ",") + ")");

  PoliciesPlan plan;
  plan.options = o;
  plan.options.baseline = baseline;
  // Through load_config, so that a policy is checked as the config file's `precision` is (and
  // the file's own precision, which every run overrides, never matters).
  auto load = [&](const std::string& policy, const std::string& seed) {
    std::vector<std::string> sets = o.sets;
    sets.push_back("precision=" + policy);
    if (!seed.empty()) sets.push_back("training.seed=" + seed);
    try {
      return load_config(o.config_path, sets);
    } catch (const InputError& e) {
      throw InputError("--policies " + policy + ": " + e.what());
    }
  };
  const Config base = load(o.policies.front(), "");
  for (const auto& policy : o.policies) {
    const int seeds = policy == baseline ? o.seeds : 1;
    for (int n = 1; n <= seeds; ++n) {
      PlannedRun r;
      r.name = policy + "-seed" + std::to_string(n);
      r.policy = policy;
      r.seed_index = n;
      r.dir = (fs::path(o.out) / "runs" / r.name).string();
      r.cfg = load(policy, std::to_string(base.training.seed + uint64_t(n - 1)));
      if (policy == baseline && n == 1) plan.baseline = plan.runs.size();
      plan.runs.push_back(std::move(r));
    }
  }
  // Every policy once before the baseline's further seeds: an interrupted comparison has the
  // policies side by side first.
  for (int pass = 0; pass < 2; ++pass)
    for (size_t i = 0; i < plan.runs.size(); ++i)
      if ((plan.runs[i].seed_index == 1) == (pass == 0)) plan.training_order.push_back(i);

  // What the runs are made of. The config's own precision and output keys are left out: every
  // run overrides the first and is placed by the plan, not by the second.
  json cfg = config_to_json(base);
  cfg.erase("precision");
  cfg.erase("output");
  plan.manifest = {{"format", "mpt-compare-plan"}, {"version", 1},      {"policies", o.policies},
                   {"baseline", baseline},         {"seeds", o.seeds}, {"config", cfg}};
  return plan;
}

PoliciesOutcome train_policies(const PoliciesPlan& plan) {
  const std::string& out = plan.options.out;
  PoliciesOutcome outcome;
  for (const auto& r : plan.runs) outcome.dirs.push_back(r.dir);
  outcome.baseline_dir = plan.runs[plan.baseline].dir;

  // From here a stop signal ends the comparison before the next run (and is forwarded to the
  // one in progress).
  StopSignals signals;
  if (!holds_plan(plan)) validate_runs(plan, signals);
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) throw InputError("--out " + out + ": cannot create the directory: " + ec.message());
  std::optional<RunLock> lock;
  try {
    lock.emplace(out);
  } catch (const InputError&) {
    throw InputError("--out " + out + ": another mpt compare is working in this directory");
  }
  if (!holds_plan(plan))  // checked again under the lock
    write_file_atomic((fs::path(out) / kPlanFile).string(), plan.manifest.dump(2) + "\n");

  const size_t total = plan.training_order.size();
  for (size_t k = 0; k < total; ++k) {
    if (signals.requested()) {
      outcome.stopped = strf("stopped by signal %d before %s", signals.requested(),
                             plan.runs[plan.training_order[k]].name.c_str());
      return outcome;
    }
    const PlannedRun& r = plan.runs[plan.training_order[k]];
    const std::string head = strf("[compare %zu/%zu] %s", k + 1, total, r.name.c_str());
    TrainOptions opt;
    opt.run_dir = r.dir;
    if (fs::exists(r.dir, ec)) {
      const std::string status = last_status(r.dir);
      if (status == "completed") {
        std::printf("%s: completed earlier, not trained again\n", head.c_str());
        continue;
      }
      if (status == "failed") {
        std::printf("%s: failed earlier, not trained again (delete %s to train it again)\n",
                    head.c_str(), r.dir.c_str());
        outcome.failed.push_back(r.name);
        continue;
      }
      const Usable ckpt = usable_checkpoint(r.dir);
      if (!ckpt.dir.empty() && ckpt.step >= r.cfg.training.steps) {
        // It trained every step and saved them, then died before its end record.
        std::printf("%s: trained all %lld steps earlier (its process ended before writing an end "
                    "record), not trained again\n",
                    head.c_str(), static_cast<long long>(ckpt.step));
        continue;
      }
      if (!ckpt.dir.empty()) {
        opt.resume = true;
        opt.resume_from = ckpt.dir;
        std::printf("%s: continuing from %s (step %lld of %lld)\n", head.c_str(), ckpt.dir.c_str(),
                    static_cast<long long>(ckpt.step), static_cast<long long>(r.cfg.training.steps));
      } else {
        const std::string moved = move_aside(r, out);
        std::fprintf(stderr, "mpt: warning: %s cannot be continued (%s); moved it to %s\n",
                     r.dir.c_str(), ckpt.why_not.c_str(), moved.c_str());
      }
    }
    if (!opt.resume)
      std::printf("%s: training precision %s, training.seed %llu, model.init_seed %llu, into %s\n",
                  head.c_str(), r.policy.c_str(), (unsigned long long)r.cfg.training.seed,
                  (unsigned long long)r.cfg.model.init_seed, r.dir.c_str());

    const ChildResult res = run_in_child([&] { return train_in_child(r.cfg, opt); }, signals, false);
    // A process refused before training (exit 2) measured nothing of the run.
    if (res.exit_code != static_cast<int>(ExitCode::bad_input) &&
        fs::exists(fs::path(r.dir) / "metrics.jsonl", ec))
      record_peak(r.dir, res.peak_rss_bytes);
    if (res.term_signal)
      throw RuntimeError(r.name + ": the training process was killed by signal " +
                         std::to_string(res.term_signal) + " (" + strsignal(res.term_signal) +
                         "); run the same command again to continue it from its last checkpoint");
    if (res.exit_code == static_cast<int>(ExitCode::stopped)) {
      outcome.stopped = "stopped during " + r.name + " (it saved a checkpoint)";
      return outcome;
    }
    if (res.exit_code == static_cast<int>(ExitCode::bad_input))
      throw InputError(r.name + ": the run was refused (the error above); nothing more was trained");
    if (res.exit_code != 0) {
      // A run that diverged is a result to compare; the others still train.
      if (last_status(r.dir) != "failed")
        throw RuntimeError(r.name + ": the training process ended with exit code " +
                           std::to_string(res.exit_code) +
                           " and no end record; run the same command again to continue it");
      outcome.failed.push_back(r.name);
    }
  }
  return outcome;
}

}  // namespace mpt::compare
