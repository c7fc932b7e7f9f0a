#include "io/files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "core/error.h"

namespace mpt {
namespace {

// Writes all of [data, data+n) to fd, retrying short writes and EINTR. Returns 0 or an errno.
int write_all(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return 0;
}

std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

void sync_directory(const std::string& dir) {
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

void write_file_atomic(const std::string& path, const std::vector<ByteSpan>& chunks,
                       const WriteHook& hook, const ChunkObserver& observe) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw RuntimeError(tmp + ": cannot create (" + std::strerror(errno) + ")");
  int err = 0;
  const char* what = "cannot write";
  size_t written = 0;
  std::vector<char> filled;  // the chunks that fill themselves, one at a time
  try {
    for (const ByteSpan& c : chunks) {
      if (err == 0 && hook) err = hook(written, c.size);
      if (err == 0 && c.size > 0) {
        const void* bytes = c.data;
        if (bytes == nullptr) {
          MPT_CHECK(c.fill != nullptr, tmp + ": a chunk has neither bytes nor a fill");
          if (filled.size() < c.size) filled = std::vector<char>(c.size);  // no copy of the old
          c.fill(filled.data());
          bytes = filled.data();
        }
        if (observe) observe(bytes, c.size);
        err = write_all(fd, bytes, c.size);
      }
      written += c.size;
    }
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (err == 0 && ::fsync(fd) != 0) {
    err = errno;
    what = "cannot sync";
  }
  if (::close(fd) != 0 && err == 0) {  // always closed, whatever failed before
    err = errno;
    what = "cannot close";
  }
  if (err != 0) {
    ::unlink(tmp.c_str());
    throw RuntimeError(tmp + ": " + what + " (" + std::strerror(err) + ")");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    err = errno;
    ::unlink(tmp.c_str());
    throw RuntimeError(path + ": cannot rename " + tmp + " into place (" + std::strerror(err) + ")");
  }
  sync_directory(parent_dir(path));
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw InputError(path + ": missing or unreadable (" + std::strerror(errno) + ")");
  const std::streamoff size = in.tellg();
  if (size < 0) throw InputError(path + ": cannot determine its size");
  std::vector<char> bytes(static_cast<size_t>(size));
  in.seekg(0);
  in.read(bytes.data(), size);
  if (in.gcount() != size)
    throw InputError(path + ": read error (got " + std::to_string(in.gcount()) + " of " +
                     std::to_string(size) + " bytes)");
  return bytes;
}

MappedFile MappedFile::map(const std::string& path) {
  // Checked before opening too: opening a FIFO would wait for a writer.
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
    throw InputError(path + ": not a regular file");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw InputError(path + ": missing or unreadable (" + std::strerror(errno) + ")");
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw InputError(path + ": cannot stat (" + std::strerror(err) + ")");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(path + ": not a regular file");
  }
  MappedFile m;
  m.size_ = static_cast<size_t>(st.st_size);
  if (m.size_ > 0) {  // mmap refuses a length of 0; an empty file maps to no bytes
    void* p = ::mmap(nullptr, m.size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      throw InputError(path + ": cannot map (" + std::strerror(err) + ")");
    }
    m.data_ = static_cast<const char*>(p);
  }
  ::close(fd);  // the mapping keeps the file
  return m;
}

MappedFile::MappedFile(MappedFile&& o) noexcept : data_(o.data_), size_(o.size_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(const_cast<char*>(data_), size_);
    data_ = o.data_;
    size_ = o.size_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<char*>(data_), size_);
}

}  // namespace mpt
