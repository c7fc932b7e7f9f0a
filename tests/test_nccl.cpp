// The NCCL communicator's parts.
//  - Host-only, run everywhere: the watchdog's decisions (WatchdogCore with a fake clock and fake
//    probes), its polling thread (real clock, short timeouts, fake probes), MPT_NCCL_TIMEOUT_S,
//    and the float order keys behind the NaN-propagating device max.
//  - GPU (skip without a GPU, or without NCCL in the build): a single-rank NcclCommunicator's
//    device all-reduces on fresh random data of an awkward length, the NaN-propagating max, and a
//    watchdog that stays quiet through normal collectives.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "cuda_test_util.h"
#include "dist/float_order.h"
#include "dist/watchdog.h"
#include "test_util.h"
#if MPT_HAVE_NCCL
#include "dist/nccl_communicator.h"
#endif

using namespace std::chrono_literals;

namespace mpt::dist {
namespace {

// ---- WatchdogCore: fake clock, fake probes

struct FakeClock {
  WatchdogClock::time_point t{};
  WatchdogCore::Now fn() {
    return [this] { return t; };
  }
};

// A probe whose answer the test sets, counting how often it is asked.
struct FakeProbe {
  Progress answer = Progress::pending();
  int calls = 0;
  Probe fn() {
    return [this] {
      ++calls;
      return answer;
    };
  }
};

// A core on a fake clock; the communicator reports no error unless a test says otherwise.
struct WatchdogCoreTest : ::testing::Test {
  FakeClock clock;
  FakeProbe comm, op;
  WatchdogCoreTest() { comm.answer = Progress::done(); }
  WatchdogCore core(std::chrono::nanoseconds timeout) {
    return WatchdogCore(timeout, clock.fn(), comm.fn());
  }
};

bool names(const WatchdogVerdict& v, const std::string& text) {
  return v.reason.find(text) != std::string::npos;
}

TEST_F(WatchdogCoreTest, DisarmedPollsNothing) {
  WatchdogCore w = core(10s);
  EXPECT_FALSE(w.armed());
  clock.t += 1h;
  EXPECT_EQ(w.poll().action, WatchdogVerdict::kNone);
  EXPECT_EQ(comm.calls, 0) << "nothing outstanding: the communicator is not polled";
}

TEST_F(WatchdogCoreTest, TimesOutAtTheDeadlineNotBefore) {
  WatchdogCore w = core(10s);
  w.arm("all-reduce of 7 floats", op.fn());
  EXPECT_TRUE(w.armed());
  clock.t += 9999ms;
  EXPECT_EQ(w.poll().action, WatchdogVerdict::kNone);
  EXPECT_EQ(op.calls, 1);
  clock.t += 1ms;
  const WatchdogVerdict v = w.poll();
  EXPECT_EQ(v.action, WatchdogVerdict::kAbortOnTimeout);
  EXPECT_TRUE(names(v, "all-reduce of 7 floats")) << v.reason;
  EXPECT_TRUE(names(v, "10.0 s")) << v.reason;
  EXPECT_TRUE(w.armed()) << "a timed-out operation is still outstanding";
}

TEST_F(WatchdogCoreTest, FinishedIsDisarmedEvenWhenFirstSeenLate) {
  WatchdogCore w = core(10s);
  w.arm("sum", op.fn());
  clock.t += 5s;
  EXPECT_EQ(w.poll().action, WatchdogVerdict::kNone);
  // It finished, but the next poll comes only after the deadline (a busy host): not a timeout.
  op.answer = Progress::done();
  clock.t += 1h;
  EXPECT_EQ(w.poll().action, WatchdogVerdict::kNone);
  EXPECT_FALSE(w.armed());
  const int calls = op.calls;
  clock.t += 1h;
  EXPECT_EQ(w.poll().action, WatchdogVerdict::kNone);
  EXPECT_EQ(op.calls, calls) << "a finished operation is not probed again";
}

TEST_F(WatchdogCoreTest, AsynchronousErrorAbortsNamingIt) {
  comm.answer = Progress::pending();  // NCCL's ncclInProgress: not an error
  WatchdogCore w = core(600s);
  w.arm("max of 12 floats", op.fn());
  clock.t += 100ms;
  EXPECT_EQ(w.poll().action, WatchdogVerdict::kNone);
  comm.answer = Progress::failed("remote process exited or there was a network error");
  clock.t += 100ms;
  const WatchdogVerdict v = w.poll();
  EXPECT_EQ(v.action, WatchdogVerdict::kAbortOnError);
  EXPECT_TRUE(names(v, "remote process exited")) << v.reason;
  EXPECT_TRUE(names(v, "max of 12 floats")) << v.reason;
}

TEST_F(WatchdogCoreTest, AFailedOperationAborts) {
  WatchdogCore w = core(600s);
  w.arm("sum of 3 floats", op.fn());
  op.answer = Progress::failed("CUDA error cudaErrorLaunchFailure");
  const WatchdogVerdict v = w.poll();
  EXPECT_EQ(v.action, WatchdogVerdict::kAbortOnError);
  EXPECT_TRUE(names(v, "cudaErrorLaunchFailure")) << v.reason;
  EXPECT_TRUE(names(v, "sum of 3 floats")) << v.reason;
}

TEST_F(WatchdogCoreTest, EachOperationHasItsOwnDeadline) {
  FakeProbe second;
  WatchdogCore w = core(10s);
  w.arm("first", op.fn());
  clock.t += 6s;
  w.arm("second", second.fn());
  EXPECT_EQ(w.outstanding(), 2u);
  op.answer = Progress::done();
  clock.t += 6s;  // 12 s after the first (finished), 6 s after the second
  EXPECT_EQ(w.poll().action, WatchdogVerdict::kNone);
  EXPECT_EQ(w.outstanding(), 1u);
  clock.t += 4s;  // the second's 10 s
  const WatchdogVerdict v = w.poll();
  EXPECT_EQ(v.action, WatchdogVerdict::kAbortOnTimeout);
  EXPECT_TRUE(names(v, "second")) << v.reason;
}

// ---- MPT_NCCL_TIMEOUT_S

WatchdogOptions options_from(const std::map<std::string, std::string>& vars) {
  return watchdog_options_from_env("MPT_NCCL_TIMEOUT_S", [&](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

TEST(WatchdogOptions, TimeoutFromTheEnvironment) {
  EXPECT_EQ(options_from({}).timeout, 600s);
  EXPECT_EQ(options_from({}).poll_interval, 100ms);
  EXPECT_EQ(options_from({{"MPT_NCCL_TIMEOUT_S", "2.5"}}).timeout, 2500ms);
  EXPECT_EQ(options_from({{"MPT_NCCL_TIMEOUT_S", "30"}}).timeout, 30s);
  for (const char* bad : {"", "abc", "0", "-5", "10s", "nan", "inf"}) {
    try {
      options_from({{"MPT_NCCL_TIMEOUT_S", bad}});
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("MPT_NCCL_TIMEOUT_S='" + std::string(bad) + "'"),
                std::string::npos)
          << e.what();
    }
  }
}

// ---- Watchdog: the polling thread, on the real clock with short timeouts

struct Fired {
  std::atomic<int> count{0};
  std::mutex mu;
  WatchdogVerdict verdict;
  Watchdog::OnFire fn() {
    return [this](const WatchdogVerdict& v) {
      std::lock_guard<std::mutex> lk(mu);
      verdict = v;
      ++count;
    };
  }
};

bool wait_until(const std::function<bool()>& cond, std::chrono::milliseconds limit) {
  const auto end = WatchdogClock::now() + limit;
  while (!cond()) {
    if (WatchdogClock::now() > end) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

WatchdogOptions fast(std::chrono::milliseconds timeout) {
  WatchdogOptions o;
  o.timeout = timeout;
  o.poll_interval = 2ms;
  return o;
}

TEST(Watchdog, FiresOnceWhenAnOperationHangs) {
  Fired fired;
  std::atomic<int> comm_polls{0};
  Watchdog w(fast(50ms), [&] { ++comm_polls; return Progress::done(); }, fired.fn());
  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(comm_polls.load(), 0) << "disarmed: no polling";
  const auto t0 = WatchdogClock::now();
  w.arm("a collective that never finishes", [] { return Progress::pending(); });
  ASSERT_TRUE(wait_until([&] { return fired.count.load() > 0; }, 5000ms));
  EXPECT_GE(WatchdogClock::now() - t0, 50ms);
  EXPECT_TRUE(w.fired());
  EXPECT_GT(comm_polls.load(), 0);
  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(fired.count.load(), 1) << "fires once, then stops polling";
  std::lock_guard<std::mutex> lk(fired.mu);
  EXPECT_EQ(fired.verdict.action, WatchdogVerdict::kAbortOnTimeout);
  EXPECT_NE(fired.verdict.reason.find("never finishes"), std::string::npos);
}

TEST(Watchdog, QuietWhenOperationsFinish) {
  Fired fired;
  Watchdog w(fast(500ms), [] { return Progress::done(); }, fired.fn());
  for (int i = 0; i < 20; ++i) {
    auto done = std::make_shared<std::atomic<bool>>(false);
    w.arm("op " + std::to_string(i), [done] {
      return done->load() ? Progress::done() : Progress::pending();
    });
    std::this_thread::sleep_for(5ms);
    done->store(true);
  }
  ASSERT_TRUE(wait_until([&] { return w.outstanding() == 0; }, 2000ms));
  std::this_thread::sleep_for(600ms);  // past every operation's deadline: they all finished
  EXPECT_EQ(fired.count.load(), 0);
  EXPECT_FALSE(w.fired());
}

TEST(Watchdog, ScopeGuardsABlockingCall) {
  Fired fired;
  Watchdog w(fast(200ms), [] { return Progress::done(); }, fired.fn());
  { Watchdog::Scope quick(w, "quick call"); }
  ASSERT_TRUE(wait_until([&] { return w.outstanding() == 0; }, 2000ms));
  EXPECT_EQ(fired.count.load(), 0);
  {
    Watchdog::Scope slow(w, "ncclCommInitRank (waiting for 2 ranks)");
    ASSERT_TRUE(wait_until([&] { return fired.count.load() > 0; }, 5000ms));
  }
  std::lock_guard<std::mutex> lk(fired.mu);
  EXPECT_NE(fired.verdict.reason.find("ncclCommInitRank"), std::string::npos);
}

TEST(Watchdog, AsyncErrorFiresWithoutWaitingForTheTimeout) {
  Fired fired;
  std::atomic<bool> broken{false};
  Watchdog w(fast(std::chrono::milliseconds(600000)),
             [&] { return broken ? Progress::failed("unhandled system error") : Progress::done(); },
             fired.fn());
  w.arm("sum", [] { return Progress::pending(); });
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(fired.count.load(), 0);
  broken = true;
  ASSERT_TRUE(wait_until([&] { return fired.count.load() > 0; }, 5000ms));
  std::lock_guard<std::mutex> lk(fired.mu);
  EXPECT_EQ(fired.verdict.action, WatchdogVerdict::kAbortOnError);
  EXPECT_NE(fired.verdict.reason.find("unhandled system error"), std::string::npos);
}

TEST(Watchdog, ThreadInitRunsOnTheWatchdogThread) {
  Fired fired;
  std::atomic<bool> on_thread{false};
  Watchdog* self = nullptr;
  std::atomic<bool> ready{false};
  Watchdog w(fast(1000ms), [] { return Progress::done(); }, fired.fn(), [&] {
    while (!ready) std::this_thread::yield();
    on_thread = self->on_watchdog_thread();
  });
  self = &w;
  ready = true;
  ASSERT_TRUE(wait_until([&] { return on_thread.load(); }, 2000ms));
  EXPECT_FALSE(w.on_watchdog_thread());
}

// ---- float order keys (the NaN-propagating device max)

// The MPI communicator's max: NaN wins.
float nan_max(float a, float b) {
  return (std::isnan(a) || std::isnan(b)) ? NAN : (a > b ? a : b);
}

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

std::vector<float> special_and_random_floats(uint64_t seed) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, inf, -inf, NAN, -NAN,
                          from_bits(0x7F800001u), from_bits(0xFFFFFFFFu),  // signalling, -NaN
                          std::numeric_limits<float>::min(), -std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(),
                          -std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                          448.0f, 57344.0f, 1e-30f, -1e-30f};
  Rng rng(seed);
  for (int i = 0; i < 300; ++i) v.push_back(static_cast<float>(rng.normal() * 100));
  for (int i = 0; i < 300; ++i) v.push_back(from_bits(static_cast<uint32_t>(rng.next_u64())));
  return v;
}

TEST(FloatOrder, KeysOrderLikeFloatsAndNanIsAboveEverything) {
  const auto v = special_and_random_floats(mpt::test::fresh_seed());
  for (float a : v) {
    const uint32_t ka = float_order_key(a);
    if (std::isnan(a)) {
      EXPECT_EQ(ka, kNanOrderKey);
      EXPECT_TRUE(std::isnan(float_from_order_key(ka)));
      EXPECT_EQ(bits(float_from_order_key(ka)), 0x7FC00000u) << "the canonical quiet NaN";
      continue;
    }
    EXPECT_EQ(bits(float_from_order_key(ka)), bits(a)) << a << ": the key round trip is exact";
    EXPECT_LT(ka, kNanOrderKey);
    for (float b : v) {
      if (std::isnan(b)) continue;
      const uint32_t kb = float_order_key(b);
      // -0 orders below +0; otherwise the float order.
      const bool less = a < b || (a == 0 && b == 0 && std::signbit(a) && !std::signbit(b));
      ASSERT_EQ(ka < kb, less) << a << " vs " << b;
    }
  }
}

TEST(FloatOrder, MaxOfKeysIsTheNanPropagatingMax) {
  const auto v = special_and_random_floats(mpt::test::fresh_seed());
  for (float a : v)
    for (float b : v) {
      const float got = float_from_order_key(std::max(float_order_key(a), float_order_key(b)));
      const float want = nan_max(a, b);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got)) << a << " max " << b;
      } else if (a == 0 && b == 0) {
        ASSERT_EQ(got, 0.0f);  // max(-0, +0) is +0 whichever comes first
        ASSERT_EQ(std::signbit(got), std::signbit(a) && std::signbit(b));
      } else {
        ASSERT_EQ(bits(got), bits(want)) << a << " max " << b;
      }
    }
}

// ---- GPU: a single-rank NCCL communicator

#if MPT_HAVE_NCCL
// Why the NCCL GPU tests cannot run here, or "" when they can.
std::string nccl_unavailable_reason() { return test::gpu_unavailable_reason(); }
#else
std::string nccl_unavailable_reason() {
  return "NCCL not in this build (it needs the CUDA backend and NCCL at configure time)";
}
#endif

#define MPT_REQUIRE_NCCL_GPU()                                             \
  do {                                                                     \
    const std::string why_ = nccl_unavailable_reason();                    \
    if (!why_.empty()) GTEST_SKIP() << "GPU test skipped: " << why_;       \
  } while (0)

#if MPT_HAVE_NCCL
constexpr size_t kAwkward = 1000003;  // odd and prime: the 1-rank trailing-element bug shows
constexpr size_t kGuardWords = 64;    // guard words after the reduced range
constexpr uint32_t kGuardWord = 0xA5A5A5A5u;

// A world of one; a watchdog timeout short enough to catch a hang inside the test's limit.
std::unique_ptr<NcclCommunicator> single_rank() {
  WatchdogOptions o;
  o.timeout = 60s;
  return std::make_unique<NcclCommunicator>(make_communicator(Placement{}), Placement{}, o);
}

// Device words [n data | guard], uploaded from `host` (n words) and the guard pattern.
cuda::DeviceBuffer upload_words(const std::vector<uint32_t>& host) {
  std::vector<uint32_t> all(host);
  all.insert(all.end(), kGuardWords, kGuardWord);
  cuda::DeviceBuffer d(all.size() * sizeof(uint32_t));
  MPT_CUDA_CHECK(cudaMemcpy(d.data(), all.data(), all.size() * 4, cudaMemcpyHostToDevice));
  // A pageable upload may still be in flight when cudaMemcpy returns, and the collectives run on
  // a non-blocking stream that does not wait for the legacy default stream.
  MPT_CUDA_CHECK(cudaDeviceSynchronize());
  return d;
}

std::vector<uint32_t> download_words(const cuda::DeviceBuffer& d, size_t n_with_guard) {
  std::vector<uint32_t> all(n_with_guard);
  MPT_CUDA_CHECK(cudaMemcpy(all.data(), d.data(), n_with_guard * 4, cudaMemcpyDeviceToHost));
  for (size_t i = n_with_guard - kGuardWords; i < n_with_guard; ++i)
    EXPECT_EQ(all[i], kGuardWord) << "guard word " << i << " overwritten";
  all.resize(n_with_guard - kGuardWords);
  return all;
}

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { MPT_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
};

void expect_watchdog_quiet(const NcclCommunicator& c) {
  EXPECT_TRUE(wait_until([&] { return c.watchdog().outstanding() == 0; }, 5000ms))
      << c.watchdog().outstanding() << " collectives still armed after the stream finished";
  EXPECT_FALSE(c.watchdog().fired());
}
#endif

TEST(Nccl, SingleRankSumOfAnAwkwardLengthIsTheInput) {
  MPT_REQUIRE_NCCL_GPU();
#if MPT_HAVE_NCCL
  auto c = single_rank();
  EXPECT_EQ(c->name(), "nccl");
  EXPECT_EQ(c->world_size(), 1);
  Rng rng(test::fresh_seed());
  std::vector<uint32_t> in(kAwkward);
  for (auto& w : in) w = bits(static_cast<float>(rng.normal()));
  cuda::DeviceBuffer d = upload_words(in);
  Stream stream;
  c->all_reduce_sum_device(d.as<float>(), kAwkward, stream.s);
  MPT_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  const auto out = download_words(d, kAwkward + kGuardWords);
  size_t wrong = 0, first = kAwkward;
  for (size_t i = 0; i < kAwkward; ++i)
    if (out[i] != in[i] && wrong++ == 0) first = i;
  EXPECT_EQ(wrong, 0u) << "elements changed by a 1-rank sum; the first at " << first << " of "
                       << kAwkward;
  expect_watchdog_quiet(*c);
#endif
}

TEST(Nccl, SingleRankBf16SumIsTheInput) {
  MPT_REQUIRE_NCCL_GPU();
#if MPT_HAVE_NCCL
  auto c = single_rank();
  Rng rng(test::fresh_seed());
  const size_t n = kAwkward;  // bf16 elements; padded to whole words for the guard helpers
  std::vector<uint16_t> in(n + 1);
  for (auto& h : in) h = bf16_from_float(static_cast<float>(rng.normal())).bits;
  std::vector<uint32_t> words((n + 1) / 2);
  std::memcpy(words.data(), in.data(), words.size() * 4);
  cuda::DeviceBuffer d = upload_words(words);
  Stream stream;
  c->all_reduce_sum_device(d.as<bf16>(), n, stream.s);
  MPT_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  const auto out_words = download_words(d, words.size() + kGuardWords);
  std::vector<uint16_t> out(n + 1);
  std::memcpy(out.data(), out_words.data(), out_words.size() * 4);
  size_t wrong = 0;
  for (size_t i = 0; i <= n; ++i) wrong += out[i] != in[i];  // [n]: the pad half, untouched
  EXPECT_EQ(wrong, 0u);
  expect_watchdog_quiet(*c);
#endif
}

TEST(Nccl, SingleRankMaxKeepsNanAndEveryOtherBit) {
  MPT_REQUIRE_NCCL_GPU();
#if MPT_HAVE_NCCL
  auto c = single_rank();
  const auto special = special_and_random_floats(test::fresh_seed());
  Rng rng(test::fresh_seed());
  std::vector<uint32_t> in(kAwkward);
  for (size_t i = 0; i < kAwkward; ++i)
    in[i] = bits(i % 7 == 0 ? special[i / 7 % special.size()]
                            : static_cast<float>(std::fabs(rng.normal()) * 448));
  in[kAwkward - 1] = bits(NAN);  // the trailing element too
  cuda::DeviceBuffer d = upload_words(in);
  Stream stream;
  c->all_reduce_max_device(d.as<float>(), kAwkward, stream.s);
  MPT_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  const auto out = download_words(d, kAwkward + kGuardWords);
  size_t wrong = 0, nans = 0;
  for (size_t i = 0; i < kAwkward; ++i) {
    const float x = from_bits(in[i]);
    if (std::isnan(x)) {
      ++nans;
      wrong += !std::isnan(from_bits(out[i]));
    } else {
      wrong += out[i] != in[i];
    }
  }
  EXPECT_GT(nans, 2u);
  EXPECT_EQ(wrong, 0u) << "a NaN lost or a value changed by a 1-rank max";
  expect_watchdog_quiet(*c);
#endif
}

TEST(Nccl, ManyCollectivesLeaveTheWatchdogQuiet) {
  MPT_REQUIRE_NCCL_GPU();
#if MPT_HAVE_NCCL
  auto c = single_rank();
  cuda::DeviceBuffer d(4096 * sizeof(float));
  MPT_CUDA_CHECK(cudaMemset(d.data(), 0, d.bytes()));
  MPT_CUDA_CHECK(cudaDeviceSynchronize());
  Stream stream;
  for (int i = 0; i < 50; ++i) {
    c->all_reduce_sum_device(d.as<float>(), 4096, stream.s);
    c->all_reduce_max_device(d.as<float>(), 1 + i, stream.s);
  }
  MPT_CUDA_CHECK(cudaStreamSynchronize(stream.s));
  expect_watchdog_quiet(*c);
  // Host-side collectives go to the wrapped single-process communicator.
  float loss = 2.5f;
  c->all_reduce_sum(&loss, 1);
  EXPECT_EQ(loss, 2.5f);
  c->barrier();
#endif
}

#if MPT_HAVE_NCCL
// Runs here without a GPU too: the bootstrap names the rank and why it cannot start.
TEST(Nccl, BootstrapNamesTheRankWhenItHasNoGpu) {
  int count = 0;
  const bool have_gpu = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  cudaGetLastError();
  Placement p;
  if (have_gpu) p.local_rank = count;  // one rank more than this node has GPUs
  try {
    NcclCommunicator c(make_communicator(p), p);
    FAIL() << "started NCCL on local rank " << p.local_rank << " of " << count << " GPUs";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("rank 0 of 1 (local rank " + std::to_string(p.local_rank)),
              std::string::npos)
        << msg;
    if (have_gpu) {
      EXPECT_EQ(e.code(), ExitCode::bad_input) << msg;
      EXPECT_NE(msg.find("has " + std::to_string(count) + " CUDA device"), std::string::npos)
          << msg;
    } else {
      EXPECT_NE(msg.find("no usable CUDA device"), std::string::npos) << msg;
    }
  }
}
#endif

}  // namespace
}  // namespace mpt::dist
