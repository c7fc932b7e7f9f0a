// Checkpoints: runs/NAME/checkpoints/step_NNNNNNNN/{model.safetensors, optimizer.safetensors,
// state.json}, committed atomically, with a `latest` pointer; format and guarantees in
// docs/checkpoints.md.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "io/safetensors.h"

namespace mpt {

// Crash-safety tests inject faults through MPT_FAULT (docs/checkpoints.md): a comma-separated
// list of `crash=POINT` (the process ends abruptly at that point of a checkpoint save; POINT is
// in_file, before_rename, in_latest or in_delete), `crash_step=N` (only in the save of step N;
// default: the first save that reaches POINT), `enospc_after=BYTES` (checkpoint writes fail with
// ENOSPC once that many bytes were written), `preempt_at_step=N` (behave as if a stop signal
// arrived during step N) and `stop_in_eval_at_step=N` (as if one arrived during the evaluation
// at step N, 0 included).
struct FaultPlan {
  std::string crash_point;
  int64_t crash_step = -1;
  int64_t enospc_after = -1;
  int64_t preempt_at_step = 0;
  int64_t stop_in_eval_at_step = -1;
  // Makes one gradient of this process infinite after the backward of that step (an overflow on
  // one rank of a data-parallel job).
  int64_t nonfinite_at_step = 0;

  static FaultPlan from_env();  // InputError naming MPT_FAULT for anything it does not know
  // Ends the process when `point` is the planned crash point and `step` the planned step.
  void crash_if(const char* point, int64_t step) const;
};

// Everything a checkpoint holds besides the tensors.
struct CheckpointState {
  int64_t step = 0;            // optimizer steps completed
  int64_t tokens = 0;          // training tokens consumed
  int64_t optimizer_step = 0;  // AdamW's step counter (bias correction)
  uint64_t data_epoch = 0;     // the training loader's cursor
  uint64_t data_sample = 0;
  nlohmann::json config;       // the resolved config of the run that wrote it
  nlohmann::json train_data;   // the training data's sources and sizes
  nlohmann::json numerics;     // loss scaler and fp8 scaling state (null when none)
  int world_size = 1;          // processes of the data-parallel job that wrote it
  // A stop signal cut short the evaluation due at this step: a resume runs it first.
  bool eval_pending = false;
};

// A checkpoint read back and verified.
struct Checkpoint {
  std::string dir;
  CheckpointState state;
  nlohmann::json state_json;
  safetensors::File model;
  safetensors::File optimizer;
};

// Whether `name` is a committed checkpoint's directory name, step_NNNNNNNN, and its step.
bool parse_step_name(const std::string& name, int64_t* step);

// Reads `dir` and verifies every file against the checksums and sizes in state.json, and
// state.json against its own checksum. InputError naming the bad file otherwise.
Checkpoint load_checkpoint(const std::string& dir);

// What a checkpoint holds, for `mpt inspect`; verifies like load_checkpoint.
std::string describe_checkpoint(const std::string& dir);

class CheckpointManager {
 public:
  CheckpointManager(const std::string& run_dir, const CheckpointConfig& cfg, FaultPlan faults);

  // Writes step_NNNNNNNN under a temporary name, fsyncs it, renames it into place, moves
  // `latest` to it (write-temp-and-rename) and then deletes checkpoints that fall out of the
  // retention policy. Returns the committed directory.
  std::string save(const CheckpointState& state, const std::vector<safetensors::TensorRef>& model,
                   const std::vector<safetensors::TensorRef>& optimizer);

  // Makes `dir` (one of this run's checkpoints, verified) the run's latest again before a
  // resumed run replays the steps after it: `latest` moves to it, and the newer checkpoints,
  // which the replay will write anew, are deleted.
  void restart_from(const std::string& dir);

  // The newest committed checkpoint of the run, verified. InputError when `latest` is missing,
  // empty, garbage or names a checkpoint that does not verify; the message names the newest
  // earlier checkpoint that does.
  static Checkpoint load_latest(const std::string& run_dir);

 private:
  void apply_retention(int64_t newest_step);
  void write_latest(const std::string& name);
  int64_t saving_step_ = 0;  // the step being saved, for fault injection

  std::string dir_;  // run_dir/checkpoints
  CheckpointConfig cfg_;
  FaultPlan faults_;
  int64_t bytes_written_ = 0;  // for enospc_after
};

}  // namespace mpt
