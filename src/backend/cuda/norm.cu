// Sum of squares in fp64 in the CPU backend's order, so the result is bit-identical to it:
// chunks of kChunk elements, each summed sequentially by one thread (explicit round-to-nearest
// fp64 arithmetic: no FMA contraction), then the chunks' sums added in order on the host.
//
// A thread walking its own chunk would make every warp load touch 32 cache lines 64 KB apart.
// Instead a warp owns 32 chunks (one per lane) and goes through them 32 elements at a time: for
// each of its chunks the warp loads those 32 consecutive elements together (one coalesced
// access) into shared memory, and then each lane adds its own chunk's 32 in order. The next
// tile's 32 loads are issued into registers before the sums of this one, so that the few warps
// there are (one lane per chunk: ~240 warps for GPT-2 124M's gradients) keep loads in flight.
#include "backend/cuda/norm.cuh"

#include "backend/cuda/cuda_common.cuh"
#include "core/formats.h"

namespace mpt::cuda {
namespace {

constexpr int64_t kChunk = kNormChunk;  // as CpuBackend::sum_squares (workspace_plan.h)
// A warp's tiles of 32 elements never straddle a chunk's end, which the loads' bounds (by n
// only) rely on (found by emulation: tools/kernel-sim/optimizer-elementwise).
static_assert(kChunk % 32 == 0, "sum_squares_kernel: chunks must be whole tiles of 32");
constexpr int kNormBlock = 64;          // 2 warps: blocks spread over the SMs
constexpr int kNormWarps = kNormBlock / 32;

// Every float dtype's values are fp32 values (exactly).
template <class S>
__device__ __forceinline__ float widen_f32(S x) { return to_float(x); }
template <>
__device__ __forceinline__ float widen_f32<float>(float x) { return x; }

template <class S>
__global__ void __launch_bounds__(kNormBlock)
    sum_squares_kernel(const S* __restrict__ x, int64_t n, int64_t nchunks,
                       double* __restrict__ partial) {
  __shared__ float tile[kNormWarps][32][33];  // [chunk of the warp][element]; padded: no conflicts
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t first = (int64_t{blockIdx.x} * kNormWarps + warp) * 32;  // the warp's chunk 0
  const int64_t mine = first + lane;                                       // this lane's chunk
  float(*t)[33] = tile[warp];
  // Warp-uniform: whether the warp's chunks have elements at offset `off` (the first one's are
  // the earliest).
  auto has = [&](int64_t off) { return off < kChunk && first * kChunk + off < n; };
  float next[32];  // the next tile, element `lane` of each of the warp's chunks
  auto fetch = [&](int64_t off) {
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int64_t c = first + j, i = c * kChunk + off + lane;
      next[j] = c < nchunks && i < n ? widen_f32<S>(x[i]) : 0.0f;
    }
  };
  if (has(0)) fetch(0);
  double s = 0.0;
  for (int64_t off = 0; has(off); off += 32) {
#pragma unroll
    for (int j = 0; j < 32; ++j) t[j][lane] = next[j];
    __syncwarp();
    if (has(off + 32)) fetch(off + 32);
    if (mine < nchunks) {
      const int64_t left = n - (mine * kChunk + off);  // elements of this chunk from here on
      const int m = left < 32 ? static_cast<int>(left < 0 ? 0 : left) : 32;
      for (int k = 0; k < m; ++k) {
        const double v = t[lane][k];
        s = __dadd_rn(s, __dmul_rn(v, v));
      }
    }
    __syncwarp();  // before the next tile overwrites t
  }
  if (mine < nchunks) partial[mine] = s;
}

template <class S>
void launch(Context& ctx, const Tensor& t, int64_t n, int64_t nchunks, double* partial) {
  const int64_t warps = (nchunks + 31) / 32;
  sum_squares_kernel<S><<<blocks_for(warps, kNormWarps), kNormBlock, 0, ctx.stream()>>>(
      static_cast<const S*>(t.data), n, nchunks, partial);
}

}  // namespace

double sum_squares(Context& ctx, Tensor t) {
  if (!t.defined() || !dtype_is_float(t.dtype))
    throw RuntimeError(std::string("sum_squares: argument 't' expected a float tensor, got ") +
                       (t.defined() ? dtype_name(t.dtype) : "undefined") + t.shape.str());
  const int64_t n = t.numel();
  if (n == 0) return 0.0;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  auto* partial = static_cast<double*>(ctx.scratch(Scratch::kReduce, sum_squares_scratch_bytes(n)));
  switch (t.dtype) {
    case DType::f32: launch<float>(ctx, t, n, nchunks, partial); break;
    case DType::f16: launch<f16>(ctx, t, n, nchunks, partial); break;
    case DType::bf16: launch<bf16>(ctx, t, n, nchunks, partial); break;
    case DType::e4m3: launch<e4m3>(ctx, t, n, nchunks, partial); break;
    case DType::e5m2: launch<e5m2>(ctx, t, n, nchunks, partial); break;
    case DType::i32: break;
  }
  MPT_LAUNCH_CHECK(ctx, "sum_squares");
  auto* host = static_cast<double*>(ctx.pinned(static_cast<size_t>(nchunks) * sizeof(double)));
  MPT_CUDA_CHECK(cudaMemcpyAsync(host, partial, static_cast<size_t>(nchunks) * sizeof(double),
                                 cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.sync("sum_squares");
  double total = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) total += host[c];
  return total;
}

}  // namespace mpt::cuda
