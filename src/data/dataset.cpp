#include "data/dataset.h"

#include <glob.h>
#include <sys/stat.h>

#include <algorithm>
#include <sstream>

#include "core/error.h"
#include "core/text.h"
#include "data/tokenizer.h"

namespace mpt::data {

std::vector<std::string> glob_files(const std::string& pattern) {
  std::vector<std::string> files;
  glob_t g{};
  if (::glob(pattern.c_str(), 0, nullptr, &g) == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i) {
      struct stat info {};
      if (::stat(g.gl_pathv[i], &info) == 0 && !S_ISDIR(info.st_mode))
        files.emplace_back(g.gl_pathv[i]);
    }
  }
  ::globfree(&g);
  return files;  // glob(3) sorts its matches
}

TokenDataset TokenDataset::open(const std::vector<std::string>& specs, Split split, int vocab_size,
                                int64_t min_tokens) {
  const std::string what = std::string("data.") + split_name(split);
  if (specs.empty()) throw InputError(what + ": no data given (use \"builtin\" or shard paths)");
  if (vocab_size <= 0) {
    throw InputError(what + ": vocab_size must be positive, got " + std::to_string(vocab_size));
  }

  TokenDataset ds;
  ds.split_ = split;
  for (const std::string& spec : specs) {
    if (spec.empty()) throw InputError(what + ": empty entry (use \"builtin\" or a shard path)");
    if (spec == "builtin") {
      if (vocab_size < kByteVocab) {
        throw InputError(what + ": the builtin corpus uses byte tokens (vocabulary " +
                         std::to_string(kByteVocab) + ") but vocab_size is " +
                         std::to_string(vocab_size) + "; set model.vocab_size to at least " +
                         std::to_string(kByteVocab));
      }
      const std::vector<uint16_t>& t = builtin_corpus_tokens(split);
      ds.sources_.push_back({std::string("builtin corpus (") + split_name(split) + " split)",
                             t.data(), static_cast<int64_t>(t.size())});
      ds.total_ += static_cast<int64_t>(t.size());
      ++ds.builtin_count_;
      continue;
    }
    const std::vector<std::string> paths = glob_files(spec);
    if (paths.empty()) throw InputError(what + ": '" + spec + "' matches no existing file");
    for (const std::string& path : paths) {
      Shard s = Shard::open(path);
      const uint16_t* t = s.tokens();
      const int64_t n = s.size();
      if (vocab_size <= UINT16_MAX) {
        const uint16_t limit = static_cast<uint16_t>(vocab_size);
        for (int64_t i = 0; i < n; ++i) {
          if (t[i] >= limit) {
            throw InputError(path + ": token at index " + std::to_string(i) + " has value " +
                             std::to_string(t[i]) + ", not below vocab_size " +
                             std::to_string(vocab_size) +
                             " (model.vocab_size must exceed every token id; `mpt data inspect` "
                             "shows the shard's range)");
          }
        }
      }
      ds.sources_.push_back({path, t, n});
      ds.total_ += n;
      ds.shards_.push_back(std::move(s));  // the map does not move, so `t` stays valid
    }
  }
  if (ds.total_ < min_tokens) {
    throw InputError(what + " (" + join(specs, ", ") + ") holds " + std::to_string(ds.total_) +
                     " tokens but at least " + std::to_string(min_tokens) + " are needed");
  }
  return ds;
}

std::string TokenDataset::describe() const {
  std::ostringstream o;
  const size_t nshards = shards_.size();
  const std::string builtin = std::string("builtin corpus (") + split_name(split_) + " split";
  if (nshards == 0 && builtin_count_ == 1) {
    o << builtin << ", " << total_ << " tokens)";
    return o.str();
  }
  if (builtin_count_ > 0) {
    o << builtin << ")";
    if (builtin_count_ > 1) o << " x" << builtin_count_;
    if (nshards > 0) o << " + ";
  }
  if (nshards == 1) {
    o << "1 shard (" << shards_[0].path() << ")";
  } else if (nshards > 1) {
    o << nshards << " shards";
  }
  o << ", " << total_ << " tokens";
  return o.str();
}

}  // namespace mpt::data
