#include "precision/policy.h"

#include <algorithm>

#include "config/config.h"
#include "core/error.h"
#include "core/text.h"

namespace mpt {

const char* matmul_precision_name(MatmulPrecision p) {
  switch (p) {
    case MatmulPrecision::native: return "native";
    case MatmulPrecision::tf32: return "tf32";
    case MatmulPrecision::fp8: return "fp8";
  }
  return "?";
}

const std::vector<std::string>& PrecisionPolicy::preset_names() {
  static const std::vector<std::string> names = {"fp32", "tf32", "fp16", "bf16", "bf16-pure",
                                                 "fp8"};
  return names;
}

PrecisionPolicy PrecisionPolicy::preset(const std::string& name) {
  const auto& all = preset_names();
  if (std::find(all.begin(), all.end(), name) == all.end())
    throw InputError("precision: unknown policy '" + name + "' (choices: " + join(all, ", ") + ")");
  PrecisionPolicy p;
  p.name = name;
  p.loss_scale.mode = "none";
  if (name == "tf32") {
    // Everything stays fp32 except the multiplications inside matmuls.
    p.matmul = MatmulPrecision::tf32;
  } else if (name == "fp16") {
    // Micikevicius et al. 2018: fp16 weights, activations and products; an fp32 master copy
    // that the optimizer updates; fp32 gradient accumulation; dynamic loss scaling.
    p.param = p.activation = DType::f16;
    p.master_weights = true;
    p.loss_scale.mode = "dynamic";
  } else if (name == "bf16") {
    // bf16 has fp32's range, so no loss scaling; the fp32 master keeps small updates.
    p.param = p.activation = DType::bf16;
    p.master_weights = true;
  } else if (name == "bf16-pure") {
    // No fp32 copy of anything but the optimizer moments: bf16 weights updated with stochastic
    // rounding (which keeps small updates in expectation), bf16 gradients.
    p.param = p.activation = p.grad = DType::bf16;
    p.stochastic_rounding = true;
  } else if (name == "fp8") {
    // bf16 storage like the bf16 preset; the linear layers' GEMMs in fp8 with per-tensor scales
    // (Micikevicius et al. 2022); the LM head in bf16.
    p.param = p.activation = DType::bf16;
    p.master_weights = true;
    p.matmul = MatmulPrecision::fp8;
  }
  return p;
}

namespace {

using KeyProblems = std::vector<std::pair<std::string, std::string>>;

// The string-valued precision keys and the values each accepts: one list for the config's key
// table (via PrecisionPolicy::choices) and for problems(), which may see a Config that did not
// come through the loader.
struct ChoiceKey {
  const char* key;
  std::vector<std::string> values;
  const std::string& (*get)(const Config& c);
};
#define MPT_GET(member) [](const Config& c) -> const std::string& { return c.member; }

const std::vector<ChoiceKey>& choice_keys() {
  static const std::vector<std::string> role = {"preset", "fp32", "fp16", "bf16"};
  static const std::vector<ChoiceKey> keys = {
      {"precision", PrecisionPolicy::preset_names(), MPT_GET(precision)},
      {"dtypes.param", role, MPT_GET(dtypes.param)},
      {"dtypes.activation", role, MPT_GET(dtypes.activation)},
      {"dtypes.grad", role, MPT_GET(dtypes.grad)},
      {"dtypes.master", {"preset", "fp32", "none"}, MPT_GET(dtypes.master)},
      {"loss_scale.mode", {"preset", "dynamic", "static", "none"}, MPT_GET(loss_scale.mode)},
      {"fp8.format", {"hybrid", "e4m3"}, MPT_GET(fp8.format)},
      {"fp8.recipe", {"delayed", "current"}, MPT_GET(fp8.scaling.recipe)},
      {"fp8.amax_compute", {"max", "most_recent"}, MPT_GET(fp8.scaling.amax_compute)},
      {"fp8.lm_head", {"bf16", "fp8"}, MPT_GET(fp8.lm_head)},
      {"fp8.first_last_blocks", {"fp8", "bf16"}, MPT_GET(fp8.first_last_blocks)},
  };
  return keys;
}
#undef MPT_GET

bool contains(const std::vector<std::string>& list, const std::string& v) {
  return std::find(list.begin(), list.end(), v) != list.end();
}

KeyProblems unknown_choices(const Config& cfg) {
  KeyProblems out;
  for (const auto& k : choice_keys()) {
    const std::string& v = k.get(cfg);
    if (!contains(k.values, v))
      out.emplace_back(k.key, "unknown value '" + v + "' (choices: " + join(k.values, ", ") + ")");
  }
  return out;
}

// A dtypes.* value other than "preset" replaces the preset's dtype.
void override_dtype(const std::string& value, DType& dtype) {
  for (DType d : {DType::f32, DType::f16, DType::bf16})
    if (value == dtype_name(d)) dtype = d;
}

// The preset with the overrides applied. Every choice key must hold one of its values.
PrecisionPolicy resolve(const Config& cfg) {
  PrecisionPolicy p = PrecisionPolicy::preset(cfg.precision);
  override_dtype(cfg.dtypes.param, p.param);
  override_dtype(cfg.dtypes.activation, p.activation);
  override_dtype(cfg.dtypes.grad, p.grad);
  if (cfg.dtypes.master == "preset") {
    // The preset's master copy is one of its 16-bit weights: `dtypes.param: fp32` on fp16, bf16
    // or fp8 drops it instead of asking for a copy of fp32 weights (which problems() rejects
    // only when asked for explicitly).
    p.master_weights = p.master_weights && p.param != DType::f32;
  } else {
    p.master_weights = cfg.dtypes.master == "fp32";
  }
  // Without a master, bf16 weights would lose every update below half an ulp; the optimizer
  // rounds them stochastically instead (it does so for bf16 only).
  p.stochastic_rounding = p.param == DType::bf16 && !p.master_weights;
  const std::string preset_mode = p.loss_scale.mode;
  p.loss_scale = static_cast<const LossScalerConfig&>(cfg.loss_scale);
  if (p.loss_scale.mode == "preset") p.loss_scale.mode = preset_mode;
  p.fp8.hybrid = cfg.fp8.format == "hybrid";
  p.fp8.scaling = cfg.fp8.scaling;
  p.fp8.lm_head_fp8 = cfg.fp8.lm_head == "fp8";
  p.fp8.first_last_blocks_bf16 = cfg.fp8.first_last_blocks == "bf16";
  return p;
}

// Runs a scaler's constructor for its validation; its InputError reads "<key>: <why>".
template <class Construct>
void add_thrown(KeyProblems& out, Construct construct) {
  try {
    construct();
  } catch (const InputError& e) {
    const std::string msg = e.what();
    const size_t colon = msg.find(": ");
    if (colon == std::string::npos) out.emplace_back("precision", msg);
    else out.emplace_back(msg.substr(0, colon), msg.substr(colon + 2));
  }
}

// Gradients flow through the activation dtype (the activations' gradients) and the gradient
// dtype; fp16 weights alone do not put a gradient in fp16.
std::string fp16_gradient_roles(const PrecisionPolicy& p) {
  std::vector<std::string> roles;
  if (p.activation == DType::f16) roles.push_back("activations (dtypes.activation)");
  if (p.grad == DType::f16) roles.push_back("gradients (dtypes.grad)");
  return join(roles, " and ");
}

std::vector<std::string> risky_combinations(const PrecisionPolicy& p, const Config& cfg) {
  std::vector<std::string> out;
  const std::string fp16_grads = fp16_gradient_roles(p);
  if (!fp16_grads.empty() && !p.uses_loss_scaling())
    out.push_back("loss_scale.mode: none with fp16 " + fp16_grads +
                  ": gradients below 2^-24, fp16's smallest subnormal, flush to zero; "
                  "loss_scale.mode: dynamic keeps them in range");
  if (fp16_grads.empty() && p.uses_loss_scaling())
    out.push_back("loss_scale.mode: " + p.loss_scale.mode + " with no gradient in fp16 (" +
                  "activations " + dtype_name(p.activation) + ", gradients " +
                  dtype_name(p.grad) + "): loss scaling only keeps fp16 gradients from "
                  "underflowing, so here it does nothing; loss_scale.mode: none");
  if (p.param == DType::f16 && !p.master_weights)
    out.push_back("dtypes.param: fp16 without a master copy (dtypes.master): optimizer updates "
                  "smaller than half an ulp of a weight are rounded away (stochastic rounding "
                  "is done for bf16 weights only); dtypes.master: fp32 keeps them");
  if (p.matmul == MatmulPrecision::tf32 && p.param != DType::f32 && p.activation != DType::f32)
    out.push_back(std::string("precision tf32 with 16-bit weights and activations (") +
                  dtype_name(p.param) + ", " + dtype_name(p.activation) +
                  "): every matmul operand is already exact in tf32, so tf32 changes nothing");
  if (p.matmul == MatmulPrecision::fp8) {
    if (p.fp8.lm_head_fp8)
      out.push_back("fp8.lm_head: fp8 (asked for explicitly): the tied LM head in fp8 usually "
                    "hurts quality (its weight is also the token embedding); bf16 is the default");
    if (p.fp8.first_last_blocks_bf16 && cfg.model.n_layer <= 2 && !p.fp8.lm_head_fp8)
      out.push_back("fp8.first_last_blocks: bf16 with model.n_layer " +
                    std::to_string(cfg.model.n_layer) +
                    ": every block is a first or last block, so no GEMM runs in fp8");
  }
  return out;
}

}  // namespace

const std::vector<std::string>& PrecisionPolicy::choices(const std::string& key) {
  const ChoiceKey* found = nullptr;
  for (const auto& k : choice_keys())
    if (k.key == key) found = &k;
  MPT_CHECK(found, "PrecisionPolicy::choices: no precision key '" + key + "'");
  return found->values;
}

std::vector<std::pair<std::string, std::string>> PrecisionPolicy::problems(const Config& cfg) {
  KeyProblems out = unknown_choices(cfg);
  if (!out.empty()) return out;  // the policy cannot be resolved
  const PrecisionPolicy p = resolve(cfg);
  if (cfg.dtypes.master == "fp32" && p.param == DType::f32)
    out.emplace_back("dtypes.master",
                     "fp32 with fp32 weights (dtypes.param resolves to fp32 for precision " +
                         cfg.precision +
                         "): a master copy of fp32 weights is pointless; use dtypes.master: none "
                         "or 16-bit weights (dtypes.param: fp16 or bf16)");
  // The scalers validate their own fields and name them; reusing them keeps one set of rules.
  add_thrown(out, [&] { LossScaler check(p.loss_scale); });
  add_thrown(out, [&] { Fp8TensorScaler check(p.fp8.scaling, Fp8Format::e4m3); });
  return out;
}

std::vector<std::pair<std::string, std::string>> PrecisionPolicy::inert_keys(const Config& cfg) {
  KeyProblems out;
  if (!unknown_choices(cfg).empty()) return out;
  const PrecisionPolicy p = resolve(cfg);
  auto all = [&](std::initializer_list<const char*> keys, const std::string& why) {
    for (const char* k : keys) out.emplace_back(k, why);
  };
  if (p.matmul != MatmulPrecision::fp8) {
    all({"fp8.format", "fp8.recipe", "fp8.amax_history_len", "fp8.amax_compute", "fp8.margin",
         "fp8.lm_head", "fp8.first_last_blocks"},
        "fp8.* applies to precision fp8 only (precision is '" + cfg.precision +
            "')");
  } else if (p.fp8.scaling.recipe == "current") {
    all({"fp8.amax_history_len", "fp8.amax_compute"},
        "it applies to fp8.recipe: delayed; with current, each step's own amax sets its scale");
  }
  // max_consecutive_min_scale_skips acts in every mode: a run whose steps keep overflowing
  // stops even without loss scaling.
  const auto dynamic_only = {"loss_scale.growth_factor",  "loss_scale.backoff_factor",
                             "loss_scale.growth_interval", "loss_scale.hysteresis",
                             "loss_scale.consecutive_hysteresis", "loss_scale.min_scale",
                             "loss_scale.max_scale"};
  if (p.loss_scale.mode == "none") {
    const std::string why =
        cfg.loss_scale.mode == "preset"
            ? "loss scaling is off (loss_scale.mode resolves to none for precision " +
                  cfg.precision + ")"
            : "loss scaling is off (loss_scale.mode: none)";
    all({"loss_scale.init_scale"}, why);
    all(dynamic_only, why);
  } else if (p.loss_scale.mode == "static") {
    all(dynamic_only, "it applies to loss_scale.mode: dynamic; with static, the scale stays at "
                      "loss_scale.init_scale");
  }
  return out;
}

PrecisionPolicy PrecisionPolicy::from_config(const Config& cfg,
                                             std::vector<std::string>* warnings) {
  const KeyProblems found = problems(cfg);
  if (!found.empty()) {
    std::string msg = "invalid precision policy (precision " + cfg.precision + "):";
    for (const auto& [key, why] : found) msg += "\n  " + key + ": " + why;
    throw InputError(msg);
  }
  PrecisionPolicy p = resolve(cfg);
  if (warnings) {
    for (auto& w : risky_combinations(p, cfg)) warnings->push_back(std::move(w));
  }
  return p;
}

nlohmann::json PrecisionPolicy::to_json() const {
  nlohmann::json j = {{"name", name},
                      {"param", dtype_name(param)},
                      {"master_weights", master_weights},
                      {"activation", dtype_name(activation)},
                      {"grad", dtype_name(grad)},
                      {"matmul", matmul_precision_name(matmul)},
                      {"optimizer_state", dtype_name(optimizer_state)},
                      {"stochastic_rounding", stochastic_rounding},
                      // Every field in every mode: even without scaling, the scaler skips
                      // non-finite steps and stops after max_consecutive_min_scale_skips.
                      {"loss_scale",
                       {{"mode", loss_scale.mode},
                        {"init_scale", loss_scale.init_scale},
                        {"growth_factor", loss_scale.growth_factor},
                        {"backoff_factor", loss_scale.backoff_factor},
                        {"growth_interval", loss_scale.growth_interval},
                        {"hysteresis", loss_scale.hysteresis},
                        {"consecutive_hysteresis", loss_scale.consecutive_hysteresis},
                        {"min_scale", loss_scale.min_scale},
                        {"max_scale", loss_scale.max_scale},
                        {"max_consecutive_min_scale_skips",
                         loss_scale.max_consecutive_min_scale_skips}}}};
  if (matmul == MatmulPrecision::fp8)
    j["fp8"] = {{"format", fp8.hybrid ? "hybrid" : "e4m3"},
                {"recipe", fp8.scaling.recipe},
                {"amax_history_len", fp8.scaling.amax_history_len},
                {"amax_compute", fp8.scaling.amax_compute},
                {"margin", fp8.scaling.margin},
                {"lm_head", fp8.lm_head_fp8 ? "fp8" : "bf16"},
                {"first_last_blocks", fp8.first_last_blocks_bf16 ? "bf16" : "fp8"}};
  return j;
}

}  // namespace mpt
