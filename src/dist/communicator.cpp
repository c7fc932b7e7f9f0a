#include "dist/communicator.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "core/error.h"
#include "dist/watchdog.h"

#if MPT_HAVE_MPI
#include <mpi.h>
#endif

namespace mpt::dist {

void Communicator::all_reduce_mean(float* data, size_t n) {
  all_reduce_sum(data, n);
  const float inv = 1.0f / static_cast<float>(world_size());
  for (size_t i = 0; i < n; ++i) data[i] *= inv;
}

void Communicator::all_reduce_mean(double* data, size_t n) {
  all_reduce_sum(data, n);
  for (size_t i = 0; i < n; ++i) data[i] /= world_size();
}

void Communicator::all_reduce_sum_device(float*, size_t, void*) {
  throw RuntimeError("the " + name() + " communicator reduces host memory only, not a GPU's");
}

void Communicator::all_gather_device(void*, const std::vector<size_t>&, void*) {
  throw RuntimeError("the " + name() + " communicator gathers host memory only, not a GPU's");
}

namespace {

class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string name() const override { return "single"; }
  void all_reduce_sum(float*, size_t) override {}
  void all_reduce_sum(double*, size_t) override {}
  void all_reduce_max(float*, size_t) override {}
  void broadcast(void*, size_t, int) override {}
  void all_gather(void*, const std::vector<size_t>&) override {}
  void gather(void*, const std::vector<size_t>&, int root) override {
    if (root != 0) throw RuntimeError("gather: root " + std::to_string(root) + " of 1 rank");
  }
  void barrier() override {}
  [[noreturn]] void abort(int code) override { std::_Exit(code); }
};

#if MPT_HAVE_MPI
void mpi_check(int rc, const char* call) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    throw RuntimeError(std::string("MPI call failed: ") + call + ": " + std::string(msg, len));
  }
}
#define MPT_MPI_CHECK(call) mpi_check((call), #call)

// NaN-propagating max over floats (MPI_MAX on MPI_FLOAT leaves NaN handling to the
// implementation). Commutative and associative on the values, so every rank gets the same result.
void nan_max(void* in, void* inout, int* len, MPI_Datatype*) {
  const float* a = static_cast<const float*>(in);
  float* b = static_cast<float*>(inout);
  for (int i = 0; i < *len; ++i)
    b[i] = (std::isnan(a[i]) || std::isnan(b[i])) ? NAN : (a[i] > b[i] ? a[i] : b[i]);
}

// Every collective runs under a watchdog: a rank that hangs without dying (stopped, deadlocked,
// its node unreachable) would leave the others blocked in MPI forever. When a collective has not
// finished within MPT_COMM_TIMEOUT_S seconds (default 600; rank 0 may write a checkpoint while
// the others wait), the waiting rank prints what it waited for and exits; mpirun then ends the
// job, as for a rank that died. (Exiting, not MPI_Abort: MPI is initialised for one thread, and
// the main thread is inside an MPI call.)
class Mpi final : public Communicator {
 public:
  Mpi() : watchdog_options_(watchdog_options_from_env("MPT_COMM_TIMEOUT_S")) {
    int inited = 0;
    MPT_MPI_CHECK(MPI_Initialized(&inited));
    if (!inited) MPT_MPI_CHECK(MPI_Init(nullptr, nullptr));
    // Errors come back as return codes (checked above) instead of aborting inside MPI.
    MPT_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MPT_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
    MPT_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
    // The processes that share this one's memory (MPI-3's shared-memory split): the CPU
    // backend's memory check counts them.
    MPI_Comm node = MPI_COMM_NULL;
    MPT_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL,
                                      &node));
    MPT_MPI_CHECK(MPI_Comm_size(node, &node_size_));
    MPT_MPI_CHECK(MPI_Comm_free(&node));
    MPT_MPI_CHECK(MPI_Op_create(&nan_max, /*commute=*/1, &nan_max_));
    watchdog_ = std::make_unique<Watchdog>(
        watchdog_options_, [] { return Progress::done(); },
        [this](const WatchdogVerdict& v) {
          std::fprintf(stderr,
                       "mpt: error: rank %d of %d: %s (another rank hangs or died; "
                       "MPT_COMM_TIMEOUT_S sets the timeout); ending the job\n",
                       rank_, size_, v.reason.c_str());
          std::fflush(stderr);
          std::_Exit(static_cast<int>(ExitCode::runtime_failure));
        });
  }
  ~Mpi() override {
    watchdog_.reset();  // nothing is outstanding between collectives
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) {
      MPI_Op_free(&nan_max_);
      MPI_Finalize();
    }
  }
  int rank() const override { return rank_; }
  int world_size() const override { return size_; }
  int ranks_on_node() const override { return node_size_; }
  std::string name() const override { return "mpi"; }

  // Sums are reduced in a fixed order, the same on every rank (MPI_Allreduce's order may depend
  // on the rank and the algorithm): a reduce-scatter by hand, then an allgather. Rank r receives
  // every rank's values of its own 1/N of the vector (MPI_Alltoallv), adds them rank 0 first, and
  // the sums are gathered to all ranks: each rank receives about twice the vector's size, whatever
  // the number of ranks.
  void all_reduce_sum(float* data, size_t n) override { ordered_sum(data, n, MPI_FLOAT); }
  void all_reduce_sum(double* data, size_t n) override { ordered_sum(data, n, MPI_DOUBLE); }
  void all_reduce_max(float* data, size_t n) override {
    Watchdog::Scope guard(*watchdog_, "MPI_Allreduce (max) of " + std::to_string(n) + " floats");
    for (size_t off = 0; off < n; off += kChunk) {
      const int len = static_cast<int>(std::min(kChunk, n - off));
      MPT_MPI_CHECK(
          MPI_Allreduce(MPI_IN_PLACE, data + off, len, MPI_FLOAT, nan_max_, MPI_COMM_WORLD));
    }
  }
  void broadcast(void* data, size_t bytes, int root) override {
    Watchdog::Scope guard(*watchdog_, "MPI_Bcast of " + std::to_string(bytes) + " bytes");
    char* p = static_cast<char*>(data);
    for (size_t off = 0; off < bytes; off += kChunk) {
      const int len = static_cast<int>(std::min(kChunk, bytes - off));
      MPT_MPI_CHECK(MPI_Bcast(p + off, len, MPI_BYTE, root, MPI_COMM_WORLD));
    }
  }
  void all_gather(void* data, const std::vector<size_t>& bytes_per_rank) override {
    gather_blocks(data, bytes_per_rank, kEveryRank);
  }
  void gather(void* data, const std::vector<size_t>& bytes_per_rank, int root) override {
    if (root < 0 || root >= size_)
      throw RuntimeError("gather: root " + std::to_string(root) + " of " +
                         std::to_string(size_) + " ranks");
    gather_blocks(data, bytes_per_rank, root);
  }
  void barrier() override {
    Watchdog::Scope guard(*watchdog_, "MPI_Barrier");
    MPT_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
  }
  [[noreturn]] void abort(int code) override {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 private:
  static constexpr size_t kChunk = size_t{1} << 26;  // MPI counts are ints: chunk big vectors
  static constexpr int kEveryRank = -1;

  // all_gather (root kEveryRank: in place, every rank receives) and gather (to `root` alone; a
  // non-root rank's `data` is its own block only).
  void gather_blocks(void* data, const std::vector<size_t>& bytes_per_rank, int root) {
    const bool all = root == kEveryRank;
    const char* what = all ? "all_gather" : "gather";
    if (static_cast<int>(bytes_per_rank.size()) != size_)
      throw RuntimeError(std::string(what) + ": " + std::to_string(bytes_per_rank.size()) +
                         " block sizes for " + std::to_string(size_) + " ranks");
    Watchdog::Scope guard(*watchdog_, all ? "MPI_Allgatherv" : "MPI_Gatherv");
    const bool receives = all || rank_ == root;
    char* base = static_cast<char*>(data);
    std::vector<size_t> start(size_, 0);
    for (int r = 1; r < size_; ++r) start[r] = start[r - 1] + bytes_per_rank[r - 1];
    const size_t total = start.back() + bytes_per_rank.back();
    // This rank's block: where it lies in `data`.
    char* own = receives ? base + start[rank_] : base;
    std::vector<int> counts(size_), displs(size_);
    // One collective over the rounds' counts and displacements into `recv` (significant only on
    // a receiving rank, whose own block is already in place there); `send` is this rank's piece.
    auto collective = [&](const char* send, char* recv) {
      if (all)
        MPT_MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, recv, counts.data(),
                                     displs.data(), MPI_BYTE, MPI_COMM_WORLD));
      else if (receives)
        MPT_MPI_CHECK(MPI_Gatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, recv, counts.data(),
                                  displs.data(), MPI_BYTE, root, MPI_COMM_WORLD));
      else
        MPT_MPI_CHECK(MPI_Gatherv(send, counts[rank_], MPI_BYTE, nullptr, nullptr, nullptr,
                                  MPI_BYTE, root, MPI_COMM_WORLD));
    };
    if (total <= static_cast<size_t>(std::numeric_limits<int>::max())) {
      for (int r = 0; r < size_; ++r) {
        counts[r] = static_cast<int>(bytes_per_rank[r]);
        displs[r] = static_cast<int>(start[r]);
      }
      collective(own, base);
      return;
    }
    // MPI's counts and displacements are ints: over 2 GiB in all, the blocks go in rounds of at
    // most `chunk` bytes from each rank, gathered into a staging buffer and copied into place.
    const size_t chunk = std::min(kChunk, static_cast<size_t>(std::numeric_limits<int>::max()) /
                                              static_cast<size_t>(size_));
    std::vector<char> stage;
    for (size_t done = 0;; done += chunk) {
      int at = 0;
      for (int r = 0; r < size_; ++r) {
        const size_t left = bytes_per_rank[r] > done ? bytes_per_rank[r] - done : 0;
        counts[r] = static_cast<int>(std::min(chunk, left));
        displs[r] = at;
        at += counts[r];
      }
      if (at == 0) break;
      // This rank's piece of the round (none once its block is sent: no pointer past it).
      const char* piece = counts[rank_] > 0 ? own + done : nullptr;
      if (!receives) {
        collective(piece, nullptr);
        continue;
      }
      stage.resize(static_cast<size_t>(at));
      if (piece) std::copy_n(piece, counts[rank_], stage.data() + displs[rank_]);
      collective(nullptr, stage.data());
      for (int r = 0; r < size_; ++r)
        std::copy_n(stage.data() + displs[r], counts[r], base + start[r] + done);
    }
  }

  template <class T>
  void ordered_sum(T* data, size_t n, MPI_Datatype type) {
    if (size_ == 1) return;
    Watchdog::Scope guard(*watchdog_, "MPI_Alltoallv + MPI_Allgatherv (an ordered sum) of " +
                                          std::to_string(n) + " values");
    std::vector<int> counts(size_), displs(size_), from_each(size_), from_displs(size_);
    for (size_t off = 0; off < n; off += kChunk) {
      const size_t len = std::min(kChunk, n - off);
      // Rank r owns elements [displs[r], displs[r] + counts[r]) of this chunk.
      const size_t per = (len + size_ - 1) / size_;
      for (int r = 0; r < size_; ++r) {
        const size_t begin = std::min(len, r * per), end = std::min(len, (r + 1) * per);
        displs[r] = static_cast<int>(begin);
        counts[r] = static_cast<int>(end - begin);
      }
      const int mine = counts[rank_];
      for (int r = 0; r < size_; ++r) {
        from_each[r] = mine;
        from_displs[r] = r * mine;
      }
      gather_.resize(static_cast<size_t>(mine) * size_ * sizeof(T));
      T* all = reinterpret_cast<T*>(gather_.data());
      T* chunk = data + off;
      MPT_MPI_CHECK(MPI_Alltoallv(chunk, counts.data(), displs.data(), type, all,
                                  from_each.data(), from_displs.data(), type, MPI_COMM_WORLD));
      T* own = chunk + displs[rank_];
      for (int i = 0; i < mine; ++i) {
        T sum = all[i];
        for (int r = 1; r < size_; ++r) sum += all[static_cast<size_t>(r) * mine + i];
        own[i] = sum;
      }
      MPT_MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, chunk, counts.data(),
                                   displs.data(), type, MPI_COMM_WORLD));
    }
  }

  int rank_ = 0, size_ = 1, node_size_ = 1;
  MPI_Op nan_max_ = MPI_OP_NULL;
  WatchdogOptions watchdog_options_;
  std::unique_ptr<Watchdog> watchdog_;
  std::vector<char> gather_;
};
#endif

}  // namespace

bool have_mpi() { return MPT_HAVE_MPI != 0; }

std::unique_ptr<Communicator> make_communicator(const Placement& placement) {
  if (placement.world_size == 1) return std::make_unique<SingleProcess>();
#if MPT_HAVE_MPI
  auto c = std::make_unique<Mpi>();
  if (c->rank() != placement.rank || c->world_size() != placement.world_size)
    throw RuntimeError("MPI reports rank " + std::to_string(c->rank()) + " of " +
                       std::to_string(c->world_size()) + " but the launcher (" +
                       placement.launcher +
                       ") said rank " + std::to_string(placement.rank) + " of " +
                       std::to_string(placement.world_size));
  return c;
#else
  throw InputError("launched as rank " + std::to_string(placement.rank) + " of " +
                   std::to_string(placement.world_size) +
                   ", but this mpt was built without MPI (install libopenmpi-dev and rebuild)");
#endif
}

}  // namespace mpt::dist
