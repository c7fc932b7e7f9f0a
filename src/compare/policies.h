// `mpt compare --policies`: trains one config under several precision policies, the baseline
// policy with K data seeds, into run directories under one comparison directory, then hands the
// runs to compare_runs (compare.h). Resumable: run again, it skips completed runs, continues
// stopped or crashed ones from their checkpoints and refuses a different plan
// (docs/compare.md, "Training the runs").
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"

namespace mpt::compare {

struct PoliciesOptions {
  std::string config_path;        // --config; "" = the built-in default config
  std::vector<std::string> sets;  // --set key=value, applied to every run
  std::vector<std::string> policies;  // --policies, in order
  int seeds = 1;                      // --seeds: data seeds of the baseline policy
  std::string baseline;               // --baseline: a policy name; "" = the first policy
  std::string out;                    // --out: the comparison directory
};

// "fp32,tf32" -> {"fp32", "tf32"}. InputError naming --policies for an empty list, an empty
// item or a repeated name. Whether a name is a policy is load_config's to say (plan_policies).
std::vector<std::string> parse_policy_list(const std::string& text);

struct PlannedRun {
  std::string name;    // "<policy>-seed<N>", N = 1..K
  std::string policy;
  int seed_index = 1;  // N
  std::string dir;     // <out>/runs/<name>
  Config cfg;          // the resolved config it trains
};

struct PoliciesPlan {
  PoliciesOptions options;
  std::vector<PlannedRun> runs;       // report order: policies in order, each with its seeds
  std::vector<size_t> training_order;  // every policy's seed 1 first, then the baseline's others
  size_t baseline = 0;                 // index into runs of the baseline policy's seed 1
  nlohmann::json manifest;             // what <out>/compare-plan.json records and compares
};

// Validates the options and resolves every run's config through load_config (the policy as
// `precision`, the seed as `training.seed`), so that every preset the config accepts works.
// InputError naming the flag and value on any problem. Reads the config; writes nothing.
PoliciesPlan plan_policies(const PoliciesOptions& options);

struct PoliciesOutcome {
  std::vector<std::string> dirs;  // every run directory, in report order
  std::string baseline_dir;
  std::string stopped;  // why the comparison stopped before its end (a stop signal); "" if not
  std::vector<std::string> failed;  // runs whose training failed (end record "failed")
};

// Trains what is still to train, one run at a time, each in a child process (fork): the parent
// forwards stop signals to it, reads its peak memory (RUN/peak_memory.json) and stops the
// comparison, without starting another run, when a run was stopped by a signal or when its own
// stop signal arrived (`stopped`); a signal during the last run that lets it complete changes
// nothing, as in `mpt train`. InputError (nothing created) when <out> holds another
// plan or something that is not a comparison, or when a run's config, data or backend is
// refused; RuntimeError when a training process crashes.
//
// Forking needs a parent that has not run OpenMP parallel regions (libgomp's thread pool does
// not survive fork): the parent here only reads configs and metrics; the children train.
PoliciesOutcome train_policies(const PoliciesPlan& plan);

}  // namespace mpt::compare
