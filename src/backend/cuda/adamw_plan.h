// How the CUDA backend's adamw_update_many (adamw.cu) splits an optimizer step's tensors into
// launches, and which blocks of a launch update which tensor. Host logic only (no CUDA), so that
// it is tested without a GPU (test_cuda: AdamWPlan).
//
// One launch updates up to kAdamWTensorsPerLaunch tensors whose kernel is the same: its template
// (the parameter's dtype, stochastic rounding or not), the gradient's dtype (read at run time
// but uniform over a launch), and the hyperparameters the kernel takes as arguments rather than
// per tensor (lr, betas, eps, step, grad_scale). Per tensor, the launch's table gives the
// pointers, the element count and what AdamWParams lets differ between a model's tensors: weight
// decay (none for biases and LayerNorm), the stochastic-rounding seed and first index. Tensor j
// of a launch gets the blocks [block_begin[j], block_begin[j+1]): as many as adamw_update alone
// would launch for it (workspace_plan.h's grid_stride_blocks), over which it grid-strides as that launch did, so each
// element sees the same arithmetic and the results are adamw_update's bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "backend/backend.h"

namespace mpt::cuda {

// The table travels as a kernel parameter (no upload, nothing to keep alive until the launch has
// run); 40 tensors keep it and the other arguments within the 4 KB that kernel parameters have
// had on every CUDA version (adamw.cu asserts the size). GPT-2's 148 tensors: 4 launches.
constexpr size_t kAdamWTensorsPerLaunch = 40;

struct AdamWLaunch {
  std::vector<size_t> tensors;        // indices into the call's list, in the list's order
  std::vector<unsigned> block_begin;  // tensors.size() + 1 entries, from 0; the last is the grid
};

// Whether tensor t's kernel rounds stochastically (bf16 weights updated in place, asked to).
bool adamw_stochastic(const AdamWTensors& t);

// Whether tensors a and b of an adamw_update_many call can share a launch (see above). Both are
// assumed checked (check_adamw_args): defined param and grad. The shared hyperparameters must be
// the same bits (so +0 and -0 do not share a launch; `==` would let them).
bool adamw_same_launch(const AdamWTensors& a, const AdamWTensors& b);

// The launches for `all`: every tensor with elements in exactly one, tensors without none; a
// launch's tensors all adamw_same_launch as its first; launches in the order of their first
// tensor, each holding at most kAdamWTensorsPerLaunch. Tensors that share a kernel but are apart
// in the list still share launches (the order of updates does not matter: they are disjoint).
std::vector<AdamWLaunch> plan_adamw_launches(const std::vector<AdamWTensors>& all);

}  // namespace mpt::cuda
