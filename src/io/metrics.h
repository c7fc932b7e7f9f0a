// JSON-lines metrics: one object a line, flushed as it is written so that a crash loses at most
// the line in progress and `tail -f` shows progress. Field names: docs/metrics.md.
#pragma once

#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

namespace mpt {

class MetricsSink {
 public:
  // Truncates, or appends (a resumed run); RuntimeError naming the file.
  explicit MetricsSink(const std::string& path, bool append = false);
  ~MetricsSink();
  MetricsSink(const MetricsSink&) = delete;
  MetricsSink& operator=(const MetricsSink&) = delete;

  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

// Current UTC time as ISO 8601, e.g. "2026-11-30T12:34:56Z".
std::string utc_timestamp();

}  // namespace mpt
