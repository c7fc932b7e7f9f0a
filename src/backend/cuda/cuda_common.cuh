// Device-side helpers shared by the CUDA backend's kernels (included by .cu files only).
//
// Storage types: fp32 as float, fp16 as __half, bf16 as __nv_bfloat16. Every kernel reads an
// element widened to fp32 (exact), computes in fp32 and stores rounded to nearest even - the
// same conventions as the CPU reference (backend.h), so results agree bit for bit wherever the
// order of operations does too.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "backend/backend.h"
#include "backend/cuda/cuda_context.h"
#include "core/tensor.h"

namespace mpt::cuda {

// ---- storage types

template <class T>
__device__ __forceinline__ float load(T x);
template <>
__device__ __forceinline__ float load<float>(float x) { return x; }
template <>
__device__ __forceinline__ float load<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float load<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T store(float x);
template <>
__device__ __forceinline__ float store<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half store<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Largest finite value of a storage type, as the cast statistics define overflow.
template <class T>
__device__ __forceinline__ float max_finite();
template <>
__device__ __forceinline__ float max_finite<float>() { return 3.40282347e38f; }
template <>
__device__ __forceinline__ float max_finite<__half>() { return 65504.0f; }
template <>
__device__ __forceinline__ float max_finite<__nv_bfloat16>() { return 3.38953139e38f; }

template <class T>
constexpr bool kNarrow = !std::is_same<T, float>::value;

// ---- cast statistics (docs/metrics.md, backend.h CastCounts)
// Each thread counts in registers; flush() adds a warp's totals with one atomic per counter.
struct CastTally {
  unsigned over = 0, under = 0;
  // x: the fp32 value being stored; stored: its rounded value, widened back.
  __device__ __forceinline__ void add(float x, float stored, float maxf) {
    const float a = fabsf(x);
    over += (a > maxf) & (a <= 3.40282347e38f);   // finite and above the format's range
    under += (x != 0.0f) & (stored == 0.0f);        // non-zero and became zero (NaN: neither)
  }
  // counters: Context::cast_counters(cls) ({overflow, underflow}). Every lane of the warp must
  // call it (it uses full-warp shuffles).
  __device__ __forceinline__ void flush(unsigned long long* counters) {
    unsigned o = over, u = under;
    for (int off = 16; off > 0; off >>= 1) {
      o += __shfl_down_sync(0xFFFFFFFFu, o, off);
      u += __shfl_down_sync(0xFFFFFFFFu, u, off);
    }
    if ((threadIdx.x & 31) == 0) {
      if (o) atomicAdd(counters, static_cast<unsigned long long>(o));
      if (u) atomicAdd(counters + 1, static_cast<unsigned long long>(u));
    }
  }
};

// Stores x into p[i] rounded to T, tallying the narrowing cast (a no-op tally for fp32).
template <class T>
__device__ __forceinline__ void store_counted(T* p, int64_t i, float x, CastTally& tally) {
  const T y = store<T>(x);
  p[i] = y;
  if (kNarrow<T>) tally.add(x, load<T>(y), max_finite<T>());
}

// ---- launch shapes

constexpr int kBlock = 256;
inline unsigned blocks_for(int64_t n, int per_block = kBlock) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}
// Grid-stride kernels over n elements use at most this many blocks (enough to fill any GPU).
inline unsigned grid_stride_blocks(int64_t n, int per_block = kBlock) {
  const unsigned b = blocks_for(n, per_block);
  return b < 65535u ? b : 65535u;
}

}  // namespace mpt::cuda

// Runs `...` with T bound to the storage type of float dtype `dt` (fp32, fp16, bf16); any other
// dtype throws, naming `what`.
#define MPT_DISPATCH_FLOAT(dt, what, ...)                                                      \
  [&] {                                                                                        \
    switch (dt) {                                                                              \
      case ::mpt::DType::f32: { using T = float; return __VA_ARGS__(); }                      \
      case ::mpt::DType::f16: { using T = __half; return __VA_ARGS__(); }                     \
      case ::mpt::DType::bf16: { using T = __nv_bfloat16; return __VA_ARGS__(); }            \
      default:                                                                                 \
        throw ::mpt::RuntimeError(std::string(what) + ": expected an fp32, fp16 or bf16 tensor, got " + \
                                  ::mpt::dtype_name(dt));                                       \
    }                                                                                          \
  }()
