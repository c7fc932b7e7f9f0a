#include "precision/loss_scaler.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "core/error.h"

namespace mpt {

namespace {

// Shortest text that reads back as the same double ("65536", "0.5").
std::string num(double v) {
  char buf[32];
  const auto res = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, res.ptr);
}

[[noreturn]] void bad_config(const std::string& field, const std::string& why) {
  throw InputError("loss_scale." + field + ": " + why);
}

[[noreturn]] void bad_state(const std::string& field, const std::string& why) {
  throw InputError("loss scaler state: '" + field + "' " + why);
}

int64_t state_int(const nlohmann::json& j, const char* field, int64_t lo, int64_t hi) {
  if (!j.contains(field)) bad_state(field, "is missing");
  const auto& v = j.at(field);
  if (!v.is_number_integer()) bad_state(field, "must be an integer");
  // Unsigned values above int64's range would wrap; they are out of range anyway.
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi))
    bad_state(field, "is " + v.dump() + ", outside [" + std::to_string(lo) + ", " +
                         std::to_string(hi) + "]");
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi)
    bad_state(field, "is " + std::to_string(x) + ", outside [" + std::to_string(lo) + ", " +
                         std::to_string(hi) + "]");
  return x;
}

}  // namespace

LossScaler::LossScaler(const LossScalerConfig& cfg) : cfg_(cfg) {
  if (cfg.mode == "dynamic") mode_ = Mode::dynamic;
  else if (cfg.mode == "static") mode_ = Mode::fixed;
  else if (cfg.mode == "none") mode_ = Mode::none;
  else bad_config("mode", "unknown '" + cfg.mode + "' (valid: dynamic, static, none)");

  // `!(x > y)` also rejects NaN.
  if (!(cfg.growth_factor > 1.0) || !std::isfinite(cfg.growth_factor))
    bad_config("growth_factor", "must be a finite number > 1, got " + num(cfg.growth_factor));
  if (!(cfg.backoff_factor > 0.0 && cfg.backoff_factor < 1.0))
    bad_config("backoff_factor", "must be in (0, 1), got " + num(cfg.backoff_factor));
  if (cfg.growth_interval < 1)
    bad_config("growth_interval", "must be >= 1, got " + std::to_string(cfg.growth_interval));
  if (cfg.hysteresis < 1)
    bad_config("hysteresis", "must be >= 1, got " + std::to_string(cfg.hysteresis));
  if (cfg.max_consecutive_min_scale_skips < 1)
    bad_config("max_consecutive_min_scale_skips",
               "must be >= 1, got " + std::to_string(cfg.max_consecutive_min_scale_skips));
  if (!(cfg.min_scale > 0.0) || !std::isfinite(cfg.min_scale))
    bad_config("min_scale", "must be a finite number > 0, got " + num(cfg.min_scale));
  if (!(cfg.max_scale >= cfg.min_scale) || !std::isfinite(cfg.max_scale))
    bad_config("max_scale", "must be finite and >= min_scale (" + num(cfg.min_scale) + "), got " +
                                num(cfg.max_scale));
  if (mode_ != Mode::none && (!(cfg.init_scale > 0.0) || !std::isfinite(cfg.init_scale)))
    bad_config("init_scale", "must be a finite number > 0, got " + num(cfg.init_scale));
  // A static scale is not bound by the dynamic range limits.
  if (mode_ == Mode::dynamic && !(cfg.init_scale >= cfg.min_scale && cfg.init_scale <= cfg.max_scale))
    bad_config("init_scale", "must be within [min_scale, max_scale] = [" + num(cfg.min_scale) +
                                 ", " + num(cfg.max_scale) + "], got " + num(cfg.init_scale));

  scale_ = mode_ == Mode::none ? 1.0 : cfg.init_scale;
  hysteresis_left_ = cfg.hysteresis;
}

bool LossScaler::update(bool found_nonfinite) {
  if (!found_nonfinite) {
    consecutive_skips_ = 0;
    min_scale_skips_ = 0;
    if (mode_ != Mode::dynamic) return false;
    if (cfg_.consecutive_hysteresis) hysteresis_left_ = cfg_.hysteresis;
    if (++growth_tracker_ == cfg_.growth_interval) {
      scale_ = std::min(scale_ * cfg_.growth_factor, cfg_.max_scale);
      growth_tracker_ = 0;
      hysteresis_left_ = cfg_.hysteresis;
    }
    return false;
  }

  // Non-finite gradients: the step is skipped whatever the mode.
  ++skipped_total_;
  ++consecutive_skips_;
  // In static and none modes the scale cannot go lower, so every overflow counts as one taken
  // at the minimum: a run whose every step overflows stops instead of skipping forever.
  const bool at_min = mode_ != Mode::dynamic || scale_ <= cfg_.min_scale;
  min_scale_skips_ = at_min ? min_scale_skips_ + 1 : 0;

  if (mode_ == Mode::dynamic) {
    // Megatron-LM and DeepSpeed both restart the growth count at every overflow, tolerated or not.
    growth_tracker_ = 0;
    // Once the budget is spent it stays spent (every further overflow backs off) until a growth,
    // or with consecutive_hysteresis a finite step, restores it.
    if (hysteresis_left_ > 0) --hysteresis_left_;
    if (hysteresis_left_ == 0) scale_ = std::max(scale_ * cfg_.backoff_factor, cfg_.min_scale);
  }

  if (min_scale_skips_ >= cfg_.max_consecutive_min_scale_skips) stop_at_min_scale();
  return true;
}

void LossScaler::stop_at_min_scale() const {
  std::string what;
  if (mode_ == Mode::dynamic)
    what = "loss scale is stuck at its minimum " + num(scale_) + " (loss_scale.min_scale): ";
  else if (mode_ == Mode::fixed)
    what = "static loss scale " + num(scale_) + ": ";
  else
    what = "no loss scaling (scale " + num(scale_) + "): ";
  what += std::to_string(min_scale_skips_) + " steps in a row had non-finite gradients (" +
          std::to_string(consecutive_skips_) + " consecutive and " +
          std::to_string(skipped_total_) + " total skipped steps). The run is stopped rather than "
          "skipping every step. Try a lower learning rate or a longer warmup, bf16 instead of fp16";
  if (mode_ == Mode::dynamic) what += ", a lower loss_scale.min_scale";
  else if (mode_ == Mode::fixed) what += ", a lower static scale or the dynamic mode";
  what += ", and check the data for bad tokens";
  throw RuntimeError(what);
}

nlohmann::json LossScaler::state() const {
  return {{"mode", cfg_.mode},
          {"scale", scale_},
          {"growth_tracker", growth_tracker_},
          {"hysteresis_left", hysteresis_left_},
          {"skipped_total", skipped_total_},
          {"consecutive_skips", consecutive_skips_},
          {"min_scale_skips", min_scale_skips_}};
}

void LossScaler::load_state(const nlohmann::json& j) {
  if (!j.is_object()) throw InputError("loss scaler state: must be a JSON object, got " + j.dump());
  if (!j.contains("mode")) bad_state("mode", "is missing");
  if (!j.at("mode").is_string() || j.at("mode").get<std::string>() != cfg_.mode)
    bad_state("mode", "is " + j.at("mode").dump() + " but the config's loss_scale.mode is '" +
                          cfg_.mode + "'");
  if (!j.contains("scale")) bad_state("scale", "is missing");
  if (!j.at("scale").is_number()) bad_state("scale", "must be a number");
  const double scale = j.at("scale").get<double>();
  if (mode_ == Mode::dynamic) {
    if (!(scale >= cfg_.min_scale && scale <= cfg_.max_scale))
      bad_state("scale", "is " + num(scale) + ", outside the config's [min_scale, max_scale] = [" +
                             num(cfg_.min_scale) + ", " + num(cfg_.max_scale) + "]");
  } else {
    const double expected = mode_ == Mode::none ? 1.0 : cfg_.init_scale;
    if (scale != expected)
      bad_state("scale", "is " + num(scale) + " but the config fixes it at " + num(expected));
  }
  const int64_t big = INT64_MAX;
  const int64_t growth = state_int(j, "growth_tracker", 0, cfg_.growth_interval - 1);
  const int64_t hyst = state_int(j, "hysteresis_left", 0, cfg_.hysteresis);
  const int64_t total = state_int(j, "skipped_total", 0, big);
  const int64_t consec = state_int(j, "consecutive_skips", 0, total);
  const int64_t at_min = state_int(j, "min_scale_skips", 0, consec);

  scale_ = scale;
  growth_tracker_ = growth;
  hysteresis_left_ = static_cast<int>(hyst);
  skipped_total_ = total;
  consecutive_skips_ = consec;
  min_scale_skips_ = at_min;
}

}  // namespace mpt
