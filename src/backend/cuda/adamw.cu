// AdamW, the CPU backend's formula operation by operation (explicit round-to-nearest fp32
// arithmetic, so nvcc contracts nothing into FMAs; IEEE division and square root; the bias
// corrections computed on the host in double exactly as the CPU does), so the results are
// bit-identical to the CPU's: with a master copy, the master and its rounding into the
// parameter; without, the parameter updated in place, rounded to nearest or (bf16 with
// stochastic rounding) stochastically with the CPU's counter-based bits. The lost-update count
// is an integer counter on the device, read back when asked for.
#include "backend/cuda/adamw.cuh"

#include <cmath>

#include "backend/cuda/cuda_common.cuh"
#include "core/formats.h"

namespace mpt::cuda {
namespace {

// Half the ulp above |bf16(w)|, as the CPU's fast::bf16_half_ulp.
__device__ __forceinline__ float bf16_half_ulp(float w) {
  return bf16_half_ulp_of_exponent((bf16_from_float(w).bits >> 7) & 0xFFu);
}

struct AdamWArgs {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, grad_scale;
  float c1, c2;  // bias corrections
  int64_t step;
  uint64_t seed;
  int64_t first_index;  // of element 0 within its parameter (AdamWParams::sr_first_index)
};

// T: the parameter's storage type. kSr: stochastic rounding into bf16 (no master).
template <class T, bool kSr>
__global__ void adamw_kernel(T* param, float* master, const void* grad, DType dg, float* m,
                             float* v, int64_t n, AdamWArgs a, bool count_lost,
                             unsigned long long* lost_counter, unsigned long long* counters) {
  CastTally tally;
  unsigned lost = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float gi = __fmul_rn(load_any(grad, dg, i), a.grad_scale);
    const float mi = __fadd_rn(__fmul_rn(a.beta1, m[i]), __fmul_rn(a.one_minus_beta1, gi));
    const float vi =
        __fadd_rn(__fmul_rn(a.beta2, v[i]), __fmul_rn(__fmul_rn(a.one_minus_beta2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    const float mhat = __fmul_rn(mi, a.c1), vhat = __fmul_rn(vi, a.c2);
    const float old = master ? master[i] : load<T>(param[i]);
    const float upd = __fmul_rn(
        a.lr, __fadd_rn(__fdiv_rn(mhat, __fadd_rn(__fsqrt_rn(vhat), a.eps)),
                        __fmul_rn(a.weight_decay, old)));
    const float now = __fsub_rn(old, upd);
    if (count_lost) lost += fabsf(upd) < bf16_half_ulp(old);
    if constexpr (kSr) {
      const bf16 b =
          bf16_from_float_stochastic(now, stochastic_rounding_bits(a.seed, a.step, a.first_index + i));
      param[i] = __nv_bfloat16_raw{b.bits};
      const float x = fabsf(now);
      tally.over += (x > 3.38953139e38f) & (x <= 3.40282347e38f);
      tally.under += (x > 0.0f) & ((b.bits & 0x7FFFu) == 0);
    } else {
      if (master) master[i] = now;
      store_counted(param, i, now, tally);
    }
  }
  if (kNarrow<T>) tally.flush(counters);
  if (count_lost) {  // uniform across the grid: every thread reaches the barrier
    // One atomic per block, not per warp: late in bf16 training most warps lose updates, and
    // same-address atomics serialise.
    __shared__ unsigned warp_lost[kBlock / 32];
    for (int off = 16; off > 0; off >>= 1) lost += __shfl_down_sync(0xFFFFFFFFu, lost, off);
    if ((threadIdx.x & 31) == 0) warp_lost[threadIdx.x >> 5] = lost;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long sum = 0;
      for (unsigned w = 0; w < blockDim.x / 32; ++w) sum += warp_lost[w];
      if (sum) atomicAdd(lost_counter, sum);
    }
  }
}

}  // namespace

void adamw_update(Context& ctx, Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                  const AdamWParams& p, AdamWStats* stats) {
  const char* op = "adamw_update";
  if (!param.defined()) throw RuntimeError("adamw_update: argument 'param' is undefined");
  const Shape s = param.shape;
  const int64_t n = param.numel();
  expect_float(op, "param", param, s);
  expect_float(op, "grad", as_shape(grad, s), s);
  expect_tensor(op, "m", as_shape(m, s), DType::f32, s);
  expect_tensor(op, "v", as_shape(v, s), DType::f32, s);
  if (master.defined()) {
    expect_tensor(op, "master", as_shape(master, s), DType::f32, s);
    if (param.dtype == DType::f32)
      throw RuntimeError("adamw_update: argument 'master' given for fp32 weights");
  }
  if (n == 0) return;
  AdamWArgs a{};
  a.lr = p.lr;
  a.beta1 = p.beta1;
  a.beta2 = p.beta2;
  a.one_minus_beta1 = 1.0f - p.beta1;
  a.one_minus_beta2 = 1.0f - p.beta2;
  a.eps = p.eps;
  a.weight_decay = p.weight_decay;
  a.grad_scale = p.grad_scale;
  // As the CPU backend: in double, then rounded to float.
  a.c1 = static_cast<float>(1.0 / (1.0 - std::pow(double(p.beta1), double(p.step))));
  a.c2 = static_cast<float>(1.0 / (1.0 - std::pow(double(p.beta2), double(p.step))));
  a.step = p.step;
  a.seed = p.sr_seed;
  a.first_index = p.sr_first_index;
  const bool count_lost = param.dtype == DType::bf16;
  const bool sr = p.stochastic_rounding && !master.defined() && param.dtype == DType::bf16;
  const bool want_lost = count_lost && stats != nullptr;
  // Summed on the device over the optimizer step's calls; collect_stats() reads it once.
  unsigned long long* lost_dev = want_lost ? ctx.lost_update_counter(stats) : nullptr;
  unsigned long long* counters = ctx.cast_counters(TensorClass::weight);
  float* mp = static_cast<float*>(master.data);
  float* mm = static_cast<float*>(m.data);
  float* vv = static_cast<float*>(v.data);
  const unsigned blocks = grid_stride_blocks(n);
  if (sr) {
    adamw_kernel<__nv_bfloat16, true><<<blocks, kBlock, 0, ctx.stream()>>>(
        static_cast<__nv_bfloat16*>(param.data), nullptr, grad.data, grad.dtype, mm, vv, n, a,
        want_lost, lost_dev, counters);
  } else {
    MPT_DISPATCH_FLOAT(param.dtype, "adamw_update: param", [&] {
      adamw_kernel<T, false><<<blocks, kBlock, 0, ctx.stream()>>>(
          static_cast<T*>(param.data), mp, grad.data, grad.dtype, mm, vv, n, a, want_lost,
          lost_dev, counters);
    });
  }
  MPT_LAUNCH_CHECK(ctx, op);
  if (param.dtype != DType::f32) ctx.add_cast_values(TensorClass::weight, n);
  if (stats) stats->values += n;
}

}  // namespace mpt::cuda
