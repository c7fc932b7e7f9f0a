#include "model/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/rng.h"

namespace mpt {
namespace {

// Slab offsets are rounded up to this many elements (256 bytes of fp32, 128 of bf16), so that
// every tensor view satisfies the alignment GPU libraries want (16 bytes for cuBLASLt).
constexpr size_t kAlignElems = 64;

size_t align_up(size_t n) { return (n + kAlignElems - 1) / kAlignElems * kAlignElems; }

}  // namespace

Recompute recompute_from_name(const std::string& name) {
  if (name == "none") return Recompute::none;
  if (name == "gelu") return Recompute::gelu;
  if (name == "gelu+layernorm") return Recompute::gelu_layernorm;
  throw RuntimeError("training.recompute '" + name + "': not none, gelu or gelu+layernorm");
}

bool fp8_producers_from_env(const char* env) {
  if (!env || !*env || std::strcmp(env, "1") == 0) return true;
  if (std::strcmp(env, "0") == 0) return false;
  throw InputError(std::string("MPT_FP8_PRODUCERS: expected 0 or 1, got '") + env + "'");
}

Gpt::Gpt(const ModelConfig& cfg, Backend& backend, const PrecisionPolicy& policy,
         Recompute recompute)
    : cfg_(cfg),
      be_(backend),
      policy_(policy),
      recompute_(recompute),
      L_(cfg.n_layer),
      NH_(cfg.n_head),
      C_(cfg.n_embd),
      V_(cfg.vocab_size),
      Vp_(cfg.padded_vocab()),
      maxT_(cfg.max_seq_len),
      fp8_producers_(fp8_producers_from_env(std::getenv("MPT_FP8_PRODUCERS"))) {
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

  param_buf_ = be_.allocate(slab_elems_ * dtype_size(policy_.param));
  if (policy_.master_weights) {
    MPT_CHECK(policy_.param != DType::f32, "a master copy of fp32 weights");
    master_buf_ = be_.allocate(slab_elems_ * sizeof(float));
  }
  grad_buf_ = be_.allocate(slab_elems_ * dtype_size(policy_.grad));

  // fp8 GEMMs: every linear layer of the blocks, except the first and last blocks when asked to
  // keep them in bf16; the tied LM head only when asked for.
  layer_gemms_.assign(L_, {-1, -1, -1, -1});
  if (policy_.matmul == MatmulPrecision::fp8) {
    const Fp8Recipe& r = policy_.fp8;
    auto add = [&](const std::string& group, int layer) {
      fp8_.push_back(Fp8Gemm{group, layer,
                             Fp8TensorScaler(r.scaling, Fp8Format::e4m3),
                             Fp8TensorScaler(r.scaling, Fp8Format::e4m3),
                             Fp8TensorScaler(r.scaling, r.hybrid ? Fp8Format::e5m2
                                                                 : Fp8Format::e4m3)});
      return static_cast<int>(fp8_.size() - 1);
    };
    static const char* kGroups[4] = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"};
    for (int l = 0; l < L_; ++l) {
      if (!block_in_fp8(policy_, l, L_)) continue;
      for (int g = 0; g < 4; ++g) layer_gemms_[l][g] = add(kGroups[g], l);
    }
    if (r.lm_head_fp8) head_gemm_ = add("lm_head", -1);
  }
}

void Gpt::add_param(const std::string& name, Shape shape, bool decay, ParamInfo::Init init) {
  params_.push_back({name, shape, slab_elems_, decay, init});
  slab_elems_ = align_up(slab_elems_ + static_cast<size_t>(shape.numel()));
}

Tensor Gpt::slab_view(const Buffer& buf, DType dtype, size_t i) const {
  if (!buf.data()) return Tensor();
  return buf.view(params_[i].offset * dtype_size(dtype), dtype, params_[i].shape);
}
Tensor Gpt::param(size_t i) const { return slab_view(param_buf_, policy_.param, i); }
Tensor Gpt::master(size_t i) const {
  MPT_CHECK(!master_released_, "the model's master copy was moved to the optimizer");
  return slab_view(master_buf_, DType::f32, i);
}
Tensor Gpt::weights(size_t i) const {
  MPT_CHECK(!master_released_, "the model's master copy was moved to the optimizer");
  return master_buf_.data() ? master(i) : param(i);
}
void Gpt::release_master() {
  master_buf_ = Buffer();
  master_released_ = true;
}
Tensor Gpt::grad(size_t i) const { return slab_view(grad_buf_, policy_.grad, i); }
Tensor Gpt::param(const std::string& name) const {
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].name == name) return param(i);
  throw RuntimeError("no parameter named '" + name + "'");
}
Tensor Gpt::all_params() const {
  return param_buf_.view(0, policy_.param, {static_cast<int64_t>(slab_elems_)});
}
Tensor Gpt::all_master() const {
  MPT_CHECK(!master_released_, "the model's master copy was moved to the optimizer");
  if (!master_buf_.data()) return Tensor();
  return master_buf_.view(0, DType::f32, {static_cast<int64_t>(slab_elems_)});
}
Tensor Gpt::all_grads() const {
  return grad_buf_.view(0, policy_.grad, {static_cast<int64_t>(slab_elems_)});
}

void Gpt::sync_params_from_master() {
  MPT_CHECK(!master_released_, "the model's master copy was moved to the optimizer");
  if (master_buf_.data()) be_.cast(all_params(), all_master(), TensorClass::weight);
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

namespace {

// Bytes of an arena whose tensors start on 256-byte boundaries (as in ensure_activations).
constexpr double kArenaAlign = 256;
double arena_align(double bytes) { return std::ceil(bytes / kArenaAlign) * kArenaAlign; }

}  // namespace

bool Gpt::block_in_fp8(const PrecisionPolicy& policy, int l, int L) {
  return policy.matmul == MatmulPrecision::fp8 &&
         !(policy.fp8.first_last_blocks_bf16 && (l == 0 || l == L - 1));
}

bool Gpt::recomputes_gelu(const PrecisionPolicy& policy, Recompute r, int l, int L) {
  return r != Recompute::none && !block_in_fp8(policy, l, L);
}

bool Gpt::recomputes_ln(const PrecisionPolicy& policy, Recompute r, int l, int L) {
  return r == Recompute::gelu_layernorm && !block_in_fp8(policy, l, L);
}

int Gpt::recomputing_blocks(const ModelConfig& cfg, const PrecisionPolicy& policy,
                            Recompute recompute) {
  int n = 0;
  for (int l = 0; l < cfg.n_layer; ++l) n += recomputes_gelu(policy, recompute, l, cfg.n_layer);
  return n;
}

template <class F>
void Gpt::activation_layout(const ModelConfig& cfg, const PrecisionPolicy& policy,
                            Recompute recompute, int B, int T, Gpt* self, F&& want) {
  const DType act = policy.activation;
  const int64_t b = B, t = T, C = cfg.n_embd, NH = cfg.n_head, Vp = cfg.padded_vocab();
  auto at = [&](auto member) -> Tensor* { return self ? &(self->*member) : nullptr; };
  want(at(&Gpt::tokens_), DType::i32, Shape{b, t});
  want(at(&Gpt::targets_), DType::i32, Shape{b, t});
  want(at(&Gpt::encoded_), act, Shape{b, t, C});
  bool any_fp8_block = false, any_gelu_recomputed = false, any_ln_recomputed = false;
  for (int l = 0; l < cfg.n_layer; ++l) {
    LayerActs* a = self ? &self->acts_[l] : nullptr;
    auto in = [&](Tensor LayerActs::*m) -> Tensor* { return a ? &(a->*m) : nullptr; };
    // In an fp8 block the LayerNorm outputs and the GELU's output feed only the block's fp8
    // GEMMs, whose backward reads the quantised copies (fp8_inp below), not these: they live in
    // buffers all fp8 blocks share, each value used by the GEMM right after its producer. A
    // block that recomputes them shares buffers of its own kind the same way.
    const bool q8 = block_in_fp8(policy, l, cfg.n_layer);
    const bool re_gelu = recomputes_gelu(policy, recompute, l, cfg.n_layer);
    const bool re_ln = recomputes_ln(policy, recompute, l, cfg.n_layer);
    any_fp8_block |= q8;
    any_gelu_recomputed |= re_gelu;
    any_ln_recomputed |= re_ln;
    const bool keeps_ln = !q8 && !re_ln, keeps_gelu = !q8 && !re_gelu;
    if (keeps_ln) want(in(&LayerActs::ln1), act, Shape{b, t, C});
    want(in(&LayerActs::ln1_mean), DType::f32, Shape{b, t});  // LayerNorm statistics: fp32
    want(in(&LayerActs::ln1_rstd), DType::f32, Shape{b, t});
    want(in(&LayerActs::qkv), act, Shape{b, t, 3 * C});
    want(in(&LayerActs::atty), act, Shape{b, t, C});
    want(in(&LayerActs::att_lse), DType::f32, Shape{b, NH, t});  // softmax log-sum-exp: fp32
    want(in(&LayerActs::residual2), act, Shape{b, t, C});
    if (keeps_ln) want(in(&LayerActs::ln2), act, Shape{b, t, C});
    want(in(&LayerActs::ln2_mean), DType::f32, Shape{b, t});
    want(in(&LayerActs::ln2_rstd), DType::f32, Shape{b, t});
    want(in(&LayerActs::fch), act, Shape{b, t, 4 * C});
    if (keeps_gelu) want(in(&LayerActs::fch_gelu), act, Shape{b, t, 4 * C});
    want(in(&LayerActs::residual3), act, Shape{b, t, C});
  }
  want(at(&Gpt::lnf_), act, Shape{b, t, C});
  want(at(&Gpt::lnf_mean_), DType::f32, Shape{b, t});
  want(at(&Gpt::lnf_rstd_), DType::f32, Shape{b, t});
  want(at(&Gpt::logits_), act, Shape{b, t, Vp});
  want(at(&Gpt::losses_), DType::f32, Shape{b, t});
  // Backward scratch: activation gradients, in the activation dtype.
  want(at(&Gpt::dresidual_), act, Shape{b, t, C});
  want(at(&Gpt::dln_), act, Shape{b, t, C});
  want(at(&Gpt::dqkv_), act, Shape{b, t, 3 * C});
  want(at(&Gpt::datty_), act, Shape{b, t, C});
  want(at(&Gpt::dfch_), act, Shape{b, t, 4 * C});
  if (any_fp8_block) {
    want(at(&Gpt::fp8_block_ln_), act, Shape{b, t, C});
    want(at(&Gpt::fp8_block_gelu_), act, Shape{b, t, 4 * C});
  }
  if (any_ln_recomputed) want(at(&Gpt::recompute_ln_), act, Shape{b, t, C});
  if (any_gelu_recomputed) want(at(&Gpt::recompute_gelu_), act, Shape{b, t, 4 * C});
  // fp8: each fp8 GEMM's quantised input, kept from the forward for the backward (one byte an
  // element: the backward's pass over inp to quantise it again is spared).
  const DType q = policy.fp8.forward_format();
  for (int l = 0; l < cfg.n_layer; ++l) {
    if (!block_in_fp8(policy, l, cfg.n_layer)) continue;
    LayerActs* a = self ? &self->acts_[l] : nullptr;
    const int64_t width[4] = {C, C, C, 4 * C};  // ln1, atty, ln2, fch_gelu
    for (int g = 0; g < 4; ++g) want(a ? &a->fp8_inp[g] : nullptr, q, Shape{b, t, width[g]});
  }
  if (policy.matmul == MatmulPrecision::fp8 && policy.fp8.lm_head_fp8)
    want(at(&Gpt::fp8_lnf_), q, Shape{b, t, C});
}

MemoryLedger Gpt::plan_memory(const ModelConfig& cfg, int B, int T,
                              const PrecisionPolicy& policy, int processes, bool zero,
                              Recompute recompute) {
  // In double: absurd configs must give a large number, not an overflowed one.
  const double C = cfg.n_embd, Vp = cfg.padded_vocab(), maxT = cfg.max_seq_len;
  // The slab as laid out by add_param: each tensor rounded up to kAlignElems elements.
  double slab = 0;
  auto add = [&](double n) { slab = std::ceil((slab + n) / kAlignElems) * kAlignElems; };
  add(Vp * C);
  add(maxT * C);
  for (int l = 0; l < cfg.n_layer; ++l)
    for (double n : {C, C, 3 * C * C, 3 * C, C * C, C, C, C, 4 * C * C, 4 * C, 4 * C * C, C})
      add(n);
  add(C);
  add(C);
  MemoryLedger m;
  m.parameters = slab * dtype_size(policy.param);
  // ZeRO-1: a process keeps one range of the slab (64-element multiples, as zero_ranges splits).
  const double kept =
      zero && processes > 1 ? std::min(slab, std::ceil(std::ceil(slab / processes) / 64) * 64)
                            : slab;
  m.master_weights = policy.master_weights ? kept * 4.0 : 0.0;
  m.gradients = slab * dtype_size(policy.grad);
  if (processes > 1 && policy.grad != DType::f32) m.gradients += slab * 4.0;  // the fp32 sum
  m.optimizer_state = 2 * kept * dtype_size(policy.optimizer_state);
  activation_layout(cfg, policy, recompute, B, T, nullptr, [&](Tensor*, DType d, Shape s) {
    double n = 1;
    for (int i = 0; i < s.ndim; ++i) n *= static_cast<double>(s.dims[i]);
    m.activations = arena_align(m.activations + n * dtype_size(d));
  });

  // The CPU backend's scratch (CpuBackend::Slot): fp32 staging of every low-precision tensor
  // an op reads or writes, one buffer per argument role, each as large as the largest tensor
  // that role sees; and copies of fp32 matmul operands rounded to tf32 or quantised to fp8.
  const double BT = double(B) * T;
  const double big_act = BT * std::max(4 * C, Vp);  // logits or MLP activations
  const double big_w = std::max({Vp * C, 4 * C * C, maxT * C});
  const double small_w = std::max(maxT * C, 4 * C);
  double ws = 0;
  if (policy.activation != DType::f32) ws += 2 * big_act + BT * 4 * C + BT * C;  // out, in0-2
  if (policy.param != DType::f32) ws += big_w + small_w;                        // weight, bias
  if (policy.grad != DType::f32) ws += big_w + small_w;                         // grad0, grad1
  const bool head_rounded = policy.matmul == MatmulPrecision::tf32 ||
                            (policy.matmul == MatmulPrecision::fp8 && policy.fp8.lm_head_fp8);
  if (policy.matmul != MatmulPrecision::native) {
    if (policy.activation == DType::f32)
      ws += BT * (head_rounded ? std::max(4 * C, Vp) : 4 * C) + BT * 4 * C;  // inp/dout, inp
    if (policy.param == DType::f32) ws += head_rounded ? std::max(Vp * C, 4 * C * C) : 4 * C * C;
  }
  m.workspace = 4.0 * ws;
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
  if (master_buf_.data()) {
    be_.copy_from_host(all_master(), host.data());
    sync_params_from_master();
  } else if (policy_.param == DType::f32) {
    be_.copy_from_host(all_params(), host.data());
  } else {
    Buffer staging = be_.allocate(slab_elems_ * sizeof(float));
    const Tensor f32 = staging.view(0, DType::f32, {static_cast<int64_t>(slab_elems_)});
    be_.copy_from_host(f32, host.data());
    be_.cast(all_params(), f32, TensorClass::weight);
  }
  be_.reset_cast_counts();  // initialisation is not training
  zero_grad();
}

void Gpt::zero_grad() { be_.fill(all_grads(), 0.0f); }

void Gpt::ensure_activations(int B, int T) {
  if (B == act_B_ && T == act_T_) return;
  acts_.assign(L_, LayerActs{});
  // Lay out every activation in one arena: first count, then cut views.
  struct Want {
    Tensor* dst;
    size_t offset;
    DType dtype;
    Shape shape;
  };
  std::vector<Want> wants;
  size_t total = 0;
  activation_layout(cfg_, policy_, recompute_, B, T, this, [&](Tensor* dst, DType d, Shape s) {
    wants.push_back({dst, total, d, s});
    total = static_cast<size_t>(arena_align(double(total) + double(s.numel()) * dtype_size(d)));
  });
  act_buf_ = be_.allocate(total);
  for (const auto& w : wants) *w.dst = act_buf_.view(w.offset, w.dtype, w.shape);
  for (int l = 0; l < L_; ++l) {
    if (block_in_fp8(policy_, l, L_)) {
      acts_[l].ln1 = acts_[l].ln2 = fp8_block_ln_;
      acts_[l].fch_gelu = fp8_block_gelu_;
    }
    if (recomputes_ln(policy_, recompute_, l, L_)) acts_[l].ln1 = acts_[l].ln2 = recompute_ln_;
    if (recomputes_gelu(policy_, recompute_, l, L_)) acts_[l].fch_gelu = recompute_gelu_;
  }
  host_losses_.assign(static_cast<size_t>(B) * T, 0.0f);
  act_B_ = B;
  act_T_ = T;
}

// ---- fp8 scaling and the GEMM settings

namespace {

// The larger of two amaxes, NaN when either is (a NaN anywhere must reach the record).
float amax_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : std::max(a, b); }

}  // namespace

MatmulSpec Gpt::gemm_spec(int gemm, Tensor inp, Tensor weight, Tensor dout) {
  if (gemm < 0) return policy_.unquantised_matmul();  // not an fp8 GEMM
  Fp8Gemm& g = fp8_[gemm];
  MatmulSpec spec(MatmulPrecision::fp8);
  spec.inp.format = spec.weight.format = policy_.fp8.forward_format();
  spec.dout.format = policy_.fp8.grad_format();
  // The backward quantises inp and weight again with the scales of the forward (the same fp8
  // values); only dout gets a scale of its own.
  spec.inp.scale = g.used_scale_inp;
  spec.weight.scale = g.used_scale_weight;
  spec.dout.scale = g.dout.scale();
  const bool current = policy_.fp8.scaling.recipe == "current";
  auto choose = [&](Tensor t, Fp8TensorScaler& scaler, Fp8Operand& op, int operand) {
    if (!t.defined()) return;
    if (current) {
      // From the tensor's own amax: one more reduction before the GEMM, no staleness.
      const float a = be_.amax(t);
      op.scale = scaler.scale_for_current(a);
      if (recording_) fold_amax(gemm, operand, a);
    } else {
      op.scale = scaler.scale();
      if (recording_) {  // the GEMM reports it as it quantises
        amax_reports_.push_back({gemm, operand, 0.0f});
        op.amax = &amax_reports_.back().value;
      }
    }
  };
  choose(inp, g.inp, spec.inp, 0);
  choose(weight, g.weight, spec.weight, 1);
  choose(dout, g.dout, spec.dout, 2);
  if (inp.defined()) g.used_scale_inp = spec.inp.scale;
  if (weight.defined()) g.used_scale_weight = spec.weight.scale;
  return spec;
}

Gpt::~Gpt() {
  if (amax_reports_.empty()) return;
  try {
    be_.collect_stats();
  } catch (...) {
    // A failing device: nothing more can be done here, and a destructor must not throw.
  }
}

void Gpt::fold_amax(int gemm, int operand, float amax) {
  Fp8Gemm& g = fp8_[gemm];
  float& step = operand == 0 ? g.amax_inp : operand == 1 ? g.amax_weight : g.amax_dout;
  step = amax_max(step, amax);
}

void Gpt::fold_amax_reports() {
  if (amax_reports_.empty()) return;
  be_.collect_stats();  // a GPU backend writes the reported values now
  for (const AmaxReport& r : amax_reports_) fold_amax(r.gemm, r.operand, r.value);
  amax_reports_.clear();
}

void Gpt::end_step() {
  fold_amax_reports();
  for (Fp8Gemm& g : fp8_) {
    g.inp.record(g.amax_inp);
    g.weight.record(g.amax_weight);
    g.dout.record(g.amax_dout);
    g.amax_inp = g.amax_weight = g.amax_dout = 0.0f;
  }
}

std::vector<float> Gpt::fp8_step_amaxes() {
  fold_amax_reports();
  std::vector<float> a;
  a.reserve(3 * fp8_.size());
  for (const Fp8Gemm& g : fp8_) a.insert(a.end(), {g.amax_inp, g.amax_weight, g.amax_dout});
  return a;
}

void Gpt::set_fp8_step_amaxes(const std::vector<float>& a) {
  MPT_CHECK(a.size() == 3 * fp8_.size(), "set_fp8_step_amaxes: wrong size");
  fold_amax_reports();  // nothing reported before this call may be added after it
  for (size_t i = 0; i < fp8_.size(); ++i) {
    fp8_[i].amax_inp = a[3 * i];
    fp8_[i].amax_weight = a[3 * i + 1];
    fp8_[i].amax_dout = a[3 * i + 2];
  }
}

nlohmann::json Gpt::fp8_state() const {
  nlohmann::json out = nlohmann::json::array();
  for (const Fp8Gemm& g : fp8_)
    out.push_back({{"group", g.group},
                   {"layer", g.layer},
                   {"inp", g.inp.state()},
                   {"weight", g.weight.state()},
                   {"dout", g.dout.state()}});
  return out;
}

void Gpt::load_fp8_state(const nlohmann::json& j) {
  if (!j.is_array() || j.size() != fp8_.size())
    throw InputError("fp8 scaling state: expected " + std::to_string(fp8_.size()) +
                     " GEMM entries, got " + (j.is_array() ? std::to_string(j.size()) : j.dump()));
  for (size_t i = 0; i < fp8_.size(); ++i) {
    const auto& e = j[i];
    if (!e.is_object() || e.value("group", "") != fp8_[i].group ||
        e.value("layer", -2) != fp8_[i].layer)
      throw InputError("fp8 scaling state: entry " + std::to_string(i) + " is " + e.dump(-1).substr(0, 80) +
                       ", expected GEMM " + fp8_[i].group + " of layer " +
                       std::to_string(fp8_[i].layer));
    fp8_[i].inp.load_state(e.at("inp"));
    fp8_[i].weight.load_state(e.at("weight"));
    fp8_[i].dout.load_state(e.at("dout"));
  }
}

// ---- tracing

void Gpt::trace_nonfinite(bool on) {
  tracing_ = on;
  first_nonfinite_.reset();
}

void Gpt::check(int layer, const char* op, const char* name, Tensor t, bool backward) {
  if (!tracing_ || first_nonfinite_) return;
  const int64_t bad = be_.count_nonfinite(t);
  if (bad > 0) first_nonfinite_ = NonFiniteSite{layer, op, name, backward, bad};
}

// ---- forward and backward

float Gpt::forward(const int32_t* inputs, const int32_t* targets, int B, int T, float dloss) {
  MPT_CHECK(T >= 1 && T <= maxT_, "sequence longer than model.max_seq_len");
  ensure_activations(B, T);
  cur_B_ = B;
  cur_T_ = T;
  be_.copy_ids_from_host(tokens_, inputs);
  be_.copy_ids_from_host(targets_, targets);
  recording_ = dloss != 0.0f;  // evaluation passes do not feed the fp8 amax histories

  // One linear layer: its GEMM spec (fp8 scales, amaxes recorded when training), the matmul;
  // with `gelu_out`, followed by GELU as one op (matmul_gelu_forward); with `residual`, out is
  // residual + the layer's output, as one op (matmul_residual_forward, `name` naming the sum).
  // A backend may fuse either.
  // `cache`: where an fp8 GEMM leaves its quantised input for the backward (training only).
  // `given`: the spec, when the producer of inp already took it (an output stored quantised).
  // `gelu_fp8`: gelu_out is an fp8 tensor, the GELU stored as it says (MatmulSpec::gelu_fp8).
  auto linear = [&](int layer, int gemm, const char* name, Tensor out, Tensor inp, size_t w,
                    Tensor bias, Tensor gelu_out, Tensor residual, Tensor cache,
                    const MatmulSpec* given = nullptr, const Fp8Output* gelu_fp8 = nullptr) {
    MatmulSpec spec = given ? *given : gemm_spec(gemm, inp, param(w), Tensor());
    if (gelu_fp8) spec.gelu_fp8 = *gelu_fp8;
    if (recording_ && gemm >= 0) spec.inp_cache = cache;
    // The backward computes this GELU again (training.recompute): both must be gelu_forward's.
    spec.exact_gelu = gelu_out.defined() && recomputes_gelu(policy_, recompute_, layer, L_);
    if (gelu_out.defined()) {
      be_.matmul_gelu_forward(gelu_out, out, inp, param(w), bias, spec);
      check(layer, "matmul_gelu_forward", name, out, false);
      check(layer, "matmul_gelu_forward", "gelu", gelu_out, false);
    } else if (residual.defined()) {
      be_.matmul_residual_forward(out, residual, inp, param(w), bias, spec);
      check(layer, "matmul_residual_forward", name, out, false);
    } else {
      be_.matmul_forward(out, inp, param(w), bias, spec);
      check(layer, "matmul_forward", name, out, false);
    }
  };

  // A LayerNorm whose output feeds only the fp8 GEMM after it (`gemm` >= 0; the backward reads
  // that GEMM's cache) is stored quantised for it (Backend::layernorm_forward_fp8), with the
  // scale the GEMM's spec takes now: the same values, counts and amax as storing `out` for the
  // GEMM to quantise, without the 16-bit copy's write and read. So is an fp8 block's GELU output
  // for mlp.c_proj (MatmulSpec::gelu_fp8). When fp8_producers() says so, and not while tracing
  // non-finite values (which reads the 16-bit outputs). Returns what the GEMM reads, and its
  // spec in *spec when fused.
  const bool fuse_fp8 = fp8_producers() && !tracing_;
  auto layernorm = [&](int layer, const char* name, Tensor out, Tensor mean, Tensor rstd,
                       Tensor inp, size_t lnw, size_t lnb, int gemm, size_t gemm_w,
                       std::optional<MatmulSpec>* spec) {
    if (gemm >= 0 && fuse_fp8) {
      *spec = gemm_spec(gemm, out, param(gemm_w), Tensor());
      const Tensor q(out.data, (*spec)->inp.format, out.shape);
      be_.layernorm_forward_fp8(q, mean, rstd, inp, param(lnw), param(lnb),
                                Fp8Output{out.dtype, (*spec)->inp});
      return q;
    }
    spec->reset();
    be_.layernorm_forward(out, mean, rstd, inp, param(lnw), param(lnb));
    check(layer, "layernorm_forward", name, out, false);
    return out;
  };
  std::optional<MatmulSpec> fused;
  auto given = [&]() { return fused ? &*fused : nullptr; };

  be_.embedding_forward(encoded_, tokens_, param(wte_), param(wpe_));  // (B,T,C)
  check(-1, "embedding_forward", "encoded", encoded_, false);
  Tensor residual = encoded_;
  for (int l = 0; l < L_; ++l) {
    const Layer& w = layers_[l];
    LayerActs& a = acts_[l];
    const auto& gm = layer_gemms_[l];
    const Tensor ln1 = layernorm(l, "ln_1", a.ln1, a.ln1_mean, a.ln1_rstd, residual, w.ln1w,
                                 w.ln1b, gm[0], w.qkvw, &fused);
    linear(l, gm[0], "attn.c_attn", a.qkv, ln1, w.qkvw, param(w.qkvb), Tensor(), Tensor(),
           a.fp8_inp[0], given());
    be_.attention_forward(a.atty, a.att_lse, a.qkv, NH_, policy_.unquantised_matmul());  // (B,T,C)
    check(l, "attention_forward", "attn", a.atty, false);
    // attn.c_proj, added to the residual stream
    linear(l, gm[1], "residual2", a.residual2, a.atty, w.attprojw, param(w.attprojb), Tensor(),
           residual, a.fp8_inp[1]);
    const Tensor ln2 = layernorm(l, "ln_2", a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, w.ln2w,
                                 w.ln2b, gm[2], w.fcw, &fused);
    // mlp.c_fc and its GELU, stored quantised for mlp.c_proj when fused.
    std::optional<MatmulSpec> proj;
    std::optional<Fp8Output> gelu_fp8;
    Tensor gelu = a.fch_gelu;
    if (gm[3] >= 0 && fuse_fp8) {
      proj = gemm_spec(gm[3], a.fch_gelu, param(w.fcprojw), Tensor());
      gelu_fp8 = Fp8Output{a.fch_gelu.dtype, proj->inp};
      gelu = Tensor(a.fch_gelu.data, proj->inp.format, a.fch_gelu.shape);
    }
    linear(l, gm[2], "mlp.c_fc", a.fch, ln2, w.fcw, param(w.fcb), gelu, Tensor(), a.fp8_inp[2],
           given(), gelu_fp8 ? &*gelu_fp8 : nullptr);
    // mlp.c_proj, added to the residual stream
    linear(l, gm[3], "residual3", a.residual3, gelu, w.fcprojw, param(w.fcprojb), Tensor(),
           a.residual2, a.fp8_inp[3], proj ? &*proj : nullptr);
    residual = a.residual3;
  }
  const Tensor lnf = layernorm(-1, "ln_f", lnf_, lnf_mean_, lnf_rstd_, residual, lnfw_, lnfb_,
                               head_gemm_, wte_, &fused);
  // The LM head (weights tied to wte) and the classifier: one op, which a backend may fuse,
  // except when tracing non-finite values, which needs the logits between the two (the fused op
  // gives the same bits, so tracing a step repeats it exactly).
  if (tracing_) {
    linear(-1, head_gemm_, "lm_head", logits_, lnf_, wte_, Tensor(), Tensor(), Tensor(),
           fp8_lnf_);
    be_.crossentropy_forward_backward(losses_, logits_, targets_, V_, dloss);
  } else {
    MatmulSpec spec = fused ? *fused : gemm_spec(head_gemm_, lnf_, param(wte_), Tensor());
    if (recording_ && head_gemm_ >= 0) spec.inp_cache = fp8_lnf_;
    be_.matmul_crossentropy(losses_, logits_, lnf, param(wte_), targets_, V_, dloss, spec);
  }
  check(-1, "crossentropy_forward_backward", "losses", losses_, false);
  if (dloss != 0.0f) check(-1, "crossentropy_forward_backward", "dlogits", logits_, true);
  grad_ready_ = dloss != 0.0f;

  be_.copy_to_host(host_losses_.data(), losses_);
  double sum = 0.0;
  for (float v : host_losses_) sum += v;
  return static_cast<float>(sum / static_cast<double>(host_losses_.size()));
}

void Gpt::backward() {
  MPT_CHECK(grad_ready_, "backward() needs a preceding forward() with dloss != 0");
  grad_ready_ = false;
  // The backward of one linear layer; dinp undefined for none. With `gelu_pre` (the GELU's
  // input that fed this layer), dinp is the gradient of that input: GELU's backward follows in
  // one op (matmul_backward_gelu, which a backend may fuse), and no buffer holds the gradient
  // of the GELU's output.
  // `cache`: the fp8 GEMM's quantised input, left by the forward.
  auto linear_back = [&](int layer, int gemm, const char* name, Tensor dinp, size_t w,
                         Tensor dbias, Tensor dout, Tensor inp, Tensor gelu_pre, Tensor cache) {
    MatmulSpec spec = gemm_spec(gemm, Tensor(), Tensor(), dout);
    if (recording_ && gemm >= 0) spec.inp_cache = cache;  // as the forward wrote it
    const char* op = gelu_pre.defined() ? "matmul_backward_gelu" : "matmul_backward";
    if (gelu_pre.defined())
      be_.matmul_backward_gelu(dinp, grad(w), dbias, dout, inp, param(w), gelu_pre, spec);
    else
      be_.matmul_backward(dinp, grad(w), dbias, dout, inp, param(w), spec);
    if (dinp.defined()) check(layer, op, name, dinp, true);
    check(layer, op, (std::string(name) + ".weight.grad").c_str(), grad(w), true);
  };

  // An activation the forward computed, computed again the same way (training.recompute).
  // Its narrowing casts were counted in the forward; a recomputed LayerNorm writes its mean and
  // rstd again, with the same values.
  auto recompute = [&](auto&& op) {
    struct Paused {  // counting as it was before, also after an exception
      Backend& be;
      bool was;
      ~Paused() { be.set_cast_counting(was); }
    } paused{be_, be_.cast_counting()};
    be_.set_cast_counting(false);
    op();
  };

  // logits_ now holds dlogits.
  be_.fill(dresidual_, 0.0f);
  const Tensor last = L_ > 0 ? acts_[L_ - 1].residual3 : encoded_;
  linear_back(-1, head_gemm_, "lm_head", dln_, wte_, Tensor(), logits_, lnf_, Tensor(),
              fp8_lnf_);
  be_.layernorm_backward(dresidual_, grad(lnfw_), grad(lnfb_), dln_, last, param(lnfw_),
                         lnf_mean_, lnf_rstd_);
  check(-1, "layernorm_backward", "dresidual", dresidual_, true);
  // dresidual_ holds d(residual stream) flowing down through the blocks.
  for (int l = L_ - 1; l >= 0; --l) {
    const Layer& w = layers_[l];
    LayerActs& a = acts_[l];
    const auto& gm = layer_gemms_[l];
    const Tensor residual = l == 0 ? encoded_ : acts_[l - 1].residual3;
    const bool re_gelu = recomputes_gelu(policy_, recompute_, l, L_);
    const bool re_ln = recomputes_ln(policy_, recompute_, l, L_);
    if (re_gelu) recompute([&] { be_.gelu_forward(a.fch_gelu, a.fch); });
    linear_back(l, gm[3], "mlp.c_proj", dfch_, w.fcprojw, grad(w.fcprojb), dresidual_,
                a.fch_gelu, a.fch, a.fp8_inp[3]);  // dfch_: d(fch), through GELU
    if (re_ln)
      recompute([&] {
        be_.layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, param(w.ln2w),
                              param(w.ln2b));
      });
    linear_back(l, gm[2], "mlp.c_fc", dln_, w.fcw, grad(w.fcb), dfch_, a.ln2, Tensor(),
                a.fp8_inp[2]);
    be_.layernorm_backward(dresidual_, grad(w.ln2w), grad(w.ln2b), dln_, a.residual2,
                           param(w.ln2w), a.ln2_mean, a.ln2_rstd);
    check(l, "layernorm_backward", "dresidual", dresidual_, true);
    linear_back(l, gm[1], "attn.c_proj", datty_, w.attprojw, grad(w.attprojb), dresidual_,
                a.atty, Tensor(), a.fp8_inp[1]);
    be_.attention_backward(dqkv_, datty_, a.qkv, a.att_lse, NH_, policy_.unquantised_matmul());
    check(l, "attention_backward", "dqkv", dqkv_, true);
    if (re_ln)
      recompute([&] {
        be_.layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, residual, param(w.ln1w),
                              param(w.ln1b));
      });
    linear_back(l, gm[0], "attn.c_attn", dln_, w.qkvw, grad(w.qkvb), dqkv_, a.ln1, Tensor(),
                a.fp8_inp[0]);
    be_.layernorm_backward(dresidual_, grad(w.ln1w), grad(w.ln1b), dln_, residual, param(w.ln1w),
                           a.ln1_mean, a.ln1_rstd);
    check(l, "layernorm_backward", "dresidual", dresidual_, true);
  }
  be_.embedding_backward(grad(wte_), grad(wpe_), dresidual_, tokens_);
  check(-1, "embedding_backward", "wte.grad", grad(wte_), true);
}

}  // namespace mpt
