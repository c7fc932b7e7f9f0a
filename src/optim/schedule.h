// Learning-rate schedules: linear warmup, then cosine, linear or constant decay to min_lr.
#pragma once

#include <cstdint>

#include "config/config.h"

namespace mpt {

class LrSchedule {
 public:
  LrSchedule(const ScheduleConfig& s, double peak_lr, int64_t total_steps);
  // Learning rate for the optimizer step with 0-based index `step` (the first update is 0).
  double at(int64_t step) const;

 private:
  enum class Decay { cosine, linear, constant };
  Decay decay_;
  int64_t warmup_;
  double peak_, min_;
  int64_t total_;
};

}  // namespace mpt
