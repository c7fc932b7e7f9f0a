// scripts/gtest-until-done, the runner scripts/device-check runs the GPU suites with: against
// fake_gpu_suite, whose tests fail, skip, leave a sticky error behind and crash, it must get
// every test a result of its own, in as many processes as that takes. And scripts/source-hash,
// which device-check trusts prebuilt binaries by.
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <string>

#include "cli_util.h"

using namespace mpt::test;

namespace {

class GtestUntilDone : public CliTest {};

TEST_F(GtestUntilDone, GivesEveryTestItsOwnResultPastCrashesAndStickyErrors) {
  const std::string out = path("fake");
  auto r = run(std::string("python3 ") + MPT_SOURCE_DIR + "/scripts/gtest-until-done " +
               MPT_FAKE_SUITE + " " + out + " 60");
  EXPECT_EQ(r.code, 1) << "tests failed: " << r.out;
  const json doc = json::parse(slurp(out + ".json"));
  std::map<std::string, std::string> result;  // Suite.Test -> COMPLETED / FAILED / SKIPPED
  for (const auto& s : doc["testsuites"])
    for (const auto& t : s["testsuite"])
      result[s["name"].get<std::string>() + "." + t["name"].get<std::string>()] =
          t.contains("failures") ? "FAILED" : t["result"].get<std::string>();
  const std::map<std::string, std::string> want = {
      {"Fake.Passes", "COMPLETED"},        {"Fake.HangsWhenAsked", "COMPLETED"},
      {"Fake.Skips", "SKIPPED"},
      {"Fake.FailsAlone", "FAILED"},       {"Fake.Poisons", "FAILED"},
      {"Fake.AfterThePoison", "COMPLETED"}, {"Fake.Crashes", "FAILED"},
      {"Fake.AfterTheCrash", "COMPLETED"}, {"Dtypes/FakeParam.Runs/0", "COMPLETED"},
      {"Dtypes/FakeParam.Runs/1", "COMPLETED"}};
  EXPECT_EQ(result, want);
  EXPECT_EQ(doc["tests"], 10);
  EXPECT_EQ(doc["failures"], 3);
  EXPECT_EQ(doc["not_run"], 0);
  EXPECT_TRUE(doc["cut_off_in"].is_null());
  // One process poisoned by Fake.Poisons, one that crashed in Fake.Crashes, and a third.
  EXPECT_EQ(doc["runs"], 3);
  EXPECT_EQ(doc["sticky"], json::array({"Fake.Poisons"}));
  EXPECT_EQ(doc["crashed"], json::array({"Fake.Crashes"}));
  // Each failure says what happened to its own test.
  for (const auto& s : doc["testsuites"])
    for (const auto& t : s["testsuite"]) {
      if (!t.contains("failures")) continue;
      const std::string msg = t["failures"][0]["failure"];
      const std::string want_in_msg = t["name"] == "Crashes"   ? "crashed"
                                      : t["name"] == "Poisons" ? "illegal memory access"
                                                               : "expected 1, got 2";
      EXPECT_NE(msg.find(want_in_msg), std::string::npos) << t["name"] << ": " << msg;
    }
  // The log holds every process's output, each under its own header.
  const std::string log = slurp(out + ".log");
  EXPECT_NE(log.find("==== run 1: 10 tests"), std::string::npos) << log;
  EXPECT_NE(log.find("==== run 3: "), std::string::npos) << log;
}

// A suite that passes: one process, exit status 0.
TEST_F(GtestUntilDone, APassingSuiteRunsOnce) {
  const std::string out = path("pass");
  auto r = run(std::string("python3 ") + MPT_SOURCE_DIR + "/scripts/gtest-until-done " +
               MPT_FAKE_SUITE + " " + out + " 60 --gtest_filter=Fake.Passes:Dtypes/*");
  EXPECT_EQ(r.code, 0) << r.out;
  const json doc = json::parse(slurp(out + ".json"));
  EXPECT_EQ(doc["tests"], 3);
  EXPECT_EQ(doc["failures"], 0);
  EXPECT_EQ(doc["runs"], 1);
}

// Out of time: the test that hangs is named, the others not yet run are counted, and the
// runner stops within its budget instead of starting another process.
TEST_F(GtestUntilDone, ATestThatHangsIsCutOffAtTheBudget) {
  const std::string out = path("hang");
  const auto t0 = std::chrono::steady_clock::now();
  auto r = run(std::string("FAKE_SUITE_HANG=1 python3 ") + MPT_SOURCE_DIR +
               "/scripts/gtest-until-done " + MPT_FAKE_SUITE + " " + out + " 3");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_LT(s, 20.0);
  const json doc = json::parse(slurp(out + ".json"));
  EXPECT_EQ(doc["cut_off_in"], "Fake.HangsWhenAsked");
  EXPECT_EQ(doc["not_run"], 9) << "all but Fake.Passes";
  EXPECT_EQ(doc["runs"], 1);
  EXPECT_EQ(doc["failures"], 0);
}

// device-check's outer timeout sends SIGTERM: the test process (in a session of its own) goes
// too, instead of holding the GPU while the next step runs.
TEST_F(GtestUntilDone, ASigtermEndsTheTestProcessToo) {
  auto r = run(std::string("(FAKE_SUITE_HANG=1 python3 ") + MPT_SOURCE_DIR +
               "/scripts/gtest-until-done " + MPT_FAKE_SUITE + " " + path("term") +
               " 60 & pid=$!; sleep 2; kill -TERM $pid; wait $pid; echo rc=$?; sleep 0.5;"
               " pgrep -f '^" + MPT_FAKE_SUITE + "' >/dev/null && echo left || echo gone)");
  EXPECT_NE(r.out.find("rc=143"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("gone"), std::string::npos) << r.out;
}

// A binary that cannot even list its tests (a missing library on the GPU machine, say): exit
// status 1 and the reason in the JSON, which the summary prints.
TEST_F(GtestUntilDone, ABinaryThatCannotListItsTestsIsReported) {
  const std::string out = path("broken");
  const std::string bin = write("broken.sh", "#!/bin/sh\necho 'libcublasLt.so.13: cannot open' >&2\nexit 127\n");
  fs::permissions(bin, fs::perms::owner_all);
  auto r = run(std::string("python3 ") + MPT_SOURCE_DIR + "/scripts/gtest-until-done " + bin +
               " " + out + " 60");
  EXPECT_EQ(r.code, 1) << r.out;
  const json doc = json::parse(slurp(out + ".json"));
  EXPECT_EQ(doc["tests"], 0);
  EXPECT_NE(doc["error"].get<std::string>().find("libcublasLt.so.13: cannot open"),
            std::string::npos) << doc.dump();
}

// A process that fails outside any test fails the run even when every test passed: a crash
// between two suites (the rest run again in a fresh process, which passes) or at exit.
TEST_F(GtestUntilDone, AFailureOutsideTheTestsFailsTheRun) {
  const std::string script = std::string("python3 ") + MPT_SOURCE_DIR + "/scripts/gtest-until-done ";
  auto r = run("FAKE_SUITE_CRASH_BETWEEN=" + path("once") + " " + script + MPT_FAKE_SUITE + " " +
               path("between") + " 60 --gtest_filter=Fake.Passes:Dtypes/*");
  EXPECT_EQ(r.code, 1) << r.out;
  json doc = json::parse(slurp(path("between.json")));
  EXPECT_EQ(doc["tests"], 3);
  EXPECT_EQ(doc["not_run"], 0) << "the FakeParam tests ran in a second process";
  EXPECT_EQ(doc["failures"], 0);
  EXPECT_EQ(doc["runs"], 2);
  ASSERT_EQ(doc["outside_tests"].size(), 1u) << doc.dump();
  EXPECT_NE(doc["outside_tests"][0].get<std::string>().find("after Fake.Passes"),
            std::string::npos) << doc.dump();

  r = run("FAKE_SUITE_ABORT_AT_EXIT=1 " + script + MPT_FAKE_SUITE + " " + path("exit") +
          " 60 --gtest_filter=Fake.Passes");
  EXPECT_EQ(r.code, 1) << r.out;
  doc = json::parse(slurp(path("exit.json")));
  EXPECT_EQ(doc["failures"], 0);
  EXPECT_EQ(doc["not_run"], 0);
  ASSERT_EQ(doc["outside_tests"].size(), 1u) << doc.dump();
}

// What a run skips is not waited for (DISABLED_ tests), and a filter that leaves no test, a
// time budget that is not a number, and an OUT in a directory not yet made are each handled.
TEST_F(GtestUntilDone, DisabledTestsNoTestsAndBadArguments) {
  const std::string script = std::string("python3 ") + MPT_SOURCE_DIR + "/scripts/gtest-until-done ";
  auto r = run(script + MPT_FAKE_SUITE + " " + path("new/dir/ok") + " 60 --gtest_filter=Fake.Passes:Fake.DISABLED_*");
  EXPECT_EQ(r.code, 0) << r.out;
  json doc = json::parse(slurp(path("new/dir/ok.json")));
  EXPECT_EQ(doc["tests"], 1) << doc.dump();
  r = run(script + MPT_FAKE_SUITE + " " + path("none") + " 60 --gtest_filter=Nope.*");
  EXPECT_EQ(r.code, 1) << r.out;
  doc = json::parse(slurp(path("none.json")));
  EXPECT_NE(doc["error"].get<std::string>().find("lists no tests"), std::string::npos) << doc.dump();
  r = run(script + MPT_FAKE_SUITE + " " + path("bad") + " soon");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("'soon' is not a number of seconds"), std::string::npos) << r.out;
}

}  // namespace

namespace {

// scripts/source-hash, which tells device-check whether prebuilt binaries come from the tree it
// was sent (scripts/device-prebuild): the same for a copy of the tree elsewhere and after an
// edit of a CPU-only test, different once a file the GPU binaries are built from changes.
class SourceHash : public CliTest {};

TEST_F(SourceHash, SameForACopyOfTheTreeAndChangedByAnEdit) {
  const std::string src = MPT_SOURCE_DIR;
  const auto here = run("bash " + src + "/scripts/source-hash");
  ASSERT_EQ(here.code, 0) << here.out;
  const std::string hash = here.out.substr(0, here.out.find('\n'));
  EXPECT_EQ(hash.size(), 64u) << here.out;
  EXPECT_EQ(hash.find_first_not_of("0123456789abcdef"), std::string::npos) << hash;
  EXPECT_EQ(run("bash " + src + "/scripts/source-hash").out, here.out) << "not deterministic";
  // A copy elsewhere (what the device tool sends: the files, no build folder).
  const std::string copy = path("copy");
  ASSERT_EQ(run("mkdir -p " + copy + "/scripts && cd " + src +
                " && cp -r app src tests bench cmake CMakeLists.txt " + copy +
                " && cp scripts/source-hash " + copy + "/scripts/").code, 0);
  EXPECT_EQ(run("bash " + copy + "/scripts/source-hash").out, here.out);
  // A CPU-only test edited: the GPU binaries are the same.
  ASSERT_EQ(run("echo '// edited' >> " + copy + "/tests/test_core.cpp").code, 0);
  EXPECT_EQ(run("bash " + copy + "/scripts/source-hash").out, here.out);
  // A file of the library, or of a GPU suite, edited: another hash.
  ASSERT_EQ(run("echo '// edited' >> " + copy + "/tests/test_cuda_train.cpp").code, 0);
  const auto suite_edited = run("bash " + copy + "/scripts/source-hash");
  EXPECT_NE(suite_edited.out, here.out);
  ASSERT_EQ(run("echo '// edited' >> " + copy + "/src/backend/op_cost.h").code, 0);
  const auto lib_edited = run("bash " + copy + "/scripts/source-hash");
  EXPECT_NE(lib_edited.out, here.out);
  EXPECT_NE(lib_edited.out, suite_edited.out);
}

}  // namespace
