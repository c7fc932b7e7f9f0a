// The CPU reference backend: plain loops with shape comments, BLAS sgemm for matmuls, OpenMP
// across threads. Deterministic for a given thread count: every output element is produced by
// one thread in a fixed order, and reductions across rows are split by column, never by row.
//
// Low-precision storage (fp16, bf16) is emulated exactly as the op conventions in backend.h
// describe: every public op widens its low-precision inputs into fp32 staging buffers (exact),
// runs the fp32 kernel (the *_f32 members), and rounds its outputs back into their dtypes
// (round to nearest even), counting overflows and underflows. fp32 tensors are used in place.
#pragma once

#include <array>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "backend/memory_counter.h"

namespace mpt {

class CpuBackend : public Backend {
 public:
  // threads = 0: all cores available to this process.
  explicit CpuBackend(int threads);

  std::string name() const override { return "cpu"; }
  std::string device_description() const override;
  int threads() const override { return threads_; }

  Buffer allocate(size_t bytes) override;
  bool host_accessible() const override { return true; }
  void copy_from_host(Tensor dst, const void* src) override;
  void copy_to_host(void* dst, Tensor src) override;
  void fill(Tensor t, float value) override;
  void synchronize() override {}
  size_t workspace_bytes() const override;
  // Exact: the Buffers of allocate() and the staging and operand scratch (workspace_bytes()).
  MemoryUsage memory_usage() const override;
  void reset_peak_memory() override { mem_->reset_peak(); }

  void cast(Tensor dst, Tensor src, TensorClass cls) override;
  float amax(Tensor t) override;
  int64_t count_nonfinite(Tensor t) override;
  CastCounts cast_counts(TensorClass cls) const override;
  void reset_cast_counts() override;
  void set_cast_counting(bool on) override { counting_ = on; }
  bool cast_counting() const override { return counting_; }

  void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe) override;
  void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) override;
  void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                         Tensor bias) override;
  void layernorm_forward_fp8(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                             Tensor bias, const Fp8Output& fp8) override;
  void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                          Tensor weight, Tensor mean, Tensor rstd) override;
  void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias,
                      const MatmulSpec& spec) override;
  void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                       Tensor weight, const MatmulSpec& spec) override;
  void attention_forward(Tensor out, Tensor lse, Tensor qkv, int n_head,
                         MatmulPrecision prec) override;
  void attention_backward(Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse, int n_head,
                          MatmulPrecision prec) override;
  void gelu_forward(Tensor out, Tensor inp) override;
  void gelu_backward(Tensor dinp, Tensor inp, Tensor dout) override;
  void gelu_forward_fp8(Tensor out, Tensor inp, const Fp8Output& fp8) override;
  void residual_forward(Tensor out, Tensor a, Tensor b) override;
  void crossentropy_forward_backward(Tensor losses, Tensor logits, Tensor targets, int vocab_size,
                                     float dloss) override;
  double sum_squares(Tensor t) override;
  void adamw_update(Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                    const AdamWParams& p, AdamWStats* stats) override;

  // Staging slots: each op argument position has its own, so no two arguments of one op share
  // a buffer. The memory ledger (Gpt::plan_memory) predicts their sizes from these roles.
  enum Slot : int {
    kOut,      // the main output: out, dinp, dqkv
    kIn0,      // the first activation input: inp, dout of matmul_backward, qkv, a
    kIn1,      // the second: the matmul's inp in backward, b, dout of the elementwise backward
    kIn2,      // the third: layernorm_backward's inp
    kWeight,   // a weight (matrix or vector)
    kBias,     // a second weight vector (bias)
    kGrad0,    // a parameter gradient being accumulated: dweight, dwte
    kGrad1,    // a second one: dbias, dwpe
    kSlots
  };

 private:
  // ---- fp32 kernels: every tensor argument is fp32 (or int32 / fp32-only, as in backend.h)
  void embedding_forward_f32(Tensor out, Tensor tokens, Tensor wte, Tensor wpe);
  void embedding_backward_f32(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens);
  void layernorm_forward_f32(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                             Tensor bias);
  void layernorm_backward_f32(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                              Tensor weight, Tensor mean, Tensor rstd);
  void attention_forward_f32(Tensor out, Tensor lse, Tensor qkv, int n_head, OperandFormat f);
  void attention_backward_f32(Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse, int n_head,
                              OperandFormat f);
  void gelu_forward_f32(Tensor out, Tensor inp);
  void gelu_backward_f32(Tensor dinp, Tensor inp, Tensor dout);
  void residual_forward_f32(Tensor out, Tensor a, Tensor b);
  void crossentropy_f32(Tensor losses, Tensor logits, Tensor targets, int vocab_size, float dloss);

  // ---- staging
  // t itself when fp32 (or undefined), else a copy widened into staging slot `slot`.
  Tensor widen(Tensor t, Slot slot);
  // Where an op writes output `t`: t itself when fp32 (or undefined), else staging slot `slot`,
  // filled with t's widened values when the op accumulates into it.
  Tensor output(Tensor t, Slot slot, bool accumulates);
  // Stores `staged` (from output()) into t, rounded to t's dtype; nothing when they are one.
  void commit(Tensor t, Tensor staged, TensorClass cls);
  float* staging(Slot slot, int64_t n);

  // A matmul operand as the multiplications see it (fp32 values): the widened tensor, rounded
  // to tf32 or quantised to fp8 per `spec` (in `scratch` when the widened tensor is the caller's
  // own fp32 memory, which must not change). For fp8 returns the inverse scale in *scale_inv
  // and adds the quantisation's cast counts to *counts (when given); a tensor of dtype q.format
  // is taken as quantised already (MatmulSpec::inp): widened, not counted, no amax.
  // The callers check which operands may be stored quantised (inp only).
  const float* matmul_operand(Tensor t, Slot slot, const MatmulSpec& spec, const Fp8Operand& q,
                              CastCounts* counts, int scratch, float* scale_inv);
  CastCounts& counts_of(TensorClass c) { return counts_[static_cast<int>(c)]; }
  // fp8 input caches (MatmulSpec::inp_cache), row-major bit patterns here: the forward stores
  // the quantised inp x (fp32 values on the fp8 grid) into the cache; the backward widens the
  // cache into scratch instead of quantising inp again (matmul_backward has checked that it
  // holds inp under spec.inp).
  void store_inp_cache(const MatmulSpec& spec, const Tensor& inp, const float* x);
  // out (fp8.q.format) = the two casts of Fp8Output applied to x (n = out's elements), counted
  // as activations; the amax to fp8.q.amax.
  void store_fp8(Tensor out, const float* x, const Fp8Output& fp8);
  const float* load_inp_cache(const MatmulSpec& spec, const Tensor& inp, float* scale_inv);

  int threads_;
  std::array<std::vector<float>, kSlots> staging_;
  std::array<std::vector<float>, 3> operand_scratch_;  // tf32/fp8 copies of fp32 operands
  std::array<CastCounts, kTensorClasses> counts_{};
  bool counting_ = true;
  // Shared with the Buffers' deleters, which forget the caches they free.
  std::shared_ptr<Fp8InpCaches> fp8_caches_ = std::make_shared<Fp8InpCaches>();
  std::shared_ptr<MemoryCounter> mem_ = std::make_shared<MemoryCounter>();
};

}  // namespace mpt
