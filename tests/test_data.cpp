// Tests of the data module: shards, the built-in corpus, datasets, the batch loader, prepare.
#include <gtest/gtest.h>
#include <algorithm>
#include <csignal>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "data/corpus.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace fs = std::filesystem;
using namespace mpt::data;

namespace {

// A fresh temporary directory, removed with everything in it at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "mpt_data_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    const char* p = ::mkdtemp(buf.data());
    if (p == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// A shard as llm.c's Python writer makes it: int32 header, then uint16 tokens, little-endian.
std::string hand_made_shard(int32_t magic, int32_t version, int32_t count,
                            const std::vector<uint16_t>& tokens) {
  std::string out(1024, '\0');
  const int32_t h[3] = {magic, version, count};
  for (int i = 0; i < 3; ++i) {
    const uint32_t v = static_cast<uint32_t>(h[i]);
    for (int b = 0; b < 4; ++b) out[4 * i + b] = static_cast<char>((v >> (8 * b)) & 0xFF);
  }
  for (uint16_t t : tokens) {
    out.push_back(static_cast<char>(t & 0xFF));
    out.push_back(static_cast<char>(t >> 8));
  }
  return out;
}

std::vector<uint16_t> random_tokens(size_t n, uint64_t seed, uint64_t below = 65536) {
  mpt::Rng rng(seed);
  std::vector<uint16_t> t(n);
  for (auto& x : t) x = static_cast<uint16_t>(rng.below(below));
  return t;
}

// Runs f, expects an InputError whose message contains every string in `needles`.
void expect_input_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected InputError";
  } catch (const mpt::InputError& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) {
      EXPECT_NE(msg.find(n), std::string::npos) << "message lacks '" << n << "': " << msg;
    }
  }
}

uint64_t fnv1a(const uint16_t* t, size_t n) {
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < n; ++i) {
    h ^= t[i];
    h *= 1099511628211ULL;
  }
  return h;
}

}  // namespace

// ------------------------------------------------------------------------------------ shards

TEST(Shard, WriteReadRoundTrip) {
  TempDir dir;
  const uint64_t seed = std::random_device{}();  // fresh tokens every run; the seed is reported
  SCOPED_TRACE("seed " + std::to_string(seed));
  const auto tokens = random_tokens(12345, seed);
  const std::string path = dir.file("a.bin");
  write_shard(path, tokens);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_EQ(fs::file_size(path), 1024u + 2u * tokens.size());
  Shard s = Shard::open(path);
  ASSERT_EQ(s.size(), static_cast<int64_t>(tokens.size()));
  EXPECT_EQ(s.path(), path);
  EXPECT_EQ(std::memcmp(s.tokens(), tokens.data(), tokens.size() * 2), 0);

  Shard moved = std::move(s);
  EXPECT_EQ(moved.size(), static_cast<int64_t>(tokens.size()));
  EXPECT_EQ(moved.tokens()[7], tokens[7]);
}

TEST(Shard, EmptyShardRoundTrip) {
  TempDir dir;
  write_shard(dir.file("e.bin"), {});
  Shard s = Shard::open(dir.file("e.bin"));
  EXPECT_EQ(s.size(), 0);
  const ShardInfo info = inspect_shard(dir.file("e.bin"));
  EXPECT_EQ(info.num_tokens, 0);
  EXPECT_NE(format_shard_info(info).find("no tokens"), std::string::npos);
}

TEST(Shard, HandMadeHeaderLikeLlmC) {
  TempDir dir;
  const std::vector<uint16_t> tokens = {50256, 15496, 11, 995, 0, 65535};
  const std::string path = dir.file("llmc.bin");
  write_bytes(path, hand_made_shard(20240520, 1, 6, tokens));
  Shard s = Shard::open(path);
  ASSERT_EQ(s.size(), 6);
  for (size_t i = 0; i < tokens.size(); ++i) EXPECT_EQ(s.tokens()[i], tokens[i]);
  // What we write is byte-identical to the hand-made file.
  write_shard(dir.file("ours.bin"), tokens);
  EXPECT_EQ(read_bytes(dir.file("ours.bin")), read_bytes(path));

  const ShardInfo info = inspect_shard(path);
  EXPECT_EQ(info.magic, kShardMagic);
  EXPECT_EQ(info.version, kShardVersion);
  EXPECT_EQ(info.num_tokens, 6);
  EXPECT_EQ(info.file_bytes, 1024 + 12);
  EXPECT_EQ(info.min_token, 0);
  EXPECT_EQ(info.max_token, 65535);
  const std::string text = format_shard_info(info);
  for (const char* s : {"llmc.bin", "20240520", "1036", "[0, 65535]"}) {
    EXPECT_NE(text.find(s), std::string::npos) << text;
  }
}

TEST(Shard, WriteFailureIsRuntimeError) {
  TempDir dir;
  EXPECT_THROW(write_shard(dir.file("no/such/dir/x.bin"), {1, 2, 3}), mpt::RuntimeError);
}

TEST(Shard, BadShardsAreInputErrorsNamingTheFile) {
  TempDir dir;
  struct Case {
    std::string name;
    std::string bytes;
    std::vector<std::string> needles;
  };
  const std::vector<uint16_t> four = {1, 2, 3, 4};
  std::string too_long = hand_made_shard(kShardMagic, 1, 4, four) + "xx";
  const std::vector<Case> cases = {
      {"empty.bin", "", {"empty"}},
      {"trunc.bin", hand_made_shard(kShardMagic, 1, 0, {}).substr(0, 100), {"100 bytes", "1024"}},
      {"magic.bin", hand_made_shard(12345, 1, 4, four), {"bad magic 12345", "20240520"}},
      {"version.bin", hand_made_shard(kShardMagic, 2, 4, four), {"version 2", "expected 1"}},
      {"short.bin", hand_made_shard(kShardMagic, 1, 1000, four),
       {"1000 tokens (2000 bytes)", "8 bytes after the header"}},
      {"long.bin", too_long, {"4 tokens (8 bytes)", "10 bytes after the header"}},
      {"negative.bin", hand_made_shard(kShardMagic, 1, -3, {}), {"-3 tokens"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = dir.file(c.name);
    write_bytes(path, c.bytes);
    std::vector<std::string> needles = c.needles;
    needles.push_back(path);
    expect_input_error([&] { Shard::open(path); }, needles);
    expect_input_error([&] { inspect_shard(path); }, needles);
    expect_input_error([&] { TokenDataset::open({path}, Split::train, 65536, 0); }, needles);
  }
  expect_input_error([&] { Shard::open(dir.file("missing.bin")); }, {dir.file("missing.bin")});
  expect_input_error([&] { Shard::open(dir.path()); }, {dir.path(), "regular file"});
  // A FIFO is refused before it is opened (opening one waits for a writer, deaf to signals).
  const std::string fifo = dir.file("fifo.bin");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_input_error([&] { Shard::open(fifo); }, {fifo, "regular file"});
}

// --------------------------------------------------------------------------------- tokenizer

TEST(Tokenizer, BytesRoundTrip) {
  std::string s = "Hello, w\xC3\xB6rld!\n";
  s.push_back('\0');
  s.push_back('\xFF');
  const auto t = encode(s);
  ASSERT_EQ(t.size(), s.size());
  EXPECT_EQ(t[0], 'H');
  EXPECT_EQ(t.back(), 255);
  EXPECT_EQ(decode(t.data(), t.size()), s);
  const std::vector<uint16_t> big = {'a', 300, 'b'};
  EXPECT_EQ(decode(big), "a\xEF\xBF\xBD" "b");
}

// ------------------------------------------------------------------------------------ corpus

TEST(Corpus, DeterministicAndSized) {
  const auto& train = builtin_corpus_tokens(Split::train);
  const auto& val = builtin_corpus_tokens(Split::val);
  EXPECT_GE(train.size(), 1'900'000u);
  EXPECT_LE(train.size(), 2'200'000u);
  EXPECT_GE(val.size(), 190'000u);
  EXPECT_LE(val.size(), 220'000u);
  EXPECT_EQ(&train, &builtin_corpus_tokens(Split::train));  // cached

  // Same text twice: the cached tokens, the text accessor and the hash agree.
  const size_t n = 100'000;
  const std::string text = builtin_corpus_text(Split::train, n);
  ASSERT_EQ(text.size(), n);
  const auto re = encode(text);
  EXPECT_EQ(fnv1a(re.data(), n), fnv1a(train.data(), n));
  EXPECT_EQ(builtin_corpus_text(Split::train), decode(train));
  // Generating again from scratch gives the same text.
  const std::string again = generate_builtin_corpus(Split::train);
  const auto again_tokens = encode(again);
  EXPECT_EQ(fnv1a(again_tokens.data(), n), fnv1a(train.data(), n));
  EXPECT_TRUE(again_tokens == train);
  EXPECT_EQ(generate_builtin_corpus(Split::val), builtin_corpus_text(Split::val));
  EXPECT_EQ(builtin_corpus_text(Split::val).size(), val.size());

  // The splits differ.
  EXPECT_NE(fnv1a(train.data(), 10'000), fnv1a(val.data(), 10'000));
  EXPECT_NE(builtin_corpus_text(Split::train, 200), builtin_corpus_text(Split::val, 200));
}

TEST(Corpus, PrintableAscii) {
  for (Split s : {Split::train, Split::val}) {
    const auto& t = builtin_corpus_tokens(s);
    size_t bad = 0;
    for (uint16_t c : t) bad += !((c >= 32 && c <= 126) || c == '\n');
    EXPECT_EQ(bad, 0u) << split_name(s);
    EXPECT_EQ(t.back(), '\n');
  }
  std::printf("corpus sample:\n%s\n", builtin_corpus_text(Split::train, 600).c_str());
}

TEST(Corpus, HasStructure) {
  const auto& t = builtin_corpus_tokens(Split::train);
  std::vector<double> c1(256, 0.0), c2(256 * 256, 0.0);
  for (size_t i = 0; i < t.size(); ++i) {
    c1[t[i]] += 1;
    if (i > 0) c2[t[i - 1] * 256 + t[i]] += 1;
  }
  const double n = static_cast<double>(t.size());
  double h1 = 0;
  for (double c : c1) {
    if (c > 0) h1 -= c / n * std::log(c / n);
  }
  double h2 = 0;
  const double m = n - 1;
  for (int a = 0; a < 256; ++a) {
    double row = 0;
    for (int b = 0; b < 256; ++b) row += c2[a * 256 + b];
    for (int b = 0; b < 256; ++b) {
      const double c = c2[a * 256 + b];
      if (c > 0) h2 -= c / m * std::log(c / row);
    }
  }
  std::printf("builtin train corpus: %zu bytes, H1 = %.4f nats, H2 = %.4f nats\n", t.size(), h1,
              h2);
  EXPECT_GT(h1, 2.5);  // varied text, not a handful of repeated letters
  EXPECT_LT(h2, h1 - 0.5);
}

// ----------------------------------------------------------------------------------- dataset

TEST(Dataset, Builtin) {
  const TokenDataset ds = TokenDataset::open({"builtin"}, Split::val, 256, 65);
  ASSERT_EQ(ds.sources().size(), 1u);
  EXPECT_EQ(ds.total_tokens(), static_cast<int64_t>(builtin_corpus_tokens(Split::val).size()));
  EXPECT_EQ(ds.sources()[0].tokens, builtin_corpus_tokens(Split::val).data());
  EXPECT_EQ(ds.describe(), "builtin corpus (val split, " + std::to_string(ds.total_tokens()) +
                               " tokens)");
  expect_input_error([] { TokenDataset::open({"builtin"}, Split::train, 100, 1); },
                     {"builtin", "100", "256"});
}

TEST(Dataset, GlobsSortedAndValidated) {
  TempDir dir;
  write_shard(dir.file("s_002.bin"), std::vector<uint16_t>(30, 2));
  write_shard(dir.file("s_000.bin"), std::vector<uint16_t>(10, 0));
  write_shard(dir.file("s_001.bin"), std::vector<uint16_t>(20, 1));
  TokenDataset ds = TokenDataset::open({dir.file("s_*.bin")}, Split::train, 256, 60);
  ASSERT_EQ(ds.sources().size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(ds.sources()[i].size, 10 * (i + 1));
    EXPECT_EQ(ds.sources()[i].tokens[0], i);
  }
  EXPECT_EQ(ds.total_tokens(), 60);
  EXPECT_EQ(ds.describe(), "3 shards, 60 tokens");

  TokenDataset moved = std::move(ds);
  EXPECT_EQ(moved.sources()[2].tokens[29], 2);

  const TokenDataset mixed =
      TokenDataset::open({"builtin", dir.file("s_000.bin")}, Split::train, 256, 0);
  EXPECT_NE(mixed.describe().find("builtin corpus (train split) + 1 shard"), std::string::npos)
      << mixed.describe();
}

TEST(Dataset, Errors) {
  TempDir dir;
  std::vector<uint16_t> t(100, 7);
  t[42] = 300;
  write_shard(dir.file("big.bin"), t);
  expect_input_error([&] { TokenDataset::open({dir.file("big.bin")}, Split::train, 256, 0); },
                     {dir.file("big.bin"), "index 42", "value 300", "vocab_size 256"});
  EXPECT_NO_THROW(TokenDataset::open({dir.file("big.bin")}, Split::train, 301, 0));

  write_shard(dir.file("small.bin"), std::vector<uint16_t>(10, 1));
  expect_input_error(
      [&] { TokenDataset::open({dir.file("small*.bin")}, Split::val, 256, 65); },
      {"small*.bin", "10", "65", "val"});
  expect_input_error([&] { TokenDataset::open({dir.file("nothing_*.bin")}, Split::train, 256, 0); },
                     {dir.file("nothing_*.bin"), "matches no existing file"});
  expect_input_error([&] { TokenDataset::open({dir.file("absent.bin")}, Split::train, 256, 0); },
                     {dir.file("absent.bin")});
  expect_input_error([&] { TokenDataset::open({}, Split::train, 256, 0); }, {"train"});
}

// ------------------------------------------------------------------------------------ loader

namespace {

// Sources whose tokens are distinct, so a window's first token identifies it:
// source k holds tokens 1000*k + i.
struct LoaderFixture {
  TempDir dir;
  std::vector<int64_t> sizes;
  TokenDataset ds;

  explicit LoaderFixture(std::vector<int64_t> s) : sizes(std::move(s)), ds(make()) {}

  TokenDataset make() {
    std::vector<std::string> specs;
    for (size_t k = 0; k < sizes.size(); ++k) {
      std::vector<uint16_t> t(static_cast<size_t>(sizes[k]));
      for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<uint16_t>(1000 * k + i);
      char name[32];
      std::snprintf(name, sizeof(name), "src_%03zu.bin", k);
      write_shard(dir.file(name), t);
      specs.push_back(dir.file(name));
    }
    return TokenDataset::open(specs, Split::train, 65536, 0);
  }
};

struct Batch {
  std::vector<int32_t> x, y;
  bool operator==(const Batch& o) const { return x == o.x && y == o.y; }
};

Batch draw(BatchLoader& l) {
  Batch b;
  b.x.resize(static_cast<size_t>(l.batch_size() * l.seq_len()));
  b.y.resize(b.x.size());
  l.next(b.x.data(), b.y.data());
  return b;
}

// Checks that every row is a window of T+1 consecutive tokens of one source starting at a
// multiple of T, and returns the rows' first tokens.
std::vector<int32_t> check_rows(const Batch& b, int B, int T, int64_t stride_source = 1000) {
  std::vector<int32_t> firsts;
  for (int r = 0; r < B; ++r) {
    const int32_t first = b.x[static_cast<size_t>(r * T)];
    EXPECT_EQ((first % stride_source) % T, 0) << "window not aligned to T";
    for (int t = 0; t < T; ++t) {
      EXPECT_EQ(b.x[static_cast<size_t>(r * T + t)], first + t);
      EXPECT_EQ(b.y[static_cast<size_t>(r * T + t)], first + t + 1);
    }
    firsts.push_back(first);
  }
  return firsts;
}

}  // namespace

TEST(Loader, SampleCountsAndShiftedTargets) {
  // (n-1)/T samples: 33 -> 4, 40 -> 4 (39/8), 9 -> 1, 8 -> 0, 0 tokens -> 0
  LoaderFixture f({33, 40, 9, 8, 0});
  BatchLoader l(f.ds, 3, 8, 1, true);
  EXPECT_EQ(l.samples_per_epoch(), 9);
  for (int i = 0; i < 10; ++i) {
    const Batch b = draw(l);
    for (int32_t first : check_rows(b, 3, 8)) {
      const int64_t k = first / 1000, i0 = first % 1000;
      EXPECT_LE(i0 + 8, f.sizes[static_cast<size_t>(k)] - 1) << "window beyond its source";
    }
  }
}

TEST(Loader, ShuffledEpochVisitsEverySampleOnce) {
  LoaderFixture f({101, 57, 250, 3, 64});
  const int B = 4, T = 7;
  BatchLoader l(f.ds, B, T, 1234, true);
  const int64_t spe = l.samples_per_epoch();
  EXPECT_EQ(spe, 100 / 7 + 56 / 7 + 249 / 7 + 0 + 63 / 7);
  // Draw three epochs' worth (plus some) one row at a time through B-row batches.
  std::vector<std::map<int32_t, int>> seen(4);
  std::vector<std::vector<int32_t>> order(4);
  int64_t drawn = 0;
  while (drawn < 3 * spe + 5) {
    const LoaderCursor before = l.cursor();
    const Batch b = draw(l);
    const auto firsts = check_rows(b, B, T);
    // Attribute rows to epochs using the cursor (a batch may straddle the boundary).
    uint64_t epoch = before.epoch;
    int64_t s = static_cast<int64_t>(before.sample);
    for (int32_t first : firsts) {
      seen[epoch][first]++;
      order[epoch].push_back(first);
      if (++s == spe) {
        s = 0;
        ++epoch;
      }
    }
    drawn += B;
  }
  for (int e = 0; e < 3; ++e) {
    EXPECT_EQ(static_cast<int64_t>(seen[e].size()), spe) << "epoch " << e;
    for (const auto& kv : seen[e]) EXPECT_EQ(kv.second, 1) << "epoch " << e << " window " << kv.first;
  }
  EXPECT_NE(order[0], order[1]);  // a new order each epoch
  // Hierarchical: within an epoch, each source's samples are contiguous.
  std::set<int32_t> finished;
  int32_t current = -1;
  for (int32_t first : order[0]) {
    const int32_t src = first / 1000;
    if (src != current) {
      EXPECT_EQ(finished.count(src), 0u);
      if (current >= 0) finished.insert(current);
      current = src;
    }
  }
}

TEST(Loader, SeedsDetermineOrder) {
  LoaderFixture f({500, 300, 200});
  BatchLoader a(f.ds, 4, 8, 7, true), b(f.ds, 4, 8, 7, true), c(f.ds, 4, 8, 8, true);
  bool differs = false;
  for (int i = 0; i < 40; ++i) {
    const Batch ba = draw(a), bb = draw(b), bc = draw(c);
    EXPECT_EQ(ba, bb);
    differs = differs || !(ba == bc);
  }
  EXPECT_TRUE(differs);
}

TEST(Loader, SeekResumesExactly) {
  LoaderFixture f({130, 77, 260});
  const int B = 5, T = 6;
  BatchLoader ref(f.ds, B, T, 99, true);
  const int64_t spe = ref.samples_per_epoch();
  std::vector<Batch> batches;
  std::vector<LoaderCursor> cursors;
  for (int i = 0; i < 40; ++i) {  // 200 samples: several epochs, batches straddle boundaries
    cursors.push_back(ref.cursor());
    batches.push_back(draw(ref));
  }
  ASSERT_GT(40 * B, 2 * spe);
  for (int k : {0, 1, 7, 13, 22, 39}) {
    BatchLoader l(f.ds, B, T, 99, true);
    for (int i = 0; i < 3; ++i) draw(l);  // some other state first
    l.seek(cursors[k]);
    EXPECT_EQ(l.cursor().epoch, cursors[k].epoch);
    EXPECT_EQ(l.cursor().sample, cursors[k].sample);
    for (int i = k; i < std::min(k + 3, 40); ++i) EXPECT_EQ(draw(l), batches[i]) << "k=" << k;
  }
  EXPECT_LT(ref.cursor().sample, static_cast<uint64_t>(spe));
  BatchLoader l(f.ds, B, T, 99, true);
  expect_input_error([&] { l.seek(LoaderCursor{0, static_cast<uint64_t>(spe)}); },
                     {std::to_string(spe)});
  l.reset();
  EXPECT_EQ(draw(l), batches[0]);
}

TEST(Loader, SequentialOrderAndReset) {
  LoaderFixture f({25, 17, 41});
  const int B = 3, T = 4;
  BatchLoader l(f.ds, B, T, 5, false);
  EXPECT_EQ(l.samples_per_epoch(), 6 + 4 + 10);
  // File order: all windows of source 0, then 1, then 2, then again from the start.
  std::vector<int32_t> expected;
  for (int rep = 0; rep < 3; ++rep) {
    for (int k = 0; k < 3; ++k) {
      const int64_t n = (f.sizes[k] - 1) / T;
      for (int64_t j = 0; j < n; ++j) expected.push_back(static_cast<int32_t>(1000 * k + j * T));
    }
  }
  std::vector<int32_t> got;
  const Batch first = draw(l);
  for (int32_t x : check_rows(first, B, T)) got.push_back(x);
  while (got.size() < 50) {
    for (int32_t x : check_rows(draw(l), B, T)) got.push_back(x);
  }
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], expected[i]) << i;
  l.reset();
  EXPECT_EQ(draw(l), first);
  EXPECT_EQ(l.cursor().epoch, 0u);
  EXPECT_EQ(l.cursor().sample, static_cast<uint64_t>(B));
}

TEST(Loader, BuiltinAndErrors) {
  const TokenDataset ds = TokenDataset::open({"builtin"}, Split::train, 256, 65);
  BatchLoader l(ds, 8, 64, 42, true);
  EXPECT_EQ(l.samples_per_epoch(), (ds.total_tokens() - 1) / 64);
  std::vector<int32_t> x(8 * 64), y(8 * 64);
  l.next(x.data(), y.data());
  for (int r = 0; r < 8; ++r) {
    for (int t = 0; t + 1 < 64; ++t) EXPECT_EQ(y[r * 64 + t], x[r * 64 + t + 1]);
  }
  LoaderFixture f({10, 12});
  // No window of T+1 = 17 tokens in either source (22 in all): the split's key, its data and
  // the longest source are named.
  expect_input_error([&] { BatchLoader(f.ds, 1, 16, 0, true); },
                     {"data.train", "2 shards, 22 tokens", "17", f.dir.file("src_001.bin"),
                      "holds 12"});
  expect_input_error([&] { BatchLoader(f.ds, 0, 4, 0, true); }, {"B=0"});
}

// ----------------------------------------------------------------------------------- prepare

TEST(Prepare, SplitsShardsAndRoundTrips) {
  TempDir dir;
  const std::string a = dir.file("a.txt"), b = dir.file("b.txt"), c = dir.file("c.txt");
  const std::string ta = builtin_corpus_text(Split::val, 5000);  // ends without '\n' mostly
  const std::string tb = "second file\n";
  write_bytes(a, ta);
  write_bytes(b, tb);
  write_bytes(c, "");
  const std::string expected = ta + (ta.back() == '\n' ? "" : "\n") + tb;

  PrepareOptions opt;
  opt.val_fraction = 0.25;
  opt.shard_tokens = 1000;
  const std::string out = dir.file("out/nested");
  const PrepareResult r = prepare_shards({a, c, b}, out, opt);
  EXPECT_EQ(r.train_tokens + r.val_tokens, static_cast<int64_t>(expected.size()));
  EXPECT_EQ(r.val_tokens, static_cast<int64_t>(std::floor(expected.size() * 0.25)));
  EXPECT_EQ(r.train_shards.size(), static_cast<size_t>((r.train_tokens + 999) / 1000));
  EXPECT_EQ(r.val_shards.size(), static_cast<size_t>((r.val_tokens + 999) / 1000));
  EXPECT_EQ(r.train_shards[0], out + "/train_000000.bin");
  EXPECT_EQ(r.val_shards[0], out + "/val_000000.bin");

  std::string decoded;
  int64_t train_sum = 0, val_sum = 0;
  for (const auto* list : {&r.train_shards, &r.val_shards}) {
    for (const std::string& p : *list) {
      Shard s = Shard::open(p);
      EXPECT_LE(s.size(), 1000);
      EXPECT_GE(s.size(), 2);
      (list == &r.train_shards ? train_sum : val_sum) += s.size();
      decoded += decode(s.tokens(), static_cast<size_t>(s.size()));
    }
  }
  EXPECT_EQ(train_sum, r.train_tokens);
  EXPECT_EQ(val_sum, r.val_tokens);
  EXPECT_EQ(decoded, expected);

  // The shards load as a dataset through a glob.
  const TokenDataset ds = TokenDataset::open({out + "/train_*.bin"}, Split::train, 256, 0);
  EXPECT_EQ(ds.total_tokens(), r.train_tokens);

  // A smaller rerun into the same directory leaves no stale shards behind.
  opt.shard_tokens = 100000;
  opt.val_fraction = 0.0;
  const PrepareResult r2 = prepare_shards({b}, out, opt);
  EXPECT_EQ(r2.train_shards.size(), 1u);
  EXPECT_TRUE(r2.val_shards.empty());
  EXPECT_EQ(r2.val_tokens, 0);
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(out))
    files += e.path().filename().string()[0] != '.';  // the lock stays, hidden
  EXPECT_EQ(files, 1u);
  EXPECT_TRUE(fs::is_regular_file(out + "/.mpt-prepare.lock"));
}

// A prepare that fails part-way (here: a file-size limit, as a full disk would) leaves the set
// already in the directory whole and no staging files; a killed one's staging directory goes
// at the next prepare.
TEST(Prepare, AFailedPrepareLeavesTheEarlierSetWhole) {
  TempDir dir;
  const std::string small = dir.file("small.txt"), big = dir.file("big.txt");
  write_bytes(small, builtin_corpus_text(Split::val, 3000));
  write_bytes(big, builtin_corpus_text(Split::train, 60000));
  const std::string out = dir.file("out");
  PrepareOptions opt;
  opt.val_fraction = 0.1;
  opt.shard_tokens = 1000;
  const PrepareResult first = prepare_shards({small}, out, opt);
  auto listing = [&] {
    std::vector<std::pair<std::string, std::string>> files;
    for (const auto& e : fs::directory_iterator(out)) {
      if (!e.is_regular_file()) continue;  // a killed prepare's staging directory
      std::ifstream in(e.path(), std::ios::binary);
      files.emplace_back(e.path().filename().string(),
                         std::string(std::istreambuf_iterator<char>(in), {}));
    }
    std::sort(files.begin(), files.end());
    return files;
  };
  const auto before = listing();
  ASSERT_EQ(before.size(), first.train_shards.size() + first.val_shards.size() + 1)
      << "the set and the lock";
  {
    // No file may grow past 30 KB: the big input's shards (~37 KB at 18000 tokens) cannot be
    // written. SIGXFSZ ignored, so the write fails with EFBIG instead of ending the process.
    struct rlimit old {};
    ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
    struct rlimit lim = old;
    lim.rlim_cur = 30000;
    void (*prev)(int) = std::signal(SIGXFSZ, SIG_IGN);
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
    opt.shard_tokens = 20000;
    EXPECT_THROW(prepare_shards({big}, out, opt), mpt::RuntimeError);
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, prev);
  }
  EXPECT_EQ(listing(), before) << "the earlier set, byte for byte, and nothing else";
  fs::create_directories(out + "/.mpt-prepare.Ab12Cd/x");  // a killed prepare's
  {
    // While another prepare holds the directory's lock, a second one is refused.
    const int fd = ::open((out + "/.mpt-prepare.lock").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::flock(fd, LOCK_EX), 0);
    expect_input_error([&] { prepare_shards({big}, out, opt); }, {out, "another mpt data prepare"});
    ::close(fd);
  }
  EXPECT_EQ(listing(), before);
  const PrepareResult again = prepare_shards({big}, out, opt);
  EXPECT_EQ(listing().size(), again.train_shards.size() + again.val_shards.size() + 1)
      << "the new set and the lock";
  EXPECT_FALSE(fs::exists(out + "/.mpt-prepare.Ab12Cd"));
}

TEST(Prepare, Errors) {
  TempDir dir;
  const std::string a = dir.file("a.txt");
  write_bytes(a, "some text for the test\n");
  PrepareOptions opt;
  expect_input_error([&] { prepare_shards({a, dir.file("missing.txt")}, dir.file("o"), opt); },
                     {dir.file("missing.txt")});
  for (double bad : {-0.1, 1.0, 1.5, std::nan("")}) {
    opt.val_fraction = bad;
    expect_input_error([&] { prepare_shards({a}, dir.file("o"), opt); }, {"val_fraction"});
  }
  opt = PrepareOptions{};
  opt.shard_tokens = 1;
  expect_input_error([&] { prepare_shards({a}, dir.file("o"), opt); }, {"shard_tokens"});
  opt = PrepareOptions{};
  write_bytes(dir.file("empty.txt"), "");
  expect_input_error([&] { prepare_shards({dir.file("empty.txt")}, dir.file("o"), opt); },
                     {"no text"});
  // 23 tokens with val_fraction 0.05 -> 1 val token: too small.
  opt.val_fraction = 0.05;
  expect_input_error([&] { prepare_shards({a}, dir.file("o"), opt); }, {"val", "1 token"});
  write_bytes(dir.file("one.txt"), "x");  // "x\n": 2 tokens, 0.5 -> 1 + 1
  opt.val_fraction = 0.5;
  expect_input_error([&] { prepare_shards({dir.file("one.txt")}, dir.file("o"), opt); },
                     {"1 token"});
  expect_input_error([&] { prepare_shards({}, dir.file("o"), opt); }, {"no input"});
  // A val fraction that gives no val token at all is refused like one that gives one token.
  opt.val_fraction = 0.01;
  expect_input_error([&] { prepare_shards({a}, dir.file("o"), opt); },
                     {"val split would hold 0 token", "raise val_fraction"});
  opt = PrepareOptions{};
  expect_input_error([&] { prepare_shards({dir.file("empty.txt")}, dir.file("o"), opt); },
                     {"no text", dir.file("empty.txt")});
  expect_input_error([&] { prepare_shards({a}, "", opt); }, {"output directory is empty"});
  // The same file twice, by another name: its text would be in both splits.
  expect_input_error([&] { prepare_shards({a, dir.path() + "/./a.txt"}, dir.file("o"), opt); },
                     {"given twice", a});
  // An input that is one of the shards this prepare replaces.
  opt.val_fraction = 0;
  prepare_shards({a}, dir.file("o"), opt);
  const std::string shard = dir.file("o") + "/train_000000.bin";
  const std::string before = read_bytes(shard);
  expect_input_error([&] { prepare_shards({shard}, dir.file("o"), opt); },
                     {shard, "replaces"});
  EXPECT_EQ(read_bytes(shard), before);
  EXPECT_FALSE(fs::exists(dir.file("o") + "/val_000000.bin"));
}
