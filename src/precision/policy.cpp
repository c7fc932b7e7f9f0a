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

std::vector<std::pair<std::string, std::string>> PrecisionPolicy::problems(const Config&) {
  return {};
}

PrecisionPolicy PrecisionPolicy::from_config(const Config& cfg, std::vector<std::string>*) {
  return preset(cfg.precision);
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
                      {"loss_scale", {{"mode", loss_scale.mode}}}};
  if (uses_loss_scaling()) {
    auto& ls = j["loss_scale"];
    ls["init_scale"] = loss_scale.init_scale;
    ls["growth_factor"] = loss_scale.growth_factor;
    ls["backoff_factor"] = loss_scale.backoff_factor;
    ls["growth_interval"] = loss_scale.growth_interval;
    ls["hysteresis"] = loss_scale.hysteresis;
    ls["consecutive_hysteresis"] = loss_scale.consecutive_hysteresis;
    ls["min_scale"] = loss_scale.min_scale;
    ls["max_scale"] = loss_scale.max_scale;
  }
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
