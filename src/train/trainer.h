// The training loop: data -> forward -> backward -> clip -> AdamW -> metrics, with periodic
// validation. Everything that can fail because of the user's input is checked before the run
// directory is created.
#pragma once

#include <string>

#include "config/config.h"

namespace mpt {

struct TrainOptions {
  std::string run_dir;  // --run-dir: overrides output.dir / output.name
  bool dry_run = false;  // validate everything and print the plan; create and train nothing
  bool resume = false;   // --resume: continue from a checkpoint
  std::string resume_from;  // --resume PATH: that checkpoint; empty: the run's latest
};

struct TrainResult {
  std::string run_dir;
  int64_t steps = 0;
  double final_loss = 0.0;
  double final_val_loss = 0.0;
  int stopped_by_signal = 0;  // the signal that stopped the run after a checkpoint, or 0
};

// Runs the whole training described by `cfg`. Throws InputError (bad data, unavailable backend,
// occupied run directory) before anything is written, RuntimeError for failures during the run
// (for example a loss that stops being finite).
TrainResult train(const Config& cfg, const TrainOptions& opt);

// Micro-batches each process accumulates per optimizer step: training.grad_accum, or what
// training.global_batch_tokens asks of `world` processes (InputError when it does not divide).
int micro_batches_per_step(const TrainingConfig& t, int world);

}  // namespace mpt
