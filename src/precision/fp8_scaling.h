// Per-tensor fp8 scaling (Micikevicius et al., "FP8 Formats for Deep Learning", 2022,
// arXiv:2209.05433): a tensor is quantised as q = saturate(round(x * scale)) and dequantised
// with scale_inv = 1 / scale, where scale maps the tensor's absolute maximum (amax) onto the
// format's largest finite value.
//
// Two recipes. "delayed" (as in NVIDIA Transformer Engine's DelayedScaling): the scale used in
// step t comes from the amaxes of earlier steps only (a rolling history), so quantising needs
// no extra pass over the tensor; step t's amax is recorded afterwards and sets the scale of step
// t+1. "current": the scale of step t comes from step t's own amax (one more reduction over the
// tensor before quantising, no staleness). Defaults and reasons: docs/precision.md, "fp8 scaling".
#pragma once

#include "core/dtype.h"

#include <cstdint>
#include <deque>
#include <string>

#include <nlohmann/json.hpp>

namespace mpt {

enum class Fp8Format { e4m3, e5m2 };

// Largest finite value: 448 for e4m3 (the "fn" variant: no infinities), 57344 for e5m2.
float fp8_max(Fp8Format f);
DType fp8_dtype(Fp8Format f);  // the storage dtype of that format
const char* fp8_format_name(Fp8Format f);  // "e4m3", "e5m2"

struct Fp8ScalingConfig {
  std::string recipe = "delayed";     // delayed | current
  int amax_history_len = 16;          // steps of amax kept per tensor (delayed)
  std::string amax_compute = "max";   // max | most_recent: how the history becomes one amax
  int margin = 0;                     // the scale is divided by 2^margin (headroom)
};

// One per scaled tensor (e.g. one GEMM input). Host-side bookkeeping only: the amax reduction
// and the quantisation run in the backend.
class Fp8TensorScaler {
 public:
  // Validates the config: InputError naming the field ("fp8.<field>: ...").
  Fp8TensorScaler(const Fp8ScalingConfig& cfg, Fp8Format format);

  // The scale for this step (1 until an amax has been recorded) and its reciprocal. Both are
  // kept within [2^-126, 2^126], so both are normal floats.
  float scale() const { return scale_; }
  float scale_inv() const { return scale_inv_; }

  // Call once per step, after the step, with the amax observed in this step's tensor (>= 0;
  // NaN or inf when the tensor held one). The history rolls (the oldest entry beyond
  // amax_history_len is forgotten) and the scale is recomputed: delayed, for the next step;
  // current, it becomes scale_for_current(amax), the scale this step used.
  // A reduced amax that is 0 or not finite leaves the scale unchanged; non-finite entries are
  // ignored by the `max` reduction.
  void record(float amax);

  // Current scaling: the scale for a tensor whose own amax is `amax`,
  // fp8_max / amax / 2^margin, or scale() when amax is 0 or not finite. Does not change state.
  float scale_for_current(float amax) const;

  // The amax passed to the latest record() (0 before any).
  float last_amax() const { return history_.empty() ? 0.0f : history_.back(); }
  // Staleness of the scale: how many steps before the latest recorded one the amax that set the
  // current scale was observed (0 = the latest record()); -1 while the scale is still the
  // initial 1. With the `max` reduction this is the age of the history's maximum (the newest
  // occurrence when it repeats).
  int64_t steps_since_amax_max() const {
    return scale_source_step_ < 0 ? -1 : steps_recorded_ - 1 - scale_source_step_;
  }
  int64_t steps_recorded() const { return steps_recorded_; }
  Fp8Format format() const { return format_; }

  // Everything needed to continue exactly (for checkpoints). load_state expects a state written
  // under the same config and format: InputError on a missing, mistyped, out-of-range or
  // mismatching field. Non-finite history entries are written as null.
  nlohmann::json state() const;
  void load_state(const nlohmann::json& j);

 private:
  void set_scale(float s, int64_t source_step);

  Fp8ScalingConfig cfg_;
  Fp8Format format_;
  bool delayed_;
  bool reduce_max_;
  float scale_ = 1.0f;
  float scale_inv_ = 1.0f;
  std::deque<float> history_;        // oldest first, at most amax_history_len entries
  int64_t steps_recorded_ = 0;       // record() calls so far
  int64_t scale_source_step_ = -1;   // 0-based record() index whose amax set scale_; -1: initial
};

}  // namespace mpt
