// Deterministic batches of training windows.
#pragma once

#include <cstdint>
#include <vector>

#include "data/dataset.h"

namespace mpt::data {

// Where a loader is: the epoch, and how many samples of that epoch have been drawn. Always
// normalised: sample < samples_per_epoch (drawing an epoch's last sample moves to epoch+1, 0).
struct LoaderCursor {
  uint64_t epoch = 0;
  uint64_t sample = 0;
};

class BatchLoader {
 public:
  // A sample is a window of T+1 tokens starting at a multiple of T inside one source; a source of
  // n tokens gives (n-1)/T samples. shuffle=true: each epoch visits every sample once, in an order
  // that depends only on (seed, epoch): the sources are shuffled, and the samples of a source are
  // shuffled when the loader enters it (memory: one permutation of one source). shuffle=false:
  // sources and samples in file order. The dataset must outlive the loader.
  // InputError if B or T is not positive, or no source holds T+1 tokens.
  BatchLoader(const TokenDataset& data, int B, int T, uint64_t seed, bool shuffle);

  // Fills inputs[B*T] and targets[B*T], row-major (b, t); targets are the inputs shifted by one
  // within each window. Continues into the next epoch when one runs out.
  void next(int32_t* inputs, int32_t* targets);

  LoaderCursor cursor() const { return {epoch_, sample_}; }
  // Continue exactly as if that many samples had been drawn. InputError if c.sample is not below
  // samples_per_epoch().
  void seek(const LoaderCursor& c);
  void reset() { seek(LoaderCursor{}); }
  int64_t samples_per_epoch() const { return samples_per_epoch_; }
  int batch_size() const { return B_; }
  int seq_len() const { return T_; }

 private:
  void start_epoch(uint64_t epoch);  // fills order_
  void enter_source(size_t pos);     // sets pos_, fills perm_
  void advance();

  std::vector<TokenSource> sources_;
  std::vector<int64_t> samples_;  // per source
  int B_, T_;
  uint64_t seed_;
  bool shuffle_;
  int64_t samples_per_epoch_ = 0;

  uint64_t epoch_ = 0;
  uint64_t sample_ = 0;          // samples drawn in this epoch
  std::vector<uint32_t> order_;  // this epoch's visiting order of the sources with samples
  size_t pos_ = 0;               // index into order_
  int64_t in_source_ = 0;        // samples drawn from order_[pos_]
  std::vector<uint32_t> perm_;   // shuffled sample order of order_[pos_]
};

}  // namespace mpt::data
