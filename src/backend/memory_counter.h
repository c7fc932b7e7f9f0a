// The exact count behind Backend::memory_usage(): bytes held now and their high-water mark.
// Shared (shared_ptr) with the release functions of the Buffers a backend hands out, so a Buffer
// that outlives its backend still releases into a live counter. Allocation and release happen
// on the thread that drives the backend (never inside an OpenMP region), so no atomics.
#pragma once

#include <algorithm>
#include <cstddef>

namespace mpt {

class MemoryCounter {
 public:
  void add(size_t bytes) {
    bytes_ += bytes;
    peak_ = std::max(peak_, bytes_);
  }
  void sub(size_t bytes) { bytes_ -= std::min(bytes, bytes_); }
  size_t bytes() const { return bytes_; }
  size_t peak() const { return peak_; }
  void reset_peak() { peak_ = bytes_; }

 private:
  size_t bytes_ = 0;
  size_t peak_ = 0;
};

}  // namespace mpt
