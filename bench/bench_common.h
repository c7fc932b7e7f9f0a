// Helpers the benchmarks share.
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "core/scoped_env.h"
#include "model/gpt.h"

namespace mpt::bench {

// Walks a benchmark's "--key value" pairs. --help (or -h) prints `usage` to stdout and gives 0;
// a word that is no option, or an option without its value, is reported (as `prog`: why, then
// `usage`) and gives 2; every pair goes to on(key, value), which returns an exit status to stop
// with, or -1 to go on. -1 when every pair was taken.
inline int for_each_option(int argc, char** argv, const char* prog, const char* usage,
                           const std::function<int(const std::string&, const std::string&)>& on) {
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      std::fputs(usage, stdout);
      return 0;
    }
    if (k.rfind("--", 0) != 0 || i + 1 >= argc) {
      const std::string why = k.rfind("--", 0) != 0 ? "unexpected argument '" + k + "'"
                                                    : k + " needs a value";
      std::fprintf(stderr, "%s: %s\n%s", prog, why.c_str(), usage);
      return 2;
    }
    const int rc = on(k, argv[i + 1]);
    if (rc >= 0) return rc;
  }
  return -1;
}

// A whole number in [lo, hi] parsed from the whole of `v` (no atoi: "abc" is not 0), or nothing.
inline std::optional<long> whole_number(const std::string& v, long lo, long hi) {
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0 || x < lo || x > hi) return std::nullopt;
  return x;
}

// A benchmark's policy name: a preset P, with suffixes in any order: "+recompute" for
// training.recompute gelu+layernorm (what the backward's extra passes cost, and what they
// save), "+direct" for MPT_GEMM_OUT=direct (the CUDA backend's GEMMs writing bf16 outputs
// themselves: matmul_plan.h, GemmOut), "+unfused" for MPT_FP8_PRODUCERS=0 (fp8 blocks' LayerNorms
// stored in 16 bits for their GEMMs to quantise: what Gpt's fp8 producers save). A suffix named
// twice is left in the preset's name, which is then no preset.
struct BenchPolicy {
  std::string preset;
  Recompute recompute = Recompute::none;
  bool direct_out = false;
  bool fp8_unfused = false;
};

inline BenchPolicy parse_policy_name(const std::string& name) {
  BenchPolicy p;
  p.preset = name;
  auto strip = [&](const std::string& suffix, auto&& set) {
    const std::string& n = p.preset;
    if (n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0) {
      p.preset = n.substr(0, n.size() - suffix.size());
      set();
      return true;
    }
    return false;
  };
  for (bool again = true; again;) {
    again = false;
    if (p.recompute == Recompute::none)
      again |= strip("+recompute", [&] { p.recompute = Recompute::gelu_layernorm; });
    if (!p.direct_out) again |= strip("+direct", [&] { p.direct_out = true; });
    if (!p.fp8_unfused) again |= strip("+unfused", [&] { p.fp8_unfused = true; });
  }
  return p;
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
