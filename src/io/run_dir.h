// The run directory: runs/NAME/{config.yaml, metrics.jsonl}. Nothing is created until the
// config, the data and the backend have all been validated (plan first, create later).
#pragma once

#include <string>

#include "config/config.h"

namespace mpt {

// Decides where the run goes: `override_dir` when given (--run-dir), else output.dir/output.name,
// where an empty name becomes "<config stem>-<UTC time>". Throws InputError when that directory
// already holds files (a finished or running run is never overwritten).
std::string plan_run_dir(const Config& cfg, const std::string& override_dir);

// Creates the directory (and parents) and writes config.yaml by write-temp-and-rename.
void create_run_dir(const std::string& dir, const Config& cfg);

// Writes `content` to `path` through a temporary file in the same directory, fsync and rename,
// so readers see either the old file or the whole new one.
void write_file_atomic(const std::string& path, const std::string& content);

}  // namespace mpt
