#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <sstream>

#include "core/error.h"
#include "io/files.h"

// The format is little-endian and we map it in place, so the host must be little-endian too.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "token shards are read by memory-mapping little-endian data");

namespace mpt::data {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

void write_shard(const std::string& path, const std::vector<uint16_t>& tokens) {
  if (tokens.size() > static_cast<size_t>(INT32_MAX)) {
    throw InputError(path + ": cannot write " + std::to_string(tokens.size()) +
                     " tokens to one shard (the header's count holds at most " +
                     std::to_string(INT32_MAX) + ")");
  }
  int32_t header[kShardHeaderInts] = {};
  header[0] = kShardMagic;
  header[1] = kShardVersion;
  header[2] = static_cast<int32_t>(tokens.size());

  write_file_atomic(path, {ByteSpan{header, sizeof(header)},
                           ByteSpan{tokens.data(), tokens.size() * sizeof(uint16_t)}});
}

Shard Shard::open(const std::string& path) {
  // Checked before opening: opening a FIFO blocks until a writer comes, signals included.
  struct stat before {};
  if (::stat(path.c_str(), &before) == 0 && !S_ISREG(before.st_mode))
    throw InputError(path + ": not a regular file (expected an llm.c token shard)");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    throw InputError(path + ": cannot open token shard (" + errno_text(errno) + ")");
  }
  // Closes fd on every exit path; the mapping stays valid after close.
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};

  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    throw InputError(path + ": cannot stat token shard (" + errno_text(errno) + ")");
  }
  if (!S_ISREG(st.st_mode)) {
    throw InputError(path + ": not a regular file (expected an llm.c token shard)");
  }
  const int64_t file_bytes = static_cast<int64_t>(st.st_size);
  if (file_bytes == 0) {
    throw InputError(path + ": file is empty (expected an llm.c token shard: a " +
                     std::to_string(kShardHeaderBytes) + "-byte header, then uint16 tokens)");
  }
  if (file_bytes < kShardHeaderBytes) {
    throw InputError(path + ": file has " + std::to_string(file_bytes) +
                     " bytes, too short for the " + std::to_string(kShardHeaderBytes) +
                     "-byte header of an llm.c token shard");
  }

  Shard s;
  s.path_ = path;
  s.map_bytes_ = static_cast<size_t>(file_bytes);
  void* map = ::mmap(nullptr, s.map_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
  if (map == MAP_FAILED) {
    throw RuntimeError(path + ": cannot memory-map token shard (" + errno_text(errno) + ")");
  }
  s.map_ = map;  // from here on the destructor of `s` unmaps on any throw

  int32_t header[3];
  std::memcpy(header, map, sizeof(header));
  if (header[0] != kShardMagic) {
    throw InputError(path + ": bad magic " + std::to_string(header[0]) + " (expected " +
                     std::to_string(kShardMagic) + ": not an llm.c token shard)");
  }
  if (header[1] != kShardVersion) {
    throw InputError(path + ": unsupported shard version " + std::to_string(header[1]) +
                     " (expected " + std::to_string(kShardVersion) + ": uint16 tokens)");
  }
  const int64_t count = header[2];
  if (count < 0) {
    throw InputError(path + ": header says " + std::to_string(count) +
                     " tokens (expected a non-negative count)");
  }
  const int64_t body = file_bytes - kShardHeaderBytes;
  if (body != 2 * count) {
    throw InputError(path + ": header says " + std::to_string(count) + " tokens (" +
                     std::to_string(2 * count) + " bytes) but file has " + std::to_string(body) +
                     " bytes after the header");
  }
  s.tokens_ = reinterpret_cast<const uint16_t*>(static_cast<const char*>(map) + kShardHeaderBytes);
  s.size_ = count;
  return s;
}

Shard::Shard(Shard&& other) noexcept
    : path_(std::move(other.path_)),
      map_(other.map_),
      map_bytes_(other.map_bytes_),
      tokens_(other.tokens_),
      size_(other.size_) {
  other.map_ = nullptr;
  other.map_bytes_ = 0;
  other.tokens_ = nullptr;
  other.size_ = 0;
}

Shard& Shard::operator=(Shard&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    map_ = other.map_;
    map_bytes_ = other.map_bytes_;
    tokens_ = other.tokens_;
    size_ = other.size_;
    other.map_ = nullptr;
    other.map_bytes_ = 0;
    other.tokens_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

Shard::~Shard() { release(); }

void Shard::release() noexcept {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
  tokens_ = nullptr;
  size_ = 0;
}

ShardInfo inspect_shard(const std::string& path) {
  const Shard s = Shard::open(path);
  ShardInfo info;
  info.path = path;
  info.magic = kShardMagic;
  info.version = kShardVersion;
  info.num_tokens = s.size();
  info.file_bytes = s.file_bytes();
  if (s.size() > 0) {
    uint16_t lo = UINT16_MAX, hi = 0;
    const uint16_t* t = s.tokens();
    for (int64_t i = 0; i < s.size(); ++i) {
      lo = t[i] < lo ? t[i] : lo;
      hi = t[i] > hi ? t[i] : hi;
    }
    info.min_token = lo;
    info.max_token = hi;
  }
  return info;
}

std::string format_shard_info(const ShardInfo& info) {
  std::ostringstream o;
  o << "path:        " << info.path << "\n";
  o << "magic:       " << info.magic
    << (info.magic == kShardMagic ? " (llm.c token shard)" : " (not an llm.c token shard)") << "\n";
  o << "version:     " << info.version << (info.version == kShardVersion ? " (uint16 tokens)" : "")
    << "\n";
  o << "tokens:      " << info.num_tokens << "\n";
  o << "file bytes:  " << info.file_bytes << "\n";
  if (info.num_tokens > 0) {
    o << "vocab range: [" << info.min_token << ", " << info.max_token
      << "] (needs model.vocab_size >= " << (static_cast<int>(info.max_token) + 1) << ")\n";
  } else {
    o << "vocab range: (no tokens)\n";
  }
  return o.str();
}

}  // namespace mpt::data
