#include "backend/cuda/matmul_plan.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "backend/cuda/workspace_plan.h"
#include "core/error.h"

namespace mpt::cuda {

const char* gemm_type_name(GemmType t) {
  switch (t) {
    case GemmType::f32: return "fp32";
    case GemmType::f16: return "fp16";
    case GemmType::bf16: return "bf16";
    case GemmType::e4m3: return "fp8_e4m3";
    case GemmType::e5m2: return "fp8_e5m2";
  }
  return "?";
}

GemmType gemm_type_of(DType d) {
  switch (d) {
    case DType::f32: return GemmType::f32;
    case DType::f16: return GemmType::f16;
    case DType::bf16: return GemmType::bf16;
    case DType::e4m3: return GemmType::e4m3;
    case DType::e5m2: return GemmType::e5m2;
    case DType::i32: break;
  }
  throw RuntimeError(std::string("matmul: not a float dtype: ") + dtype_name(d));
}

size_t gemm_type_size(GemmType t) {
  switch (t) {
    case GemmType::f32: return 4;
    case GemmType::f16:
    case GemmType::bf16: return 2;
    case GemmType::e4m3:
    case GemmType::e5m2: return 1;
  }
  return 0;
}

GemmType native_pair_type(DType a, DType b) {
  const GemmType ta = gemm_type_of(a), tb = gemm_type_of(b);
  if (ta == GemmType::e4m3 || ta == GemmType::e5m2 || tb == GemmType::e4m3 || tb == GemmType::e5m2)
    throw RuntimeError("matmul: fp8 tensors are read only under MatmulPrecision::fp8");
  return ta == tb ? ta : GemmType::f32;
}

GemmCompute compute_type(MatmulPrecision prec, GemmType operand_type) {
  return prec == MatmulPrecision::tf32 && operand_type == GemmType::f32 ? GemmCompute::f32_fast_tf32
                                                                        : GemmCompute::f32;
}

namespace {

GemmType fp8_type(const char* what, DType f) {
  if (f != DType::e4m3 && f != DType::e5m2)
    throw RuntimeError(std::string("fp8 matmul: ") + what + " format must be e4m3 or e5m2, got " +
                       dtype_name(f));
  return gemm_type_of(f);
}

void check_fp8_pair(const char* gemm, GemmType a, GemmType b) {
  if (a == GemmType::e5m2 && b == GemmType::e5m2)
    throw RuntimeError(std::string("fp8 matmul (") + gemm +
                       "): e5m2 x e5m2 is not a cuBLASLt fp8 GEMM (Hopper takes e4m3 x e4m3, "
                       "e4m3 x e5m2, e5m2 x e4m3); use e4m3 for the forward operands");
}

// A slot reading an operand as stored, or a widened copy when its dtype differs from `t`.
GemmOperand native_slot(MatmulOperand src, DType stored, GemmType t, bool trans, int64_t rows,
                        int64_t cols) {
  GemmOperand o;
  o.source = src;
  o.type = t;
  o.copy = gemm_type_of(stored) != t;
  o.trans = trans;
  o.rows = rows;
  o.cols = cols;
  o.ld = rows;
  return o;
}

GemmOperand fp8_slot(MatmulOperand src, GemmType t, bool transposed_copy, bool trans,
                     int64_t rows, int64_t cols) {
  GemmOperand o;
  o.source = src;
  o.type = t;
  o.copy = true;
  o.transposed_copy = transposed_copy;
  o.trans = trans;
  o.rows = rows;
  o.cols = cols;
  o.ld = rows;
  return o;
}

}  // namespace

GemmPlan plan_matmul(MatmulOp op, int64_t N, int64_t C, int64_t OC, DType inp, DType weight,
                     DType dout, const MatmulSpec& spec) {
  GemmPlan p;
  p.op = op;
  p.d_type = GemmType::f32;
  const bool fp8 = spec.prec == MatmulPrecision::fp8;
  p.fp8 = fp8;
  GemmType ti = GemmType::f32, tw = GemmType::f32, td = GemmType::f32;
  // An fp8 spec's inp may be stored quantised already (backend.h, MatmulSpec::inp).
  const bool inp_quantised = fp8 && inp == spec.inp.format;
  if (fp8) {
    auto is_float = [](DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16; };
    if (!is_float(inp) && !inp_quantised)
      throw RuntimeError(std::string("fp8 matmul: inp must be fp32, fp16, bf16 or stored in the "
                                     "spec's inp format, got ") +
                         dtype_name(inp));
    // (The forward does not read dout, whose dtype it is given as inp's.)
    for (DType d : {weight, op == MatmulOp::forward ? weight : dout})
      if (!is_float(d))
        throw RuntimeError(std::string("fp8 matmul: operands must be fp32, fp16 or bf16, got ") +
                           dtype_name(d));
    ti = fp8_type("inp", spec.inp.format);
    tw = fp8_type("weight", spec.weight.format);
    // The forward does not read dout: its format is checked by the backward only.
    if (op != MatmulOp::forward) td = fp8_type("dout", spec.dout.format);
    // Every call of a layer uses one spec: the forward multiplies inp by weight, so a spec whose
    // inp and weight are both e5m2 is rejected by the backward too.
    check_fp8_pair("inp x weight", tw, ti);
  }
  switch (op) {
    case MatmulOp::forward:
      p.m = OC, p.n = N, p.k = C, p.ldd = OC;
      if (fp8) {
        p.a = fp8_slot(MatmulOperand::weight, tw, false, true, C, OC);
        p.b = fp8_slot(MatmulOperand::inp, ti, false, false, C, N);
        p.b.copy = !inp_quantised;  // read in place when stored quantised
      } else {
        const GemmType t = native_pair_type(weight, inp);
        p.a = native_slot(MatmulOperand::weight, weight, t, true, C, OC);
        p.b = native_slot(MatmulOperand::inp, inp, t, false, C, N);
      }
      break;
    case MatmulOp::dgrad:
      p.m = C, p.n = N, p.k = OC, p.ldd = C;
      if (fp8) {
        check_fp8_pair("dgrad: weight x dout", tw, td);
        // W^T (C, OC) row-major = column-major OC x C, read with op T (TN).
        p.a = fp8_slot(MatmulOperand::weight, tw, true, true, OC, C);
        p.b = fp8_slot(MatmulOperand::dout, td, false, false, OC, N);
      } else {
        const GemmType t = native_pair_type(weight, dout);
        p.a = native_slot(MatmulOperand::weight, weight, t, false, C, OC);
        p.b = native_slot(MatmulOperand::dout, dout, t, false, OC, N);
      }
      break;
    case MatmulOp::wgrad:
      p.m = C, p.n = OC, p.k = N, p.ldd = C;
      p.beta = 1.0f;
      if (fp8) {
        check_fp8_pair("wgrad: inp x dout", ti, td);
        // x^T (C, N) = column-major N x C, op T; dy^T (OC, N) = column-major N x OC, op N.
        p.a = fp8_slot(MatmulOperand::inp, ti, true, true, N, C);
        p.b = fp8_slot(MatmulOperand::dout, td, true, false, N, OC);
      } else {
        const GemmType t = native_pair_type(inp, dout);
        p.a = native_slot(MatmulOperand::inp, inp, t, false, C, N);
        p.b = native_slot(MatmulOperand::dout, dout, t, true, OC, N);
      }
      break;
  }
  p.compute = fp8 ? GemmCompute::f32 : compute_type(spec.prec, p.a.type);
  return p;
}

BiasPath bias_path(bool has_bias, bool out_direct, bool fp8, DType bias, uintptr_t bias_ptr) {
  if (!has_bias) return BiasPath::none;
  if (!out_direct || pointer_alignment(bias_ptr) < 16) return BiasPath::store_kernel;
  // D is fp32 here. cuBLASLt's bias type for fp32 D: fp32 with fp32/fp16/bf16 operands; bf16
  // with fp8 operands (cuda-crib.md §2).
  const DType want = fp8 ? DType::bf16 : DType::f32;
  return bias == want ? BiasPath::epilogue : BiasPath::store_kernel;
}

const char* gemm_out_name(GemmOut m) { return m == GemmOut::direct ? "direct" : "staged"; }

GemmOut gemm_out_for(const char* env) {
  if (!env || !*env || std::strcmp(env, "staged") == 0) return GemmOut::staged;
  if (std::strcmp(env, "direct") == 0) return GemmOut::direct;
  throw RuntimeError(std::string("MPT_GEMM_OUT: expected 'staged' or 'direct', got '") + env +
                     "'");
}

GemmOut gemm_out() { return gemm_out_for(std::getenv("MPT_GEMM_OUT")); }

bool lt_epilogues_enabled() {
  const char* e = std::getenv("MPT_LT_EPILOGUES");
  return !(e && std::strcmp(e, "0") == 0);
}

bool gemm_writes_output(const GemmPlan& p, DType out, GemmOut mode, bool has_bias, DType bias,
                        uintptr_t bias_ptr, bool lt_epilogues) {
  if (out != DType::bf16 || mode != GemmOut::direct) return false;
  if (!p.fp8 && !(p.a.type == GemmType::bf16 && p.b.type == GemmType::bf16)) return false;
  return !has_bias ||
         (lt_epilogues && bias == DType::bf16 && pointer_alignment(bias_ptr) >= 16);
}

const char* gemm_output_kind(DType activation, DType param, MatmulPrecision matmul, GemmOut mode,
                             bool lt_epilogues) {
  if (activation == DType::f32) return "fp32";
  // bf16 x bf16 operands need bf16 weights; fp8 GEMMs quantise whatever they read.
  const bool some = activation == DType::bf16 && mode == GemmOut::direct &&
                    (param == DType::bf16 || matmul == MatmulPrecision::fp8);
  if (!some) return "staged";
  return param == DType::bf16 && lt_epilogues ? "direct" : "partly direct";
}

const char* gemm_epilogue_name(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::none: return "";
    case GemmEpilogue::bias: return "BIAS";
    case GemmEpilogue::gelu_aux: return "GELU_AUX";
    case GemmEpilogue::gelu_aux_bias: return "GELU_AUX_BIAS";
    case GemmEpilogue::dgelu: return "DGELU";
    case GemmEpilogue::bgradb: return "BGRADB";
  }
  return "?";
}

namespace {

bool is_narrow_float(DType d) { return d == DType::f16 || d == DType::bf16; }

// The epilogue rules shared by both directions (matmul_plan.h, cuda-crib.md §2).
bool epilogue_ok(const GemmPlan& p, uintptr_t aux_ptr) {
  return !p.fp8 && p.compute == GemmCompute::f32_fast_tf32 && p.ldd % 8 == 0 &&
         pointer_alignment(aux_ptr) >= 16;
}

}  // namespace

GeluPath gelu_forward_path(const GemmPlan& p, DType pre, DType out, uintptr_t pre_ptr,
                           bool has_bias, DType bias, uintptr_t bias_ptr) {
  if (pre == out && is_narrow_float(out)) return GeluPath::store_kernel;
  if (pre != DType::f32 || out != DType::f32 || !epilogue_ok(p, pre_ptr))
    return GeluPath::separate;
  if (has_bias && bias_path(true, true, p.fp8, bias, bias_ptr) != BiasPath::epilogue)
    return GeluPath::separate;
  return GeluPath::epilogue;
}

GeluPath gelu_backward_path(const GemmPlan& p, DType dinp, DType pre, uintptr_t pre_ptr) {
  if (is_narrow_float(dinp)) return GeluPath::store_kernel;
  if (dinp == DType::f32 && pre == DType::f32 && epilogue_ok(p, pre_ptr))
    return GeluPath::epilogue;
  return GeluPath::separate;
}

bool residual_in_store(DType out, DType residual) {
  return is_narrow_float(out) && residual == out;
}

bool dbias_in_epilogue(const GemmPlan& wgrad) {
  return wgrad.op == MatmulOp::wgrad && !wgrad.fp8 && wgrad.compute == GemmCompute::f32 &&
         wgrad.batch == 1;
}

StoreLaunch store_launch(int64_t rows, int64_t cols, bool aligned) {
  StoreLaunch l;
  l.vec = aligned && cols % 4 == 0 ? 4 : 1;
  const int64_t col_threads = std::max<int64_t>(1, (cols + l.vec - 1) / l.vec);
  // As few blocks along x as 256 threads allow, the columns spread evenly over them (2304
  // columns: 3 x 192 threads, not 256 + 256 + 64).
  const int64_t nb = (col_threads + 255) / 256;
  l.grid_x = static_cast<unsigned>(nb);
  l.threads = static_cast<unsigned>(((col_threads + nb - 1) / nb + 31) / 32 * 32);
  l.grid_y = static_cast<unsigned>(std::clamp<int64_t>(rows, 1, 65535));
  return l;
}

QuantiseLaunch quantise_launch(int64_t rows, int64_t cols, size_t elem_bytes, uint32_t x_align,
                               uint32_t out_align, bool transposed) {
  QuantiseLaunch l;
  if (rows < 0 || cols < 0 || !(elem_bytes == 2 || elem_bytes == 4))
    throw RuntimeError("fp8 quantise: a float operand of non-negative shape expected");
  const int vec = static_cast<int>(16 / elem_bytes);
  l.strip = rows > 0 && cols % vec == 0 && x_align >= 16 && out_align >= 16 &&
            (!transposed || rows % 16 == 0);
  if (l.strip) {
    static_assert(kQuantiseCols % 8 == 0 && kDbiasRows % kQuantiseSubRows == 0 &&
                      kQuantiseSubRows % 16 == 0,
                  "a strip holds whole 16-byte loads and whole 16-row transposed writes");
    l.vec = vec;
    l.grid_x = static_cast<unsigned>(std::max<int64_t>(1, (cols + kQuantiseCols - 1) / kQuantiseCols));
    const int64_t gy = dbias_chunks(rows);
    if (gy > 65535) throw RuntimeError("fp8 matmul: too many rows for the quantise kernel's grid");
    l.grid_y = static_cast<unsigned>(gy);
  } else {
    const int64_t gy = (rows + 31) / 32;
    if (gy > 65535) throw RuntimeError("fp8 matmul: too many rows for the quantise kernel's grid");
    l.grid_x = static_cast<unsigned>((cols + 31) / 32);
    l.grid_y = static_cast<unsigned>(gy);
  }
  return l;
}

uint32_t pointer_alignment(uintptr_t p) {
  uint32_t a = 256;
  while (a > 1 && (p % a) != 0) a >>= 1;
  return a;
}

uint32_t operand_alignment(uintptr_t base, int32_t batch, int64_t stride, GemmType t) {
  const uintptr_t step = batch > 1 ? static_cast<uintptr_t>(stride) * gemm_type_size(t) : 0;
  return pointer_alignment(base | step);
}

bool GemmKey::operator==(const GemmKey& o) const {
  return m == o.m && n == o.n && k == o.k && lda == o.lda && ldb == o.ldb && ldd == o.ldd &&
         batch == o.batch && stride_a == o.stride_a && stride_b == o.stride_b &&
         stride_d == o.stride_d && a_type == o.a_type && b_type == o.b_type &&
         d_type == o.d_type && compute == o.compute && trans_a == o.trans_a &&
         trans_b == o.trans_b && fp8 == o.fp8 && epilogue == o.epilogue && align_a == o.align_a &&
         align_b == o.align_b && align_d == o.align_d && align_bias == o.align_bias &&
         align_aux == o.align_aux && bias_type == o.bias_type;
}

std::string GemmKey::str() const {
  auto s = [](int64_t v) { return std::to_string(v); };
  return "m=" + s(m) + " n=" + s(n) + " k=" + s(k) + " op(A)=" + (trans_a ? "T" : "N") +
         " op(B)=" + (trans_b ? "T" : "N") + " lda=" + s(lda) + " ldb=" + s(ldb) +
         " ldd=" + s(ldd) + " A=" + gemm_type_name(a_type) + " B=" + gemm_type_name(b_type) +
         " D=" + gemm_type_name(d_type) +
         " compute=" + (compute == GemmCompute::f32 ? "32F" : "32F_FAST_TF32") +
         (fp8 ? " fp8-scales" : "") +
         (epilogue != GemmEpilogue::none ? std::string(" epilogue=") + gemm_epilogue_name(epilogue)
                                         : std::string()) +
         " batch=" + s(batch) + " align(A,B,D)=" + s(align_a) + "," + s(align_b) + "," +
         s(align_d) + (align_bias ? " align(bias)=" + s(align_bias) : std::string()) +
         (align_aux ? " align(aux)=" + s(align_aux) : std::string()) +
         (align_bias ? std::string(" bias=") + gemm_type_name(bias_type) : std::string());
}

size_t GemmKeyHash::operator()(const GemmKey& k) const {
  size_t h = 1469598103934665603ull;
  auto mix = [&](uint64_t v) { h = (h ^ std::hash<uint64_t>{}(v)) * 1099511628211ull; };
  mix(uint64_t(k.m)), mix(uint64_t(k.n)), mix(uint64_t(k.k));
  mix(uint64_t(k.lda)), mix(uint64_t(k.ldb)), mix(uint64_t(k.ldd));
  mix(uint64_t(k.batch)), mix(uint64_t(k.stride_a)), mix(uint64_t(k.stride_b)),
      mix(uint64_t(k.stride_d));
  mix((uint64_t(k.a_type) << 0) | (uint64_t(k.b_type) << 8) | (uint64_t(k.d_type) << 16) |
      (uint64_t(k.compute) << 24) | (uint64_t(k.trans_a) << 32) | (uint64_t(k.trans_b) << 33) |
      (uint64_t(k.fp8) << 34) | (uint64_t(k.epilogue) << 40));
  mix((uint64_t(k.align_a) << 0) | (uint64_t(k.align_b) << 16) | (uint64_t(k.align_d) << 32) |
      (uint64_t(k.align_aux) << 48));
  mix(uint64_t(k.align_bias) | (uint64_t(k.bias_type) << 32));
  return h;
}

GemmKey gemm_key(const GemmPlan& p, GemmEpilogue epi, uint32_t align_a, uint32_t align_b,
                 uint32_t align_d, uint32_t align_bias, uint32_t align_aux,
                 GemmType bias_type) {
  GemmKey k;
  k.m = p.m, k.n = p.n, k.k = p.k;
  k.lda = p.a.ld, k.ldb = p.b.ld, k.ldd = p.ldd;
  k.batch = p.batch;
  k.stride_a = p.stride_a, k.stride_b = p.stride_b, k.stride_d = p.stride_d;
  k.a_type = p.a.type, k.b_type = p.b.type, k.d_type = p.d_type;
  k.compute = p.compute;
  k.trans_a = p.a.trans, k.trans_b = p.b.trans, k.fp8 = p.fp8;
  k.epilogue = epi;
  k.align_a = align_a, k.align_b = align_b, k.align_d = align_d;
  k.align_bias = align_bias, k.align_aux = align_aux;
  k.bias_type = align_bias ? bias_type : GemmType::f32;  // no bias: no BIAS_DATA_TYPE set
  return k;
}

size_t operand_copy_bytes(int64_t elements, GemmType t) {
  const size_t b = static_cast<size_t>(elements) * gemm_type_size(t);
  return (b + 255) / 256 * 256;
}

}  // namespace mpt::cuda
