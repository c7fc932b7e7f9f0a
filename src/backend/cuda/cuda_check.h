// One checking function for CUDA runtime and cuBLAS(Lt) status codes: a failed call throws
// RuntimeError naming the call's text, the file and line, and the library's own error name.
// Plain C++ (no device code), so host .cpp files use it too.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

namespace mpt::cuda {

[[noreturn]] void throw_cuda_error(const char* call, const char* file, int line,
                                   const char* error_name, const char* error_text);

inline void check(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess) throw_cuda_error(call, file, line, cudaGetErrorName(e), cudaGetErrorString(e));
}

// cuBLASLt has no status-to-string function of its own (cublasGetStatusName is libcublas's).
const char* cublas_status_name(cublasStatus_t s);
const char* cublas_status_meaning(cublasStatus_t s);

inline void check(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw_cuda_error(call, file, line, cublas_status_name(s), cublas_status_meaning(s));
}

}  // namespace mpt::cuda

#define MPT_CUDA_CHECK(call) ::mpt::cuda::check((call), #call, __FILE__, __LINE__)
