#include "io/run_dir.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>

#include "core/error.h"

namespace fs = std::filesystem;

namespace mpt {

std::string plan_run_dir(const Config& cfg, const std::string& override_dir) {
  fs::path dir;
  if (!override_dir.empty()) {
    dir = override_dir;
  } else {
    std::string name = cfg.output.name;
    if (name.empty()) {
      const std::string stem =
          cfg.source_path.empty() ? "default" : fs::path(cfg.source_path).stem().string();
      std::time_t now = std::time(nullptr);
      std::tm tm{};
      gmtime_r(&now, &tm);
      char buf[32];
      std::strftime(buf, sizeof buf, "%Y%m%d-%H%M%S", &tm);
      name = stem + "-" + buf;
    }
    dir = fs::path(cfg.output.dir) / name;
  }
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    if (!fs::is_directory(dir, ec))
      throw InputError("run directory " + dir.string() + " exists and is not a directory");
    if (!fs::is_empty(dir, ec))
      throw InputError("run directory " + dir.string() +
                       " already holds a run; choose another output.name or --run-dir");
  }
  return dir.string();
}

void write_file_atomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw RuntimeError(tmp + ": cannot create: " + std::strerror(errno));
  size_t done = 0;
  while (done < content.size()) {
    const ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw RuntimeError(tmp + ": write failed: " + std::strerror(err));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw RuntimeError(tmp + ": fsync/close failed: " + std::strerror(err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw RuntimeError(path + ": rename failed: " + std::strerror(err));
  }
}

void create_run_dir(const std::string& dir, const Config& cfg) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw RuntimeError(dir + ": cannot create run directory: " + ec.message());
  write_file_atomic((fs::path(dir) / "config.yaml").string(), config_to_yaml(cfg));
}

}  // namespace mpt
