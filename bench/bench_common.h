// Helpers the benchmarks share.
#pragma once

#include <string>
#include <utility>

#include "model/gpt.h"

namespace mpt::bench {

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

}  // namespace mpt::bench
