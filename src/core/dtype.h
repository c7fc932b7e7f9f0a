// Storage dtypes. One X-macro table so that names, sizes and switch statements stay in step.
// The low-precision formats (fp16, bf16, fp8) join this table with the precision issue; the
// foundation runs fp32 only, plus int32 token ids.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mpt {

//        enum     name     bytes
#define MPT_DTYPES(X) \
  X(f32, "fp32", 4)   \
  X(i32, "int32", 4)

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

}  // namespace mpt
