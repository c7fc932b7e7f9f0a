// How the processes of a data-parallel job talk: a Communicator reduces gradients, losses and
// flags across ranks. One interface, three implementations: a single process (no MPI needed),
// MPI on host buffers (the CPU backend), and NCCL on device buffers (the CUDA backend; to come).
// Every rank must make the same calls in the same order (they are collective).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "dist/launch.h"

namespace mpt::dist {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string name() const = 0;  // "single", "mpi"

  // In place over n host floats: the sum over ranks, then (mean) divided by world_size. Every
  // rank gets the same bits (the reduction's order does not depend on the rank).
  virtual void all_reduce_sum(float* data, size_t n) = 0;
  void all_reduce_mean(float* data, size_t n);
  void all_reduce_mean(double* data, size_t n);
  virtual void all_reduce_sum(double* data, size_t n) = 0;
  // Elementwise max over ranks; NaN wins (a NaN amax on one rank is a NaN amax for all).
  virtual void all_reduce_max(float* data, size_t n) = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // In place over a buffer that holds every rank's block, in rank order: rank r's block is
  // bytes_per_rank[r] bytes at the sum of the earlier ranks' sizes. Each rank fills its own block;
  // afterwards every rank holds every block. (ZeRO-1 gathers the weights each rank updated.)
  virtual void all_gather(void* data, const std::vector<size_t>& bytes_per_rank) = 0;
  // The same blocks gathered to `root` alone. On `root`, `data` is the whole buffer, its own block
  // already in place; on every other rank it is that rank's block only (bytes_per_rank[rank]
  // bytes). A ZeRO-1 checkpoint gathers each tensor to the rank that writes, so that no process
  // holds the whole optimizer state.
  virtual void gather(void* data, const std::vector<size_t>& bytes_per_rank, int root) = 0;
  virtual void barrier() = 0;

  // ---- device buffers (the NCCL communicator; others throw RuntimeError)
  // Whether this communicator reduces device memory: the CUDA backend's gradients.
  virtual bool reduces_device_memory() const { return false; }
  // The GPU this rank uses (the NCCL communicator's: its local rank's); 0 elsewhere.
  virtual int device() const { return 0; }
  // How many of the job's processes share this one's machine (and its memory), itself included.
  virtual int ranks_on_node() const { return 1; }
  // In place over n floats of device memory, enqueued on `stream` (a cudaStream_t): the sum
  // over ranks, the same bits on every rank.
  virtual void all_reduce_sum_device(float* data, size_t n, void* stream);
  // all_gather over device memory, enqueued on `stream`.
  virtual void all_gather_device(void* data, const std::vector<size_t>& bytes_per_rank,
                                 void* stream);
  // Ends the whole job with `code` (MPI_Abort under MPI): for a rank that fails alone, so that
  // the others do not wait forever in a collective.
  [[noreturn]] virtual void abort(int code) = 0;
};

// The communicator for `placement`: a single process for a world of one (no MPI runtime needed),
// else MPI when this build has it. A multi-process placement without MPI in the build is an
// InputError.
std::unique_ptr<Communicator> make_communicator(const Placement& placement);

// Whether this build has MPI.
bool have_mpi();

}  // namespace mpt::dist
