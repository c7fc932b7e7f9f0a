// The communicator's collectives, run by ctest under `mpirun -np 2` (and directly as a world of
// one). Each rank's data is drawn from a seed derived from its rank, so every rank can compute
// what the reduction must give, bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "dist/communicator.h"

namespace mpt::dist {
namespace {

Communicator& comm() {
  static std::unique_ptr<Communicator> c = make_communicator(detect_placement());
  return *c;
}

std::vector<float> rank_data(int rank, size_t n) {
  Rng rng(1000 + rank);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.normal());
  return v;
}

TEST(Communicator, SumAndMeanAreTheSameBitsOnEveryRank) {
  Communicator& c = comm();
  const size_t n = 1000003;  // not a multiple of anything
  std::vector<float> got = rank_data(c.rank(), n), mean = got;
  c.all_reduce_sum(got.data(), n);
  c.all_reduce_mean(mean.data(), n);
  // The expected sum: every rank's data, added rank 0 first.
  std::vector<float> want = rank_data(0, n);
  for (int r = 1; r < c.world_size(); ++r) {
    const auto d = rank_data(r, n);
    for (size_t i = 0; i < n; ++i) want[i] += d[i];
  }
  const float inv = 1.0f / c.world_size();
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(got[i], want[i]) << i;
    ASSERT_EQ(mean[i], want[i] * inv) << i;
  }
  std::printf("rank %d of %d (%s): sums agree\n", c.rank(), c.world_size(), c.name().c_str());
}

// Under ctest's mpirun every rank runs on this machine: all of them share its memory (what the
// CPU backend's memory check divides among them); a world of one shares it with nobody.
TEST(Communicator, RanksOnTheNodeAreTheWholeLocalJob) {
  Communicator& c = comm();
  EXPECT_EQ(c.ranks_on_node(), c.world_size());
}

TEST(Communicator, DoubleSumsAndNanPropagatingMax) {
  Communicator& c = comm();
  double d[2] = {1.0 + c.rank(), 0.5};
  c.all_reduce_sum(d, 2);
  const int w = c.world_size();
  EXPECT_EQ(d[0], w * (w + 1) / 2.0);
  EXPECT_EQ(d[1], 0.5 * w);
  // amaxes: rank r offers r + 1; the last rank also a NaN in slot 1 and an infinity in slot 2.
  const bool last = c.rank() == w - 1;
  float m[3] = {float(c.rank() + 1), last ? NAN : 1.0f, last ? INFINITY : 2.0f};
  c.all_reduce_max(m, 3);
  EXPECT_EQ(m[0], float(w));
  EXPECT_TRUE(std::isnan(m[1])) << "a NaN on one rank is a NaN on all";
  EXPECT_EQ(m[2], w > 1 ? INFINITY : INFINITY);
}

TEST(Communicator, BroadcastFromRankZero) {
  Communicator& c = comm();
  std::vector<char> buf(300, c.rank() == 0 ? 'x' : 'y');
  c.broadcast(buf.data(), buf.size(), 0);
  for (char ch : buf) ASSERT_EQ(ch, 'x');
  c.barrier();
}

// Blocks of uneven sizes, one a rank (rank 1's empty, the others odd-sized), their total, and
// where this rank's starts.
struct Blocks {
  std::vector<size_t> sizes;
  size_t total = 0, mine = 0;
};
Blocks uneven_blocks(const Communicator& c) {
  Blocks b;
  for (int r = 0; r < c.world_size(); ++r) {
    b.sizes.push_back(r == 1 ? 0 : 1000 + 37 * r);
    if (r == c.rank()) b.mine = b.total;
    b.total += b.sizes.back();
  }
  return b;
}

// Every rank ends with every rank's bytes in place, and nothing outside the blocks is touched.
TEST(Communicator, AllGatherOfUnevenBlocks) {
  Communicator& c = comm();
  const int w = c.world_size();
  const auto [sizes, total, mine] = uneven_blocks(c);
  std::vector<unsigned char> buf(total + 1, 0xEE);  // one guard byte past the end
  for (size_t i = 0; i < sizes[c.rank()]; ++i)
    buf[mine + i] = static_cast<unsigned char>(c.rank() * 31 + i * 7);
  c.all_gather(buf.data(), sizes);
  size_t at = 0;
  for (int r = 0; r < w; ++r)
    for (size_t i = 0; i < sizes[r]; ++i, ++at)
      ASSERT_EQ(buf[at], static_cast<unsigned char>(r * 31 + i * 7)) << "rank " << r << " byte " << i;
  EXPECT_EQ(buf[total], 0xEE);
}

// A gather to each rank in turn, of the same uneven blocks: the root ends with every block in
// place; the others pass their own block alone, which is left as it was. Guard bytes past the
// ends catch a write beyond a buffer.
TEST(Communicator, GatherOfUnevenBlocksToEachRoot) {
  Communicator& c = comm();
  const int w = c.world_size();
  const auto [sizes, total, mine] = uneven_blocks(c);
  auto byte = [](int r, size_t i, int root) {
    return static_cast<unsigned char>(r * 31 + i * 7 + root * 3);
  };
  for (int root = 0; root < w; ++root) {
    const bool is_root = c.rank() == root;
    const size_t own = sizes[c.rank()];
    std::vector<unsigned char> buf((is_root ? total : own) + 1, 0xEE);
    for (size_t i = 0; i < own; ++i) buf[(is_root ? mine : 0) + i] = byte(c.rank(), i, root);
    c.gather(buf.data(), sizes, root);
    if (is_root) {
      size_t at = 0;
      for (int r = 0; r < w; ++r)
        for (size_t i = 0; i < sizes[r]; ++i, ++at)
          ASSERT_EQ(buf[at], byte(r, i, root)) << "root " << root << ": rank " << r << " byte " << i;
    } else {
      for (size_t i = 0; i < own; ++i) ASSERT_EQ(buf[i], byte(c.rank(), i, root));
    }
    EXPECT_EQ(buf.back(), 0xEE) << "root " << root;
  }
  EXPECT_THROW(c.gather(nullptr, sizes, w), RuntimeError);
}

}  // namespace
}  // namespace mpt::dist
