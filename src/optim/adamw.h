// AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019) over the
// model's parameter slab, with global-norm gradient clipping; optionally over one range of the
// slab only (ZeRO stage 1: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training
// Trillion Parameter Models", SC 2020).
#pragma once

#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "model/gpt.h"

namespace mpt {

// Elements [begin, end) of the parameter slab (padding included, as Gpt lays it out).
struct SlabRange {
  size_t begin = 0;
  size_t end = 0;
  size_t size() const { return end - begin; }
};

// ZeRO-1's split of a slab of `elems` elements over `world` processes: contiguous ranges in rank
// order that tile the slab, each of ceil(elems / world) rounded up to 64 elements (so their
// bounds are 256-byte aligned in fp32, as the backends align buffers) but for the last, which
// is no larger.
std::vector<SlabRange> zero_ranges(size_t elems, int world);

// The part of parameter `param` inside an optimizer's range: elements [first, first + count) of
// the parameter.
struct ParamPiece {
  size_t param;
  int64_t first;
  int64_t count;
};

class AdamW {
 public:
  // Keeps the moments of the whole slab and updates every parameter.
  AdamW(const OptimizerConfig& cfg, Gpt& model, Backend& backend);
  // Keeps the moments of `range` only and updates the parameters' elements in it (the other
  // processes update the rest; the caller gathers the parameters after step()).
  AdamW(const OptimizerConfig& cfg, Gpt& model, Backend& backend, SlabRange range);

  // L2 norm of all gradients, accumulated in fp64 in a fixed order.
  double grad_norm() const;
  // One update at learning rate `lr`; gradients are multiplied by `grad_scale` first (the
  // loss scale's inverse times the clipping factor). Weight decay applies to the parameters
  // marked `decay` only. Updates the master weights when the model keeps them (and rewrites the
  // low-precision copy from them), else the weights themselves, with stochastic rounding when
  // the policy asks for it. A part of a parameter draws the bits the whole one would, so the
  // result does not depend on the range.
  void step(double lr, float grad_scale);
  // The seed of stochastic rounding's random bits (each parameter tensor derives its own).
  void set_rounding_seed(uint64_t seed) { sr_seed_ = seed; }
  // Statistics of the latest step(): updates a bf16 copy would have lost (in the range).
  const AdamWStats& last_stats() const { return stats_; }
  // The factor that clips a gradient of norm `norm` to optimizer.grad_clip (1 when disabled or
  // already inside; a non-finite norm gives 1 so the caller sees the non-finite loss itself).
  float clip_scale(double norm) const;

  int64_t steps_taken() const { return t_; }
  void set_steps_taken(int64_t t) { t_ = t; }  // when resuming from a checkpoint

  // ---- the state
  const SlabRange& range() const { return range_; }
  bool sharded() const { return sharded_; }
  // The parameters' parts inside the range, in slab order (whole parameters when not sharded).
  const std::vector<ParamPiece>& pieces() const { return pieces_; }
  // Moves the range's part of the model's fp32 master copy into the optimizer and frees the
  // model's (under ZeRO-1 each process keeps 1/N of the master): once the master holds its
  // initial or restored values. Nothing to do when not sharded or without a master.
  void take_master_shard();
  // Views of piece k's master (undefined without a master), first and second moments: shaped
  // as the parameter when the piece is all of it, else flat.
  Tensor piece_master(size_t k) const;
  Tensor piece_exp_avg(size_t k) const;
  Tensor piece_exp_avg_sq(size_t k) const;
  // The range's state as flat fp32 in slab order (padding included): the moments, and the
  // master once taken (else undefined).
  Tensor range_exp_avg() const;
  Tensor range_exp_avg_sq() const;
  Tensor range_master() const;
  // Parameter i's moments, shaped as the parameter: only when not sharded.
  Tensor exp_avg(size_t i) const;
  Tensor exp_avg_sq(size_t i) const;

 private:
  Tensor piece_view(const Buffer& buf, size_t k) const;

  OptimizerConfig cfg_;
  Gpt& model_;
  Backend& be_;
  SlabRange range_;
  bool sharded_ = false;
  std::vector<ParamPiece> pieces_;
  Buffer m_buf_, v_buf_;
  Buffer master_buf_;  // the range's master, after take_master_shard()
  int64_t t_ = 0;
  uint64_t sr_seed_ = 0;
  AdamWStats stats_;
};

}  // namespace mpt
