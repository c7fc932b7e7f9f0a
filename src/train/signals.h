// SIGTERM, SIGINT, SIGUSR1 and SIGHUP ask a run to stop: it finishes the step in progress, saves
// a checkpoint and exits with code 3 (README, "Exit codes"). Schedulers send SIGTERM (SLURM also
// SIGUSR1 ahead of a time limit); SIGINT is Ctrl-C; SIGHUP a closed terminal (not when it was
// ignored at start, as under nohup). SIGPIPE is ignored meanwhile.
#pragma once

namespace mpt {

// Installs the handlers for its lifetime and restores the previous ones afterwards. The
// handler only records the signal; a second signal while the checkpoint is written changes
// nothing. (The recorded signal number is the one piece of process-wide mutable state in mpt:
// a signal handler can reach nothing else.)
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  int requested() const;  // the first signal received, or 0
  // Installs the handlers again where something replaced them since (a library's start-up, such
  // as an MPI or NCCL initialisation, may install its own): then mpt's stop still works.
  void keep_installed() const;
};

}  // namespace mpt
