// The run directory: runs/NAME/{config.yaml, metrics.jsonl}. Nothing is created until the
// config, the data and the backend have all been validated (plan first, create later).
#pragma once

#include <string>

#include "config/config.h"

namespace mpt {

struct RunDirPlan {
  std::string path;
  bool auto_named = false;  // the name was generated, so a collision may pick another
  std::string base;         // auto_named: the generated path, before any "-N" suffix
};

// Decides where the run goes: `override_dir` when given (--run-dir), else output.dir/output.name,
// where an empty name becomes "<config stem>-<UTC time>" ("default" without a config file),
// with a "-2", "-3", ... suffix when that is taken (not an empty directory). InputError when a
// directory named by the user already holds files (a run is never overwritten) or when output.dir
// or that directory exists as something other than a directory.
RunDirPlan plan_run_dir(const Config& cfg, const std::string& override_dir);

// Creates the planned directory (and parents), claims it by creating metrics.jsonl exclusively,
// and writes the resolved config.yaml atomically. Two runs started at once can never share a
// directory: the loser of an explicitly named one fails with InputError; a generated name gets a
// "-2", "-3", ... suffix instead. Returns the directory used.
std::string create_run_dir(const RunDirPlan& plan, const Config& cfg);

// An exclusive lock on a run directory for the life of one training process (flock on
// RUN/.lock), so that two processes never train the same run, e.g. a scheduler's requeue while
// the old job is still dying. InputError when another process holds it.
class RunLock {
 public:
  explicit RunLock(const std::string& run_dir);
  ~RunLock();
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace mpt
