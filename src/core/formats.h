// Low-precision number formats as storage types over raw bits: fp16 (IEEE binary16), bf16,
// fp8 e4m3 ("fn": no infinities, max 448) and fp8 e5m2 (IEEE-like, max 57344), plus tf32 as a
// float->float rounding. Header-only and usable from host code and CUDA device code.
//
// The structs carry bits and nothing else: no arithmetic, no implicit conversions, so a value is
// only ever widened or narrowed on purpose (c10's BFloat16 / Float8_e4m3fn idea). Every
// conversion is integer bit manipulation, so the result does not depend on the FPU's rounding
// mode, flush-to-zero setting or the compiler's floating-point flags, and it is the same on host
// and device.
//
// Rounding to a narrower format is round-to-nearest-even everywhere (stochastic rounding only
// where the name says so). The results match NVIDIA's conversion functions (cuda_fp16.h,
// cuda_bf16.h, cuda_fp8.h) bit for bit, NaN encodings included; tests/test_formats.cpp checks
// that exhaustively. docs/formats.md describes each format.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef MPT_HOST_DEVICE
#if defined(__CUDACC__)
#define MPT_HOST_DEVICE __host__ __device__
#else
#define MPT_HOST_DEVICE
#endif
#endif

namespace mpt {

// IEEE 754 binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
struct f16 {
  uint16_t bits;
  MPT_HOST_DEVICE static constexpr f16 from_bits(uint16_t b) { return f16{b}; }
};

// bfloat16: the top half of an fp32. 1 sign, 8 exponent (bias 127), 7 mantissa bits.
struct bf16 {
  uint16_t bits;
  MPT_HOST_DEVICE static constexpr bf16 from_bits(uint16_t b) { return bf16{b}; }
};

// fp8 E4M3 "fn": 1 sign, 4 exponent (bias 7), 3 mantissa bits. No infinities; the only NaNs are
// S.1111.111 (0x7F, 0xFF), so S.1111.110 = ±448 is the largest finite value.
struct e4m3 {
  uint8_t bits;
  MPT_HOST_DEVICE static constexpr e4m3 from_bits(uint8_t b) { return e4m3{b}; }
};

// fp8 E5M2: 1 sign, 5 exponent (bias 15), 2 mantissa bits; IEEE-like (the top half of an fp16):
// S.11111.00 is infinity, S.11111.{01,10,11} are NaNs, ±57344 is the largest finite value.
struct e5m2 {
  uint8_t bits;
  MPT_HOST_DEVICE static constexpr e5m2 from_bits(uint8_t b) { return e5m2{b}; }
};

static_assert(sizeof(f16) == 2 && sizeof(bf16) == 2 && sizeof(e4m3) == 1 && sizeof(e5m2) == 1,
              "formats are their raw bits");
static_assert(std::is_trivial<f16>::value && std::is_trivial<bf16>::value &&
                  std::is_trivial<e4m3>::value && std::is_trivial<e5m2>::value,
              "trivial, so arrays of them can live in device and shared memory");

// How a narrowing fp8 cast treats magnitudes beyond the format's largest finite value (and
// infinities). Mirrors cuda_fp8.h's __NV_SATFINITE / __NV_NOSAT.
enum class Saturation : uint8_t {
  finite,  // ±max (including ±inf -> ±max); NaN stays NaN. The default.
  none,    // e4m3: NaN (S.1111.111, sign kept); e5m2: ±inf.
};

namespace detail {

MPT_HOST_DEVICE inline uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MPT_HOST_DEVICE inline float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

constexpr uint32_t kF32Sign = 0x80000000u;
constexpr uint32_t kF32Abs = 0x7FFFFFFFu;
constexpr uint32_t kF32Inf = 0x7F800000u;
constexpr uint32_t kF32Quiet = 0x00400000u;

// Rounds the magnitude bits `a` of a finite or infinite fp32 (a <= 0x7F800000) to nearest-even in
// a format with M mantissa bits, exponent bias B and gradual underflow. Returns the format's
// magnitude bits (exponent << M | mantissa) without an upper bound: the caller decides what a
// result past its largest finite encoding means. Infinity comes back as some value past every
// finite encoding of a format with fewer than 8 exponent bits, and as the infinity encoding of an
// 8-bit-exponent format.
template <int M, int B>
MPT_HOST_DEVICE inline uint32_t round_magnitude_rne(uint32_t a) {
  static_assert(M > 0 && M < 23 && B >= 1 && B <= 127, "narrower than fp32");
  if constexpr (B == 127) {
    // fp32's exponent range (bf16, tf32): rounding is one integer add on the magnitude bits,
    // for normals and subnormals alike; a carry into the exponent field is the next binade, or
    // infinity. Branch-free, so loops over tensors vectorise.
    constexpr uint32_t shift = 23 - M;
    return (a + ((1u << (shift - 1)) - 1u) + ((a >> shift) & 1u)) >> shift;
  }
  // fp32 biased exponent of the target's smallest normal, 2^(1-B).
  constexpr uint32_t kMinNormalExp = 127 + 1 - B;
  const uint32_t e = a >> 23;
  uint32_t sig, shift;
  if (e >= kMinNormalExp) {
    // Normal in the target: drop 23-M mantissa bits. A carry out of the mantissa moves into the
    // exponent field, which is exactly the next binade.
    sig = a;
    shift = 23 - M;
  } else {
    // Subnormal in the target: express the value in units of the target's smallest subnormal,
    // 2^(1-B-M). An fp32 subnormal has exponent field 0 but the scale of exponent field 1.
    sig = e ? ((a & 0x7FFFFFu) | 0x800000u) : a;
    shift = (23 - M) + (kMinNormalExp - (e ? e : 1));
    if (shift > 25) return 0;  // sig < 2^24 <= half of the smallest subnormal: rounds to zero
  }
  const uint32_t kept = sig >> shift;
  const uint32_t rest = sig & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  const uint32_t up = (rest > half) || (rest == half && (kept & 1u));
  if (e >= kMinNormalExp) return kept + up - ((127u - B) << M);  // rebias the exponent field
  return kept + up;  // a carry into bit M is the smallest normal, correctly encoded
}

// Widens the magnitude bits of a format with E exponent bits (E < 8), M mantissa bits and bias B
// to fp32 magnitude bits, exactly. The exponent field's all-ones case is the caller's.
template <int M, int B>
MPT_HOST_DEVICE inline uint32_t widen_magnitude(uint32_t mag) {
  const uint32_t exp = mag >> M;
  uint32_t man = mag & ((1u << M) - 1);
  if (exp != 0) return ((exp + 127u - B) << 23) | (man << (23 - M));
  if (man == 0) return 0;
  // Subnormal: value = man * 2^(1-B-M); normalise (every such value is an fp32 normal).
  int e = 1 - B;
  while (!(man & (1u << M))) {
    man <<= 1;
    --e;
  }
  return (static_cast<uint32_t>(e + 127) << 23) | ((man & ((1u << M) - 1)) << (23 - M));
}

}  // namespace detail

// ---- widening: exact -------------------------------------------------------------------------
// NaNs stay NaNs: the sign and the payload's top bits are kept and the result is a quiet fp32
// NaN.

MPT_HOST_DEVICE inline float to_float(f16 h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t mag = h.bits & 0x7FFFu;
  if (mag >= 0x7C00u) {  // inf (mantissa 0) or NaN
    const uint32_t man = (mag & 0x3FFu) << 13;
    return detail::bits_to_float(sign | detail::kF32Inf | man | (man ? detail::kF32Quiet : 0));
  }
  return detail::bits_to_float(sign | detail::widen_magnitude<10, 15>(mag));
}

MPT_HOST_DEVICE inline float to_float(bf16 b) {
  uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  if ((u & detail::kF32Abs) > detail::kF32Inf) u |= detail::kF32Quiet;
  return detail::bits_to_float(u);
}

MPT_HOST_DEVICE inline float to_float(e4m3 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x80u) << 24;
  const uint32_t mag = v.bits & 0x7Fu;
  if (mag == 0x7Fu) return detail::bits_to_float(sign | 0x7FF00000u);  // the NaN, quiet
  return detail::bits_to_float(sign | detail::widen_magnitude<3, 7>(mag));
}

MPT_HOST_DEVICE inline float to_float(e5m2 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x80u) << 24;
  const uint32_t mag = v.bits & 0x7Fu;
  if (mag >= 0x7Cu) {  // inf (mantissa 0) or NaN
    const uint32_t man = (mag & 0x3u) << 21;
    return detail::bits_to_float(sign | detail::kF32Inf | man | (man ? detail::kF32Quiet : 0));
  }
  return detail::bits_to_float(sign | detail::widen_magnitude<2, 15>(mag));
}

// ---- narrowing: round to nearest, ties to even ----------------------------------------------
// Signed zeros and subnormals are kept (no flush to zero). Every NaN input becomes the canonical
// NaN NVIDIA's conversions return: 0x7FFF for fp16 and bf16, 0x7F for both fp8 formats (positive
// sign, all mantissa bits set).

// Overflow (|x| >= 65520 = max + half an ulp) gives ±inf, as IEEE 754 requires.
MPT_HOST_DEVICE inline f16 f16_from_float(float x) {
  const uint32_t u = detail::float_to_bits(x);
  const uint32_t a = u & detail::kF32Abs;
  if (a > detail::kF32Inf) return f16::from_bits(0x7FFFu);
  uint32_t mag = detail::round_magnitude_rne<10, 15>(a);
  if (mag > 0x7C00u) mag = 0x7C00u;
  return f16::from_bits(static_cast<uint16_t>(((u >> 16) & 0x8000u) | mag));
}

// Overflow (|x| >= bf16 max + half an ulp) gives ±inf, as IEEE 754 requires.
MPT_HOST_DEVICE inline bf16 bf16_from_float(float x) {
  const uint32_t u = detail::float_to_bits(x);
  const uint32_t a = u & detail::kF32Abs;
  if (a > detail::kF32Inf) return bf16::from_bits(0x7FFFu);
  const uint32_t mag = detail::round_magnitude_rne<7, 127>(a);  // <= 0x7F80 (inf) by itself
  return bf16::from_bits(static_cast<uint16_t>(((u >> 16) & 0x8000u) | mag));
}

// Rounding happens first, as if the format had S.1111.111 = 480 as a value; a result past 448
// (|x| > 464; exactly 464 ties to even, to 448) is an overflow that `sat` resolves. Infinities
// are overflows too.
MPT_HOST_DEVICE inline e4m3 e4m3_from_float(float x, Saturation sat = Saturation::finite) {
  const uint32_t u = detail::float_to_bits(x);
  const uint32_t a = u & detail::kF32Abs;
  if (a > detail::kF32Inf) return e4m3::from_bits(0x7Fu);
  uint32_t mag = detail::round_magnitude_rne<3, 7>(a);
  if (mag > 0x7Eu) mag = sat == Saturation::finite ? 0x7Eu : 0x7Fu;
  return e4m3::from_bits(static_cast<uint8_t>(((u >> 24) & 0x80u) | mag));
}

// IEEE-like: |x| >= 61440 (max + half an ulp) and ±inf overflow; `sat` resolves them.
MPT_HOST_DEVICE inline e5m2 e5m2_from_float(float x, Saturation sat = Saturation::finite) {
  const uint32_t u = detail::float_to_bits(x);
  const uint32_t a = u & detail::kF32Abs;
  if (a > detail::kF32Inf) return e5m2::from_bits(0x7Fu);
  uint32_t mag = detail::round_magnitude_rne<2, 15>(a);
  if (mag > 0x7Bu) mag = sat == Saturation::finite ? 0x7Bu : 0x7Cu;
  return e5m2::from_bits(static_cast<uint8_t>(((u >> 24) & 0x80u) | mag));
}

// ---- stochastic rounding to bf16 ------------------------------------------------------------
// Adds the low 16 bits of `random_bits` to the 16 fp32 bits that bf16 drops (bits 15..0 of the
// magnitude), then truncates them. With uniformly random bits, x rounds away from zero with
// probability (dropped bits)/2^16, i.e. proportionally to its distance from the lower-magnitude
// neighbour, so the result is unbiased. Works unchanged across subnormals and binade boundaries
// (a carry moves into the exponent). Zeros, infinities and exactly representable values are
// returned unchanged; NaN gives the canonical NaN 0x7FFF. A finite |x| above bf16's largest
// finite value has infinity as its upper neighbour and may round to it. The upper 16 bits of
// `random_bits` are ignored.
MPT_HOST_DEVICE inline bf16 bf16_from_float_stochastic(float x, uint32_t random_bits) {
  const uint32_t u = detail::float_to_bits(x);
  if ((u & detail::kF32Abs) > detail::kF32Inf) return bf16::from_bits(0x7FFFu);
  const uint32_t mag = ((u & detail::kF32Abs) + (random_bits & 0xFFFFu)) >> 16;  // <= 0x7F80
  return bf16::from_bits(static_cast<uint16_t>(((u >> 16) & 0x8000u) | mag));
}

// Counter-based random bits for stochastic rounding: SplitMix64's finaliser (Steele, Lea and
// Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014) over a key built from
// the seed, the step and the element index. Independent of threads and resumable; the CPU and
// CUDA backends both draw from this one function, so they round the same elements the same way.
MPT_HOST_DEVICE inline uint32_t stochastic_rounding_bits(uint64_t seed, int64_t step, int64_t i) {
  uint64_t z = seed ^ (static_cast<uint64_t>(step) * 0x9E3779B97F4A7C15ull) ^
               (static_cast<uint64_t>(i) * 0xD1B54A32D192ED03ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>((z ^ (z >> 31)) >> 32);
}

// Half the ulp of a bf16 value whose biased exponent field is `e` (its ulp above |w|): the
// smallest update round-to-nearest can still apply to that bf16 weight. ulp = 2^(e - 127 - 7)
// for a normal (e >= 1), 2^-133 for subnormals and zero (e = 0); half of it is 2^(e - 135): an
// fp32 normal when e > 8, else an fp32 subnormal.
MPT_HOST_DEVICE inline float bf16_half_ulp_of_exponent(uint32_t e) {
  return detail::bits_to_float(e > 8 ? (e - 8) << 23 : 1u << ((e ? e : 1) + 14));
}

// ---- float -> float: round to a format and widen back ----------------------------------------
// What the CPU reference backend uses to emulate storage in a format while computing in fp32.

MPT_HOST_DEVICE inline float round_to_f16(float x) { return to_float(f16_from_float(x)); }
MPT_HOST_DEVICE inline float round_to_bf16(float x) { return to_float(bf16_from_float(x)); }
MPT_HOST_DEVICE inline float round_to_e4m3(float x, Saturation sat = Saturation::finite) {
  return to_float(e4m3_from_float(x, sat));
}
MPT_HOST_DEVICE inline float round_to_e5m2(float x, Saturation sat = Saturation::finite) {
  return to_float(e5m2_from_float(x, sat));
}

// tf32: the operand format of Tensor Core "TF32" matmuls, fp32's sign and 8-bit exponent with a
// 10-bit mantissa, kept in fp32 storage. Rounds x's mantissa to 10 bits, to nearest with ties
// to even; fp32 subnormals are rounded the same way (not flushed). Overflow past the largest tf32
// value (+ half an ulp) gives ±inf; infinities pass through; NaN stays NaN (sign and payload
// top bits kept, quiet).
//
// Ties-to-even is a choice: PTX's cvt.rna.tf32.f32 rounds ties away from zero, while cuBLAS's
// documentation for CUBLAS_COMPUTE_32F_FAST_TF32 says round-to-nearest and does not say which
// way ties go. Ties are one fp32 in 2^13 and the two rules differ there by one tf32 ulp, so an
// emulated tf32 GEMM can differ from a given GPU's result in those operands only.
MPT_HOST_DEVICE inline float round_tf32(float x) {
  const uint32_t u = detail::float_to_bits(x);
  const uint32_t a = u & detail::kF32Abs;
  if (a > detail::kF32Inf) return detail::bits_to_float(u | detail::kF32Quiet);
  const uint32_t mag = detail::round_magnitude_rne<10, 127>(a) << 13;  // <= 0x7F800000 (inf)
  return detail::bits_to_float((u & detail::kF32Sign) | mag);
}

}  // namespace mpt
