// The tensors a checkpoint holds for a model and its optimizer, by name (docs/checkpoints.md):
// the weights of record (the fp32 master when the policy keeps one) in model.safetensors, the
// AdamW moments in optimizer.safetensors. Shared by the trainer and bench/bench_checkpoint.
#pragma once

#include <vector>

#include "backend/backend.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/gpt.h"
#include "optim/adamw.h"

namespace mpt {

struct CheckpointTensors {
  std::vector<std::vector<char>> host;  // host copies, when the backend's memory is a device's
  std::vector<safetensors::TensorRef> weights, moments;
};

// References to write. Tensors in host memory are referenced where they are; a device's are
// copied to the host first (into `host`, which the references point into).
CheckpointTensors checkpoint_tensors(Backend& be, const Gpt& model, const AdamW& optimizer);

// Copies a checkpoint's tensors into the model and the optimizer (InputError naming a tensor of
// the wrong dtype or shape) and rewrites the weights the ops read from the master.
void restore_tensors(Backend& be, Gpt& model, AdamW& optimizer, const Checkpoint& c);

}  // namespace mpt
