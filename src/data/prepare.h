// `mpt data prepare`: text files -> byte-token shards in llm.c's format.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mpt::data {

struct PrepareOptions {
  double val_fraction = 0.1;          // in [0, 1): share of the tokens (the last ones) for val
  int64_t shard_tokens = 100'000'000;  // most tokens per shard, 2..INT32_MAX
};

struct PrepareResult {
  std::vector<std::string> train_shards, val_shards;  // paths, in order
  int64_t train_tokens = 0, val_tokens = 0;
};

// Byte-tokenizes the input files in order (concatenated; a file's text is followed by '\n'
// unless it is empty or already ends with one). The last floor(val_fraction * total) tokens go to
// val shards, the rest to train shards. A split of n tokens is cut into ceil(n / shard_tokens)
// shards of nearly equal size, named OUT/train_000000.bin, ... and OUT/val_000000.bin, ...
// Creates OUT if needed. Shards named like that left over from an earlier, larger run (numbers
// past the new last one) are deleted so that globs such as OUT/train_*.bin see only this run.
// InputError for: no inputs, a missing/unreadable input (named), empty input, val_fraction
// outside [0, 1), shard_tokens outside [2, INT32_MAX], a non-empty split of fewer than 2 tokens,
// an OUT that cannot be created. RuntimeError for write failures.
PrepareResult prepare_shards(const std::vector<std::string>& inputs, const std::string& out_dir,
                             const PrepareOptions& opt);

}  // namespace mpt::data
