// One element's fp8 quantisation and a warp's amax as device functions, shared by the matmul
// quantise kernels (matmul.cu) and the kernels that store an activation quantised for the GEMM
// that reads it next (layernorm.cu, Fp8Output), so that both give the same bits, counts and
// amax.
#pragma once

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

// One element's fp8 cast, as the quantise kernels (and the CPU) make it: q = saturate(RNE(v *
// scale)); max |v| kept in *am as magnitude bits (NaN's exceed infinity's); the cast counted.
template <bool kE4M3>
__device__ __forceinline__ uint8_t quantise_one(float v, float scale, unsigned& am,
                                                CastTally& tally) {
  const unsigned mag = __float_as_uint(v) & 0x7FFFFFFFu;
  am = mag > am ? mag : am;
  const float s = __fmul_rn(v, scale);
  const uint8_t q = static_cast<uint8_t>(
      __nv_cvt_float_to_fp8(s, __NV_SATFINITE, kE4M3 ? __NV_E4M3 : __NV_E5M2));
  // stored == 0 exactly when the magnitude bits are zero (a NaN stays NaN: not counted).
  tally.add(s, (q & 0x7Fu) ? 1.0f : 0.0f, kE4M3 ? 448.0f : 57344.0f);
  return q;
}

// One value y stored as Fp8Output says (backend.h): rounded to T as an op storing T would round
// it (counted, unless T is fp32), then quantise_one of the rounded value (its magnitude into am).
template <class T, bool kE4M3>
__device__ __forceinline__ uint8_t store_fp8_one(float y, float scale, unsigned& am,
                                                 CastTally& tally) {
  const T r = store<T>(y);
  const float v = load<T>(r);
  if (kNarrow<T>) tally.add(y, v, max_finite<T>());
  return quantise_one<kE4M3>(v, scale, am, tally);
}

// A warp's amax into *amax_bits (when given): one integer atomicMax per warp, order-independent.
// Every lane of the warp must call it.
__device__ __forceinline__ void flush_amax(unsigned am, unsigned* amax_bits) {
  if (!amax_bits) return;
  am = __reduce_max_sync(0xFFFFFFFFu, am);
  if ((threadIdx.x & 31) == 0 && am) atomicMax(amax_bits, am);
}

}  // namespace mpt::cuda
