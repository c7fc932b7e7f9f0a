#include "optim/adamw.h"

#include <cmath>

#include "core/rng.h"

namespace mpt {

AdamW::AdamW(const OptimizerConfig& cfg, Gpt& model, Backend& backend)
    : cfg_(cfg), model_(model), be_(backend) {
  // Moments share the parameter slab's layout, so parameter i's moments are at its offset.
  const size_t bytes = static_cast<size_t>(model_.all_grads().numel()) * sizeof(float);
  m_buf_ = be_.allocate(bytes);
  v_buf_ = be_.allocate(bytes);
}

double AdamW::grad_norm() const { return std::sqrt(be_.sum_squares(model_.all_grads())); }

float AdamW::clip_scale(double norm) const {
  if (cfg_.grad_clip <= 0.0 || !std::isfinite(norm) || norm <= cfg_.grad_clip) return 1.0f;
  return static_cast<float>(cfg_.grad_clip / norm);
}

Tensor AdamW::exp_avg(size_t i) const {
  const ParamInfo& info = model_.params()[i];
  return m_buf_.view(info.offset * sizeof(float), DType::f32, info.shape);
}

Tensor AdamW::exp_avg_sq(size_t i) const {
  const ParamInfo& info = model_.params()[i];
  return v_buf_.view(info.offset * sizeof(float), DType::f32, info.shape);
}

void AdamW::step(double lr, float grad_scale) {
  ++t_;
  stats_ = {};
  for (size_t i = 0; i < model_.params().size(); ++i) {
    const ParamInfo& info = model_.params()[i];
    AdamWParams p{static_cast<float>(lr),
                  static_cast<float>(cfg_.beta1),
                  static_cast<float>(cfg_.beta2),
                  static_cast<float>(cfg_.eps),
                  info.decay ? static_cast<float>(cfg_.weight_decay) : 0.0f,
                  t_,
                  grad_scale,
                  model_.policy().stochastic_rounding,
                  derive_seed(sr_seed_, i)};
    be_.adamw_update(model_.param(i), model_.master(i), model_.grad(i), exp_avg(i),
                     exp_avg_sq(i), p, &stats_);
  }
}

}  // namespace mpt
