#include "dist/nccl_communicator.h"

#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <utility>

#include "backend/cuda/cuda_check.h"
#include "core/error.h"
#include "dist/ordered_max.cuh"

// Every NCCL call: a failure throws RuntimeError naming the rank, the call, NCCL's error string
// and its last-error text, the file and line.
#define MPT_NCCL_CHECK(call) check((call), #call, __FILE__, __LINE__)

namespace mpt::dist {
namespace {

std::string nccl_error_text(ncclResult_t r, ncclComm_t comm) {
  std::string s = ncclGetErrorString(r);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  const char* last = ncclGetLastError(comm);  // comm may be null (it is unused by NCCL so far)
  if (last && *last) s += std::string(": ") + last;
#endif
  return s;
}

std::string cuda_error_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

// A collective's completion: an event recorded after it on its stream.
Probe event_probe(cudaStream_t stream) {
  cudaEvent_t ev = nullptr;
  MPT_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  std::shared_ptr<CUevent_st> event(ev, [](cudaEvent_t e) { cudaEventDestroy(e); });
  MPT_CUDA_CHECK(cudaEventRecord(ev, stream));
  return [event] {
    const cudaError_t e = cudaEventQuery(event.get());
    if (e == cudaSuccess) return Progress::done();
    if (e == cudaErrorNotReady) return Progress::pending();
    return Progress::failed("CUDA error " + cuda_error_text(e));
  };
}

}  // namespace

std::string NcclCommunicator::who() const {
  return "rank " + std::to_string(rank()) + " of " + std::to_string(world_size()) +
         " (local rank " + std::to_string(local_rank_) + ", GPU " + std::to_string(device_) + ")";
}

void NcclCommunicator::check(int result, const char* call, const char* file, int line) const {
  const auto r = static_cast<ncclResult_t>(result);
  if (r == ncclSuccess) return;
  throw RuntimeError("NCCL call failed on " + who() + ": " + call + " -> " +
                     nccl_error_text(r, comm()) + " at " + file + ":" + std::to_string(line));
}

NcclCommunicator::NcclCommunicator(std::unique_ptr<Communicator> host, const Placement& placement,
                                   WatchdogOptions watchdog)
    : host_(std::move(host)), local_rank_(placement.local_rank), device_(placement.local_rank) {
  try {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky error
      throw RuntimeError(who() + ": no usable CUDA device for NCCL: " + cuda_error_text(e));
    }
    if (local_rank_ >= count) {
      const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
      throw InputError(who() + " needs GPU " + std::to_string(local_rank_) + ", but this node has " +
                       std::to_string(count) + " CUDA device(s)" +
                       (visible ? std::string(" (CUDA_VISIBLE_DEVICES=") + visible + ")" : "") +
                       ": launch at most one rank per GPU on each node");
    }
    MPT_CUDA_CHECK(cudaSetDevice(device_));

    auto comm_state = [this] {
      ncclComm_t c = comm_.load();
      if (!c) return Progress::done();  // not initialised yet (its initialisation is armed)
      ncclResult_t async = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(c, &async);
      if (r != ncclSuccess)
        return Progress::failed("ncclCommGetAsyncError -> " + nccl_error_text(r, c));
      if (async == ncclSuccess) return Progress::done();
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
      if (async == ncclInProgress) return Progress::pending();
#endif
      return Progress::failed(nccl_error_text(async, c));
    };
    // The watchdog thread selects this rank's GPU first, so that its CUDA calls do not create a
    // context on device 0.
    watchdog_ = std::make_unique<Watchdog>(
        watchdog, comm_state, [this](const WatchdogVerdict& v) { fire(v); },
        [d = device_] { cudaSetDevice(d); });

    ncclUniqueId id{};
    if (rank() == 0) MPT_NCCL_CHECK(ncclGetUniqueId(&id));
    {
      Watchdog::Scope guard(*watchdog_, "the broadcast of NCCL's unique id from rank 0");
      host_->broadcast(&id, sizeof id, 0);
    }
    ncclComm_t c = nullptr;
    {
      Watchdog::Scope guard(*watchdog_, "ncclCommInitRank (which waits for all " +
                                            std::to_string(world_size()) + " ranks)");
      MPT_NCCL_CHECK(ncclCommInitRank(&c, world_size(), id, rank()));
    }
    comm_.store(c);
  } catch (const std::exception& ex) {
    // The other ranks wait for this one in the broadcast or the initialisation: end the job.
    if (host_->world_size() > 1) {
      const auto* err = dynamic_cast<const Error*>(&ex);
      std::string msg = ex.what();
      if (msg.find(who()) == std::string::npos) msg = who() + ": " + msg;
      std::fprintf(stderr, "mpt: error: could not start NCCL: %s\n", msg.c_str());
      std::fflush(stderr);
      host_->abort(static_cast<int>(err ? err->code() : ExitCode::runtime_failure));
    }
    throw;
  }
}

NcclCommunicator::~NcclCommunicator() {
  ncclComm_t c = comm_.load();
  if (c && !watchdog_->fired()) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
    // Waits for the collectives still queued; a peer that never joins them is the watchdog's.
    Watchdog::Scope guard(*watchdog_, "ncclCommFinalize");
    const ncclResult_t r = ncclCommFinalize(c);
    if (r != ncclSuccess)
      std::fprintf(stderr, "mpt: warning: %s: ncclCommFinalize -> %s\n", who().c_str(),
                   nccl_error_text(r, c).c_str());
#endif
  }
  watchdog_->stop();  // nothing polls the communicator once it is destroyed
  if ((c = comm_.exchange(nullptr))) {
    const ncclResult_t r = ncclCommDestroy(c);
    if (r != ncclSuccess)
      std::fprintf(stderr, "mpt: warning: %s: ncclCommDestroy -> %s\n", who().c_str(),
                   nccl_error_text(r, nullptr).c_str());
  }
}

void NcclCommunicator::abort(int code) {
  // From another thread than the watchdog's, stop it first: it must not poll a communicator
  // being aborted. (From the watchdog's own thread it has already stopped polling.)
  if (!watchdog_->on_watchdog_thread()) watchdog_->stop();
  if (ncclComm_t c = comm_.exchange(nullptr)) ncclCommAbort(c);  // the job ends either way
  host_->abort(code);
  std::_Exit(code);  // not reached (abort is [[noreturn]], which a virtual call does not show)
}

void NcclCommunicator::fire(const WatchdogVerdict& v) {
  std::fprintf(stderr, "mpt: error: %s: NCCL watchdog: %s%s; aborting NCCL and the job\n",
               who().c_str(), v.reason.c_str(),
               v.action == WatchdogVerdict::kAbortOnTimeout ? " (MPT_NCCL_TIMEOUT_S sets it)"
                                                            : "");
  std::fflush(stderr);
  // NCCL is aborted (no kernel keeps waiting on a peer), then this process exits: MPI is
  // initialised for one thread, and the main thread may be inside an MPI call, so MPI_Abort is
  // not called from here; the launcher ends the job when a rank exits without finalising. A last
  // resort should ncclCommAbort itself block: the process exits after 30 s regardless.
  const int code = static_cast<int>(ExitCode::runtime_failure);
  std::thread([code] {
    std::this_thread::sleep_for(std::chrono::seconds(30));
    std::_Exit(code);
  }).detach();
  if (ncclComm_t c = comm_.exchange(nullptr)) ncclCommAbort(c);
  std::_Exit(code);
}

template <class F>
void NcclCommunicator::enqueue(const std::string& what, cudaStream_t stream, F&& launch) {
  if (!comm()) throw RuntimeError(who() + ": " + what + " on an aborted NCCL communicator");
  {
    Watchdog::Scope guard(*watchdog_, what + " (enqueueing)");
    launch();
  }
  watchdog_->arm(what, event_probe(stream));
}

void NcclCommunicator::all_reduce_sum_device(float* data, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  enqueue("ncclAllReduce(sum) of " + std::to_string(n) + " floats", stream, [&] {
    MPT_NCCL_CHECK(ncclAllReduce(data, data, n, ncclFloat, ncclSum, comm(), stream));
  });
}

void NcclCommunicator::all_reduce_sum_device(bf16* data, size_t n, cudaStream_t stream) {
  if (n == 0) return;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0)
  enqueue("ncclAllReduce(sum) of " + std::to_string(n) + " bf16", stream, [&] {
    MPT_NCCL_CHECK(ncclAllReduce(data, data, n, ncclBfloat16, ncclSum, comm(), stream));
  });
#else
  throw RuntimeError("bf16 all-reduce needs NCCL 2.10 or later (this build has " +
                     std::to_string(NCCL_VERSION_CODE) + ")");
#endif
}

void NcclCommunicator::all_reduce_max_device(float* data, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  floats_to_order_keys(data, n, stream);
  enqueue("ncclAllReduce(max) of " + std::to_string(n) + " floats", stream, [&] {
    MPT_NCCL_CHECK(ncclAllReduce(data, data, n, ncclUint32, ncclMax, comm(), stream));
  });
  order_keys_to_floats(data, n, stream);
}

void NcclCommunicator::all_gather_device(void* data, const std::vector<size_t>& bytes_per_rank,
                                         void* stream_ptr) {
  if (static_cast<int>(bytes_per_rank.size()) != world_size())
    throw RuntimeError(who() + ": all_gather_device with " +
                       std::to_string(bytes_per_rank.size()) + " block sizes");
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  size_t total = 0;
  for (size_t b : bytes_per_rank) total += b;
  if (total == 0) return;
  char* base = static_cast<char*>(data);
  enqueue("all-gather (grouped ncclBroadcast) of " + std::to_string(total) + " bytes", stream, [&] {
    MPT_NCCL_CHECK(ncclGroupStart());
    size_t at = 0;
    for (int r = 0; r < world_size(); ++r) {
      if (bytes_per_rank[r] > 0)
        MPT_NCCL_CHECK(ncclBroadcast(base + at, base + at, bytes_per_rank[r], ncclChar, r, comm(),
                                     stream));
      at += bytes_per_rank[r];
    }
    MPT_NCCL_CHECK(ncclGroupEnd());
  });
}

std::unique_ptr<NcclCommunicator> make_nccl_communicator(const Placement& placement) {
  return std::make_unique<NcclCommunicator>(make_communicator(placement), placement);
}

}  // namespace mpt::dist
