// Vectorisable conversions for the CPU backend's inner loops: the same results as
// core/formats.h bit for bit (tests/test_formats.cpp checks every fp16 and fp8 pattern and
// sampled and boundary fp32 inputs, and all 2^32 with MPT_EXHAUSTIVE_FORMATS=1), written without
// data-dependent branches so that GCC vectorises the loops over tensors. formats.h stays the
// readable definition; these are the fast path.
//
// Narrowing follows the classic bit-level scheme for fp32 -> fp16 with round to nearest even
// (as in F. Giesen, "float->half variants", 2016, float_to_half_fast3_rtne), generalised to the
// fp8 formats: normal results by integer rounding of the magnitude bits with the exponent
// rebiased, subnormal results by one fp32 addition of a "magic" power of two that shifts the
// value's bits into place (the FPU rounds to nearest even; fp32 arithmetic in the default
// rounding mode), overflow and NaN by selects.
#pragma once

#include <array>
#include <cstdint>

#include "core/formats.h"

namespace mpt::fast {

namespace detail {

using mpt::detail::bits_to_float;
using mpt::detail::float_to_bits;

// The magnitude bits of a format with M mantissa bits and exponent bias B, rounded to nearest
// even from fp32 magnitude bits `a` (finite or inf; NaN handled by the caller), with no upper
// bound (as formats.h's round_magnitude_rne).
template <int M, int B>
inline uint32_t round_magnitude(uint32_t a) {
  // Normal in the target: drop 23-M bits with ties to even; the exponent field is rebiased by
  // adding (B - 127) << 23 (mod 2^32; only used when the result is normal).
  constexpr uint32_t shift = 23 - M;
  const uint32_t normal =
      (a + (static_cast<uint32_t>(B - 127) << 23) + ((1u << (shift - 1)) - 1u) +
       ((a >> shift) & 1u)) >> shift;
  // Subnormal in the target (|x| below its smallest normal 2^(1-B)): |x| + 2^(shift + 1 - B)
  // puts the target's subnormal unit in fp32's last mantissa bit, so the FPU's rounding is the
  // target's; the magic's bits subtracted leave the subnormal count (up to 1 << M, the smallest
  // normal, correctly encoded).
  constexpr uint32_t magic_bits = static_cast<uint32_t>(127 - B + static_cast<int>(shift) + 1) << 23;
  const float magic = bits_to_float(magic_bits);
  const uint32_t sub = float_to_bits(bits_to_float(a) + magic) - magic_bits;
  constexpr uint32_t min_normal_bits = static_cast<uint32_t>(127 + 1 - B) << 23;
  return a < min_normal_bits ? sub : normal;
}

}  // namespace detail

// Narrowing, as raw bit patterns: loops that store these into uint16_t/uint8_t arrays
// vectorise (GCC does not if-convert the same code through the format structs).
inline uint32_t bf16_bits(float x) {
  const uint32_t u = detail::float_to_bits(x);
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t mag = (a + 0x7FFFu + ((a >> 16) & 1u)) >> 16;  // carries reach inf exactly
  return a > 0x7F800000u ? 0x7FFFu : (((u >> 16) & 0x8000u) | mag);
}

inline uint32_t f16_bits(float x) {
  const uint32_t u = detail::float_to_bits(x);
  const uint32_t a = u & 0x7FFFFFFFu;
  uint32_t mag = detail::round_magnitude<10, 15>(a);
  mag = a >= 0x477FF000u ? 0x7C00u : mag;  // >= 65520 = max + half an ulp: inf
  return a > 0x7F800000u ? 0x7FFFu : (((u >> 16) & 0x8000u) | mag);
}

inline uint32_t e4m3_bits(float x) {  // saturating, as Saturation::finite
  const uint32_t u = detail::float_to_bits(x);
  const uint32_t a = u & 0x7FFFFFFFu;
  uint32_t mag = detail::round_magnitude<3, 7>(a);
  mag = a >= 0x43E80000u ? 0x7Eu : mag;  // >= 464 (and inf): 448; guards the rebias's range too
  mag = mag > 0x7Eu ? 0x7Eu : mag;
  return a > 0x7F800000u ? 0x7Fu : (((u >> 24) & 0x80u) | mag);
}

inline uint32_t e5m2_bits(float x) {  // saturating, as Saturation::finite
  const uint32_t u = detail::float_to_bits(x);
  const uint32_t a = u & 0x7FFFFFFFu;
  uint32_t mag = detail::round_magnitude<2, 15>(a);
  mag = a >= 0x47700000u ? 0x7Bu : mag;  // >= 61440 (and inf): 57344
  mag = mag > 0x7Bu ? 0x7Bu : mag;
  return a > 0x7F800000u ? 0x7Fu : (((u >> 24) & 0x80u) | mag);
}

// Widening fp8 bit patterns arithmetically (a loop of these vectorises; a table lookup does not):
// the magnitude bits shifted into fp32's exponent and mantissa fields read as a value 2^(127-B)
// times too small, normal or subnormal alike, so one exact multiplication by a power of two
// restores it. NaN (and e5m2's infinity) by select.
inline float e4m3_value(uint32_t q) {
  const uint32_t mag = q & 0x7Fu;
  const float v = detail::bits_to_float(mag << 20) * 0x1p120f;
  const uint32_t b = detail::float_to_bits(v) | ((q & 0x80u) << 24);
  return detail::bits_to_float(mag == 0x7Fu ? (b | 0x7FF00000u) : b);  // the NaN, as to_float
}

inline float e5m2_value(uint32_t q) {
  const uint32_t mag = q & 0x7Fu;
  const float v = detail::bits_to_float(mag << 21) * 0x1p112f;
  const uint32_t sign = (q & 0x80u) << 24;
  const uint32_t payload = mag & 0x3u;  // 0: infinity; else a NaN, made quiet as to_float does
  const uint32_t special = 0x7F800000u | (payload << 21) | (uint32_t{payload != 0} << 22);
  return detail::bits_to_float(sign | (mag >= 0x7Cu ? special : detail::float_to_bits(v)));
}

inline bf16 bf16_from_float(float x) { return bf16::from_bits(static_cast<uint16_t>(bf16_bits(x))); }
inline f16 f16_from_float(float x) { return f16::from_bits(static_cast<uint16_t>(f16_bits(x))); }
inline e4m3 e4m3_from_float(float x) { return e4m3::from_bits(static_cast<uint8_t>(e4m3_bits(x))); }
inline e5m2 e5m2_from_float(float x) { return e5m2::from_bits(static_cast<uint8_t>(e5m2_bits(x))); }

inline float to_float(bf16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  return detail::bits_to_float((u & 0x7FFFFFFFu) > 0x7F800000u ? (u | 0x00400000u) : u);
}

// Half the ulp of the bf16 value nearest to w (its ulp above |w|): the smallest update that
// round-to-nearest can still apply to a bf16 weight w.
// (The branch-free bf16_bits, so the optimizer's loop vectorises.)
inline float bf16_half_ulp(float w) {
  return bf16_half_ulp_of_exponent((bf16_bits(w) >> 7) & 0xFFu);  // biased exponent of bf16(w)
}

// Widening fp16 by table: every fp16 value, computed once with formats.h's to_float (fp8
// widens arithmetically, e4m3_value / e5m2_value).
struct WidenTables {
  std::array<float, 65536> f16;
  WidenTables() {
    for (uint32_t i = 0; i < 65536; ++i) f16[i] = mpt::to_float(mpt::f16::from_bits(uint16_t(i)));
  }
};

// The table, built on first use (a function-local static: immutable after its thread-safe
// initialisation).
inline const WidenTables& widen_tables() {
  static const WidenTables tables;
  return tables;
}

}  // namespace mpt::fast
