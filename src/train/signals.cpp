#include "train/signals.h"

#include <atomic>
#include <csignal>

namespace mpt {
namespace {

// Lock-free, so the handler may touch it, and atomic, so any thread sees the write.
std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free atomic");

extern "C" void record_stop_signal(int sig) {
  int none = 0;
  g_stop_signal.compare_exchange_strong(none, sig);  // keep the first
}

constexpr int kSignals[] = {SIGTERM, SIGINT, SIGUSR1};
struct sigaction g_previous[3];

struct sigaction stop_action() {
  struct sigaction sa {};
  sa.sa_handler = record_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // interrupted reads and writes carry on
  return sa;
}

}  // namespace

StopSignals::StopSignals() {
  g_stop_signal = 0;
  const struct sigaction sa = stop_action();
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &sa, &g_previous[i]);
}

void StopSignals::keep_installed() const {
  const struct sigaction sa = stop_action();
  for (int sig : kSignals) {
    struct sigaction now {};
    if (sigaction(sig, nullptr, &now) == 0 && now.sa_handler != record_stop_signal)
      sigaction(sig, &sa, nullptr);
  }
}

StopSignals::~StopSignals() {
  for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &g_previous[i], nullptr);
}

int StopSignals::requested() const { return g_stop_signal.load(); }

}  // namespace mpt
