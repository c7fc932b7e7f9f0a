// The low-precision formats (core/formats.h) and the dtype table.
//
// Two kinds of checks:
//  - Self-contained ones that run everywhere: round trips of every bit pattern, known encodings,
//    ties to even, overflow and saturation, signed zeros, subnormals, NaNs, monotonicity, and
//    every narrowing checked against an independent oracle (a sorted table of each format's
//    values, nearest with ties to the even encoding), tf32 against a nearbyint() oracle, and
//    the statistics of stochastic rounding.
//  - Comparisons with NVIDIA's own conversions (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h, used on
//    the host through their host code paths; no CUDA library is linked). Built when CMake finds
//    the toolkit's headers (MPT_HAVE_NVIDIA_FP_HEADERS); otherwise those tests skip, saying so.
//
// Narrowing is checked on a structured set instead of all 2^32 floats: checking every float
// against NVIDIA takes ~29 s for fp16 and ~11 s for bf16 (Release, 2 cores, OpenMP), ~170 s for
// all six conversions, over this suite's budget; Nvidia.EveryFloatWhenAsked does it on request.
// The set is every float whose low 13 bits are one of {0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF}
// (every sign, exponent and top-10-mantissa-bit prefix, so every tie, tie +- 1 and sticky-bit
// case for each format), 4M random bit patterns, and every midpoint between adjacent values of
// every format (and one fp32 ulp either side), which includes max + half an ulp and the
// subnormal boundaries, plus NaN payloads, infinities and zeros.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "backend/cpu/fast_formats.h"
#include "core/dtype.h"
#include "core/formats.h"
#include "core/rng.h"

#if MPT_HAVE_NVIDIA_FP_HEADERS
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#endif

using namespace mpt;

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float flt(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
std::string hex(uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

class Timer {
 public:
  explicit Timer(const char* what) : what_(what), t0_(std::chrono::steady_clock::now()) {}
  ~Timer() {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    std::printf("[  timing  ] %s: %.2f s\n", what_, s);
  }

 private:
  const char* what_;
  std::chrono::steady_clock::time_point t0_;
};

// The six narrowing conversions under test.
enum class Conv { f16, bf16, e4m3_sat, e4m3_nosat, e5m2_sat, e5m2_nosat };
constexpr Conv kConvs[] = {Conv::f16,        Conv::bf16,     Conv::e4m3_sat,
                           Conv::e4m3_nosat, Conv::e5m2_sat, Conv::e5m2_nosat};

const char* conv_name(Conv c) {
  switch (c) {
    case Conv::f16:
      return "fp16";
    case Conv::bf16:
      return "bf16";
    case Conv::e4m3_sat:
      return "e4m3 satfinite";
    case Conv::e4m3_nosat:
      return "e4m3 nosat";
    case Conv::e5m2_sat:
      return "e5m2 satfinite";
    case Conv::e5m2_nosat:
      return "e5m2 nosat";
  }
  return "?";
}

bool saturates(Conv c) { return c == Conv::e4m3_sat || c == Conv::e5m2_sat; }

uint32_t narrow(Conv c, float x) {
  switch (c) {
    case Conv::f16:
      return f16_from_float(x).bits;
    case Conv::bf16:
      return bf16_from_float(x).bits;
    case Conv::e4m3_sat:
      return e4m3_from_float(x, Saturation::finite).bits;
    case Conv::e4m3_nosat:
      return e4m3_from_float(x, Saturation::none).bits;
    case Conv::e5m2_sat:
      return e5m2_from_float(x).bits;  // the default is satfinite
    case Conv::e5m2_nosat:
      return e5m2_from_float(x, Saturation::none).bits;
  }
  return 0;
}

float widen(Conv c, uint32_t b) {
  switch (c) {
    case Conv::f16:
      return to_float(f16::from_bits(static_cast<uint16_t>(b)));
    case Conv::bf16:
      return to_float(bf16::from_bits(static_cast<uint16_t>(b)));
    case Conv::e4m3_sat:
    case Conv::e4m3_nosat:
      return to_float(e4m3::from_bits(static_cast<uint8_t>(b)));
    case Conv::e5m2_sat:
    case Conv::e5m2_nosat:
      return to_float(e5m2::from_bits(static_cast<uint8_t>(b)));
  }
  return 0;
}

// Independent reference for narrowing: the format's positive finite values in a sorted table
// (index == magnitude encoding), nearest value with ties to the even encoding, written from the
// format's definition rather than from formats.h's bit arithmetic.
struct Oracle {
  std::vector<double> values;  // values[m] = value of magnitude encoding m, 0 <= m <= max
  uint32_t sign_bit;
  uint32_t nan_bits;       // what any NaN input gives (NVIDIA's canonical NaN)
  uint32_t overflow_bits;  // magnitude on overflow: inf, max (satfinite) or the fp8 NaN (e4m3)

  uint32_t operator()(float x) const {
    if (std::isnan(x)) return nan_bits;
    const uint32_t s = std::signbit(x) ? sign_bit : 0;
    if (std::isinf(x)) return s | overflow_bits;
    const double a = std::fabs(static_cast<double>(x));
    const size_t n = values.size();
    const size_t i = std::lower_bound(values.begin(), values.end(), a) - values.begin();
    if (i < n && values[i] == a) return s | static_cast<uint32_t>(i);
    // Past the largest finite value the next "value" is max + one ulp (inf's place for IEEE
    // formats, the NaN pattern's for e4m3); rounding there means overflow.
    const double lo = values[i - 1];
    const double hi = i < n ? values[i] : lo + (lo - values[n - 2]);
    const double mid = (lo + hi) / 2;  // exact: both have few significant bits
    const uint32_t lo_bits = static_cast<uint32_t>(i - 1), hi_bits = static_cast<uint32_t>(i);
    const uint32_t r = a < mid ? lo_bits : a > mid ? hi_bits : (lo_bits & 1 ? hi_bits : lo_bits);
    return s | (r == n ? overflow_bits : r);
  }
};

// value of (exponent field e, mantissa m) in a format with M mantissa bits and bias B
double format_value(uint32_t e, uint32_t m, int M, int B) {
  if (e == 0) return std::ldexp(static_cast<double>(m), 1 - B - M);
  return std::ldexp(1.0 + std::ldexp(static_cast<double>(m), -M), static_cast<int>(e) - B);
}

Oracle make_oracle(Conv c) {
  int M = 0, B = 0;
  uint32_t max_bits = 0;
  Oracle o;
  switch (c) {
    case Conv::f16:
      M = 10;
      B = 15;
      max_bits = 0x7BFF;
      o.sign_bit = 0x8000;
      o.nan_bits = 0x7FFF;
      o.overflow_bits = 0x7C00;
      break;
    case Conv::bf16:
      M = 7;
      B = 127;
      max_bits = 0x7F7F;
      o.sign_bit = 0x8000;
      o.nan_bits = 0x7FFF;
      o.overflow_bits = 0x7F80;
      break;
    case Conv::e4m3_sat:
    case Conv::e4m3_nosat:
      M = 3;
      B = 7;
      max_bits = 0x7E;
      o.sign_bit = 0x80;
      o.nan_bits = 0x7F;
      o.overflow_bits = c == Conv::e4m3_sat ? 0x7E : 0x7F;
      break;
    case Conv::e5m2_sat:
    case Conv::e5m2_nosat:
      M = 2;
      B = 15;
      max_bits = 0x7B;
      o.sign_bit = 0x80;
      o.nan_bits = 0x7F;
      o.overflow_bits = c == Conv::e5m2_sat ? 0x7B : 0x7C;
      break;
  }
  for (uint32_t m = 0; m <= max_bits; ++m)
    o.values.push_back(format_value(m >> M, m & ((1u << M) - 1), M, B));
  return o;
}

// Every float whose low 13 bits are an interesting pattern, every adjacent-value midpoint of
// every format (+- one fp32 ulp), special values; built once.
const std::vector<uint32_t>& structured_inputs() {
  static const std::vector<uint32_t> v = [] {
    std::vector<uint32_t> out;
    const uint32_t lows[] = {0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF};
    for (uint32_t p = 0; p < (1u << 19); ++p)
      for (uint32_t low : lows) out.push_back((p << 13) | low);
    for (Conv c : {Conv::f16, Conv::bf16, Conv::e4m3_sat, Conv::e5m2_sat}) {
      const Oracle o = make_oracle(c);
      const size_t n = o.values.size();
      for (size_t i = 0; i < n; ++i) {
        const double lo = o.values[i];
        const double hi = i + 1 < n ? o.values[i + 1] : lo + (lo - o.values[n - 2]);
        const double mid = (lo + hi) / 2;
        if (mid > std::numeric_limits<float>::max()) continue;  // bf16's beyond-max midpoint
        const float f = static_cast<float>(mid);                // exact
        std::vector<float> near = {f, std::nextafter(f, 0.0f), std::nextafter(f, INFINITY)};
        if (hi <= std::numeric_limits<float>::max()) near.push_back(static_cast<float>(hi));
        for (float g : near) {
          out.push_back(bits(g));
          out.push_back(bits(g) | 0x80000000u);
        }
      }
    }
    const uint32_t specials[] = {0x00000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF,
                                 0x7F800000, 0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x7FC00001,
                                 0x7FFFFFFF, 0x7FA00000, 0x7F802000, 0x477FF000, 0x477FE000,
                                 0x43E80000, 0x43E80001, 0x43F00000, 0x47700000, 0x476FFFFF};
    for (uint32_t s : specials) {
      out.push_back(s);
      out.push_back(s | 0x80000000u);
    }
    return out;
  }();
  return v;
}

const std::vector<uint32_t>& random_inputs() {
  static const std::vector<uint32_t> v = [] {
    std::vector<uint32_t> out(4u << 20);
    Rng rng(20240611);
    for (auto& u : out) u = static_cast<uint32_t>(rng.next_u64() >> 32);
    return out;
  }();
  return v;
}

}  // namespace

// ---- the dtype table ----------------------------------------------------------------------

TEST(DTypeTable, NamesSizesAndOrder) {
  EXPECT_EQ(static_cast<int>(DType::f32), 0);
  EXPECT_EQ(static_cast<int>(DType::i32), 1);
  EXPECT_EQ(dtype_size(DType::f16), 2u);
  EXPECT_EQ(dtype_size(DType::bf16), 2u);
  EXPECT_EQ(dtype_size(DType::e4m3), 1u);
  EXPECT_EQ(dtype_size(DType::e5m2), 1u);
  EXPECT_STREQ(dtype_name(DType::f16), "fp16");
  EXPECT_STREQ(dtype_name(DType::bf16), "bf16");
  EXPECT_STREQ(dtype_name(DType::e4m3), "fp8_e4m3");
  EXPECT_STREQ(dtype_name(DType::e5m2), "fp8_e5m2");
  static_assert(dtype_of<f16>::value == DType::f16);
  static_assert(dtype_of<bf16>::value == DType::bf16);
  static_assert(dtype_of<e4m3>::value == DType::e4m3);
  static_assert(dtype_of<e5m2>::value == DType::e5m2);
  EXPECT_EQ(sizeof(f16), dtype_size(DType::f16));
  EXPECT_EQ(sizeof(e5m2), dtype_size(DType::e5m2));
}

TEST(DTypeTable, EpsilonIsTwoToMinusMantissaBits) {
  static_assert(dtype_epsilon(DType::f32) == 0x1p-23);
  static_assert(dtype_epsilon(DType::f16) == 0x1p-10);
  static_assert(dtype_epsilon(DType::bf16) == 0x1p-7);
  static_assert(dtype_epsilon(DType::e4m3) == 0x1p-3);
  static_assert(dtype_epsilon(DType::e5m2) == 0x1p-2);
  static_assert(kTf32Traits.epsilon == 0x1p-10);
  EXPECT_EQ(dtype_epsilon(DType::i32), 0.0);
  for (DType t : {DType::f32, DType::f16, DType::bf16, DType::e4m3, DType::e5m2})
    EXPECT_EQ(dtype_traits(t).epsilon, std::ldexp(1.0, -dtype_traits(t).mantissa_bits));
  EXPECT_EQ(dtype_traits(DType::f32).epsilon, std::numeric_limits<float>::epsilon());
  EXPECT_EQ(dtype_traits(DType::f32).max_finite, std::numeric_limits<float>::max());
  EXPECT_EQ(dtype_traits(DType::f32).min_normal, std::numeric_limits<float>::min());
  EXPECT_EQ(dtype_traits(DType::f32).min_subnormal, std::numeric_limits<float>::denorm_min());
}

// The traits table agrees with the encodings: the largest finite pattern, the first normal, the
// first subnormal and the successor of 1.0.
TEST(DTypeTable, TraitsMatchTheEncodings) {
  struct Row {
    DType t;
    Conv c;
    uint32_t max_bits, one_bits;
  };
  for (Row r :
       {Row{DType::f16, Conv::f16, 0x7BFF, 0x3C00}, Row{DType::bf16, Conv::bf16, 0x7F7F, 0x3F80},
        Row{DType::e4m3, Conv::e4m3_sat, 0x7E, 0x38},
        Row{DType::e5m2, Conv::e5m2_sat, 0x7B, 0x3C}}) {
    SCOPED_TRACE(dtype_name(r.t));
    const DTypeTraits tr = dtype_traits(r.t);
    EXPECT_EQ(widen(r.c, r.max_bits), tr.max_finite);
    EXPECT_EQ(widen(r.c, 1u << tr.mantissa_bits), tr.min_normal);
    EXPECT_EQ(widen(r.c, 1), tr.min_subnormal);
    EXPECT_EQ(widen(r.c, r.one_bits), 1.0f);
    EXPECT_EQ(widen(r.c, r.one_bits + 1), 1.0 + tr.epsilon);
    EXPECT_EQ(tr.has_inf, std::isinf(widen(r.c, r.max_bits + 1)));
  }
  // tf32: the same facts through round_tf32.
  EXPECT_EQ(round_tf32(static_cast<float>(kTf32Traits.max_finite)), kTf32Traits.max_finite);
  EXPECT_EQ(round_tf32(static_cast<float>(1.0 + kTf32Traits.epsilon)), 1.0 + kTf32Traits.epsilon);
  EXPECT_EQ(round_tf32(static_cast<float>(kTf32Traits.min_subnormal)), kTf32Traits.min_subnormal);
  EXPECT_EQ(round_tf32(static_cast<float>(kTf32Traits.min_subnormal) * 0.75f),
            kTf32Traits.min_subnormal);
}

// ---- self-contained properties --------------------------------------------------------------

TEST(Formats, KnownEncodingsWiden) {
  EXPECT_EQ(to_float(f16::from_bits(0x3C00)), 1.0f);
  EXPECT_EQ(to_float(f16::from_bits(0xC000)), -2.0f);
  EXPECT_EQ(to_float(f16::from_bits(0x3555)), 0.333251953125f);
  EXPECT_EQ(to_float(f16::from_bits(0x7BFF)), 65504.0f);
  EXPECT_EQ(to_float(f16::from_bits(0x0001)), 0x1p-24f);
  EXPECT_EQ(to_float(f16::from_bits(0x03FF)), 0x1.ff8p-15f);
  EXPECT_EQ(to_float(f16::from_bits(0x7C00)), INFINITY);
  EXPECT_EQ(to_float(f16::from_bits(0xFC00)), -INFINITY);
  EXPECT_EQ(bits(to_float(f16::from_bits(0x8000))), 0x80000000u);
  EXPECT_EQ(to_float(bf16::from_bits(0x3F80)), 1.0f);
  EXPECT_EQ(to_float(bf16::from_bits(0x7F7F)), 0x1.fep127f);
  EXPECT_EQ(to_float(bf16::from_bits(0x0001)), 0x1p-133f);
  EXPECT_EQ(to_float(bf16::from_bits(0xFF80)), -INFINITY);
  EXPECT_EQ(to_float(e4m3::from_bits(0x38)), 1.0f);
  EXPECT_EQ(to_float(e4m3::from_bits(0x7E)), 448.0f);
  EXPECT_EQ(to_float(e4m3::from_bits(0xFE)), -448.0f);
  EXPECT_EQ(to_float(e4m3::from_bits(0x78)), 256.0f);
  EXPECT_EQ(to_float(e4m3::from_bits(0x77)), 240.0f);
  EXPECT_EQ(to_float(e4m3::from_bits(0x08)), 0x1p-6f);
  EXPECT_EQ(to_float(e4m3::from_bits(0x01)), 0x1p-9f);
  EXPECT_EQ(to_float(e4m3::from_bits(0x07)), 7 * 0x1p-9f);
  EXPECT_EQ(to_float(e5m2::from_bits(0x3C)), 1.0f);
  EXPECT_EQ(to_float(e5m2::from_bits(0x7B)), 57344.0f);
  EXPECT_EQ(to_float(e5m2::from_bits(0x7C)), INFINITY);
  EXPECT_EQ(to_float(e5m2::from_bits(0xFC)), -INFINITY);
  EXPECT_EQ(to_float(e5m2::from_bits(0x04)), 0x1p-14f);
  EXPECT_EQ(to_float(e5m2::from_bits(0x01)), 0x1p-16f);
  for (uint32_t b : {0x7Du, 0x7Eu, 0x7Fu, 0xFDu, 0xFFu})
    EXPECT_TRUE(std::isnan(widen(Conv::e5m2_sat, b)));
  for (uint32_t b : {0x7Fu, 0xFFu}) EXPECT_TRUE(std::isnan(widen(Conv::e4m3_sat, b)));
}

// Every encoding widens and narrows back to itself (NaNs to the canonical NaN; infinities to
// ±max under satfinite), in every mode.
TEST(Formats, EveryEncodingRoundTrips) {
  for (Conv c : kConvs) {
    SCOPED_TRACE(conv_name(c));
    const uint32_t n = (c == Conv::f16 || c == Conv::bf16) ? 65536 : 256;
    const uint32_t canonical_nan = n == 65536 ? 0x7FFF : 0x7F;
    for (uint32_t b = 0; b < n; ++b) {
      const float f = widen(c, b);
      const uint32_t back = narrow(c, f);
      if (std::isnan(f)) {
        ASSERT_EQ(back, canonical_nan) << hex(b);
      } else if (std::isinf(f) && saturates(c)) {
        ASSERT_EQ(back, (b & 0x80) | 0x7B) << hex(b);  // e5m2: the only fp8 with infinities
      } else {
        ASSERT_EQ(back, b) << hex(b);
      }
      ASSERT_EQ(std::signbit(f), (b & (n >> 1)) != 0) << hex(b);
    }
  }
}

// Positive encodings widen to strictly increasing values up to the largest finite one; negative
// encodings mirror them.
TEST(Formats, WideningIsMonotoneAndSymmetric) {
  for (Conv c : {Conv::f16, Conv::bf16, Conv::e4m3_sat, Conv::e5m2_sat}) {
    SCOPED_TRACE(conv_name(c));
    const uint32_t sign = (c == Conv::f16 || c == Conv::bf16) ? 0x8000 : 0x80;
    float prev = -1;
    for (uint32_t b = 0; b < sign; ++b) {
      const float f = widen(c, b);
      if (std::isnan(f)) break;
      ASSERT_GT(f, prev) << hex(b);
      ASSERT_EQ(widen(c, b | sign), -f) << hex(b);
      prev = f;
    }
  }
}

// Narrowing against the table oracle on the structured and random inputs, and monotone.
TEST(Formats, NarrowingMatchesNearestEvenOracle) {
  Timer timer("oracle comparison, 6 conversions");
  for (Conv c : kConvs) {
    SCOPED_TRACE(conv_name(c));
    const Oracle oracle = make_oracle(c);
    size_t bad = 0;
    for (const auto* inputs : {&structured_inputs(), &random_inputs()})
      for (uint32_t u : *inputs) {
        const uint32_t got = narrow(c, flt(u)), want = oracle(flt(u));
        if (got != want && ++bad <= 5)
          ADD_FAILURE() << "input " << hex(u) << " (" << flt(u) << "): got " << hex(got) << " want "
                        << hex(want);
      }
    EXPECT_EQ(bad, 0u);
  }
}

TEST(Formats, NarrowingIsMonotone) {
  std::vector<float> xs;
  for (uint32_t u : random_inputs())
    if (!std::isnan(flt(u)) && std::fabs(flt(u)) < 1e6f) xs.push_back(flt(u));
  for (int i = -300000; i <= 300000; ++i) xs.push_back(i * 0.001f);
  std::sort(xs.begin(), xs.end());
  for (Conv c : kConvs) {
    SCOPED_TRACE(conv_name(c));
    float prev = -INFINITY;
    for (float x : xs) {
      const float y = widen(c, narrow(c, x));
      if (std::isnan(y)) continue;  // e4m3 nosat overflow
      ASSERT_GE(y, prev) << x;
      prev = y;
    }
  }
}

TEST(Formats, TiesToEvenOnHandPickedValues) {
  // fp16: ulp at 1 is 2^-10.
  EXPECT_EQ(f16_from_float(1 + 0x1p-11f).bits, 0x3C00);
  EXPECT_EQ(f16_from_float(1 + 3 * 0x1p-11f).bits, 0x3C02);
  EXPECT_EQ(f16_from_float(std::nextafter(1 + 0x1p-11f, 2.0f)).bits, 0x3C01);
  EXPECT_EQ(f16_from_float(2049.0f).bits, f16_from_float(2048.0f).bits);
  EXPECT_EQ(f16_from_float(2051.0f).bits, f16_from_float(2052.0f).bits);
  EXPECT_EQ(f16_from_float(-(1 + 0x1p-11f)).bits, 0xBC00);
  // bf16: ulp at 1 is 2^-7.
  EXPECT_EQ(bf16_from_float(1 + 0x1p-8f).bits, 0x3F80);
  EXPECT_EQ(bf16_from_float(1 + 3 * 0x1p-8f).bits, 0x3F82);
  EXPECT_EQ(bf16_from_float(flt(0x3F808001)).bits, 0x3F81);
  EXPECT_EQ(bf16_from_float(flt(0x3F807FFF)).bits, 0x3F80);
  // e4m3: ulp at 1 is 2^-3.
  EXPECT_EQ(e4m3_from_float(1 + 0x1p-4f).bits, 0x38);
  EXPECT_EQ(e4m3_from_float(1 + 3 * 0x1p-4f).bits, 0x3A);
  EXPECT_EQ(e4m3_from_float(-(1 + 3 * 0x1p-4f)).bits, 0xBA);
  EXPECT_EQ(e4m3_from_float(std::nextafter(1 + 0x1p-4f, 0.0f)).bits, 0x38);
  EXPECT_EQ(e4m3_from_float(std::nextafter(1 + 0x1p-4f, 2.0f)).bits, 0x39);
  // e5m2: ulp at 1 is 2^-2.
  EXPECT_EQ(e5m2_from_float(1 + 0x1p-3f).bits, 0x3C);
  EXPECT_EQ(e5m2_from_float(1 + 3 * 0x1p-3f).bits, 0x3E);
  // tf32: ulp at 1 is 2^-10.
  EXPECT_EQ(round_tf32(1 + 0x1p-11f), 1.0f);
  EXPECT_EQ(round_tf32(1 + 3 * 0x1p-11f), 1 + 0x1p-9f);
  EXPECT_EQ(round_tf32(-(1 + 3 * 0x1p-11f)), -(1 + 0x1p-9f));
  EXPECT_EQ(round_tf32(std::nextafter(1 + 0x1p-11f, 2.0f)), 1 + 0x1p-10f);
}

TEST(Formats, OverflowAndSaturation) {
  const auto sat = Saturation::finite, nosat = Saturation::none;
  // fp16: max 65504, max + half ulp = 65520 ties to even = inf.
  EXPECT_EQ(f16_from_float(65519.0f).bits, 0x7BFF);
  EXPECT_EQ(f16_from_float(std::nextafter(65520.0f, 0.0f)).bits, 0x7BFF);
  EXPECT_EQ(f16_from_float(65520.0f).bits, 0x7C00);
  EXPECT_EQ(f16_from_float(-1e30f).bits, 0xFC00);
  EXPECT_EQ(f16_from_float(INFINITY).bits, 0x7C00);
  // bf16: max 0x7F7F; the tie above it goes to inf; FLT_MAX overflows.
  EXPECT_EQ(bf16_from_float(flt(0x7F7F7FFF)).bits, 0x7F7F);
  EXPECT_EQ(bf16_from_float(flt(0x7F7F8000)).bits, 0x7F80);
  EXPECT_EQ(bf16_from_float(-std::numeric_limits<float>::max()).bits, 0xFF80);
  EXPECT_EQ(bf16_from_float(-INFINITY).bits, 0xFF80);
  // e4m3: max 448; 464 (the tie with the would-be 480) goes to even 448 in both modes.
  EXPECT_EQ(e4m3_from_float(448.0f, nosat).bits, 0x7E);
  EXPECT_EQ(e4m3_from_float(464.0f, nosat).bits, 0x7E);
  EXPECT_EQ(e4m3_from_float(std::nextafter(464.0f, 1e9f), sat).bits, 0x7E);
  EXPECT_EQ(e4m3_from_float(std::nextafter(464.0f, 1e9f), nosat).bits, 0x7F);
  EXPECT_EQ(e4m3_from_float(480.0f, nosat).bits, 0x7F);
  EXPECT_EQ(e4m3_from_float(-1e9f, sat).bits, 0xFE);
  EXPECT_EQ(e4m3_from_float(-1e9f, nosat).bits, 0xFF);
  EXPECT_EQ(e4m3_from_float(INFINITY).bits, 0x7E);  // default: satfinite
  EXPECT_EQ(e4m3_from_float(-INFINITY, sat).bits, 0xFE);
  EXPECT_EQ(e4m3_from_float(INFINITY, nosat).bits, 0x7F);
  EXPECT_EQ(e4m3_from_float(-INFINITY, nosat).bits, 0xFF);
  EXPECT_EQ(round_to_e4m3(1e6f), 448.0f);
  EXPECT_TRUE(std::isnan(round_to_e4m3(1e6f, nosat)));
  // e5m2: max 57344, max + half ulp = 61440 ties to even = overflow.
  EXPECT_EQ(e5m2_from_float(std::nextafter(61440.0f, 0.0f), nosat).bits, 0x7B);
  EXPECT_EQ(e5m2_from_float(61440.0f, nosat).bits, 0x7C);
  EXPECT_EQ(e5m2_from_float(61440.0f, sat).bits, 0x7B);
  EXPECT_EQ(e5m2_from_float(-1e9f).bits, 0xFB);
  EXPECT_EQ(e5m2_from_float(-1e9f, nosat).bits, 0xFC);
  EXPECT_EQ(e5m2_from_float(INFINITY).bits, 0x7B);
  EXPECT_EQ(e5m2_from_float(-INFINITY, nosat).bits, 0xFC);
  EXPECT_EQ(round_to_e5m2(-1e6f), -57344.0f);
  EXPECT_EQ(round_to_e5m2(1e6f, nosat), INFINITY);
  // tf32: past max + half ulp is inf.
  EXPECT_EQ(round_tf32(std::numeric_limits<float>::max()), INFINITY);
  EXPECT_EQ(round_tf32(flt(0x7F7FEFFF)), flt(0x7F7FE000));
  EXPECT_EQ(round_tf32(-INFINITY), -INFINITY);
}

TEST(Formats, SignedZerosAndSubnormals) {
  EXPECT_EQ(f16_from_float(-0.0f).bits, 0x8000);
  EXPECT_EQ(bf16_from_float(-0.0f).bits, 0x8000);
  EXPECT_EQ(e4m3_from_float(-0.0f).bits, 0x80);
  EXPECT_EQ(e5m2_from_float(-0.0f).bits, 0x80);
  EXPECT_EQ(bits(round_tf32(-0.0f)), 0x80000000u);
  EXPECT_EQ(bits(round_to_f16(-1e-30f)), 0x80000000u);  // underflow keeps the sign
  EXPECT_EQ(e4m3_from_float(-0x1p-11f).bits, 0x80);
  // fp16: smallest subnormal 2^-24; half of it ties to 0; a hair more rounds up.
  EXPECT_EQ(f16_from_float(0x1p-24f).bits, 0x0001);
  EXPECT_EQ(f16_from_float(0x1p-25f).bits, 0x0000);
  EXPECT_EQ(f16_from_float(std::nextafter(0x1p-25f, 1.0f)).bits, 0x0001);
  EXPECT_EQ(f16_from_float(3 * 0x1p-25f).bits, 0x0002);
  EXPECT_EQ(f16_from_float(0x1p-14f - 0x1p-25f).bits, 0x0400);  // tie: largest subnormal/min normal
  EXPECT_EQ(f16_from_float(std::nextafter(0x1p-14f - 0x1p-25f, 0.0f)).bits, 0x03FF);
  EXPECT_EQ(f16_from_float(std::numeric_limits<float>::denorm_min()).bits, 0x0000);
  // bf16 subnormals are fp32 subnormals.
  EXPECT_EQ(bf16_from_float(flt(0x00008000)).bits, 0x0000);
  EXPECT_EQ(bf16_from_float(flt(0x00018000)).bits, 0x0002);
  EXPECT_EQ(bf16_from_float(flt(0x00008001)).bits, 0x0001);
  EXPECT_EQ(bf16_from_float(flt(0x007FFFFF)).bits, 0x0080);  // up into the smallest normal
  // e4m3: smallest subnormal 2^-9, smallest normal 2^-6.
  EXPECT_EQ(e4m3_from_float(0x1p-9f).bits, 0x01);
  EXPECT_EQ(e4m3_from_float(0x1p-10f).bits, 0x00);
  EXPECT_EQ(e4m3_from_float(std::nextafter(0x1p-10f, 1.0f)).bits, 0x01);
  EXPECT_EQ(e4m3_from_float(3 * 0x1p-10f).bits, 0x02);
  EXPECT_EQ(e4m3_from_float(15 * 0x1p-10f).bits, 0x08);  // tie between 0x07 and 0x08
  // e5m2: smallest subnormal 2^-16.
  EXPECT_EQ(e5m2_from_float(0x1p-16f).bits, 0x01);
  EXPECT_EQ(e5m2_from_float(0x1p-17f).bits, 0x00);
  EXPECT_EQ(e5m2_from_float(3 * 0x1p-17f).bits, 0x02);
  // tf32 keeps fp32 subnormals, rounded to a multiple of 2^-136.
  EXPECT_EQ(bits(round_tf32(flt(0x00001000))), 0x00000000u);  // tie to even: 0
  EXPECT_EQ(bits(round_tf32(flt(0x00003000))), 0x00004000u);
  EXPECT_EQ(bits(round_tf32(flt(0x00001001))), 0x00002000u);
  EXPECT_EQ(bits(round_tf32(flt(0x007FF000))), 0x00800000u);
}

TEST(Formats, NaNsStayNaN) {
  const uint32_t nans[] = {0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x7FC00001, 0x7FFFFFFF,
                           0xFF800001, 0xFFC00000, 0xFFFFFFFF, 0x7F802000, 0xFFA00000};
  for (uint32_t u : nans) {
    SCOPED_TRACE(hex(u));
    const float x = flt(u);
    EXPECT_EQ(f16_from_float(x).bits, 0x7FFF);
    EXPECT_EQ(bf16_from_float(x).bits, 0x7FFF);
    EXPECT_EQ(bf16_from_float_stochastic(x, 0xFFFF).bits, 0x7FFF);
    for (auto s : {Saturation::finite, Saturation::none}) {
      EXPECT_EQ(e4m3_from_float(x, s).bits, 0x7F);
      EXPECT_EQ(e5m2_from_float(x, s).bits, 0x7F);
    }
    const float t = round_tf32(x);
    EXPECT_TRUE(std::isnan(t));
    EXPECT_EQ(std::signbit(t), std::signbit(x));
    EXPECT_TRUE(std::isnan(round_to_f16(x)) && std::isnan(round_to_bf16(x)) &&
                std::isnan(round_to_e4m3(x)) && std::isnan(round_to_e5m2(x)));
  }
  // Widening a NaN keeps its sign and gives a quiet fp32 NaN, signalling inputs included.
  for (uint16_t b : {0x7C01, 0x7E00, 0xFC01, 0xFFFF}) {
    const float f = to_float(f16::from_bits(b));
    EXPECT_TRUE(std::isnan(f));
    EXPECT_EQ(std::signbit(f), (b & 0x8000) != 0);
    EXPECT_TRUE(bits(f) & 0x00400000u) << hex(b);
  }
  EXPECT_TRUE(bits(to_float(bf16::from_bits(0x7F81))) & 0x00400000u);
  EXPECT_TRUE(bits(to_float(e5m2::from_bits(0x7D))) & 0x00400000u);
  EXPECT_TRUE(std::signbit(to_float(e4m3::from_bits(0xFF))));
}

// round_tf32 against an independent double-precision oracle: scale to the tf32 quantum of x's
// binade, nearbyint (ties to even in the default rounding mode), scale back.
TEST(Formats, Tf32MatchesNearbyintOracle) {
  Timer timer("tf32 oracle comparison");
  auto oracle = [](float x) -> float {
    if (std::isinf(x) || x == 0) return x;
    int e;
    std::frexp(static_cast<double>(x), &e);  // |x| in [2^(e-1), 2^e)
    const double q = std::ldexp(1.0, std::max(e - 11, -136));
    const double r = std::nearbyint(x / q) * q;
    if (std::fabs(r) > std::numeric_limits<float>::max()) return std::copysign(INFINITY, x);
    return static_cast<float>(r);
  };
  size_t bad = 0;
  for (const auto* inputs : {&structured_inputs(), &random_inputs()})
    for (uint32_t u : *inputs) {
      const float x = flt(u);
      if (std::isnan(x)) continue;
      const float got = round_tf32(x), want = oracle(x);
      if (bits(got) != bits(want) && ++bad <= 5)
        ADD_FAILURE() << hex(u) << ": got " << hex(bits(got)) << " want " << hex(bits(want));
    }
  EXPECT_EQ(bad, 0u);
}

// ---- stochastic rounding --------------------------------------------------------------------

// Exact: over all 2^16 values of the random bits used, x rounds up (away from zero) for exactly
// (dropped bits) of them, and only ever to one of its two bf16 neighbours.
// The CPU backend's branch-free conversions (backend/cpu/fast_formats.h) give formats.h's results
// bit for bit. Inputs: every exponent and sign with the mantissa's top bits free and its low 12
// bits set to the values around each format's rounding point (0, 1, just below, at and above a
// tie for fp16's 13 dropped bits; fp8 drops 20 or 21 bits, whose low 12 are then free too), plus
// every fp16 and fp8 value widened. All 2^32 floats with MPT_EXHAUSTIVE_FORMATS=1.
TEST(FastFormats, NarrowingMatchesTheReferenceBitForBit) {
  auto check = [](uint32_t u, uint64_t& bad, uint32_t& first) {
    const float x = flt(u);
    const bool ok = fast::bf16_from_float(x).bits == bf16_from_float(x).bits &&
                    fast::f16_from_float(x).bits == f16_from_float(x).bits &&
                    fast::e4m3_from_float(x).bits == e4m3_from_float(x).bits &&
                    fast::e5m2_from_float(x).bits == e5m2_from_float(x).bits;
    if (!ok) {
      ++bad;
      first = std::min(first, u);
    }
  };
  uint64_t bad = 0;
  uint32_t first = 0xFFFFFFFFu;
  const char* env = std::getenv("MPT_EXHAUSTIVE_FORMATS");
  if (env != nullptr && std::string(env) == "1") {
#pragma omp parallel for schedule(static) reduction(+ : bad) reduction(min : first)
    for (int64_t i = 0; i < (int64_t{1} << 32); ++i) check(static_cast<uint32_t>(i), bad, first);
  } else {
    const uint32_t lows[] = {0x000, 0x001, 0x7FF, 0x800, 0x801, 0xFFE, 0xFFF};
    for (uint32_t hi = 0; hi < (1u << 20); ++hi)
      for (uint32_t low : lows) check((hi << 12) | low, bad, first);
    for (uint32_t b = 0; b < 65536; ++b) {
      check(bits(to_float(f16::from_bits(uint16_t(b)))), bad, first);
      if (b < 256) {
        check(bits(to_float(e4m3::from_bits(uint8_t(b)))), bad, first);
        check(bits(to_float(e5m2::from_bits(uint8_t(b)))), bad, first);
      }
    }
  }
  EXPECT_EQ(bad, 0u) << "first mismatch at " << hex(first);
}

TEST(FastFormats, WideningTablesHoldEveryValue) {
  const fast::WidenTables& t = fast::widen_tables();
  for (uint32_t b = 0; b < 65536; ++b)
    ASSERT_EQ(bits(fast::to_float(bf16::from_bits(uint16_t(b)))),
              bits(to_float(bf16::from_bits(uint16_t(b)))))
        << hex(b);
  for (uint32_t b = 0; b < 65536; ++b)
    ASSERT_EQ(bits(t.f16[b]), bits(to_float(f16::from_bits(uint16_t(b))))) << hex(b);
  for (uint32_t b = 0; b < 256; ++b) {
    ASSERT_EQ(bits(fast::e4m3_value(b)), bits(to_float(e4m3::from_bits(uint8_t(b))))) << hex(b);
    ASSERT_EQ(bits(fast::e5m2_value(b)), bits(to_float(e5m2::from_bits(uint8_t(b))))) << hex(b);
  }
}

// Half the ulp of bf16(w), against frexp: every bf16 value, and values between them.
TEST(FastFormats, Bf16HalfUlp) {
  auto reference = [](float w) {
    const double a = std::fabs(double(round_to_bf16(w)));
    if (a == 0.0 || a < 0x1p-126) return 0x1p-134;  // zero and subnormals: half of 2^-133
    int e = 0;
    std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1): the bf16 ulp is 2^(e - 8)
    return std::ldexp(1.0, e - 9);
  };
  for (uint32_t b = 0; b < 65536; ++b) {
    const float w = to_float(bf16::from_bits(uint16_t(b)));
    if (!std::isfinite(w)) continue;
    ASSERT_EQ(double(fast::bf16_half_ulp(w)), reference(w)) << hex(b);
    const float between = flt(bits(w) | 0x5A5Au);
    if (std::isfinite(between)) {
      ASSERT_EQ(double(fast::bf16_half_ulp(between)), reference(between)) << hex(b);
    }
  }
}

TEST(StochasticRounding, UpCountEqualsDistanceExactly) {
  const uint32_t xs[] = {0x3F800001, 0x3F808000, 0x3F80FFFF, 0xBF812345, 0x3FFFFFFF,
                         0x00012345, 0x80000001, 0x7F7FFFFF, 0x42F6E979, 0x3F800000,
                         0x00000000, 0x80000000, 0x7F800000, 0xFF800000};
  for (uint32_t u : xs) {
    SCOPED_TRACE(hex(u));
    const uint32_t lo = (u >> 16), hi = lo + 1;  // magnitude truncated, and one step away from 0
    const uint32_t dropped = u & 0xFFFF;
    uint32_t ups = 0;
    for (uint32_t r = 0; r < 65536; ++r) {
      const uint32_t b = bf16_from_float_stochastic(flt(u), r).bits;
      ASSERT_TRUE(b == lo || b == hi) << r;
      ups += b == hi;
      ASSERT_EQ(bf16_from_float_stochastic(flt(u), r | 0xA5C30000u).bits, b);  // upper bits unused
    }
    EXPECT_EQ(ups, dropped);
  }
  EXPECT_EQ(bf16_from_float_stochastic(flt(0x7F7FFFFF), 0xFFFF).bits,
            0x7F80);  // inf is the upper neighbour
}

// Statistical: with random bits from the project's RNG, the fraction rounded up is within 5
// standard deviations of the distance ratio, and the mean of the results is x (unbiased).
TEST(StochasticRounding, FrequenciesAreProportionalToDistance) {
  Rng rng(77);
  const int n = 200000;
  const float xs[] = {1.001f, -3.14159f, 0.1f, 1e-3f, -7.77e-39f, 65000.5f, 1 + 0x1p-8f};
  for (float x : xs) {
    SCOPED_TRACE(x);
    const float lo = to_float(bf16::from_bits(static_cast<uint16_t>(bits(x) >> 16)));
    const float hi = to_float(bf16::from_bits(static_cast<uint16_t>((bits(x) >> 16) + 1)));
    const double p = (std::fabs(static_cast<double>(x)) - std::fabs(static_cast<double>(lo))) /
                     (std::fabs(static_cast<double>(hi)) - std::fabs(static_cast<double>(lo)));
    int ups = 0;
    double sum = 0;
    for (int i = 0; i < n; ++i) {
      const float y =
          to_float(bf16_from_float_stochastic(x, static_cast<uint32_t>(rng.next_u64() >> 32)));
      ASSERT_TRUE(y == lo || y == hi);
      ups += y == hi;
      sum += y;
    }
    const double sd = std::sqrt(n * p * (1 - p));
    EXPECT_NEAR(ups, n * p, 5 * sd + 1);
    EXPECT_NEAR(sum / n, x, (5 * sd + 1) / n * std::fabs(static_cast<double>(hi) - lo));
  }
}

// ---- NVIDIA's conversions -------------------------------------------------------------------

#if MPT_HAVE_NVIDIA_FP_HEADERS

namespace {

uint32_t nv_narrow(Conv c, float x) {
  switch (c) {
    case Conv::f16:
      return __half_raw(__float2half_rn(x)).x;
    case Conv::bf16:
      return __nv_bfloat16_raw(__float2bfloat16_rn(x)).x;
    case Conv::e4m3_sat:
      return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    case Conv::e4m3_nosat:
      return __nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E4M3);
    case Conv::e5m2_sat:
      return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2);
    case Conv::e5m2_nosat:
      return __nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E5M2);
  }
  return 0;
}

float nv_half_to_float(uint16_t b) {
  __half_raw r;
  r.x = b;
  return __half2float(__half(r));
}

float nv_widen(Conv c, uint32_t b) {
  switch (c) {
    case Conv::f16:
      return nv_half_to_float(static_cast<uint16_t>(b));
    case Conv::bf16: {
      __nv_bfloat16_raw r;
      r.x = static_cast<uint16_t>(b);
      return __bfloat162float(__nv_bfloat16(r));
    }
    // fp8 widens to fp16 exactly (both fp8 formats are subsets of fp16's values).
    case Conv::e4m3_sat:
    case Conv::e4m3_nosat:
      return nv_half_to_float(
          __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3).x);
    case Conv::e5m2_sat:
    case Conv::e5m2_nosat:
      return nv_half_to_float(
          __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E5M2).x);
  }
  return 0;
}

}  // namespace

// All 65,536 fp16 and bf16 patterns and all 256 of each fp8 format: the same fp32 value (NaN:
// both NaN), and narrowing that value back gives the same bits as NVIDIA's narrowing.
TEST(Nvidia, EveryEncodingWidensAndNarrowsAlike) {
  Timer timer("NVIDIA, every encoding");
  for (Conv c : kConvs) {
    SCOPED_TRACE(conv_name(c));
    const uint32_t n = (c == Conv::f16 || c == Conv::bf16) ? 65536 : 256;
    for (uint32_t b = 0; b < n; ++b) {
      const float mine = widen(c, b), theirs = nv_widen(c, b);
      if (std::isnan(theirs)) {
        ASSERT_TRUE(std::isnan(mine)) << hex(b);
      } else {
        ASSERT_EQ(bits(mine), bits(theirs)) << hex(b);
      }
      ASSERT_EQ(narrow(c, mine), nv_narrow(c, theirs)) << hex(b);
      if (!std::isnan(theirs) && !(std::isinf(theirs) && saturates(c))) {
        ASSERT_EQ(nv_narrow(c, theirs), b) << hex(b);
      }
    }
  }
}

// fp32 -> each format and saturation mode, bit for bit (NaN encodings included) on the
// structured set (ties, tie +- 1, sticky bits at every exponent; every midpoint of every format;
// specials) and 4M random floats.
TEST(Nvidia, NarrowingMatchesBitForBit) {
  Timer timer("NVIDIA, fp32 -> 6 conversions");
  const size_t total = structured_inputs().size() + random_inputs().size();
  std::printf("[  inputs  ] %zu structured + %zu random fp32 inputs per conversion\n",
              structured_inputs().size(), random_inputs().size());
  ASSERT_GE(random_inputs().size(), 4000000u);
  ASSERT_GE(total, 7000000u);
  for (Conv c : kConvs) {
    SCOPED_TRACE(conv_name(c));
    size_t bad = 0;
    for (const auto* inputs : {&structured_inputs(), &random_inputs()})
      for (uint32_t u : *inputs) {
        const uint32_t got = narrow(c, flt(u)), want = nv_narrow(c, flt(u));
        if (got != want && ++bad <= 5)
          ADD_FAILURE() << "input " << hex(u) << " (" << flt(u) << "): mine " << hex(got)
                        << " NVIDIA " << hex(want);
      }
    EXPECT_EQ(bad, 0u);
  }
}

// Every one of the 2^32 floats for all six conversions. Takes ~3 minutes on 2 cores, so it runs
// only when asked: MPT_EXHAUSTIVE_FORMATS=1.
TEST(Nvidia, EveryFloatWhenAsked) {
  const char* env = std::getenv("MPT_EXHAUSTIVE_FORMATS");
  if (env == nullptr || std::string(env) != "1")
    GTEST_SKIP() << "set MPT_EXHAUSTIVE_FORMATS=1 to compare all 2^32 floats (minutes)";
  for (Conv c : kConvs) {
    SCOPED_TRACE(conv_name(c));
    Timer timer(conv_name(c));
    uint64_t bad = 0;
    uint32_t first = 0xFFFFFFFFu;
#pragma omp parallel for schedule(static) reduction(+ : bad) reduction(min : first)
    for (int64_t i = 0; i < (int64_t{1} << 32); ++i) {
      const uint32_t u = static_cast<uint32_t>(i);
      if (narrow(c, flt(u)) != nv_narrow(c, flt(u))) {
        ++bad;
        first = std::min(first, u);
      }
    }
    EXPECT_EQ(bad, 0u) << "first mismatch at " << hex(first);
  }
}

#else

TEST(Nvidia, EveryFloatWhenAsked) {
  GTEST_SKIP() << "CUDA toolkit headers (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h) not found at "
                  "configure time: comparisons with NVIDIA's conversions not built";
}
TEST(Nvidia, EveryEncodingWidensAndNarrowsAlike) {
  GTEST_SKIP() << "CUDA toolkit headers (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h) not found at "
                  "configure time: comparisons with NVIDIA's conversions not built";
}
TEST(Nvidia, NarrowingMatchesBitForBit) {
  GTEST_SKIP() << "CUDA toolkit headers (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h) not found at "
                  "configure time: comparisons with NVIDIA's conversions not built";
}

#endif
