#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "backend/cpu/cpu_backend.h"
#include "core/dtype.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "core/text.h"

using namespace mpt;

TEST(DType, TableIsConsistent) {
  EXPECT_EQ(dtype_size(DType::f32), 4u);
  EXPECT_EQ(dtype_size(DType::i32), 4u);
  EXPECT_STREQ(dtype_name(DType::f32), "fp32");
  EXPECT_STREQ(dtype_name(DType::i32), "int32");
}

TEST(Rng, SameSeedSameStreamDifferentSeedDifferentStream) {
  Rng a(7), b(7), c(8);
  for (int i = 0; i < 100; ++i) {
    const uint64_t x = a.next_u64();
    EXPECT_EQ(x, b.next_u64());
    EXPECT_NE(x, c.next_u64());
  }
}

TEST(Rng, NormalHasUnitMomentsAndBelowIsInRange) {
  Rng r(123);
  const int n = 200000;
  double s = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    const double x = r.normal();
    ASSERT_TRUE(std::isfinite(x));
    s += x;
    s2 += x * x;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.02);
  std::set<uint64_t> seen;
  for (int i = 0; i < 1000; ++i) {
    const uint64_t v = r.below(10);
    ASSERT_LT(v, 10u);
    seen.insert(v);
  }
  EXPECT_EQ(seen.size(), 10u);
}

TEST(Rng, DeriveSeedSeparatesStreams) {
  EXPECT_NE(derive_seed(1, 0), derive_seed(1, 1));
  EXPECT_NE(derive_seed(1, 0), derive_seed(2, 0));
  EXPECT_EQ(derive_seed(5, 3), derive_seed(5, 3));
}

TEST(Tensor, ViewsCheckBoundsAndDtype) {
  CpuBackend be(1);
  Buffer buf = be.allocate(64 * sizeof(float));
  Tensor t = buf.view(0, DType::f32, {4, 16});
  EXPECT_EQ(t.numel(), 64);
  EXPECT_EQ(t.bytes(), 256u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data) % 256, 0u);
  for (int64_t i = 0; i < t.numel(); ++i) EXPECT_EQ(t.as<float>()[i], 0.0f);  // zeroed
  EXPECT_THROW(buf.view(4, DType::f32, {4, 16}), RuntimeError);
  EXPECT_THROW(t.as<int32_t>(), RuntimeError);
  EXPECT_THROW(t.reshape({5, 13}), RuntimeError);
  EXPECT_EQ(t.reshape({64}).numel(), 64);
}

TEST(Buffer, MoveTransfersOwnership) {
  CpuBackend be(1);
  Buffer a = be.allocate(128);
  void* p = a.data();
  Buffer b = std::move(a);
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(a.data(), nullptr);
  Buffer c;
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
}

// UTF-8 as RFC 3629 defines it: the text JSON records can hold.
TEST(Text, ValidUtf8) {
  using mpt::valid_utf8;
  for (const char* ok : {"", "plain", "caf\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80",
                         "\xed\x9f\xbf", "\xf4\x8f\xbf\xbf", "\x7f"})
    EXPECT_TRUE(valid_utf8(ok)) << ok;
  for (const char* bad : {"caf\xe9", "\xc3", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80",
                          "\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\x80", "\xe2\x82",
                          "\xe2\x28\xa1", "\xff"})
    EXPECT_FALSE(valid_utf8(bad)) << bad;
  EXPECT_TRUE(valid_utf8(std::string("a\0b", 3))) << "NUL is a code point";
}
