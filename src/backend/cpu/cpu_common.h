// Helpers shared by the CPU backend's source files (cpu_backend.cpp: the fp32 kernels;
// cpu_precision.cpp: dtype staging, matmuls and the optimizer). Internal to backend/cpu.
#pragma once

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace mpt::cpu_detail {

// Checks an op argument's dtype and shape; a mismatch is a bug in the caller.
inline void expect(const char* op, const char* arg, const Tensor& t, DType dtype, Shape shape) {
  if (!t.defined() || t.dtype != dtype || t.shape != shape)
    throw RuntimeError(std::string(op) + ": argument '" + arg + "' expected " + dtype_name(dtype) +
                       shape.str() + ", got " + (t.defined() ? dtype_name(t.dtype) : "undefined") +
                       t.shape.str());
}

// Columns handled together when a reduction over rows is split by column across threads: wide
// enough to vectorise, narrow enough to give every thread work.
constexpr int64_t kColumnBlock = 32;

// Reductions over rows (bias, LayerNorm and embedding gradients) are split across threads by
// column, so every sum runs over the rows in order in one thread: deterministic results.
// Calls f(c0, c1) for each block [c0, c1) of [0, ncols).
template <class F>
void for_column_blocks(int64_t ncols, int threads, F&& f) {
  const int64_t nblocks = (ncols + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t blk = 0; blk < nblocks; ++blk)
    f(blk * kColumnBlock, std::min(ncols, (blk + 1) * kColumnBlock));
}

// OpenBLAS's OpenMP build runs on our OpenMP pool (so the two never compete for cores) and sizes
// its parallel regions from process state: omp_get_max_threads() and the count given to
// openblas_set_num_threads(). Set both for the duration of one BLAS call and restore OpenMP's,
// so that backends with different thread counts can live in one process.
class BlasThreads {
 public:
  explicit BlasThreads(int n) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
  }
  ~BlasThreads() { omp_set_num_threads(saved_); }
  BlasThreads(const BlasThreads&) = delete;
  BlasThreads& operator=(const BlasThreads&) = delete;

 private:
  int saved_;
};

}  // namespace mpt::cpu_detail
