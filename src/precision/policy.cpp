#include "precision/policy.h"

#include <algorithm>

#include "core/error.h"
#include "core/text.h"

namespace mpt {

const char* matmul_precision_name(MatmulPrecision p) {
  switch (p) {
    case MatmulPrecision::fp32: return "fp32";
    case MatmulPrecision::tf32: return "tf32";
  }
  return "?";
}

const std::vector<std::string>& PrecisionPolicy::preset_names() {
  static const std::vector<std::string> names = {"fp32", "tf32", "fp16", "bf16", "bf16-pure",
                                                 "fp8"};
  return names;
}

const std::vector<std::string>& PrecisionPolicy::available_presets() {
  static const std::vector<std::string> names = {"fp32", "tf32"};
  return names;
}

PrecisionPolicy PrecisionPolicy::preset(const std::string& name) {
  const auto& all = preset_names();
  const auto& avail = available_presets();
  if (std::find(all.begin(), all.end(), name) == all.end())
    throw InputError("precision: unknown policy '" + name + "' (choices: " + join(all, ", ") + ")");
  if (std::find(avail.begin(), avail.end(), name) == avail.end())
    throw InputError("precision: '" + name + "' is not yet available in this version (available: " +
                     join(avail, ", ") + ")");
  PrecisionPolicy p;
  p.name = name;
  // tf32: everything stays fp32 except the multiplications inside matmuls.
  if (name == "tf32") p.matmul = MatmulPrecision::tf32;
  return p;
}

nlohmann::json PrecisionPolicy::to_json() const {
  return {{"name", name},
          {"param", dtype_name(param)},
          {"master_weights", master_weights},
          {"activation", dtype_name(activation)},
          {"grad", dtype_name(grad)},
          {"matmul", matmul_precision_name(matmul)},
          {"optimizer_state", dtype_name(optimizer_state)}};
}

}  // namespace mpt
