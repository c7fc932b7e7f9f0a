// Shared helpers for the tests: backend-owned tensors filled with fresh random values.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <stdexcept>
#include <vector>

#include "backend/backend.h"
#include "core/formats.h"
#include "core/rng.h"
#include "core/scoped_env.h"

namespace mpt::test {

// The fp8 GEMM spec of the fp8 producers' tests (an activation stored quantised for the GEMM
// that reads it): inp in `fi` scaled so that values above 2/3 of inp_amax saturate (counted
// overflows), an e4m3 weight with headroom, an e5m2 dout at a fixed scale.
inline MatmulSpec producer_fp8_spec(DType fi, float inp_amax, float weight_amax) {
  MatmulSpec s(MatmulPrecision::fp8);
  s.inp = {fi, 1.5f * static_cast<float>(dtype_traits(fi).max_finite) / inp_amax, nullptr};
  s.weight = {DType::e4m3, 0.8f * 448.0f / weight_amax, nullptr};
  s.dout = {DType::e5m2, 4096.0f, nullptr};
  return s;
}

// An environment variable set for a scope (core/scoped_env.h).
using mpt::ScopedEnv;

// The source tree (configs/ and the like): $MPT_SOURCE_DIR when set, else the tree the test was
// built from. Binaries built on one machine run on another from a copy of the tree elsewhere
// (scripts/device-prebuild; scripts/device-check sets the variable).
inline std::string source_dir() {
  const char* e = std::getenv("MPT_SOURCE_DIR");
  return e && *e ? std::string(e) : std::string(MPT_SOURCE_DIR);
}

// n token ids drawn uniformly from [0, vocab).
inline std::vector<int32_t> random_tokens(Rng& rng, size_t n, int vocab) {
  std::vector<int32_t> t(n);
  for (auto& v : t) v = static_cast<int32_t>(rng.below(vocab));
  return t;
}

// A policy's name as a test name ("bf16-pure" -> "bf16_pure").
inline std::string policy_test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = info.param;
  for (char& c : n)
    if (c == '-') c = '_';
  return n;
}

// A fresh seed per test run (printed so a failure can be reproduced with MPT_TEST_SEED).
inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("MPT_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  const uint64_t seed = std::random_device{}();
  std::printf("[ seed     ] MPT_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

struct Owned {
  Buffer buf;
  Tensor t;
  float* f() const { return t.as<float>(); }
  int32_t* i() const { return t.as<int32_t>(); }
  int64_t n() const { return t.numel(); }
};

inline Owned make(Backend& be, Shape s, DType d = DType::f32) {
  Owned o;
  o.buf = be.allocate(static_cast<size_t>(s.numel()) * dtype_size(d));
  o.t = o.buf.view(0, d, s);
  return o;
}

inline Owned randn(Backend& be, Shape s, Rng& rng, double scale = 1.0) {
  Owned o = make(be, s);
  for (int64_t i = 0; i < o.n(); ++i) o.f()[i] = static_cast<float>(rng.normal() * scale);
  return o;
}

inline std::vector<float> copy_of(const Owned& o) { return {o.f(), o.f() + o.n()}; }

// ---- tensors in any float dtype (fp32, fp16, bf16, fp8), element by element on the host

// The bits of x rounded to nearest even in dtype d (saturating for fp8), as a tensor of d stores
// them; fp32: x's own bits.
inline uint32_t narrow_bits(DType d, float x) {
  switch (d) {
    case DType::f32: {
      uint32_t u;
      std::memcpy(&u, &x, sizeof u);
      return u;
    }
    case DType::f16: return f16_from_float(x).bits;
    case DType::bf16: return bf16_from_float(x).bits;
    case DType::e4m3: return e4m3_from_float(x).bits;
    case DType::e5m2: return e5m2_from_float(x).bits;
    case DType::i32: break;
  }
  throw std::logic_error("narrow_bits: not a float dtype");
}

// Element i's stored bits (little-endian host: the low dtype_size bytes).
inline uint32_t raw_bits(const Tensor& t, int64_t i) {
  uint32_t u = 0;
  std::memcpy(&u, static_cast<const char*>(t.data) + i * dtype_size(t.dtype), dtype_size(t.dtype));
  return u;
}

// Element i widened to fp32 (exact).
inline float widened_at(const Tensor& t, int64_t i) {
  const uint32_t u = raw_bits(t, i);
  switch (t.dtype) {
    case DType::f32: {
      float f;
      std::memcpy(&f, &u, sizeof f);
      return f;
    }
    case DType::f16: return to_float(f16::from_bits(static_cast<uint16_t>(u)));
    case DType::bf16: return to_float(bf16::from_bits(static_cast<uint16_t>(u)));
    case DType::e4m3: return to_float(e4m3::from_bits(static_cast<uint8_t>(u)));
    case DType::e5m2: return to_float(e5m2::from_bits(static_cast<uint8_t>(u)));
    case DType::i32: break;
  }
  throw std::logic_error("widened_at: not a float dtype");
}

inline std::vector<float> widened(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = widened_at(t, i);
  return v;
}

// Stores x into element i, rounded to nearest even in t's dtype.
inline void store_rounded(const Tensor& t, int64_t i, float x) {
  const uint32_t u = narrow_bits(t.dtype, x);
  std::memcpy(static_cast<char*>(t.data) + i * dtype_size(t.dtype), &u, dtype_size(t.dtype));
}

// x rounded to nearest even in d and widened back (fp32: x).
inline float round_to(DType d, float x) {
  uint32_t bits = narrow_bits(d, x);
  return widened_at(Tensor(&bits, d, {1}), 0);
}

// A tensor of dtype d holding N(mean, scale^2) draws rounded to d, none of them zero.
inline Owned randn_as(Backend& be, Shape s, DType d, Rng& rng, double scale = 1.0,
                      double mean = 0.0) {
  Owned o = make(be, s, d);
  for (int64_t i = 0; i < o.n(); ++i) {
    float v;
    do v = round_to(d, static_cast<float>(mean + scale * rng.normal()));
    while (v == 0.0f);
    store_rounded(o.t, i, v);
  }
  return o;
}

// An fp32 tensor holding t's values widened.
inline Owned f32_copy(Backend& be, const Tensor& t) {
  Owned o = make(be, t.shape);
  for (int64_t i = 0; i < t.numel(); ++i) o.f()[i] = widened_at(t, i);
  return o;
}

inline bool all_finite(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

}  // namespace mpt::test
