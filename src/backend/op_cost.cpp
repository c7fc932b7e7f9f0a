#include "backend/op_cost.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "core/error.h"

namespace mpt {

const char* peak_format_name(PeakFormat f) {
  switch (f) {
    case PeakFormat::fp32: return "fp32";
    case PeakFormat::tf32: return "tf32";
    case PeakFormat::fp16: return "fp16";
    case PeakFormat::bf16: return "bf16";
    case PeakFormat::fp8: return "fp8";
  }
  return "?";
}

PeakFormat product_format(DType a, DType b, MatmulPrecision prec) {
  if (prec == MatmulPrecision::fp8) return PeakFormat::fp8;
  switch (attention_operand_format(a, b, prec)) {
    case OperandFormat::f32: return PeakFormat::fp32;
    case OperandFormat::tf32: return PeakFormat::tf32;
    case OperandFormat::f16: return PeakFormat::fp16;
    case OperandFormat::bf16: return PeakFormat::bf16;
  }
  return PeakFormat::fp32;
}

double OpCost::total_flops() const {
  double s = 0;
  for (double f : flops) s += f;
  return s;
}

namespace op_cost {

double bytes_of(const Tensor& t) { return t.defined() ? double(t.bytes()) : 0.0; }

namespace {

double b(const Tensor& t) { return bytes_of(t); }

void add_flops(OpCost& c, PeakFormat f, double flops) { c.flops[static_cast<int>(f)] += flops; }

// 2 N C OC for a product of inp's N rows of C with weight (OC, C).
double gemm_flops(const Tensor& inp, const Tensor& weight) {
  return 2.0 * double(inp.numel()) * double(weight.dim(0));
}

// Causal attention's products: row t of each (batch, head) sees t + 1 keys, each a dot product
// of HS multiply-adds, so one product over all rows, heads and the batch costs
// 2 * B * NH * HS * T (T + 1) / 2 = B * C * T * (T + 1) FLOPs.
double causal_product_flops(const Tensor& qkv) {
  const double B = double(qkv.dim(0)), T = double(qkv.dim(1)), C = double(qkv.dim(2)) / 3;
  return B * C * T * (T + 1);
}

}  // namespace

OpCost host_op(const char* op, double host_bytes) {
  OpCost c;
  c.op = op;
  c.host_bytes = host_bytes;
  return c;
}

OpCost bytes_op(const char* op, double read, double written) {
  OpCost c;
  c.op = op;
  c.bytes = read + written;
  return c;
}

OpCost embedding_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte,
                         const Tensor& wpe) {
  // A row of wte per token (at most every row), and T rows of wpe (each shared by the batch's
  // sequences).
  const double N = double(tokens.numel()), T = double(tokens.dim(-1));
  const double wte_rows = std::min(N, double(wte.dim(0)));
  const double read = b(tokens) + wte_rows * double(wte.dim(1)) * dtype_size(wte.dtype) +
                      T * double(wpe.dim(1)) * dtype_size(wpe.dtype);
  return bytes_op("embedding_forward", read, b(out));
}

OpCost embedding_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout,
                          const Tensor& tokens) {
  // Accumulated rows are read and written: at most min(N, rows) of dwte, T of dwpe.
  const double N = double(tokens.numel()), T = double(tokens.dim(-1));
  const double wte_rows = std::min(N, double(dwte.dim(0)));
  const double acc = 2 * (wte_rows * double(dwte.dim(1)) * dtype_size(dwte.dtype) +
                          T * double(dwpe.dim(1)) * dtype_size(dwpe.dtype));
  return bytes_op("embedding_backward", b(dout) + b(tokens), acc);
}

OpCost layernorm_forward(const char* op, const Tensor& out, const Tensor& mean,
                         const Tensor& rstd, const Tensor& inp, const Tensor& weight,
                         const Tensor& bias) {
  return bytes_op(op, b(inp) + b(weight) + b(bias), b(out) + b(mean) + b(rstd));
}

OpCost layernorm_backward(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                          const Tensor& dout, const Tensor& inp, const Tensor& weight,
                          const Tensor& mean, const Tensor& rstd) {
  // dinp, dweight and dbias accumulate: read and written.
  return bytes_op(
      "layernorm_backward",
      b(dout) + b(inp) + b(weight) + b(mean) + b(rstd) + b(dinp) + b(dweight) + b(dbias),
      b(dinp) + b(dweight) + b(dbias));
}

// Under fp8 a forward given an input cache writes it too (one byte an element), and a backward
// given one reads it instead of inp (backend.h, MatmulSpec::inp_cache).
double inp_cache_bytes(const MatmulSpec& spec) {
  return spec.prec == MatmulPrecision::fp8 ? b(spec.inp_cache) : 0.0;
}

OpCost matmul_forward(const char* op, const Tensor& out, const Tensor& inp, const Tensor& weight,
                      const Tensor& bias, const MatmulSpec& spec) {
  OpCost c = bytes_op(op, b(inp) + b(weight) + b(bias), b(out) + inp_cache_bytes(spec));
  add_flops(c, product_format(inp.dtype, weight.dtype, spec.prec), gemm_flops(inp, weight));
  return c;
}

OpCost matmul_backward(const char* op, const Tensor& dinp, const Tensor& dweight,
                       const Tensor& dbias, const Tensor& dout, const Tensor& inp,
                       const Tensor& weight, const MatmulSpec& spec) {
  // dinp writes; dweight and dbias accumulate. Two products: dinp = dout . weight (when dinp is
  // wanted) and dweight += dout^T . inp (inp's fp8 cache in its place when given one).
  const double cache = inp_cache_bytes(spec);
  OpCost c =
      bytes_op(op, b(dout) + (cache > 0 ? cache : b(inp)) + b(weight) + b(dweight) + b(dbias),
               b(dinp) + b(dweight) + b(dbias));
  if (dinp.defined())
    add_flops(c, product_format(dout.dtype, weight.dtype, spec.prec), gemm_flops(inp, weight));
  add_flops(c, product_format(dout.dtype, inp.dtype, spec.prec), gemm_flops(inp, weight));
  return c;
}

OpCost matmul_gelu_forward(const Tensor& out, const Tensor& pre, const Tensor& inp,
                           const Tensor& weight, const Tensor& bias, const MatmulSpec& spec) {
  // pre as matmul_forward writes it, and out too.
  OpCost c = matmul_forward("matmul_gelu_forward", pre, inp, weight, bias, spec);
  c.bytes += b(out);
  return c;
}

OpCost matmul_residual_forward(const Tensor& out, const Tensor& residual, const Tensor& inp,
                               const Tensor& weight, const Tensor& bias, const MatmulSpec& spec) {
  OpCost c = matmul_forward("matmul_residual_forward", out, inp, weight, bias, spec);
  c.bytes += b(residual);
  return c;
}

OpCost matmul_backward_gelu(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                            const Tensor& dout, const Tensor& inp, const Tensor& weight,
                            const Tensor& gelu_pre, const MatmulSpec& spec) {
  OpCost c = matmul_backward("matmul_backward_gelu", dinp, dweight, dbias, dout, inp, weight, spec);
  c.bytes += b(gelu_pre);
  return c;
}

OpCost attention_forward(const Tensor& out, const Tensor& lse, const Tensor& qkv,
                         MatmulPrecision prec) {
  OpCost c = bytes_op("attention_forward", b(qkv), b(out) + b(lse));
  add_flops(c, product_format(qkv.dtype, qkv.dtype, prec), 2 * causal_product_flops(qkv));
  return c;
}

OpCost attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                          const Tensor& lse, MatmulPrecision prec) {
  OpCost c = bytes_op("attention_backward", b(dout) + b(qkv) + b(lse), b(dqkv));
  add_flops(c, product_format(qkv.dtype, dout.dtype, prec), 5 * causal_product_flops(qkv));
  return c;
}

OpCost crossentropy(const Tensor& losses, const Tensor& logits, const Tensor& targets,
                    float dloss) {
  // With dloss, the gradient is written over the logits.
  return bytes_op("crossentropy_forward_backward", b(logits) + b(targets),
                  b(losses) + (dloss != 0 ? b(logits) : 0.0));
}

OpCost matmul_crossentropy(const Tensor& losses, const Tensor& logits, const Tensor& inp,
                           const Tensor& weight, const Tensor& targets, const MatmulSpec& spec) {
  // The logits are written once (the rounded logits, or their gradient), never read back: the
  // product goes to the classifier on the chip.
  OpCost c = bytes_op("matmul_crossentropy", b(inp) + b(weight) + b(targets),
                      b(losses) + b(logits) + inp_cache_bytes(spec));
  add_flops(c, product_format(inp.dtype, weight.dtype, spec.prec), gemm_flops(inp, weight));
  return c;
}

OpCost adamw_update(const Tensor& param, const Tensor& master, const Tensor& grad, const Tensor& m,
                    const Tensor& v) {
  // m and v are read and written; so is the master, or else the parameter in place (with a
  // master the parameter is only written).
  const double rw = b(m) + b(v) + (master.defined() ? b(master) : b(param));
  return bytes_op("adamw_update", b(grad) + rw, rw + (master.defined() ? b(param) : 0.0));
}

OpCost adamw_update_many(const std::vector<AdamWTensors>& all) {
  OpCost c = bytes_op("adamw_update_many", 0, 0);
  for (const AdamWTensors& t : all)
    c.bytes += adamw_update(t.param, t.master, t.grad, t.m, t.v).bytes;
  return c;
}

}  // namespace op_cost

// ---- TracingBackend

template <class Cost, class F>
void TracingBackend::traced(Cost&& cost, F&& f) {
  if (!obs_) {  // forwarding only: no cost to work out
    if (inner_) f();
    return;
  }
  const OpCost c = cost();
  obs_->before(c);
  if (inner_) f();
  obs_->after(c);
}

std::string TracingBackend::name() const { return inner_ ? inner_->name() : "shape-only"; }
std::string TracingBackend::device_description() const {
  return inner_ ? inner_->device_description() : "no device (shapes only, nothing executed)";
}
int TracingBackend::threads() const { return inner_ ? inner_->threads() : 1; }

Buffer TracingBackend::allocate(size_t bytes) {
  if (inner_) return inner_->allocate(bytes);
  // Address space only: distinct, aligned (to a page) addresses for the model's views, and a
  // fault at the first access should anything read or write tensor memory.
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t len = std::max<size_t>((bytes + page - 1) / page * page, page);
  void* p = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED)
    throw RuntimeError("shape-only backend: cannot reserve " + std::to_string(len) +
                       " bytes of address space: " + std::strerror(errno));
  live_ += bytes;
  peak_ = std::max(peak_, live_);
  return Buffer(p, bytes, [this, len, bytes](void* q) {
    munmap(q, len);
    live_ -= bytes;
  });
}

bool TracingBackend::host_accessible() const { return inner_ ? inner_->host_accessible() : false; }

void TracingBackend::copy_from_host(Tensor dst, const void* src) {
  traced([&] { return op_cost::host_op("copy_from_host", op_cost::bytes_of(dst)); },
         [&] { inner_->copy_from_host(dst, src); });
}

void TracingBackend::copy_to_host(void* dst, Tensor src) {
  if (!inner_) std::memset(dst, 0, src.bytes());
  traced([&] { return op_cost::host_op("copy_to_host", op_cost::bytes_of(src)); },
         [&] { inner_->copy_to_host(dst, src); });
}

void TracingBackend::copy_ids_from_host(Tensor dst, const int32_t* src) {
  traced([&] { return op_cost::host_op("copy_ids_from_host", op_cost::bytes_of(dst)); },
         [&] { inner_->copy_ids_from_host(dst, src); });
}

void TracingBackend::fill(Tensor t, float value) {
  traced([&] { return op_cost::bytes_op("fill", 0, op_cost::bytes_of(t)); },
         [&] { inner_->fill(t, value); });
}

void TracingBackend::synchronize() {
  if (inner_) inner_->synchronize();
}
void* TracingBackend::stream() const { return inner_ ? inner_->stream() : nullptr; }
size_t TracingBackend::workspace_bytes() const { return inner_ ? inner_->workspace_bytes() : 0; }
MemoryUsage TracingBackend::memory_usage() const {
  if (inner_) return inner_->memory_usage();
  MemoryUsage u;
  u.bytes = live_;
  u.peak_bytes = peak_;
  return u;
}
void TracingBackend::reset_peak_memory() {
  if (inner_) inner_->reset_peak_memory();
  peak_ = live_;
}
GpuInfo TracingBackend::gpu_info() const { return inner_ ? inner_->gpu_info() : GpuInfo{}; }

void TracingBackend::cast(Tensor dst, Tensor src, TensorClass cls) {
  traced([&] { return op_cost::bytes_op("cast", op_cost::bytes_of(src), op_cost::bytes_of(dst)); },
         [&] { inner_->cast(dst, src, cls); });
}

float TracingBackend::amax(Tensor t) {
  float r = 0;
  traced([&] { return op_cost::bytes_op("amax", op_cost::bytes_of(t), 0); },
         [&] { r = inner_->amax(t); });
  return r;
}

int64_t TracingBackend::count_nonfinite(Tensor t) {
  int64_t r = 0;
  traced([&] { return op_cost::bytes_op("count_nonfinite", op_cost::bytes_of(t), 0); },
         [&] { r = inner_->count_nonfinite(t); });
  return r;
}

CastCounts TracingBackend::cast_counts(TensorClass cls) const {
  return inner_ ? inner_->cast_counts(cls) : CastCounts{};
}
void TracingBackend::reset_cast_counts() {
  if (inner_) inner_->reset_cast_counts();
}
void TracingBackend::set_cast_counting(bool on) {
  if (inner_) inner_->set_cast_counting(on);
  counting_ = on;
}
bool TracingBackend::cast_counting() const { return inner_ ? inner_->cast_counting() : counting_; }

void TracingBackend::embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe) {
  traced([&] { return op_cost::embedding_forward(out, tokens, wte, wpe); },
         [&] { inner_->embedding_forward(out, tokens, wte, wpe); });
}

void TracingBackend::embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) {
  traced([&] { return op_cost::embedding_backward(dwte, dwpe, dout, tokens); },
         [&] { inner_->embedding_backward(dwte, dwpe, dout, tokens); });
}

void TracingBackend::layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp,
                                       Tensor weight, Tensor bias) {
  traced(
      [&] {
        return op_cost::layernorm_forward("layernorm_forward", out, mean, rstd, inp, weight, bias);
      },
      [&] { inner_->layernorm_forward(out, mean, rstd, inp, weight, bias); });
}

void TracingBackend::layernorm_forward_fp8(Tensor out, Tensor mean, Tensor rstd, Tensor inp,
                                           Tensor weight, Tensor bias, const Fp8Output& fp8) {
  traced(
      [&] {
        return op_cost::layernorm_forward("layernorm_forward_fp8", out, mean, rstd, inp, weight,
                                          bias);
      },
      [&] { inner_->layernorm_forward_fp8(out, mean, rstd, inp, weight, bias, fp8); });
}

void TracingBackend::layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                        Tensor inp, Tensor weight, Tensor mean, Tensor rstd) {
  traced(
      [&] {
        return op_cost::layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd);
      },
      [&] { inner_->layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd); });
}

void TracingBackend::matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias,
                                    const MatmulSpec& spec) {
  traced([&] { return op_cost::matmul_forward("matmul_forward", out, inp, weight, bias, spec); },
         [&] { inner_->matmul_forward(out, inp, weight, bias, spec); });
}

void TracingBackend::matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                     Tensor inp, Tensor weight, const MatmulSpec& spec) {
  traced(
      [&] {
        return op_cost::matmul_backward("matmul_backward", dinp, dweight, dbias, dout, inp, weight,
                                        spec);
      },
      [&] { inner_->matmul_backward(dinp, dweight, dbias, dout, inp, weight, spec); });
}

void TracingBackend::matmul_gelu_forward(Tensor out, Tensor pre, Tensor inp, Tensor weight,
                                         Tensor bias, const MatmulSpec& spec) {
  traced([&] { return op_cost::matmul_gelu_forward(out, pre, inp, weight, bias, spec); },
         [&] { inner_->matmul_gelu_forward(out, pre, inp, weight, bias, spec); });
}

void TracingBackend::matmul_residual_forward(Tensor out, Tensor residual, Tensor inp, Tensor weight,
                                             Tensor bias, const MatmulSpec& spec) {
  traced([&] { return op_cost::matmul_residual_forward(out, residual, inp, weight, bias, spec); },
         [&] { inner_->matmul_residual_forward(out, residual, inp, weight, bias, spec); });
}

void TracingBackend::matmul_backward_gelu(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                          Tensor inp, Tensor weight, Tensor gelu_pre,
                                          const MatmulSpec& spec) {
  traced(
      [&] {
        return op_cost::matmul_backward_gelu(dinp, dweight, dbias, dout, inp, weight, gelu_pre,
                                             spec);
      },
      [&] {
        inner_->matmul_backward_gelu(dinp, dweight, dbias, dout, inp, weight, gelu_pre, spec);
      });
}

void TracingBackend::attention_forward(Tensor out, Tensor lse, Tensor qkv, int n_head,
                                       MatmulPrecision prec) {
  traced([&] { return op_cost::attention_forward(out, lse, qkv, prec); },
         [&] { inner_->attention_forward(out, lse, qkv, n_head, prec); });
}

void TracingBackend::attention_backward(Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse,
                                        int n_head, MatmulPrecision prec) {
  traced([&] { return op_cost::attention_backward(dqkv, dout, qkv, lse, prec); },
         [&] { inner_->attention_backward(dqkv, dout, qkv, lse, n_head, prec); });
}

void TracingBackend::gelu_forward_fp8(Tensor out, Tensor inp, const Fp8Output& fp8) {
  traced(
      [&] {
        return op_cost::bytes_op("gelu_forward_fp8", op_cost::bytes_of(inp),
                                 op_cost::bytes_of(out));
      },
      [&] { inner_->gelu_forward_fp8(out, inp, fp8); });
}

void TracingBackend::gelu_forward(Tensor out, Tensor inp) {
  traced(
      [&] {
        return op_cost::bytes_op("gelu_forward", op_cost::bytes_of(inp), op_cost::bytes_of(out));
      },
      [&] { inner_->gelu_forward(out, inp); });
}

void TracingBackend::gelu_backward(Tensor dinp, Tensor inp, Tensor dout) {
  traced(
      [&] {
        return op_cost::bytes_op("gelu_backward", op_cost::bytes_of(inp) + op_cost::bytes_of(dout),
                                 op_cost::bytes_of(dinp));
      },
      [&] { inner_->gelu_backward(dinp, inp, dout); });
}

void TracingBackend::residual_forward(Tensor out, Tensor a, Tensor b) {
  traced(
      [&] {
        return op_cost::bytes_op("residual_forward", op_cost::bytes_of(a) + op_cost::bytes_of(b),
                                 op_cost::bytes_of(out));
      },
      [&] { inner_->residual_forward(out, a, b); });
}

void TracingBackend::crossentropy_forward_backward(Tensor losses, Tensor logits, Tensor targets,
                                                   int vocab_size, float dloss) {
  traced(
      [&] { return op_cost::crossentropy(losses, logits, targets, dloss); },
      [&] { inner_->crossentropy_forward_backward(losses, logits, targets, vocab_size, dloss); });
}

void TracingBackend::matmul_crossentropy(Tensor losses, Tensor logits, Tensor inp, Tensor weight,
                                         Tensor targets, int vocab_size, float dloss,
                                         const MatmulSpec& spec) {
  traced([&] { return op_cost::matmul_crossentropy(losses, logits, inp, weight, targets, spec); },
         [&] {
           inner_->matmul_crossentropy(losses, logits, inp, weight, targets, vocab_size, dloss,
                                       spec);
         });
}

double TracingBackend::sum_squares(Tensor t) {
  double r = 0;
  traced([&] { return op_cost::bytes_op("sum_squares", op_cost::bytes_of(t), 0); },
         [&] { r = inner_->sum_squares(t); });
  return r;
}

void TracingBackend::adamw_update(Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                                  const AdamWParams& p, AdamWStats* stats) {
  traced([&] { return op_cost::adamw_update(param, master, grad, m, v); },
         [&] { inner_->adamw_update(param, master, grad, m, v, p, stats); });
}

void TracingBackend::adamw_update_many(const std::vector<AdamWTensors>& all, AdamWStats* stats) {
  traced([&] { return op_cost::adamw_update_many(all); },
         [&] { inner_->adamw_update_many(all, stats); });
}

void TracingBackend::collect_stats() {
  traced([&] { return op_cost::host_op("collect_stats", 0); }, [&] { inner_->collect_stats(); });
}

// ---- floors and tables

double floor_seconds(const OpCost& c, const Ceilings& ceil) {
  if (!(ceil.bytes_per_s > 0)) throw RuntimeError("floor_seconds: no memory bandwidth given");
  double compute = 0;
  for (int f = 0; f < kPeakFormats; ++f) {
    if (c.flops[f] == 0) continue;
    if (!(ceil.flops_per_s[f] > 0))
      throw RuntimeError(std::string("floor_seconds: ") + c.op + " has " +
                         peak_format_name(static_cast<PeakFormat>(f)) +
                         " products and no rate was given for that format");
    compute += c.flops[f] / ceil.flops_per_s[f];
  }
  const double host = ceil.host_bytes_per_s > 0 ? c.host_bytes / ceil.host_bytes_per_s : 0.0;
  return std::max({c.bytes / ceil.bytes_per_s, compute, host});
}

bool memory_bound(const OpCost& c, const Ceilings& ceil) {
  return c.bytes / ceil.bytes_per_s >= floor_seconds(c, ceil);
}

void CostTable::add(const OpCost& c, double measured_ms) {
  auto it = index_.find(c.op);
  if (it == index_.end()) {
    it = index_.emplace(c.op, rows_.size()).first;
    OpTotals t;
    t.cost.op = c.op;
    rows_.push_back(t);
  }
  OpTotals& t = rows_[it->second];
  for (int f = 0; f < kPeakFormats; ++f)
    t.cost.flops[f] += c.flops[f];
  t.cost.bytes += c.bytes;
  t.cost.host_bytes += c.host_bytes;
  t.calls += 1;
  if (ceil_.bytes_per_s > 0) {
    const double f = floor_seconds(c, ceil_);
    t.floor_s += f;
    if (memory_bound(c, ceil_)) t.memory_floor_s += f;
  }
  t.measured_ms += measured_ms;
}

std::vector<OpTotals> CostTable::rows() const { return rows_; }

OpTotals CostTable::total() const {
  OpTotals s;
  s.cost.op = "step";
  for (const OpTotals& t : rows_) {
    for (int f = 0; f < kPeakFormats; ++f)
      s.cost.flops[f] += t.cost.flops[f];
    s.cost.bytes += t.cost.bytes;
    s.cost.host_bytes += t.cost.host_bytes;
    s.calls += t.calls;
    s.floor_s += t.floor_s;
    s.memory_floor_s += t.memory_floor_s;
    s.measured_ms += t.measured_ms;
  }
  return s;
}

void CostTable::clear() {
  rows_.clear();
  index_.clear();
}

}  // namespace mpt
