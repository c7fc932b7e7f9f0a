#include "backend/cuda/cuda_backend.h"

#include <cublasLt.h>

#include <string>

#include "backend/cuda/adamw.cuh"
#include "backend/cuda/attention.cuh"
#include "backend/cuda/cast.cuh"
#include "backend/cuda/classifier.cuh"
#include "backend/cuda/cuda_context.h"
#include "backend/cuda/embedding.cuh"
#include "backend/cuda/fill.cuh"
#include "backend/cuda/gelu.cuh"
#include "backend/cuda/layernorm.cuh"
#include "backend/cuda/matmul.cuh"
#include "backend/cuda/norm.cuh"
#include "backend/cuda/residual.cuh"

namespace mpt {

CudaBackend::CudaBackend(int device) {
  std::string why;
  if (!cuda::device_available(&why))
    throw InputError("backend 'cuda' is not available: no usable GPU (" + why +
                     "); use backend: cpu or auto");
  int n = 0;
  MPT_CUDA_CHECK(cudaGetDeviceCount(&n));
  if (device < 0 || device >= n)
    throw InputError("backend 'cuda': device " + std::to_string(device) + " does not exist (" +
                     std::to_string(n) + " device(s))");
  ctx_ = std::make_unique<cuda::Context>(device);
}

CudaBackend::~CudaBackend() = default;

std::string CudaBackend::device_description() const {
  const cudaDeviceProp& p = ctx_->props();
  // The versions too: a GPU run's results are read against the libraries that produced them
  // (cuBLASLt's algorithms, and so the GEMMs' summation orders, change between releases).
  int runtime = 0, driver = 0;
  MPT_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
  MPT_CUDA_CHECK(cudaDriverGetVersion(&driver));
  return std::string(p.name) + " (compute capability " + std::to_string(p.major) + "." +
         std::to_string(p.minor) + ", " + std::to_string(p.multiProcessorCount) + " SMs, " +
         std::to_string(p.totalGlobalMem >> 20) + " MiB; CUDA runtime " +
         std::to_string(runtime) + ", driver " + std::to_string(driver) + ", cuBLASLt " +
         std::to_string(cublasLtGetVersion()) + ")";
}

Buffer CudaBackend::allocate(size_t bytes) {
  void* p = nullptr;
  MPT_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1));  // cudaMalloc aligns to >= 256 bytes
  // New memory holds no uploaded ids (a copy recorded for a freed block at this address is
  // forgotten when that block is freed; this is the second guard).
  ctx_->host_ids()->forget(p, bytes ? bytes : 1);
  ctx_->fp8_inp_caches().forget(p, bytes ? bytes : 1);  // likewise for fp8 input caches
  Buffer buf(p, bytes, [mem = ctx_->memory(), ids = ctx_->host_ids(),
                        caches = ctx_->fp8_inp_caches_ptr(), bytes](void* q) {
    // The release waits for queued work that may still use the memory (cudaFree synchronises
    // with the device); it must not throw from a destructor.
    cudaFree(q);
    mem->sub(bytes);
    ids->forget(q, bytes ? bytes : 1);
    caches->forget(q, bytes ? bytes : 1);
  });
  ctx_->memory()->add(bytes);
  // backend.h promises zeroed memory (a failure here frees the allocation through buf)
  MPT_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes ? bytes : 1, ctx_->stream()));
  ctx_->sync("zeroing a new allocation");
  return buf;
}

MemoryUsage CudaBackend::memory_usage() const {
  MemoryUsage u;
  u.bytes = ctx_->memory()->bytes();
  u.peak_bytes = ctx_->memory()->peak();
  size_t free = 0, total = 0;
  MPT_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  u.device_used_bytes = total - free;
  u.device_total_bytes = total;
  return u;
}

void CudaBackend::reset_peak_memory() { ctx_->memory()->reset_peak(); }

GpuInfo CudaBackend::gpu_info() const {
  const cudaDeviceProp& p = ctx_->props();
  return {p.name, p.major, p.minor};
}

// Memory written by other means than the ops that keep the records: host_ids.h's copies of ids
// and the fp8 input caches' records no longer describe it.
void CudaBackend::forget_records(const Tensor& t) {
  ctx_->host_ids()->forget(t.data, t.bytes());
  ctx_->fp8_inp_caches().forget(t.data, t.bytes());
}

void CudaBackend::copy_from_host(Tensor dst, const void* src) {
  forget_records(dst);
  MPT_CUDA_CHECK(
      cudaMemcpyAsync(dst.data, src, dst.bytes(), cudaMemcpyHostToDevice, ctx_->stream()));
  ctx_->sync("copying to the device");  // src may be freed or reused by the caller right after
}

void CudaBackend::copy_ids_from_host(Tensor dst, const int32_t* src) {
  if (!dst.defined() || dst.dtype != DType::i32)
    throw RuntimeError(std::string("copy_ids_from_host: argument 'dst' expected an int32 tensor, got ") +
                       (dst.defined() ? dtype_name(dst.dtype) : "undefined") + dst.shape.str());
  forget_records(dst);  // should the upload fail
  ctx_->upload_async(dst.data, src, dst.bytes());
  ctx_->host_ids()->record(dst.data, dst.bytes(), src);
}

void CudaBackend::copy_to_host(void* dst, Tensor src) {
  MPT_CUDA_CHECK(
      cudaMemcpyAsync(dst, src.data, src.bytes(), cudaMemcpyDeviceToHost, ctx_->stream()));
  ctx_->sync("copying to the host");
}

void CudaBackend::synchronize() { ctx_->sync("synchronize()"); }

void* CudaBackend::stream() const { return ctx_->stream(); }

size_t CudaBackend::workspace_bytes() const {
  return ctx_->scratch_bytes() + ctx_->lt_workspace_bytes();
}

void CudaBackend::fill(Tensor t, float value) {
  forget_records(t);
  cuda::fill(*ctx_, t, value);
}
void CudaBackend::cast(Tensor dst, Tensor src, TensorClass cls) { cuda::cast(*ctx_, dst, src, cls); }
float CudaBackend::amax(Tensor t) { return cuda::amax(*ctx_, t); }
int64_t CudaBackend::count_nonfinite(Tensor t) { return cuda::count_nonfinite(*ctx_, t); }

CastCounts CudaBackend::cast_counts(TensorClass cls) const {
  return ctx_->read_cast_counters()[static_cast<int>(cls)];
}
void CudaBackend::reset_cast_counts() { ctx_->zero_cast_counters(); }
void CudaBackend::set_cast_counting(bool on) { ctx_->set_cast_counting(on); }
bool CudaBackend::cast_counting() const { return ctx_->cast_counting(); }

void CudaBackend::embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe) {
  cuda::embedding_forward(*ctx_, out, tokens, wte, wpe);
}
void CudaBackend::embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) {
  cuda::embedding_backward(*ctx_, dwte, dwpe, dout, tokens);
}
void CudaBackend::layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp,
                                    Tensor weight, Tensor bias) {
  cuda::layernorm_forward(*ctx_, out, mean, rstd, inp, weight, bias);
}
void CudaBackend::layernorm_forward_fp8(Tensor out, Tensor mean, Tensor rstd, Tensor inp,
                                        Tensor weight, Tensor bias, const Fp8Output& fp8) {
  cuda::layernorm_forward(*ctx_, out, mean, rstd, inp, weight, bias, &fp8);
}
void CudaBackend::layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                     Tensor inp, Tensor weight, Tensor mean, Tensor rstd) {
  cuda::layernorm_backward(*ctx_, dinp, dweight, dbias, dout, inp, weight, mean, rstd);
}
void CudaBackend::matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias,
                                 const MatmulSpec& spec) {
  cuda::matmul_forward(*ctx_, out, inp, weight, bias, spec);
}
void CudaBackend::matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                  Tensor inp, Tensor weight, const MatmulSpec& spec) {
  cuda::matmul_backward(*ctx_, dinp, dweight, dbias, dout, inp, weight, spec);
}
void CudaBackend::matmul_gelu_forward(Tensor out, Tensor pre, Tensor inp, Tensor weight,
                                      Tensor bias, const MatmulSpec& spec) {
  cuda::matmul_gelu_forward(*ctx_, out, pre, inp, weight, bias, spec);
}
void CudaBackend::matmul_residual_forward(Tensor out, Tensor residual, Tensor inp, Tensor weight,
                                          Tensor bias, const MatmulSpec& spec) {
  cuda::matmul_residual_forward(*ctx_, out, residual, inp, weight, bias, spec);
}
void CudaBackend::matmul_backward_gelu(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                       Tensor inp, Tensor weight, Tensor gelu_pre,
                                       const MatmulSpec& spec) {
  cuda::matmul_backward_gelu(*ctx_, dinp, dweight, dbias, dout, inp, weight, gelu_pre, spec);
}
void CudaBackend::collect_stats() { ctx_->collect_reports(); }
void CudaBackend::attention_forward(Tensor out, Tensor lse, Tensor qkv, int n_head,
                                    MatmulPrecision prec) {
  cuda::attention_forward(*ctx_, out, lse, qkv, n_head, prec);
}
void CudaBackend::attention_backward(Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse,
                                     int n_head, MatmulPrecision prec) {
  cuda::attention_backward(*ctx_, dqkv, dout, qkv, lse, n_head, prec);
}
void CudaBackend::gelu_forward(Tensor out, Tensor inp) { cuda::gelu_forward(*ctx_, out, inp); }
void CudaBackend::gelu_forward_fp8(Tensor out, Tensor inp, const Fp8Output& fp8) {
  cuda::gelu_forward_fp8(*ctx_, out, inp, fp8);
}
void CudaBackend::gelu_backward(Tensor dinp, Tensor inp, Tensor dout) {
  cuda::gelu_backward(*ctx_, dinp, inp, dout);
}
void CudaBackend::residual_forward(Tensor out, Tensor a, Tensor b) {
  cuda::residual_forward(*ctx_, out, a, b);
}
void CudaBackend::crossentropy_forward_backward(Tensor losses, Tensor logits, Tensor targets,
                                                int vocab_size, float dloss) {
  cuda::crossentropy_forward_backward(*ctx_, losses, logits, targets, vocab_size, dloss);
}
void CudaBackend::matmul_crossentropy(Tensor losses, Tensor logits, Tensor inp, Tensor weight,
                                      Tensor targets, int vocab_size, float dloss,
                                      const MatmulSpec& spec) {
  cuda::matmul_crossentropy(*ctx_, losses, logits, inp, weight, targets, vocab_size, dloss, spec);
}
double CudaBackend::sum_squares(Tensor t) { return cuda::sum_squares(*ctx_, t); }
void CudaBackend::adamw_update(Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                               const AdamWParams& p, AdamWStats* stats) {
  cuda::adamw_update(*ctx_, param, master, grad, m, v, p, stats);
}
void CudaBackend::adamw_update_many(const std::vector<AdamWTensors>& all, AdamWStats* stats) {
  cuda::adamw_update_many(*ctx_, all, stats);
}

}  // namespace mpt
