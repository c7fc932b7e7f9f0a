// The trainer's device metrics (docs/metrics.md): the dense peak FLOP/s behind MFU in the start
// record; MFU and the backend's memory (counted exactly, Backend::memory_usage) in step records;
// and once per process, after its first step, a `memory` event comparing the measured peak with
// the memory ledger's prediction (a warning in the log when it exceeds it by more than
// kMemoryPlanMargin).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "backend/gpu_peaks.h"
#include "model/gpt.h"
#include "precision/policy.h"

namespace mpt {

// How far the measured peak may exceed the ledger's total before the log warns. The ledger is
// exact on the CPU backend (tests/test_model.cpp); on CUDA it predicts the same counted bytes,
// and the margin covers what the prediction cannot see from the host (a cuBLASLt algorithm
// needing other scratch), not allocator rounding, which is not counted.
constexpr double kMemoryPlanMargin = 0.02;

// The memory this process may use on its machine: the physical memory, or the limit of the
// control group it runs in when that is lower (a container's, or a batch scheduler's job, as
// Slurm's --mem sets one), since the kernel's OOM killer enforces the limit, not the RAM.
struct HostMemory {
  double bytes = 0;         // 0: unknown
  std::string limited_by;   // "" for physical memory; else the cgroup file that set the limit
};

// The lowest memory limit on this process's control group and its ancestors, cgroup v2
// (memory.max) or v1 (memory.limit_in_bytes), read through /proc/self/cgroup and
// /proc/self/mountinfo under `root` ("" for the real ones; tests pass a directory laid out
// alike). 0 when there is none (no limit, "max", v1's "unlimited" sentinel, nothing readable);
// `where`, when given, receives the file that set it.
double cgroup_memory_limit(const std::string& root = "", std::string* where = nullptr);

// Physical memory, capped by cgroup_memory_limit.
HostMemory host_memory();

// Why a run whose memory ledger predicts `plan` cannot fit where its backend keeps that memory,
// or "" when it fits. On a GPU (usage.device_total_bytes > 0): the device's free memory plus
// what the backend holds already (its context's workspace, which the ledger counts too), since
// the host's memory says nothing about the device's. Otherwise the machine's, `host` (unknown
// when its bytes are 0: nothing is refused), shared by `host_ranks` processes of the job alike.
std::string memory_shortfall(const MemoryLedger& plan, const MemoryUsage& usage,
                             const GpuInfo& gpu, const HostMemory& host, int host_ranks = 1);

class DeviceMetrics {
 public:
  // `world`: processes of the job (each on its own device) that together reach the step
  // records' tokens_per_s. `plan`: the ledger the start record holds.
  DeviceMetrics(const Backend& backend, const PrecisionPolicy& policy, double flops_per_token,
                const MemoryLedger& plan, int world);

  // peak_flops (null when unknown) and peak_flops_format.
  nlohmann::json start_fields() const;
  // mfu (null when the peak is unknown), memory_bytes, peak_memory_bytes, and on a GPU
  // device_memory_bytes.
  nlohmann::json step_fields(double tokens_per_s) const;
  // The `memory` event, the first time it is called (after the process's first step); then
  // nothing.
  std::optional<nlohmann::json> memory_check(int64_t step);

 private:
  const Backend& backend_;
  PolicyPeak peak_;
  double flops_per_token_;
  double predicted_;
  int world_;
  bool checked_ = false;
};

}  // namespace mpt
