// The host's side of the CUDA backend's token ids (plain C++, tested without a GPU).
//
// The embedding and the classifier index rows with int32 ids that must be checked on the host
// (an id out of range would read or write anywhere), and the embedding's deterministic backward
// buckets the positions by id on the host. Read back from the device, that costs a
// synchronisation per op: the GPU runs dry each time. Ids uploaded with
// Backend::copy_ids_from_host are remembered here instead, so those ops use the host's copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mpt::cuda {

// One uploaded id tensor's values, with their range (so that a check is O(1) when they are in
// range).
struct HostIds {
  const void* ptr = nullptr;  // the device tensor's start
  size_t bytes = 0;
  std::vector<int32_t> values;
  int32_t min = 0, max = -1;  // max < min: no values
};

// The host copies of the last few uploaded id tensors, by device address. A copy is used only
// for exactly the tensor uploaded (same start, same size); any other write to its memory that
// the backend sees (an upload, a fill, a free) forgets it.
class HostIdTable {
 public:
  static constexpr size_t kSlots = 8;

  // Records values[0, bytes / 4) as the contents of [ptr, ptr + bytes): replaces an exact match,
  // forgets every other copy overlapping it, and evicts the oldest when all slots are used.
  void record(const void* ptr, size_t bytes, const int32_t* values);
  // Forgets every copy overlapping [ptr, ptr + bytes).
  void forget(const void* ptr, size_t bytes);
  // The copy of exactly [ptr, ptr + bytes), or null.
  const HostIds* find(const void* ptr, size_t bytes) const;
  size_t size() const { return slots_.size(); }

 private:
  std::vector<HostIds> slots_;  // oldest first
};

// Throws RuntimeError naming `op` and the first id outside [0, limit) with its position, as the
// CPU backend reports it; `ids` holds n values. With `known` (the range of those values), a
// range inside the limits returns at once.
void check_ids(const char* op, const int32_t* ids, int64_t n, int64_t limit,
               const HostIds* known = nullptr);

// The embedding backward's buckets: positions grouped by token, tokens in increasing order,
// each bucket's positions in increasing order (a counting sort). packed = [token of each bucket
// (K) | first slot of each bucket (K), then n | the positions (n)], uploaded as one block.
struct EmbeddingBuckets {
  int64_t buckets = 0;  // K
  std::vector<int32_t> packed;
};
// ids: n checked values in [0, vocab).
EmbeddingBuckets bucket_positions(const int32_t* ids, int64_t n, int64_t vocab);

}  // namespace mpt::cuda
