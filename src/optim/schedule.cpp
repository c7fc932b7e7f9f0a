#include "optim/schedule.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace mpt {

LrSchedule::LrSchedule(const ScheduleConfig& s, double peak_lr, int64_t total_steps)
    : warmup_(s.warmup_steps), peak_(peak_lr), min_(s.min_lr), total_(total_steps) {
  if (s.decay == "cosine") decay_ = Decay::cosine;
  else if (s.decay == "linear") decay_ = Decay::linear;
  else if (s.decay == "constant") decay_ = Decay::constant;
  else throw InputError("schedule.decay: unknown '" + s.decay + "' (valid: cosine, linear, constant)");
}

double LrSchedule::at(int64_t step) const {
  // Warmup ends at the peak on step warmup-1, so step 0 already trains (lr = peak / warmup).
  if (step < warmup_) return peak_ * static_cast<double>(step + 1) / static_cast<double>(warmup_);
  if (decay_ == Decay::constant) return peak_;
  const int64_t span = total_ - warmup_;
  // The last step reaches min_lr exactly.
  const double progress =
      span <= 1 ? 1.0
                : std::min(1.0, static_cast<double>(step - warmup_) / static_cast<double>(span - 1));
  if (decay_ == Decay::linear) return peak_ - (peak_ - min_) * progress;
  return min_ + 0.5 * (1.0 + std::cos(M_PI * progress)) * (peak_ - min_);
}

}  // namespace mpt
