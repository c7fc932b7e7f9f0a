#include "optim/adamw.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/rng.h"

namespace mpt {

std::vector<SlabRange> zero_ranges(size_t elems, int world) {
  MPT_CHECK(world >= 1, "zero_ranges: world of " + std::to_string(world));
  constexpr size_t kAlign = 64;
  const size_t share = (elems + world - 1) / world;
  const size_t per = (share + kAlign - 1) / kAlign * kAlign;
  std::vector<SlabRange> out(world);
  for (int r = 0; r < world; ++r) {
    out[r].begin = std::min(elems, r * per);
    out[r].end = r == world - 1 ? elems : std::min(elems, (r + 1) * per);
  }
  return out;
}

AdamW::AdamW(const OptimizerConfig& cfg, Gpt& model, Backend& backend)
    : AdamW(cfg, model, backend,
            SlabRange{0, static_cast<size_t>(model.all_grads().numel())}) {}

AdamW::AdamW(const OptimizerConfig& cfg, Gpt& model, Backend& backend, SlabRange range)
    : cfg_(cfg), model_(model), be_(backend), range_(range) {
  const size_t slab = static_cast<size_t>(model_.all_grads().numel());
  MPT_CHECK(range.begin <= range.end && range.end <= slab,
            "optimizer range [" + std::to_string(range.begin) + ", " +
                std::to_string(range.end) + ") of a slab of " + std::to_string(slab));
  sharded_ = range.begin != 0 || range.end != slab;
  for (size_t i = 0; i < model_.params().size(); ++i) {
    const ParamInfo& info = model_.params()[i];
    const size_t lo = std::max(range.begin, info.offset);
    const size_t hi = std::min(range.end, info.offset + static_cast<size_t>(info.shape.numel()));
    if (lo < hi)
      pieces_.push_back({i, static_cast<int64_t>(lo - info.offset), static_cast<int64_t>(hi - lo)});
  }
  // The moments of the range, laid out as the slab is (parameter i's at its offset).
  m_buf_ = be_.allocate(range.size() * sizeof(float));
  v_buf_ = be_.allocate(range.size() * sizeof(float));
}

void AdamW::take_master_shard() {
  if (!sharded_ || !model_.all_master().defined()) return;
  master_buf_ = be_.allocate(range_.size() * sizeof(float));
  be_.cast(range_master(), model_.all_master().slice(range_.begin, range_.size()),
           TensorClass::weight);  // fp32 to fp32: a copy
  model_.release_master();
}

double AdamW::grad_norm() const { return std::sqrt(be_.sum_squares(model_.all_grads())); }

float AdamW::clip_scale(double norm) const {
  if (cfg_.grad_clip <= 0.0 || !std::isfinite(norm) || norm <= cfg_.grad_clip) return 1.0f;
  return static_cast<float>(cfg_.grad_clip / norm);
}

Tensor AdamW::piece_view(const Buffer& buf, size_t k) const {
  const ParamPiece& p = pieces_[k];
  const ParamInfo& info = model_.params()[p.param];
  const size_t at = info.offset + static_cast<size_t>(p.first) - range_.begin;
  const bool whole = p.count == info.shape.numel();
  return buf.view(at * sizeof(float), DType::f32, whole ? info.shape : Shape{p.count});
}

Tensor AdamW::piece_exp_avg(size_t k) const { return piece_view(m_buf_, k); }
Tensor AdamW::piece_exp_avg_sq(size_t k) const { return piece_view(v_buf_, k); }

Tensor AdamW::piece_master(size_t k) const {
  if (master_buf_.data()) return piece_view(master_buf_, k);
  const ParamPiece& p = pieces_[k];
  const Tensor whole = model_.master(p.param);
  if (!whole.defined() || p.count == whole.numel()) return whole;
  return whole.slice(p.first, p.count);
}

Tensor AdamW::range_exp_avg() const {
  return m_buf_.view(0, DType::f32, {static_cast<int64_t>(range_.size())});
}
Tensor AdamW::range_exp_avg_sq() const {
  return v_buf_.view(0, DType::f32, {static_cast<int64_t>(range_.size())});
}
Tensor AdamW::range_master() const {
  if (!master_buf_.data()) return Tensor();
  return master_buf_.view(0, DType::f32, {static_cast<int64_t>(range_.size())});
}

Tensor AdamW::exp_avg(size_t i) const {
  MPT_CHECK(!sharded_, "exp_avg(i) of a sharded optimizer: use its pieces");
  MPT_CHECK(pieces_[i].param == i, "a parameter without elements");
  return piece_exp_avg(i);  // not sharded: piece i is parameter i, whole
}

Tensor AdamW::exp_avg_sq(size_t i) const {
  MPT_CHECK(!sharded_, "exp_avg_sq(i) of a sharded optimizer: use its pieces");
  MPT_CHECK(pieces_[i].param == i, "a parameter without elements");
  return piece_exp_avg_sq(i);
}

void AdamW::step(double lr, float grad_scale) {
  ++t_;
  stats_ = {};
  // The backend may count into stats_ on the device until collect_stats(): collect it on every
  // path, so that no pointer to stats_ stays pending (a failed step then rethrows).
  try {
    std::vector<AdamWTensors> all;
    all.reserve(pieces_.size());
    for (size_t k = 0; k < pieces_.size(); ++k) {
      const ParamPiece& piece = pieces_[k];
      const ParamInfo& info = model_.params()[piece.param];
      AdamWParams p{static_cast<float>(lr),
                    static_cast<float>(cfg_.beta1),
                    static_cast<float>(cfg_.beta2),
                    static_cast<float>(cfg_.eps),
                    info.decay ? static_cast<float>(cfg_.weight_decay) : 0.0f,
                    t_,
                    grad_scale,
                    model_.policy().stochastic_rounding,
                    derive_seed(sr_seed_, piece.param),
                    piece.first};
      Tensor param = model_.param(piece.param), grad = model_.grad(piece.param);
      if (piece.count != info.shape.numel()) {
        param = param.slice(piece.first, piece.count);
        grad = grad.slice(piece.first, piece.count);
      }
      all.push_back({param, piece_master(k), grad, piece_exp_avg(k), piece_exp_avg_sq(k), p});
    }
    // One call for the step: a GPU backend updates many parameters a launch.
    be_.adamw_update_many(all, &stats_);
  } catch (...) {
    try {
      be_.collect_stats();
    } catch (...) {
      // The first error is the one to report.
    }
    throw;
  }
  be_.collect_stats();
}

}  // namespace mpt
