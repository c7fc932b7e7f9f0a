// Loss scaler and fp8 per-tensor scaling: host-side state machines (docs/precision.md).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "precision/fp8_scaling.h"
#include "precision/loss_scaler.h"

using namespace mpt;
using nlohmann::json;

namespace {

// Runs `body`, expects it to throw E, and returns the message.
template <typename E>
std::string thrown_message(const std::function<void()>& body) {
  try {
    body();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a different exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "did not throw";
  return {};
}

// Text round trip, as a checkpoint's state.json would do it.
json through_text(const json& j) { return json::parse(j.dump()); }

// ---------------------------------------------------------------------------------------------
// Loss scaler

struct ScalerCase {
  const char* name;
  std::function<void(LossScalerConfig&)> configure;
  const char* steps;                 // F = finite gradients, N = non-finite
  std::vector<double> scale;         // scale after each step
  std::vector<int64_t> growth;       // steps_since_growth after each step
  std::vector<int> hysteresis_left;  // empty: not checked
};

LossScalerConfig small(double init, double min_scale, double max_scale, int64_t interval) {
  LossScalerConfig c;
  c.init_scale = init;
  c.min_scale = min_scale;
  c.max_scale = max_scale;
  c.growth_interval = interval;
  return c;
}

const std::vector<ScalerCase>& scaler_cases() {
  static const std::vector<ScalerCase> cases = {
      {"grow_every_3_back_off_every_overflow",
       [](LossScalerConfig& c) { c = small(8, 1, 64, 3); },
       "FFFNFFFFFFNNNN",
       {8, 8, 16, 8, 8, 8, 16, 16, 16, 32, 16, 8, 4, 2},
       {1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 0, 0, 0, 0},
       {}},
      {"overflow_restarts_the_growth_count",
       [](LossScalerConfig& c) { c = small(8, 1, 64, 3); },
       "FFNFFNFFF",
       {8, 8, 4, 4, 4, 2, 2, 2, 4},
       {1, 2, 0, 1, 2, 0, 1, 2, 0},
       {}},
      {"clamped_at_max_scale",
       [](LossScalerConfig& c) { c = small(32, 1, 64, 1); },
       "FFFNF",
       {64, 64, 64, 32, 64},
       {0, 0, 0, 0, 0},
       {}},
      {"clamped_at_min_scale",
       [](LossScalerConfig& c) {
         c = small(8, 1, 64, 3);
         c.backoff_factor = 0.25;
       },
       "NNNF",
       {2, 1, 1, 1},
       {0, 0, 0, 1},
       {}},
      {"hysteresis_2_restored_only_by_growth",  // Megatron-LM
       [](LossScalerConfig& c) {
         c = small(16, 1, 64, 3);
         c.hysteresis = 2;
       },
       "NFNNNFFFNN",
       {16, 16, 8, 4, 2, 2, 2, 4, 4, 2},
       {0, 1, 0, 0, 0, 1, 2, 0, 0, 0},
       {1, 1, 0, 0, 0, 0, 0, 2, 1, 0}},
      {"hysteresis_2_consecutive",  // DeepSpeed consecutive_hysteresis
       [](LossScalerConfig& c) {
         c = small(16, 1, 64, 3);
         c.hysteresis = 2;
         c.consecutive_hysteresis = true;
       },
       "NFNNNFFFNN",
       {16, 16, 16, 8, 4, 4, 4, 8, 8, 4},
       {0, 1, 0, 0, 0, 1, 2, 0, 0, 0},
       {1, 2, 1, 0, 0, 2, 2, 2, 1, 0}},
      {"hysteresis_3_alternating_consecutive_never_backs_off",
       [](LossScalerConfig& c) {
         c = small(16, 1, 64, 100);
         c.hysteresis = 3;
         c.consecutive_hysteresis = true;
       },
       "NFNFNFNF",
       {16, 16, 16, 16, 16, 16, 16, 16},
       {0, 1, 0, 1, 0, 1, 0, 1},
       {2, 3, 2, 3, 2, 3, 2, 3}},
      {"hysteresis_3_alternating_not_consecutive_backs_off",
       [](LossScalerConfig& c) {
         c = small(16, 1, 64, 100);
         c.hysteresis = 3;
       },
       "NFNFNFNF",
       {16, 16, 16, 16, 8, 8, 4, 4},
       {0, 1, 0, 1, 0, 1, 0, 1},
       {2, 2, 1, 1, 0, 0, 0, 0}},
      {"static_scale_never_moves",
       [](LossScalerConfig& c) {
         c.mode = "static";
         c.init_scale = 1024;
         c.growth_interval = 1;
       },
       "NFFNNF",
       {1024, 1024, 1024, 1024, 1024, 1024},
       {0, 0, 0, 0, 0, 0},
       {}},
      {"none_is_scale_1",
       [](LossScalerConfig& c) {
         c.mode = "none";
         c.growth_interval = 1;
       },
       "FNFNN",
       {1, 1, 1, 1, 1},
       {0, 0, 0, 0, 0},
       {}},
  };
  return cases;
}

// Feeds `steps` to `s`, checking everything observable after each step against `c` from index
// `from` on.
void run_case(LossScaler& s, const ScalerCase& c, size_t from, size_t to) {
  int64_t total = 0, consecutive = 0;
  for (size_t i = 0; i < from; ++i) {
    total += c.steps[i] == 'N';
    consecutive = c.steps[i] == 'N' ? consecutive + 1 : 0;
  }
  for (size_t i = from; i < to; ++i) {
    SCOPED_TRACE(std::string(c.name) + " step " + std::to_string(i + 1));
    const bool nonfinite = c.steps[i] == 'N';
    total += nonfinite;
    consecutive = nonfinite ? consecutive + 1 : 0;
    EXPECT_EQ(s.update(nonfinite), nonfinite);
    EXPECT_EQ(s.scale(), c.scale[i]);
    EXPECT_EQ(s.inv_scale(), 1.0 / c.scale[i]);
    EXPECT_EQ(s.steps_since_growth(), c.growth[i]);
    if (!c.hysteresis_left.empty()) {
      EXPECT_EQ(s.hysteresis_left(), c.hysteresis_left[i]);
    }
    EXPECT_EQ(s.skipped_total(), total);
    EXPECT_EQ(s.consecutive_skips(), consecutive);
  }
}

TEST(LossScaler, DefaultsAreGradScalers) {
  const LossScalerConfig c;
  EXPECT_EQ(c.mode, "dynamic");
  EXPECT_EQ(c.init_scale, 65536.0);
  EXPECT_EQ(c.growth_factor, 2.0);
  EXPECT_EQ(c.backoff_factor, 0.5);
  EXPECT_EQ(c.growth_interval, 2000);
  EXPECT_EQ(c.hysteresis, 1);
  EXPECT_FALSE(c.consecutive_hysteresis);

  LossScaler s(c);
  EXPECT_EQ(s.scale(), 65536.0);
  EXPECT_EQ(s.inv_scale(), 1.0 / 65536.0);
  for (int i = 0; i < 1999; ++i) ASSERT_FALSE(s.update(false));
  EXPECT_EQ(s.scale(), 65536.0);
  EXPECT_EQ(s.steps_since_growth(), 1999);
  EXPECT_FALSE(s.update(false));
  EXPECT_EQ(s.scale(), 131072.0);
  EXPECT_EQ(s.steps_since_growth(), 0);
  EXPECT_TRUE(s.update(true));
  EXPECT_EQ(s.scale(), 65536.0);
  EXPECT_EQ(s.skipped_total(), 1);
}

TEST(LossScaler, TableDrivenSequences) {
  for (const auto& c : scaler_cases()) {
    ASSERT_EQ(std::string(c.steps).size(), c.scale.size()) << c.name;
    ASSERT_EQ(c.scale.size(), c.growth.size()) << c.name;
    LossScalerConfig cfg;
    c.configure(cfg);
    LossScaler s(cfg);
    run_case(s, c, 0, c.scale.size());
  }
}

TEST(LossScaler, StateRoundTripMidSequenceContinuesIdentically) {
  for (const auto& c : scaler_cases()) {
    LossScalerConfig cfg;
    c.configure(cfg);
    for (size_t cut = 0; cut <= c.scale.size(); ++cut) {
      SCOPED_TRACE(std::string(c.name) + " cut at " + std::to_string(cut));
      LossScaler a(cfg);
      run_case(a, c, 0, cut);
      LossScaler b(cfg);
      b.load_state(through_text(a.state()));
      EXPECT_EQ(b.state(), a.state());
      run_case(b, c, cut, c.scale.size());
      run_case(a, c, cut, c.scale.size());
      EXPECT_EQ(b.state(), a.state());
    }
  }
}

TEST(LossScaler, StopsAfterRepeatedOverflowsAtMinScale) {
  LossScalerConfig cfg = small(1, 0.25, 64, 100);
  cfg.max_consecutive_min_scale_skips = 3;
  LossScaler s(cfg);
  EXPECT_TRUE(s.update(true));  // 1 -> 0.5
  EXPECT_TRUE(s.update(true));  // 0.5 -> 0.25: reaching the minimum is not yet a skip at it
  EXPECT_EQ(s.scale(), 0.25);
  EXPECT_TRUE(s.update(true));  // at the minimum: 1
  EXPECT_TRUE(s.update(true));  // 2
  EXPECT_FALSE(s.update(false));  // a finite step breaks the run of overflows
  EXPECT_TRUE(s.update(true));  // 1
  EXPECT_TRUE(s.update(true));  // 2
  const std::string msg = thrown_message<RuntimeError>([&] { s.update(true); });  // 3
  EXPECT_NE(msg.find("0.25"), std::string::npos) << msg;
  EXPECT_NE(msg.find("3 steps in a row"), std::string::npos) << msg;
  EXPECT_NE(msg.find("learning rate"), std::string::npos) << msg;
  EXPECT_NE(msg.find("bf16"), std::string::npos) << msg;
  EXPECT_NE(msg.find("data"), std::string::npos) << msg;
}

TEST(LossScaler, StopsAfterExactlyTheConfiguredCountWithDefaults) {
  LossScalerConfig cfg;
  cfg.init_scale = 1;  // already at min_scale = 1
  LossScaler s(cfg);
  for (int i = 1; i < cfg.max_consecutive_min_scale_skips; ++i) ASSERT_TRUE(s.update(true)) << i;
  EXPECT_EQ(s.consecutive_skips(), cfg.max_consecutive_min_scale_skips - 1);
  const std::string msg = thrown_message<RuntimeError>([&] { s.update(true); });
  EXPECT_NE(msg.find("minimum 1 "), std::string::npos) << msg;
  EXPECT_NE(msg.find("10 steps in a row"), std::string::npos) << msg;
}

TEST(LossScaler, StaticAndNoneStopWhenEveryStepOverflows) {
  for (const char* mode : {"static", "none"}) {
    LossScalerConfig cfg;
    cfg.mode = mode;
    cfg.init_scale = 512;
    cfg.max_consecutive_min_scale_skips = 2;
    LossScaler s(cfg);
    EXPECT_TRUE(s.update(true));
    EXPECT_FALSE(s.update(false));
    EXPECT_TRUE(s.update(true));
    const std::string msg = thrown_message<RuntimeError>([&] { s.update(true); });
    EXPECT_NE(msg.find(std::string(mode) == "static" ? "512" : "scale 1"), std::string::npos)
        << msg;
  }
}

TEST(LossScaler, MalformedStateIsInputError) {
  LossScalerConfig cfg = small(8, 1, 64, 3);
  LossScaler good(cfg);
  good.update(true);
  good.update(false);
  const json base = good.state();

  struct Bad {
    std::function<void(json&)> edit;
    const char* mentions;
  };
  const std::vector<Bad> bads = {
      {[](json& j) { j = json::array(); }, "JSON object"},
      {[](json& j) { j.erase("scale"); }, "'scale' is missing"},
      {[](json& j) { j["scale"] = "big"; }, "'scale'"},
      {[](json& j) { j["scale"] = 128.0; }, "'scale'"},       // above max_scale
      {[](json& j) { j["scale"] = 0.5; }, "'scale'"},         // below min_scale
      {[](json& j) { j["mode"] = "static"; }, "'mode'"},
      {[](json& j) { j.erase("mode"); }, "'mode' is missing"},
      {[](json& j) { j["growth_tracker"] = 3; }, "'growth_tracker'"},  // interval is 3
      {[](json& j) { j["growth_tracker"] = 1.5; }, "'growth_tracker'"},
      {[](json& j) { j.erase("hysteresis_left"); }, "'hysteresis_left' is missing"},
      {[](json& j) { j["hysteresis_left"] = 2; }, "'hysteresis_left'"},
      {[](json& j) { j["skipped_total"] = -1; }, "'skipped_total'"},
      {[](json& j) { j["skipped_total"] = 18446744073709551615ull; }, "'skipped_total'"},
      {[](json& j) { j["consecutive_skips"] = 5; }, "'consecutive_skips'"},  // > total
      {[](json& j) { j["min_scale_skips"] = 1; }, "'min_scale_skips'"},      // > consecutive
  };
  for (const auto& b : bads) {
    json j = base;
    b.edit(j);
    LossScaler s(cfg);
    const std::string msg = thrown_message<InputError>([&] { s.load_state(j); });
    EXPECT_NE(msg.find(b.mentions), std::string::npos) << j.dump() << " -> " << msg;
    EXPECT_EQ(s.state(), LossScaler(cfg).state()) << "a failed load must not change the state";
  }

  LossScalerConfig st;
  st.mode = "static";
  st.init_scale = 1024;
  LossScaler s(st);
  json j = s.state();
  j["scale"] = 2048.0;
  EXPECT_NE(thrown_message<InputError>([&] { s.load_state(j); }).find("fixes it at 1024"),
            std::string::npos);
}

TEST(LossScaler, BadConfigNamesTheField) {
  struct Bad {
    std::function<void(LossScalerConfig&)> edit;
    const char* field;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<Bad> bads = {
      {[](LossScalerConfig& c) { c.mode = "auto"; }, "loss_scale.mode"},
      {[](LossScalerConfig& c) { c.growth_factor = 1.0; }, "loss_scale.growth_factor"},
      {[&](LossScalerConfig& c) { c.growth_factor = inf; }, "loss_scale.growth_factor"},
      {[](LossScalerConfig& c) { c.backoff_factor = 1.0; }, "loss_scale.backoff_factor"},
      {[](LossScalerConfig& c) { c.backoff_factor = 0.0; }, "loss_scale.backoff_factor"},
      {[&](LossScalerConfig& c) { c.backoff_factor = nan; }, "loss_scale.backoff_factor"},
      {[](LossScalerConfig& c) { c.growth_interval = 0; }, "loss_scale.growth_interval"},
      {[](LossScalerConfig& c) { c.hysteresis = 0; }, "loss_scale.hysteresis"},
      {[](LossScalerConfig& c) { c.min_scale = 0; }, "loss_scale.min_scale"},
      {[](LossScalerConfig& c) { c.max_scale = 0.5; }, "loss_scale.max_scale"},
      {[&](LossScalerConfig& c) { c.max_scale = inf; }, "loss_scale.max_scale"},
      {[](LossScalerConfig& c) { c.init_scale = 0.5; }, "loss_scale.init_scale"},
      {[](LossScalerConfig& c) { c.init_scale = 1 << 30; }, "loss_scale.init_scale"},
      {[&](LossScalerConfig& c) { c.init_scale = nan; }, "loss_scale.init_scale"},
      {[](LossScalerConfig& c) {
         c.mode = "static";
         c.init_scale = -1;
       },
       "loss_scale.init_scale"},
      {[](LossScalerConfig& c) { c.max_consecutive_min_scale_skips = 0; },
       "loss_scale.max_consecutive_min_scale_skips"},
  };
  for (const auto& b : bads) {
    LossScalerConfig c;
    b.edit(c);
    const std::string msg = thrown_message<InputError>([&] { LossScaler s(c); });
    EXPECT_EQ(msg.rfind(b.field, 0), 0u) << msg;
  }
  // A static scale is not bound by the dynamic range [min_scale, max_scale].
  LossScalerConfig c;
  c.mode = "static";
  c.init_scale = 1 << 30;
  EXPECT_EQ(LossScaler(c).scale(), double(1 << 30));
}

// ---------------------------------------------------------------------------------------------
// fp8 scaling

Fp8ScalingConfig fp8cfg(const char* recipe, int len, const char* compute, int margin) {
  Fp8ScalingConfig c;
  c.recipe = recipe;
  c.amax_history_len = len;
  c.amax_compute = compute;
  c.margin = margin;
  return c;
}

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

TEST(Fp8Scaling, FormatMaxima) {
  EXPECT_EQ(fp8_max(Fp8Format::e4m3), 448.0f);
  EXPECT_EQ(fp8_max(Fp8Format::e5m2), 57344.0f);
  Fp8TensorScaler a(Fp8ScalingConfig{}, Fp8Format::e4m3), b(Fp8ScalingConfig{}, Fp8Format::e5m2);
  a.record(1.0f);
  b.record(1.0f);
  EXPECT_EQ(a.scale(), 448.0f);
  EXPECT_EQ(b.scale(), 57344.0f);
  EXPECT_EQ(b.scale_inv(), 1.0f / 57344.0f);
}

TEST(Fp8Scaling, DefaultsAndInitialScale) {
  const Fp8ScalingConfig c;
  EXPECT_EQ(c.recipe, "delayed");
  EXPECT_EQ(c.amax_history_len, 16);
  EXPECT_EQ(c.amax_compute, "max");
  EXPECT_EQ(c.margin, 0);
  Fp8TensorScaler s(c, Fp8Format::e4m3);
  EXPECT_EQ(s.scale(), 1.0f);
  EXPECT_EQ(s.scale_inv(), 1.0f);
  EXPECT_EQ(s.steps_since_amax_max(), -1);
  EXPECT_EQ(s.last_amax(), 0.0f);
}

TEST(Fp8Scaling, DelayedScaleForStepTIgnoresAmaxT) {
  const std::vector<float> amax = {2.0f, 3.0f, 1.0f, 50.0f, 0.5f, 7.0f};
  for (const char* compute : {"max", "most_recent"}) {
    Fp8TensorScaler a(fp8cfg("delayed", 4, compute, 0), Fp8Format::e4m3);
    Fp8TensorScaler b(fp8cfg("delayed", 4, compute, 0), Fp8Format::e4m3);
    for (size_t t = 0; t < amax.size(); ++t) {
      SCOPED_TRACE(std::string(compute) + " step " + std::to_string(t));
      // The scale used in step t is fixed before step t's amax exists.
      EXPECT_EQ(a.scale(), b.scale());
      float expected_prev = 1.0f;
      if (t > 0) {
        float m = 0.0f;
        for (size_t k = (t >= 4 ? t - 4 : 0); k < t; ++k) m = std::max(m, amax[k]);
        expected_prev = 448.0f / (std::string(compute) == "max" ? m : amax[t - 1]);
      }
      EXPECT_EQ(a.scale(), expected_prev);
      a.record(amax[t]);
      b.record(amax[t] * 1000.0f);  // a different amax in step t only...
      b.load_state(a.state());      // ...is forgotten; both continue from a's history
    }
  }
}

TEST(Fp8Scaling, HistoryWindowForgetsAfterHSteps) {
  Fp8TensorScaler s(fp8cfg("delayed", 3, "max", 0), Fp8Format::e4m3);
  s.record(8.0f);
  EXPECT_EQ(s.scale(), 56.0f);
  s.record(1.0f);
  s.record(1.0f);
  EXPECT_EQ(s.scale(), 56.0f);  // 8 is still one of the last 3
  EXPECT_EQ(s.steps_since_amax_max(), 2);
  s.record(1.0f);
  EXPECT_EQ(s.scale(), 448.0f);  // 8 has left the window
  EXPECT_EQ(s.steps_since_amax_max(), 0);
}

TEST(Fp8Scaling, MostRecentVersusMax) {
  Fp8TensorScaler mx(fp8cfg("delayed", 16, "max", 0), Fp8Format::e4m3);
  Fp8TensorScaler mr(fp8cfg("delayed", 16, "most_recent", 0), Fp8Format::e4m3);
  for (float a : {8.0f, 1.0f}) {
    mx.record(a);
    mr.record(a);
  }
  EXPECT_EQ(mx.scale(), 56.0f);
  EXPECT_EQ(mr.scale(), 448.0f);
  EXPECT_EQ(mx.steps_since_amax_max(), 1);
  EXPECT_EQ(mr.steps_since_amax_max(), 0);
}

TEST(Fp8Scaling, MarginHalvesTheScalePerUnit) {
  for (int margin = 0; margin <= 4; ++margin) {
    Fp8TensorScaler s(fp8cfg("delayed", 16, "max", margin), Fp8Format::e5m2);
    s.record(3.0f);
    EXPECT_EQ(s.scale(), std::ldexp(57344.0f / 3.0f, -margin)) << margin;
    EXPECT_EQ(s.scale_inv(), 1.0f / s.scale());
  }
}

TEST(Fp8Scaling, ZeroOrNonFiniteAmaxKeepsThePreviousScale) {
  for (const char* compute : {"max", "most_recent"}) {
    SCOPED_TRACE(compute);
    Fp8TensorScaler s(fp8cfg("delayed", 1, compute, 0), Fp8Format::e4m3);
    s.record(0.0f);  // nothing has set the scale yet
    EXPECT_EQ(s.scale(), 1.0f);
    EXPECT_EQ(s.steps_since_amax_max(), -1);
    s.record(4.0f);
    EXPECT_EQ(s.scale(), 112.0f);
    int64_t stale = 0;
    for (float bad : {0.0f, kNaN, kInf}) {
      s.record(bad);
      EXPECT_EQ(s.scale(), 112.0f);
      EXPECT_EQ(s.scale_inv(), 1.0f / 112.0f);
      EXPECT_EQ(s.steps_since_amax_max(), ++stale);  // the 4 grows older
    }
    EXPECT_TRUE(std::isinf(s.last_amax()));
  }
  // `max` over a longer history skips the non-finite entry.
  Fp8TensorScaler s(fp8cfg("delayed", 4, "max", 0), Fp8Format::e4m3);
  s.record(2.0f);
  s.record(kNaN);
  s.record(kInf);
  EXPECT_EQ(s.scale(), 224.0f);
  EXPECT_EQ(s.steps_since_amax_max(), 2);
  EXPECT_TRUE(std::isfinite(s.scale()));
}

TEST(Fp8Scaling, ScaleStaysANormalFloat) {
  Fp8TensorScaler tiny(fp8cfg("delayed", 1, "max", 0), Fp8Format::e5m2);
  tiny.record(1e-44f);  // subnormal: 57344 / amax overflows fp32
  EXPECT_EQ(tiny.scale(), 0x1p126f);
  EXPECT_EQ(tiny.scale_inv(), 0x1p-126f);
  Fp8TensorScaler huge(fp8cfg("delayed", 1, "max", 16), Fp8Format::e4m3);
  huge.record(std::numeric_limits<float>::max());
  EXPECT_EQ(huge.scale(), 0x1p-126f);
  EXPECT_EQ(huge.scale_inv(), 0x1p126f);
}

TEST(Fp8Scaling, CurrentScalingUsesTheStepsOwnAmax) {
  Fp8TensorScaler s(fp8cfg("current", 16, "max", 0), Fp8Format::e4m3);
  EXPECT_EQ(s.scale_for_current(2.0f), 224.0f);
  EXPECT_EQ(s.scale_for_current(3.0f), 448.0f / 3.0f);
  EXPECT_EQ(s.scale(), 1.0f);  // scale_for_current changes nothing
  for (float a : {100.0f, 1.0f, 7.0f}) {
    const float used = s.scale_for_current(a);
    s.record(a);
    EXPECT_EQ(s.scale(), used);  // no history maximum: 100 does not linger
    EXPECT_EQ(s.scale(), 448.0f / a);
    EXPECT_EQ(s.steps_since_amax_max(), 0);
    EXPECT_EQ(s.last_amax(), a);
  }
  EXPECT_EQ(s.scale_for_current(0.0f), s.scale());
  EXPECT_EQ(s.scale_for_current(kNaN), s.scale());
  s.record(kInf);
  EXPECT_EQ(s.scale(), 64.0f);
  EXPECT_EQ(s.steps_since_amax_max(), 1);

  Fp8TensorScaler m(fp8cfg("current", 16, "max", 2), Fp8Format::e5m2);
  EXPECT_EQ(m.scale_for_current(7.0f), 57344.0f / 7.0f / 4.0f);
}

TEST(Fp8Scaling, StalenessTracksTheAgeOfTheMaximum) {
  Fp8TensorScaler s(fp8cfg("delayed", 4, "max", 0), Fp8Format::e4m3);
  const std::vector<float> amax = {10, 1, 1, 1, 1, 5, 5, 2};
  const std::vector<int64_t> stale = {0, 1, 2, 3, 0, 0, 0, 1};  // ties: the newest occurrence
  for (size_t t = 0; t < amax.size(); ++t) {
    s.record(amax[t]);
    EXPECT_EQ(s.steps_since_amax_max(), stale[t]) << t;
    EXPECT_EQ(s.steps_recorded(), static_cast<int64_t>(t + 1));
  }
}

TEST(Fp8Scaling, StateRoundTripContinuesIdentically) {
  const std::vector<float> amax = {3, 0, 9, kNaN, 2, 1, kInf, 4, 0.25f, 6, 6, 1};
  for (const char* recipe : {"delayed", "current"}) {
    for (const char* compute : {"max", "most_recent"}) {
      const Fp8ScalingConfig cfg = fp8cfg(recipe, 3, compute, 1);
      for (size_t cut = 0; cut <= amax.size(); ++cut) {
        SCOPED_TRACE(std::string(recipe) + "/" + compute + " cut " + std::to_string(cut));
        Fp8TensorScaler a(cfg, Fp8Format::e4m3);
        for (size_t t = 0; t < cut; ++t) a.record(amax[t]);
        Fp8TensorScaler b(cfg, Fp8Format::e4m3);
        b.load_state(through_text(a.state()));
        EXPECT_EQ(b.state().dump(), a.state().dump());
        for (size_t t = cut; t < amax.size(); ++t) {
          a.record(amax[t]);
          b.record(amax[t]);
          EXPECT_EQ(a.scale(), b.scale());
          EXPECT_EQ(a.scale_inv(), b.scale_inv());
          EXPECT_EQ(a.steps_since_amax_max(), b.steps_since_amax_max());
          EXPECT_EQ(a.steps_recorded(), b.steps_recorded());
        }
        EXPECT_EQ(b.state().dump(), a.state().dump());
      }
    }
  }
}

TEST(Fp8Scaling, MalformedStateIsInputError) {
  const Fp8ScalingConfig cfg = fp8cfg("delayed", 3, "max", 0);
  Fp8TensorScaler good(cfg, Fp8Format::e4m3);
  for (float a : {1.0f, 2.0f, 3.0f, 4.0f}) good.record(a);
  const json base = good.state();

  struct Bad {
    std::function<void(json&)> edit;
    const char* mentions;
  };
  const std::vector<Bad> bads = {
      {[](json& j) { j = 1; }, "JSON object"},
      {[](json& j) { j["format"] = "e5m2"; }, "'format'"},
      {[](json& j) { j["recipe"] = "current"; }, "'recipe'"},
      {[](json& j) { j["amax_compute"] = "most_recent"; }, "'amax_compute'"},
      {[](json& j) { j["amax_history_len"] = 4; }, "'amax_history_len'"},
      {[](json& j) { j["margin"] = 1; }, "'margin'"},
      {[](json& j) { j.erase("scale"); }, "'scale' is missing"},
      {[](json& j) { j["scale"] = 0.0; }, "'scale'"},
      {[](json& j) { j["scale"] = nullptr; }, "'scale'"},
      {[](json& j) { j["amax_history"] = "x"; }, "'amax_history'"},
      {[](json& j) { j["amax_history"] = {1, 2, 3, 4}; }, "'amax_history'"},
      {[](json& j) { j["amax_history"] = {1, -2, 3}; }, "'amax_history'"},
      {[](json& j) { j["amax_history"] = {1, "2", 3}; }, "'amax_history'"},
      {[](json& j) { j["steps_recorded"] = 2; }, "'steps_recorded'"},
      {[](json& j) { j.erase("steps_recorded"); }, "'steps_recorded' is missing"},
      {[](json& j) { j["scale_source_step"] = 4; }, "'scale_source_step'"},
      {[](json& j) { j["scale_source_step"] = -2; }, "'scale_source_step'"},
      {[](json& j) { j["scale_source_step"] = -1; }, "'scale'"},  // no source but scale != 1
  };
  for (const auto& b : bads) {
    json j = base;
    b.edit(j);
    Fp8TensorScaler s(cfg, Fp8Format::e4m3);
    const std::string msg = thrown_message<InputError>([&] { s.load_state(j); });
    EXPECT_NE(msg.find(b.mentions), std::string::npos) << j.dump() << " -> " << msg;
    EXPECT_EQ(s.state(), Fp8TensorScaler(cfg, Fp8Format::e4m3).state());
  }
}

TEST(Fp8Scaling, BadConfigNamesTheField) {
  struct Bad {
    Fp8ScalingConfig cfg;
    const char* field;
  };
  const std::vector<Bad> bads = {
      {fp8cfg("just-in-time", 16, "max", 0), "fp8.recipe"},
      {fp8cfg("delayed", 16, "mean", 0), "fp8.amax_compute"},
      {fp8cfg("delayed", 0, "max", 0), "fp8.amax_history_len"},
      {fp8cfg("delayed", 65537, "max", 0), "fp8.amax_history_len"},
      {fp8cfg("delayed", 16, "max", -1), "fp8.margin"},
      {fp8cfg("delayed", 16, "max", 17), "fp8.margin"},
  };
  for (const auto& b : bads) {
    const std::string msg =
        thrown_message<InputError>([&] { Fp8TensorScaler s(b.cfg, Fp8Format::e4m3); });
    EXPECT_EQ(msg.rfind(b.field, 0), 0u) << msg;
  }
}

TEST(Fp8Scaling, NegativeAmaxIsABug) {
  Fp8TensorScaler s(Fp8ScalingConfig{}, Fp8Format::e4m3);
  EXPECT_THROW(s.record(-1.0f), RuntimeError);
}

}  // namespace
