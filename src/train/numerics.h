// Numerics health for the step records (docs/metrics.md, "Numerics health"): what the casts into
// low-precision formats lost, what bf16 weights would lose without a master copy, and the fp8
// scaling state. Gathered over the steps between two step records.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "model/gpt.h"
#include "precision/policy.h"

namespace mpt {

// A number for a JSON record: NaN and infinities as the strings "nan", "inf", "-inf" (JSON has
// no spelling for them, and nlohmann would write null, which reads as "missing").
nlohmann::json json_number(double v);

class NumericsMonitor {
 public:
  NumericsMonitor(const PrecisionPolicy& policy, Backend& backend, const Gpt& model);

  // Moves the backend's cast counts into this interval's (and resets the backend's).
  void collect();
  // Drops the backend's cast counts since the last collect() (a replay's, which would count
  // the same casts twice).
  void discard();
  // After a step: collects, and adds the optimizer's statistics when the step was taken.
  void after_step(const AdamWStats* taken);

  // Under several processes, before take_record() (a collective: every process calls it):
  // makes this interval's counts the whole job's. The activations and gradients each process
  // casts are its own rows of the batch: summed. Every process casts the same weights and takes
  // the same optimizer step, so those are rank 0's, unless `weights_split` (ZeRO-1: each
  // process updates and casts its own range of them): then summed too.
  void combine_processes(dist::Communicator& comm, bool weights_split);

  // The numerics fields of a step record, over the steps since the previous call; resets.
  // Empty for a policy that casts nothing (fp32, tf32).
  nlohmann::json take_record();

  // The counts gathered since the last step record, for a checkpoint (a stop between two
  // records: the resumed run's next record must count the same steps as a straight run's).
  // Under several processes (a collective: every process calls it, `comm` given), the job's:
  // the other processes' counts move into rank 0's, which is what rank 0 saves; theirs restart
  // from zero, and the next combine_processes adds them to rank 0's as before.
  nlohmann::json interval_state(dist::Communicator* comm, bool weights_split);
  // Continues from a checkpoint's interval_state() (rank 0; the others start from zero).
  // InputError naming `where` for a malformed one.
  void load_interval_state(const nlohmann::json& j, const std::string& where);

 private:
  const PrecisionPolicy& policy_;
  Backend& be_;
  const Gpt& model_;
  std::array<CastCounts, kTensorClasses> counts_{};
  AdamWStats updates_;
};

}  // namespace mpt
