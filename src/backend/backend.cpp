#include "backend/backend.h"

#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_backend.h"
#if MPT_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_context.h"
#endif

namespace mpt {

const char* tensor_class_name(TensorClass c) {
  switch (c) {
    case TensorClass::activation: return "activations";
    case TensorClass::weight: return "weights";
    case TensorClass::gradient: return "gradients";
  }
  return "?";
}

namespace {

// Whether two tensors' bytes overlap.
bool overlap(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined()) return false;
  const auto pa = reinterpret_cast<uintptr_t>(a.data), pb = reinterpret_cast<uintptr_t>(b.data);
  return pa < pb + b.bytes() && pb < pa + a.bytes();
}

}  // namespace

void check_disjoint_args(const char* op, const char* a_name, const Tensor& a,
                         const char* b_name, const Tensor& b) {
  if (!a.defined() || !b.defined())
    throw RuntimeError(std::string(op) + ": arguments '" + a_name + "' and '" + b_name +
                       "' are required");
  if (overlap(a, b))
    throw RuntimeError(std::string(op) + ": '" + a_name + "' and '" + b_name +
                       "' must not overlap");
}

void Backend::matmul_gelu_forward(Tensor out, Tensor pre, Tensor inp, Tensor weight, Tensor bias,
                                  const MatmulSpec& spec) {
  check_disjoint_args("matmul_gelu_forward", "out", out, "pre", pre);
  const bool fp8_out = dtype_is_fp8(out.dtype);
  if (fp8_out) check_fp8_output("matmul_gelu_forward", out, spec.gelu_fp8);
  matmul_forward(pre, inp, weight, bias, spec);
  if (fp8_out)
    gelu_forward_fp8(out, pre, spec.gelu_fp8);
  else
    gelu_forward(out, pre);
}

void Backend::matmul_residual_forward(Tensor out, Tensor residual, Tensor inp, Tensor weight,
                                      Tensor bias, const MatmulSpec& spec) {
  check_disjoint_args("matmul_residual_forward", "out", out, "residual", residual);
  check_disjoint_args("matmul_residual_forward", "out", out, "inp", inp);
  matmul_forward(out, inp, weight, bias, spec);
  residual_forward(out, residual, out);
}

void Backend::matmul_backward_gelu(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                   Tensor inp, Tensor weight, Tensor gelu_pre,
                                   const MatmulSpec& spec) {
  check_disjoint_args("matmul_backward_gelu", "dinp", dinp, "gelu_pre", gelu_pre);
  matmul_backward(dinp, dweight, dbias, dout, inp, weight, spec);
  gelu_backward(dinp, gelu_pre, dinp);
}

void Backend::matmul_crossentropy(Tensor losses, Tensor logits, Tensor inp, Tensor weight,
                                  Tensor targets, int vocab_size, float dloss,
                                  const MatmulSpec& spec) {
  check_crossentropy_args(losses, logits, inp, targets);
  matmul_forward(logits, inp, weight, Tensor(), spec);
  crossentropy_forward_backward(losses, logits, targets, vocab_size, dloss);
}

void check_adamw_disjoint(const std::vector<AdamWTensors>& all) {
  struct Range {
    uintptr_t begin, end;
    size_t tensor;
    const char* name;
  };
  std::vector<Range> ranges;
  ranges.reserve(all.size() * 5);
  for (size_t i = 0; i < all.size(); ++i) {
    const AdamWTensors& t = all[i];
    const std::pair<const char*, const Tensor*> named[] = {
        {"param", &t.param}, {"master", &t.master}, {"grad", &t.grad}, {"m", &t.m}, {"v", &t.v}};
    for (const auto& [name, x] : named) {
      if (!x->defined() || x->bytes() == 0) continue;
      const auto b = reinterpret_cast<uintptr_t>(x->data);
      ranges.push_back({b, b + x->bytes(), i, name});
    }
  }
  // Sorted by start, a range overlaps an earlier one exactly when it starts before the furthest
  // end seen so far: O(n log n) for the ~750 ranges of a GPT-2 step, not O(n^2).
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  const Range* furthest = nullptr;
  for (const Range& r : ranges) {
    if (furthest && r.begin < furthest->end)
      throw RuntimeError("adamw_update_many: tensor " + std::to_string(furthest->tensor) + "'s " +
                         furthest->name + " and tensor " + std::to_string(r.tensor) + "'s " +
                         r.name + " overlap");
    if (!furthest || r.end > furthest->end) furthest = &r;
  }
}

void check_adamw_args(const std::string& op, const AdamWTensors& t) {
  auto is_float = [](DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16; };
  if (!t.param.defined() || !is_float(t.param.dtype))
    throw RuntimeError(op + ": argument 'param' expected a float tensor (fp32, fp16 or bf16), " +
                       "got " + (t.param.defined() ? dtype_name(t.param.dtype) : "undefined"));
  const int64_t n = t.param.numel();
  auto expect = [&](const char* arg, const Tensor& x, bool any_float) {
    if (x.defined() && x.numel() == n && (any_float ? is_float(x.dtype) : x.dtype == DType::f32))
      return;
    throw RuntimeError(op + ": argument '" + arg + "' expected " +
                       (any_float ? "a float tensor (fp32, fp16 or bf16)" : "an fp32 tensor") +
                       " of " + std::to_string(n) + " elements (param's), got " +
                       (x.defined() ? dtype_name(x.dtype) : "undefined") + x.shape.str());
  };
  expect("grad", t.grad, true);
  expect("m", t.m, false);
  expect("v", t.v, false);
  if (t.master.defined()) {
    expect("master", t.master, false);
    if (t.param.dtype == DType::f32)
      throw RuntimeError(op + ": argument 'master' given for fp32 weights");
  }
}

void check_adamw_update_many(const std::vector<AdamWTensors>& all) {
  for (size_t i = 0; i < all.size(); ++i)
    check_adamw_args("adamw_update_many: tensor " + std::to_string(i), all[i]);
  check_adamw_disjoint(all);
}

void Backend::adamw_update_many(const std::vector<AdamWTensors>& all, AdamWStats* stats) {
  check_adamw_update_many(all);  // every tensor before the first is written
  for (const AdamWTensors& t : all) adamw_update(t.param, t.master, t.grad, t.m, t.v, t.p, stats);
}

bool matmul_inp_quantised(const Tensor& inp, const MatmulSpec& spec) {
  return spec.prec == MatmulPrecision::fp8 && inp.defined() && dtype_is_fp8(inp.dtype) &&
         inp.dtype == spec.inp.format;
}

void check_fp8_output(const char* op, const Tensor& out, const Fp8Output& fp8) {
  const std::string where = std::string(op) + ": ";
  if (!dtype_is_fp8(fp8.q.format))
    throw RuntimeError(where + "fp8 output format must be e4m3 or e5m2, got " +
                       dtype_name(fp8.q.format));
  if (!out.defined() || out.dtype != fp8.q.format)
    throw RuntimeError(where + "argument 'out' expected a tensor of the fp8 output format " +
                       dtype_name(fp8.q.format) + ", got " +
                       (out.defined() ? dtype_name(out.dtype) : "undefined"));
  if (fp8.round_to != DType::f32 && fp8.round_to != DType::f16 && fp8.round_to != DType::bf16)
    throw RuntimeError(where + "fp8 output round_to must be fp32, fp16 or bf16, got " +
                       dtype_name(fp8.round_to));
  if (!(std::isfinite(fp8.q.scale) && fp8.q.scale > 0.0f))
    throw RuntimeError(where + "fp8 output scale must be finite and > 0, got " +
                       std::to_string(fp8.q.scale));
}

void check_crossentropy_args(const Tensor& losses, const Tensor& logits, const Tensor& inp,
                             const Tensor& targets) {
  const char* op = "matmul_crossentropy";
  check_disjoint_args(op, "logits", logits, "inp", inp);
  check_disjoint_args(op, "logits", logits, "losses", losses);
  check_disjoint_args(op, "logits", logits, "targets", targets);
}

void Fp8InpCaches::check(const char* op, const MatmulSpec& spec, const Tensor& inp) {
  const Tensor& c = spec.inp_cache;
  const std::string where = std::string(op) + ": spec.inp_cache ";
  if (spec.prec != MatmulPrecision::fp8)
    throw RuntimeError(where + "serves fp8 matmuls only");
  if (c.dtype != spec.inp.format || c.numel() != inp.numel())
    throw RuntimeError(where + "must be a " + dtype_name(spec.inp.format) + " tensor of " +
                       std::to_string(inp.numel()) + " elements (inp's), got " +
                       dtype_name(c.dtype) + c.shape.str());
  if (overlap(c, inp)) throw RuntimeError(where + "must not overlap inp");
}

void Fp8InpCaches::wrote(const MatmulSpec& spec, const Tensor& inp) {
  const Entry e{inp.data, inp.numel(), spec.inp.format, spec.inp.scale};
  for (auto& [cache, entry] : entries_)
    if (cache == spec.inp_cache.data) {
      entry = e;
      return;
    }
  entries_.emplace_back(spec.inp_cache.data, e);
}

void Fp8InpCaches::expect_holds(const char* op, const MatmulSpec& spec, const Tensor& inp) const {
  for (const auto& [cache, e] : entries_)
    if (cache == spec.inp_cache.data) {
      if (e.inp == inp.data && e.numel == inp.numel() && e.format == spec.inp.format &&
          e.scale == spec.inp.scale)
        return;
      break;
    }
  throw RuntimeError(std::string(op) +
                     ": spec.inp_cache does not hold this inp quantised with spec.inp's format "
                     "and scale (the forward that writes it must come first, with the same inp "
                     "and spec.inp)");
}

void Fp8InpCaches::forget(const void* ptr, size_t bytes) {
  const auto lo = reinterpret_cast<uintptr_t>(ptr), hi = lo + bytes;
  entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                [&](const auto& e) {
                                  // The cache: one byte an element of its input.
                                  const auto a = reinterpret_cast<uintptr_t>(e.first);
                                  const auto b = a + static_cast<uintptr_t>(e.second.numel);
                                  return a < hi && lo < b;
                                }),
                 entries_.end());
}

OperandFormat attention_operand_format(DType a, DType b, MatmulPrecision prec) {
  auto is_float = [](DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16; };
  if (!is_float(a) || !is_float(b))
    throw RuntimeError(std::string("attention: operands must be fp32, fp16 or bf16, got ") +
                       dtype_name(a) + " and " + dtype_name(b));
  if (prec == MatmulPrecision::fp8)
    throw RuntimeError("attention: its products take native or tf32 precision, not fp8");
  if (a == b && a == DType::f16) return OperandFormat::f16;
  if (a == b && a == DType::bf16) return OperandFormat::bf16;
  return prec == MatmulPrecision::tf32 ? OperandFormat::tf32 : OperandFormat::f32;
}

const char* operand_format_name(OperandFormat f) {
  switch (f) {
    case OperandFormat::f32: return "fp32";
    case OperandFormat::tf32: return "tf32";
    case OperandFormat::f16: return "fp16";
    case OperandFormat::bf16: return "bf16";
  }
  return "?";
}

bool backend_is_cuda(const std::string& name) {
#if MPT_HAVE_CUDA
  return name == "cuda" || (name == "auto" && cuda::device_available());
#else
  return name == "cuda";
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& name, int threads, int device) {
  if (name == "cpu") return std::make_unique<CpuBackend>(threads);
#if MPT_HAVE_CUDA
  if (name == "cuda") return std::make_unique<CudaBackend>(device);
  if (name == "auto") {
    if (cuda::device_available()) return std::make_unique<CudaBackend>(device);
    return std::make_unique<CpuBackend>(threads);
  }
#else
  if (name == "auto") return std::make_unique<CpuBackend>(threads);
  if (name == "cuda")
    throw InputError(
        "backend 'cuda' is not available: this mpt was built without the CUDA toolkit (nvcc "
        "not found at configure time); use backend: cpu or auto");
#endif
  throw InputError("unknown backend '" + name + "' (valid: cpu, cuda, auto)");
}

}  // namespace mpt
