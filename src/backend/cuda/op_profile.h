// Where a GPU step's time goes, op by op: Context::start_profile() records a CUDA event after
// every launch check (each kernel and GEMM, named as MPT_LAUNCH_CHECK names it), and
// stop_profile() turns the events into the time between consecutive marks, attributed to the op
// whose launch ended it (copies and memsets in between count towards the next op). This file is
// the host-side table (plain C++, tested without a GPU); the events live in cuda_context.cpp.
// bench_gpu_train profiles one step per policy with it.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mpt::cuda {

struct OpTime {
  std::string op;
  double ms = 0;          // summed over the op's launches
  int64_t launches = 0;
};

class OpProfileTable {
 public:
  // One mark: `ms` of GPU time since the previous mark, ending with a launch of `op`.
  void add(const std::string& op, double ms);
  // Per-op totals, the largest first (ties by name, so the order is reproducible).
  std::vector<OpTime> sorted() const;
  double total_ms() const { return total_; }

 private:
  std::map<std::string, OpTime> ops_;
  double total_ = 0;
};

}  // namespace mpt::cuda
