// Loss scaling for fp16 training (Micikevicius et al., "Mixed Precision Training", ICLR 2018,
// arXiv:1710.03740): the loss is multiplied by a scale before backward so that small gradients
// survive fp16, and the gradients are unscaled before clipping and the optimizer step.
//
// A host-side state machine: the trainer reports whether each step's (already all-reduced)
// gradients held a non-finite value, and the scaler says whether to skip the step and moves the
// scale. Semantics, defaults and their sources: docs/precision.md, "Loss scaling".
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

namespace mpt {

struct LossScalerConfig {
  std::string mode = "dynamic";  // dynamic | static | none
  // Defaults of the dynamic mode are PyTorch GradScaler's.
  double init_scale = 65536.0;  // 2^16; the fixed scale in static mode
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;  // finite steps in a row before the scale grows
  // Overflow steps tolerated before backing off (Megatron-LM / DeepSpeed "hysteresis");
  // 1 = back off at every overflow, as GradScaler does.
  int hysteresis = 1;
  // false (Megatron-LM): the hysteresis budget is restored only when the scale grows.
  // true (DeepSpeed `consecutive_hysteresis`): every finite step restores it, so only overflows
  // in a row count.
  bool consecutive_hysteresis = false;
  double min_scale = 1.0;
  double max_scale = 16777216.0;  // 2^24
  // Overflow steps in a row while already at min_scale (in static and none modes: any overflow
  // steps in a row) before the run is stopped with a RuntimeError.
  int max_consecutive_min_scale_skips = 10;
};

class LossScaler {
 public:
  // Validates the config: InputError naming the field ("loss_scale.<field>: ...").
  explicit LossScaler(const LossScalerConfig& cfg);

  double scale() const { return scale_; }            // multiply the loss by this before backward
  double inv_scale() const { return 1.0 / scale_; }  // multiply the gradients by this to unscale

  // Reports a step's outcome; all ranks must pass the same `found_nonfinite`. Returns true when
  // the optimizer step must be skipped (exactly when found_nonfinite is true), and moves the
  // scale for the next step. Throws RuntimeError with a diagnostic once the scale has sat at its
  // minimum for max_consecutive_min_scale_skips overflow steps in a row.
  bool update(bool found_nonfinite);

  int64_t skipped_total() const { return skipped_total_; }
  int64_t consecutive_skips() const { return consecutive_skips_; }
  int64_t steps_since_growth() const { return growth_tracker_; }
  int hysteresis_left() const { return hysteresis_left_; }
  const std::string& mode() const { return cfg_.mode; }

  // Everything needed to continue exactly (for checkpoints). load_state expects a state written
  // under the same config: InputError on a missing, mistyped or out-of-range field, or a mode
  // that differs from the config's.
  nlohmann::json state() const;
  void load_state(const nlohmann::json& j);

 private:
  enum class Mode { dynamic, fixed, none };  // fixed = "static"

  [[noreturn]] void stop_at_min_scale() const;

  LossScalerConfig cfg_;
  Mode mode_;
  double scale_;
  int64_t growth_tracker_ = 0;     // finite steps since the last growth or overflow
  int hysteresis_left_;            // overflows still tolerated before backing off
  int64_t skipped_total_ = 0;
  int64_t consecutive_skips_ = 0;  // skipped steps in a row (reset by a finite step)
  int64_t min_scale_skips_ = 0;    // overflow steps in a row taken at the minimum scale
};

}  // namespace mpt
