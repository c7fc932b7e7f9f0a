// An environment variable set for a scope. The CUDA backend and Gpt read some options from the
// environment (MPT_GEMM_OUT, MPT_ATTENTION, MPT_FP8_PRODUCERS, ...): the tests and benchmarks
// switch them per case or row with this.
#pragma once

#include <cstdlib>
#include <optional>
#include <string>

namespace mpt {

// Sets `name` to `value` (null: unsets it) and restores what it was when destroyed.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) ::setenv(name, value, 1);
    else ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_) ::setenv(name_.c_str(), old_->c_str(), 1);
    else ::unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

}  // namespace mpt
