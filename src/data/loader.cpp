#include "data/loader.h"

#include <numeric>
#include <utility>

#include "core/error.h"
#include "core/rng.h"

namespace mpt::data {

namespace {

template <typename T>
void shuffle_in_place(std::vector<T>& v, Rng& rng) {
  for (size_t i = v.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng.below(i));
    std::swap(v[i - 1], v[j]);
  }
}

}  // namespace

BatchLoader::BatchLoader(const TokenDataset& data, int B, int T, uint64_t seed, bool shuffle)
    : sources_(data.sources()), B_(B), T_(T), seed_(seed), shuffle_(shuffle) {
  if (B <= 0 || T <= 0) {
    throw InputError("batch loader: batch size and sequence length must be positive, got B=" +
                     std::to_string(B) + " T=" + std::to_string(T));
  }
  for (const TokenSource& s : sources_) {
    const int64_t n = s.size >= 1 ? (s.size - 1) / T : 0;
    MPT_CHECK(n <= static_cast<int64_t>(UINT32_MAX), "too many samples in one source");
    samples_.push_back(n);
    samples_per_epoch_ += n;
  }
  if (samples_per_epoch_ == 0) {
    const TokenSource* longest = &sources_.front();  // open() refuses an empty dataset
    for (const TokenSource& s : sources_)
      if (s.size > longest->size) longest = &s;
    throw InputError(data.key() + " (" + data.describe() + "): no source holds a full window of "
                     "T+1 = " + std::to_string(T + 1) + " tokens (windows never span two "
                     "sources); the longest, " + longest->name + ", holds " +
                     std::to_string(longest->size) + ": use longer shards or a shorter "
                     "training.seq_len");
  }
  reset();
}

void BatchLoader::start_epoch(uint64_t epoch) {
  epoch_ = epoch;
  order_.clear();
  for (size_t i = 0; i < sources_.size(); ++i) {
    if (samples_[i] > 0) order_.push_back(static_cast<uint32_t>(i));
  }
  if (shuffle_) {
    Rng rng(derive_seed(derive_seed(seed_, epoch), 0));
    shuffle_in_place(order_, rng);
  }
}

void BatchLoader::enter_source(size_t pos) {
  pos_ = pos;
  in_source_ = 0;
  if (!shuffle_) return;
  const uint32_t src = order_[pos];
  perm_.resize(static_cast<size_t>(samples_[src]));
  std::iota(perm_.begin(), perm_.end(), 0u);
  Rng rng(derive_seed(derive_seed(seed_, epoch_), 1 + static_cast<uint64_t>(src)));
  shuffle_in_place(perm_, rng);
}

void BatchLoader::advance() {
  ++sample_;
  ++in_source_;
  if (in_source_ < samples_[order_[pos_]]) return;
  if (pos_ + 1 < order_.size()) {
    enter_source(pos_ + 1);
    return;
  }
  start_epoch(epoch_ + 1);
  sample_ = 0;
  enter_source(0);
}

void BatchLoader::next(int32_t* inputs, int32_t* targets) {
  const size_t T = static_cast<size_t>(T_);
  for (int b = 0; b < B_; ++b) {
    const TokenSource& s = sources_[order_[pos_]];
    const int64_t local = shuffle_ ? perm_[static_cast<size_t>(in_source_)] : in_source_;
    const uint16_t* w = s.tokens + local * T_;
    int32_t* in = inputs + static_cast<size_t>(b) * T;
    int32_t* tg = targets + static_cast<size_t>(b) * T;
    for (size_t t = 0; t < T; ++t) {
      in[t] = w[t];
      tg[t] = w[t + 1];
    }
    advance();
  }
}

void BatchLoader::seek(const LoaderCursor& c) {
  if (c.sample >= static_cast<uint64_t>(samples_per_epoch_)) {
    throw InputError("batch loader: cannot seek to sample " + std::to_string(c.sample) +
                     " of epoch " + std::to_string(c.epoch) + ": an epoch has only " +
                     std::to_string(samples_per_epoch_) +
                     " samples (was the checkpoint made with other data or seq_len?)");
  }
  start_epoch(c.epoch);
  uint64_t left = c.sample;
  size_t pos = 0;
  while (left >= static_cast<uint64_t>(samples_[order_[pos]])) {
    left -= static_cast<uint64_t>(samples_[order_[pos]]);
    ++pos;
  }
  enter_source(pos);
  in_source_ = static_cast<int64_t>(left);
  sample_ = c.sample;
}

}  // namespace mpt::data
