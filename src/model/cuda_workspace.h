// The memory ledger's workspace term for the CUDA backend (Gpt::plan_memory predicts the CPU
// backend's): the cuBLASLt workspace plus each scratch role at the size a training step's ops
// grow it to. Host-side (backend/cuda/workspace_plan.h), so it is predicted and tested anywhere.
#pragma once

#include "config/config.h"
#include "model/gpt.h"
#include "precision/policy.h"

namespace mpt {

// Bytes of CudaBackend::workspace_bytes() once a model of `cfg` has trained on micro-batches of
// (B, T) under `policy` (forward, backward, gradient norm, AdamW, evaluation, the replay of a
// non-finite step) on a GPU of compute capability `cc_major`. `ledger` is Gpt::plan_memory's for
// the same run: it gives the gradient slab that the norm reduces.
double cuda_workspace_bytes(const ModelConfig& cfg, int B, int T, const PrecisionPolicy& policy,
                            const MemoryLedger& ledger, int cc_major);

}  // namespace mpt
