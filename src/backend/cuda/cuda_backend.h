// The CUDA backend: the same op interface as the CPU reference (backend.h), on one GPU. Ops run
// in order on one stream; ops that return a value to the host (amax, sum_squares, ...) and
// copies to the host wait for it. Kernels and launchers: one .cu/.cuh pair per op in this folder;
// matmuls through cuBLASLt (matmul.cu).
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"

namespace mpt {

namespace cuda {
class Context;
}

class CudaBackend : public Backend {
 public:
  // Uses CUDA device `device`. Throws InputError when no device is usable (the message says
  // why: no device, no driver, ...).
  explicit CudaBackend(int device = 0);
  ~CudaBackend() override;

  std::string name() const override { return "cuda"; }
  std::string device_description() const override;
  int threads() const override { return 1; }

  Buffer allocate(size_t bytes) override;
  bool host_accessible() const override { return false; }
  void copy_from_host(Tensor dst, const void* src) override;
  void copy_ids_from_host(Tensor dst, const int32_t* src) override;
  void copy_to_host(void* dst, Tensor src) override;
  void fill(Tensor t, float value) override;
  void synchronize() override;
  size_t workspace_bytes() const override;
  void* stream() const override;
  // bytes/peak_bytes: counted (Buffers, the cuBLASLt workspace, scratch); device_*: cudaMemGetInfo.
  MemoryUsage memory_usage() const override;
  void reset_peak_memory() override;
  GpuInfo gpu_info() const override;

  void cast(Tensor dst, Tensor src, TensorClass cls) override;
  float amax(Tensor t) override;
  int64_t count_nonfinite(Tensor t) override;
  CastCounts cast_counts(TensorClass cls) const override;
  void reset_cast_counts() override;
  void set_cast_counting(bool on) override;
  bool cast_counting() const override;

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
  void matmul_gelu_forward(Tensor out, Tensor pre, Tensor inp, Tensor weight, Tensor bias,
                           const MatmulSpec& spec) override;
  void matmul_backward_gelu(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                            Tensor weight, Tensor gelu_pre, const MatmulSpec& spec) override;
  void matmul_residual_forward(Tensor out, Tensor residual, Tensor inp, Tensor weight,
                               Tensor bias, const MatmulSpec& spec) override;
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
  void matmul_crossentropy(Tensor losses, Tensor logits, Tensor inp, Tensor weight,
                           Tensor targets, int vocab_size, float dloss,
                           const MatmulSpec& spec) override;
  double sum_squares(Tensor t) override;
  void adamw_update(Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                    const AdamWParams& p, AdamWStats* stats) override;
  void adamw_update_many(const std::vector<AdamWTensors>& all, AdamWStats* stats) override;
  void collect_stats() override;

  cuda::Context& context() { return *ctx_; }

 private:
  void forget_records(const Tensor& t);

  std::unique_ptr<cuda::Context> ctx_;
};

}  // namespace mpt
