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
#include <type_traits>

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

// kVec elements of T moved with one load or store instruction (the address aligned to the
// pack's size).
template <class T, int kVec>
struct alignas(kVec * sizeof(T)) Pack {
  T v[kVec];
};

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
  // A value a GEMM stored in the narrow type itself (matmul_plan.h, GemmOut::direct): the fp32
  // value is gone, so an infinity counts as an overflow and nothing as an underflow.
  __device__ __forceinline__ void add_stored(float stored) { over += isinf(stored) ? 1u : 0u; }
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

// Element i of a float tensor (fp32, fp16 or bf16) whose dtype is only known at run time,
// widened to fp32: lets a kernel template on its output type alone (the switch is uniform
// across the grid).
__device__ __forceinline__ float load_any(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::f16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Stores x into element i of a float tensor whose dtype is only known at run time, rounded to
// it and tallied as store_counted does (the switch is uniform across the grid).
__device__ __forceinline__ void store_any_counted(void* p, DType dt, int64_t i, float x,
                                                  CastTally& tally) {
  switch (dt) {
    case DType::f16: store_counted(static_cast<__half*>(p), i, x, tally); return;
    case DType::bf16: store_counted(static_cast<__nv_bfloat16*>(p), i, x, tally); return;
    default: static_cast<float*>(p)[i] = x; return;
  }
}

// ---- block reductions (deterministic: a fixed shuffle tree, then the warps' results in order)
// Every thread of the block must call them; blockDim.x a multiple of 32, at most 1024. `shared`
// holds at least 32 floats; the result is returned to every thread.
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
  return v;
}
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int w = 0; w < nwarps; ++w) s += shared[w];  // the same order in every thread
  return s;
}
__device__ __forceinline__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float m = shared[0];
  for (int w = 1; w < nwarps; ++w) m = fmaxf(m, shared[w]);
  return m;
}

// ---- host-side argument checks (the CPU backend's wording)

// A float tensor argument of an op: defined, of `shape`, stored as fp32, fp16 or bf16.
inline void expect_float(const char* op, const char* arg, const Tensor& t, Shape shape) {
  const bool ok_dtype = t.dtype == DType::f32 || t.dtype == DType::f16 || t.dtype == DType::bf16;
  if (!t.defined() || !ok_dtype || t.shape != shape)
    throw RuntimeError(std::string(op) + ": argument '" + arg + "' expected a float tensor " +
                       "(fp32, fp16 or bf16) of shape " + shape.str() + ", got " +
                       (t.defined() ? dtype_name(t.dtype) : "undefined") + t.shape.str());
}
// An argument of one exact dtype and shape.
inline void expect_tensor(const char* op, const char* arg, const Tensor& t, DType dtype,
                          Shape shape) {
  if (!t.defined() || t.dtype != dtype || t.shape != shape)
    throw RuntimeError(std::string(op) + ": argument '" + arg + "' expected " + dtype_name(dtype) +
                       shape.str() + ", got " + (t.defined() ? dtype_name(t.dtype) : "undefined") +
                       t.shape.str());
}
// t seen as a tensor of `shape` when it holds as many elements (else t itself, which then fails
// the shape check with its own shape in the message).
inline Tensor as_shape(const Tensor& t, Shape shape) {
  return t.defined() && t.numel() == shape.numel() ? Tensor(t.data, t.dtype, shape) : t;
}

// ---- launch shapes: kBlock, blocks_for and grid_stride_blocks are in workspace_plan.h (plain
// C++: the workspace plan and adamw_plan.h size launches by them too).

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
