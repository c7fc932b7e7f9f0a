// LayerNorm with fp32 statistics: one warp per row (two passes over the row for the mean and
// the variance, as the CPU backend computes them), explicit round-to-nearest arithmetic in the
// CPU's expression order. The backward's dweight/dbias are sums over rows: each block sums a
// fixed chunk of rows per column into fp32 scratch, then the chunks are summed in a fixed order
// (column_sums_kernel) and added to the old value, rounded once (deterministic, no atomics).
//
// Rows of up to 1024 columns (GPT-2's 768 included) take the register kernels: each lane holds
// its columns of the row (c = lane + 32k) in registers, loaded once with all loads in flight
// together, and computes from them in the loop kernels' order, so the forward's outputs and the
// backward's dinp have the loop kernels' bits. The backward's kernel also adds its rows' terms
// of dweight/dbias into per-lane sums, which the block's warps then add in warp order into the
// chunk's partials: dout and inp are read once, not twice (the loop path's partials kernel
// reads them again). Wider rows take the loop kernels.
#include "backend/cuda/layernorm.cuh"

#include <algorithm>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/fp8_math.cuh"

namespace mpt::cuda {
namespace {

constexpr float kLayerNormEps = 1e-5f;
constexpr int kRowsPerBlock = kBlock / 32;  // one warp per row
// Rows per partial sum of dweight/dbias: layernorm_row_chunk() (workspace_plan.h).

// How the forward kernels store out: rounded to T (PlainOut), or as Fp8Output says, rounded to
// T and then quantised to fp8 with the GEMM's scale and quantise_one, the amax of the rounded
// values reduced as the quantise kernels reduce it (Fp8Out). put() stores element i; every lane
// of a warp calls finish() once, after its last put().
template <class T>
struct PlainOut {
  T* out;
  __device__ __forceinline__ void put(int64_t i, float y, CastTally& tally) {
    store_counted(out, i, y, tally);
  }
  __device__ __forceinline__ void finish(CastTally& tally, unsigned long long* counters) {
    if (kNarrow<T>) tally.flush(counters);
  }
};

template <class T, bool kE4M3>
struct Fp8Out {
  uint8_t* out;
  float scale;
  unsigned* amax_bits;  // null: no amax wanted
  unsigned am;          // this thread's largest magnitude so far; 0 at launch
  __device__ __forceinline__ void put(int64_t i, float y, CastTally& tally) {
    out[i] = store_fp8_one<T, kE4M3>(y, scale, am, tally);
  }
  __device__ __forceinline__ void finish(CastTally& tally, unsigned long long* counters) {
    tally.flush(counters);
    flush_amax(am, amax_bits);
  }
};

template <class Out>
__global__ void layernorm_forward_kernel(Out out, float* mean, float* rstd, const void* inp,
                                         DType di, const void* weight, DType dw, const void* bias,
                                         DType db, int64_t N, int64_t C,
                                         unsigned long long* counters) {
  CastTally tally;
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t{kRowsPerBlock} + (threadIdx.x >> 5);
  if (n < N) {  // uniform across the warp
    const int64_t row = n * C;
    float sum = 0.0f;
    for (int64_t c = lane; c < C; c += 32) sum = __fadd_rn(sum, load_any(inp, di, row + c));
    const float m = __fdiv_rn(warp_sum(sum), static_cast<float>(C));
    float var = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
      const float dx = __fsub_rn(load_any(inp, di, row + c), m);
      var = __fadd_rn(var, __fmul_rn(dx, dx));
    }
    var = __fdiv_rn(warp_sum(var), static_cast<float>(C));
    const float s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, kLayerNormEps)));
    for (int64_t c = lane; c < C; c += 32) {
      const float norm = __fmul_rn(__fsub_rn(load_any(inp, di, row + c), m), s);
      const float y = __fadd_rn(__fmul_rn(norm, load_any(weight, dw, c)), load_any(bias, db, c));
      out.put(row + c, y, tally);
    }
    if (lane == 0) {
      mean[n] = m;
      rstd[n] = s;
    }
  }
  out.finish(tally, counters);
}

// dinp += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd, dnorm = weight * dout.
template <class T>
__global__ void layernorm_dinp_kernel(T* dinp, const void* dout, DType dd, const void* inp,
                                      DType di, const void* weight, DType dw, const float* mean,
                                      const float* rstd, int64_t N, int64_t C,
                                      unsigned long long* counters) {
  CastTally tally;
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t{kRowsPerBlock} + (threadIdx.x >> 5);
  if (n < N) {
    const int64_t row = n * C;
    const float m = mean[n], s = rstd[n];
    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
      const float norm = __fmul_rn(__fsub_rn(load_any(inp, di, row + c), m), s);
      const float dnorm = __fmul_rn(load_any(weight, dw, c), load_any(dout, dd, row + c));
      dnorm_mean = __fadd_rn(dnorm_mean, dnorm);
      dnorm_norm_mean = __fadd_rn(dnorm_norm_mean, __fmul_rn(dnorm, norm));
    }
    dnorm_mean = __fdiv_rn(warp_sum(dnorm_mean), static_cast<float>(C));
    dnorm_norm_mean = __fdiv_rn(warp_sum(dnorm_norm_mean), static_cast<float>(C));
    for (int64_t c = lane; c < C; c += 32) {
      const float norm = __fmul_rn(__fsub_rn(load_any(inp, di, row + c), m), s);
      const float dnorm = __fmul_rn(load_any(weight, dw, c), load_any(dout, dd, row + c));
      const float g = __fmul_rn(
          __fsub_rn(__fsub_rn(dnorm, dnorm_mean), __fmul_rn(norm, dnorm_norm_mean)), s);
      store_counted(dinp, row + c, __fadd_rn(load<T>(dinp[row + c]), g), tally);
    }
  }
  if (kNarrow<T>) tally.flush(counters);
}

// ---- the register kernels (C <= 32 * kCols)

// Columns per lane of the register kernels for rows of C: the smallest of kRegCols holding
// ceil(C / 32), or 0 when C is wider (the loop kernels run).
constexpr int kRegCols[] = {4, 8, 16, 24, 32};
int register_cols(int64_t C) {
  for (int k : kRegCols)
    if (C <= 32 * int64_t{k}) return k;
  return 0;
}

// v[k] = element (row + lane + 32 k) of p widened to fp32 (0 past C): every load issued before
// any is used. The dtype switch is uniform and outside the unrolled loops.
template <class Tin, int kCols>
__device__ __forceinline__ void load_cols_as(float (&v)[kCols], const void* p, int64_t row,
                                             int lane, int64_t C) {
  const Tin* q = static_cast<const Tin*>(p) + row;
#pragma unroll
  for (int k = 0; k < kCols; ++k) v[k] = lane + 32 * k < C ? load<Tin>(q[lane + 32 * k]) : 0.0f;
}
template <int kCols>
__device__ __forceinline__ void load_cols(float (&v)[kCols], const void* p, DType dt, int64_t row,
                                          int lane, int64_t C) {
  switch (dt) {
    case DType::f16: load_cols_as<__half>(v, p, row, lane, C); return;
    case DType::bf16: load_cols_as<__nv_bfloat16>(v, p, row, lane, C); return;
    default: load_cols_as<float>(v, p, row, lane, C); return;
  }
}

// layernorm_forward_kernel's rows from registers: the same operations in the same order.
template <class Out, int kCols>
__global__ void __launch_bounds__(kBlock)
    layernorm_forward_regs_kernel(Out out, float* mean, float* rstd, const void* inp, DType di,
                                  const void* weight, DType dw, const void* bias, DType db,
                                  int64_t N, int64_t C, unsigned long long* counters) {
  CastTally tally;
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t{kRowsPerBlock} + (threadIdx.x >> 5);
  if (n < N) {  // uniform across the warp
    const int64_t row = n * C;
    float x[kCols];
    load_cols<kCols>(x, inp, di, row, lane, C);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kCols; ++k)
      if (lane + 32 * k < C) sum = __fadd_rn(sum, x[k]);
    const float m = __fdiv_rn(warp_sum(sum), static_cast<float>(C));
    float var = 0.0f;
#pragma unroll
    for (int k = 0; k < kCols; ++k)
      if (lane + 32 * k < C) {
        const float dx = __fsub_rn(x[k], m);
        var = __fadd_rn(var, __fmul_rn(dx, dx));
      }
    var = __fdiv_rn(warp_sum(var), static_cast<float>(C));
    const float s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, kLayerNormEps)));
    float w[kCols], b[kCols];
    load_cols<kCols>(w, weight, dw, 0, lane, C);
    load_cols<kCols>(b, bias, db, 0, lane, C);
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t c = lane + 32 * k;
      if (c < C) {
        const float norm = __fmul_rn(__fsub_rn(x[k], m), s);
        out.put(row + c, __fadd_rn(__fmul_rn(norm, w[k]), b[k]), tally);
      }
    }
    if (lane == 0) {
      mean[n] = m;
      rstd[n] = s;
    }
  }
  out.finish(tally, counters);
}

// Block blockIdx.x takes the rows of chunk blockIdx.x (row_chunk rows), its warps rows
// w, w + kRowsPerBlock, ...: dinp as layernorm_dinp_kernel computes it (the same operations in
// the same order), and the chunk's partials pw, pb: the sums layernorm_partials_kernel makes,
// in another order (per lane over its rows, then the warps in warp order; fixed, so still
// deterministic, but not the loop path's bits).
template <class T, int kCols>
__global__ void __launch_bounds__(kBlock)
    layernorm_backward_regs_kernel(T* dinp, float* pw, float* pb, const void* dout, DType dd,
                                   const void* inp, DType di, const void* weight, DType dw,
                                   const float* mean, const float* rstd, int64_t N, int64_t C,
                                   int64_t row_chunk, unsigned long long* counters) {
  __shared__ float acc_w[32 * kCols], acc_b[32 * kCols];
  CastTally tally;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float w[kCols], sw[kCols], sb[kCols];
  load_cols<kCols>(w, weight, dw, 0, lane, C);
#pragma unroll
  for (int k = 0; k < kCols; ++k) sw[k] = sb[k] = 0.0f;
  const int64_t r0 = blockIdx.x * row_chunk, r1 = min(N, r0 + row_chunk);
  for (int64_t n = r0 + warp; n < r1; n += kRowsPerBlock) {  // uniform across the warp
    const int64_t row = n * C;
    float x[kCols], d[kCols];
    load_cols<kCols>(x, inp, di, row, lane, C);
    load_cols<kCols>(d, dout, dd, row, lane, C);
    const float m = mean[n], s = rstd[n];
    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
#pragma unroll
    for (int k = 0; k < kCols; ++k)
      if (lane + 32 * k < C) {
        const float norm = __fmul_rn(__fsub_rn(x[k], m), s);
        const float dnorm = __fmul_rn(w[k], d[k]);
        dnorm_mean = __fadd_rn(dnorm_mean, dnorm);
        dnorm_norm_mean = __fadd_rn(dnorm_norm_mean, __fmul_rn(dnorm, norm));
      }
    dnorm_mean = __fdiv_rn(warp_sum(dnorm_mean), static_cast<float>(C));
    dnorm_norm_mean = __fdiv_rn(warp_sum(dnorm_norm_mean), static_cast<float>(C));
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      const int64_t c = lane + 32 * k;
      if (c < C) {
        const float norm = __fmul_rn(__fsub_rn(x[k], m), s);
        const float dnorm = __fmul_rn(w[k], d[k]);
        const float g = __fmul_rn(
            __fsub_rn(__fsub_rn(dnorm, dnorm_mean), __fmul_rn(norm, dnorm_norm_mean)), s);
        store_counted(dinp, row + c, __fadd_rn(load<T>(dinp[row + c]), g), tally);
        sw[k] = __fadd_rn(sw[k], __fmul_rn(norm, d[k]));
        sb[k] = __fadd_rn(sb[k], d[k]);
      }
    }
  }
  // The warps' sums, in warp order (every thread reaches each barrier).
  for (int v = 0; v < kRowsPerBlock; ++v) {
    if (warp == v) {
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        const int c = lane + 32 * k;
        if (c < C) {
          acc_w[c] = v == 0 ? sw[k] : __fadd_rn(acc_w[c], sw[k]);
          acc_b[c] = v == 0 ? sb[k] : __fadd_rn(acc_b[c], sb[k]);
        }
      }
    }
    __syncthreads();
  }
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    pw[blockIdx.x * C + c] = acc_w[c];
    pb[blockIdx.x * C + c] = acc_b[c];
  }
  if (kNarrow<T>) tally.flush(counters);
}

// Calls f(std::integral_constant<int, cols>) for cols one of kRegCols.
template <class F>
void with_register_cols(int cols, F&& f) {
  switch (cols) {
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 8: f(std::integral_constant<int, 8>{}); return;
    case 16: f(std::integral_constant<int, 16>{}); return;
    case 24: f(std::integral_constant<int, 24>{}); return;
    default: f(std::integral_constant<int, 32>{}); return;
  }
}

// ---- the loop path's partials

// Partial sums over the rows of chunk blockIdx.y, per column:
//   pw[chunk, c] = sum (x - mean) * rstd * dout,  pb[chunk, c] = sum dout.
__global__ void layernorm_partials_kernel(float* pw, float* pb, const void* dout, DType dd,
                                          const void* inp, DType di, const float* mean,
                                          const float* rstd, int64_t N, int64_t C,
                                          int64_t row_chunk) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c >= C) return;
  const int64_t r0 = blockIdx.y * row_chunk, r1 = min(N, r0 + row_chunk);
  float sw = 0.0f, sb = 0.0f;
  for (int64_t n = r0; n < r1; ++n) {
    const float d = load_any(dout, dd, n * C + c);
    const float norm = __fmul_rn(__fsub_rn(load_any(inp, di, n * C + c), mean[n]), rstd[n]);
    sw = __fadd_rn(sw, __fmul_rn(norm, d));
    sb = __fadd_rn(sb, d);
  }
  pw[blockIdx.y * C + c] = sw;
  pb[blockIdx.y * C + c] = sb;
}

// dweight[c] (blockIdx.y 0) and dbias[c] (1) += the column sums of the partials pw, pb, one
// rounding each. A block (32, kSumLanes) takes 32 columns: thread (x, y) sums partial rows y,
// y + kSumLanes, ... of column x in order, then warp y = 0 adds the kSumLanes sums in order to
// the old value. A fixed order (deterministic), and chunks / kSumLanes dependent loads per
// thread instead of chunks (one thread per column took ~512 L2 round trips in a row).
constexpr int kSumLanes = 16;
template <class Tw, class Tb>
__global__ void __launch_bounds__(32 * kSumLanes)
    column_sums_kernel(Tw* dweight, Tb* dbias, const float* __restrict__ pw,
                       const float* __restrict__ pb, int64_t chunks, int64_t C,
                       unsigned long long* counters) {
  __shared__ float sums[kSumLanes][33];
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t c = int64_t{blockIdx.x} * 32 + x;
  const float* p = blockIdx.y == 0 ? pw : pb;
  float acc = 0.0f;
  if (c < C)
    for (int64_t r = y; r < chunks; r += kSumLanes) acc = __fadd_rn(acc, p[r * C + c]);
  sums[y][x] = acc;
  __syncthreads();
  if (y == 0) {  // one whole warp: x = 0..31
    CastTally tally;
    if (c < C) {
      float s = 0.0f;
      for (int k = 0; k < kSumLanes; ++k) s = __fadd_rn(s, sums[k][x]);
      if (blockIdx.y == 0)
        store_counted(dweight, c, __fadd_rn(load<Tw>(dweight[c]), s), tally);
      else
        store_counted(dbias, c, __fadd_rn(load<Tb>(dbias[c]), s), tally);
    }
    if (kNarrow<Tw> || kNarrow<Tb>) tally.flush(counters);
  }
}

void expect_stats(const char* op, const char* arg, const Tensor& t, int64_t N) {
  expect_tensor(op, arg, as_shape(t, {N}), DType::f32, {N});
}

// C and N of an (..., C) input.
void rows_of(const char* op, const Tensor& inp, int64_t* N, int64_t* C) {
  if (!inp.defined() || inp.shape.ndim < 1 || inp.dim(-1) <= 0)
    throw RuntimeError(std::string(op) + ": argument 'inp' expected a float tensor (..., C), got " +
                       inp.shape.str());
  *C = inp.dim(-1);
  *N = inp.numel() / *C;
}

}  // namespace

void layernorm_forward(Context& ctx, Tensor out, Tensor mean, Tensor rstd, Tensor inp,
                       Tensor weight, Tensor bias, const Fp8Output* fp8) {
  const char* op = fp8 ? "layernorm_forward_fp8" : "layernorm_forward";
  int64_t N, C;
  rows_of(op, inp, &N, &C);
  expect_float(op, "inp", as_shape(inp, {N, C}), {N, C});
  if (fp8) {
    check_fp8_output(op, out, *fp8);
    if (out.numel() != N * C || out.shape.ndim < 1 || out.dim(-1) != C)
      throw RuntimeError(std::string(op) + ": argument 'out' expected inp's shape " +
                         inp.shape.str() + ", got " + out.shape.str());
  } else {
    expect_float(op, "out", as_shape(out, {N, C}), {N, C});
  }
  expect_stats(op, "mean", mean, N);
  expect_stats(op, "rstd", rstd, N);
  expect_float(op, "weight", weight, {C});
  expect_float(op, "bias", bias, {C});
  if (fp8) ctx.fp8_inp_caches().forget(out.data, out.bytes());  // written by other means
  if (N == 0) return;
  unsigned long long* counters = ctx.cast_counters(TensorClass::activation);
  const unsigned blocks = static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
  const int cols = register_cols(C);
  auto* mu = static_cast<float*>(mean.data);
  auto* rs = static_cast<float*>(rstd.data);
  auto launch = [&](auto o) {
    using Out = decltype(o);
    if (cols == 0) {
      layernorm_forward_kernel<Out><<<blocks, kBlock, 0, ctx.stream()>>>(
          o, mu, rs, inp.data, inp.dtype, weight.data, weight.dtype, bias.data, bias.dtype, N, C,
          counters);
      return;
    }
    with_register_cols(cols, [&](auto k) {
      layernorm_forward_regs_kernel<Out, decltype(k)::value><<<blocks, kBlock, 0, ctx.stream()>>>(
          o, mu, rs, inp.data, inp.dtype, weight.data, weight.dtype, bias.data, bias.dtype, N, C,
          counters);
    });
  };
  if (!fp8) {
    MPT_DISPATCH_FLOAT(out.dtype, "layernorm_forward: out",
                       [&] { launch(PlainOut<T>{static_cast<T*>(out.data)}); });
    MPT_LAUNCH_CHECK(ctx, op);
    if (out.dtype != DType::f32) ctx.add_cast_values(TensorClass::activation, N * C);
    return;
  }
  auto* q = static_cast<uint8_t*>(out.data);
  unsigned* amax_bits = fp8->q.amax ? ctx.amax_report(fp8->q.amax) : nullptr;
  MPT_DISPATCH_FLOAT(fp8->round_to, "layernorm_forward_fp8: round_to", [&] {
    if (fp8->q.format == DType::e4m3)
      launch(Fp8Out<T, true>{q, fp8->q.scale, amax_bits, 0u});
    else
      launch(Fp8Out<T, false>{q, fp8->q.scale, amax_bits, 0u});
  });
  MPT_LAUNCH_CHECK(ctx, op);
  // Both casts, as layernorm_forward's store and the GEMM's quantisation count them.
  ctx.add_cast_values(TensorClass::activation, fp8_output_casts(*fp8, N * C));
}

void layernorm_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                        Tensor inp, Tensor weight, Tensor mean, Tensor rstd) {
  const char* op = "layernorm_backward";
  int64_t N, C;
  rows_of(op, inp, &N, &C);
  expect_float(op, "inp", as_shape(inp, {N, C}), {N, C});
  expect_float(op, "dinp", as_shape(dinp, {N, C}), {N, C});
  expect_float(op, "dout", as_shape(dout, {N, C}), {N, C});
  expect_float(op, "weight", weight, {C});
  expect_float(op, "dweight", dweight, {C});
  expect_float(op, "dbias", dbias, {C});
  expect_stats(op, "mean", mean, N);
  expect_stats(op, "rstd", rstd, N);
  if (N == 0) return;
  unsigned long long* counters = ctx.cast_counters(TensorClass::gradient);
  const float* mu = static_cast<const float*>(mean.data);
  const float* rs = static_cast<const float*>(rstd.data);

  // Chunks of kLayerNormRowChunk rows, longer when there would be more than 65535 (the loop
  // path's grid's y limit).
  const int64_t row_chunk = layernorm_row_chunk(N);
  const int64_t chunks = (N + row_chunk - 1) / row_chunk;
  float* pw = static_cast<float*>(
      ctx.scratch(Scratch::kReduce, layernorm_backward_scratch_bytes(N, C)));
  float* pb = pw + chunks * C;
  const int cols = register_cols(C);
  if (cols != 0) {
    // dinp and the partials in one pass over dout and inp.
    MPT_DISPATCH_FLOAT(dinp.dtype, "layernorm_backward: dinp", [&] {
      with_register_cols(cols, [&](auto k) {
        layernorm_backward_regs_kernel<T, decltype(k)::value>
            <<<static_cast<unsigned>(chunks), kBlock, 0, ctx.stream()>>>(
                static_cast<T*>(dinp.data), pw, pb, dout.data, dout.dtype, inp.data, inp.dtype,
                weight.data, weight.dtype, mu, rs, N, C, row_chunk, counters);
      });
    });
    MPT_LAUNCH_CHECK(ctx, op);
  } else {
    const unsigned row_blocks = static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
    MPT_DISPATCH_FLOAT(dinp.dtype, "layernorm_backward: dinp", [&] {
      layernorm_dinp_kernel<T><<<row_blocks, kBlock, 0, ctx.stream()>>>(
          static_cast<T*>(dinp.data), dout.data, dout.dtype, inp.data, inp.dtype, weight.data,
          weight.dtype, mu, rs, N, C, counters);
    });
    MPT_LAUNCH_CHECK(ctx, op);
    layernorm_partials_kernel<<<dim3(blocks_for(C), static_cast<unsigned>(chunks)), kBlock, 0,
                                ctx.stream()>>>(pw, pb, dout.data, dout.dtype, inp.data,
                                                inp.dtype, mu, rs, N, C, row_chunk);
    MPT_LAUNCH_CHECK(ctx, op);
  }
  const dim3 sum_grid(static_cast<unsigned>((C + 31) / 32), 2), sum_block(32, kSumLanes);
  MPT_DISPATCH_FLOAT(dweight.dtype, "layernorm_backward: dweight", [&] {
    using Tw = T;
    MPT_DISPATCH_FLOAT(dbias.dtype, "layernorm_backward: dbias", [&] {
      column_sums_kernel<Tw, T><<<sum_grid, sum_block, 0, ctx.stream()>>>(
          static_cast<Tw*>(dweight.data), static_cast<T*>(dbias.data), pw, pb, chunks, C,
          counters);
    });
  });
  MPT_LAUNCH_CHECK(ctx, op);
  for (const Tensor* t : {&dinp, &dweight, &dbias})
    if (t->dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, t->numel());
}

}  // namespace mpt::cuda
