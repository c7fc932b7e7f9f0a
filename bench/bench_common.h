// Helpers the benchmarks share.
#pragma once

#include <cerrno>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "model/gpt.h"

namespace mpt::bench {

// A whole number in [lo, hi] parsed from the whole of `v` (no atoi: "abc" is not 0), or nothing.
inline std::optional<long> whole_number(const std::string& v, long lo, long hi) {
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0 || x < lo || x > hi) return std::nullopt;
  return x;
}

// A benchmark's policy name: a preset, or "P+recompute" for preset P with training.recompute
// gelu+layernorm (what the backward's extra passes cost, and what they save). Returns the
// preset's name and the recompute mode.
inline std::pair<std::string, Recompute> parse_policy_name(const std::string& name) {
  const std::string suffix = "+recompute";
  if (name.size() > suffix.size() &&
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
    return {name.substr(0, name.size() - suffix.size()), Recompute::gelu_layernorm};
  return {name, Recompute::none};
}

// The row of `results` (an array of objects with a "policy") for `policy`, or null.
inline const nlohmann::json* find_policy(const nlohmann::json& results, const char* policy) {
  for (const auto& r : results)
    if (r["policy"] == policy) return &r;
  return nullptr;
}

// Adds "vs_fp32" and "vs_bf16" to every row: its `key` over the fp32 and bf16 rows' (0 when that
// policy was not run).
inline void add_ratios(nlohmann::json& results, const char* key) {
  const nlohmann::json *f32 = find_policy(results, "fp32"), *b16 = find_policy(results, "bf16");
  const double base32 = f32 ? double((*f32)[key]) : 0.0, base16 = b16 ? double((*b16)[key]) : 0.0;
  for (auto& r : results) {
    r["vs_fp32"] = f32 ? double(r[key]) / base32 : 0.0;
    r["vs_bf16"] = b16 ? double(r[key]) / base16 : 0.0;
  }
}

}  // namespace mpt::bench
