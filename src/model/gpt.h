// GPT-2: token + learned position embeddings, pre-LayerNorm blocks of causal multi-head
// attention and a 4x tanh-GELU MLP, a final LayerNorm, and an LM head tied to the token
// embedding (Radford et al., "Language Models are Unsupervised Multitask Learners", 2019).
// Forward and backward are written once, against the Backend interface.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "precision/policy.h"

namespace mpt {

struct ParamInfo {
  enum class Init { normal, normal_residual, zeros, ones };
  std::string name;  // nanoGPT-style names, e.g. "transformer.h.0.attn.c_attn.weight"
  Shape shape;       // linear weights are (out, in), as in PyTorch's nn.Linear
  size_t offset;     // in elements, into the parameter and gradient slabs
  bool decay;        // weight decay applies to 2-D weights only
  Init init;
};

// Predicted backend memory of a training run, by role, in bytes. In fp32 there are no master
// weights; the precision policies will fill that role and shrink the others.
struct MemoryLedger {
  double parameters = 0;       // the weights the ops read
  double master_weights = 0;   // an fp32 copy kept beside low-precision weights
  double gradients = 0;
  double optimizer_state = 0;  // AdamW's two moments
  double activations = 0;      // the activation arena for one micro-batch, backward scratch included
  double workspace = 0;        // backend scratch: the CPU's rounded tf32 operand copies; later
                               // the GEMM workspace on GPUs

  double total() const {
    return parameters + master_weights + gradients + optimizer_state + activations + workspace;
  }
  nlohmann::json to_json() const;
  std::string to_text() const;  // one role a line, in MiB, for the terminal
};

class Gpt {
 public:
  Gpt(const ModelConfig& cfg, Backend& backend, const PrecisionPolicy& policy = {});

  // GPT-2 initialisation: N(0, std) for weights and embeddings, std / sqrt(2 * n_layer) for the
  // projections into the residual stream, zero biases, unit LayerNorm gains; the rows of the
  // token embedding past the real vocabulary are zero. Deterministic in `seed`.
  void init_weights(uint64_t seed, double std);

  // One micro-batch: inputs and targets are host arrays of B*T token ids (B,T). Returns the
  // mean loss over the B*T positions. With dloss != 0 the classifier also leaves the logits'
  // gradient (scaled by dloss) in place, and backward() must follow before the next forward.
  float forward(const int32_t* inputs, const int32_t* targets, int B, int T, float dloss);
  // Accumulates parameter gradients of the last forward (which must have had dloss != 0).
  void backward();
  void zero_grad();

  const std::vector<ParamInfo>& params() const { return params_; }
  Tensor param(size_t i) const;
  Tensor grad(size_t i) const;
  Tensor param(const std::string& name) const;
  Tensor all_params() const;  // the whole slab as one flat tensor (padding included)
  Tensor all_grads() const;

  // Trainable parameters, counting the real vocabulary rows of the embedding only.
  int64_t num_params() const;
  // The same count from a config alone, in double so that absurd configs cannot overflow.
  static double param_count(const ModelConfig& cfg);
  // Training FLOPs per token as llm.c counts them: 6N for the matmuls (forward + backward) and
  // 6*L*C*T for attention scores and values.
  static double flops_per_token(const ModelConfig& cfg, int T);
  double flops_per_token(int T) const { return flops_per_token(cfg_, T); }

  // The backend memory a training run of this model needs, by role, predicted before anything
  // is allocated (micro-batches of (B, T)).
  static MemoryLedger plan_memory(const ModelConfig& cfg, int B, int T,
                                  const PrecisionPolicy& policy = {});

  size_t activation_bytes() const { return act_buf_.bytes(); }  // 0 before the first forward

  const ModelConfig& config() const { return cfg_; }
  int padded_vocab() const { return Vp_; }

 private:
  struct Layer {
    size_t ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb;
  };
  struct LayerActs {
    Tensor ln1, ln1_mean, ln1_rstd, qkv, atty, att, attproj, residual2, ln2, ln2_mean, ln2_rstd,
        fch, fch_gelu, fcproj, residual3;
  };
  void add_param(const std::string& name, Shape shape, bool decay, ParamInfo::Init init);
  void ensure_activations(int B, int T);

  ModelConfig cfg_;
  Backend& be_;
  PrecisionPolicy policy_;
  int L_, NH_, C_, V_, Vp_, maxT_;
  std::vector<ParamInfo> params_;
  size_t slab_elems_ = 0;
  size_t wte_, wpe_, lnfw_, lnfb_;
  std::vector<Layer> layers_;
  Buffer param_buf_, grad_buf_;

  // Activations, sized once for the largest (B, T) seen.
  int act_B_ = 0, act_T_ = 0;
  Buffer act_buf_;
  Tensor tokens_, targets_, encoded_, lnf_, lnf_mean_, lnf_rstd_, logits_, losses_;
  std::vector<LayerActs> acts_;
  // Gradient scratch for the backward pass, reused across layers.
  Tensor dresidual_, dln_, dqkv_, datty_, dfch_, dfch_gelu_;
  int cur_B_ = 0, cur_T_ = 0;
  bool grad_ready_ = false;
  std::vector<float> host_losses_;
};

}  // namespace mpt
