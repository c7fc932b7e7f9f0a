// GPT-2: token + learned position embeddings, pre-LayerNorm blocks of causal multi-head
// attention and a 4x tanh-GELU MLP, a final LayerNorm, and an LM head tied to the token
// embedding (Radford et al., "Language Models are Unsupervised Multitask Learners", 2019).
// Forward and backward are written once, against the Backend interface.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "precision/fp8_scaling.h"
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

// Predicted backend memory of a training run, by role, in bytes, for the policy's dtypes.
struct MemoryLedger {
  double parameters = 0;       // the weights the ops read
  double master_weights = 0;   // an fp32 copy kept beside low-precision weights
  double gradients = 0;
  double optimizer_state = 0;  // AdamW's two moments
  double activations = 0;      // the activation arena for one micro-batch, backward scratch included
  double workspace = 0;        // backend scratch: the CPU's fp32 staging of low-precision
                               // tensors and its tf32/fp8 operand copies, or on a GPU the
                               // CUDA context's (cuda_workspace_bytes, model/cuda_workspace.h)

  double total() const {
    return parameters + master_weights + gradients + optimizer_state + activations + workspace;
  }
  nlohmann::json to_json() const;
  std::string to_text() const;  // one role a line, in MiB, for the terminal
};

// Where the first non-finite value of a traced pass appeared (Gpt::trace_nonfinite).
struct NonFiniteSite {
  int layer = -1;       // transformer block, -1 outside the blocks (embedding, head, loss)
  std::string op;       // e.g. "matmul_forward", "layernorm_backward"
  std::string tensor;   // the output that held it, e.g. "fc", "dresidual"
  bool backward = false;
  int64_t count = 0;    // non-finite elements in that tensor
};

// fp8 scaling of one linear layer's GEMMs: scalers for its input, weight and output gradient,
// and the amaxes seen in the current optimizer step (recorded by Gpt::end_step()).
struct Fp8Gemm {
  std::string group;  // "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"
  int layer = -1;
  Fp8TensorScaler inp, weight, dout;
  float amax_inp = 0, amax_weight = 0, amax_dout = 0;  // this step's, NaN-propagating max
  float used_scale_inp = 1, used_scale_weight = 1;       // the latest forward's, for backward
};

// Activations the backward recomputes instead of keeping them from the forward (as llm.c's
// -r 1 and -r 2): GELU's output (4C a token and block), and also the two LayerNorms' outputs
// (2C). Blocks in fp8 keep neither already (their GEMMs' backward reads quantised copies). The
// results are those of keeping them: the same ops on the same inputs, with cast counting paused
// (on a GPU under tf32 up to rounding: the GELU a recomputing block's forward takes is
// gelu_forward's, MatmulSpec::exact_gelu, where it would come from cuBLASLt's epilogue).
enum class Recompute { none, gelu, gelu_layernorm };
// From training.recompute's value ("none", "gelu", "gelu+layernorm"); RuntimeError otherwise.
Recompute recompute_from_name(const std::string& name);
// MPT_FP8_PRODUCERS's value: unset, empty or "1" true, "0" false; anything else throws
// InputError naming it (Gpt::fp8_producers_).
bool fp8_producers_from_env(const char* env);

class Gpt {
 public:
  Gpt(const ModelConfig& cfg, Backend& backend, const PrecisionPolicy& policy = {},
      Recompute recompute = Recompute::none);
  // Whether the forward stores the fp8 blocks' LayerNorm and GELU outputs quantised for their
  // GEMMs (forward() says how): under fp8 with delayed scaling (current scaling needs the values
  // before the scale) and 16-bit activations (with fp32 ones the CPU backend would need staging
  // the memory ledger does not plan), unless MPT_FP8_PRODUCERS was 0 when the model was made.
  // Not while tracing non-finite values either.
  bool fp8_producers() const {
    return fp8_producers_ && policy_.matmul == MatmulPrecision::fp8 &&
           policy_.fp8.scaling.recipe != "current" && policy_.activation != DType::f32;
  }
  // Collects amax reports still pending: the backend holds pointers into this model.
  ~Gpt();
  Gpt(Gpt&&) = default;

  // GPT-2 initialisation: N(0, std) for weights and embeddings, std / sqrt(2 * n_layer) for the
  // projections into the residual stream, zero biases, unit LayerNorm gains; the rows of the
  // token embedding past the real vocabulary are zero. Deterministic in `seed`. The values are
  // drawn in fp32 and rounded into the policy's parameter dtype (kept in fp32 in the master).
  void init_weights(uint64_t seed, double std);

  // One micro-batch: inputs and targets are host arrays of B*T token ids (B,T). Returns the
  // mean loss over the B*T positions. With dloss != 0 the classifier also leaves the logits'
  // gradient (scaled by dloss) in place, and backward() must follow before the next forward.
  // dloss carries the loss scale: gradients come out multiplied by it.
  float forward(const int32_t* inputs, const int32_t* targets, int B, int T, float dloss);
  // Accumulates parameter gradients of the last forward (which must have had dloss != 0).
  void backward();
  void zero_grad();
  // Ends an optimizer step (taken or skipped): fp8 scalers record the step's amaxes.
  void end_step();

  const std::vector<ParamInfo>& params() const { return params_; }
  const PrecisionPolicy& policy() const { return policy_; }
  // The weights the ops read (the policy's param dtype).
  Tensor param(size_t i) const;
  Tensor param(const std::string& name) const;
  // The fp32 master copy; undefined when the policy keeps none.
  Tensor master(size_t i) const;
  // What the optimizer updates and checkpoints hold: the master when there is one. Not after
  // release_master() (the optimizer holds the master then).
  Tensor weights(size_t i) const;
  Tensor grad(size_t i) const;  // the policy's grad dtype
  Tensor all_params() const;  // the whole slab as one flat tensor (padding included)
  Tensor all_master() const;  // undefined without a master
  Tensor all_grads() const;
  // Rewrites the parameters from the master (after the master was loaded from a checkpoint).
  void sync_params_from_master();
  // Frees the master copy, for an optimizer that keeps (its part of) it from now on: ZeRO-1
  // (AdamW::take_master_shard). Afterwards master(), all_master() and weights() refuse.
  void release_master();

  // Trainable parameters, counting the real vocabulary rows of the embedding only.
  int64_t num_params() const;
  // The same count from a config alone, in double so that absurd configs cannot overflow.
  static double param_count(const ModelConfig& cfg);
  // Training FLOPs per token as llm.c counts them: 6N for the matmuls (forward + backward) and
  // 6*L*C*T for attention scores and values.
  static double flops_per_token(const ModelConfig& cfg, int T);
  double flops_per_token(int T) const { return flops_per_token(cfg_, T); }

  // The backend memory a training run of this model needs, by role, predicted before anything
  // is allocated (micro-batches of (B, T)). The workspace is the CPU backend's; the trainer
  // replaces it with cuda_workspace_bytes() on a GPU.
  // One process of `processes` training together: 16-bit gradients then need an fp32 copy for
  // the all-reduce (GradientReducer); under ZeRO-1 (`zero`) the master weights and optimizer
  // state are those of the largest range (zero_ranges in optim/adamw.h).
  static MemoryLedger plan_memory(const ModelConfig& cfg, int B, int T,
                                  const PrecisionPolicy& policy = {}, int processes = 1,
                                  bool zero = false, Recompute recompute = Recompute::none);

  // How many of the model's blocks recompute under `recompute` (the blocks not in fp8).
  static int recomputing_blocks(const ModelConfig& cfg, const PrecisionPolicy& policy,
                                Recompute recompute);

  size_t activation_bytes() const { return act_buf_.bytes(); }  // 0 before the first forward
  size_t parameter_bytes() const { return param_buf_.bytes(); }
  size_t master_bytes() const { return master_buf_.bytes(); }
  size_t gradient_bytes() const { return grad_buf_.bytes(); }

  const ModelConfig& config() const { return cfg_; }
  int padded_vocab() const { return Vp_; }

  // ---- numerics health
  // While on, every op's output is checked for NaN/inf after the op, and the first one found
  // is kept (first_nonfinite()). For replaying a step that went non-finite: costs one pass
  // over every output.
  void trace_nonfinite(bool on);
  const std::optional<NonFiniteSite>& first_nonfinite() const { return first_nonfinite_; }

  // fp8 GEMMs (empty unless the policy's matmul is fp8), their scaling state for checkpoints.
  const std::vector<Fp8Gemm>& fp8_gemms() const { return fp8_; }
  // This step's amaxes of every fp8 GEMM as one flat array (input, weight, output gradient per
  // GEMM), and back: data-parallel ranks max-reduce them before end_step(), so that every rank
  // records the amax of the global batch and keeps the same scales.
  // Reading them first collects what the GEMMs reported (Backend::collect_stats()).
  std::vector<float> fp8_step_amaxes();
  void set_fp8_step_amaxes(const std::vector<float>& amaxes);
  nlohmann::json fp8_state() const;
  void load_fp8_state(const nlohmann::json& j);  // InputError when it does not fit this model

 private:
  struct Layer {
    size_t ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb;
  };
  // The projections' outputs have no tensors of their own: they go straight into the residual
  // stream (matmul_residual_forward).
  struct LayerActs {
    Tensor ln1, ln1_mean, ln1_rstd, qkv, atty, att_lse, residual2, ln2, ln2_mean, ln2_rstd, fch,
        fch_gelu, residual3;
    // Under fp8: the four GEMMs' quantised inputs (ln1, atty, ln2, fch_gelu), which the
    // forward leaves for the backward (MatmulSpec::inp_cache); undefined for a block kept out
    // of fp8. In an fp8 block ln1, ln2 and fch_gelu are views of buffers shared by the fp8
    // blocks (the backward reads their quantised copies only).
    std::array<Tensor, 4> fp8_inp;
  };
  // Whether block l of L runs its linear layers in fp8 under `policy`.
  static bool block_in_fp8(const PrecisionPolicy& policy, int l, int L);
  // Whether block l's backward recomputes its GELU output / LayerNorm outputs.
  static bool recomputes_gelu(const PrecisionPolicy& policy, Recompute r, int l, int L);
  static bool recomputes_ln(const PrecisionPolicy& policy, Recompute r, int l, int L);
  // The activation arena of (B, T): calls want(target, dtype, shape) for each tensor in order.
  // `self` null: only the dtypes and shapes matter (plan_memory).
  template <class F>
  static void activation_layout(const ModelConfig& cfg, const PrecisionPolicy& policy,
                                Recompute recompute, int B, int T, Gpt* self, F&& want);
  void add_param(const std::string& name, Shape shape, bool decay, ParamInfo::Init init);
  void ensure_activations(int B, int T);
  Tensor slab_view(const Buffer& buf, DType dtype, size_t i) const;
  // The GEMM settings of a linear layer (`gemm` indexes fp8_; -1 for a GEMM not in fp8): the
  // forward passes inp and weight, the backward dout. When training, the amaxes of those
  // operands are recorded: reported by the GEMM (delayed scaling, amax_reports_) or computed
  // before it (current scaling).
  MatmulSpec gemm_spec(int gemm, Tensor inp, Tensor weight, Tensor dout);
  void check(int layer, const char* op, const char* name, Tensor t, bool backward);

  ModelConfig cfg_;
  Backend& be_;
  PrecisionPolicy policy_;
  Recompute recompute_;
  int L_, NH_, C_, V_, Vp_, maxT_;
  // MPT_FP8_PRODUCERS when the model was made: 0 keeps the 16-bit LayerNorm and GELU outputs
  // (the same results; for measuring what storing them quantised saves). fp8_producers().
  bool fp8_producers_;
  std::vector<ParamInfo> params_;
  size_t slab_elems_ = 0;
  size_t wte_, wpe_, lnfw_, lnfb_;
  std::vector<Layer> layers_;
  Buffer param_buf_, master_buf_, grad_buf_;
  bool master_released_ = false;

  // fp8: per layer, the indices into fp8_ of its four GEMMs (-1: that GEMM is not fp8), and the
  // LM head's.
  std::vector<std::array<int, 4>> layer_gemms_;
  int head_gemm_ = -1;
  std::vector<Fp8Gemm> fp8_;
  bool recording_ = false;  // this forward/backward belongs to a training step
  // The amaxes fp8 GEMMs report under delayed scaling: one entry per operand and call, written
  // by the backend (a GPU backend only at collect_stats(), so that no GEMM waits for its amax),
  // then folded into fp8_'s step amaxes by fold_amax_reports(). A deque: the backend holds
  // pointers to the values until it writes them.
  struct AmaxReport {
    int gemm, operand;  // operand: 0 inp, 1 weight, 2 dout
    float value;
  };
  std::deque<AmaxReport> amax_reports_;
  void fold_amax(int gemm, int operand, float amax);
  void fold_amax_reports();

  // Activations, sized once for the largest (B, T) seen.
  int act_B_ = 0, act_T_ = 0;
  Buffer act_buf_;
  Tensor tokens_, targets_, encoded_, lnf_, lnf_mean_, lnf_rstd_, logits_, losses_;
  Tensor fp8_lnf_;  // the LM head's quantised input, when its GEMM is in fp8
  // The fp8 blocks' LayerNorm outputs (ln1, ln2) and GELU output, shared (activation_layout).
  Tensor fp8_block_ln_, fp8_block_gelu_;
  // The same for the blocks that recompute them (training.recompute): written by the forward,
  // used by the GEMM after it, and written again by the backward before the GEMM that needs it.
  Tensor recompute_ln_, recompute_gelu_;
  std::vector<LayerActs> acts_;
  // Gradient scratch for the backward pass, reused across layers.
  Tensor dresidual_, dln_, dqkv_, datty_, dfch_;
  int cur_B_ = 0, cur_T_ = 0;
  bool grad_ready_ = false;
  std::vector<float> host_losses_;

  bool tracing_ = false;
  std::optional<NonFiniteSite> first_nonfinite_;
};

}  // namespace mpt
