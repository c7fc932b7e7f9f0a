#include "io/metrics.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/error.h"
#include "core/text.h"

namespace mpt {
namespace {

// A run killed, or a disk that filled, mid-record leaves a cut-off last line. Readers skip a
// cut-off *last* line only, so before a resumed run appends, the fragment is cut away: the new
// records then start on a line of their own. Returns the bytes dropped.
size_t drop_partial_last_line(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return 0;  // absent: fopen creates it (or reports why it cannot)
  const off_t size = ::lseek(fd, 0, SEEK_END);
  char last = '\n';
  if (size <= 0 || ::pread(fd, &last, 1, size - 1) != 1 || last == '\n') {
    ::close(fd);
    return 0;
  }
  // Back from the end to the last newline (or the start: the file is one cut-off record). A
  // failed read cuts nothing: better a glued line than records lost.
  off_t keep = -1, pos = size;
  std::vector<char> buf(1 << 16);
  while (keep < 0) {
    if (pos == 0) {
      keep = 0;
      break;
    }
    const off_t n = std::min<off_t>(pos, static_cast<off_t>(buf.size()));
    pos -= n;
    if (::pread(fd, buf.data(), static_cast<size_t>(n), pos) != n) {
      const int err = errno;
      ::close(fd);
      throw RuntimeError(path + ": cannot read it back to find its last whole record: " +
                         std::strerror(err));
    }
    for (off_t i = n - 1; i >= 0 && keep < 0; --i)
      if (buf[static_cast<size_t>(i)] == '\n') keep = pos + i + 1;
  }
  const int rc = ::ftruncate(fd, keep);
  ::close(fd);
  if (rc != 0) throw RuntimeError(path + ": cannot cut its cut-off last record: " + std::strerror(errno));
  return static_cast<size_t>(size - keep);
}

}  // namespace

MetricsSink::MetricsSink(const std::string& path, bool append) : path_(path) {
  if (append) {
    if (const size_t dropped = drop_partial_last_line(path))
      spdlog::warn("{}: dropped a cut-off last record ({} bytes) before appending", path, dropped);
  }
  f_ = std::fopen(path.c_str(), append ? "a" : "w");
  if (!f_) throw RuntimeError(path + ": cannot open for writing: " + std::strerror(errno));
}

MetricsSink::~MetricsSink() {
  if (f_) std::fclose(f_);
}

void MetricsSink::write(const nlohmann::json& record) {
  // Non-finite floats have no JSON form; nlohmann writes them as null, which readers handle.
  const std::string line = record.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    throw RuntimeError(path_ + ": write failed: " + std::strerror(errno));
}

std::string utc_timestamp() { return utc_now("%Y-%m-%dT%H:%M:%SZ"); }

}  // namespace mpt
