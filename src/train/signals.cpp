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

// SIGHUP (the terminal that started the run went away) stops the run like the others, unless it
// was ignored when mpt started (nohup, or a launcher that ignores it): then it stays ignored.
constexpr int kSignals[] = {SIGTERM, SIGINT, SIGUSR1, SIGHUP};
constexpr int kCount = sizeof(kSignals) / sizeof(kSignals[0]);
struct sigaction g_previous[kCount];
struct sigaction g_previous_pipe;
bool g_hup_ignored = false;

struct sigaction stop_action() {
  struct sigaction sa {};
  sa.sa_handler = record_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // interrupted reads and writes carry on
  return sa;
}

bool handled(int sig) { return !(sig == SIGHUP && g_hup_ignored); }

}  // namespace

StopSignals::StopSignals() {
  g_stop_signal = 0;
  struct sigaction hup {};
  g_hup_ignored = sigaction(SIGHUP, nullptr, &hup) == 0 && hup.sa_handler == SIG_IGN;
  const struct sigaction sa = stop_action();
  for (int i = 0; i < kCount; ++i)
    if (handled(kSignals[i])) sigaction(kSignals[i], &sa, &g_previous[i]);
  // A closed pipe on the terminal's side (`mpt train ... | head`) must not end the run without a
  // checkpoint: writes to it fail instead (the metrics file is the record), and training goes on.
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  sigaction(SIGPIPE, &ignore, &g_previous_pipe);
}

void StopSignals::keep_installed() const {
  const struct sigaction sa = stop_action();
  for (int sig : kSignals) {
    if (!handled(sig)) continue;
    struct sigaction now {};
    if (sigaction(sig, nullptr, &now) == 0 && now.sa_handler != record_stop_signal)
      sigaction(sig, &sa, nullptr);
  }
}

StopSignals::~StopSignals() {
  for (int i = 0; i < kCount; ++i)
    if (handled(kSignals[i])) sigaction(kSignals[i], &g_previous[i], nullptr);
  sigaction(SIGPIPE, &g_previous_pipe, nullptr);
}

int StopSignals::requested() const { return g_stop_signal.load(); }

}  // namespace mpt
