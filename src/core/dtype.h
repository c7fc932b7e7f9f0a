// Storage dtypes. One X-macro table so that names, sizes and switch statements stay in step.
// fp32 and int32 (token ids), then the low-precision formats whose structs and conversions live
// in core/formats.h (docs/formats.md describes them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mpt {

//        enum     name     bytes
#define MPT_DTYPES(X)    \
  X(f32, "fp32", 4)      \
  X(i32, "int32", 4)     \
  X(f16, "fp16", 2)      \
  X(bf16, "bf16", 2)     \
  X(e4m3, "fp8_e4m3", 1) \
  X(e5m2, "fp8_e5m2", 1)

enum class DType : uint8_t {
#define MPT_DTYPE_ENUM(e, name, bytes) e,
  MPT_DTYPES(MPT_DTYPE_ENUM)
#undef MPT_DTYPE_ENUM
};

constexpr size_t dtype_size(DType t) {
  switch (t) {
#define MPT_DTYPE_SIZE(e, name, bytes) \
  case DType::e:                       \
    return bytes;
    MPT_DTYPES(MPT_DTYPE_SIZE)
#undef MPT_DTYPE_SIZE
  }
  return 0;
}

constexpr const char* dtype_name(DType t) {
  switch (t) {
#define MPT_DTYPE_NAME(e, name, bytes) \
  case DType::e:                       \
    return name;
    MPT_DTYPES(MPT_DTYPE_NAME)
#undef MPT_DTYPE_NAME
  }
  return "?";
}

// Numeric properties of a format, for tolerances and range checks.
//   mantissa_bits  stored fraction bits (the significand has one more, implicit)
//   epsilon        2^-mantissa_bits: the gap between 1 and the next larger value, i.e. one ulp
//                  at 1 (machine epsilon in the C/numpy sense; the unit roundoff of
//                  round-to-nearest is half of it). Parity tests scale their tolerances by it.
//   max_finite     largest finite value (fp8 e4m3: 448, e5m2: 57344)
//   min_normal     smallest positive normal value
//   min_subnormal  smallest positive subnormal value
// int32 is exact: epsilon 0, and its "normal"/"subnormal" minimum is 1.
struct DTypeTraits {
  int exponent_bits;
  int mantissa_bits;
  double max_finite;
  double min_normal;
  double min_subnormal;
  double epsilon;
  bool has_inf;
};

// tf32 is not a storage dtype (it is fp32 storage with operands rounded to 10 mantissa bits by
// round_tf32), but GEMM tolerances need its epsilon too.
constexpr DTypeTraits kTf32Traits{8, 10, 0x1.ffcp127, 0x1p-126, 0x1p-136, 0x1p-10, true};

constexpr DTypeTraits dtype_traits(DType t) {
  switch (t) {
    case DType::f32:
      return {8, 23, 0x1.fffffep127, 0x1p-126, 0x1p-149, 0x1p-23, true};
    case DType::i32:
      return {0, 31, 2147483647.0, 1.0, 1.0, 0.0, false};
    case DType::f16:
      return {5, 10, 65504.0, 0x1p-14, 0x1p-24, 0x1p-10, true};
    case DType::bf16:
      return {8, 7, 0x1.fep127, 0x1p-126, 0x1p-133, 0x1p-7, true};
    case DType::e4m3:
      return {4, 3, 448.0, 0x1p-6, 0x1p-9, 0x1p-3, false};
    case DType::e5m2:
      return {5, 2, 57344.0, 0x1p-14, 0x1p-16, 0x1p-2, true};
  }
  return {0, 0, 0.0, 0.0, 0.0, 0.0, false};
}

constexpr double dtype_epsilon(DType t) { return dtype_traits(t).epsilon; }

constexpr bool dtype_is_float(DType t) { return t != DType::i32; }
constexpr bool dtype_is_fp8(DType t) { return t == DType::e4m3 || t == DType::e5m2; }

struct f16;
struct bf16;
struct e4m3;
struct e5m2;

template <typename T>
struct dtype_of;
template <>
struct dtype_of<float> {
  static constexpr DType value = DType::f32;
};
template <>
struct dtype_of<int32_t> {
  static constexpr DType value = DType::i32;
};
template <>
struct dtype_of<f16> {
  static constexpr DType value = DType::f16;
};
template <>
struct dtype_of<bf16> {
  static constexpr DType value = DType::bf16;
};
template <>
struct dtype_of<e4m3> {
  static constexpr DType value = DType::e4m3;
};
template <>
struct dtype_of<e5m2> {
  static constexpr DType value = DType::e5m2;
};

}  // namespace mpt
