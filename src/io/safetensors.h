// The safetensors format (Hugging Face, https://github.com/huggingface/safetensors): an 8-byte
// little-endian header length N, N bytes of JSON mapping each tensor name to its dtype, shape
// and [begin, end) byte range in the data that follows, plus an optional "__metadata__" object
// of string values; then the tensors' bytes, row-major, little-endian. mpt writes checkpoints in
// it so that other tools can read them; this is our own implementation of the format.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/files.h"

namespace mpt::safetensors {

// safetensors' name for a dtype ("F32", "I32", ...); RuntimeError for one it cannot hold.
std::string format_name(DType t);

struct TensorRef {
  std::string name;
  DType dtype;
  Shape shape;
  const void* data;  // host memory, shape.numel() * dtype_size(dtype) bytes; or null, and:
  // writes those bytes to dst, for a tensor not in host memory (ByteSpan::fill: the writer
  // fetches one such tensor at a time).
  std::function<void(void* dst)> fill = nullptr;
};

// Writes the tensors, in the given order, durably (temporary file, fsync, rename). The header is
// padded with spaces to a multiple of 8 bytes so every tensor starts 8-byte aligned. Names must
// be unique and not "__metadata__" (RuntimeError otherwise: a caller bug).
// Returns the file's size and the XXH3-64 of its bytes, hashed from memory as they are written
// (re-reading a gigabyte file to hash it would double the cost of a checkpoint).
struct Written {
  uint64_t bytes;
  uint64_t xxh3;
};
Written write(const std::string& path, const std::vector<TensorRef>& tensors,
              const std::map<std::string, std::string>& metadata = {},
              const WriteHook& hook = nullptr);

// A read-only, validated safetensors file held in memory.
class File {
 public:
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    size_t offset;  // into the data section
    size_t bytes;
  };

  // Reads and validates the whole file: the header length fits the file, the header is a JSON
  // object, every entry has a known dtype, a shape of at most 4 non-negative dimensions and
  // offsets whose span equals the shape's byte size, entries neither overlap nor leave gaps,
  // and together they cover the data section exactly. Any failure is an InputError naming the
  // file (and the tensor, where one is at fault).
  // The file is mapped (MappedFile), not read: its pages cost no resident memory of their own.
  static File open(const std::string& path);
  // The same checks on a file's bytes already in memory or mapped (read once, verified, then
  // parsed).
  static File parse(const std::string& path, std::vector<char> bytes);
  static File parse(const std::string& path, MappedFile bytes);

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<Entry>& entries() const { return entries_; }  // in data order
  bool contains(const std::string& name) const;
  const Entry& entry(const std::string& name) const;  // InputError naming file and tensor
  const void* data(const Entry& e) const { return base_ + data_start_ + e.offset; }

 private:
  static File parse_bytes(const std::string& path, std::shared_ptr<const void> owner,
                          const char* base, size_t size);
  std::string path_;
  std::shared_ptr<const void> owner_;  // the vector or the mapping that holds the bytes
  const char* base_ = nullptr;
  size_t size_ = 0;
  size_t data_start_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<Entry> entries_;
};

}  // namespace mpt::safetensors
