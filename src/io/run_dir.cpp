#include "io/run_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "core/text.h"
#include "io/files.h"

namespace fs = std::filesystem;

namespace mpt {
namespace {

// Whether `dir` can take a new run: it does not exist, or is an empty directory.
bool is_free(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return true;
  return fs::is_directory(dir, ec) && fs::is_empty(dir, ec);
}

// The first free one of base, base-2, base-3, ... (a generated name that is taken: two runs
// started within the same second, or one at a name a user gave by hand).
std::string first_free(const std::string& base, int from) {
  std::string dir = from <= 1 ? base : base + "-" + std::to_string(from);
  for (int n = std::max(from, 1) + 1; !is_free(dir); ++n) dir = base + "-" + std::to_string(n);
  return dir;
}

void require_free(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return;
  if (!fs::is_directory(dir, ec))
    throw InputError("run directory " + dir.string() + " exists and is not a directory");
  if (!fs::is_empty(dir, ec))
    throw InputError("run directory " + dir.string() +
                     (fs::exists(dir / "metrics.jsonl", ec)
                          ? " already holds a run"
                          : " is not empty (it holds other files, not a run)") +
                     "; choose another output.name or --run-dir");
}

// A run directory that cannot be made where the user asked (no permission, a read-only file
// system, a file in the way, a name too long) is bad input, exit 2; a full disk or an I/O error
// is a failure of the run, exit 1.
[[noreturn]] void throw_create_error(const std::string& what, int err) {
  switch (err) {
    case EACCES: case EPERM: case EROFS: case ENOTDIR: case EEXIST: case ENOENT:
    case ENAMETOOLONG: case ELOOP: case EISDIR:
      throw InputError(what);
    default:
      throw RuntimeError(what);
  }
}

// Creates `dir` if needed and metrics.jsonl inside it with O_EXCL. False when another run got
// there first.
bool claim(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw_create_error(dir.string() + ": cannot create run directory: " + ec.message(),
                             ec.value());
  const std::string marker = (dir / "metrics.jsonl").string();
  const int fd = ::open(marker.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd >= 0) {
    ::close(fd);
    return true;
  }
  if (errno == EEXIST) return false;
  const int err = errno;
  throw_create_error(marker + ": cannot create (" + std::strerror(err) + ")", err);
}

}  // namespace

RunDirPlan plan_run_dir(const Config& cfg, const std::string& override_dir) {
  RunDirPlan plan;
  if (!override_dir.empty()) {
    plan.path = override_dir;
  } else {
    std::error_code ec;
    if (fs::exists(cfg.output.dir, ec) && !fs::is_directory(cfg.output.dir, ec))
      throw InputError("output.dir: " + cfg.output.dir + " exists and is not a directory");
    std::string name = cfg.output.name;
    if (name.empty()) {
      std::string stem =
          cfg.source_path.empty() ? "default" : fs::path(cfg.source_path).stem().string();
      // A file name holds 255 bytes: room for the time and a "-N" suffix, the stem cut at a
      // UTF-8 character's start if it must be.
      constexpr size_t kMaxStem = 255 - 16 - 8;
      if (stem.size() > kMaxStem) {
        size_t cut = kMaxStem;
        while (cut > 0 && (static_cast<unsigned char>(stem[cut]) & 0xC0) == 0x80) --cut;
        stem.resize(cut);
      }
      name = stem + "-" + utc_now("%Y%m%d-%H%M%S");
      plan.auto_named = true;
    }
    plan.path = (fs::path(cfg.output.dir) / name).string();
  }
  if (plan.auto_named) {
    plan.base = plan.path;
    plan.path = first_free(plan.base, 1);
  } else {
    require_free(plan.path);
  }
  return plan;
}

std::string create_run_dir(const RunDirPlan& plan, const Config& cfg) {
  std::string dir = plan.path;
  // A generated name taken since planning (another run claimed it first) moves on to the next
  // free suffix; a name the user chose is never replaced.
  for (int attempt = 2; !claim(dir); ++attempt) {
    if (!plan.auto_named)
      throw InputError("run directory " + plan.path +
                       " was taken by another run; choose another output.name or --run-dir");
    dir = first_free(plan.base, attempt);
  }
  write_file_atomic((fs::path(dir) / "config.yaml").string(), config_to_yaml(cfg));
  return dir;
}

RunLock::RunLock(const std::string& run_dir) {
  const std::string path = (fs::path(run_dir) / ".lock").string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw RuntimeError(path + ": cannot create (" + std::strerror(errno) + ")");
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd_);
    fd_ = -1;
    throw InputError("run directory " + run_dir + " is in use by another mpt process");
  }
}

RunLock::~RunLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the lock
}

}  // namespace mpt
