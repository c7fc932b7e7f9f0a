// Not a test of mpt: a GoogleTest binary that misbehaves the way a GPU suite can, for
// test_device_check's check of scripts/gtest-until-done. Run in one process, its fourth test
// "poisons" the process as a sticky CUDA error does (every later test that touches the "device"
// fails with the error's message), and a later one crashes unless the process was poisoned
// first (so that only a second process reaches the crash). With FAKE_SUITE_HANG set, its second
// test hangs for a minute; with FAKE_SUITE_CRASH_BETWEEN=FILE, the process aborts between the
// Fake tests and the FakeParam ones unless FILE exists (it creates it first: only once); with
// FAKE_SUITE_ABORT_AT_EXIT set, it aborts after all its tests. Not registered with ctest.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <thread>

namespace {

bool poisoned = false;  // the process's "CUDA context" is unusable (a sticky error)

void use_device() {
  if (poisoned) FAIL() << "CUDA error: an illegal memory access was encountered (cudaMemcpy)";
}

TEST(Fake, Passes) { use_device(); }
TEST(Fake, HangsWhenAsked) {
  if (std::getenv("FAKE_SUITE_HANG")) std::this_thread::sleep_for(std::chrono::seconds(60));
}
TEST(Fake, Skips) { GTEST_SKIP() << "no GPU here"; }
TEST(Fake, FailsAlone) { FAIL() << "a plain failure: expected 1, got 2"; }
TEST(Fake, Poisons) {
  poisoned = true;
  FAIL() << "CUDA error: an illegal memory access was encountered (after layernorm_kernel)";
}
TEST(Fake, AfterThePoison) { use_device(); }
TEST(Fake, Crashes) {
  use_device();
  if (!poisoned) std::abort();
}
TEST(Fake, AfterTheCrash) { use_device(); }
TEST(Fake, DISABLED_NeverRuns) { FAIL() << "a disabled test ran"; }

class FakeParam : public ::testing::TestWithParam<int> {
 public:
  static void SetUpTestSuite() {
    const char* once = std::getenv("FAKE_SUITE_CRASH_BETWEEN");
    if (!once || std::ifstream(once)) return;
    std::ofstream(once) << "crashed once\n";
    std::abort();
  }
};
TEST_P(FakeParam, Runs) {
  use_device();
  EXPECT_GE(GetParam(), 0);
}
INSTANTIATE_TEST_SUITE_P(Dtypes, FakeParam, ::testing::Values(0, 1));

// After every test: a crash at exit (a destructor, a driver's teardown) is a failure too.
class AbortAtExit : public ::testing::Environment {
 public:
  void TearDown() override {
    if (std::getenv("FAKE_SUITE_ABORT_AT_EXIT")) std::abort();
  }
};
const auto* const kAbortAtExit = ::testing::AddGlobalTestEnvironment(new AbortAtExit);

}  // namespace
