// The NCCL communicator: data-parallel collectives on device buffers for the CUDA backend (one
// GPU per local rank). Compiled only when the build has NCCL (MPT_HAVE_NCCL: the CUDA backend
// and NCCL found; several ranks also need MPI at run time).
//
// It wraps a host communicator (make_communicator: MPI, or a single process for a world of one),
// which carries NCCL's unique id at start-up and keeps every host-side collective: losses, flags,
// broadcasts of config text, barrier and abort. Gradients and amaxes are reduced on the device,
// on the caller's stream, by NCCL.
//
// Bootstrap (cuda-crib.md §6): the device count is checked against the local rank, the GPU
// `local_rank` is made current, rank 0 creates the unique id, the host communicator broadcasts
// it, and every rank calls ncclCommInitRank. A failure during bootstrap under several processes
// ends the whole job (the others would wait in the broadcast or in the initialisation forever),
// naming the rank; under one process it throws.
//
// A watchdog thread (watchdog.h) guards every collective and every blocking NCCL call: on an
// asynchronous NCCL error, a failed collective, or one outstanding longer than MPT_NCCL_TIMEOUT_S
// seconds (default 600), it prints the rank, local rank, device and reason, calls ncclCommAbort,
// and ends the job through the host communicator's abort (MPI_Abort; exit code 1).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "core/formats.h"
#include "dist/communicator.h"
#include "dist/watchdog.h"

struct ncclComm;  // nccl.h: typedef struct ncclComm* ncclComm_t

namespace mpt::dist {

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::unique_ptr<Communicator> host, const Placement& placement,
                   WatchdogOptions watchdog = watchdog_options_from_env("MPT_NCCL_TIMEOUT_S"));
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;
  // Finalises NCCL (waiting for outstanding collectives, under the watchdog), then destroys it.
  ~NcclCommunicator() override;

  int rank() const override { return host_->rank(); }
  int world_size() const override { return host_->world_size(); }
  int ranks_on_node() const override { return host_->ranks_on_node(); }
  std::string name() const override { return "nccl"; }
  int device() const override { return device_; }
  bool reduces_device_memory() const override { return true; }
  void all_reduce_sum_device(float* data, size_t n, void* stream) override {
    all_reduce_sum_device(data, n, static_cast<cudaStream_t>(stream));
  }
  // Rank r's block broadcast from rank r, the W broadcasts in one NCCL group (blocks may differ
  // in size, which ncclAllGather does not allow).
  void all_gather_device(void* data, const std::vector<size_t>& bytes_per_rank,
                         void* stream) override;
  int local_rank() const { return local_rank_; }

  // Host buffers: the host communicator's collectives.
  void all_reduce_sum(float* data, size_t n) override { host_->all_reduce_sum(data, n); }
  void all_reduce_sum(double* data, size_t n) override { host_->all_reduce_sum(data, n); }
  void all_reduce_max(float* data, size_t n) override { host_->all_reduce_max(data, n); }
  void broadcast(void* data, size_t bytes, int root) override {
    host_->broadcast(data, bytes, root);
  }
  void all_gather(void* data, const std::vector<size_t>& bytes_per_rank) override {
    host_->all_gather(data, bytes_per_rank);
  }
  void gather(void* data, const std::vector<size_t>& bytes_per_rank, int root) override {
    host_->gather(data, bytes_per_rank, root);
  }
  void barrier() override { host_->barrier(); }
  // Aborts NCCL (so no kernel keeps waiting on a peer), then the job.
  [[noreturn]] void abort(int code) override;

  // Device buffers, in place, enqueued on `stream` (asynchronous: the caller synchronises when it
  // needs the values). Every rank gets the same bits; NCCL's summation order depends on its
  // algorithm, the message size and the topology (not on the rank), so the bits may differ from
  // the MPI communicator's rank-order sums and between NCCL versions.
  void all_reduce_sum_device(float* data, size_t n, cudaStream_t stream);
  // bf16 sums round to bf16 after each addition NCCL makes (the order is NCCL's).
  void all_reduce_sum_device(bf16* data, size_t n, cudaStream_t stream);
  // Elementwise max; NaN wins, as on the host (float_order.h: ncclMax on floats would drop it).
  // The buffer holds order keys while NCCL reduces: after an exception its contents are lost.
  void all_reduce_max_device(float* data, size_t n, cudaStream_t stream);

  // The watchdog (tests: how many collectives are outstanding, whether it fired).
  const Watchdog& watchdog() const { return *watchdog_; }

 private:
  ncclComm* comm() const { return comm_.load(); }
  void check(int result, const char* call, const char* file, int line) const;
  // Enqueues one collective: `launch` calls NCCL; the watchdog guards the call itself (a first
  // collective may block while connecting to peers) and then the collective until an event
  // recorded after it on `stream` completes.
  template <class F>
  void enqueue(const std::string& what, cudaStream_t stream, F&& launch);
  [[noreturn]] void fire(const WatchdogVerdict& v);
  std::string who() const;  // "rank R of N (local rank L, GPU D)"

  std::unique_ptr<Communicator> host_;
  int local_rank_ = 0, device_ = 0;
  std::atomic<ncclComm*> comm_{nullptr};
  std::unique_ptr<Watchdog> watchdog_;
};

// A host communicator for `placement` (make_communicator) wrapped by the NCCL communicator.
std::unique_ptr<NcclCommunicator> make_nccl_communicator(const Placement& placement);

}  // namespace mpt::dist
