// The narrow op interface a GPT trainer needs. The model's forward and backward are written
// once against it; the CPU backend (backend/cpu) is the readable reference and the oracle the
// CUDA backend is checked against, op by op.
//
// Conventions for every op:
//  - Tensors live in the backend's memory (allocate()); shapes are given in comments as
//    (B,T,C) = micro-batch, sequence, channels; N = B*T rows; OC = output channels.
//  - "writes" means the output is overwritten; "accumulates" means the op adds into it (used
//    for parameter gradients across micro-batches, and for the residual stream's gradient).
//  - An optional tensor is passed as an undefined Tensor().
//  - Ops check dtypes and shapes and throw RuntimeError on a mismatch (a bug, not bad input).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/tensor.h"

namespace mpt {

// The arithmetic of a matmul's multiplications. Accumulation is fp32 for every format.
//   fp32: operands as stored.
//   tf32: operands rounded to TF32 (fp32 with a 10-bit mantissa, round to nearest even), as
//         Tensor Cores do for fp32 data under CUBLAS_COMPUTE_32F_FAST_TF32.
enum class MatmulPrecision { fp32, tf32 };

struct AdamWParams {
  float lr;
  float beta1;
  float beta2;
  float eps;
  float weight_decay;  // decoupled (Loshchilov & Hutter, "Decoupled Weight Decay Regularization")
  int64_t step;        // 1-based optimizer step, for bias correction
  float grad_scale;    // gradients are multiplied by this first (global-norm clipping)
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  virtual std::string device_description() const = 0;
  virtual int threads() const = 0;

  // ---- memory
  // Zero-initialised allocation of `bytes`, aligned to at least 256 bytes.
  virtual Buffer allocate(size_t bytes) = 0;
  virtual void copy_from_host(Tensor dst, const void* src) = 0;  // dst.bytes() bytes
  virtual void copy_to_host(void* dst, Tensor src) = 0;          // src.bytes() bytes
  virtual void fill(Tensor t, float value) = 0;
  virtual void synchronize() = 0;

  // ---- GPT ops
  // out(B,T,C) writes = wte[tokens[b,t]] + wpe[t];  tokens (B,T) int32, wte (Vp,C), wpe (maxT,C)
  virtual void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe) = 0;
  // dwte, dwpe accumulate from dout(B,T,C). Deterministic (no order-dependent float atomics).
  virtual void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) = 0;

  // out(N,C) writes = (inp - mean) * rstd * weight + bias; mean, rstd (N) write, in fp32.
  virtual void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                                 Tensor bias) = 0;
  // dinp(N,C) accumulates (it is the residual stream's gradient); dweight, dbias (C) accumulate.
  virtual void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                  Tensor inp, Tensor weight, Tensor mean, Tensor rstd) = 0;

  // out(N,OC) writes = inp(N,C) . weight(OC,C)^T + bias(OC); bias optional.
  virtual void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias,
                              MatmulPrecision prec) = 0;
  // dinp(N,C) writes = dout . weight; dweight(OC,C) accumulates dout^T . inp; dbias(OC)
  // accumulates the column sums of dout (optional; always fp32 sums).
  virtual void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                               Tensor weight, MatmulPrecision prec) = 0;

  // Causal multi-head self-attention. qkv (B,T,3C) holds q|k|v, heads of size C/n_head.
  // out(B,T,C) writes; att (B,NH,T,T) writes the softmax probabilities (fp32), saved for backward.
  virtual void attention_forward(Tensor out, Tensor att, Tensor qkv, int n_head) = 0;
  // dqkv(B,T,3C) writes.
  virtual void attention_backward(Tensor dqkv, Tensor dout, Tensor qkv, Tensor att, int n_head) = 0;

  // GPT-2's tanh-approximated GELU. out writes; dinp writes = dout * gelu'(inp).
  virtual void gelu_forward(Tensor out, Tensor inp) = 0;
  virtual void gelu_backward(Tensor dinp, Tensor inp, Tensor dout) = 0;

  // out writes = a + b (same shapes).
  virtual void residual_forward(Tensor out, Tensor a, Tensor b) = 0;

  // Fused classifier over logits (N,Vp) of which the first `vocab_size` columns are real:
  // losses(N) writes -log softmax(logits)[target] with the softmax in fp32 over the real
  // columns only. When `dloss` != 0, logits are overwritten in place with the gradient
  // dloss * (softmax - onehot(target)), and the padded columns with 0.
  virtual void crossentropy_forward_backward(Tensor losses, Tensor logits, Tensor targets,
                                             int vocab_size, float dloss) = 0;

  // ---- optimizer support
  // Sum of squares of all elements, accumulated in fp64 in a fixed order (deterministic).
  virtual double sum_squares(Tensor t) = 0;
  // AdamW on one parameter tensor: param, m, v write; grad is read (times p.grad_scale).
  virtual void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v,
                            const AdamWParams& p) = 0;
};

// Creates the backend named in the config: "cpu", "cuda" or "auto" (CUDA when this build has it
// and a device is present, else CPU). `threads` = 0 means all available cores. Throws
// InputError when the named backend is not available in this build or on this machine.
std::unique_ptr<Backend> make_backend(const std::string& name, int threads);

}  // namespace mpt
