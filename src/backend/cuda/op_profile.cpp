#include "backend/cuda/op_profile.h"

#include <algorithm>

namespace mpt::cuda {

void OpProfileTable::add(const std::string& op, double ms) {
  OpTime& t = ops_[op];
  t.op = op;
  t.ms += ms;
  t.launches += 1;
  total_ += ms;
}

std::vector<OpTime> OpProfileTable::sorted() const {
  std::vector<OpTime> v;
  v.reserve(ops_.size());
  for (const auto& [name, t] : ops_) v.push_back(t);
  std::stable_sort(v.begin(), v.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  return v;
}

}  // namespace mpt::cuda
