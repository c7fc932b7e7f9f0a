// `mpt compare`: reads finished (or stopped) runs' metrics.jsonl and sets them side by side —
// final validation loss against a baseline, the seed-noise band, steady-state throughput,
// predicted memory and, where it was measured, peak memory — as a table, verdict sentences,
// compare.json and compare.svg (docs/compare.md).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mpt::compare {

// RUN_DIR/peak_memory.json: the measured peak resident memory of the processes that trained the
// run, written by `mpt compare --policies` (policies.h), which runs each training in a child
// process and reads its peak from the kernel; runs made by `mpt train` have none.
inline constexpr const char* kPeakMemoryFile = "peak_memory.json";

struct CurvePoint {
  int64_t step = 0;
  int64_t tokens = 0;
  double value = 0.0;
};

// The step records' `casts` classes (docs/metrics.md), in this order.
inline constexpr std::array<const char*, 3> kCastClasses = {"activations", "weights", "gradients"};

// Casts summed over step records: `values` cast, and how many of them overflowed (saturated,
// in fp8) or underflowed — each record's fractions weighted by its `values`.
struct CastCount {
  double values = 0.0;
  double overflow = 0.0;
  double underflow = 0.0;
  std::optional<double> overflow_fraction() const {
    return values > 0 ? std::optional<double>(overflow / values) : std::nullopt;
  }
  std::optional<double> underflow_fraction() const {
    return values > 0 ? std::optional<double>(underflow / values) : std::nullopt;
  }
};

// One step record's casts, by kCastClasses.
struct CastPoint {
  int64_t step = 0;
  std::array<CastCount, kCastClasses.size()> by_class{};
};

// One run as read from RUN_DIR/metrics.jsonl.
struct RunData {
  std::string dir;    // as given on the command line
  std::string label;  // the directory's name (the path as given when two names collide)
  std::string policy;  // start record's precision.name
  uint64_t training_seed = 0;
  uint64_t init_seed = 0;
  nlohmann::json config;  // start record's resolved config
  std::string status;     // end record's status, "" when the run has no end record
  int64_t steps = 0;      // last step record (or end record)
  int64_t tokens = 0;
  std::optional<double> val_loss;  // last eval record
  int64_t val_step = 0;
  std::optional<double> tokens_per_s;  // steady state, see steady_state_records
  int steady_records = 0;              // step records averaged into tokens_per_s
  double memory_bytes = 0.0;           // start record's memory.total (predicted)
  std::optional<double> measured_peak_bytes;  // kPeakMemoryFile's peak_rss_bytes, when present
  std::vector<CurvePoint> eval;        // val_loss by eval record
  std::vector<CurvePoint> train;       // training loss by step record
  std::vector<CurvePoint> speed;       // tokens_per_s by step record
  std::optional<int64_t> skipped_total;  // last step record's; none when it lacks the field
  std::vector<CastPoint> casts;          // step records with a `casts` field
  // The casts over the whole run, by kCastClasses and all classes together; nullopt when no
  // step record has a `casts` field (a policy that casts nothing).
  std::optional<std::array<CastCount, kCastClasses.size()>> cast_totals;
  std::optional<CastCount> cast_total;
  // Model FLOPs utilization: needs the device's peak FLOP/s, which no backend reports yet (the
  // CPU has no meaningful one; the CUDA backend will provide it), so it is always nullopt.
  std::optional<double> mfu;
};

// A run set against the baseline.
struct RunResult {
  RunData data;
  bool is_baseline = false;
  std::optional<double> val_diff;      // val_loss - baseline val_loss
  std::optional<double> val_diff_pct;  // 100 * val_diff / baseline val_loss
  std::optional<double> val_diff_bands;  // val_diff / noise band (when the band is known)
  std::optional<bool> inside_band;       // |val_diff| <= band
  std::optional<double> speedup;         // tokens_per_s / baseline tokens_per_s
  std::optional<double> memory_ratio;    // memory_bytes / baseline memory_bytes
  std::optional<double> measured_peak_ratio;  // measured_peak_bytes / the baseline's
  std::string verdict;
};

// Seed noise of the baseline policy: the spread (max - min) of the final validation losses of
// the baseline-policy runs with distinct (training.seed, model.init_seed).
struct NoiseBand {
  std::string policy;
  std::vector<std::string> runs;  // labels of the runs that make it
  double spread = 0.0;            // max - min, nats/token
  double spread_pct = 0.0;        // 100 * spread / baseline val_loss
};

struct Comparison {
  std::vector<RunResult> runs;
  size_t baseline = 0;
  std::optional<NoiseBand> band;
  std::vector<std::string> warnings;  // config keys that differ but do not forbid comparing
};

// Reads one run directory. InputError naming the file for a missing, empty or malformed
// metrics.jsonl, or one without a start record, and for a malformed kPeakMemoryFile.
RunData read_run(const std::string& dir);

// The indices of the step records that count as steady state: every record whose step is past
// the first 10% of the run's last step (rounded up) and is not the first record. When that
// leaves none, every record but the first; a run with a single record uses it.
std::vector<size_t> steady_state_records(const std::vector<CurvePoint>& speed);

// The config keys (dotted paths) whose values differ between the runs, missing keys included.
std::vector<std::string> differing_keys(const std::vector<nlohmann::json>& configs);

// Reads the runs and compares them. `baseline`: a run directory among `dirs` (compared as
// paths), or "" for the first fp32 run, else the first run. InputError listing the keys when
// model.* (other than model.init_seed) or data.* differ; other differing keys (except
// precision, the seeds, output.* and checkpoint.*) become warnings.
Comparison compare_runs(const std::vector<std::string>& dirs, const std::string& baseline = "");

// The table and the verdicts, for the terminal.
std::string format_table(const Comparison& c);
// Everything in the table, machine-readable (fields in docs/compare.md).
nlohmann::json to_json(const Comparison& c);

}  // namespace mpt::compare
