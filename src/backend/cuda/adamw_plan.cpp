#include "backend/cuda/adamw_plan.h"

#include <cstring>

#include "backend/cuda/workspace_plan.h"

namespace mpt::cuda {

namespace {

// Bit equality: the launch runs with the first tensor's values, which must be each tensor's own.
bool same(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

}  // namespace

bool adamw_stochastic(const AdamWTensors& t) {
  return t.p.stochastic_rounding && !t.master.defined() && t.param.dtype == DType::bf16;
}

bool adamw_same_launch(const AdamWTensors& a, const AdamWTensors& b) {
  const AdamWParams &p = a.p, &q = b.p;
  return a.param.dtype == b.param.dtype && a.grad.dtype == b.grad.dtype &&
         adamw_stochastic(a) == adamw_stochastic(b) && same(p.lr, q.lr) &&
         same(p.beta1, q.beta1) && same(p.beta2, q.beta2) && same(p.eps, q.eps) &&
         p.step == q.step && same(p.grad_scale, q.grad_scale);
}

std::vector<AdamWLaunch> plan_adamw_launches(const std::vector<AdamWTensors>& all) {
  std::vector<AdamWLaunch> out;
  // The launch still being filled for each kind met so far (by its first tensor's index); a
  // model has one or two kinds, so a linear search.
  std::vector<std::pair<size_t, size_t>> open;  // (a tensor of the kind, index into out)
  for (size_t i = 0; i < all.size(); ++i) {
    const int64_t n = all[i].param.numel();
    if (n == 0) continue;
    size_t* slot = nullptr;
    for (auto& [kind, at] : open)
      if (adamw_same_launch(all[kind], all[i])) slot = &at;
    if (!slot || out[*slot].tensors.size() == kAdamWTensorsPerLaunch) {
      out.push_back({{}, {0}});
      if (slot)
        *slot = out.size() - 1;
      else
        open.push_back({i, out.size() - 1});
    }
    AdamWLaunch& l = out[slot ? *slot : open.back().second];
    l.tensors.push_back(i);
    l.block_begin.push_back(l.block_begin.back() + grid_stride_blocks(n));
  }
  return out;
}

}  // namespace mpt::cuda
