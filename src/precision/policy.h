// A precision policy: for each tensor role, the format it is stored or computed in, plus the
// loss-scaling and fp8 recipes. A plain value built from the config (DESIGN.md, "Precision is a
// value, not a build flag"); the model and the trainer ask it, nothing reads a global or an
// #ifdef. Presets and the override keys: docs/precision.md.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/dtype.h"
#include "precision/fp8_scaling.h"
#include "precision/loss_scaler.h"

namespace mpt {

struct Config;

// What fp8 training quantises, and how its scales are chosen.
struct Fp8Recipe {
  // true ("hybrid"): e4m3 for activations and weights, e5m2 for gradients (more range, less
  // precision, where gradients need it); false: e4m3 everywhere.
  bool hybrid = true;
  Fp8ScalingConfig scaling;
  bool lm_head_fp8 = false;            // the tied LM head's GEMM; bf16 unless asked for
  bool first_last_blocks_bf16 = false; // keep the first and last blocks' GEMMs in bf16

  DType forward_format() const { return DType::e4m3; }
  DType grad_format() const { return hybrid ? DType::e5m2 : DType::e4m3; }
};

struct PrecisionPolicy {
  std::string name;
  DType param = DType::f32;            // the weights the ops read
  bool master_weights = false;         // an fp32 copy the optimizer updates
  DType activation = DType::f32;       // saved activations, tensors between ops, their gradients
  DType grad = DType::f32;             // parameter gradients and their accumulation
  MatmulPrecision matmul = MatmulPrecision::native;  // linear layers (the LM head: see fp8)
  // The precision of the products not run in fp8 - attention's, and the linear layers kept out
  // of fp8 - `matmul`, or its storage dtype's (bf16) under fp8, as Transformer Engine's fp8
  // recipes keep attention in bf16.
  MatmulPrecision unquantised_matmul() const {
    return matmul == MatmulPrecision::fp8 ? MatmulPrecision::native : matmul;
  }
  DType optimizer_state = DType::f32;  // AdamW moments
  // Low-precision weights without a master copy are updated with stochastic rounding.
  bool stochastic_rounding = false;
  LossScalerConfig loss_scale;         // mode "none" unless the policy computes in fp16
  Fp8Recipe fp8;                       // used when matmul == fp8

  // The preset of that name; InputError listing the choices for an unknown name.
  static PrecisionPolicy preset(const std::string& name);
  static const std::vector<std::string>& preset_names();

  // The policy a config asks for: the `precision` preset with the config's `dtypes.*`,
  // `loss_scale.*` and `fp8.*` overrides applied. InputError for a combination that makes no
  // sense (every problem, each naming its key). Combinations that are legal but risky or
  // pointless are returned as warnings (when `warnings` is given) for the trainer to log and
  // record; the presets themselves give none.
  static PrecisionPolicy from_config(const Config& cfg, std::vector<std::string>* warnings = nullptr);

  // For the config loader: the problems of the config's precision keys, each with the key to
  // report it at; empty when the combination is valid.
  static std::vector<std::pair<std::string, std::string>> problems(const Config& cfg);

  // The override keys whose value the resolved policy does not use (fp8.* without fp8 matmuls,
  // the dynamic-only loss_scale fields in static mode, ...), each with the reason ("fp8.*
  // applies to precision fp8 only ..."). The loader rejects those the user set explicitly;
  // empty when the config does not resolve.
  static std::vector<std::pair<std::string, std::string>> inert_keys(const Config& cfg);

  // The values a string-valued precision key accepts ("precision", "dtypes.param", ...,
  // "fp8.first_last_blocks"); the config's key table lists them from here.
  static const std::vector<std::string>& choices(const std::string& key);

  bool uses_loss_scaling() const { return loss_scale.mode != "none"; }
  nlohmann::json to_json() const;
};

const char* matmul_precision_name(MatmulPrecision p);

}  // namespace mpt
