// Durable file writes shared by every writer in mpt (run config, token shards, later checkpoints).
#pragma once

#include <cstddef>
#include <initializer_list>
#include <string>
#include <vector>

namespace mpt {

struct ByteSpan {
  const void* data;
  size_t size;
};

// Writes the chunks, in order, to `path` through PATH.tmp: write, fsync, close, rename, then
// fsync the directory so the rename itself survives a crash. Readers see either the old file or
// the whole new one. RuntimeError naming the file on any failure; the temporary is removed.
void write_file_atomic(const std::string& path, const std::vector<ByteSpan>& chunks);
inline void write_file_atomic(const std::string& path, std::initializer_list<ByteSpan> chunks) {
  write_file_atomic(path, std::vector<ByteSpan>(chunks));
}
inline void write_file_atomic(const std::string& path, const std::string& content) {
  write_file_atomic(path, {ByteSpan{content.data(), content.size()}});
}

}  // namespace mpt
