// The CPU reference backend: plain loops with shape comments, BLAS sgemm for matmuls, OpenMP
// across threads. Deterministic for a given thread count: every output element is produced by
// one thread in a fixed order, and reductions across rows are split by column, never by row.
#pragma once

#include <vector>

#include "backend/backend.h"

namespace mpt {

class CpuBackend : public Backend {
 public:
  // threads = 0: all cores available to this process.
  explicit CpuBackend(int threads);

  std::string name() const override { return "cpu"; }
  std::string device_description() const override;
  int threads() const override { return threads_; }

  Buffer allocate(size_t bytes) override;
  void copy_from_host(Tensor dst, const void* src) override;
  void copy_to_host(void* dst, Tensor src) override;
  void fill(Tensor t, float value) override;
  void synchronize() override {}

  void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe) override;
  void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) override;
  void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                         Tensor bias) override;
  void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                          Tensor weight, Tensor mean, Tensor rstd) override;
  void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias,
                      MatmulPrecision prec) override;
  void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                       Tensor weight, MatmulPrecision prec) override;
  void attention_forward(Tensor out, Tensor att, Tensor qkv, int n_head) override;
  void attention_backward(Tensor dqkv, Tensor dout, Tensor qkv, Tensor att, int n_head) override;
  void gelu_forward(Tensor out, Tensor inp) override;
  void gelu_backward(Tensor dinp, Tensor inp, Tensor dout) override;
  void residual_forward(Tensor out, Tensor a, Tensor b) override;
  void crossentropy_forward_backward(Tensor losses, Tensor logits, Tensor targets, int vocab_size,
                                     float dloss) override;
  double sum_squares(Tensor t) override;
  void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWParams& p) override;

 private:
  // The operands of a matmul as its precision sees them: `t` itself for fp32, else a copy
  // rounded to that format in scratch buffer `slot` (0..2), reused from call to call.
  const float* matmul_operand(Tensor t, MatmulPrecision prec, int slot);

  int threads_;
  std::vector<float> operand_scratch_[3];
};

}  // namespace mpt
