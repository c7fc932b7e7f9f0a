// The CUDA backend's handles and scratch, held in one object that ops receive (no globals): the
// device, one stream every op runs on, the cuBLASLt handle and its workspace, grow-only scratch
// buffers, the cast-statistics counters, and a small pinned buffer for results the host reads.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/host_ids.h"
#include "backend/cuda/matmul_plan.h"
#include "backend/cuda/op_profile.h"
#include "backend/cuda/workspace_plan.h"
#include "backend/memory_counter.h"

namespace mpt::cuda {

// Whether a CUDA device can be used; when not, *why (if given) says why in one line ("no CUDA
// device", "no NVIDIA driver", ...). cudaGetDeviceCount's "no device", "insufficient driver" and
// "stub library" results mean no device; the sticky error they leave is cleared.
bool device_available(std::string* why = nullptr);

// Device memory owned by one object: cudaFree on destruction, move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  ~DeviceBuffer();

  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Pinned host memory that an asynchronous host-to-device copy reads, with an event recorded
// after that copy: the memory is handed out again only once the copy has completed. Neither
// copied nor moved (cudaFreeHost and cudaEventDestroy on destruction).
class StagingBlock {
 public:
  StagingBlock() = default;
  StagingBlock(const StagingBlock&) = delete;
  StagingBlock& operator=(const StagingBlock&) = delete;
  ~StagingBlock();
  // At least `bytes` of pinned memory, after the last copy queued from it has completed.
  void* acquire(size_t bytes);
  // Records that a copy from the block was just queued on `stream`.
  void queued(cudaStream_t stream);

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  cudaEvent_t done_ = nullptr;
  bool pending_ = false;
};

// Scratch roles (enum Scratch): workspace_plan.h, where the workspace is also predicted.

class Context {
 public:
  // Makes `device` current and creates the stream, the cuBLASLt handle and its workspace.
  explicit Context(int device);
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  ~Context();

  int device() const { return device_; }
  const cudaDeviceProp& props() const { return props_; }
  cudaStream_t stream() const { return stream_; }
  cublasLtHandle_t lt() const { return lt_; }
  void* lt_workspace() const { return lt_workspace_.data(); }
  size_t lt_workspace_bytes() const { return lt_workspace_.bytes(); }

  // Scratch of at least `bytes` for `role` (grows, never shrinks; contents undefined).
  void* scratch(Scratch role, size_t bytes);
  size_t scratch_bytes() const;
  // Counts the backend's Buffers (CudaBackend::allocate), the cuBLASLt workspace and the
  // scratch: Backend::memory_usage().
  const std::shared_ptr<MemoryCounter>& memory() const { return mem_; }

  // Device counters of narrowing casts per tensor class: {overflow, underflow} as unsigned long
  // long, added to by kernels (the number of values cast is counted on the host).
  unsigned long long* cast_counters(TensorClass cls) const;
  // Ops that store n values into a narrower dtype under `cls` call this (the values count is
  // known on the host; only overflows and underflows are counted on the device).
  void add_cast_values(TensorClass cls, int64_t n) {
    if (counting_) values_[static_cast<int>(cls)] += n;
  }
  // Off: cast_counters() hands out a second set of counters that is never read, and values are
  // not added (Backend::set_cast_counting; a kernel's code stays the same).
  void set_cast_counting(bool on) { counting_ = on; }
  bool cast_counting() const { return counting_; }
  // The counts since zero_cast_counters() (synchronises to read the device counters).
  std::array<CastCounts, kTensorClasses> read_cast_counters() const;
  void zero_cast_counters();

  // adamw_update's lost-update count, summed on the device over the calls that share `stats`
  // until collect_reports() adds it there (once per optimizer step, not once per parameter).
  // A call with another `stats` first collects the pending count; `stats` must stay valid
  // until it is collected.
  unsigned long long* lost_update_counter(AdamWStats* stats);
  // fp8 amax reports (Fp8Operand::amax): a zeroed device word per requested amax, which the
  // quantise kernel raises to the operand's magnitude bits (atomicMax), copied to `host` by
  // collect_reports() (`host` must stay valid until then). When all kAmaxReports words are
  // pending, they are collected first.
  unsigned* amax_report(float* host);
  // Three device floats for the inverse scales of the fp8 GEMM being run (matmul.cu's
  // ScaleWords): the quantise pass before each such GEMM writes them, the GEMM reads them
  // (in stream order, so one set serves every GEMM).
  float* fp8_scale_words() const { return scale_words_.as<float>(); }
  // Writes every pending report to the host - the lost-update count and the amaxes - with one
  // synchronisation, and re-zeroes the words. Nothing stays pending, even when it throws.
  void collect_reports();

  // cuBLASLt algorithms chosen per GEMM shape (matmul.cu): the heuristic runs once per key.
  GemmAlgoCache& gemm_algos() { return gemm_algos_; }

  // Pinned host memory for small results copied back from the device (reductions).
  void* pinned(size_t bytes);

  // Copies `bytes` from host memory `src` to device memory `dst` on the stream without waiting
  // for the copy: src goes first into the next of a ring of pinned staging blocks (kStaging;
  // a block is reused once its last copy has completed), so the caller may reuse src at once.
  void upload_async(void* dst, const void* src, size_t bytes);
  // The host's copies of ids uploaded by CudaBackend::copy_ids_from_host (host_ids.h). Shared
  // with the Buffers' deleters, which forget the memory they free.
  const std::shared_ptr<HostIdTable>& host_ids() const { return host_ids_; }
  // Which forward wrote each fp8 input cache (MatmulSpec::inp_cache): matmul.cu records and
  // checks. Shared with the Buffers' deleters, which forget the caches they free.
  Fp8InpCaches& fp8_inp_caches() { return *fp8_inp_caches_; }
  const std::shared_ptr<Fp8InpCaches>& fp8_inp_caches_ptr() const { return fp8_inp_caches_; }
  // The values of int32 tensor `t` on the host, checked against [0, limit) as the CPU backend
  // checks ids (RuntimeError naming `op`): the host's copy when t is exactly a tensor uploaded
  // by copy_ids_from_host (no synchronisation), else read back into *readback (synchronises).
  // With MPT_CUDA_SYNC=1 the host's copy is also compared with the device's values (a copy
  // gone stale, by a write the backend did not see, is reported naming `op`).
  const int32_t* ids_on_host(const char* op, const Tensor& t, int64_t limit,
                             std::vector<int32_t>* readback);

  // After every kernel launch: the launch's own error (a bad configuration) is thrown naming
  // `op`; with MPT_CUDA_SYNC=1 in the environment the stream is also synchronised, so an error
  // in the kernel itself is reported at the op that caused it.
  void check_launch(const char* op, const char* file, int line) const;
  // Waits for the stream and checks its errors, naming `what`.
  void sync(const char* what) const;
  bool debug_sync() const { return debug_sync_; }
  // Whether the matmuls may use cuBLASLt's epilogues (BIAS, GELU_AUX[_BIAS], DGELU, BGRADB):
  // MPT_LT_EPILOGUES=0 in the environment turns them all off, and our kernels do that work, so
  // that a failure inside one can be told apart from the rest on the next run.
  bool lt_epilogues() const { return lt_epilogues_; }

  // Op profiling (op_profile.h): from start_profile() on, every check_launch also records an
  // event on the stream; stop_profile() synchronises and returns the GPU time between
  // consecutive events per op. For benchmarks: it adds a host call per launch.
  void start_profile();
  OpProfileTable stop_profile();
  bool profiling() const;

 private:
  // The handle, stream and pinned block, in the order they must go (the destructor, and a
  // constructor that throws half way: its DeviceBuffers free themselves).
  void release() noexcept;
  void init();  // the constructor's work, which release() undoes if it throws
  int device_ = 0;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  DeviceBuffer lt_workspace_;
  std::array<DeviceBuffer, static_cast<int>(Scratch::kCount)> scratch_;
  DeviceBuffer counters_;  // [2][kTensorClasses][2] unsigned long long: counted, discarded
  bool counting_ = true;
  DeviceBuffer lost_;      // one unsigned long long (like counters_, a few bytes not counted)
  AdamWStats* lost_stats_ = nullptr;
  static constexpr size_t kAmaxReports = 4096;
  DeviceBuffer amax_words_;  // kAmaxReports unsigned, zero where not pending (16 KiB, not counted)
  DeviceBuffer scale_words_;  // fp8_scale_words (not counted either)
  std::vector<float*> amax_hosts_;       // where each pending word goes
  std::vector<float*> amax_collecting_;  // the list being collected (kept for its capacity)
  bool amax_words_dirty_ = false;        // a failed collect left words un-zeroed
  std::array<int64_t, kTensorClasses> values_{};
  GemmAlgoCache gemm_algos_;
  void* pinned_ = nullptr;
  size_t pinned_bytes_ = 0;
  // Uploads per micro-step: the tokens, the targets and the embedding's buckets (and the rare
  // fp8 scale words of an empty operand); a block comes round again about a micro-step later,
  // when its copy has long completed (acquire waits for it otherwise).
  static constexpr size_t kStaging = 4;
  std::array<StagingBlock, kStaging> staging_;
  size_t next_staging_ = 0;
  std::shared_ptr<HostIdTable> host_ids_ = std::make_shared<HostIdTable>();
  std::shared_ptr<Fp8InpCaches> fp8_inp_caches_ = std::make_shared<Fp8InpCaches>();
  bool debug_sync_ = false;
  bool lt_epilogues_ = true;
  struct Profiler;  // the events and the ops that ended them
  std::unique_ptr<Profiler> profiler_;
  std::shared_ptr<MemoryCounter> mem_ = std::make_shared<MemoryCounter>();
};

}  // namespace mpt::cuda

#define MPT_LAUNCH_CHECK(ctx, op) (ctx).check_launch((op), __FILE__, __LINE__)
