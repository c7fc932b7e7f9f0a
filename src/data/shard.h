// Token shards in llm.c's format: a header of 256 little-endian int32 values ([0] = magic
// 20240520, [1] = version 1, [2] = token count, the rest zero) followed by `count` little-endian
// uint16 tokens. Shards prepared for llm.c (GPT-2 tokens) are read unchanged.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mpt::data {

constexpr int32_t kShardMagic = 20240520;
constexpr int32_t kShardVersion = 1;
constexpr int kShardHeaderInts = 256;
constexpr int64_t kShardHeaderBytes = kShardHeaderInts * 4;

struct ShardInfo {
  std::string path;
  int32_t magic = 0;
  int32_t version = 0;
  int64_t num_tokens = 0;
  int64_t file_bytes = 0;
  uint16_t min_token = 0;  // both 0 for a shard without tokens
  uint16_t max_token = 0;
};

// Writes PATH.tmp, fsyncs it and renames it to PATH, so PATH is either the old file or the
// complete new one. RuntimeError naming the file on any I/O failure; InputError when `tokens`
// holds more than INT32_MAX tokens (the header's count is an int32).
void write_shard(const std::string& path, const std::vector<uint16_t>& tokens);

// A read-only memory map of one validated shard. Move-only; unmaps in the destructor.
class Shard {
 public:
  // Validates that the file opens, is a regular file, holds at least the header, has the right
  // magic and version, a non-negative count, and exactly header + 2*count bytes. Every failure is
  // an InputError naming the file and saying what was expected and what was found.
  static Shard open(const std::string& path);

  Shard(Shard&& other) noexcept;
  Shard& operator=(Shard&& other) noexcept;
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;
  ~Shard();

  const uint16_t* tokens() const { return tokens_; }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  int64_t file_bytes() const { return static_cast<int64_t>(map_bytes_); }

 private:
  Shard() = default;
  void release() noexcept;

  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const uint16_t* tokens_ = nullptr;
  int64_t size_ = 0;
};

// Opens (validating) the shard and scans its tokens for the smallest and largest value.
ShardInfo inspect_shard(const std::string& path);

// Human-readable multi-line description for `mpt data inspect` (ends with a newline).
std::string format_shard_info(const ShardInfo& info);

}  // namespace mpt::data
