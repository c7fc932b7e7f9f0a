// Matmuls through cuBLASLt, fp32 accumulation (CUBLAS_COMPUTE_32F, fp32 scale type).
//
// How each product maps to a cuBLASLt GEMM (layouts, transposes, types, which operands need an
// fp8 or transposed copy) is decided by the pure functions of matmul_plan.h; this file prepares
// the operands, runs the GEMM and stores the results.
//
// Cast statistics (backend.h): outputs stored in fp16/bf16 count as activations (forward) or
// gradients (backward), with overflows and underflows judged on the fp32 value before rounding,
// as the CPU's commit() does. cuBLASLt rounds inside the GEMM where nothing can count, so by
// default the GEMM writes fp32: into the output itself when it is fp32, else into an fp32
// staging buffer (Scratch::kMatmulOut) that a counting store kernel rounds into the output
// (adding the bias when the GEMM's epilogue did not). This costs an fp32 buffer of the output's
// size and a pass over it. MPT_GEMM_OUT=direct lets GEMMs write bf16 outputs themselves, which
// the store kernel then reads to count and to fuse (matmul_plan.h, GemmOut: what the counts
// lose).
//
// fp8: each operand is quantised with its per-tensor scale by one kernel that also reduces the
// operand's amax and counts the casts (inp: activations, weight: weights, dout: gradients; the
// backward's re-quantisations of inp and weight are neither counted nor report an amax, as on the
// CPU). Hopper's fp8 GEMMs are TN only, so the same kernel writes the transposed copies the
// backward needs (through a shared-memory tile: quantise and transpose in one pass; the strip
// kernel, or the element kernel for operands off 16-byte alignment: matmul_plan.h,
// quantise_launch). A training forward writes inp's transposed copy into the caller's
// MatmulSpec::inp_cache, which the backward's wgrad GEMM then reads. The A/B scale pointers hold
// the inverse scales (device floats); the bias is added after the scaled product.
//
// dbias: column sums of dout as stored (never quantised), in fp32, then added to the existing
// value: by the wgrad GEMM's BGRADB epilogue where the GEMM reads dout as stored (native
// fp32/fp16/bf16 operands, and tf32 with 16-bit ones); under fp8 by the strip kernel that
// quantises dout, in the same pass; else by column-sum kernels of their own. The last two sum
// fixed chunks of kDbiasRows rows, then the chunks in order: no atomics, in orders of their own.
// All are deterministic: cuBLASLt gives the same bits for the same GEMM key (shape, alignments,
// epilogue) and device, as for dweight itself.
//
// GELU (matmul_gelu_forward, matmul_backward_gelu; the path: matmul_plan.h GeluPath). With
// 16-bit outputs the store kernel that rounds the product applies GELU (or GELU's derivative) to
// the rounded value, with the GELU kernels' own expressions (gelu_math.cuh): the same bits and
// cast counts as the two separate ops, with one fewer pass over the output. Forward: 4 bytes
// read and 4 written per element instead of 4 + 2 + 2 + 2; backward: 4 + 2 (the GELU's input)
// read and 2 written instead of 4 + 2 + 2 + 2 + 2. With fp32 outputs of tf32 GEMMs cuBLASLt's
// GELU_AUX(_BIAS) and DGELU epilogues do it inside the GEMM (no extra pass at all); fp32 GEMMs
// keep the exact GELU kernel (matmul_plan.h says why).
#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>

#include "backend/cuda/classifier.cuh"
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/fp8_math.cuh"
#include "backend/cuda/gelu.cuh"
#include "backend/cuda/gelu_math.cuh"
#include "backend/cuda/gemm.h"
#include "backend/cuda/residual.cuh"
#include "backend/cuda/matmul.cuh"
#include "backend/cuda/matmul_plan.h"

namespace mpt::cuda {
namespace {

// A float argument holding `shape`'s elements with its last dimension (leading dimensions may
// be split: inp may be (B,T,C) for (N,C)).
// `quantised`: an inp stored quantised (MatmulSpec::inp), whose fp8 dtype the caller checked.
void expect_matrix(const char* op, const char* arg, const Tensor& t, Shape shape,
                   bool quantised = false) {
  const bool ok = t.defined() &&
                  (quantised || t.dtype == DType::f32 || t.dtype == DType::f16 ||
                   t.dtype == DType::bf16) &&
                  t.numel() == shape.numel() && t.dim(-1) == shape[shape.ndim - 1];
  if (!ok)
    throw RuntimeError(std::string(op) + ": argument '" + arg + "' expected a float tensor " +
                       "(fp32, fp16 or bf16) of shape " + shape.str() + ", got " +
                       (t.defined() ? dtype_name(t.dtype) : "undefined") + t.shape.str());
}

// ---- kernels

constexpr int kTile = 32;
constexpr int kTileRows = 8;  // blockDim (32, 8): each thread handles 4 elements of a tile

// The inverse scales an fp8 GEMM reads through its scale pointers (Context::fp8_scale_words:
// inp, weight, dout), written by the quantise pass that runs last before the GEMM rather than by
// a launch of their own; dst null: this pass writes none.
struct ScaleWords {
  float* dst = nullptr;
  float inv[3] = {0.0f, 0.0f, 0.0f};
};

__device__ __forceinline__ void write_scale_words(const ScaleWords& w) {
  if (w.dst && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0) {
    w.dst[0] = w.inv[0];
    w.dst[1] = w.inv[1];
    w.dst[2] = w.inv[2];
  }
}

// q = saturate(RNE(x * scale)) in fp8 for a row-major (rows, cols) operand, written row-major to
// y and/or transposed (cols, rows) to yt (either may be null). With counters: the casts'
// overflows (finite |x * scale| above the format's largest value) and underflows (non-zero
// values that became zero), as the CPU counts them. With amax_bits: max |x| (before scaling) as
// magnitude bits, an integer atomicMax (order-independent; NaN's bits exceed infinity's).
// `words`: see ScaleWords.
template <class Tin, bool kE4M3>
__global__ void quantise_kernel(const Tin* __restrict__ x, int64_t rows, int64_t cols, float scale,
                                uint8_t* __restrict__ y, uint8_t* __restrict__ yt,
                                unsigned long long* counters, unsigned* amax_bits,
                                ScaleWords words) {
  write_scale_words(words);
  __shared__ uint8_t tile[kTile][kTile + 1];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  CastTally tally;
  unsigned am = 0;
  for (int j = ty; j < kTile; j += kTileRows) {
    const int64_t r = r0 + j, c = c0 + tx;
    if (r < rows && c < cols) {
      const uint8_t q = quantise_one<kE4M3>(load<Tin>(x[r * cols + c]), scale, am, tally);
      if (y) y[r * cols + c] = q;
      tile[j][tx] = q;
    }
  }
  if (yt) {
    __syncthreads();
    for (int j = ty; j < kTile; j += kTileRows) {
      const int64_t c = c0 + j, r = r0 + tx;  // yt[c][r] = tile[r - r0][c - c0]
      if (r < rows && c < cols) yt[c * rows + r] = tile[tx][j];
    }
  }
  if (counters) tally.flush(counters);
  flush_amax(am, amax_bits);
}

// The strip kernel (matmul_plan.h, quantise_launch): quantise_kernel's casts, counts and amax
// for a strip of kQuantiseCols columns by kDbiasRows rows, 16-byte loads (V elements) and
// V-byte stores; a transposed copy goes through a shared tile of kQuantiseSubRows rows, which
// each warp writes out as 16 consecutive bytes of 32 columns. With `part`: the strip's column
// sums of x as stored, part[blockIdx.y][c] (dbias_partial_kernel's partial sums over the same
// kDbiasRows rows, added in another fixed order: each thread its rows in order, then the
// threads of a column in order). Needs cols % V == 0, x 16-byte aligned, and with yt
// rows % 16 == 0 (quantise_launch checks).
template <class Tin, bool kE4M3>
__global__ void __launch_bounds__(kQuantiseThreads)
quantise_strip_kernel(const Tin* __restrict__ x, int64_t rows, int64_t cols, float scale,
                      uint8_t* __restrict__ y, uint8_t* __restrict__ yt, float* __restrict__ part,
                      unsigned long long* counters, unsigned* amax_bits, ScaleWords words) {
  write_scale_words(words);
  constexpr int V = 16 / sizeof(Tin);  // 8 (fp16, bf16) or 4 (fp32)
  using Map = QuantiseStrip<V>;
  constexpr int kRowsPerPass = Map::kRowsPerPass, kPasses = Map::kPasses;
  constexpr int kSubTiles = static_cast<int>(kDbiasRows / kQuantiseSubRows);
  // A row of 64 bytes is 16 banks: the half-warp of a V-byte store covers distinct banks, and a
  // warp reading 32 columns of one row reads 8 words.
  __shared__ __align__(16) uint8_t tile[kQuantiseSubRows][kQuantiseCols];
  __shared__ float colsums[kRowsPerPass][kQuantiseCols];
  const int t = threadIdx.x;
  const int lr = Map::load_row(t, 0), lc = Map::load_col(t);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kQuantiseCols;
  const int64_t rb = static_cast<int64_t>(blockIdx.y) * kDbiasRows;
  const int64_t c = c0 + lc;
  const bool col_ok = c < cols;  // cols % V == 0: the whole V-vector is inside
  float sum[V];
#pragma unroll
  for (int k = 0; k < V; ++k) sum[k] = 0.0f;
  CastTally tally;
  unsigned am = 0;
  for (int sub = 0; sub < kSubTiles; ++sub) {
    const int64_t r0 = rb + int64_t(sub) * kQuantiseSubRows;
    if (r0 >= rows) break;  // the same for the whole block
    Pack<Tin, V> in[kPasses];
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {  // every load in flight before the first is used
      const int64_t r = r0 + Map::load_row(t, p);
      if (col_ok && r < rows) in[p] = *reinterpret_cast<const Pack<Tin, V>*>(x + r * cols + c);
    }
    if (yt && sub > 0) __syncthreads();  // the previous sub-tile's transposed rows are out
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int tr = Map::load_row(t, p);
      const int64_t r = r0 + tr;
      if (col_ok && r < rows) {
        Pack<uint8_t, V> q;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float v = load<Tin>(in[p].v[k]);
          q.v[k] = quantise_one<kE4M3>(v, scale, am, tally);
          if (part) sum[k] = __fadd_rn(sum[k], v);
        }
        if (y) *reinterpret_cast<Pack<uint8_t, V>*>(y + r * cols + c) = q;
        if (yt) *reinterpret_cast<Pack<uint8_t, V>*>(&tile[tr][lc]) = q;
      }
    }
    if (yt) {
      __syncthreads();
      // yt[c][r .. r + 15], 16 bytes (rows % 16 == 0: a group of 16 rows is whole or absent).
      const int tc = Map::tr_col(t), tr = Map::tr_row(t);
      const int64_t cc = c0 + tc, r = r0 + tr;
      if (cc < cols && r < rows) {
        Pack<uint8_t, 16> o;
#pragma unroll
        for (int k = 0; k < 16; ++k) o.v[k] = tile[tr + k][tc];
        *reinterpret_cast<Pack<uint8_t, 16>*>(yt + cc * rows + r) = o;
      }
    }
  }
  if (part) {
#pragma unroll
    for (int k = 0; k < V; ++k) colsums[lr][lc + k] = sum[k];
    __syncthreads();
    if (t < kQuantiseCols && c0 + t < cols) {
      float s = 0.0f;
      for (int i = 0; i < kRowsPerPass; ++i) s = __fadd_rn(s, colsums[i][t]);
      part[static_cast<int64_t>(blockIdx.y) * cols + c0 + t] = s;
    }
  }
  if (counters) tally.flush(counters);
  flush_amax(am, amax_bits);
}

// yt (cols, rows) = x (rows, cols) transposed, bytes: an inp stored quantised (MatmulSpec::inp)
// to the transposed copy the wgrad GEMM reads (quantise_kernel's transposition without the
// cast). Tiles of kTile x kTile through shared memory, blockDim (kTile, kTileRows): each warp
// reads and writes 32 consecutive bytes, one sector. The grid's y dimension strides over the
// row tiles (at most 65535 blocks).
__global__ void transpose_bytes_kernel(const uint8_t* __restrict__ x, int64_t rows, int64_t cols,
                                       uint8_t* __restrict__ yt) {
  __shared__ uint8_t tile[kTile][kTile + 1];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile; r0 < rows;
       r0 += static_cast<int64_t>(gridDim.y) * kTile) {
    for (int j = ty; j < kTile; j += kTileRows) {
      const int64_t r = r0 + j, c = c0 + tx;
      if (r < rows && c < cols) tile[j][tx] = x[r * cols + c];
    }
    __syncthreads();
    for (int j = ty; j < kTile; j += kTileRows) {
      const int64_t c = c0 + j, r = r0 + tx;  // yt[c][r] = tile[r - r0][c - c0]
      if (r < rows && c < cols) yt[c * rows + r] = tile[tx][j];
    }
    __syncthreads();  // the tile is refilled for the next row tile
  }
}

template <class T>
__global__ void widen_kernel(const T* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = load<T>(x[i]);
}

// What the store kernel does besides rounding the product (each a 16-bit output's fusion of
// the op that follows the matmul, with that op's expressions on the rounded product):
//   kPlain     out = y
//   kGelu      out = y, gelu_out = gelu(y)               (matmul_gelu_forward)
//   kResidual  out = residual + y, y itself not stored    (matmul_residual_forward)
//   kDgelu     out = gelu'(pre) * y, y itself not stored  (matmul_backward_gelu's dgrad)
//   kGeluFp8   out = y, gelu_out = gelu(y) rounded to Tout, then quantised to fp8 (Fp8Output:
//              MatmulSpec::gelu_fp8, the next GEMM's input scale; store_fp8_one)
// where y = d (+ bias) rounded to Tout; every rounding is counted. With kDirect (below) y is
// what the GEMM stored in out: counted from that value, out rewritten by kResidual and kDgelu
// only.
enum StoreMode : int { kPlain, kGelu, kResidual, kDgelu, kGeluFp8 };

// kGeluFp8's quantisation: the format, the scale, and where the amax goes (null: nowhere).
struct StoreFp8 {
  bool e4m3 = true;
  float scale = 1.0f;
  unsigned* amax_bits = nullptr;
};

// out (rows, cols) as kMode says, rounded to Tout and counted (as store_counted does). `src`
// is the GEMM's result: fp32 (staged; it may alias an fp32 out: each thread reads its elements
// before it writes them), or with kDirect y itself, written in Tout by the GEMM (GemmOut::direct;
// src is out, no bias), which is then read, counted from its stored value (CastTally::
// add_stored) and, kPlain, not written again. Launched as store_launch (matmul_plan.h) says.
template <class Tout, class Tbias, int kMode, int kVec, bool kDirect>
__global__ void store_kernel(const void* src, Tout* out, void* gelu_out, const Tout* residual,
                             const void* pre, DType pre_dt, const Tbias* __restrict__ bias,
                             int64_t rows, int64_t cols, unsigned long long* counters,
                             StoreFp8 fp8) {
  CastTally tally;
  unsigned am = 0;  // kGeluFp8: the largest magnitude this thread quantised
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (c0 < cols) {  // no early return: every lane reaches the flush
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
      const int64_t i = r * cols + c0;
      float v[kVec];
      Pack<Tout, kVec> y, z, res;  // z: the fused op's result (kMode != kPlain)
      Pack<uint8_t, kVec> zq;      // kGeluFp8's
      if constexpr (kDirect) {
        y = *reinterpret_cast<const Pack<Tout, kVec>*>(static_cast<const Tout*>(src) + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[k] = load<Tout>(y.v[k]);
      } else if constexpr (kVec == 4) {
        const float4 q = *reinterpret_cast<const float4*>(static_cast<const float*>(src) + i);
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
      } else {
        v[0] = static_cast<const float*>(src)[i];
      }
      if constexpr (kMode == kResidual) res = *reinterpret_cast<const Pack<Tout, kVec>*>(residual + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if constexpr (kDirect) {
          tally.add_stored(v[k]);
        } else {
          if (bias) v[k] = __fadd_rn(v[k], load<Tbias>(bias[c0 + k]));
          y.v[k] = store<Tout>(v[k]);
          if (kNarrow<Tout>) tally.add(v[k], load<Tout>(y.v[k]), max_finite<Tout>());
        }
        if constexpr (kMode == kGeluFp8) {
          // gelu_forward_fp8_kernel's: the GELU rounded to Tout, then quantised
          const float w = gelu_value(load<Tout>(y.v[k]));
          zq.v[k] = fp8.e4m3 ? store_fp8_one<Tout, true>(w, fp8.scale, am, tally)
                             : store_fp8_one<Tout, false>(w, fp8.scale, am, tally);
        } else if constexpr (kMode != kPlain) {
          // gelu_forward_kernel's GELU, residual_kernel's a + b with a the residual stream, or
          // gelu_backward_kernel's gelu'(inp) * dout
          const float yk = load<Tout>(y.v[k]);
          float w;
          if constexpr (kMode == kGelu) w = gelu_value(yk);
          else if constexpr (kMode == kResidual) w = __fadd_rn(load<Tout>(res.v[k]), yk);
          else w = __fmul_rn(gelu_derivative(load_any(pre, pre_dt, i + k)), yk);
          z.v[k] = store<Tout>(w);
          if (kNarrow<Tout>) tally.add(w, load<Tout>(z.v[k]), max_finite<Tout>());
        }
      }
      if constexpr (kMode == kResidual || kMode == kDgelu) {
        *reinterpret_cast<Pack<Tout, kVec>*>(out + i) = z;
      } else {
        if constexpr (!kDirect) *reinterpret_cast<Pack<Tout, kVec>*>(out + i) = y;
        if constexpr (kMode == kGelu)
          *reinterpret_cast<Pack<Tout, kVec>*>(static_cast<Tout*>(gelu_out) + i) = z;
        if constexpr (kMode == kGeluFp8)
          *reinterpret_cast<Pack<uint8_t, kVec>*>(static_cast<uint8_t*>(gelu_out) + i) = zq;
      }
    }
  }
  if (kNarrow<Tout>) tally.flush(counters);
  if constexpr (kMode == kGeluFp8) flush_amax(am, fp8.amax_bits);
}

// dbias, deterministically in two passes (no atomics): partial column sums over fixed chunks of
// kDbiasRows rows (this kernel, or the fp8 strip kernel as it quantises dout), then
// dbias_final_kernel adds them to the existing value. kDbiasRows: workspace_plan.h.

template <class Td>
__global__ void dbias_partial_kernel(const Td* __restrict__ dout, float* __restrict__ part,
                                     int64_t N, int64_t OC) {
  const int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (o >= OC) return;
  const int64_t n0 = blockIdx.y * kDbiasRows, n1 = min(N, n0 + kDbiasRows);
  float s = 0.0f;
  for (int64_t n = n0; n < n1; ++n) s = __fadd_rn(s, load<Td>(dout[n * OC + o]));
  part[blockIdx.y * OC + o] = s;
}

// dbias[o] + the partial sums of column o. The chunks' partials are summed in parallel, in a
// fixed order: warp w of a block sums chunks w, w + 8, ... of the block's 32 columns (one per
// lane, reads of 128 contiguous bytes), then warp 0 adds the warps' sums to dbias in warp order
// (one chunk: dbias + part[0], as a single add). A thread per column walking every chunk would
// take chunks dependent loads: 128 of them at 32 x 1024 rows.
constexpr int kDbiasFinalWarps = 8;
template <class Tb>
__global__ void __launch_bounds__(kDbiasFinalWarps * 32)
dbias_final_kernel(const float* __restrict__ part, int64_t chunks, Tb* dbias, int64_t OC,
                   unsigned long long* counters) {
  __shared__ float sums[kDbiasFinalWarps][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  // Each warp's sum starts from its first chunk, not from +0 (which would turn a -0 into +0).
  float s = 0.0f;
  if (o < OC && w < chunks) {
    s = part[w * OC + o];
    for (int64_t c = w + kDbiasFinalWarps; c < chunks; c += kDbiasFinalWarps)
      s = __fadd_rn(s, part[c * OC + o]);
  }
  sums[w][lane] = s;
  __syncthreads();
  if (w == 0) {
    CastTally tally;
    if (o < OC) {
      float t = load<Tb>(dbias[o]);
      // Only the warps that summed a chunk.
      const int64_t used = chunks < kDbiasFinalWarps ? chunks : kDbiasFinalWarps;
      for (int k = 0; k < used; ++k) t = __fadd_rn(t, sums[k][lane]);
      store_counted(dbias, o, t, tally);
    }
    if (kNarrow<Tb>) tally.flush(counters);  // every lane of warp 0 reaches it
  }
}

// ---- host helpers

// An fp8 GEMM's inverse scales (ScaleWords), in the order of kInp, kWeight, kDout. (The amaxes
// go to the Context's report words, read at collect_stats(): no GEMM waits for the host.)
constexpr int kInp = 0, kWeight = 1, kDout = 2;

ScaleWords scale_words(Context& ctx, const MatmulSpec& spec, bool with_dout) {
  ScaleWords w;
  w.dst = ctx.fp8_scale_words();
  w.inv[kInp] = 1.0f / spec.inp.scale;
  w.inv[kWeight] = 1.0f / spec.weight.scale;
  w.inv[kDout] = with_dout ? 1.0f / spec.dout.scale : 1.0f;
  return w;
}

uintptr_t address(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data); }

// Where the quantise kernel reduces an operand's amax: a report word for q.amax, or none.
unsigned* amax_word(Context& ctx, const Fp8Operand& q) {
  return q.amax ? ctx.amax_report(q.amax) : nullptr;
}

void check_scale(const Fp8Operand& q) {
  if (!(q.scale > 0.0f) || !std::isfinite(q.scale))
    throw RuntimeError("fp8 matmul: scale must be finite and > 0");
}

// Whether quantise() can also give the column sums of t (rows, cols) with a transposed copy
// into scratch (256-byte aligned): the strip kernel's (matmul_plan.h, quantise_launch).
bool quantise_sums_columns(Tensor t, int64_t rows, int64_t cols) {
  return quantise_launch(rows, cols, dtype_size(t.dtype), pointer_alignment(address(t)), 256,
                         true).strip;
}

// Quantises t (row-major rows x cols) with q's scale into y and/or yt. With `part`, also the
// partial column sums of t as stored into part (dbias_chunks(rows) rows of cols floats), which
// needs quantise_sums_columns and yt. `words`: the GEMM's inverse scales, which this pass writes
// (where t is empty and no kernel runs, an upload does).
void quantise(Context& ctx, Tensor t, int64_t rows, int64_t cols, const Fp8Operand& q, void* y,
              void* yt, bool count, TensorClass cls, unsigned* amax_bits,
              float* part = nullptr, const ScaleWords& words = ScaleWords{}) {
  check_scale(q);
  const uintptr_t outs = reinterpret_cast<uintptr_t>(y) | reinterpret_cast<uintptr_t>(yt);
  const QuantiseLaunch l = quantise_launch(rows, cols, dtype_size(t.dtype),
                                           pointer_alignment(address(t)), pointer_alignment(outs),
                                           yt != nullptr);
  if (part && !(l.strip && yt))
    throw RuntimeError("fp8 matmul: column sums need the strip kernel and a transposed copy");
  unsigned long long* counters = count ? ctx.cast_counters(cls) : nullptr;
  if (rows > 0 && cols > 0) {
    auto* yb = static_cast<uint8_t*>(y);
    auto* ytb = static_cast<uint8_t*>(yt);
    const dim3 grid(l.grid_x, l.grid_y);
    MPT_DISPATCH_FLOAT(t.dtype, "fp8 matmul operand", [&] {
      const T* x = static_cast<const T*>(t.data);
      auto run = [&](auto e4m3) {
        constexpr bool kE4M3 = decltype(e4m3)::value;
        if (l.strip)
          quantise_strip_kernel<T, kE4M3><<<grid, kQuantiseThreads, 0, ctx.stream()>>>(
              x, rows, cols, q.scale, yb, ytb, part, counters, amax_bits, words);
        else
          quantise_kernel<T, kE4M3><<<grid, dim3(kTile, kTileRows), 0, ctx.stream()>>>(
              x, rows, cols, q.scale, yb, ytb, counters, amax_bits, words);
      };
      if (q.format == DType::e4m3)
        run(std::true_type{});
      else
        run(std::false_type{});
    });
    MPT_LAUNCH_CHECK(ctx, part ? "matmul: fp8 quantise + dbias partial sums" : "matmul: fp8 quantise");
  } else if (words.dst) {
    ctx.upload_async(words.dst, words.inv, sizeof words.inv);
  }
  if (count) ctx.add_cast_values(cls, rows * cols);
}

// yt = the transposed copy of inp (rows x cols) stored quantised (MatmulSpec::inp): the bytes
// as they are, transposed.
void transpose_quantised(Context& ctx, Tensor inp, int64_t rows, int64_t cols, void* yt) {
  if (rows == 0 || cols == 0) return;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile),
                  static_cast<unsigned>(std::min<int64_t>(row_tiles, 65535)));
  transpose_bytes_kernel<<<grid, dim3(kTile, kTileRows), 0, ctx.stream()>>>(
      static_cast<const uint8_t*>(inp.data), rows, cols, static_cast<uint8_t*>(yt));
  MPT_LAUNCH_CHECK(ctx, "matmul: fp8 transpose (inp stored quantised)");
}

// The pointer a native GEMM slot reads: the tensor, or its fp32 widening in `role` scratch.
const void* native_operand(Context& ctx, const GemmOperand& s, Tensor t, Scratch role) {
  if (!s.copy) return t.data;
  float* y = static_cast<float*>(ctx.scratch(role, operand_copy_bytes(t.numel(), GemmType::f32)));
  MPT_DISPATCH_FLOAT(t.dtype, "matmul operand", [&] {
    widen_kernel<T><<<grid_stride_blocks(t.numel()), kBlock, 0, ctx.stream()>>>(
        static_cast<const T*>(t.data), y, t.numel());
  });
  MPT_LAUNCH_CHECK(ctx, "matmul: widen operand");
  return y;
}

// out (rows, cols) = d (+ bias), counted under cls when out is narrow, fused as `mode` says with
// `second`: GELU's output (kGelu) or the residual stream it reads (kResidual), of out's dtype
// and shape, or GELU's input (kDgelu, any float dtype, read element by element); every rounding
// counted under cls. d null: the GEMM wrote out itself in bf16 (GemmOut::direct; no bias), which
// the kernel reads, counts and fuses as `mode` says (kPlain: counts only).
void store_output(Context& ctx, const float* d, Tensor out, Tensor bias, int64_t rows,
                  int64_t cols, TensorClass cls, StoreMode mode = kPlain,
                  Tensor second = Tensor(), const Fp8Output* fp8 = nullptr) {
  if ((mode == kGeluFp8) != (fp8 != nullptr))
    throw RuntimeError("matmul: an fp8 GELU output needs its Fp8Output, and only it");
  const bool direct = d == nullptr;
  if (direct && (out.dtype != DType::bf16 || bias.defined()))
    throw RuntimeError("matmul: only a bf16 output without a bias is read from the GEMM");
  // A direct output that is only to be counted, while nothing is counted (evaluation): no pass.
  if (direct && mode == kPlain && !ctx.cast_counting()) return;
  unsigned long long* counters = ctx.cast_counters(cls);
  // 4 elements per thread: 16-byte loads of d (direct: 8-byte loads of out), 4-element
  // accesses of out (and the second).
  const uint32_t pack_bytes = 4 * static_cast<uint32_t>(dtype_size(out.dtype));
  const bool aligned = (direct || pointer_alignment(reinterpret_cast<uintptr_t>(d)) >= 16) &&
                       pointer_alignment(address(out)) >= pack_bytes &&
                       (mode == kPlain || mode == kDgelu ||
                        pointer_alignment(address(second)) >=
                            4 * static_cast<uint32_t>(dtype_size(second.dtype)));
  StoreFp8 q8;
  if (fp8) {
    q8.e4m3 = fp8->q.format == DType::e4m3;
    q8.scale = fp8->q.scale;
    q8.amax_bits = fp8->q.amax ? ctx.amax_report(fp8->q.amax) : nullptr;
  }
  const StoreLaunch sl = store_launch(rows, cols, aligned);
  const dim3 grid(sl.grid_x, sl.grid_y);
  MPT_DISPATCH_FLOAT(out.dtype, "matmul output", [&] {
    using Tout = T;
    Tout* o = static_cast<Tout*>(out.data);
    void* go = mode == kGelu || mode == kGeluFp8 ? second.data : nullptr;
    const Tout* res = mode == kResidual ? static_cast<const Tout*>(second.data) : nullptr;
    const void* pre = mode == kDgelu ? second.data : nullptr;
    const DType pre_dt = mode == kDgelu ? second.dtype : DType::f32;
    auto launch = [&](auto* b) {
      using Tbias = std::remove_const_t<std::remove_pointer_t<decltype(b)>>;
      auto run = [&](auto m, auto vec) {
        // The fused stores serve 16-bit outputs only (the fp32 paths run the ops separately).
        if constexpr (decltype(m)::value != kPlain && !kNarrow<Tout>) {
          throw RuntimeError("matmul: the fused store kernels take fp16/bf16 outputs");
        } else if (direct) {
          // Only bf16 outputs are written by the GEMM (the check above): no other instances.
          if constexpr (std::is_same_v<Tout, __nv_bfloat16> && std::is_same_v<Tbias, float>)
            store_kernel<Tout, Tbias, decltype(m)::value, decltype(vec)::value, true>
                <<<grid, sl.threads, 0, ctx.stream()>>>(o, o, go, res, pre, pre_dt, b, rows,
                                                        cols, counters, q8);
        } else {
          store_kernel<Tout, Tbias, decltype(m)::value, decltype(vec)::value, false>
              <<<grid, sl.threads, 0, ctx.stream()>>>(d, o, go, res, pre, pre_dt, b, rows, cols,
                                                      counters, q8);
        }
      };
      auto with_vec = [&](auto vec) {
        switch (mode) {
          case kPlain: run(std::integral_constant<int, kPlain>{}, vec); break;
          case kGelu: run(std::integral_constant<int, kGelu>{}, vec); break;
          case kResidual: run(std::integral_constant<int, kResidual>{}, vec); break;
          case kDgelu: run(std::integral_constant<int, kDgelu>{}, vec); break;
          case kGeluFp8: run(std::integral_constant<int, kGeluFp8>{}, vec); break;
        }
      };
      if (sl.vec == 4)
        with_vec(std::integral_constant<int, 4>{});
      else
        with_vec(std::integral_constant<int, 1>{});
    };
    if (!bias.defined()) {
      launch(static_cast<const float*>(nullptr));
    } else {
      MPT_DISPATCH_FLOAT(bias.dtype, "matmul bias", [&] { launch(static_cast<const T*>(bias.data)); });
    }
  });
  // By StoreMode; the direct ones named as the staged stores, " (direct)" added: the op profile
  // tells the two apart.
  static constexpr const char* kLaunchNames[2][5] = {
      {"matmul: store output", "matmul: store output + gelu", "matmul: store output + residual",
       "matmul: store dgrad + gelu backward", "matmul: store output + gelu (fp8)"},
      {"matmul: count output (direct)", "matmul: store output + gelu (direct)",
       "matmul: store output + residual (direct)",
       "matmul: store dgrad + gelu backward (direct)", "matmul: store output + gelu (fp8, direct)"}};
  MPT_LAUNCH_CHECK(ctx, kLaunchNames[direct ? 1 : 0][mode]);
  // kGeluFp8: y, the GELU's rounding and its quantisation.
  const int64_t stores = (mode == kPlain ? 1 : mode == kGeluFp8 ? 3 : 2) * rows * cols;
  if (out.dtype != DType::f32) ctx.add_cast_values(cls, stores);
}

// matmul_forward into `prod`; with `gelu_out` defined, matmul_gelu_forward (prod is its `pre`);
// with `residual` defined, matmul_residual_forward (prod is its `out`, and then holds the sum).
// With `staged` (matmul_crossentropy's GEMM: no bias, GELU or residual), a 16-bit prod is not
// stored: *staged points to the fp32 product in Scratch::kMatmulOut instead, for the caller to
// round (an fp32 prod is written directly, and *staged stays null; so does it when the GEMM
// wrote a bf16 prod itself, GemmOut::direct, which the caller's classifier then counts).
void forward(Context& ctx, Tensor prod, Tensor gelu_out, Tensor residual, Tensor inp,
             Tensor weight, Tensor bias, const MatmulSpec& spec,
             const float** staged = nullptr) {
  const bool gelu = gelu_out.defined();
  const char* op = gelu                 ? "matmul_gelu_forward"
                   : residual.defined() ? "matmul_residual_forward"
                   : staged             ? "matmul_crossentropy"
                                        : "matmul_forward";
  if (staged && (gelu || residual.defined() || bias.defined()))
    throw RuntimeError("matmul: a staged product takes no bias, GELU or residual");
  if (!inp.defined() || !weight.defined() || weight.shape.ndim != 2)
    throw RuntimeError(std::string(op) + ": inp and a 2-d weight are required");
  const int64_t C = inp.dim(-1), N = inp.numel() / C, OC = weight.dim(0);
  const bool inp_quantised = matmul_inp_quantised(inp, spec);  // backend.h, MatmulSpec::inp
  expect_matrix(op, "inp", inp, {N, C}, inp_quantised);
  expect_matrix(op, "weight", weight, {OC, C});
  expect_matrix(op, gelu ? "pre" : "out", prod, {N, OC});
  // An fp8 GELU output (MatmulSpec::gelu_fp8): the store kernel rounds the GELU to prod's dtype
  // and quantises it when that is its round_to; else gelu_forward_fp8 follows.
  const bool gelu_fp8 = gelu && dtype_is_fp8(gelu_out.dtype);
  if (gelu_fp8) {
    check_fp8_output(op, gelu_out, spec.gelu_fp8);
    // Written by other means than a forward's cache write (as gelu_forward_fp8 forgets it).
    ctx.fp8_inp_caches().forget(gelu_out.data, gelu_out.bytes());
  }
  if (gelu) expect_matrix(op, "out", gelu_out, {N, OC}, gelu_fp8);
  if (residual.defined()) expect_matrix(op, "residual", residual, {N, OC});
  if (weight.dim(1) != C) throw RuntimeError(std::string(op) + ": weight must be (OC, C)");
  if (bias.defined()) expect_matrix(op, "bias", bias, {OC});
  const GemmPlan p =
      plan_matmul(MatmulOp::forward, N, C, OC, inp.dtype, weight.dtype, inp.dtype, spec);
  const GemmOut out_mode = gemm_out();  // may throw: before any amax report is registered

  const bool cache = spec.inp_cache.defined();
  if (cache) Fp8InpCaches::check(op, spec, inp);
  GemmArgs g;
  if (p.fp8) {
    // Every check before the first amax report is registered (a throw leaves none pending).
    check_scale(spec.inp);
    check_scale(spec.weight);
    void* qa = ctx.scratch(Scratch::kOperandA, operand_copy_bytes(OC * C, p.a.type));
    const ScaleWords words = scale_words(ctx, spec, false);
    // The last quantise pass before the GEMM writes its inverse scales: inp's, or the weight's
    // when inp is stored quantised and has none.
    quantise(ctx, weight, OC, C, spec.weight, qa, nullptr, true, TensorClass::weight,
             amax_word(ctx, spec.weight), nullptr, inp_quantised ? words : ScaleWords{});
    if (inp_quantised) {
      // Read in place; with a cache, its bytes transposed into it (no cast, count or amax: the
      // producer made them).
      if (cache) transpose_quantised(ctx, inp, N, C, spec.inp_cache.data);
      g.b = inp.data;
      if (pointer_alignment(address(inp)) < 16) {
        // fp8 GEMMs take 16-byte aligned operands (the model's arena is): an inp off that
        // alignment is copied into aligned scratch first.
        void* qb = ctx.scratch(Scratch::kOperandB, operand_copy_bytes(N * C, p.b.type));
        MPT_CUDA_CHECK(cudaMemcpyAsync(qb, inp.data, inp.bytes(), cudaMemcpyDeviceToDevice,
                                       ctx.stream()));
        g.b = qb;
      }
    } else {
      void* qb = ctx.scratch(Scratch::kOperandB, operand_copy_bytes(N * C, p.b.type));
      // With a cache, the same pass writes the transposed copy the backward's wgrad GEMM reads
      // (its A operand: inp^T, (C, N)), which spares the backward a pass over inp.
      quantise(ctx, inp, N, C, spec.inp, qb, cache ? spec.inp_cache.data : nullptr, true,
               TensorClass::activation, amax_word(ctx, spec.inp), nullptr, words);
      g.b = qb;
    }
    if (cache) ctx.fp8_inp_caches().wrote(spec, inp);
    g.a = qa;
    g.scale_a = words.dst + kWeight, g.scale_b = words.dst + kInp;
  } else {
    g.a = native_operand(ctx, p.a, weight, Scratch::kOperandA);
    g.b = native_operand(ctx, p.b, inp, Scratch::kOperandB);
  }
  GeluPath gp = GeluPath::separate;
  if (gelu)
    gp = gelu_forward_path(p, prod.dtype, gelu_fp8 ? spec.gelu_fp8.round_to : gelu_out.dtype,
                           address(prod), bias.defined(), bias.dtype, address(bias));
  if (gelu_fp8 && gp == GeluPath::epilogue) gp = GeluPath::separate;
  const StoreMode gelu_mode = gelu_fp8 ? kGeluFp8 : kGelu;
  const Fp8Output* gelu_q = gelu_fp8 ? &spec.gelu_fp8 : nullptr;
  auto separate_gelu = [&] {
    if (gelu_fp8)
      gelu_forward_fp8(ctx, gelu_out, prod, spec.gelu_fp8);
    else
      gelu_forward(ctx, gelu_out, prod);
  };
  // exact_gelu: the caller recomputes this GELU with gelu_forward, whose bits the epilogue's
  // need not have (backend.h).
  if (gp == GeluPath::epilogue && (!ctx.lt_epilogues() || spec.exact_gelu))
    gp = GeluPath::separate;
  if (gp == GeluPath::epilogue) {
    // out = gelu(product + bias) written by the GEMM, the pre-activation to the aux buffer.
    GemmArgs ge = g;
    ge.d = static_cast<float*>(gelu_out.data);
    ge.aux = prod.data;
    ge.epilogue = bias.defined() ? GemmEpilogue::gelu_aux_bias : GemmEpilogue::gelu_aux;
    ge.bias = bias.defined() ? bias.data : nullptr;
    ge.bias_dtype = bias.dtype;
    if (run_gemm(ctx, p, ge, op, /*may_fail=*/true)) return;
    gp = GeluPath::separate;  // no algorithm takes this epilogue here
  }
  // MPT_GEMM_OUT=direct (matmul_plan.h, GemmOut): the GEMM writes a bf16 prod itself, its bias
  // added by the BIAS epilogue; the store kernel then reads prod to count it and to do what it
  // fuses (the GELU, the residual add), or the separate ops follow. Where cuBLASLt takes no such
  // GEMM (remembered per key), the staged path below runs.
  if (gemm_writes_output(p, prod.dtype, out_mode, bias.defined(), bias.dtype, address(bias),
                         ctx.lt_epilogues())) {
    GemmPlan pb = p;
    pb.d_type = gemm_type_of(prod.dtype);
    GemmArgs gb = g;
    gb.d = prod.data;
    if (bias.defined()) {
      gb.epilogue = GemmEpilogue::bias;
      gb.bias = bias.data;
      gb.bias_dtype = bias.dtype;
    }
    if (run_gemm(ctx, pb, gb, op, /*may_fail=*/true)) {
      // *staged stays null: matmul_crossentropy's classifier reads the logits in place, and
      // counts them in its first pass over them (crossentropy_from_product).
      if (staged) return;
      if (gp == GeluPath::store_kernel) {
        store_output(ctx, nullptr, prod, Tensor(), N, OC, TensorClass::activation, gelu_mode,
                     gelu_out, gelu_q);
      } else if (residual.defined() && residual_in_store(prod.dtype, residual.dtype)) {
        store_output(ctx, nullptr, prod, Tensor(), N, OC, TensorClass::activation, kResidual,
                     residual);
      } else {
        store_output(ctx, nullptr, prod, Tensor(), N, OC, TensorClass::activation);
        if (gelu) separate_gelu();
        if (residual.defined()) residual_forward(ctx, prod, residual, prod);
      }
      return;
    }
  }
  const bool direct = prod.dtype == DType::f32;
  float* d = direct ? static_cast<float*>(prod.data)
                    : static_cast<float*>(ctx.scratch(Scratch::kMatmulOut,
                                                      operand_copy_bytes(N * OC, GemmType::f32)));
  g.d = d;
  BiasPath bp = bias_path(bias.defined(), direct, p.fp8, bias.dtype, address(bias));
  if (bp == BiasPath::epilogue && !ctx.lt_epilogues()) bp = BiasPath::store_kernel;
  bool done = false;
  if (bp == BiasPath::epilogue) {
    g.epilogue = GemmEpilogue::bias;
    g.bias = bias.data;
    g.bias_dtype = bias.dtype;
    // Should cuBLASLt take no BIAS epilogue for these types, the store kernel adds the bias.
    done = run_gemm(ctx, p, g, op, /*may_fail=*/true);
    if (!done) {
      bp = BiasPath::store_kernel;
      g.epilogue = GemmEpilogue::none;
      g.bias = nullptr;
    }
  }
  if (!done) run_gemm(ctx, p, g, op);
  if (staged && !direct) {
    *staged = d;
    return;
  }
  const Tensor store_bias = bp == BiasPath::store_kernel ? bias : Tensor();
  if (gp == GeluPath::store_kernel) {
    store_output(ctx, d, prod, store_bias, N, OC, TensorClass::activation, gelu_mode, gelu_out,
                 gelu_q);
    return;
  }
  // The residual add joins a 16-bit store of the same dtype (the add of the rounded product, as
  // residual_forward computes it); else it follows, in place.
  if (residual.defined() && residual_in_store(prod.dtype, residual.dtype)) {
    store_output(ctx, d, prod, store_bias, N, OC, TensorClass::activation, kResidual, residual);
    return;
  }
  if (!direct || bp == BiasPath::store_kernel)
    store_output(ctx, d, prod, store_bias, N, OC, TensorClass::activation);
  if (gelu) separate_gelu();
  if (residual.defined()) residual_forward(ctx, prod, residual, prod);
}


// matmul_backward; with `gelu_pre` defined, matmul_backward_gelu.
void backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
              Tensor weight, Tensor gelu_pre, const MatmulSpec& spec) {
  if (!inp.defined() || !weight.defined() || weight.shape.ndim != 2)
    throw RuntimeError("matmul_backward: inp and a 2-d weight are required");
  const int64_t C = inp.dim(-1), N = inp.numel() / C, OC = weight.dim(0);
  const bool inp_quantised = matmul_inp_quantised(inp, spec);  // backend.h, MatmulSpec::inp
  expect_matrix("matmul_backward", "inp", inp, {N, C}, inp_quantised);
  expect_matrix("matmul_backward", "weight", weight, {OC, C});
  expect_matrix("matmul_backward", "dout", dout, {N, OC});
  expect_matrix("matmul_backward", "dweight", dweight, {OC, C});
  if (weight.dim(1) != C) throw RuntimeError("matmul_backward: weight must be (OC, C)");
  if (dinp.defined()) expect_matrix("matmul_backward", "dinp", dinp, {N, C});
  if (gelu_pre.defined()) expect_matrix("matmul_backward_gelu", "gelu_pre", gelu_pre, {N, C});
  const bool cache = spec.inp_cache.defined();
  if (cache) {
    Fp8InpCaches::check("matmul_backward", spec, inp);
    ctx.fp8_inp_caches().expect_holds("matmul_backward", spec, inp);
  }
  // Plans first: an unsupported spec throws before anything runs.
  const GemmPlan pw =
      plan_matmul(MatmulOp::wgrad, N, C, OC, inp.dtype, weight.dtype, dout.dtype, spec);
  GemmPlan pd;
  if (dinp.defined())
    pd = plan_matmul(MatmulOp::dgrad, N, C, OC, inp.dtype, weight.dtype, dout.dtype, spec);
  const GemmOut out_mode = gemm_out();  // may throw: before any amax report is registered

  // The bias gradient sums dout as stored, before any quantisation: by the wgrad GEMM's BGRADB
  // epilogue where it reads dout as stored (matmul_plan.h, dbias_in_epilogue), else (or when
  // cuBLASLt has no algorithm for it) by column-sum kernels, here before the fp8 quantisation.
  // Either way the scratch holds the kernels' partial sums (the epilogue's single row of sums
  // takes its start), so that the workspace is the same whichever runs.
  float* part = nullptr;
  int64_t chunks = 0;
  auto add_partials_to_dbias = [&](int64_t rows_of_partials) {
    if (OC == 0) return;
    MPT_DISPATCH_FLOAT(dbias.dtype, "matmul_backward dbias", [&] {
      dbias_final_kernel<T><<<static_cast<unsigned>((OC + 31) / 32), kDbiasFinalWarps * 32, 0,
                              ctx.stream()>>>(
          part, rows_of_partials, static_cast<T*>(dbias.data), OC,
          ctx.cast_counters(TensorClass::gradient));
    });
    MPT_LAUNCH_CHECK(ctx, "matmul_backward: dbias");
    if (dbias.dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, OC);
  };
  auto dbias_by_kernels = [&] {
    const dim3 grid(blocks_for(OC), static_cast<unsigned>(chunks));
    MPT_DISPATCH_FLOAT(dout.dtype, "matmul_backward dout", [&] {
      dbias_partial_kernel<T><<<grid, kBlock, 0, ctx.stream()>>>(static_cast<const T*>(dout.data),
                                                                 part, N, OC);
    });
    MPT_LAUNCH_CHECK(ctx, "matmul_backward: dbias partial sums");
    add_partials_to_dbias(chunks);
  };
  // Never under fp8 (dbias_in_epilogue): its GEMM reads dout quantised, not as stored.
  const bool dbias_epilogue = dbias.defined() && dbias_in_epilogue(pw) && ctx.lt_epilogues();
  // Under fp8 the kernel that quantises dout sums its columns too, in the same pass over dout
  // (where its strip kernel runs), instead of the column-sum kernels' pass of their own.
  const bool dbias_in_quantise =
      dbias.defined() && pw.fp8 && N * OC > 0 && quantise_sums_columns(dout, N, OC);
  if (dbias.defined()) {
    expect_matrix("matmul_backward", "dbias", dbias, {OC});
    chunks = dbias_chunks(N);
    if (chunks > 65535) throw RuntimeError("matmul_backward: too many rows for the dbias grid");
    part = static_cast<float*>(
        ctx.scratch(Scratch::kReduce, std::max<size_t>(256, chunks * OC * sizeof(float))));
    if (!dbias_epilogue && !dbias_in_quantise) dbias_by_kernels();
  }

  const float* scale_inv = nullptr;  // the GEMMs' inverse scales (ScaleWords)
  void* dq = nullptr;   // fp8 dout (N, OC), for dgrad's B
  void* dqt = nullptr;  // fp8 dout^T (OC, N), for wgrad's B
  if (pw.fp8) {
    check_scale(spec.inp);  // inp and weight are quantised again below
    check_scale(spec.weight);
    check_scale(spec.dout);
    if (dinp.defined())
      dq = ctx.scratch(Scratch::kOperandB, operand_copy_bytes(N * OC, pw.b.type));
    dqt = ctx.scratch(Scratch::kOperandC, operand_copy_bytes(N * OC, pw.b.type));
    // One pass: the only new cast of the backward (counted, reports dout's amax), dbias's
    // partial sums, and the inverse scales both GEMMs read (the passes over the weight and inp
    // below write none).
    const ScaleWords words = scale_words(ctx, spec, true);
    quantise(ctx, dout, N, OC, spec.dout, dq, dqt, true, TensorClass::gradient,
             amax_word(ctx, spec.dout), dbias_in_quantise ? part : nullptr, words);
    if (dbias_in_quantise) add_partials_to_dbias(chunks);
    scale_inv = words.dst;
  }

  // dinp (N, C) = dout . weight
  if (dinp.defined()) {
    GemmArgs g;
    if (pd.fp8) {
      void* wt = ctx.scratch(Scratch::kOperandA, operand_copy_bytes(OC * C, pd.a.type));
      quantise(ctx, weight, OC, C, spec.weight, nullptr, wt, false, TensorClass::weight, nullptr);
      g.a = wt, g.b = dq;
      g.scale_a = scale_inv + kWeight, g.scale_b = scale_inv + kDout;
    } else {
      g.a = native_operand(ctx, pd.a, weight, Scratch::kOperandA);
      g.b = native_operand(ctx, pd.b, dout, Scratch::kOperandB);
    }
    GeluPath gp = GeluPath::separate;
    if (gelu_pre.defined())
      gp = gelu_backward_path(pd, dinp.dtype, gelu_pre.dtype, address(gelu_pre));
    if (gp == GeluPath::epilogue && !ctx.lt_epilogues()) gp = GeluPath::separate;
    // MPT_GEMM_OUT=direct: a bf16 dinp written by the GEMM, then counted (and multiplied by
    // GELU's derivative) in place by the store kernel, as in the forward; else staged.
    bool direct16 = false;
    if (gemm_writes_output(pd, dinp.dtype, out_mode, false, DType::f32, 0, ctx.lt_epilogues())) {
      GemmPlan pb = pd;
      pb.d_type = gemm_type_of(dinp.dtype);
      GemmArgs gb = g;
      gb.d = dinp.data;
      direct16 = run_gemm(ctx, pb, gb, "matmul_backward dgrad", /*may_fail=*/true);
    }
    if (direct16) {
      if (gp == GeluPath::store_kernel) {
        store_output(ctx, nullptr, dinp, Tensor(), N, C, TensorClass::gradient, kDgelu, gelu_pre);
      } else {
        store_output(ctx, nullptr, dinp, Tensor(), N, C, TensorClass::gradient);
        if (gelu_pre.defined()) gelu_backward(ctx, dinp, gelu_pre, dinp);  // in place
      }
    } else {
      const bool direct = dinp.dtype == DType::f32;
      float* d = direct ? static_cast<float*>(dinp.data)
                        : static_cast<float*>(ctx.scratch(
                              Scratch::kMatmulOut, operand_copy_bytes(N * C, GemmType::f32)));
      g.d = d;
      bool done = false;
      if (gp == GeluPath::epilogue) {
        // dinp = product * gelu'(gelu_pre) written by the GEMM (DGELU reads the aux buffer).
        GemmArgs ge = g;
        ge.epilogue = GemmEpilogue::dgelu;
        ge.aux = gelu_pre.data;
        done = run_gemm(ctx, pd, ge, "matmul_backward_gelu dgrad", /*may_fail=*/true);
        if (!done) gp = GeluPath::separate;
      }
      if (!done) run_gemm(ctx, pd, g, "matmul_backward dgrad");
      if (gp == GeluPath::store_kernel)
        store_output(ctx, d, dinp, Tensor(), N, C, TensorClass::gradient, kDgelu, gelu_pre);
      else if (!direct)
        store_output(ctx, d, dinp, Tensor(), N, C, TensorClass::gradient);
      if (gp == GeluPath::separate && gelu_pre.defined())
        gelu_backward(ctx, dinp, gelu_pre, dinp);  // in place (element-wise)
    }
  }

  // dweight (OC, C) += dout^T . inp
  {
    GemmArgs g;
    if (pw.fp8) {
      void* xt = cache ? spec.inp_cache.data
                       : ctx.scratch(Scratch::kOperandA, operand_copy_bytes(N * C, pw.a.type));
      if (!cache && inp_quantised)
        transpose_quantised(ctx, inp, N, C, xt);
      else if (!cache)
        quantise(ctx, inp, N, C, spec.inp, nullptr, xt, false, TensorClass::activation, nullptr);
      g.a = xt, g.b = dqt;
      g.scale_a = scale_inv + kInp, g.scale_b = scale_inv + kDout;
    } else {
      g.a = native_operand(ctx, pw.a, inp, Scratch::kOperandA);
      g.b = native_operand(ctx, pw.b, dout, Scratch::kOperandB);
    }
    const bool direct = dweight.dtype == DType::f32;
    // Accumulated 16-bit gradients are staged under every GemmOut: the existing gradient
    // widened, the product added, rounded once.
    float* d = direct ? static_cast<float*>(dweight.data)
                      : static_cast<float*>(ctx.scratch(
                            Scratch::kMatmulOut, operand_copy_bytes(OC * C, GemmType::f32)));
    g.d = d;
    if (!direct) {
      MPT_DISPATCH_FLOAT(dweight.dtype, "matmul_backward dweight", [&] {
        widen_kernel<T><<<grid_stride_blocks(OC * C), kBlock, 0, ctx.stream()>>>(
            static_cast<const T*>(dweight.data), d, OC * C);
      });
      MPT_LAUNCH_CHECK(ctx, "matmul_backward: widen dweight");
    }
    bool done = false;
    if (dbias_epilogue) {
      GemmArgs ge = g;
      ge.epilogue = GemmEpilogue::bgradb;
      ge.bias = part;  // written: the column sums of dout, fp32 (D's type)
      ge.bias_dtype = DType::f32;
      done = run_gemm(ctx, pw, ge, "matmul_backward wgrad", /*may_fail=*/true);
      if (done) add_partials_to_dbias(1);
    }
    if (!done) run_gemm(ctx, pw, g, "matmul_backward wgrad");
    if (dbias_epilogue && !done) dbias_by_kernels();
    if (!direct) store_output(ctx, d, dweight, Tensor(), OC, C, TensorClass::gradient);
  }
}

}  // namespace

void matmul_forward(Context& ctx, Tensor out, Tensor inp, Tensor weight, Tensor bias,
                    const MatmulSpec& spec) {
  forward(ctx, out, Tensor(), Tensor(), inp, weight, bias, spec);
}

void matmul_gelu_forward(Context& ctx, Tensor out, Tensor pre, Tensor inp, Tensor weight,
                         Tensor bias, const MatmulSpec& spec) {
  check_disjoint_args("matmul_gelu_forward", "out", out, "pre", pre);
  forward(ctx, pre, out, Tensor(), inp, weight, bias, spec);
}

void matmul_residual_forward(Context& ctx, Tensor out, Tensor residual, Tensor inp,
                             Tensor weight, Tensor bias, const MatmulSpec& spec) {
  check_disjoint_args("matmul_residual_forward", "out", out, "residual", residual);
  check_disjoint_args("matmul_residual_forward", "out", out, "inp", inp);
  forward(ctx, out, Tensor(), residual, inp, weight, bias, spec);
}

void matmul_crossentropy(Context& ctx, Tensor losses, Tensor logits, Tensor inp, Tensor weight,
                         Tensor targets, int vocab_size, float dloss, const MatmulSpec& spec) {
  const char* op = "matmul_crossentropy";
  check_crossentropy_args(losses, logits, inp, targets);
  // Every check before the GEMM writes anything (the targets too: a bad one leaves logits as
  // they were).
  check_crossentropy(ctx, op, losses, logits, targets, vocab_size);
  const float* d = nullptr;
  forward(ctx, logits, Tensor(), Tensor(), inp, weight, Tensor(), spec, &d);
  crossentropy_from_product(ctx, losses, logits, d, targets, vocab_size, dloss);
}

void matmul_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                     Tensor inp, Tensor weight, const MatmulSpec& spec) {
  backward(ctx, dinp, dweight, dbias, dout, inp, weight, Tensor(), spec);
}

void matmul_backward_gelu(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                          Tensor inp, Tensor weight, Tensor gelu_pre, const MatmulSpec& spec) {
  check_disjoint_args("matmul_backward_gelu", "dinp", dinp, "gelu_pre", gelu_pre);
  backward(ctx, dinp, dweight, dbias, dout, inp, weight, gelu_pre, spec);
}

}  // namespace mpt::cuda
