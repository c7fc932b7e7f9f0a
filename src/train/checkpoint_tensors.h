// The tensors a checkpoint holds for a model and its optimizer, by name (docs/checkpoints.md):
// the weights of record (the fp32 master when the policy keeps one) in model.safetensors, the
// AdamW moments in optimizer.safetensors. Shared by the trainer and bench/bench_checkpoint.
// A checkpoint always holds whole tensors: under ZeRO-1 the processes' parts of the optimizer
// state are gathered to the writing process one tensor at a time while it saves, and each
// process restores its part from the whole.
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/gpt.h"
#include "optim/adamw.h"

namespace mpt {

class ShardedState;

struct CheckpointTensors {
  std::vector<safetensors::TensorRef> weights, moments;
  // ZeRO-1: the sharded tensors (moments, and the master weights when the policy keeps them),
  // whose fills gather them from every process; null when the optimizer is not sharded.
  std::shared_ptr<ShardedState> sharded;

  // ZeRO-1, on every process but the writer (rank 0): sends this process's piece of each tensor
  // that the writer's fills ask for, until the writer calls saved(). Nothing to do otherwise.
  void serve() const;
  // ZeRO-1, on the writer, after its save: releases the others from serve(). (A save that throws
  // ends the whole job instead: the trainer aborts it, and the others with it.)
  void saved() const;
};

// References to write. Tensors in host memory are referenced where they are; a device's are
// referenced by a fill that copies them to the host when the writer reaches them (one at a time;
// valid while `be` lives and the tensors are unchanged). A sharded optimizer (ZeRO-1) needs
// `comm`, and every process must call this (it gathers the processes' ranges): its state is
// referenced by fills that gather one tensor at a time from every process's range, so no process
// holds more than one tensor of it beyond its own range. The writer's fills are collectives that
// the others join in serve().
CheckpointTensors checkpoint_tensors(Backend& be, const Gpt& model, const AdamW& optimizer,
                                     dist::Communicator* comm = nullptr);

// Copies a checkpoint's tensors into the model and the optimizer (InputError naming a tensor of
// the wrong dtype or shape) and rewrites the weights the ops read from the master. A sharded
// optimizer takes its range of each moment; the model's master must not have been released yet
// (AdamW::take_master_shard comes after).
void restore_tensors(Backend& be, Gpt& model, AdamW& optimizer, const Checkpoint& c);

}  // namespace mpt
