// The tokens one split trains or evaluates on: the built-in corpus and/or llm.c token shards.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/corpus.h"
#include "data/shard.h"

namespace mpt::data {

// One contiguous run of tokens; training windows never cross from one source into the next.
struct TokenSource {
  std::string name;  // the shard's path, or "builtin corpus (train split)"
  const uint16_t* tokens;
  int64_t size;
};

// The existing files (not directories) a path or POSIX glob(3) pattern names, sorted; relative
// to the working directory; empty when nothing matches. Config validation and TokenDataset
// expand data entries with this same function, so they agree on what a pattern means.
std::vector<std::string> glob_files(const std::string& pattern);

class TokenDataset {
 public:
  // specs: entries of data.train / data.val: "builtin" or a path or POSIX glob (matches sorted,
  // relative to the working directory; a spec without * ? [ is a plain path). Validates every
  // shard (Shard::open), that every token is < vocab_size, and that the dataset holds at least
  // min_tokens tokens. InputError for: no specs, an empty spec, a pattern matching nothing,
  // a bad shard, a token >= vocab_size (file, index, value, vocab size), "builtin" with
  // vocab_size < 256, too few tokens (specs and both counts).
  static TokenDataset open(const std::vector<std::string>& specs, Split split, int vocab_size,
                           int64_t min_tokens);

  TokenDataset(TokenDataset&&) noexcept = default;
  TokenDataset& operator=(TokenDataset&&) noexcept = default;
  TokenDataset(const TokenDataset&) = delete;
  TokenDataset& operator=(const TokenDataset&) = delete;

  const std::vector<TokenSource>& sources() const { return sources_; }
  int64_t total_tokens() const { return total_; }
  // "builtin corpus (train split, 1234567 tokens)", "3 shards, 300000000 tokens",
  // "1 shard (data/x.bin), 1000 tokens", "builtin corpus (train split) + 2 shards, 1500 tokens".
  std::string describe() const;
  // The config key the split comes from: "data.train" or "data.val".
  std::string key() const { return std::string("data.") + split_name(split_); }

 private:
  TokenDataset() = default;

  Split split_ = Split::train;
  std::vector<Shard> shards_;  // owns the maps the sources point into
  std::vector<TokenSource> sources_;
  int64_t total_ = 0;
  int builtin_count_ = 0;
};

}  // namespace mpt::data
