// Durable file writes shared by every writer in mpt (run config, token shards, later checkpoints).
#pragma once

#include <cstddef>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

namespace mpt {

struct ByteSpan {
  const void* data;
  size_t size;
  // For bytes not in host memory yet (a device's tensor), with data null: writes the chunk's
  // `size` bytes to `dst` when its turn comes. The writer reuses one buffer for all such chunks,
  // so that a file of device tensors needs host memory for its largest tensor, not for all.
  std::function<void(void* dst)> fill = nullptr;
};

// Writes the chunks, in order, to `path` through PATH.tmp: write, fsync, close, rename, then
// fsync the directory so the rename itself survives a crash. Readers see either the old file or
// the whole new one. RuntimeError naming the file on any failure; the temporary is removed.
//
// `hook`, for fault-injection tests only: called before each chunk with the bytes of this file
// written so far and the chunk's size; it returns 0 to go on or an errno to fail the write with
// (ENOSPC after N bytes), and may end the process (a crash in the middle of a file).
//
// `observe`, if given, sees each chunk's bytes, in order, just before they are written (to hash
// the file as it is written). An exception from a chunk's `fill` or from `observe` removes the
// temporary file and propagates.
using WriteHook = std::function<int(size_t written, size_t chunk_bytes)>;
using ChunkObserver = std::function<void(const void* data, size_t bytes)>;
void write_file_atomic(const std::string& path, const std::vector<ByteSpan>& chunks,
                       const WriteHook& hook = nullptr, const ChunkObserver& observe = nullptr);
inline void write_file_atomic(const std::string& path, std::initializer_list<ByteSpan> chunks) {
  write_file_atomic(path, std::vector<ByteSpan>(chunks));
}

// fsync a directory, so that renames and creations inside it survive a crash. Best effort: some
// file systems refuse to fsync directories.
void sync_directory(const std::string& dir);

// A whole file's bytes, in one read. InputError naming the file when it is missing, unreadable
// or shorter than its size said.
std::vector<char> read_file(const std::string& path);

// A whole file's bytes, mapped read-only: its pages come from the page cache, which the kernel
// may drop again, so a checkpoint of many gigabytes costs no resident memory of its own while
// it is verified and copied into the model. InputError as read_file. The mapping sees the file
// as it was opened: mpt replaces files by renaming (write_file_atomic), which leaves the mapped
// one intact; truncating it in place while mapped, or a disk error reading a page, would fault
// the reader (SIGBUS) instead of raising an error.
class MappedFile {
 public:
  static MappedFile map(const std::string& path);
  MappedFile() = default;
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();
  const char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const char* data_ = nullptr;
  size_t size_ = 0;
};
inline void write_file_atomic(const std::string& path, const std::string& content) {
  write_file_atomic(path, {ByteSpan{content.data(), content.size()}});
}

}  // namespace mpt
