// Durable writes and the safetensors reader/writer.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/files.h"
#include "io/metrics.h"
#include "io/run_dir.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace mpt;

namespace {

class Io : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("mpt_io_") + std::to_string(::getpid()) + "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A file assembled byte by byte from the format's description, independent of our writer.
std::string by_hand(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(uint64_t(header.size()) >> (8 * i));
  return out + header + data;
}

std::string floats(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(&s[0], v.begin(), s.size());
  return s;
}

}  // namespace

TEST_F(Io, AtomicWriteReplacesWholeFileAndLeavesNoTemporary) {
  write_file_atomic(path("a.txt"), "first");
  write_file_atomic(path("a.txt"), {ByteSpan{"sec", 3}, ByteSpan{"ond", 3}});
  EXPECT_EQ(slurp(path("a.txt")), "second");
  EXPECT_FALSE(fs::exists(path("a.txt.tmp")));
  EXPECT_THROW(write_file_atomic(path("no/such/dir/b.txt"), "x"), RuntimeError);
}

// Mapped reads: the file's bytes as read_file gives them; an empty file maps to none; a missing
// file or a directory is an InputError naming it; a file replaced by write_file_atomic (a
// rename) leaves an open mapping as it was.
TEST_F(Io, MappedFilesReadWhatReadFileReads) {
  Rng rng(test::fresh_seed());
  std::string content(100003, '\0');
  for (auto& c : content) c = static_cast<char>(rng.next_u64());
  write_file_atomic(path("m.bin"), content);
  MappedFile m = MappedFile::map(path("m.bin"));
  ASSERT_EQ(m.size(), content.size());
  EXPECT_EQ(std::string(m.data(), m.size()), content);
  const std::vector<char> read = read_file(path("m.bin"));
  EXPECT_EQ(std::string(read.begin(), read.end()), content);
  write_file_atomic(path("m.bin"), "replaced");
  EXPECT_EQ(std::string(m.data(), m.size()), content) << "the mapping keeps the old file";
  MappedFile moved = std::move(m);
  EXPECT_EQ(m.size(), 0u);
  EXPECT_EQ(moved.size(), content.size());
  moved = MappedFile::map(path("m.bin"));
  EXPECT_EQ(std::string(moved.data(), moved.size()), "replaced");
  write_file_atomic(path("empty"), "");
  EXPECT_EQ(MappedFile::map(path("empty")).size(), 0u);
  ASSERT_EQ(::mkfifo(path("fifo").c_str(), 0600), 0);  // refused, not waited on
  EXPECT_THROW(MappedFile::map(path("fifo")), InputError);
  for (const std::string& bad : {path("absent"), dir_.string()}) {
    try {
      MappedFile::map(bad);
      ADD_FAILURE() << bad << " mapped";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
  }
}

// A resumed run appends to metrics.jsonl; a record cut off by a crash or a full disk is dropped
// first, so that the new records start on a line of their own and every line parses.
TEST_F(Io, MetricsAppendDropsACutOffLastRecord) {
  const std::string p = path("metrics.jsonl");
  {
    MetricsSink s(p);
    s.write({{"event", "start"}});
    s.write({{"step", 1}, {"loss", 2.5}});
  }
  const std::string whole = slurp(p);
  for (const std::string& cut : {std::string("{\"step\": 2, \"lo"), std::string(70000, 'x')}) {
    std::ofstream(p, std::ios::binary) << whole << cut;
    {
      MetricsSink s(p, /*append=*/true);
      s.write({{"event", "start"}, {"resume_step", 1}});
    }
    const std::string after = slurp(p);
    EXPECT_EQ(after.substr(0, whole.size()), whole);
    EXPECT_EQ(after.substr(whole.size()), "{\"event\":\"start\",\"resume_step\":1}\n");
  }
  // A file that is one cut-off record, and one whose last record is whole, and none at all.
  std::ofstream(p, std::ios::binary) << "{\"eve";
  { MetricsSink s(p, true); s.write({{"a", 1}}); }
  EXPECT_EQ(slurp(p), "{\"a\":1}\n");
  { MetricsSink s(p, true); s.write({{"b", 2}}); }
  EXPECT_EQ(slurp(p), "{\"a\":1}\n{\"b\":2}\n");
  { MetricsSink s(path("new.jsonl"), true); s.write({{"c", 3}}); }
  EXPECT_EQ(slurp(path("new.jsonl")), "{\"c\":3}\n");
}

// A generated run name that is taken (two runs started within the same second) gets the next
// free "-N" suffix, at planning and again at creation; a name the user gave is never replaced.
TEST_F(Io, GeneratedRunNamesTakeTheNextFreeSuffix) {
  Config cfg;
  cfg.output.dir = path("runs");
  std::vector<std::string> dirs;
  for (int i = 0; i < 3; ++i) {  // within a second or two: the names collide at least once
    const RunDirPlan plan = plan_run_dir(cfg, "");
    ASSERT_TRUE(plan.auto_named);
    dirs.push_back(create_run_dir(plan, cfg));
  }
  for (size_t i = 0; i < dirs.size(); ++i) {
    EXPECT_TRUE(fs::exists(fs::path(dirs[i]) / "config.yaml")) << dirs[i];
    for (size_t j = 0; j < i; ++j) EXPECT_NE(dirs[i], dirs[j]);
  }

  // A config file whose name is near the file-name limit: the generated name stays within it,
  // cut at a character's start (a 2-byte 'é' straddles the cut).
  Config long_cfg = cfg;
  long_cfg.source_path = path(std::string(230, 'c') + "\xC3\xA9" + std::string(40, 'c') + ".yaml");
  const RunDirPlan long_plan = plan_run_dir(long_cfg, "");
  const std::string long_name = fs::path(long_plan.path).filename().string();
  EXPECT_LE(long_name.size(), 255u - 8u) << long_name;
  EXPECT_EQ(long_name.substr(0, 230), std::string(230, 'c'));
  EXPECT_EQ(long_name[230], '-') << "the cut falls before the 2-byte character";

  // Taken after planning: the base holds a run, base-2 is a file, base-3 a non-empty directory.
  RunDirPlan plan;
  plan.auto_named = true;
  plan.base = plan.path = path("runs/x-20261202-000000");
  fs::create_directories(plan.base);
  std::ofstream(plan.base + "/metrics.jsonl") << "{}\n";
  std::ofstream(plan.base + "-2") << "a file";
  fs::create_directories(plan.base + "-3");
  std::ofstream(plan.base + "-3/notes.txt") << "not a run";
  EXPECT_EQ(create_run_dir(plan, cfg), plan.base + "-4");
  EXPECT_EQ(slurp(plan.base + "/metrics.jsonl"), "{}\n");
  EXPECT_EQ(slurp(plan.base + "-3/notes.txt"), "not a run");

  // A name the user chose: refused at planning when it holds a run, and at creation when another
  // run claimed it since.
  cfg.output.name = "mine";
  const RunDirPlan mine = plan_run_dir(cfg, "");
  EXPECT_FALSE(mine.auto_named);
  EXPECT_EQ(create_run_dir(mine, cfg), path("runs/mine"));
  EXPECT_THROW(plan_run_dir(cfg, ""), InputError);
  EXPECT_THROW(create_run_dir(mine, cfg), InputError);
  EXPECT_THROW(plan_run_dir(cfg, plan.base + "-2"), InputError);  // --run-dir at a file
}

TEST_F(Io, SafetensorsRoundTripWithFreshRandomTensors) {
  Rng rng(test::fresh_seed());
  std::vector<float> a(3 * 37), b(5);
  std::vector<int32_t> c(2 * 3 * 4);
  for (auto& v : a) v = static_cast<float>(rng.normal());
  for (auto& v : b) v = static_cast<float>(rng.normal());
  for (auto& v : c) v = static_cast<int32_t>(rng.next_u64());
  safetensors::write(path("t.safetensors"),
                     {{"layer.weight", DType::f32, {3, 37}, a.data()},
                      {"layer.bias", DType::f32, {5}, b.data()},
                      {"ids", DType::i32, {2, 3, 4}, c.data()}},
                     {{"format", "pt"}, {"step", "12"}});
  const auto f = safetensors::File::open(path("t.safetensors"));
  EXPECT_EQ(f.metadata().at("step"), "12");
  ASSERT_EQ(f.entries().size(), 3u);
  EXPECT_EQ(f.entries()[0].name, "layer.weight");  // data order = write order
  const auto& w = f.entry("layer.weight");
  EXPECT_EQ(w.dtype, DType::f32);
  EXPECT_EQ(w.shape, (Shape{3, 37}));
  EXPECT_EQ(std::memcmp(f.data(w), a.data(), a.size() * 4), 0);
  EXPECT_EQ(std::memcmp(f.data(f.entry("layer.bias")), b.data(), b.size() * 4), 0);
  const auto& ids = f.entry("ids");
  EXPECT_EQ(ids.dtype, DType::i32);
  EXPECT_EQ(std::memcmp(f.data(ids), c.data(), c.size() * 4), 0);
  // the header is padded so the data starts 8-byte aligned
  const std::string raw = slurp(path("t.safetensors"));
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_THROW(f.entry("missing"), InputError);
}

// Tensors that fill themselves (a device's, fetched when the writer reaches them) give the same
// file and hash as the same bytes in memory; they are fetched once each, in file order, one at a
// time; a fill that throws leaves no file behind, not even the temporary.
TEST_F(Io, SafetensorsTensorsThatFillThemselvesWriteTheSameFile) {
  Rng rng(test::fresh_seed());
  std::vector<float> a(4 * 29), b(7), c(3 * 11);
  for (auto* v : {&a, &b, &c})
    for (auto& x : *v) x = static_cast<float>(rng.normal());
  const std::vector<safetensors::TensorRef> eager = {{"a", DType::f32, {4, 29}, a.data()},
                                                     {"b", DType::f32, {7}, b.data()},
                                                     {"c", DType::f32, {3, 11}, c.data()}};
  std::vector<std::string> fetched;
  auto lazy = [&](const std::string& name, const std::vector<float>& v, Shape shape) {
    return safetensors::TensorRef{name, DType::f32, shape, nullptr, [&fetched, &v, name](void* dst) {
                                    fetched.push_back(name);
                                    std::memcpy(dst, v.data(), v.size() * sizeof(float));
                                  }};
  };
  // b stays in memory between two that fill themselves: the writer's buffer is reused across it.
  const std::vector<safetensors::TensorRef> mixed = {lazy("a", a, {4, 29}), eager[1],
                                                     lazy("c", c, {3, 11})};
  const auto w1 = safetensors::write(path("eager.safetensors"), eager, {{"k", "v"}});
  const auto w2 = safetensors::write(path("mixed.safetensors"), mixed, {{"k", "v"}});
  EXPECT_EQ(fetched, (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ(slurp(path("eager.safetensors")), slurp(path("mixed.safetensors")));
  EXPECT_EQ(w1.bytes, w2.bytes);
  EXPECT_EQ(w1.bytes, fs::file_size(path("mixed.safetensors")));
  EXPECT_EQ(w1.xxh3, w2.xxh3);
  const auto f = safetensors::File::open(path("mixed.safetensors"));
  EXPECT_EQ(std::memcmp(f.data(f.entry("c")), c.data(), c.size() * 4), 0);

  std::vector<safetensors::TensorRef> failing = mixed;
  failing[2].fill = [](void*) { throw RuntimeError("the device is gone"); };
  EXPECT_THROW(safetensors::write(path("failed.safetensors"), failing), RuntimeError);
  EXPECT_FALSE(fs::exists(path("failed.safetensors")));
  EXPECT_FALSE(fs::exists(path("failed.safetensors.tmp")));
  failing[2].fill = nullptr;  // neither bytes nor a fill: a caller's bug
  EXPECT_THROW(safetensors::write(path("failed.safetensors"), failing), RuntimeError);
  EXPECT_FALSE(fs::exists(path("failed.safetensors.tmp")));
}

TEST_F(Io, SafetensorsReadsAFileWrittenByHand) {
  std::ofstream(path("h.safetensors"), std::ios::binary)
      << by_hand(R"({"x":{"dtype":"F32","shape":[2,1],"data_offsets":[4,12]},)"
                 R"("y":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})",
                 floats({7.0f, 1.5f, -2.0f}));
  const auto f = safetensors::File::open(path("h.safetensors"));
  float x[2], y;
  std::memcpy(x, f.data(f.entry("x")), 8);
  std::memcpy(&y, f.data(f.entry("y")), 4);
  EXPECT_EQ(y, 7.0f);
  EXPECT_EQ(x[0], 1.5f);
  EXPECT_EQ(x[1], -2.0f);
  EXPECT_EQ(f.entry("y").shape.ndim, 0);
}

TEST_F(Io, CorruptSafetensorsAreReportedNamingFileAndTensor) {
  const std::string ok_entry = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  struct Case {
    std::string name, bytes, expect;
  };
  const std::vector<Case> cases = {
      {"too short", "abc", "shorter"},
      {"header past end", by_hand("{}", "").substr(0, 8) + "{", "exceeds"},
      {"not json", by_hand("{nope", ""), "not JSON"},
      {"not an object", by_hand("[1,2]", ""), "not a JSON object"},
      {"missing field", by_hand(R"({"w":{"dtype":"F32","shape":[2]}})", floats({1, 2})), "'w'"},
      {"unknown dtype", by_hand(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",
                                floats({1, 2})), "F64"},
      {"negative dim", by_hand(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})",
                               floats({1, 2})), "'w'"},
      {"span mismatch", by_hand(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
                                floats({1, 2})), "'w'"},
      {"gap", by_hand(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      floats({1, 2})), "'w'"},
      {"truncated data", by_hand("{" + ok_entry + "}", floats({1})), "truncated"},
      {"trailing bytes", by_hand("{" + ok_entry + "}", floats({1, 2, 3})), "trailing"},
      {"bad metadata", by_hand(R"({"__metadata__":{"a":1}})", ""), "__metadata__"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string p = path("bad.safetensors");
    std::ofstream(p, std::ios::binary) << c.bytes;
    try {
      safetensors::File::open(p);
      ADD_FAILURE() << "no error";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(c.expect), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(safetensors::File::open(path("absent.safetensors")), InputError);
}

// MPT_FAULT (test-only fault injection): what it can use, and a clear refusal of the rest, such
// as a step below 1 (steps start at 1: 0 was taken as a step that never comes) or a number too
// large for 64 bits (silently clamped before).
TEST(FaultPlan, ParsesWhatItKnowsAndRefusesTheRest) {
  {
    mpt::test::ScopedEnv env("MPT_FAULT", "crash=in_latest,crash_step=8,enospc_after=0,"
                                          "preempt_at_step=3,nonfinite_at_step=2");
    const mpt::FaultPlan f = mpt::FaultPlan::from_env();
    EXPECT_EQ(f.crash_point, "in_latest");
    EXPECT_EQ(f.crash_step, 8);
    EXPECT_EQ(f.enospc_after, 0);
    EXPECT_EQ(f.preempt_at_step, 3);
    EXPECT_EQ(f.nonfinite_at_step, 2);
  }
  for (const char* bad : {"preempt_at_step=0", "crash_step=-1", "enospc_after=-5",
                          "nonfinite_at_step=99999999999999999999", "crash=nowhere",
                          "preempt_at_step=", "preempt_at_step=3x", "bogus=1"}) {
    mpt::test::ScopedEnv env("MPT_FAULT", bad);
    try {
      mpt::FaultPlan::from_env();
      ADD_FAILURE() << bad << " was accepted";
    } catch (const mpt::InputError& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
  }
}
