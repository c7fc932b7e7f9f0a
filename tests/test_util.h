// Shared helpers for the tests: backend-owned tensors filled with fresh random values.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "core/rng.h"

namespace mpt::test {

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

inline bool all_finite(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

}  // namespace mpt::test
