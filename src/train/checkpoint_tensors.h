// The tensors a checkpoint holds for a model and its optimizer, by name (docs/checkpoints.md):
// the weights of record (the fp32 master when the policy keeps one) in model.safetensors, the
// AdamW moments in optimizer.safetensors. Shared by the trainer and bench/bench_checkpoint.
// A checkpoint always holds whole tensors: under ZeRO-1 the processes' parts of the optimizer
// state are gathered before a save, and each process restores its part from the whole.
#pragma once

#include <vector>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/gpt.h"
#include "optim/adamw.h"

namespace mpt {

struct CheckpointTensors {
  std::vector<std::vector<char>> host;  // ZeRO-1: the whole state, gathered from every process
  std::vector<safetensors::TensorRef> weights, moments;
};

// References to write. Tensors in host memory are referenced where they are; a device's are
// referenced by a fill that copies them to the host when the writer reaches them (one at a time;
// valid while `be` lives and the tensors are unchanged). A sharded optimizer (ZeRO-1) has its
// state gathered from every process through `comm` into `host`: a collective, so every process
// must call it, and each gets the whole.
CheckpointTensors checkpoint_tensors(Backend& be, const Gpt& model, const AdamW& optimizer,
                                     dist::Communicator* comm = nullptr);

// Copies a checkpoint's tensors into the model and the optimizer (InputError naming a tensor of
// the wrong dtype or shape) and rewrites the weights the ops read from the master. A sharded
// optimizer takes its range of each moment; the model's master must not have been released yet
// (AdamW::take_master_shard comes after).
void restore_tensors(Backend& be, Gpt& model, AdamW& optimizer, const Checkpoint& c);

}  // namespace mpt
