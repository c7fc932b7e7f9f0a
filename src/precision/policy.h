// A precision policy: for each tensor role, the format it is stored or computed in. A plain
// value built from the config (DESIGN.md, "Precision is a value, not a build flag"); the model
// and the trainer ask it, nothing reads a global or an #ifdef.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/dtype.h"

namespace mpt {

struct PrecisionPolicy {
  std::string name;
  DType param = DType::f32;            // the weights the ops read
  bool master_weights = false;         // an fp32 copy the optimizer updates
  DType activation = DType::f32;       // saved activations and tensors between ops
  DType grad = DType::f32;             // parameter gradients and their accumulation
  MatmulPrecision matmul = MatmulPrecision::fp32;
  DType optimizer_state = DType::f32;  // AdamW moments

  // The preset of that name. InputError listing the choices for an unknown name, and saying so
  // for a preset this version does not run yet.
  static PrecisionPolicy preset(const std::string& name);
  // Every preset name, and those this version runs.
  static const std::vector<std::string>& preset_names();
  static const std::vector<std::string>& available_presets();

  nlohmann::json to_json() const;
};

const char* matmul_precision_name(MatmulPrecision p);

}  // namespace mpt
