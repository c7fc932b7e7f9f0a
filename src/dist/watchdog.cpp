#include "dist/watchdog.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "core/error.h"

namespace mpt::dist {

namespace {

std::string seconds(std::chrono::nanoseconds d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", std::chrono::duration<double>(d).count());
  return buf;
}

}  // namespace

// ---- WatchdogCore

WatchdogCore::WatchdogCore(std::chrono::nanoseconds timeout, Now now, Probe comm_state)
    : timeout_(timeout), now_(std::move(now)), comm_state_(std::move(comm_state)) {}

uint64_t WatchdogCore::arm(std::string what, Probe finished) {
  const uint64_t ticket = next_ticket_++;
  pending_.push_back({ticket, std::move(what), std::move(finished), now_()});
  return ticket;
}

std::string WatchdogCore::age(const Pending& p, WatchdogClock::time_point now) const {
  return p.what + " (outstanding for " + seconds(now - p.started) + ")";
}

WatchdogVerdict WatchdogCore::poll() {
  if (pending_.empty()) return {};
  const auto now = now_();
  const Progress comm = comm_state_();
  if (comm.state == Progress::kFailed)
    return {WatchdogVerdict::kAbortOnError,
            "asynchronous communicator error: " + comm.detail + ", during " +
                age(pending_.front(), now)};
  for (auto it = pending_.begin(); it != pending_.end();) {
    const Progress p = it->finished();
    if (p.state == Progress::kFailed)
      return {WatchdogVerdict::kAbortOnError, age(*it, now) + " failed: " + p.detail};
    it = p.state == Progress::kDone ? pending_.erase(it) : it + 1;
  }
  // Armed in order, so the front is the oldest (collectives finish in order on one stream;
  // across streams the oldest unfinished one is still the one that decides).
  if (!pending_.empty() && now - pending_.front().started >= timeout_)
    return {WatchdogVerdict::kAbortOnTimeout,
            age(pending_.front(), now) + " did not finish within the timeout of " +
                seconds(timeout_)};
  return {};
}

// ---- options

WatchdogOptions watchdog_options_from_env(const char* name,
                                          const std::function<const char*(const char*)>& env) {
  WatchdogOptions o;
  if (const char* v = env(name)) {
    char* end = nullptr;
    const double s = std::strtod(v, &end);
    if (end == v || *end != '\0' || !std::isfinite(s) || s <= 0 || s > 1e9)
      throw InputError(std::string(name) + "='" + v +
                       "': expected a positive number of seconds (a collective's timeout)");
    o.timeout = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::duration<double>(s));
  }
  return o;
}

WatchdogOptions watchdog_options_from_env(const char* variable) {
  return watchdog_options_from_env(variable, [](const char* n) { return std::getenv(n); });
}

// ---- Watchdog

Watchdog::Watchdog(WatchdogOptions options, Probe comm_state, OnFire on_fire,
                   std::function<void()> thread_init, WatchdogCore::Now now)
    : options_(options),
      on_fire_(std::move(on_fire)),
      core_(options.timeout, std::move(now), std::move(comm_state)) {
  thread_ = std::thread([this, init = std::move(thread_init)]() mutable { run(std::move(init)); });
}

Watchdog::~Watchdog() { stop(); }

void Watchdog::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

uint64_t Watchdog::arm(std::string what, Probe finished) {
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lk(mu_);
    ticket = core_.arm(std::move(what), std::move(finished));
  }
  cv_.notify_all();
  return ticket;
}

size_t Watchdog::outstanding() const {
  std::lock_guard<std::mutex> lk(mu_);
  return core_.outstanding();
}

bool Watchdog::fired() const {
  std::lock_guard<std::mutex> lk(mu_);
  return fired_;
}

void Watchdog::run(std::function<void()> thread_init) {
  if (thread_init) thread_init();
  std::unique_lock<std::mutex> lk(mu_);
  while (!stop_) {
    // Asleep while disarmed; then one poll per interval while anything is outstanding.
    cv_.wait(lk, [&] { return stop_ || core_.armed(); });
    if (stop_) break;
    if (cv_.wait_for(lk, options_.poll_interval, [&] { return stop_; })) break;
    WatchdogVerdict v = core_.poll();
    if (v.action == WatchdogVerdict::kNone) continue;
    fired_ = true;
    lk.unlock();
    on_fire_(v);
    return;
  }
}

Watchdog::Scope::Scope(Watchdog& w, std::string what)
    : done_(std::make_shared<std::atomic<bool>>(false)) {
  w.arm(std::move(what), [d = done_] { return d->load() ? Progress::done() : Progress::pending(); });
}

Watchdog::Scope::~Scope() { done_->store(true); }

}  // namespace mpt::dist
