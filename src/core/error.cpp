#include "core/error.h"

namespace mpt::detail {

void throw_check_failure(const char* cond, const std::string& msg, const char* file, int line) {
  throw RuntimeError(std::string("internal check failed: ") + cond + " (" + msg + ") at " + file +
                     ":" + std::to_string(line));
}

}  // namespace mpt::detail
