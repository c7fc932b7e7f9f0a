// Errors and exit codes. Every failure the user can cause (config, data, arguments) is an
// InputError and exits 2; anything else that goes wrong at run time exits 1 (README, "Exit codes").
#pragma once

#include <stdexcept>
#include <string>

namespace mpt {

// stopped: a stop signal (SIGTERM, SIGINT, SIGUSR1, SIGHUP) ended the run after it saved a
// checkpoint.
enum class ExitCode : int { ok = 0, runtime_failure = 1, bad_input = 2, stopped = 3 };

class Error : public std::runtime_error {
 public:
  Error(ExitCode code, const std::string& what) : std::runtime_error(what), code_(code) {}
  ExitCode code() const { return code_; }

 private:
  ExitCode code_;
};

// Bad config, bad data file, bad argument: the user can fix it. Exit code 2.
class InputError : public Error {
 public:
  explicit InputError(const std::string& what) : Error(ExitCode::bad_input, what) {}
};

// A failure the user did not cause directly (I/O error mid-run, internal invariant). Exit code 1.
class RuntimeError : public Error {
 public:
  explicit RuntimeError(const std::string& what) : Error(ExitCode::runtime_failure, what) {}
};

namespace detail {
[[noreturn]] void throw_check_failure(const char* cond, const std::string& msg, const char* file,
                                      int line);
}  // namespace detail

}  // namespace mpt

// Internal invariant: a failure is a bug or a broken environment, never bad user input.
#define MPT_CHECK(cond, msg)                                                  \
  do {                                                                        \
    if (!(cond)) ::mpt::detail::throw_check_failure(#cond, (msg), __FILE__, __LINE__); \
  } while (0)
