#include "model/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/rng.h"

namespace mpt {
namespace {

// Slab offsets are rounded up to this many elements (256 bytes of fp32), so that every tensor
// view satisfies the alignment GPU libraries want.
constexpr size_t kAlignElems = 64;

size_t align_up(size_t n) { return (n + kAlignElems - 1) / kAlignElems * kAlignElems; }

}  // namespace

Gpt::Gpt(const ModelConfig& cfg, Backend& backend, const PrecisionPolicy& policy)
    : cfg_(cfg),
      be_(backend),
      policy_(policy),
      L_(cfg.n_layer),
      NH_(cfg.n_head),
      C_(cfg.n_embd),
      V_(cfg.vocab_size),
      Vp_(cfg.padded_vocab()),
      maxT_(cfg.max_seq_len) {
  using I = ParamInfo::Init;
  const int64_t C = C_;
  wte_ = params_.size();
  add_param("transformer.wte.weight", {Vp_, C}, true, I::normal);
  wpe_ = params_.size();
  add_param("transformer.wpe.weight", {maxT_, C}, true, I::normal);
  for (int l = 0; l < L_; ++l) {
    const std::string p = "transformer.h." + std::to_string(l) + ".";
    Layer ly{};
    ly.ln1w = params_.size(); add_param(p + "ln_1.weight", {C}, false, I::ones);
    ly.ln1b = params_.size(); add_param(p + "ln_1.bias", {C}, false, I::zeros);
    ly.qkvw = params_.size(); add_param(p + "attn.c_attn.weight", {3 * C, C}, true, I::normal);
    ly.qkvb = params_.size(); add_param(p + "attn.c_attn.bias", {3 * C}, false, I::zeros);
    ly.attprojw = params_.size();
    add_param(p + "attn.c_proj.weight", {C, C}, true, I::normal_residual);
    ly.attprojb = params_.size(); add_param(p + "attn.c_proj.bias", {C}, false, I::zeros);
    ly.ln2w = params_.size(); add_param(p + "ln_2.weight", {C}, false, I::ones);
    ly.ln2b = params_.size(); add_param(p + "ln_2.bias", {C}, false, I::zeros);
    ly.fcw = params_.size(); add_param(p + "mlp.c_fc.weight", {4 * C, C}, true, I::normal);
    ly.fcb = params_.size(); add_param(p + "mlp.c_fc.bias", {4 * C}, false, I::zeros);
    ly.fcprojw = params_.size();
    add_param(p + "mlp.c_proj.weight", {C, 4 * C}, true, I::normal_residual);
    ly.fcprojb = params_.size(); add_param(p + "mlp.c_proj.bias", {C}, false, I::zeros);
    layers_.push_back(ly);
  }
  lnfw_ = params_.size();
  add_param("transformer.ln_f.weight", {C}, false, I::ones);
  lnfb_ = params_.size();
  add_param("transformer.ln_f.bias", {C}, false, I::zeros);

  param_buf_ = be_.allocate(slab_elems_ * sizeof(float));
  grad_buf_ = be_.allocate(slab_elems_ * sizeof(float));
}

void Gpt::add_param(const std::string& name, Shape shape, bool decay, ParamInfo::Init init) {
  params_.push_back({name, shape, slab_elems_, decay, init});
  slab_elems_ = align_up(slab_elems_ + static_cast<size_t>(shape.numel()));
}

Tensor Gpt::param(size_t i) const {
  return param_buf_.view(params_[i].offset * sizeof(float), DType::f32, params_[i].shape);
}
Tensor Gpt::grad(size_t i) const {
  return grad_buf_.view(params_[i].offset * sizeof(float), DType::f32, params_[i].shape);
}
Tensor Gpt::param(const std::string& name) const {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].name == name) return param(i);
  throw RuntimeError("no parameter named '" + name + "'");
}
Tensor Gpt::all_params() const {
  return param_buf_.view(0, DType::f32, {static_cast<int64_t>(slab_elems_)});
}
Tensor Gpt::all_grads() const {
  return grad_buf_.view(0, DType::f32, {static_cast<int64_t>(slab_elems_)});
}

int64_t Gpt::num_params() const {
  int64_t n = 0;
  for (const auto& p : params_) n += p.shape.numel();
  return n - static_cast<int64_t>(Vp_ - V_) * C_;  // padding rows are not parameters
}

double Gpt::param_count(const ModelConfig& cfg) {
  const double C = cfg.n_embd;
  return double(cfg.vocab_size) * C + double(cfg.max_seq_len) * C +
         cfg.n_layer * (12 * C * C + 13 * C) + 2 * C;
}

double Gpt::flops_per_token(const ModelConfig& cfg, int T) {
  return 6.0 * param_count(cfg) + 6.0 * cfg.n_layer * double(cfg.n_embd) * T;
}

MemoryLedger Gpt::plan_memory(const ModelConfig& cfg, int B, int T,
                              const PrecisionPolicy& policy) {
  // In double: absurd configs must give a large number, not an overflowed one.
  const double C = cfg.n_embd, L = cfg.n_layer, NH = cfg.n_head, Vp = cfg.padded_vocab();
  const double params = param_count(cfg) + (Vp - cfg.vocab_size) * C;  // padding rows are stored
  // Per token, as laid out in ensure_activations: 18C + 4 + NH*T floats per layer (attention
  // probabilities included), embeddings, final LayerNorm, logits, and the backward scratch.
  const double per_token = L * (18 * C + 4 + NH * T) + 16 * C + Vp + 5;
  MemoryLedger m;
  m.parameters = 4.0 * params;
  m.gradients = 4.0 * params;
  m.optimizer_state = 2 * 4.0 * params;
  m.activations = 4.0 * per_token * B * T;
  if (policy.matmul == MatmulPrecision::tf32) {
    // The CPU backend's three operand copies, each as large as the largest operand it holds:
    // activations or output gradients (the logits' are the largest), weights, activations.
    const double BT = double(B) * T;
    m.workspace = 4.0 * (std::max(BT * 4 * C, BT * Vp) + std::max(Vp * C, 4 * C * C) + BT * 4 * C);
  }
  return m;
}

nlohmann::json MemoryLedger::to_json() const {
  return {{"parameters", parameters},         {"master_weights", master_weights},
          {"gradients", gradients},           {"optimizer_state", optimizer_state},
          {"activations", activations},       {"workspace", workspace},
          {"total", total()}};
}

std::string MemoryLedger::to_text() const {
  std::string out;
  const std::pair<const char*, double> rows[] = {
      {"parameters", parameters},     {"master weights", master_weights},
      {"gradients", gradients},       {"optimizer state", optimizer_state},
      {"activations", activations},   {"workspace", workspace},
      {"total", total()}};
  for (const auto& [name, bytes] : rows) {
    char line[96];
    std::snprintf(line, sizeof line, "  %-16s %12.2f MiB\n", name, bytes / (1 << 20));
    out += line;
  }
  return out;
}

void Gpt::init_weights(uint64_t seed, double std) {
  Rng rng(seed);
  const double residual_std = std / std::sqrt(2.0 * L_);
  std::vector<float> host(slab_elems_, 0.0f);
  for (const auto& p : params_) {
    float* w = host.data() + p.offset;
    int64_t n = p.shape.numel();
    if (&p == &params_[wte_]) n = static_cast<int64_t>(V_) * C_;  // padded rows stay zero
    for (int64_t i = 0; i < n; ++i) {
      switch (p.init) {
        case ParamInfo::Init::normal: w[i] = static_cast<float>(rng.normal() * std); break;
        case ParamInfo::Init::normal_residual:
          w[i] = static_cast<float>(rng.normal() * residual_std);
          break;
        case ParamInfo::Init::zeros: w[i] = 0.0f; break;
        case ParamInfo::Init::ones: w[i] = 1.0f; break;
      }
    }
  }
  be_.copy_from_host(all_params(), host.data());
  zero_grad();
}

void Gpt::zero_grad() { be_.fill(all_grads(), 0.0f); }

void Gpt::ensure_activations(int B, int T) {
  if (B == act_B_ && T == act_T_) return;
  const int64_t b = B, t = T, C = C_, NH = NH_, Vp = Vp_;
  // Lay out every activation in one arena: first count, then cut views.
  struct Want {
    Tensor* dst;
    DType dtype;
    Shape shape;
  };
  std::vector<Want> wants;
  auto want = [&](Tensor* dst, Shape s, DType d = DType::f32) { wants.push_back({dst, d, s}); };
  acts_.assign(L_, LayerActs{});
  want(&tokens_, {b, t}, DType::i32);
  want(&targets_, {b, t}, DType::i32);
  want(&encoded_, {b, t, C});
  for (auto& a : acts_) {
    want(&a.ln1, {b, t, C});
    want(&a.ln1_mean, {b, t});
    want(&a.ln1_rstd, {b, t});
    want(&a.qkv, {b, t, 3 * C});
    want(&a.atty, {b, t, C});
    want(&a.att, {b, NH, t, t});
    want(&a.attproj, {b, t, C});
    want(&a.residual2, {b, t, C});
    want(&a.ln2, {b, t, C});
    want(&a.ln2_mean, {b, t});
    want(&a.ln2_rstd, {b, t});
    want(&a.fch, {b, t, 4 * C});
    want(&a.fch_gelu, {b, t, 4 * C});
    want(&a.fcproj, {b, t, C});
    want(&a.residual3, {b, t, C});
  }
  want(&lnf_, {b, t, C});
  want(&lnf_mean_, {b, t});
  want(&lnf_rstd_, {b, t});
  want(&logits_, {b, t, Vp});
  want(&losses_, {b, t});
  want(&dresidual_, {b, t, C});
  want(&dln_, {b, t, C});
  want(&dqkv_, {b, t, 3 * C});
  want(&datty_, {b, t, C});
  want(&dfch_, {b, t, 4 * C});
  want(&dfch_gelu_, {b, t, 4 * C});

  size_t total = 0;
  std::vector<size_t> offsets;
  for (const auto& w : wants) {
    offsets.push_back(total);
    total = align_up(total + static_cast<size_t>(w.shape.numel()));  // i32 and f32 are 4 bytes
  }
  act_buf_ = be_.allocate(total * 4);
  for (size_t i = 0; i < wants.size(); ++i)
    *wants[i].dst = act_buf_.view(offsets[i] * 4, wants[i].dtype, wants[i].shape);
  host_losses_.assign(static_cast<size_t>(B) * T, 0.0f);
  act_B_ = B;
  act_T_ = T;
}

float Gpt::forward(const int32_t* inputs, const int32_t* targets, int B, int T, float dloss) {
  MPT_CHECK(T >= 1 && T <= maxT_, "sequence longer than model.max_seq_len");
  ensure_activations(B, T);
  cur_B_ = B;
  cur_T_ = T;
  be_.copy_from_host(tokens_, inputs);
  be_.copy_from_host(targets_, targets);

  const MatmulPrecision mp = policy_.matmul;
  be_.embedding_forward(encoded_, tokens_, param(wte_), param(wpe_));  // (B,T,C)
  Tensor residual = encoded_;
  for (int l = 0; l < L_; ++l) {
    const Layer& w = layers_[l];
    LayerActs& a = acts_[l];
    be_.layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, residual, param(w.ln1w), param(w.ln1b));
    be_.matmul_forward(a.qkv, a.ln1, param(w.qkvw), param(w.qkvb), mp);  // (B,T,3C)
    be_.attention_forward(a.atty, a.att, a.qkv, NH_);  // (B,T,C)
    be_.matmul_forward(a.attproj, a.atty, param(w.attprojw), param(w.attprojb), mp);
    be_.residual_forward(a.residual2, residual, a.attproj);
    be_.layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, param(w.ln2w),
                          param(w.ln2b));
    be_.matmul_forward(a.fch, a.ln2, param(w.fcw), param(w.fcb), mp);  // (B,T,4C)
    be_.gelu_forward(a.fch_gelu, a.fch);
    be_.matmul_forward(a.fcproj, a.fch_gelu, param(w.fcprojw), param(w.fcprojb), mp);
    be_.residual_forward(a.residual3, a.residual2, a.fcproj);
    residual = a.residual3;
  }
  be_.layernorm_forward(lnf_, lnf_mean_, lnf_rstd_, residual, param(lnfw_), param(lnfb_));
  be_.matmul_forward(logits_, lnf_, param(wte_), Tensor(), mp);  // tied LM head: (B,T,Vp)
  be_.crossentropy_forward_backward(losses_, logits_, targets_, V_, dloss);
  grad_ready_ = dloss != 0.0f;

  be_.copy_to_host(host_losses_.data(), losses_);
  double sum = 0.0;
  for (float v : host_losses_) sum += v;
  return static_cast<float>(sum / static_cast<double>(host_losses_.size()));
}

void Gpt::backward() {
  MPT_CHECK(grad_ready_, "backward() needs a preceding forward() with dloss != 0");
  grad_ready_ = false;
  // logits_ now holds dlogits.
  const MatmulPrecision mp = policy_.matmul;
  be_.fill(dresidual_, 0.0f);
  const Tensor last = L_ > 0 ? acts_[L_ - 1].residual3 : encoded_;
  be_.matmul_backward(dln_, grad(wte_), Tensor(), logits_, lnf_, param(wte_), mp);
  be_.layernorm_backward(dresidual_, grad(lnfw_), grad(lnfb_), dln_, last, param(lnfw_),
                         lnf_mean_, lnf_rstd_);
  // dresidual_ holds d(residual stream) flowing down through the blocks.
  for (int l = L_ - 1; l >= 0; --l) {
    const Layer& w = layers_[l];
    LayerActs& a = acts_[l];
    const Tensor residual = l == 0 ? encoded_ : acts_[l - 1].residual3;
    be_.matmul_backward(dfch_gelu_, grad(w.fcprojw), grad(w.fcprojb), dresidual_, a.fch_gelu,
                        param(w.fcprojw), mp);
    be_.gelu_backward(dfch_, a.fch, dfch_gelu_);
    be_.matmul_backward(dln_, grad(w.fcw), grad(w.fcb), dfch_, a.ln2, param(w.fcw), mp);
    be_.layernorm_backward(dresidual_, grad(w.ln2w), grad(w.ln2b), dln_, a.residual2,
                           param(w.ln2w), a.ln2_mean, a.ln2_rstd);
    be_.matmul_backward(datty_, grad(w.attprojw), grad(w.attprojb), dresidual_, a.atty,
                        param(w.attprojw), mp);
    be_.attention_backward(dqkv_, datty_, a.qkv, a.att, NH_);
    be_.matmul_backward(dln_, grad(w.qkvw), grad(w.qkvb), dqkv_, a.ln1, param(w.qkvw), mp);
    be_.layernorm_backward(dresidual_, grad(w.ln1w), grad(w.ln1b), dln_, residual, param(w.ln1w),
                           a.ln1_mean, a.ln1_rstd);
  }
  be_.embedding_backward(grad(wte_), grad(wpe_), dresidual_, tokens_);
}

}  // namespace mpt
