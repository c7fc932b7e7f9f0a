#include "data/prepare.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>

#include "core/error.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "io/files.h"

namespace mpt::data {

namespace fs = std::filesystem;

namespace {

std::string read_text_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw InputError(path + ": cannot read input (" + std::strerror(errno) + ")");
  }
  if (!S_ISREG(st.st_mode)) throw InputError(path + ": input is not a regular file");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open input for reading");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw InputError(path + ": error while reading input");
  return text;
}

std::string shard_name(const std::string& dir, const char* split, size_t index) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%s_%06zu.bin", split, index);
  return (fs::path(dir) / buf).string();
}

// Writes text[begin, begin+n) as ceil(n / max) shards of nearly equal size.
std::vector<std::string> write_split(const std::string& text, size_t begin, int64_t n,
                                     int64_t max, const std::string& dir, const char* split) {
  std::vector<std::string> paths;
  if (n == 0) return paths;
  const int64_t k = (n + max - 1) / max;
  size_t at = begin;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t len = n / k + (i < n % k ? 1 : 0);
    const std::vector<uint16_t> tokens =
        encode(std::string_view(text).substr(at, static_cast<size_t>(len)));
    const std::string path = shard_name(dir, split, static_cast<size_t>(i));
    write_shard(path, tokens);
    paths.push_back(path);
    at += static_cast<size_t>(len);
  }
  return paths;
}

// Deletes SPLIT_NNNNNN.bin in dir whose number is >= keep (left over from an earlier run).
void remove_stale(const std::string& dir, const char* split, size_t keep) {
  const std::regex re(std::string(split) + "_([0-9]{6})\\.bin");
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (std::regex_match(name, m, re) && std::stoul(m[1].str()) >= keep) {
      fs::remove(e.path(), ec);
    }
  }
}

}  // namespace

PrepareResult prepare_shards(const std::vector<std::string>& inputs, const std::string& out_dir,
                             const PrepareOptions& opt) {
  if (inputs.empty()) throw InputError("data prepare: no input files given");
  if (out_dir.empty()) throw InputError("data prepare: the output directory is empty: expected a path");
  // Each input once (a file given twice would put the same text in both splits), and none of
  // the shards this prepare replaces or deletes (train_NNNNNN.bin, val_NNNNNN.bin in out_dir).
  for (size_t i = 0; i < inputs.size(); ++i) {
    std::error_code ec;
    for (size_t j = 0; j < i; ++j)
      if (fs::equivalent(inputs[j], inputs[i], ec))
        throw InputError("data prepare: input " + inputs[i] + " is given twice (also as " +
                         inputs[j] + "): its text would be in both splits");
    // The file itself, through any symlink: its name and directory are what would be replaced.
    fs::path in = fs::canonical(inputs[i], ec);
    if (ec) in = fs::path(inputs[i]);
    const std::string name = in.filename().string();
    // train_NNNNNN.bin or val_NNNNNN.bin (shard_name's pattern).
    auto shard_name_like = [&](const std::string& prefix) {
      if (name.rfind(prefix, 0) != 0 || name.size() != prefix.size() + 6 + 4) return false;
      for (size_t k = prefix.size(); k < prefix.size() + 6; ++k)
        if (name[k] < '0' || name[k] > '9') return false;
      return name.compare(name.size() - 4, 4, ".bin") == 0;
    };
    const bool shard_like = shard_name_like("train_") || shard_name_like("val_");
    if (shard_like && fs::equivalent(in.has_parent_path() ? in.parent_path() : fs::path("."),
                                     out_dir, ec))
      throw InputError("data prepare: input " + inputs[i] + " is one of the shards in " +
                       out_dir + " that this prepare replaces; prepare into another directory");
  }
  if (!(opt.val_fraction >= 0.0 && opt.val_fraction < 1.0)) {
    throw InputError("data prepare: val_fraction must be in [0, 1), got " +
                     std::to_string(opt.val_fraction));
  }
  if (opt.shard_tokens < 2 || opt.shard_tokens > INT32_MAX) {
    throw InputError("data prepare: shard_tokens must be in [2, " + std::to_string(INT32_MAX) +
                     "], got " + std::to_string(opt.shard_tokens));
  }

  std::string text;
  for (const std::string& in : inputs) {
    std::string t = read_text_file(in);
    if (t.empty()) continue;
    text += t;
    if (text.back() != '\n') text += '\n';
  }
  if (text.empty()) {
    std::string names;
    for (const std::string& in : inputs) names += (names.empty() ? "" : ", ") + in;
    throw InputError("data prepare: the input files hold no text (" + names + ")");
  }

  const int64_t total = static_cast<int64_t>(text.size());
  int64_t n_val = static_cast<int64_t>(std::floor(static_cast<double>(total) * opt.val_fraction));
  if (n_val > total - 1) n_val = total - 1;
  const int64_t n_train = total - n_val;
  if (n_train < 2) {
    throw InputError("data prepare: the train split would hold " + std::to_string(n_train) +
                     " token(s); a split needs at least 2 (input has " + std::to_string(total) +
                     " tokens)");
  }
  if (opt.val_fraction > 0 && n_val < 2) {  // asked for a val split that would be (nearly) empty
    throw InputError("data prepare: the val split would hold " + std::to_string(n_val) +
                     " token(s); a split needs at least 2 (input has " + std::to_string(total) +
                     " tokens; raise val_fraction or set it to 0)");
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec || !fs::is_directory(out_dir)) {
    throw InputError(out_dir + ": cannot create output directory" +
                     (ec ? " (" + ec.message() + ")" : std::string()));
  }

  // The new set is written whole into a staging directory inside out_dir first, and only then
  // moved over the old one (its extra shards deleted, then each new shard renamed into place):
  // a prepare that fails (a full disk) or is killed while it writes, which is nearly all of its
  // time, leaves the earlier set as it was. Only one killed during the final renames, which take
  // milliseconds, leaves a mix. A lock on out_dir keeps a second prepare from writing there at
  // the same time, so the staging directories of killed prepares can go at the next one.
  const std::string lock_path = (fs::path(out_dir) / ".mpt-prepare.lock").string();
  struct Lock {
    int fd;
    ~Lock() {
      if (fd >= 0) ::close(fd);  // releases the flock
    }
  } lock{::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644)};
  if (lock.fd < 0)
    throw InputError(lock_path + ": cannot create (" + std::strerror(errno) + ")");
  if (::flock(lock.fd, LOCK_EX | LOCK_NB) != 0)
    throw InputError(out_dir + ": another mpt data prepare is writing into it");
  for (const fs::directory_entry& e : fs::directory_iterator(out_dir, ec))
    if (e.is_directory(ec) && e.path().filename().string().rfind(".mpt-prepare.", 0) == 0)
      fs::remove_all(e.path(), ec);
  std::string staging = (fs::path(out_dir) / ".mpt-prepare.XXXXXX").string();
  if (::mkdtemp(staging.data()) == nullptr)
    throw InputError(out_dir + ": cannot create a staging directory in it (" +
                     std::strerror(errno) + ")");
  PrepareResult r;
  r.train_tokens = n_train;
  r.val_tokens = n_val;
  try {
    r.train_shards = write_split(text, 0, n_train, opt.shard_tokens, staging, "train");
    r.val_shards = write_split(text, static_cast<size_t>(n_train), n_val, opt.shard_tokens,
                               staging, "val");
    remove_stale(out_dir, "train", r.train_shards.size());
    remove_stale(out_dir, "val", r.val_shards.size());
    for (auto* list : {&r.train_shards, &r.val_shards})
      for (std::string& path : *list) {
        const fs::path to = fs::path(out_dir) / fs::path(path).filename();
        fs::rename(path, to);  // atomic per file; throws filesystem_error
        path = to.string();
      }
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(staging, ec);
    throw RuntimeError(out_dir + ": cannot move the new shards into place (" +
                       e.code().message() + ")");
  } catch (...) {
    fs::remove_all(staging, ec);
    throw;
  }
  fs::remove_all(staging, ec);
  sync_directory(out_dir);
  return r;
}

}  // namespace mpt::data
