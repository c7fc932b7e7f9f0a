#include "backend/cuda/host_ids.h"

#include <algorithm>
#include <string>

#include "core/error.h"

namespace mpt::cuda {
namespace {

bool overlaps(const HostIds& s, const void* ptr, size_t bytes) {
  const auto a0 = reinterpret_cast<uintptr_t>(s.ptr), b0 = reinterpret_cast<uintptr_t>(ptr);
  return a0 < b0 + bytes && b0 < a0 + s.bytes;
}

}  // namespace

void HostIdTable::record(const void* ptr, size_t bytes, const int32_t* values) {
  forget(ptr, bytes);
  if (slots_.size() == kSlots) slots_.erase(slots_.begin());
  HostIds s;
  s.ptr = ptr;
  s.bytes = bytes;
  s.values.assign(values, values + bytes / sizeof(int32_t));
  if (!s.values.empty()) {
    const auto mm = std::minmax_element(s.values.begin(), s.values.end());
    s.min = *mm.first;
    s.max = *mm.second;
  }
  slots_.push_back(std::move(s));
}

void HostIdTable::forget(const void* ptr, size_t bytes) {
  slots_.erase(std::remove_if(slots_.begin(), slots_.end(),
                              [&](const HostIds& s) { return overlaps(s, ptr, bytes); }),
               slots_.end());
}

const HostIds* HostIdTable::find(const void* ptr, size_t bytes) const {
  for (const HostIds& s : slots_)
    if (s.ptr == ptr && s.bytes == bytes) return &s;
  return nullptr;
}

void check_ids(const char* op, const int32_t* ids, int64_t n, int64_t limit,
               const HostIds* known) {
  if (known && (known->max < known->min || (known->min >= 0 && known->max < limit))) return;
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= limit)
      throw RuntimeError(std::string(op) + ": token id " + std::to_string(ids[i]) + " at " +
                         std::to_string(i) + " outside [0, " + std::to_string(limit) + ")");
}

EmbeddingBuckets bucket_positions(const int32_t* ids, int64_t n, int64_t vocab) {
  // count[v + 1] = positions of token v; then prefix sums: count[v] = first slot of token v.
  std::vector<int32_t> count(static_cast<size_t>(vocab) + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++count[static_cast<size_t>(ids[i]) + 1];
  EmbeddingBuckets b;
  for (int64_t v = 0; v < vocab; ++v) b.buckets += count[v + 1] > 0;
  for (int64_t v = 0; v < vocab; ++v) count[v + 1] += count[v];
  const int64_t K = b.buckets;
  b.packed.resize(static_cast<size_t>(2 * K + 1 + n));
  int32_t* token = b.packed.data();
  int32_t* start = token + K;
  int32_t* order = start + K + 1;
  int64_t k = 0;
  for (int64_t v = 0; v < vocab; ++v)
    if (count[v + 1] > count[v]) {
      token[k] = static_cast<int32_t>(v);
      start[k] = count[v];
      ++k;
    }
  start[K] = static_cast<int32_t>(n);
  // Positions in increasing order into their token's slots (count[v] advances as it fills).
  for (int64_t i = 0; i < n; ++i) order[count[ids[i]]++] = static_cast<int32_t>(i);
  return b;
}

}  // namespace mpt::cuda
