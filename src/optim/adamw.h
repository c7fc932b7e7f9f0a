// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019) over the
// model's parameter slab, with global-norm gradient clipping.
#pragma once

#include "backend/backend.h"
#include "config/config.h"
#include "model/gpt.h"

namespace mpt {

class AdamW {
 public:
  AdamW(const OptimizerConfig& cfg, Gpt& model, Backend& backend);

  // L2 norm of all gradients, accumulated in fp64 in a fixed order.
  double grad_norm() const;
  // One update at learning rate `lr`; gradients are multiplied by `grad_scale` first (the
  // loss scale's inverse times the clipping factor). Weight decay applies to the parameters
  // marked `decay` only. Updates the master weights when the model keeps them (and rewrites the
  // low-precision copy from them), else the weights themselves, with stochastic rounding when
  // the policy asks for it.
  void step(double lr, float grad_scale);
  // The seed of stochastic rounding's random bits (each parameter tensor derives its own).
  void set_rounding_seed(uint64_t seed) { sr_seed_ = seed; }
  // Statistics of the latest step(): updates a bf16 copy would have lost.
  const AdamWStats& last_stats() const { return stats_; }
  // The factor that clips a gradient of norm `norm` to optimizer.grad_clip (1 when disabled or
  // already inside; a non-finite norm gives 1 so the caller sees the non-finite loss itself).
  float clip_scale(double norm) const;

  int64_t steps_taken() const { return t_; }
  void set_steps_taken(int64_t t) { t_ = t; }  // when resuming from a checkpoint
  // The first and second moments of parameter i (same shape as the parameter).
  Tensor exp_avg(size_t i) const;
  Tensor exp_avg_sq(size_t i) const;

 private:
  OptimizerConfig cfg_;
  Gpt& model_;
  Backend& be_;
  Buffer m_buf_, v_buf_;
  int64_t t_ = 0;
  uint64_t sr_seed_ = 0;
  AdamWStats stats_;
};

}  // namespace mpt
