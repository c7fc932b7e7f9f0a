#include "io/metrics.h"

#include <cerrno>
#include <cstring>
#include <ctime>

#include "core/error.h"
#include "core/text.h"

namespace mpt {

MetricsSink::MetricsSink(const std::string& path, bool append) : path_(path) {
  f_ = std::fopen(path.c_str(), append ? "a" : "w");
  if (!f_) throw RuntimeError(path + ": cannot open for writing: " + std::strerror(errno));
}

MetricsSink::~MetricsSink() {
  if (f_) std::fclose(f_);
}

void MetricsSink::write(const nlohmann::json& record) {
  // Non-finite floats have no JSON form; nlohmann writes them as null, which readers handle.
  const std::string line = record.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    throw RuntimeError(path_ + ": write failed: " + std::strerror(errno));
}

std::string utc_timestamp() { return utc_now("%Y-%m-%dT%H:%M:%SZ"); }

}  // namespace mpt
