// Tests of PrecisionPolicy: the presets' fields, the config's dtypes/loss_scale/fp8 overrides
// applied on top of them, the combinations rejected as problems, the keys reported as having no
// effect, and the warnings for legal but risky or pointless combinations.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "config/config.h"
#include "core/error.h"
#include "precision/policy.h"

using mpt::Config;
using mpt::DType;
using mpt::InputError;
using mpt::MatmulPrecision;
using mpt::PrecisionPolicy;

namespace {

using KeyProblems = std::vector<std::pair<std::string, std::string>>;

// A config with the given precision and the changes applied, as a test writes it in one line.
Config config(const std::string& precision, const std::function<void(Config&)>& change = {}) {
  Config c;
  c.precision = precision;
  if (change) change(c);
  return c;
}

std::vector<std::string> warnings_of(const Config& c) {
  std::vector<std::string> w;
  PrecisionPolicy::from_config(c, &w);
  return w;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out;
}

bool has_key(const KeyProblems& found, const std::string& key) {
  return std::any_of(found.begin(), found.end(), [&](const auto& p) { return p.first == key; });
}

std::string message_at(const KeyProblems& found, const std::string& key) {
  for (const auto& [k, m] : found)
    if (k == key) return m;
  return "";
}

// ---------------------------------------------------------------------------------------------
// Presets

struct PresetFields {
  const char* name;
  DType param, activation, grad;
  bool master;
  MatmulPrecision matmul;
  bool stochastic_rounding;
  const char* loss_scale_mode;
};

const std::vector<PresetFields> kPresets = {
    {"fp32", DType::f32, DType::f32, DType::f32, false, MatmulPrecision::native, false, "none"},
    {"tf32", DType::f32, DType::f32, DType::f32, false, MatmulPrecision::tf32, false, "none"},
    {"fp16", DType::f16, DType::f16, DType::f32, true, MatmulPrecision::native, false, "dynamic"},
    {"bf16", DType::bf16, DType::bf16, DType::f32, true, MatmulPrecision::native, false, "none"},
    {"bf16-pure", DType::bf16, DType::bf16, DType::bf16, false, MatmulPrecision::native, true,
     "none"},
    {"fp8", DType::bf16, DType::bf16, DType::f32, true, MatmulPrecision::fp8, false, "none"},
};

TEST(Policy, PresetFields) {
  ASSERT_EQ(PrecisionPolicy::preset_names().size(), kPresets.size());
  for (const auto& e : kPresets) {
    SCOPED_TRACE(e.name);
    const PrecisionPolicy p = PrecisionPolicy::preset(e.name);
    EXPECT_EQ(p.name, e.name);
    EXPECT_EQ(p.param, e.param);
    EXPECT_EQ(p.activation, e.activation);
    EXPECT_EQ(p.grad, e.grad);
    EXPECT_EQ(p.master_weights, e.master);
    EXPECT_EQ(p.matmul, e.matmul);
    EXPECT_EQ(p.stochastic_rounding, e.stochastic_rounding);
    EXPECT_EQ(p.loss_scale.mode, e.loss_scale_mode);
    EXPECT_EQ(p.optimizer_state, DType::f32);
  }
  const PrecisionPolicy fp8 = PrecisionPolicy::preset("fp8");
  EXPECT_TRUE(fp8.fp8.hybrid);
  EXPECT_EQ(fp8.fp8.grad_format(), DType::e5m2);
  EXPECT_FALSE(fp8.fp8.lm_head_fp8);
  EXPECT_FALSE(fp8.fp8.first_last_blocks_bf16);
  EXPECT_THROW(PrecisionPolicy::preset("fp64"), InputError);
}

// The config's defaults ("preset" everywhere, the sections' default numbers) resolve to exactly
// the preset, and a preset on its own is never warned about.
TEST(Policy, DefaultConfigResolvesToThePresetWithoutWarnings) {
  for (const auto& name : PrecisionPolicy::preset_names()) {
    SCOPED_TRACE(name);
    const Config c = config(name);
    std::vector<std::string> warnings;
    const PrecisionPolicy p = PrecisionPolicy::from_config(c, &warnings);
    EXPECT_EQ(p.to_json(), PrecisionPolicy::preset(name).to_json());
    EXPECT_TRUE(warnings.empty()) << joined(warnings);
    EXPECT_TRUE(PrecisionPolicy::problems(c).empty());
  }
  // to_json leaves out the fp8 recipe of non-fp8 policies; compare it field by field.
  const PrecisionPolicy a = PrecisionPolicy::from_config(config("fp8"));
  const PrecisionPolicy b = PrecisionPolicy::preset("fp8");
  EXPECT_EQ(a.fp8.hybrid, b.fp8.hybrid);
  EXPECT_EQ(a.fp8.lm_head_fp8, b.fp8.lm_head_fp8);
  EXPECT_EQ(a.fp8.first_last_blocks_bf16, b.fp8.first_last_blocks_bf16);
  EXPECT_EQ(a.fp8.scaling.recipe, b.fp8.scaling.recipe);
  EXPECT_EQ(a.fp8.scaling.amax_history_len, b.fp8.scaling.amax_history_len);
  EXPECT_EQ(a.fp8.scaling.amax_compute, b.fp8.scaling.amax_compute);
  EXPECT_EQ(a.fp8.scaling.margin, b.fp8.scaling.margin);
}

TEST(Policy, ToJsonHoldsEveryResolvedField) {
  const PrecisionPolicy p = PrecisionPolicy::from_config(config("fp8", [](Config& c) {
    c.fp8.scaling.recipe = "current";
    c.loss_scale.max_consecutive_min_scale_skips = 3;
  }));
  const nlohmann::json j = p.to_json();
  EXPECT_EQ(j["name"], "fp8");
  EXPECT_EQ(j["param"], "bf16");
  EXPECT_EQ(j["master_weights"], true);
  EXPECT_EQ(j["matmul"], "fp8");
  EXPECT_EQ(j["stochastic_rounding"], false);
  EXPECT_EQ(j["loss_scale"]["mode"], "none");
  // The scaler acts even without scaling: it skips non-finite steps and stops after this many.
  EXPECT_EQ(j["loss_scale"]["max_consecutive_min_scale_skips"], 3);
  EXPECT_EQ(j["loss_scale"].size(), 10u);
  EXPECT_EQ(j["fp8"]["recipe"], "current");
  EXPECT_EQ(j["fp8"]["format"], "hybrid");
  EXPECT_EQ(j["fp8"].size(), 7u);
  EXPECT_FALSE(PrecisionPolicy::preset("bf16").to_json().contains("fp8"));
}

// ---------------------------------------------------------------------------------------------
// Overrides

TEST(Policy, DtypeOverridesAndMasterResolution) {
  struct Case {
    const char* name;
    Config cfg;
    DType param, activation, grad;
    bool master, stochastic_rounding;
  };
  const std::vector<Case> cases = {
      {"fp16_without_master", config("fp16", [](Config& c) { c.dtypes.master = "none"; }),
       DType::f16, DType::f16, DType::f32, false, false},
      // bf16 weights without a master are rounded stochastically, as in bf16-pure.
      {"bf16_without_master", config("bf16", [](Config& c) { c.dtypes.master = "none"; }),
       DType::bf16, DType::bf16, DType::f32, false, true},
      {"bf16_pure_with_master", config("bf16-pure", [](Config& c) { c.dtypes.master = "fp32"; }),
       DType::bf16, DType::bf16, DType::bf16, true, false},
      // fp32 weights drop the preset's master instead of copying fp32 weights.
      {"fp16_with_fp32_weights", config("fp16", [](Config& c) { c.dtypes.param = "fp32"; }),
       DType::f32, DType::f16, DType::f32, false, false},
      {"fp32_with_bf16_weights", config("fp32", [](Config& c) { c.dtypes.param = "bf16"; }),
       DType::bf16, DType::f32, DType::f32, false, true},
      {"fp32_with_bf16_weights_and_master", config("fp32", [](Config& c) {
         c.dtypes.param = "bf16";
         c.dtypes.master = "fp32";
       }),
       DType::bf16, DType::f32, DType::f32, true, false},
      {"fp8_with_fp16_grads", config("fp8", [](Config& c) { c.dtypes.grad = "fp16"; }),
       DType::bf16, DType::bf16, DType::f16, true, false},
      {"bf16_with_fp16_activations",
       config("bf16", [](Config& c) { c.dtypes.activation = "fp16"; }),
       DType::bf16, DType::f16, DType::f32, true, false},
  };
  for (const auto& e : cases) {
    SCOPED_TRACE(e.name);
    const PrecisionPolicy p = PrecisionPolicy::from_config(e.cfg);
    EXPECT_EQ(p.name, e.cfg.precision);
    EXPECT_EQ(p.param, e.param);
    EXPECT_EQ(p.activation, e.activation);
    EXPECT_EQ(p.grad, e.grad);
    EXPECT_EQ(p.master_weights, e.master);
    EXPECT_EQ(p.stochastic_rounding, e.stochastic_rounding);
    // The matmul precision is the preset's whatever the dtypes.
    EXPECT_EQ(p.matmul, PrecisionPolicy::preset(e.cfg.precision).matmul);
  }
}

TEST(Policy, LossScaleOverrides) {
  EXPECT_EQ(PrecisionPolicy::from_config(config("fp16")).loss_scale.mode, "dynamic");
  EXPECT_EQ(PrecisionPolicy::from_config(config("bf16")).loss_scale.mode, "none");
  const PrecisionPolicy p = PrecisionPolicy::from_config(config("fp16", [](Config& c) {
    c.loss_scale.mode = "dynamic";
    c.loss_scale.init_scale = 1024;
    c.loss_scale.growth_factor = 4;
    c.loss_scale.backoff_factor = 0.25;
    c.loss_scale.growth_interval = 100;
    c.loss_scale.hysteresis = 2;
    c.loss_scale.consecutive_hysteresis = true;
    c.loss_scale.min_scale = 2;
    c.loss_scale.max_scale = 4096;
    c.loss_scale.max_consecutive_min_scale_skips = 5;
  }));
  EXPECT_EQ(p.loss_scale.mode, "dynamic");
  EXPECT_EQ(p.loss_scale.init_scale, 1024);
  EXPECT_EQ(p.loss_scale.growth_factor, 4);
  EXPECT_EQ(p.loss_scale.backoff_factor, 0.25);
  EXPECT_EQ(p.loss_scale.growth_interval, 100);
  EXPECT_EQ(p.loss_scale.hysteresis, 2);
  EXPECT_TRUE(p.loss_scale.consecutive_hysteresis);
  EXPECT_EQ(p.loss_scale.min_scale, 2);
  EXPECT_EQ(p.loss_scale.max_scale, 4096);
  EXPECT_EQ(p.loss_scale.max_consecutive_min_scale_skips, 5);
  EXPECT_EQ(PrecisionPolicy::from_config(config("fp16", [](Config& c) {
              c.loss_scale.mode = "static";
            })).loss_scale.mode,
            "static");
  EXPECT_EQ(PrecisionPolicy::from_config(config("fp16", [](Config& c) {
              c.loss_scale.mode = "none";
            })).loss_scale.mode,
            "none");
}

TEST(Policy, Fp8Overrides) {
  const PrecisionPolicy p = PrecisionPolicy::from_config(config("fp8", [](Config& c) {
    c.fp8.format = "e4m3";
    c.fp8.scaling.recipe = "current";
    c.fp8.scaling.amax_history_len = 4;
    c.fp8.scaling.amax_compute = "most_recent";
    c.fp8.scaling.margin = 2;
    c.fp8.lm_head = "fp8";
    c.fp8.first_last_blocks = "bf16";
  }));
  EXPECT_FALSE(p.fp8.hybrid);
  EXPECT_EQ(p.fp8.grad_format(), DType::e4m3);
  EXPECT_EQ(p.fp8.scaling.recipe, "current");
  EXPECT_EQ(p.fp8.scaling.amax_history_len, 4);
  EXPECT_EQ(p.fp8.scaling.amax_compute, "most_recent");
  EXPECT_EQ(p.fp8.scaling.margin, 2);
  EXPECT_TRUE(p.fp8.lm_head_fp8);
  EXPECT_TRUE(p.fp8.first_last_blocks_bf16);
}

// ---------------------------------------------------------------------------------------------
// Problems

TEST(Policy, ProblemsNameTheirKey) {
  struct Case {
    const char* name;
    Config cfg;
    const char* key;
    const char* message_part;
  };
  const std::vector<Case> cases = {
      {"master_of_fp32_weights", config("fp32", [](Config& c) { c.dtypes.master = "fp32"; }),
       "dtypes.master", "a master copy of fp32 weights is pointless"},
      {"master_of_weights_made_fp32", config("bf16", [](Config& c) {
         c.dtypes.param = "fp32";
         c.dtypes.master = "fp32";
       }),
       "dtypes.master", "dtypes.param resolves to fp32 for precision bf16"},
      {"unknown_precision", config("fp64"), "precision", "unknown value 'fp64'"},
      {"unknown_dtype", config("fp32", [](Config& c) { c.dtypes.grad = "fp8"; }), "dtypes.grad",
       "unknown value 'fp8' (choices: preset, fp32, fp16, bf16)"},
      {"unknown_master", config("fp16", [](Config& c) { c.dtypes.master = "bf16"; }),
       "dtypes.master", "choices: preset, fp32, none"},
      {"unknown_loss_scale_mode", config("fp16", [](Config& c) { c.loss_scale.mode = "auto"; }),
       "loss_scale.mode", "choices: preset, dynamic, static, none"},
      {"unknown_fp8_format", config("fp8", [](Config& c) { c.fp8.format = "e5m2"; }),
       "fp8.format", "choices: hybrid, e4m3"},
      {"unknown_lm_head", config("fp8", [](Config& c) { c.fp8.lm_head = "fp16"; }),
       "fp8.lm_head", "choices: bf16, fp8"},
      // The scalers' own messages, at their fields.
      {"max_scale_below_min_scale", config("fp16", [](Config& c) {
         c.loss_scale.min_scale = 8;
         c.loss_scale.max_scale = 4;
       }),
       "loss_scale.max_scale", ">= min_scale (8), got 4"},
      {"init_scale_outside_dynamic_range",
       config("fp16", [](Config& c) { c.loss_scale.min_scale = 1e5; }), "loss_scale.init_scale",
       "must be within [min_scale, max_scale]"},
      {"growth_factor_one", config("fp16", [](Config& c) { c.loss_scale.growth_factor = 1; }),
       "loss_scale.growth_factor", "got 1"},
      {"margin_too_large", config("fp8", [](Config& c) { c.fp8.scaling.margin = 17; }),
       "fp8.margin", "must be in [0, 16], got 17"},
      {"history_empty", config("fp8", [](Config& c) { c.fp8.scaling.amax_history_len = 0; }),
       "fp8.amax_history_len", "got 0"},
  };
  for (const auto& e : cases) {
    SCOPED_TRACE(e.name);
    const KeyProblems found = PrecisionPolicy::problems(e.cfg);
    ASSERT_TRUE(has_key(found, e.key)) << e.key;
    EXPECT_NE(message_at(found, e.key).find(e.message_part), std::string::npos)
        << message_at(found, e.key);
    // from_config refuses the same config, naming the key.
    try {
      PrecisionPolicy::from_config(e.cfg);
      ADD_FAILURE() << "from_config accepted it";
    } catch (const InputError& err) {
      EXPECT_NE(std::string(err.what()).find(std::string(e.key) + ": "), std::string::npos)
          << err.what();
    }
  }
}

TEST(Policy, FromConfigListsEveryProblem) {
  const Config c = config("fp16", [](Config& c) {
    c.dtypes.param = "fp32";
    c.dtypes.master = "fp32";
    c.loss_scale.growth_factor = 0.5;
  });
  try {
    PrecisionPolicy::from_config(c);
    FAIL() << "accepted";
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("invalid precision policy (precision fp16):\n", 0), 0u) << msg;
    EXPECT_NE(msg.find("\n  dtypes.master: fp32 with fp32 weights"), std::string::npos) << msg;
    EXPECT_NE(msg.find("\n  loss_scale.growth_factor: must be a finite number > 1, got 0.5"),
              std::string::npos)
        << msg;
  }
}

// ---------------------------------------------------------------------------------------------
// Keys without effect

TEST(Policy, InertKeysFollowTheResolvedPolicy) {
  const std::vector<std::string> fp8_keys = {
      "fp8.format", "fp8.recipe", "fp8.amax_history_len", "fp8.amax_compute", "fp8.margin",
      "fp8.lm_head", "fp8.first_last_blocks"};
  const std::vector<std::string> dynamic_only = {
      "loss_scale.growth_factor", "loss_scale.backoff_factor", "loss_scale.growth_interval",
      "loss_scale.hysteresis", "loss_scale.consecutive_hysteresis", "loss_scale.min_scale",
      "loss_scale.max_scale"};
  auto keys = [](const Config& c) {
    std::vector<std::string> out;
    for (const auto& [k, why] : PrecisionPolicy::inert_keys(c)) out.push_back(k);
    std::sort(out.begin(), out.end());
    return out;
  };
  auto sorted = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  auto concat = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  // Dynamic loss scaling, no fp8: only fp8.* is unused.
  EXPECT_EQ(keys(config("fp16")), sorted(fp8_keys));
  // Static: the dynamic-only fields too, but init_scale is the fixed scale.
  EXPECT_EQ(keys(config("fp16", [](Config& c) { c.loss_scale.mode = "static"; })),
            sorted(concat(fp8_keys, dynamic_only)));
  // No loss scaling: init_scale as well; max_consecutive_min_scale_skips still stops a run
  // whose steps keep overflowing, so it is never unused, nor is the mode.
  EXPECT_EQ(keys(config("bf16")),
            sorted(concat(concat(fp8_keys, dynamic_only), {"loss_scale.init_scale"})));
  // fp8 with current scaling: the history settings are unused.
  EXPECT_EQ(keys(config("fp8", [](Config& c) {
              c.fp8.scaling.recipe = "current";
              c.loss_scale.mode = "dynamic";
            })),
            sorted({"fp8.amax_history_len", "fp8.amax_compute"}));
  const auto reasons = PrecisionPolicy::inert_keys(config("bf16"));
  EXPECT_NE(message_at(reasons, "fp8.margin").find("fp8.* applies to precision fp8 only"),
            std::string::npos);
  EXPECT_NE(message_at(reasons, "loss_scale.init_scale")
                .find("loss_scale.mode resolves to none for precision bf16"),
            std::string::npos);
  // A config that does not resolve has no verdict on its keys.
  EXPECT_TRUE(PrecisionPolicy::inert_keys(config("fp64")).empty());
}

// ---------------------------------------------------------------------------------------------
// Warnings

TEST(Policy, RiskyCombinationsWarn) {
  struct Case {
    const char* name;
    Config cfg;
    std::vector<std::string> expected;  // one substring per warning, in order
  };
  const std::string no_scaling = "loss_scale.mode: none with fp16 ";
  const std::string no_master = "dtypes.param: fp16 without a master copy";
  const std::string pointless_scaling = "with no gradient in fp16";
  const std::vector<Case> cases = {
      // Issue 3's example: fp16 compute without master weights and without loss scaling.
      {"fp16_without_master_or_scaling", config("fp16", [](Config& c) {
         c.dtypes.master = "none";
         c.loss_scale.mode = "none";
       }),
       {no_scaling + "activations (dtypes.activation): gradients below 2^-24", no_master}},
      {"fp16_without_master", config("fp16", [](Config& c) { c.dtypes.master = "none"; }),
       {no_master}},
      // A master copy does not keep activation gradients from flushing to zero.
      {"fp16_without_scaling", config("fp16", [](Config& c) { c.loss_scale.mode = "none"; }),
       {no_scaling + "activations"}},
      {"fp16_gradients_under_bf16", config("bf16", [](Config& c) { c.dtypes.grad = "fp16"; }),
       {no_scaling + "gradients (dtypes.grad)"}},
      {"fp16_activations_and_gradients", config("fp32", [](Config& c) {
         c.dtypes.activation = "fp16";
         c.dtypes.grad = "fp16";
       }),
       {no_scaling + "activations (dtypes.activation) and gradients (dtypes.grad)"}},
      // Loss scaling with nothing to protect: bf16 has fp32's range; fp16 weights alone put no
      // gradient in fp16.
      {"dynamic_under_bf16", config("bf16", [](Config& c) { c.loss_scale.mode = "dynamic"; }),
       {"loss_scale.mode: dynamic " + pointless_scaling + " (activations bf16, gradients fp32)"}},
      {"static_under_fp32", config("fp32", [](Config& c) { c.loss_scale.mode = "static"; }),
       {"loss_scale.mode: static " + pointless_scaling}},
      {"fp16_weights_only", config("fp16", [](Config& c) { c.dtypes.activation = "fp32"; }),
       {pointless_scaling}},
      {"fp8_lm_head", config("fp8", [](Config& c) { c.fp8.lm_head = "fp8"; }),
       {"fp8.lm_head: fp8 (asked for explicitly): the tied LM head in fp8 usually hurts quality"}},
      {"tf32_with_16_bit_operands", config("tf32", [](Config& c) {
         c.dtypes.param = "bf16";
         c.dtypes.activation = "bf16";
       }),
       {"precision tf32 with 16-bit weights and activations (bf16, bf16)"}},
      {"fp8_with_every_block_bf16", config("fp8", [](Config& c) {
         c.fp8.first_last_blocks = "bf16";
         c.model.n_layer = 2;
       }),
       {"fp8.first_last_blocks: bf16 with model.n_layer 2: every block is a first or last "
        "block, so no GEMM runs in fp8"}},
      // Legal and sensible: no warning.
      {"fp8_first_last_bf16_with_middle_blocks", config("fp8", [](Config& c) {
         c.fp8.first_last_blocks = "bf16";
         c.model.n_layer = 3;
       }),
       {}},
      {"bf16_without_master", config("bf16", [](Config& c) { c.dtypes.master = "none"; }), {}},
      {"fp16_static_scaling", config("fp16", [](Config& c) { c.loss_scale.mode = "static"; }),
       {}},
      {"tf32_with_fp32_activations", config("tf32", [](Config& c) { c.dtypes.param = "bf16"; }),
       {}},
  };
  for (const auto& e : cases) {
    SCOPED_TRACE(e.name);
    const std::vector<std::string> w = warnings_of(e.cfg);
    ASSERT_EQ(w.size(), e.expected.size()) << joined(w);
    for (size_t i = 0; i < w.size(); ++i)
      EXPECT_NE(w[i].find(e.expected[i]), std::string::npos)
          << "want: " << e.expected[i] << "\ngot: " << w[i];
  }
}

TEST(Policy, WarningsAreAppended) {
  std::vector<std::string> w = {"earlier"};
  PrecisionPolicy::from_config(config("fp8", [](Config& c) { c.fp8.lm_head = "fp8"; }), &w);
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[0], "earlier");
}

}  // namespace
