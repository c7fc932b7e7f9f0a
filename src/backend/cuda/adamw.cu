// AdamW, the CPU backend's formula operation by operation (explicit round-to-nearest fp32
// arithmetic, so nvcc contracts nothing into FMAs; IEEE division and square root; the bias
// corrections computed on the host in double exactly as the CPU does), so the results are
// bit-identical to the CPU's: with a master copy, the master and its rounding into the
// parameter; without, the parameter updated in place, rounded to nearest or (bf16 with
// stochastic rounding) stochastically with the CPU's counter-based bits. The lost-update count
// is an integer counter on the device, read back when asked for. An optimizer step's tensors go
// through adamw_update_many: a few launches for all of them (adamw_plan.h says which tensors a
// launch takes and which blocks update which tensor), the same arithmetic per element.
#include "backend/cuda/adamw.cuh"

#include <cmath>
#include <string>

#include "backend/cuda/adamw_plan.h"
#include "backend/cuda/cuda_common.cuh"
#include "core/formats.h"

namespace mpt::cuda {
namespace {

// Half the ulp above |bf16(w)|, as the CPU's fast::bf16_half_ulp.
__device__ __forceinline__ float bf16_half_ulp(float w) {
  return bf16_half_ulp_of_exponent((bf16_from_float(w).bits >> 7) & 0xFFu);
}

// The hyperparameters a launch's tensors share (adamw_plan.h, adamw_same_launch).
struct AdamWArgs {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, grad_scale;
  float c1, c2;  // bias corrections
  int64_t step;
};

// A launch's tensors (adamw_plan.h). Passed by value as a kernel parameter, read through
// __grid_constant__ so that indexing it by a run-time tensor number reads the parameter in place
// instead of copying the table to each thread's local memory.
struct AdamWTable {
  void* param[kAdamWTensorsPerLaunch];
  float* master[kAdamWTensorsPerLaunch];  // null: none
  const void* grad[kAdamWTensorsPerLaunch];
  float* m[kAdamWTensorsPerLaunch];
  float* v[kAdamWTensorsPerLaunch];
  int64_t n[kAdamWTensorsPerLaunch];
  int64_t first_index[kAdamWTensorsPerLaunch];  // AdamWParams::sr_first_index
  uint64_t seed[kAdamWTensorsPerLaunch];
  float weight_decay[kAdamWTensorsPerLaunch];
  unsigned block_begin[kAdamWTensorsPerLaunch + 1];
  int count;
};
// Kernel parameters are limited to 4 KB before CUDA 12.1 (and on any GPU before Volta): the
// table, the arguments below and margin.
static_assert(sizeof(AdamWTable) + sizeof(AdamWArgs) + 64 <= 4096, "AdamWTable too large");

// T: the parameters' storage type. kSr: stochastic rounding into bf16 (no master). Each block
// updates one tensor (found from block_begin: uniform across the block), grid-striding over it
// with its share of the blocks, as a launch for that tensor alone would.
template <class T, bool kSr>
__global__ void adamw_kernel(const __grid_constant__ AdamWTable tab, DType dg, AdamWArgs a,
                             bool count_lost, unsigned long long* lost_counter,
                             unsigned long long* counters) {
  int k = 0;
  while (k + 1 < tab.count && blockIdx.x >= tab.block_begin[k + 1]) ++k;
  T* param = static_cast<T*>(tab.param[k]);
  float* master = tab.master[k];
  const void* grad = tab.grad[k];
  float* m = tab.m[k];
  float* v = tab.v[k];
  const int64_t n = tab.n[k], first_index = tab.first_index[k];
  const uint64_t seed = tab.seed[k];
  const float weight_decay = tab.weight_decay[k];
  const unsigned block = blockIdx.x - tab.block_begin[k];
  const unsigned blocks = tab.block_begin[k + 1] - tab.block_begin[k];
  CastTally tally;
  unsigned lost = 0;
  for (int64_t i = block * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{blocks} * blockDim.x) {
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
                        __fmul_rn(weight_decay, old)));
    const float now = __fsub_rn(old, upd);
    if (count_lost) lost += fabsf(upd) < bf16_half_ulp(old);
    if constexpr (kSr) {
      const bf16 b =
          bf16_from_float_stochastic(now, stochastic_rounding_bits(seed, a.step, first_index + i));
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

// Runs one launch of the plan (all its tensors adamw_same_launch); `op` names it to the launch
// check (and so to MPT_CUDA_SYNC's reports and the op profile).
void launch(Context& ctx, const char* op, const std::vector<AdamWTensors>& all,
            const AdamWLaunch& l, AdamWStats* stats) {
  const AdamWTensors& first = all[l.tensors.front()];
  const AdamWParams& p = first.p;  // the hyperparameters the launch's tensors share
  AdamWArgs a{};
  a.lr = p.lr;
  a.beta1 = p.beta1;
  a.beta2 = p.beta2;
  a.one_minus_beta1 = 1.0f - p.beta1;
  a.one_minus_beta2 = 1.0f - p.beta2;
  a.eps = p.eps;
  a.grad_scale = p.grad_scale;
  // As the CPU backend: in double, then rounded to float.
  a.c1 = static_cast<float>(1.0 / (1.0 - std::pow(double(p.beta1), double(p.step))));
  a.c2 = static_cast<float>(1.0 / (1.0 - std::pow(double(p.beta2), double(p.step))));
  a.step = p.step;
  AdamWTable tab{};
  tab.count = static_cast<int>(l.tensors.size());
  int64_t values = 0;
  for (size_t j = 0; j < l.tensors.size(); ++j) {
    const AdamWTensors& t = all[l.tensors[j]];
    tab.param[j] = t.param.data;
    tab.master[j] = static_cast<float*>(t.master.data);
    tab.grad[j] = t.grad.data;
    tab.m[j] = static_cast<float*>(t.m.data);
    tab.v[j] = static_cast<float*>(t.v.data);
    tab.n[j] = t.param.numel();
    tab.first_index[j] = t.p.sr_first_index;
    tab.seed[j] = t.p.sr_seed;
    tab.weight_decay[j] = t.p.weight_decay;
    tab.block_begin[j] = l.block_begin[j];
    values += tab.n[j];
  }
  tab.block_begin[l.tensors.size()] = l.block_begin.back();
  const DType pd = first.param.dtype;
  const bool sr = adamw_stochastic(first);  // as the plan grouped them
  const bool want_lost = pd == DType::bf16 && stats != nullptr;
  // Summed on the device over the optimizer step's calls; collect_stats() reads it once.
  unsigned long long* lost_dev = want_lost ? ctx.lost_update_counter(stats) : nullptr;
  unsigned long long* counters = ctx.cast_counters(TensorClass::weight);
  const unsigned blocks = l.block_begin.back();
  if (sr) {
    adamw_kernel<__nv_bfloat16, true><<<blocks, kBlock, 0, ctx.stream()>>>(
        tab, first.grad.dtype, a, want_lost, lost_dev, counters);
  } else {
    MPT_DISPATCH_FLOAT(pd, "adamw_update: param", [&] {
      adamw_kernel<T, false><<<blocks, kBlock, 0, ctx.stream()>>>(
          tab, first.grad.dtype, a, want_lost, lost_dev, counters);
    });
  }
  MPT_LAUNCH_CHECK(ctx, op);
  if (pd != DType::f32) ctx.add_cast_values(TensorClass::weight, values);
  if (stats) stats->values += values;
}

// The launches for checked arguments.
void run(Context& ctx, const char* op, const std::vector<AdamWTensors>& all, AdamWStats* stats) {
  for (const AdamWLaunch& l : plan_adamw_launches(all)) launch(ctx, op, all, l, stats);
}

}  // namespace

void adamw_update_many(Context& ctx, const std::vector<AdamWTensors>& all, AdamWStats* stats) {
  check_adamw_update_many(all);  // all before the first launch: a bad call writes nothing
  run(ctx, "adamw_update_many", all, stats);
}

void adamw_update(Context& ctx, Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                  const AdamWParams& p, AdamWStats* stats) {
  const std::vector<AdamWTensors> one = {AdamWTensors{param, master, grad, m, v, p}};
  check_adamw_args("adamw_update", one[0]);
  run(ctx, "adamw_update", one, stats);
}

}  // namespace mpt::cuda
