#include "precision/fp8_scaling.h"

#include "core/dtype.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace mpt {

namespace {

constexpr int kMaxHistoryLen = 65536;
constexpr int kMaxMargin = 16;  // 2^16 of headroom already exceeds e4m3's normal range of 2^17
// The scale and its reciprocal stay normal floats: a near-zero (or subnormal) amax would
// otherwise give an infinite scale, and x * inf turns zeros into NaN.
constexpr float kMinScale = 0x1p-126f;
constexpr float kMaxScale = 0x1p126f;

[[noreturn]] void bad_config(const std::string& field, const std::string& why) {
  throw InputError("fp8." + field + ": " + why);
}

[[noreturn]] void bad_state(const std::string& field, const std::string& why) {
  throw InputError("fp8 scaler state: '" + field + "' " + why);
}

const nlohmann::json& state_field(const nlohmann::json& j, const char* field) {
  if (!j.contains(field)) bad_state(field, "is missing");
  return j.at(field);
}

int64_t state_int(const nlohmann::json& j, const char* field) {
  const auto& v = state_field(j, field);
  if (!v.is_number_integer()) bad_state(field, "must be an integer, got " + v.dump());
  if (v.is_number_unsigned() &&
      v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    bad_state(field, "is out of range: " + v.dump());
  return v.get<int64_t>();
}

void expect_same(const nlohmann::json& j, const char* field, const nlohmann::json& expected,
                 const std::string& config_key) {
  const auto& v = state_field(j, field);
  if (v != expected)
    bad_state(field, "is " + v.dump() + " but " + config_key + " is " + expected.dump());
}

}  // namespace

DType fp8_dtype(Fp8Format f) { return f == Fp8Format::e4m3 ? DType::e4m3 : DType::e5m2; }

// The dtype table is the one source of the formats' limits.
float fp8_max(Fp8Format f) { return static_cast<float>(dtype_traits(fp8_dtype(f)).max_finite); }

const char* fp8_format_name(Fp8Format f) { return f == Fp8Format::e4m3 ? "e4m3" : "e5m2"; }

Fp8TensorScaler::Fp8TensorScaler(const Fp8ScalingConfig& cfg, Fp8Format format)
    : cfg_(cfg), format_(format) {
  if (cfg.recipe == "delayed") delayed_ = true;
  else if (cfg.recipe == "current") delayed_ = false;
  else bad_config("recipe", "unknown '" + cfg.recipe + "' (valid: delayed, current)");
  if (cfg.amax_compute == "max") reduce_max_ = true;
  else if (cfg.amax_compute == "most_recent") reduce_max_ = false;
  else bad_config("amax_compute", "unknown '" + cfg.amax_compute + "' (valid: max, most_recent)");
  if (cfg.amax_history_len < 1 || cfg.amax_history_len > kMaxHistoryLen)
    bad_config("amax_history_len", "must be in [1, " + std::to_string(kMaxHistoryLen) + "], got " +
                                       std::to_string(cfg.amax_history_len));
  if (cfg.margin < 0 || cfg.margin > kMaxMargin)
    bad_config("margin", "must be in [0, " + std::to_string(kMaxMargin) + "], got " +
                             std::to_string(cfg.margin));
}

float Fp8TensorScaler::scale_for_current(float amax) const {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return scale_;
  // fp8_max / amax is one correctly rounded fp32 division; the margin is an exact power of two.
  const float s = std::ldexp(fp8_max(format_) / amax, -cfg_.margin);
  return std::clamp(s, kMinScale, kMaxScale);
}

void Fp8TensorScaler::set_scale(float s, int64_t source_step) {
  scale_ = s;
  scale_inv_ = 1.0f / s;
  scale_source_step_ = source_step;
}

void Fp8TensorScaler::record(float amax) {
  MPT_CHECK(!(amax < 0.0f), "an amax is an absolute value, got " + std::to_string(amax));
  history_.push_back(amax);
  if (history_.size() > static_cast<size_t>(cfg_.amax_history_len)) history_.pop_front();
  const int64_t step = steps_recorded_++;

  if (delayed_ && reduce_max_) {
    // The newest occurrence of the maximum (>=), so the staleness is the smallest true one.
    // `v >= best` is false for NaN: non-finite entries never win, and inf is excluded by hand.
    float best = 0.0f;
    int64_t best_step = -1;
    const int64_t first_step = steps_recorded_ - static_cast<int64_t>(history_.size());
    for (size_t i = 0; i < history_.size(); ++i) {
      const float v = history_[i];
      if (std::isfinite(v) && v >= best) {
        best = v;
        best_step = first_step + static_cast<int64_t>(i);
      }
    }
    if (best > 0.0f) set_scale(scale_for_current(best), best_step);
    return;
  }
  // most_recent (delayed) and current scaling both use this step's amax alone.
  if (amax > 0.0f && std::isfinite(amax)) set_scale(scale_for_current(amax), step);
}

nlohmann::json Fp8TensorScaler::state() const {
  nlohmann::json hist = nlohmann::json::array();
  for (float v : history_) {
    if (std::isfinite(v)) hist.push_back(static_cast<double>(v));
    else hist.push_back(nullptr);  // JSON has no NaN or inf
  }
  return {{"format", fp8_format_name(format_)},
          {"recipe", cfg_.recipe},
          {"amax_compute", cfg_.amax_compute},
          {"amax_history_len", cfg_.amax_history_len},
          {"margin", cfg_.margin},
          {"scale", static_cast<double>(scale_)},
          {"amax_history", std::move(hist)},
          {"steps_recorded", steps_recorded_},
          {"scale_source_step", scale_source_step_}};
}

void Fp8TensorScaler::load_state(const nlohmann::json& j) {
  if (!j.is_object()) throw InputError("fp8 scaler state: must be a JSON object, got " + j.dump());
  expect_same(j, "format", fp8_format_name(format_), "this tensor's format");
  expect_same(j, "recipe", cfg_.recipe, "fp8.recipe");
  expect_same(j, "amax_compute", cfg_.amax_compute, "fp8.amax_compute");
  expect_same(j, "amax_history_len", cfg_.amax_history_len, "fp8.amax_history_len");
  expect_same(j, "margin", cfg_.margin, "fp8.margin");

  const auto& sv = state_field(j, "scale");
  if (!sv.is_number()) bad_state("scale", "must be a number, got " + sv.dump());
  const double scale_d = sv.get<double>();
  if (!(scale_d >= kMinScale && scale_d <= kMaxScale))
    bad_state("scale", "is " + sv.dump() + ", outside [2^-126, 2^126]");
  const float scale = static_cast<float>(scale_d);

  const auto& hv = state_field(j, "amax_history");
  if (!hv.is_array()) bad_state("amax_history", "must be an array");
  if (hv.size() > static_cast<size_t>(cfg_.amax_history_len))
    bad_state("amax_history", "has " + std::to_string(hv.size()) + " entries, more than " +
                                  "fp8.amax_history_len = " + std::to_string(cfg_.amax_history_len));
  std::deque<float> hist;
  for (const auto& e : hv) {
    if (e.is_null()) hist.push_back(std::numeric_limits<float>::quiet_NaN());
    else if (e.is_number() && !(e.get<double>() < 0.0)) hist.push_back(static_cast<float>(e.get<double>()));
    else bad_state("amax_history", "entries must be numbers >= 0 or null, got " + e.dump());
  }

  const int64_t recorded = state_int(j, "steps_recorded");
  // The history holds the last min(steps, len) amaxes.
  const int64_t expected_len = std::min<int64_t>(recorded, cfg_.amax_history_len);
  if (recorded < 0 || static_cast<int64_t>(hist.size()) != expected_len)
    bad_state("steps_recorded", "is " + std::to_string(recorded) + ", which does not fit " +
                                    std::to_string(hist.size()) + " history entries");
  const int64_t source = state_int(j, "scale_source_step");
  if (source < -1 || source >= recorded)
    bad_state("scale_source_step", "is " + std::to_string(source) + ", outside [-1, " +
                                       std::to_string(recorded - 1) + "]");
  if (source == -1 && scale != 1.0f)
    bad_state("scale", "is " + sv.dump() + " but no amax has set it (scale_source_step -1)");

  history_ = std::move(hist);
  steps_recorded_ = recorded;
  set_scale(scale, source);
}

}  // namespace mpt
