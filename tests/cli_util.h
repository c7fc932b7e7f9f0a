// Helpers for the tests that drive the `mpt` executable: run a command, read metrics.jsonl,
// and a fixture with a fresh temporary directory per test.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace mpt::test {

namespace fs = std::filesystem;
using nlohmann::json;

struct Result {
  int code;         // the exit code; -1 when the process did not exit normally
  std::string out;  // stdout and stderr together
};

inline Result run(const std::string& cmd) {
  Result r{-1, ""};
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

inline std::string mpt_bin() { return std::string(MPT_BINARY); }

// A whole file's bytes ("" when it cannot be read).
inline std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Tiny and quick: the tests that only check plumbing use this model.
inline const std::string kTiny =
    " --set model.n_layer=2 --set model.n_embd=32 --set model.n_head=2"
    " --set training.micro_batch=4 --set training.seq_len=32 --set training.eval_batches=2"
    " --set threads=2";

// A fresh directory per test under the test temp dir, removed when the test passes.
class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    // The process id keeps two test runs on one machine (two checkouts, or CI beside a
    // developer's run) out of each other's directories.
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("mpt_") + std::to_string(::getpid()) + "_" + info->test_suite_name() +
            "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
  std::string path(const std::string& rel) const { return (dir_ / rel).string(); }
  std::string write(const std::string& rel, const std::string& text) const {
    std::ofstream(path(rel), std::ios::binary) << text;
    return path(rel);
  }
  fs::path dir_;
};

inline std::vector<json> read_jsonl(const std::string& p) {
  std::vector<json> v;
  std::ifstream f(p);
  std::string line;
  while (std::getline(f, line)) v.push_back(json::parse(line));
  return v;
}

// The records without the fields that depend on the clock, the machine's speed, what else runs
// on the GPU, and the run's directory.
inline std::vector<json> without_timing(std::vector<json> recs) {
  for (auto& r : recs)
    for (const char* k : {"time", "step_ms", "comm_ms", "tokens_per_s", "elapsed_s", "run_dir",
                          "mfu", "device_memory_bytes", "device_total_bytes"})
      r.erase(k);
  return recs;
}

// The directory of the checkpoint of `step` in the run directory `run_dir`.
inline std::string checkpoint_dir(const std::string& run_dir, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld", static_cast<long long>(step));
  return run_dir + "/checkpoints/" + name;
}

// Records of one kind: "" = step records (no "event" field), else that event.
inline std::vector<json> events(const std::vector<json>& recs, const std::string& kind) {
  std::vector<json> out;
  for (const auto& r : recs)
    if (kind.empty() ? !r.contains("event") : r.value("event", "") == kind) out.push_back(r);
  return out;
}

}  // namespace mpt::test
