// The CPU backend's dtype handling: conversions with cast statistics, the staging that lets the
// fp32 kernels serve fp16/bf16 tensors, the matmuls (native, tf32, fp8 with per-tensor scales),
// and the optimizer with master weights and stochastic rounding.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_common.h"
#include "backend/cpu/fast_formats.h"
#include "core/formats.h"

namespace mpt {
namespace {

using cpu_detail::BlasThreads;
using cpu_detail::expect;
using cpu_detail::for_column_blocks;

bool is_staged_dtype(DType t) { return t == DType::f16 || t == DType::bf16; }

// Checks a float tensor argument of an op: defined, the shape, and a dtype ops may store in.
void expect_float(const char* op, const char* arg, const Tensor& t, Shape shape) {
  if (!t.defined() || (t.dtype != DType::f32 && !is_staged_dtype(t.dtype)) || t.shape != shape)
    throw RuntimeError(std::string(op) + ": argument '" + arg + "' expected a float tensor " +
                       "(fp32, fp16 or bf16) of shape " + shape.str() + ", got " +
                       (t.defined() ? dtype_name(t.dtype) : "undefined") + t.shape.str());
}

// A matmul's inp: a float tensor, or one stored quantised (MatmulSpec::inp).
void expect_matmul_inp(const char* op, const Tensor& t, Shape shape, const MatmulSpec& spec) {
  if (matmul_inp_quantised(t, spec) && t.shape == shape) return;
  expect_float(op, "inp", t, shape);
}

// ---- conversions

float widen_one(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::f16: return to_float(static_cast<const f16*>(p)[i]);
    case DType::bf16: return to_float(static_cast<const bf16*>(p)[i]);
    case DType::e4m3: return to_float(static_cast<const e4m3*>(p)[i]);
    case DType::e5m2: return to_float(static_cast<const e5m2*>(p)[i]);
    case DType::i32: break;
  }
  throw RuntimeError("not a float dtype");
}

// fp16 widens through a table of every value, fp8 arithmetically (both exact, checked against
// to_float in tests/test_formats.cpp).
template <class T, class Widen>
void widen_loop(const T* src, float* dst, int64_t n, Widen widen, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i].bits);
}

// dst[i] = src[i] widened to fp32 (exact).
void widen_into(const void* src, DType t, float* dst, int64_t n, int threads) {
  const std::array<float, 65536>& f16_table = fast::widen_tables().f16;
  switch (t) {
    case DType::f32: std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); return;
    case DType::f16:
      widen_loop(static_cast<const f16*>(src), dst, n,
                 [&](uint32_t b) { return f16_table[b]; }, threads);
      return;
    case DType::bf16:
      widen_loop(static_cast<const bf16*>(src), dst, n,
                 [](uint32_t b) { return fast::to_float(bf16::from_bits(uint16_t(b))); }, threads);
      return;
    case DType::e4m3:
      widen_loop(static_cast<const e4m3*>(src), dst, n,
                 [](uint32_t b) { return fast::e4m3_value(b); }, threads);
      return;
    case DType::e5m2:
      widen_loop(static_cast<const e5m2*>(src), dst, n,
                 [](uint32_t b) { return fast::e5m2_value(b); }, threads);
      return;
    case DType::i32: break;
  }
  throw RuntimeError("widen: not a float dtype");
}

constexpr uint32_t kMaxFiniteBits = 0x7F7FFFFFu;  // fp32's largest finite magnitude

// The conversion loops count in 32-bit lanes over blocks of this many elements and add each
// block's counts to 64-bit totals: 64-bit counters in the vectorised loop itself would halve its
// lanes and cost a widening per element.
constexpr int64_t kCountBlock = int64_t{1} << 14;

// dst[i] = round(src[i]) for one block, as the bit patterns of a format (`to_bits` gives them;
// `zero_mask` selects the magnitude bits), counting overflows (finite |x| above max_finite) and
// underflows (non-zero values that became zero). The counting is fused into the store loop: a
// few integer operations per element on the magnitude bits, without branches, so it vectorises.
template <bool kCount, class Bits, class ToBits>
CastCounts narrow_block(const float* src, Bits* dst, int64_t n, uint32_t max_bits,
                        uint32_t zero_mask, ToBits to_bits) {
  uint32_t over = 0, under = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = src[i];
    const uint32_t y = to_bits(x);
    dst[i] = static_cast<Bits>(y);
    if (kCount) {
      const uint32_t a = detail::float_to_bits(x) & 0x7FFFFFFFu;
      over += (a > max_bits) & (a <= kMaxFiniteBits);
      under += (a != 0) & ((y & zero_mask) == 0);
    }
  }
  return {kCount ? n : 0, over, under};
}

template <bool kCount, class Bits, class ToBits>
CastCounts narrow_loop(const float* src, Bits* dst, int64_t n, float max_finite,
                       uint32_t zero_mask, ToBits to_bits, int threads) {
  const uint32_t max_bits = detail::float_to_bits(max_finite);
  const int64_t blocks = (n + kCountBlock - 1) / kCountBlock;
  int64_t values = 0, over = 0, under = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : values, over, under)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kCountBlock, len = std::min(kCountBlock, n - i0);
    const CastCounts c =
        narrow_block<kCount>(src + i0, dst + i0, len, max_bits, zero_mask, to_bits);
    values += c.values;
    over += c.overflow;
    under += c.underflow;
  }
  return {values, over, under};
}

template <class Bits, class ToBits>
CastCounts narrow_loop(bool count, const float* src, void* dst, int64_t n, DType t,
                       uint32_t zero_mask, ToBits to_bits, int threads) {
  const float maxf = static_cast<float>(dtype_traits(t).max_finite);
  Bits* d = static_cast<Bits*>(dst);  // the format structs are their bits (formats.h)
  return count ? narrow_loop<true>(src, d, n, maxf, zero_mask, to_bits, threads)
               : narrow_loop<false>(src, d, n, maxf, zero_mask, to_bits, threads);
}

// dst = round(src) in dst's dtype; fp8 saturates to its largest finite value. Returns the
// cast counts (values 0 for an fp32 destination, which is a copy).
CastCounts narrow_into(const float* src, void* dst, DType t, int64_t n, int threads,
                       bool count = true) {
  switch (t) {
    case DType::f32: {
      float* d = static_cast<float*>(dst);
      if (d != src) std::memcpy(d, src, static_cast<size_t>(n) * sizeof(float));
      return {};
    }
    case DType::f16:
      return narrow_loop<uint16_t>(count, src, dst, n, t, 0x7FFFu,
                                   [](float x) { return fast::f16_bits(x); }, threads);
    case DType::bf16:
      return narrow_loop<uint16_t>(count, src, dst, n, t, 0x7FFFu,
                                   [](float x) { return fast::bf16_bits(x); }, threads);
    case DType::e4m3:
      return narrow_loop<uint8_t>(count, src, dst, n, t, 0x7Fu,
                                   [](float x) { return fast::e4m3_bits(x); }, threads);
    case DType::e5m2:
      return narrow_loop<uint8_t>(count, src, dst, n, t, 0x7Fu,
                                   [](float x) { return fast::e5m2_bits(x); }, threads);
    case DType::i32: break;
  }
  throw RuntimeError("narrow: not a float dtype");
}

// max |x| as the largest magnitude bit pattern, as a signed integer (the sign bit is cleared):
// integer max is exact and order-independent, a NaN (whose bits exceed infinity's) wins, and a
// signed 32-bit max vectorises with SSE2's compare (an unsigned or a float max would not).
inline int32_t magnitude_bits(float x) {
  return static_cast<int32_t>(detail::float_to_bits(x) & 0x7FFFFFFFu);
}
inline float amax_value(int32_t max_bits) {
  return detail::bits_to_float(static_cast<uint32_t>(max_bits));
}

// How quantise_loop reads an operand stored as fp32, bf16 or fp16: `widen` gives an element as
// fp32 (exact); `magnitude` its magnitude bits in the storage format, whose integer order is the
// order of |x| (NaN above infinity) so the amax is an integer max in the narrowest lanes (bf16's
// and fp16's 16-bit max is one SSE2 instruction; a 32-bit max of widened values did not
// vectorise beside 16-bit loads); `value` widens the largest magnitude back.
struct ReadF32 {
  using Src = float;
  using Mag = int32_t;
  static float widen(float x) { return x; }
  static Mag magnitude(float x) { return magnitude_bits(x); }
  float value(Mag m) const { return amax_value(m); }
};
struct ReadBf16 {
  using Src = uint16_t;
  using Mag = int16_t;
  static float widen(uint16_t b) { return fast::to_float(bf16::from_bits(b)); }
  static Mag magnitude(uint16_t b) { return static_cast<int16_t>(b & 0x7FFFu); }
  float value(Mag m) const { return widen(static_cast<uint16_t>(m)); }
};
struct ReadF16 {  // widens by table: a gather, so this one does not vectorise
  using Src = uint16_t;
  using Mag = int16_t;
  const float* table;
  float widen(uint16_t b) const { return table[b]; }
  static Mag magnitude(uint16_t b) { return static_cast<int16_t>(b & 0x7FFFu); }
  float value(Mag m) const { return table[static_cast<uint16_t>(m)]; }
};

// One narrowing cast of x counted as the loops below count, packed: an overflow (finite |x| above
// the format's largest value, max_bits) in the low 16 bits, an underflow (x non-zero, its stored
// magnitude bits zero) in the high 16. A block's sum fits (fewer than 2^16 elements).
inline uint32_t packed_cast_count(float x, uint32_t stored_magnitude, uint32_t max_bits) {
  const uint32_t a = detail::float_to_bits(x) & 0x7FFFFFFFu;
  return uint32_t((a > max_bits) & (a <= kMaxFiniteBits)) |
         (uint32_t((a != 0) & (stored_magnitude == 0)) << 16);
}

// Quantises one block of x[i] * scale to an fp8 format, as fp32 values of the fp8 grid (what
// the multiplications of an fp8 GEMM see), widening fp16/bf16 in the same pass (one pass over
// the operand instead of a widen pass and a quantise pass). Counts like narrow_block; with kAmax
// also returns the block's largest magnitude (before scaling) in *amax. The pointers are plain
// arguments, not captured by lambdas: GCC vectorises the loop only when it can see them.
template <bool kCount, bool kAmax, class Read, class ToBits, class Value>
CastCounts quantise_block(const typename Read::Src* x, Read read, float* y, int64_t n,
                          float scale, uint32_t max_bits, ToBits to_bits, Value value,
                          typename Read::Mag* amax_out) {
  // Overflows in the low 16 bits, underflows in the high 16 (a block has fewer than 2^16
  // elements): with two separate counters GCC 12 does not vectorise this loop, with one it does.
  static_assert(kCountBlock < (1 << 16), "a block's counts must fit in 16 bits");
  uint32_t counts = 0;
  typename Read::Mag amax = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (kAmax) {
      const typename Read::Mag a = Read::magnitude(x[i]);
      amax = a > amax ? a : amax;
    }
    const float s = read.widen(x[i]) * scale;
    const uint32_t q = to_bits(s);
    y[i] = value(q);
    if (kCount) counts += packed_cast_count(s, q & 0x7Fu, max_bits);
  }
  *amax_out = amax;
  return {kCount ? n : 0, counts & 0xFFFFu, counts >> 16};
}

// quantise_block over the whole operand; with kAmax the operand's amax goes to *amax_out.
template <bool kCount, bool kAmax, class Read, class ToBits, class Value>
CastCounts quantise_loop(const typename Read::Src* x, Read read, float* y, int64_t n,
                         float scale, float max_finite, ToBits to_bits, Value value,
                         float* amax_out, int threads) {
  using Mag = typename Read::Mag;
  const uint32_t max_bits = detail::float_to_bits(max_finite);
  const int64_t blocks = (n + kCountBlock - 1) / kCountBlock;
  int64_t values = 0, over = 0, under = 0;
  Mag amax = 0;
#pragma omp parallel for schedule(static) num_threads(threads) \
    reduction(+ : values, over, under) reduction(max : amax)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kCountBlock, len = std::min(kCountBlock, n - i0);
    Mag m = 0;
    const CastCounts c = quantise_block<kCount, kAmax>(x + i0, read, y + i0, len, scale,
                                                       max_bits, to_bits, value, &m);
    values += c.values;
    over += c.overflow;
    under += c.underflow;
    amax = m > amax ? m : amax;
  }
  if (kAmax) *amax_out = read.value(amax);
  return {values, over, under};
}

// max |x| over n values; NaN when any is NaN.
float amax_of(const float* x, int64_t n, int threads) {
  int32_t m = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t a = magnitude_bits(x[i]);
    m = a > m ? a : m;
  }
  return amax_value(m);
}

// The buffer's data, grown to at least n elements: to exactly n (reserve, then resize within
// it), so that the memory ledger can predict the capacity; in steady state it never reallocates.
// Its contents do not survive growing (every caller writes the buffer before reading it), so the
// old buffer is released before the new one is made: the backend never holds both, which the
// ledger (the steady state) would not predict. `mem` counts the capacity.
float* grow(std::vector<float>& buf, int64_t n, MemoryCounter& mem) {
  if (static_cast<int64_t>(buf.size()) < n) {
    mem.sub(buf.capacity() * sizeof(float));
    std::vector<float>().swap(buf);
    buf.reserve(static_cast<size_t>(n));
    buf.resize(static_cast<size_t>(n));
    mem.add(buf.capacity() * sizeof(float));
  }
  return buf.data();
}

}  // namespace

// ---- staging

float* CpuBackend::staging(Slot slot, int64_t n) {
  return grow(staging_[slot], n, *mem_);
}

Tensor CpuBackend::widen(Tensor t, Slot slot) {
  if (!t.defined() || t.dtype == DType::f32) return t;
  MPT_CHECK(dtype_is_float(t.dtype), "widen: int32 tensor");
  float* p = staging(slot, t.numel());
  widen_into(t.data, t.dtype, p, t.numel(), threads_);
  return Tensor(p, DType::f32, t.shape);
}

Tensor CpuBackend::output(Tensor t, Slot slot, bool accumulates) {
  if (!t.defined() || t.dtype == DType::f32) return t;
  if (accumulates) return widen(t, slot);
  return Tensor(staging(slot, t.numel()), DType::f32, t.shape);
}

void CpuBackend::commit(Tensor t, Tensor staged, TensorClass cls) {
  if (!t.defined() || t.data == staged.data) return;
  counts_of(cls) +=
      narrow_into(staged.as<float>(), t.data, t.dtype, t.numel(), threads_, counting_);
}

size_t CpuBackend::workspace_bytes() const {
  size_t n = 0;
  for (const auto& b : staging_) n += b.capacity() * sizeof(float);
  for (const auto& b : operand_scratch_) n += b.capacity() * sizeof(float);
  return n;
}

// ---- dtype support

void CpuBackend::fill(Tensor t, float value) {
  MPT_CHECK(dtype_is_float(t.dtype), "fill needs a float tensor");
  fp8_caches_->forget(t.data, t.bytes());  // a cache filled over is stale
  const int64_t n = t.numel();
  if (t.dtype == DType::f32) {
    float* p = t.as<float>();
#pragma omp parallel for schedule(static) num_threads(threads_)
    for (int64_t i = 0; i < n; ++i) p[i] = value;
    return;
  }
  // One element rounded once, then replicated (a fill is not a cast of data: not counted).
  narrow_into(&value, t.data, t.dtype, 1, 1, /*count=*/false);
  const size_t es = dtype_size(t.dtype);
  char* p = static_cast<char*>(t.data);
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t i = 1; i < n; ++i) std::memcpy(p + i * es, p, es);
}

void CpuBackend::cast(Tensor dst, Tensor src, TensorClass cls) {
  MPT_CHECK(dst.numel() == src.numel(), "cast: element counts differ");
  MPT_CHECK(dtype_is_float(dst.dtype) && dtype_is_float(src.dtype), "cast: float tensors only");
  if (dst.dtype == DType::f32) {  // widening (or a copy): exact, uncounted, and no staging
    if (dst.data != src.data)
      widen_into(src.data, src.dtype, dst.as<float>(), dst.numel(), threads_);
    return;
  }
  const Tensor s = widen(src, kIn0);
  counts_of(cls) +=
      narrow_into(s.as<float>(), dst.data, dst.dtype, dst.numel(), threads_, counting_);
}

float CpuBackend::amax(Tensor t) {
  const Tensor w = widen(t, kIn0);
  return amax_of(w.as<float>(), w.numel(), threads_);
}

int64_t CpuBackend::count_nonfinite(Tensor t) {
  const Tensor w = widen(t, kIn0);
  const float* x = w.as<float>();
  const int64_t n = w.numel();
  int64_t bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads_) reduction(+ : bad)
  for (int64_t i = 0; i < n; ++i) bad += !std::isfinite(x[i]);
  return bad;
}

CastCounts CpuBackend::cast_counts(TensorClass cls) const { return counts_[static_cast<int>(cls)]; }

void CpuBackend::reset_cast_counts() { counts_ = {}; }

// ---- ops: stage, run the fp32 kernel, commit

void CpuBackend::embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe) {
  const Tensor o = output(out, kOut, false);
  embedding_forward_f32(o, tokens, widen(wte, kWeight), widen(wpe, kBias));
  commit(out, o, TensorClass::activation);
}

void CpuBackend::embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) {
  const Tensor gw = output(dwte, kGrad0, true), gp = output(dwpe, kGrad1, true);
  embedding_backward_f32(gw, gp, widen(dout, kIn0), tokens);
  commit(dwte, gw, TensorClass::gradient);
  commit(dwpe, gp, TensorClass::gradient);
}

void CpuBackend::layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp,
                                   Tensor weight, Tensor bias) {
  const Tensor o = output(out, kOut, false);
  layernorm_forward_f32(o, mean, rstd, widen(inp, kIn0), widen(weight, kWeight),
                        widen(bias, kBias));
  commit(out, o, TensorClass::activation);
}

void CpuBackend::layernorm_forward_fp8(Tensor out, Tensor mean, Tensor rstd, Tensor inp,
                                       Tensor weight, Tensor bias, const Fp8Output& fp8) {
  check_fp8_output("layernorm_forward_fp8", out, fp8);
  // layernorm_forward_f32 checks the shapes (of an fp32 view of out's shape).
  const Tensor o(staging(kOut, out.numel()), DType::f32, out.shape);
  layernorm_forward_f32(o, mean, rstd, widen(inp, kIn0), widen(weight, kWeight),
                        widen(bias, kBias));
  store_fp8(out, o.as<float>(), fp8);
}

void CpuBackend::layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                    Tensor inp, Tensor weight, Tensor mean, Tensor rstd) {
  const Tensor dx = output(dinp, kOut, true), dw = output(dweight, kGrad0, true),
               db = output(dbias, kGrad1, true);
  layernorm_backward_f32(dx, dw, db, widen(dout, kIn1), widen(inp, kIn2), widen(weight, kWeight),
                         mean, rstd);
  commit(dinp, dx, TensorClass::gradient);
  commit(dweight, dw, TensorClass::gradient);
  commit(dbias, db, TensorClass::gradient);
}

void CpuBackend::attention_forward(Tensor out, Tensor lse, Tensor qkv, int n_head,
                                   MatmulPrecision prec) {
  const OperandFormat f = attention_operand_format(qkv.dtype, qkv.dtype, prec);
  const Tensor o = output(out, kOut, false);
  attention_forward_f32(o, lse, widen(qkv, kIn0), n_head, f);
  commit(out, o, TensorClass::activation);
}

void CpuBackend::attention_backward(Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse, int n_head,
                                    MatmulPrecision prec) {
  const OperandFormat f = attention_operand_format(qkv.dtype, dout.dtype, prec);
  const Tensor dx = output(dqkv, kOut, false);
  attention_backward_f32(dx, widen(dout, kIn1), widen(qkv, kIn0), lse, n_head, f);
  commit(dqkv, dx, TensorClass::gradient);
}

void CpuBackend::gelu_forward(Tensor out, Tensor inp) {
  const Tensor o = output(out, kOut, false);
  gelu_forward_f32(o, widen(inp, kIn0));
  commit(out, o, TensorClass::activation);
}

void CpuBackend::gelu_forward_fp8(Tensor out, Tensor inp, const Fp8Output& fp8) {
  check_fp8_output("gelu_forward_fp8", out, fp8);
  const Tensor o(staging(kOut, out.numel()), DType::f32, out.shape);
  gelu_forward_f32(o, widen(inp, kIn0));  // checks inp has out's size
  store_fp8(out, o.as<float>(), fp8);
}

void CpuBackend::gelu_backward(Tensor dinp, Tensor inp, Tensor dout) {
  const Tensor dx = output(dinp, kOut, false);
  gelu_backward_f32(dx, widen(inp, kIn0), widen(dout, kIn1));
  commit(dinp, dx, TensorClass::gradient);
}

void CpuBackend::residual_forward(Tensor out, Tensor a, Tensor b) {
  const Tensor o = output(out, kOut, false);
  residual_forward_f32(o, widen(a, kIn0), widen(b, kIn1));
  commit(out, o, TensorClass::activation);
}

void CpuBackend::crossentropy_forward_backward(Tensor losses, Tensor logits, Tensor targets,
                                               int vocab_size, float dloss) {
  // The logits are read and, with dloss != 0, overwritten in place with their gradient.
  const Tensor l = widen(logits, kOut);
  crossentropy_f32(losses, l, targets, vocab_size, dloss);
  if (dloss != 0.0f) commit(logits, l, TensorClass::gradient);
}

// ---- matmuls

const float* CpuBackend::matmul_operand(Tensor t, Slot slot, const MatmulSpec& spec,
                                        const Fp8Operand& q, CastCounts* counts, int scratch,
                                        float* scale_inv) {
  *scale_inv = 1.0f;
  if (spec.prec != MatmulPrecision::fp8) {
    const Tensor w = widen(t, slot);
    const float* x = w.as<float>();
    if (spec.prec == MatmulPrecision::native) return x;
    const int64_t n = w.numel();
    // tf32: a staged copy is rounded in place; the caller's own fp32 memory must not change.
    float* y = w.data != t.data ? const_cast<float*>(x) : grow(operand_scratch_[scratch], n, *mem_);
#pragma omp parallel for schedule(static) num_threads(threads_)
    for (int64_t i = 0; i < n; ++i) y[i] = round_tf32(x[i]);
    return y;
  }
  MPT_CHECK(q.format == DType::e4m3 || q.format == DType::e5m2,
            std::string("fp8 matmul: operand format must be e4m3 or e5m2, got ") +
                dtype_name(q.format));
  MPT_CHECK(std::isfinite(q.scale) && q.scale > 0.0f, "fp8 matmul: scale must be finite and > 0");
  if (t.dtype == q.format) {
    // Stored quantised (MatmulSpec::inp): its values as they are, in the slot a 16-bit operand
    // widens into (so the workspace is the same).
    float* y = staging(slot, t.numel());
    widen_into(t.data, t.dtype, y, t.numel(), threads_);
    *scale_inv = 1.0f / q.scale;
    return y;
  }
  MPT_CHECK(t.dtype == DType::f32 || is_staged_dtype(t.dtype),
            std::string("fp8 matmul: operand must be fp32, fp16 or bf16, got ") +
                dtype_name(t.dtype));
  const int64_t n = t.numel();
  // fp16/bf16 operands are widened and quantised in one pass into their staging slot; an fp32
  // operand (the caller's memory, which must not change) is quantised into scratch.
  float* y = t.dtype == DType::f32 ? grow(operand_scratch_[scratch], n, *mem_) : staging(slot, n);
  // The amax of the unquantised operand (what delayed scaling records for the next steps) is
  // reduced in the same pass as the quantisation.
  const float maxf = static_cast<float>(dtype_traits(q.format).max_finite);
  // Lambdas, not function pointers: the conversions must inline into the loop to vectorise.
  auto e4 = [](float v) { return fast::e4m3_bits(v); };
  auto e4v = [](uint32_t b) { return fast::e4m3_value(b); };
  auto e5 = [](float v) { return fast::e5m2_bits(v); };
  auto e5v = [](uint32_t b) { return fast::e5m2_value(b); };
  // Counting only when the counts are wanted (the backward's re-quantisations are not counted).
  const bool count = counting_ && counts != nullptr;
  auto run = [&](auto read, auto to_bits, auto value) {
    using Src = typename decltype(read)::Src;
    const Src* x = static_cast<const Src*>(t.data);
    if (count)
      return q.amax ? quantise_loop<true, true>(x, read, y, n, q.scale, maxf, to_bits, value, q.amax, threads_)
                    : quantise_loop<true, false>(x, read, y, n, q.scale, maxf, to_bits, value, nullptr, threads_);
    return q.amax ? quantise_loop<false, true>(x, read, y, n, q.scale, maxf, to_bits, value, q.amax, threads_)
                  : quantise_loop<false, false>(x, read, y, n, q.scale, maxf, to_bits, value, nullptr, threads_);
  };
  auto run_format = [&](auto read) {
    return q.format == DType::e4m3 ? run(read, e4, e4v) : run(read, e5, e5v);
  };
  const CastCounts c = t.dtype == DType::f32    ? run_format(ReadF32{})
                       : t.dtype == DType::bf16 ? run_format(ReadBf16{})
                                                : run_format(ReadF16{fast::widen_tables().f16.data()});
  if (counts) *counts += c;
  *scale_inv = 1.0f / q.scale;
  return y;
}

void CpuBackend::store_inp_cache(const MatmulSpec& spec, const Tensor& inp, const float* x) {
  auto* c = static_cast<uint8_t*>(spec.inp_cache.data);
  const int64_t n = inp.numel();
  // x holds values of the fp8 grid (NaN included), so their bits are exact.
  if (spec.inp.format == DType::e4m3) {
#pragma omp parallel for schedule(static) num_threads(threads_)
    for (int64_t i = 0; i < n; ++i) c[i] = static_cast<uint8_t>(fast::e4m3_bits(x[i]));
  } else {
#pragma omp parallel for schedule(static) num_threads(threads_)
    for (int64_t i = 0; i < n; ++i) c[i] = static_cast<uint8_t>(fast::e5m2_bits(x[i]));
  }
  fp8_caches_->wrote(spec, inp);
}

namespace {

// One value's first cast of Fp8Output, to round_to: the rounded value, with the cast counted as
// narrow_block counts it (into the low and high halves of *counts, as quantise_block does).
template <class Fmt>  // Fmt: bits(x), the 16-bit pattern; value(bits), it widened
struct Round16 {
  static float round(float x, uint32_t max_bits, uint32_t& counts) {
    const uint32_t b = Fmt::bits(x);
    counts += packed_cast_count(x, b & 0x7FFFu, max_bits);
    return Fmt::value(b);
  }
};
struct Bf16Fmt {
  static uint32_t bits(float x) { return fast::bf16_bits(x); }
  static float value(uint32_t b) { return fast::to_float(bf16::from_bits(uint16_t(b))); }
};
struct F16Fmt {
  static uint32_t bits(float x) { return fast::f16_bits(x); }
  static float value(uint32_t b) { return fast::widen_tables().f16[b]; }
};
using RoundBf16 = Round16<Bf16Fmt>;
using RoundF16 = Round16<F16Fmt>;
struct RoundF32 {  // an fp32 value stored as fp32: no cast
  static float round(float x, uint32_t, uint32_t&) { return x; }
};

// out[i] = fp8 bits of saturate(RNE(round(x[i]) * scale)); both casts counted (the first only
// when Round narrows), max |round(x[i])| returned in *amax. Blocks of kCountBlock, as
// quantise_loop, so that the 16-bit counters cannot overflow.
template <class Round, class ToBits>
void store_fp8_loop(const float* x, uint8_t* out, int64_t n, DType round_to, float scale,
                    float fp8_max, ToBits to_bits, CastCounts* rounded, CastCounts* quantised,
                    float* amax, int threads) {
  constexpr bool narrows = !std::is_same_v<Round, RoundF32>;
  const uint32_t round_max =
      narrows ? detail::float_to_bits(static_cast<float>(dtype_traits(round_to).max_finite)) : 0;
  const uint32_t q_max = detail::float_to_bits(fp8_max);
  const int64_t blocks = (n + kCountBlock - 1) / kCountBlock;
  int64_t r_over = 0, r_under = 0, q_over = 0, q_under = 0;
  int32_t m = 0;
#pragma omp parallel for schedule(static) num_threads(threads) \
    reduction(+ : r_over, r_under, q_over, q_under) reduction(max : m)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kCountBlock, i1 = std::min(n, i0 + kCountBlock);
    uint32_t rc = 0, qc = 0;
    int32_t bm = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const float w = Round::round(x[i], round_max, rc);
      const int32_t a = magnitude_bits(w);
      bm = a > bm ? a : bm;
      const float s = w * scale;
      const uint32_t q = to_bits(s);
      out[i] = static_cast<uint8_t>(q);
      qc += packed_cast_count(s, q & 0x7Fu, q_max);
    }
    r_over += rc & 0xFFFFu;
    r_under += rc >> 16;
    q_over += qc & 0xFFFFu;
    q_under += qc >> 16;
    m = bm > m ? bm : m;
  }
  *rounded = {narrows ? n : 0, r_over, r_under};
  *quantised = {n, q_over, q_under};
  *amax = amax_value(m);
}

}  // namespace

void CpuBackend::store_fp8(Tensor out, const float* x, const Fp8Output& fp8) {
  const int64_t n = out.numel();
  auto* o = static_cast<uint8_t*>(out.data);
  const float maxf = static_cast<float>(dtype_traits(fp8.q.format).max_finite);
  CastCounts rounded, quantised;
  float amax = 0.0f;
  auto run = [&](auto round, auto to_bits) {
    using Round = decltype(round);
    store_fp8_loop<Round>(x, o, n, fp8.round_to, fp8.q.scale, maxf, to_bits, &rounded,
                          &quantised, &amax, threads_);
  };
  auto with_format = [&](auto round) {
    if (fp8.q.format == DType::e4m3)
      run(round, [](float v) { return fast::e4m3_bits(v); });
    else
      run(round, [](float v) { return fast::e5m2_bits(v); });
  };
  switch (fp8.round_to) {
    case DType::bf16: with_format(RoundBf16{}); break;
    case DType::f16: with_format(RoundF16{}); break;
    default: with_format(RoundF32{}); break;
  }
  fp8_caches_->forget(out.data, out.bytes());  // a cache written over by other means is stale
  if (counting_) {
    counts_of(TensorClass::activation) += rounded;
    counts_of(TensorClass::activation) += quantised;
  }
  if (fp8.q.amax) *fp8.q.amax = amax;
}

const float* CpuBackend::load_inp_cache(const MatmulSpec& spec, const Tensor& inp,
                                        float* scale_inv) {
  const auto* c = static_cast<const uint8_t*>(spec.inp_cache.data);
  const int64_t n = inp.numel();
  // Where matmul_operand would have quantised inp (the workspace the ledger plans).
  float* y = inp.dtype == DType::f32 ? grow(operand_scratch_[2], n, *mem_) : staging(kIn1, n);
  if (spec.inp.format == DType::e4m3) {
#pragma omp parallel for schedule(static) num_threads(threads_)
    for (int64_t i = 0; i < n; ++i) y[i] = fast::e4m3_value(c[i]);
  } else {
#pragma omp parallel for schedule(static) num_threads(threads_)
    for (int64_t i = 0; i < n; ++i) y[i] = fast::e5m2_value(c[i]);
  }
  *scale_inv = 1.0f / spec.inp.scale;
  return y;
}

void CpuBackend::matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias,
                                const MatmulSpec& spec) {
  const int64_t C = inp.dim(-1), N = inp.numel() / C, OC = weight.dim(0);
  expect_matmul_inp("matmul_forward", inp.reshape({N, C}), {N, C}, spec);
  expect_float("matmul_forward", "weight", weight, {OC, C});
  expect_float("matmul_forward", "out", out.reshape({N, OC}), {N, OC});
  if (spec.inp_cache.defined()) Fp8InpCaches::check("matmul_forward", spec, inp);
  const Tensor o = output(out, kOut, false);
  float* op = o.as<float>();
  float beta = 0.0f;
  if (bias.defined()) {
    expect_float("matmul_forward", "bias", bias, {OC});
    const float* b = widen(bias, kBias).as<float>();
#pragma omp parallel for schedule(static) num_threads(threads_)
    for (int64_t n = 0; n < N; ++n) std::memcpy(op + n * OC, b, OC * sizeof(float));
    beta = 1.0f;  // the bias enters in fp32, after the scaled product (a GEMM epilogue)
  }
  float si = 1.0f, sw = 1.0f;
  const float* x = matmul_operand(inp, kIn0, spec, spec.inp, &counts_of(TensorClass::activation),
                                  0, &si);
  if (spec.inp_cache.defined()) store_inp_cache(spec, inp, x);
  const float* w = matmul_operand(weight, kWeight, spec, spec.weight,
                                  &counts_of(TensorClass::weight), 1, &sw);
  {
    // out(N,OC) = (inp(N,C) . weight(OC,C)^T) * si * sw  [+ bias]
    BlasThreads blas(threads_);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, si * sw, x, C, w, C, beta, op,
                OC);
  }
  commit(out, o, TensorClass::activation);
}

void CpuBackend::matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                 Tensor inp, Tensor weight, const MatmulSpec& spec) {
  const int64_t C = inp.dim(-1), N = inp.numel() / C, OC = weight.dim(0);
  expect_matmul_inp("matmul_backward", inp.reshape({N, C}), {N, C}, spec);
  expect_float("matmul_backward", "weight", weight, {OC, C});
  expect_float("matmul_backward", "dout", dout.reshape({N, OC}), {N, OC});
  expect_float("matmul_backward", "dweight", dweight, {OC, C});
  if (spec.inp_cache.defined()) {
    Fp8InpCaches::check("matmul_backward", spec, inp);
    fp8_caches_->expect_holds("matmul_backward", spec, inp);  // before anything is written
  }
  // The bias gradient sums dout as stored, before any quantisation.
  if (dbias.defined()) {
    expect_float("matmul_backward", "dbias", dbias, {OC});
    const float* d = widen(dout, kIn0).as<float>();
    const Tensor db = output(dbias, kGrad1, true);
    float* dbp = db.as<float>();
    for_column_blocks(OC, threads_, [&](int64_t o0, int64_t o1) {
      for (int64_t n = 0; n < N; ++n) {
        const float* dr = d + n * OC;
        for (int64_t o = o0; o < o1; ++o) dbp[o] += dr[o];
      }
    });
    commit(dbias, db, TensorClass::gradient);
  }
  // The forward's inp and weight are quantised again with the forward's scales (the same fp8
  // values); only dout's cast is new, so only it is counted and reports an amax.
  Fp8Operand inp_q = spec.inp, weight_q = spec.weight;
  inp_q.amax = weight_q.amax = nullptr;
  float sd = 1.0f, sw = 1.0f, si = 1.0f;
  const float* dq =
      matmul_operand(dout, kIn0, spec, spec.dout, &counts_of(TensorClass::gradient), 0, &sd);
  if (dinp.defined()) {
    expect_float("matmul_backward", "dinp", dinp.reshape({N, C}), {N, C});
    const float* w = matmul_operand(weight, kWeight, spec, weight_q, nullptr, 1, &sw);
    const Tensor dx = output(dinp, kOut, false);
    {
      // dinp(N,C) = dout(N,OC) . weight(OC,C)
      BlasThreads blas(threads_);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, sd * sw, dq, OC, w, C,
                  0.0f, dx.as<float>(), C);
    }
    commit(dinp, dx, TensorClass::gradient);
  }
  const float* x = spec.inp_cache.defined() ? load_inp_cache(spec, inp, &si)
                                             : matmul_operand(inp, kIn1, spec, inp_q, nullptr, 2, &si);
  const Tensor dw = output(dweight, kGrad0, true);
  {
    // dweight(OC,C) += dout(N,OC)^T . inp(N,C)
    BlasThreads blas(threads_);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, sd * si, dq, OC, x, C, 1.0f,
                dw.as<float>(), C);
  }
  commit(dweight, dw, TensorClass::gradient);
}

// ---- optimizer support

double CpuBackend::sum_squares(Tensor t) {
  MPT_CHECK(dtype_is_float(t.dtype), "sum_squares needs a float tensor");
  const int64_t n = t.numel();
  // Fixed chunks summed in a fixed order: the result does not depend on the thread count.
  constexpr int64_t kChunk = 1 << 14;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks, 0.0);
  const void* data = t.data;
  const DType dt = t.dtype;
#pragma omp parallel for schedule(static) num_threads(threads_)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t i1 = std::min(n, (c + 1) * kChunk);
    double s = 0.0;
    if (dt == DType::f32) {
      const float* x = static_cast<const float*>(data);
      for (int64_t i = c * kChunk; i < i1; ++i) s += static_cast<double>(x[i]) * x[i];
    } else {
      for (int64_t i = c * kChunk; i < i1; ++i) {
        const double v = widen_one(data, dt, i);
        s += v * v;
      }
    }
    partial[c] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

void CpuBackend::adamw_update(Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                              const AdamWParams& p, AdamWStats* stats) {
  const int64_t n = param.numel();
  MPT_CHECK(grad.numel() == n && m.numel() == n && v.numel() == n, "adamw: sizes");
  MPT_CHECK(!master.defined() || (master.numel() == n && master.dtype == DType::f32),
            "adamw: the master copy must be fp32 and as large as the parameter");
  MPT_CHECK(!master.defined() || param.dtype != DType::f32,
            "adamw: a master copy of fp32 weights");
  float* mm = m.as<float>();
  float* vv = v.as<float>();
  // The weights being updated, in fp32: the master, or the parameter widened.
  const Tensor wt = master.defined() ? master : widen(param, kWeight);
  float* w = wt.as<float>();
  const Tensor g = widen(grad, kGrad0);
  const float* gp = g.as<float>();
  const bool count_lost = param.dtype == DType::bf16;
  const bool sr = p.stochastic_rounding && !master.defined() && param.dtype == DType::bf16;
  // Bias corrections in double: beta^step underflows gracefully and stays exact for long runs.
  const float c1 = static_cast<float>(1.0 / (1.0 - std::pow(double(p.beta1), double(p.step))));
  const float c2 = static_cast<float>(1.0 / (1.0 - std::pow(double(p.beta2), double(p.step))));
  int64_t lost = 0, over = 0, under = 0;  // over, under: of the stochastic rounding
  bf16* pb = sr ? param.as<bf16>() : nullptr;
  const float bf16_max = static_cast<float>(dtype_traits(DType::bf16).max_finite);
#pragma omp parallel for schedule(static) num_threads(threads_) reduction(+ : lost, over, under)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = gp[i] * p.grad_scale;
    const float mi = p.beta1 * mm[i] + (1.0f - p.beta1) * gi;
    const float vi = p.beta2 * vv[i] + (1.0f - p.beta2) * gi * gi;
    mm[i] = mi;
    vv[i] = vi;
    const float mhat = mi * c1, vhat = vi * c2;
    const float old = w[i];
    const float upd = p.lr * (mhat / (std::sqrt(vhat) + p.eps) + p.weight_decay * old);
    const float now = old - upd;
    if (count_lost) lost += std::fabs(upd) < fast::bf16_half_ulp(old);
    if (sr) {
      // A narrowing cast of the weights like any other: counted as narrow_loop counts.
      const bf16 b = bf16_from_float_stochastic(
          now, stochastic_rounding_bits(p.sr_seed, p.step, p.sr_first_index + i));
      pb[i] = b;
      const float a = std::fabs(now);
      over += (a > bf16_max) & (a <= FLT_MAX);
      under += (a > 0.0f) & ((b.bits & 0x7FFFu) == 0);
    } else {
      w[i] = now;
    }
  }
  if (stats) {
    stats->values += n;
    stats->lost_updates += count_lost ? lost : 0;
  }
  if (sr) {
    if (counting_) counts_of(TensorClass::weight) += CastCounts{n, over, under};
    return;
  }
  // Round the updated weights into the copy the ops read (the parameter itself when fp32).
  if (wt.data != param.data)
    counts_of(TensorClass::weight) +=
        narrow_into(w, param.data, param.dtype, n, threads_, counting_);
}

}  // namespace mpt
