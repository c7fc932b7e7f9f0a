#include "backend/cuda/cuda_context.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

namespace mpt::cuda {

void throw_cuda_error(const char* call, const char* file, int line, const char* error_name,
                      const char* error_text) {
  throw RuntimeError(std::string("CUDA call failed: ") + call + " -> " + error_name + " (" +
                     error_text + ") at " + file + ":" + std::to_string(line));
}

const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_(unknown)";
  }
}

const char* cublas_status_meaning(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_INVALID_VALUE:
      return "an unsupported value or parameter: check shapes, alignment, attribute sizes, and "
             "that the workspace is at least the algorithm's (CUBLASLT_LOG_LEVEL=5 traces calls)";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "no algorithm supports this combination of types, layouts and epilogue";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "the operation needs a newer GPU architecture";
    case CUBLAS_STATUS_ALLOC_FAILED: return "out of memory inside cuBLASLt";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU kernel failed to launch or run";
    default: return "see the cuBLAS documentation's cublasStatus_t";
  }
}

bool device_available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error the failed query leaves
    if (why) {
      switch (e) {
        case cudaErrorNoDevice: *why = "no CUDA device"; break;
        case cudaErrorInsufficientDriver: *why = "no NVIDIA driver, or one too old for this CUDA runtime"; break;
        case cudaErrorStubLibrary: *why = "only the CUDA driver's stub library is installed"; break;
        default: *why = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(e); break;
      }
    }
    return false;
  }
  if (n == 0) {
    if (why) *why = "no CUDA device";
    return false;
  }
  return true;
}

// ---- DeviceBuffer

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes) MPT_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
}
DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    DeviceBuffer tmp(std::move(o));
    std::swap(ptr_, tmp.ptr_);
    std::swap(bytes_, tmp.bytes_);
  }
  return *this;
}
DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);  // no throw from a destructor; a failure here is not actionable
}

// ---- Context

// Events are created once and reused by later profiles; marks[i] is the op whose launch check
// recorded events[i + 1] (events[0] is the start). At most kMaxMarks per profile: a profile
// left on (an exception between start and stop) stops growing there.
struct Context::Profiler {
  static constexpr size_t kMaxMarks = size_t{1} << 16;
  std::vector<cudaEvent_t> events;
  size_t used = 0;
  std::vector<std::string> marks;
  bool on = false;
  Profiler() = default;
  Profiler(const Profiler&) = delete;
  Profiler& operator=(const Profiler&) = delete;
  ~Profiler() {
    for (cudaEvent_t e : events) cudaEventDestroy(e);  // errors are not thrown here
  }
  // Records the next event on `stream`; `used` and the marks change only once it is recorded.
  void record(cudaStream_t stream, const char* op) {
    if (op && marks.size() >= kMaxMarks) return;
    if (used == events.size()) {
      cudaEvent_t e = nullptr;
      MPT_CUDA_CHECK(cudaEventCreate(&e));
      events.push_back(e);
    }
    MPT_CUDA_CHECK(cudaEventRecord(events[used], stream));
    ++used;
    if (op) marks.emplace_back(op);
  }
};

Context::Context(int device) : device_(device) {
  try {
    init();
  } catch (...) {
    release();
    throw;
  }
}

void Context::init() {
  const int device = device_;
  MPT_CUDA_CHECK(cudaSetDevice(device));
  MPT_CUDA_CHECK(cudaGetDeviceProperties(&props_, device));
  MPT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  MPT_CUDA_CHECK(cublasLtCreate(&lt_));
  lt_workspace_ = DeviceBuffer(lt_workspace_size(props_.major));
  mem_->add(lt_workspace_.bytes());
  counters_ = DeviceBuffer(sizeof(unsigned long long) * 2 * 2 * kTensorClasses);
  lost_ = DeviceBuffer(sizeof(unsigned long long));
  amax_words_ = DeviceBuffer(kAmaxReports * sizeof(unsigned));
  scale_words_ = DeviceBuffer(4 * sizeof(float));
  MPT_CUDA_CHECK(cudaMemsetAsync(amax_words_.data(), 0, amax_words_.bytes(), stream_));
  // On our stream: a plain cudaMemset goes to the legacy stream, which a non-blocking stream
  // does not wait for, so the first counting kernel could race it.
  MPT_CUDA_CHECK(cudaMemsetAsync(counters_.data(), 0, counters_.bytes(), stream_));
  sync("zeroing the cast counters");
  const char* s = std::getenv("MPT_CUDA_SYNC");
  debug_sync_ = s && std::strcmp(s, "0") != 0 && *s;
  lt_epilogues_ = lt_epilogues_enabled();
}

void Context::start_profile() {
  if (!profiler_) profiler_ = std::make_unique<Profiler>();
  profiler_->used = 0;
  profiler_->marks.clear();
  profiler_->record(stream_, nullptr);  // the start
  profiler_->on = true;
}

OpProfileTable Context::stop_profile() {
  OpProfileTable table;
  if (!profiler_ || !profiler_->on) return table;
  profiler_->on = false;
  sync("op profile");
  for (size_t i = 0; i < profiler_->marks.size(); ++i) {
    float ms = 0;
    MPT_CUDA_CHECK(cudaEventElapsedTime(&ms, profiler_->events[i], profiler_->events[i + 1]));
    table.add(profiler_->marks[i], ms);
  }
  return table;
}

Context::~Context() { release(); }

void Context::release() noexcept {
  // Destruction order matters: the handle before the stream; errors are not thrown here.
  if (stream_) cudaStreamSynchronize(stream_);
  if (lt_) cublasLtDestroy(lt_);
  if (stream_) cudaStreamDestroy(stream_);
  if (pinned_) cudaFreeHost(pinned_);
  lt_ = nullptr;
  stream_ = nullptr;
  pinned_ = nullptr;
}

void* Context::scratch(Scratch role, size_t bytes) {
  DeviceBuffer& b = scratch_[static_cast<int>(role)];
  if (b.bytes() < bytes) {
    // The old buffer may still be read by queued kernels: wait before freeing it. Its contents
    // need not survive, so it goes first: never both at once (the memory ledger's prediction).
    sync("growing scratch");
    mem_->sub(b.bytes());
    b = DeviceBuffer();
    b = DeviceBuffer(bytes);
    mem_->add(b.bytes());
  }
  return b.data();
}

size_t Context::scratch_bytes() const {
  size_t n = 0;
  for (const auto& b : scratch_) n += b.bytes();
  return n;
}

unsigned long long* Context::cast_counters(TensorClass cls) const {
  return counters_.as<unsigned long long>() + (counting_ ? 0 : 2 * kTensorClasses) +
         2 * static_cast<int>(cls);
}

std::array<CastCounts, kTensorClasses> Context::read_cast_counters() const {
  unsigned long long h[2 * kTensorClasses];
  MPT_CUDA_CHECK(cudaMemcpyAsync(h, counters_.data(), sizeof h, cudaMemcpyDeviceToHost, stream_));
  sync("reading cast counters");
  std::array<CastCounts, kTensorClasses> out{};
  for (int c = 0; c < kTensorClasses; ++c) {
    out[c].overflow = static_cast<int64_t>(h[2 * c]);
    out[c].underflow = static_cast<int64_t>(h[2 * c + 1]);
    out[c].values = values_[c];
  }
  return out;
}

unsigned long long* Context::lost_update_counter(AdamWStats* stats) {
  if (lost_stats_ && lost_stats_ != stats) collect_reports();
  if (!lost_stats_) {
    MPT_CUDA_CHECK(cudaMemsetAsync(lost_.data(), 0, lost_.bytes(), stream_));
    lost_stats_ = stats;
  }
  return lost_.as<unsigned long long>();
}

unsigned* Context::amax_report(float* host) {
  if (amax_hosts_.size() == kAmaxReports) collect_reports();
  if (amax_words_dirty_) {
    MPT_CUDA_CHECK(cudaMemsetAsync(amax_words_.data(), 0, amax_words_.bytes(), stream_));
    amax_words_dirty_ = false;
  }
  amax_hosts_.push_back(host);
  return amax_words_.as<unsigned>() + (amax_hosts_.size() - 1);
}

void Context::collect_reports() {
  // Take both pending lists first: whatever happens below, no host pointer stays registered.
  AdamWStats* stats = lost_stats_;
  lost_stats_ = nullptr;
  amax_collecting_.clear();
  amax_collecting_.swap(amax_hosts_);
  const size_t words = amax_collecting_.size();
  if (!stats && words == 0) return;
  if (words) amax_words_dirty_ = true;  // until the memset below is queued
  // One pinned block: the lost count, then the amax words; both copies, then one wait.
  char* h = static_cast<char*>(pinned(sizeof(unsigned long long) + words * sizeof(unsigned)));
  if (stats)
    MPT_CUDA_CHECK(cudaMemcpyAsync(h, lost_.data(), sizeof(unsigned long long),
                                   cudaMemcpyDeviceToHost, stream_));
  if (words) {
    char* w = h + sizeof(unsigned long long);
    MPT_CUDA_CHECK(cudaMemcpyAsync(w, amax_words_.data(), words * sizeof(unsigned),
                                   cudaMemcpyDeviceToHost, stream_));
    MPT_CUDA_CHECK(cudaMemsetAsync(amax_words_.data(), 0, words * sizeof(unsigned), stream_));
    amax_words_dirty_ = false;
  }
  sync("reading the statistics left on the device (lost updates, fp8 amaxes)");
  if (stats) {
    unsigned long long lost;
    std::memcpy(&lost, h, sizeof lost);
    stats->lost_updates += static_cast<int64_t>(lost);
  }
  for (size_t i = 0; i < words; ++i)
    std::memcpy(amax_collecting_[i], h + sizeof(unsigned long long) + i * sizeof(unsigned),
                sizeof(float));
  amax_collecting_.clear();
}

void Context::zero_cast_counters() {
  MPT_CUDA_CHECK(cudaMemsetAsync(counters_.data(), 0, counters_.bytes(), stream_));
  values_ = {};
}

void* Context::pinned(size_t bytes) {
  if (pinned_bytes_ < bytes) {
    sync("growing the pinned buffer");
    if (pinned_) MPT_CUDA_CHECK(cudaFreeHost(pinned_));
    pinned_ = nullptr;
    pinned_bytes_ = 0;
    MPT_CUDA_CHECK(cudaMallocHost(&pinned_, bytes));
    pinned_bytes_ = bytes;
  }
  return pinned_;
}

StagingBlock::~StagingBlock() {
  // Not thrown from a destructor; the Context synchronised its stream first.
  if (done_) {
    cudaEventSynchronize(done_);
    cudaEventDestroy(done_);
  }
  if (ptr_) cudaFreeHost(ptr_);
}

void* StagingBlock::acquire(size_t bytes) {
  if (pending_) {
    MPT_CUDA_CHECK(cudaEventSynchronize(done_));
    pending_ = false;
  }
  if (bytes_ < bytes) {
    if (ptr_) MPT_CUDA_CHECK(cudaFreeHost(ptr_));
    ptr_ = nullptr;
    bytes_ = 0;
    MPT_CUDA_CHECK(cudaMallocHost(&ptr_, bytes));
    bytes_ = bytes;
  }
  return ptr_;
}

void StagingBlock::queued(cudaStream_t stream) {
  if (!done_) MPT_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  MPT_CUDA_CHECK(cudaEventRecord(done_, stream));
  pending_ = true;
}

void Context::upload_async(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  StagingBlock& b = staging_[next_staging_];
  next_staging_ = (next_staging_ + 1) % kStaging;
  void* h = b.acquire(bytes);
  std::memcpy(h, src, bytes);
  MPT_CUDA_CHECK(cudaMemcpyAsync(dst, h, bytes, cudaMemcpyHostToDevice, stream_));
  try {
    b.queued(stream_);
  } catch (...) {
    // Without its event the block could be handed out while the copy still reads it: wait.
    cudaStreamSynchronize(stream_);
    throw;
  }
}

const int32_t* Context::ids_on_host(const char* op, const Tensor& t, int64_t limit,
                                    std::vector<int32_t>* readback) {
  const int64_t n = t.numel();
  // The device's values into *readback (queued; the caller waits).
  auto read_back = [&] {
    readback->resize(static_cast<size_t>(n));
    MPT_CUDA_CHECK(cudaMemcpyAsync(readback->data(), t.data, t.bytes(), cudaMemcpyDeviceToHost,
                                   stream_));
  };
  if (const HostIds* known = host_ids_->find(t.data, t.bytes())) {
    check_ids(op, known->values.data(), n, limit, known);
    if (debug_sync_ && n > 0) {
      read_back();
      // Not sync(): a debugging wait, like check_launch's, is no idle time of the op profile's.
      MPT_CUDA_CHECK(cudaStreamSynchronize(stream_));
      if (*readback != known->values)
        throw RuntimeError(std::string(op) + ": the host's copy of the token ids differs from " +
                           "the device's: the ids were written after copy_ids_from_host by " +
                           "an op that must not write them (MPT_CUDA_SYNC=1 check)");
    }
    return known->values.data();
  }
  readback->resize(static_cast<size_t>(n));
  if (n > 0) {
    read_back();
    sync(op);
  }
  check_ids(op, readback->data(), n, limit);
  return readback->data();
}

void Context::check_launch(const char* op, const char* file, int line) const {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw RuntimeError(std::string("CUDA kernel launch failed in op '") + op + "': " +
                       cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") at " + file + ":" +
                       std::to_string(line));
  if (profiling()) profiler_->record(stream_, op);
  if (debug_sync_) {
    const cudaError_t s = cudaStreamSynchronize(stream_);
    if (s != cudaSuccess)
      throw RuntimeError(std::string("CUDA op '") + op + "' failed: " + cudaGetErrorName(s) +
                         " (" + cudaGetErrorString(s) + ") at " + file + ":" + std::to_string(line) +
                         " (MPT_CUDA_SYNC=1)");
  }
}

void Context::sync(const char* what) const {
  const cudaError_t e = cudaStreamSynchronize(stream_);
  if (e != cudaSuccess)
    throw RuntimeError(std::string("CUDA error while ") + what + ": " + cudaGetErrorName(e) +
                       " (" + cudaGetErrorString(e) + ")");
  // The GPU idles from here until the host queues more work: a profile charges that to the
  // synchronisation, not to the next op.
  if (profiling()) profiler_->record(stream_, "(idle: host synchronisation)");
}

bool Context::profiling() const { return profiler_ && profiler_->on; }

}  // namespace mpt::cuda
