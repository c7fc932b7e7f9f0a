// A watchdog for collectives that might never finish. NCCL collectives are asynchronous: a rank
// that dies, or a network that fails, leaves the others' kernels spinning and their host threads
// blocked in a stream synchronise forever. While a collective is outstanding, the watchdog polls
// (every poll interval, 100 ms) the communicator's asynchronous error state and whether the
// collective has finished, and fires on an error or when one has been outstanding longer than
// the timeout (MPT_NCCL_TIMEOUT_S, default 600 s). What firing does is the owner's choice: the
// NCCL communicator aborts NCCL and then the whole job, naming the rank and the reason.
//
// Host-only C++ (no CUDA, no NCCL): the decisions live in WatchdogCore, which takes its clock
// and its probes as functions, so tests drive it with a fake clock and fake probes on any machine;
// Watchdog adds the polling thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace mpt::dist {

using WatchdogClock = std::chrono::steady_clock;

// What a probe saw: still running (for the communicator: NCCL's ncclInProgress, not an error),
// finished (for the communicator: no error), or failed; `detail` says how it failed.
struct Progress {
  enum State { kPending, kDone, kFailed };
  State state = kDone;
  std::string detail;
  static Progress pending() { return {kPending, {}}; }
  static Progress done() { return {kDone, {}}; }
  static Progress failed(std::string why) { return {kFailed, std::move(why)}; }
};
using Probe = std::function<Progress()>;

struct WatchdogVerdict {
  enum Action { kNone, kAbortOnError, kAbortOnTimeout };
  Action action = kNone;
  std::string reason;  // for an abort: what failed or did not finish, and for how long it ran
};

// The watchdog's decisions, without threads. Every collective (or blocking call) is armed when it
// starts, with a probe that says whether it has finished; poll() asks the probes and the
// communicator and decides. Nothing is polled while nothing is outstanding (disarmed).
class WatchdogCore {
 public:
  using Now = std::function<WatchdogClock::time_point()>;
  // comm_state: the communicator's asynchronous error state (kFailed: abort).
  WatchdogCore(std::chrono::nanoseconds timeout, Now now, Probe comm_state);

  // An operation named `what` started now; `finished` reports on it. Returns its ticket.
  uint64_t arm(std::string what, Probe finished);
  bool armed() const { return !pending_.empty(); }
  size_t outstanding() const { return pending_.size(); }
  std::chrono::nanoseconds timeout() const { return timeout_; }

  // One poll: the communicator's state first (an asynchronous error aborts), then each
  // outstanding operation in the order armed (finished ones are dropped; a failed one aborts),
  // then the oldest unfinished one's age (older than the timeout aborts). An operation that
  // finished is never timed out, however late the poll.
  WatchdogVerdict poll();

 private:
  struct Pending {
    uint64_t ticket;
    std::string what;
    Probe finished;
    WatchdogClock::time_point started;
  };
  std::string age(const Pending& p, WatchdogClock::time_point now) const;

  std::chrono::nanoseconds timeout_;
  Now now_;
  Probe comm_state_;
  std::deque<Pending> pending_;
  uint64_t next_ticket_ = 1;
};

struct WatchdogOptions {
  std::chrono::nanoseconds timeout = std::chrono::seconds(600);
  std::chrono::nanoseconds poll_interval = std::chrono::milliseconds(100);
};

// The timeout from the environment variable `variable` (seconds, a positive number; default
// 600): MPT_NCCL_TIMEOUT_S for NCCL's collectives, MPT_COMM_TIMEOUT_S for MPI's on the host. A
// value that is not a positive finite number is an InputError naming the variable and its value.
// `env` looks a variable up (nullptr when unset).
WatchdogOptions watchdog_options_from_env(const char* variable,
                                          const std::function<const char*(const char*)>& env);
// From the process environment.
WatchdogOptions watchdog_options_from_env(const char* variable);

// WatchdogCore polled by a thread of its own. The thread sleeps while nothing is outstanding,
// polls every poll interval while something is, and on the first abort verdict calls on_fire
// (from the watchdog thread, without its lock held) and stops polling. on_fire is expected to
// end the process; if it returns (tests), fired() is true and nothing more is polled.
class Watchdog {
 public:
  using OnFire = std::function<void(const WatchdogVerdict&)>;
  // thread_init runs first on the watchdog thread (the NCCL communicator selects its GPU there,
  // so probes do not create a context on device 0). now: the clock the timeout is measured on.
  Watchdog(WatchdogOptions options, Probe comm_state, OnFire on_fire,
           std::function<void()> thread_init = {},
           WatchdogCore::Now now = [] { return WatchdogClock::now(); });
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  ~Watchdog();  // stop()

  uint64_t arm(std::string what, Probe finished);
  size_t outstanding() const;
  bool fired() const;
  void stop();  // ends the thread (waits for a poll in progress); idempotent
  bool on_watchdog_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

  // Arms `what` for as long as this object lives: for blocking calls that may hang waiting on
  // other ranks (communicator initialisation, finalisation, a collective's first connection).
  class Scope {
   public:
    Scope(Watchdog& w, std::string what);
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
    ~Scope();

   private:
    std::shared_ptr<std::atomic<bool>> done_;
  };

 private:
  void run(std::function<void()> thread_init);

  WatchdogOptions options_;
  OnFire on_fire_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  WatchdogCore core_;  // guarded by mu_
  bool stop_ = false, fired_ = false;
  std::thread thread_;
};

}  // namespace mpt::dist
