// Fused causal attention for fp16/bf16 operands (FlashAttention-2: Dao, "FlashAttention-2:
// Faster Attention with Better Parallelism and Work Partitioning", 2023), written for this
// project's op contract (backend.h, attention_forward/backward):
//   forward:  s = scale q~.k~ (fp32), lse = m + log(sum exp(s - m)), out = sum p~ v~ with the
//             probabilities entering the product rounded to the operand format;
//   backward: p = exp(s - lse) again, D = sum p dp with dp = dout~.v~ (fp32), ds = p (dp - D)
//             scale rounded to the operand format, dq = sum ds k~, dk = sum ds q~,
//             dv = sum p~ dout~.
// The forward's online softmax: p~ here is exp(s - m_j) with m_j the row maximum so far, the
// accumulated products are rescaled when m_j grows, and the sum divides at the end, so p~ is
// rounded before its normalisation where the CPU rounds after it: the two differ by at most a
// unit of the format per probability, as between any two orders of rounding (the parity test's
// bound). lse and D come from unrounded fp32 values, as on the CPU.
//
// Launch: one block of 4 warps per (b, h) and tile of 64 rows; each warp owns 16 rows, so the
// row statistics (max, sum, D) are reduced across the 4 lanes that share a row and never across
// warps. Shared memory holds two 64-row tiles of the operands (zero-padded beyond T and beyond
// the head size to the compiled head tile of 32, 64 or 128 columns); a warp's own 16 rows of
// the first operand are held as Tensor Core fragments in registers for the whole kernel, and
// the other operands' fragments come from the tiles by ldmatrix (.trans where the tile enters
// untransposed), two 8-column blocks per instruction.
//
// Masked positions (t2 > t) of a diagonal tile enter the products with p = ds = 0, so a
// non-finite k or v there still makes the row NaN (0 x inf), where the CPU, summing over the
// causal window only, keeps it finite (the GEMM path has the same, over the whole square: see
// attention.cu). Only a step that is skipped anyway sees it.
//
// Deterministic: fixed tile order, fixed shuffle trees, every output element written by one
// thread of one block (the backward's dq by the query-tile kernel, dk and dv by the key-tile
// kernel); no atomics but the cast counters.
#include <cmath>
#include <string>
#include <type_traits>

#include "backend/cuda/attention_plan.h"
#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/flash_attention.cuh"
#include "backend/cuda/flash_fragments.h"

// mma.sync m16n8k16 with fp16/bf16 operands needs compute capability 8.0 (the build's default
// target is 90a).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "flash_attention.cu needs sm_80 or newer (mma.sync m16n8k16 with bf16 operands)"
#endif

namespace mpt::cuda {
namespace {

constexpr int kTile = kFlashTile;           // rows (and columns) of a tile
constexpr int kWarpsPerBlock = kTile / 16;  // one warp per 16 rows
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kTileBlocks = kTile / 8;      // 8-column accumulator blocks across a tile

// ---- Tensor Core fragments (flash_fragments.h has the layouts and the index formulas).
using flash::acc_col;
using flash::acc_row;
using flash::frag_a;

// Two fp32 values rounded to TI (to nearest even) and packed as one register.
template <class TI>
__device__ __forceinline__ uint32_t pack_rounded(float lo, float hi) {
  return flash::pack_raw(store<TI>(lo), store<TI>(hi));
}

// Four 8 x 8 matrices of 16-bit elements from shared memory (flash_fragments.h, ldsm_*): this
// lane's row address p; with Trans each register holds a column pair instead of a row pair.
template <bool Trans>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  // "memory": ordered with the tiles' stores and the barriers.
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}

template <class TI>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A tile: kTile rows of HSP columns in shared memory, row stride HSP + 8 elements (the padding
// spreads a fragment's rows over the banks).
template <int HSP>
struct TileShape {
  static constexpr int LD = HSP + 8;
  static constexpr int KS = HSP / 16;  // 16-wide k steps across the head
  static constexpr int NB = HSP / 8;   // 8-column accumulator blocks across the head
  static constexpr int kElems = kTile * LD;
};

// tile[r][e] = src[(row0 + r) W + e] for row0 + r < T and e < HS, else 0. Every thread of the
// block takes part. `vec` (uniform; flash_vector_loads): 16-byte loads and stores of 8
// elements, for HS and W multiples of 8 and a 16-byte aligned src (the tile's rows, LD = HSP + 8
// elements, and the tile itself are 16-byte aligned).
template <class TI, int HSP>
__device__ void load_tile(TI* tile, const TI* __restrict__ src, int64_t W, int64_t row0,
                          int64_t T, int64_t HS, bool vec) {
  constexpr int LD = TileShape<HSP>::LD;
  if (vec) {
    constexpr int kChunks = HSP / 8;  // 8-element chunks per tile row
    for (int i = threadIdx.x; i < kTile * kChunks; i += kThreads) {
      const int r = i / kChunks, e = (i % kChunks) * 8;
      const int64_t t = row0 + r;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);  // +0 in fp16 and bf16
      if (t < T && e < HS) v = *reinterpret_cast<const uint4*>(src + t * W + e);
      *reinterpret_cast<uint4*>(tile + r * LD + e) = v;
    }
    return;
  }
  const TI zero = store<TI>(0.0f);
  for (int i = threadIdx.x; i < kTile * HSP; i += kThreads) {
    const int r = i / HSP, e = i % HSP;
    const int64_t t = row0 + r;
    tile[r * LD + e] = (t < T && e < HS) ? src[t * W + e] : zero;
  }
}

// The A fragment of columns [16 kk, 16 kk + 16) of a warp's 16 x kTile accumulators, rounded.
template <class TI>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4],
                                         const float (&hi)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float(&half)[4] = flash::acc_half(r) ? hi : lo;
    a[r] = pack_rounded<TI>(half[flash::acc_index(r, 0)], half[flash::acc_index(r, 1)]);
  }
}

// s (16 x kTile) = x . tile^T, x the warp's 16 rows as fragments (16 x HSP). The B fragments
// are frag_b_rows's, two blocks per ldmatrix.
template <class TI, int HSP>
__device__ __forceinline__ void product_with_rows(float (&s)[kTileBlocks][4],
                                                  const uint32_t (&x)[TileShape<HSP>::KS][4],
                                                  const TI* tile, int lane) {
  constexpr int LD = TileShape<HSP>::LD;
#pragma unroll
  for (int nb = 0; nb < kTileBlocks; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
  for (int nb = 0; nb < kTileBlocks; nb += 2) {
#pragma unroll
    for (int ks = 0; ks < TileShape<HSP>::KS; ++ks) {
      uint32_t b[4];
      ldsm_x4<false>(b, tile + flash::ldsm_rows_row(lane, nb * 8) * LD +
                            flash::ldsm_rows_col(lane, ks * 16));
      mma<TI>(s[nb], x[ks], b[0], b[1]);
      mma<TI>(s[nb + 1], x[ks], b[2], b[3]);
    }
  }
}

// acc (16 x HSP) += round(p) . tile, p the warp's 16 x kTile accumulators. The B fragments are
// frag_b_cols's, two blocks per ldmatrix.trans.
template <class TI, int HSP>
__device__ __forceinline__ void accumulate_with_cols(float (&acc)[TileShape<HSP>::NB][4],
                                                     const float (&p)[kTileBlocks][4],
                                                     const TI* tile, int lane) {
  constexpr int LD = TileShape<HSP>::LD;
#pragma unroll
  for (int kk = 0; kk < kTile / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<TI>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int nb = 0; nb < TileShape<HSP>::NB; nb += 2) {
      uint32_t b[4];
      ldsm_x4<true>(b, tile + flash::ldsm_cols_row(lane, kk * 16) * LD +
                           flash::ldsm_cols_col(lane, nb * 8));
      mma<TI>(acc[nb], a, b[0], b[1]);
      mma<TI>(acc[nb + 1], a, b[2], b[3]);
    }
  }
}

// The warp's 16 rows of a tile as A fragments.
template <class TI, int HSP>
__device__ __forceinline__ void rows_as_fragments(uint32_t (&x)[TileShape<HSP>::KS][4],
                                                  const TI* tile, int warp, int g, int c) {
#pragma unroll
  for (int ks = 0; ks < TileShape<HSP>::KS; ++ks)
    frag_a<TI, TileShape<HSP>::LD>(x[ks], tile, warp * 16, ks * 16, g, c);
}

// Rows [row0, row0 + kTile) of two operands (a, row stride wa; b, row stride wb) staged through
// the shared tiles ta and tb into the warp's fragments fa and fb. Every thread takes part.
template <class TI, int HSP>
__device__ __forceinline__ void stage_two(uint32_t (&fa)[TileShape<HSP>::KS][4],
                                          uint32_t (&fb)[TileShape<HSP>::KS][4], TI* ta, TI* tb,
                                          const TI* a, int64_t wa, const TI* b, int64_t wb,
                                          int64_t row0, int64_t T, int64_t HS, bool vec,
                                          int warp, int g, int c) {
  load_tile<TI, HSP>(ta, a, wa, row0, T, HS, vec);
  load_tile<TI, HSP>(tb, b, wb, row0, T, HS, vec);
  __syncthreads();
  rows_as_fragments<TI, HSP>(fa, ta, warp, g, c);
  rows_as_fragments<TI, HSP>(fb, tb, warp, g, c);
  __syncthreads();  // before the tiles are reused
}

// Sum (or max) over the 4 lanes that hold one accumulator row.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  return v + __shfl_xor_sync(0xFFFFFFFFu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 2));
}

// The backward's recomputed probability p = exp(s scale - lse) and score gradient
// ds = p (dp - D) scale, rounded step by step as the CPU rounds them (no FMA): both backward
// kernels call these, so the dq and the dk/dv passes see the same p and ds.
__device__ __forceinline__ float recomputed_prob(float s, float scale, float lse) {
  return expf(__fsub_rn(__fmul_rn(s, scale), lse));
}
__device__ __forceinline__ float score_grad(float p, float dp, float D, float scale) {
  return __fmul_rn(__fmul_rn(p, __fsub_rn(dp, D)), scale);
}

// Stores a warp's 16 x HSP fp32 accumulators (rows row[0] and row[1] of this lane) into
// columns [off, off + HS) of rows (b T + row) of a (B, T, W) tensor, rows < T only.
template <int HSP>
__device__ __forceinline__ void store_rows(void* dst, DType dt, const float (&acc)[TileShape<HSP>::NB][4],
                                           const int64_t (&row)[2], const float (&div)[2],
                                           int64_t b, int64_t T, int64_t W, int64_t off,
                                           int64_t HS, int c, CastTally& tally) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= T) continue;
    const int64_t base = (b * T + row[r]) * W + off;
#pragma unroll
    for (int nb = 0; nb < TileShape<HSP>::NB; ++nb)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t e = nb * 8 + acc_col(c, j);
        if (e < HS) store_any_counted(dst, dt, base + e, acc[nb][2 * r + j] / div[r], tally);
      }
  }
}

// ---- forward: grid (B NH, query tiles), the longest rows first.
template <class TI, int HSP>
__global__ void __launch_bounds__(kThreads)
    flash_forward_kernel(const TI* __restrict__ qkv, void* out, DType out_dt,
                         float* __restrict__ lse, int64_t T, int64_t NH, int64_t HS, float scale,
                         bool vec, unsigned long long* counters) {
  using S = TileShape<HSP>;
  __shared__ __align__(16) TI sK[S::kElems];
  __shared__ __align__(16) TI sV[S::kElems];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int64_t bh = blockIdx.x, b = bh / NH, h = bh % NH;
  const int64_t qt = gridDim.y - 1 - blockIdx.y;
  const int64_t C = NH * HS, W = 3 * C, q0 = qt * kTile;
  const TI* base = qkv + b * T * W + h * HS;  // q at base, k at base + C, v at base + 2C

  // The warp's 16 query rows, staged through sK into registers.
  uint32_t qf[S::KS][4];
  load_tile<TI, HSP>(sK, base, W, q0, T, HS, vec);
  __syncthreads();
  rows_as_fragments<TI, HSP>(qf, sK, warp, g, c);
  __syncthreads();

  const int64_t row[2] = {q0 + warp * 16 + acc_row(g, 0), q0 + warp * 16 + acc_row(g, 2)};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this lane's partial sums
  float o[S::NB][4];
#pragma unroll
  for (int nb = 0; nb < S::NB; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;

  for (int64_t kt = 0; kt <= qt; ++kt) {
    load_tile<TI, HSP>(sK, base + C, W, kt * kTile, T, HS, vec);
    load_tile<TI, HSP>(sV, base + 2 * C, W, kt * kTile, T, HS, vec);
    __syncthreads();
    float s[kTileBlocks][4];
    product_with_rows<TI, HSP>(s, qf, sK, lane);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < kTileBlocks; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i >> 1;  // row[r] is this accumulator's row (acc_row)
        const int64_t col = kt * kTile + nb * 8 + acc_col(c, i);
        float v = __fmul_rn(s[nb][i], scale);  // rounded as the CPU and the backward round it
        if (col > row[r] || col >= T) v = -INFINITY;  // causal mask, padding
        s[nb][i] = v;
        mx[r] = fmaxf(mx[r], v);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float mn = fmaxf(m[r], quad_max(mx[r]));
      const float alpha = expf(m[r] - mn);  // 0 on the first tile (m = -inf)
      m[r] = mn;
      l[r] *= alpha;
#pragma unroll
      for (int nb = 0; nb < S::NB; ++nb) {
        o[nb][2 * r] *= alpha;
        o[nb][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nb = 0; nb < kTileBlocks; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = expf(s[nb][i] - m[i >> 1]);
        s[nb][i] = p;
        l[i >> 1] += p;
      }
    accumulate_with_cols<TI, HSP>(o, s, sV, lane);
    __syncthreads();  // before the next tiles overwrite sK and sV
  }

  l[0] = quad_sum(l[0]);
  l[1] = quad_sum(l[1]);
  if (c == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row[r] < T) lse[bh * T + row[r]] = m[r] + logf(l[r]);
  }
  CastTally tally;
  store_rows<HSP>(out, out_dt, o, row, l, b, T, C, h * HS, HS, c, tally);
  tally.flush(counters);
}

// ---- backward, query tiles: D = sum p dp (first pass over the key tiles), then dq (second
// pass). Grid (B NH, query tiles), the longest rows first.
template <class TI, int HSP>
__global__ void __launch_bounds__(kThreads)
    flash_backward_dq_kernel(const TI* __restrict__ qkv, const TI* __restrict__ dout,
                             const float* __restrict__ lse, float* __restrict__ Dsum, void* dqkv,
                             DType dt, int64_t T, int64_t NH, int64_t HS, float scale,
                             bool vec, unsigned long long* counters) {
  using S = TileShape<HSP>;
  __shared__ __align__(16) TI sK[S::kElems];
  __shared__ __align__(16) TI sV[S::kElems];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int64_t bh = blockIdx.x, b = bh / NH, h = bh % NH;
  const int64_t qt = gridDim.y - 1 - blockIdx.y;
  const int64_t C = NH * HS, W = 3 * C, q0 = qt * kTile;
  const TI* base = qkv + b * T * W + h * HS;
  const TI* gbase = dout + b * T * C + h * HS;

  uint32_t qf[S::KS][4], gf[S::KS][4];  // the warp's q and dout rows
  stage_two<TI, HSP>(qf, gf, sK, sV, base, W, gbase, C, q0, T, HS, vec, warp, g, c);

  const int64_t row[2] = {q0 + warp * 16 + acc_row(g, 0), q0 + warp * 16 + acc_row(g, 2)};
  float lr[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) lr[r] = row[r] < T ? lse[bh * T + row[r]] : 0.0f;

  float D[2] = {0.0f, 0.0f};
  float dq[S::NB][4];
#pragma unroll
  for (int nb = 0; nb < S::NB; ++nb) dq[nb][0] = dq[nb][1] = dq[nb][2] = dq[nb][3] = 0.0f;

  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t kt = 0; kt <= qt; ++kt) {
      load_tile<TI, HSP>(sK, base + C, W, kt * kTile, T, HS, vec);
      load_tile<TI, HSP>(sV, base + 2 * C, W, kt * kTile, T, HS, vec);
      __syncthreads();
      float s[kTileBlocks][4], dp[kTileBlocks][4];
      product_with_rows<TI, HSP>(s, qf, sK, lane);   // q.k^T
      product_with_rows<TI, HSP>(dp, gf, sV, lane);  // dout.v^T
#pragma unroll
      for (int nb = 0; nb < kTileBlocks; ++nb)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = i >> 1;
          const int64_t col = kt * kTile + nb * 8 + acc_col(c, i);
          const bool valid = col <= row[r] && col < T;
          const float p = valid ? recomputed_prob(s[nb][i], scale, lr[r]) : 0.0f;
          if (pass == 0) {
            D[r] = __fadd_rn(D[r], __fmul_rn(p, dp[nb][i]));  // as the CPU: no FMA
          } else {
            s[nb][i] = valid ? score_grad(p, dp[nb][i], D[r], scale) : 0.0f;
          }
        }
      if (pass == 1) accumulate_with_cols<TI, HSP>(dq, s, sK, lane);  // dq += ds~.k~
      __syncthreads();
    }
    if (pass == 0) {
      D[0] = quad_sum(D[0]);
      D[1] = quad_sum(D[1]);
    }
  }

  if (c == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row[r] < T) Dsum[bh * T + row[r]] = D[r];
  }
  const float one[2] = {1.0f, 1.0f};
  CastTally tally;
  store_rows<HSP>(dqkv, dt, dq, row, one, b, T, W, h * HS, HS, c, tally);
  tally.flush(counters);
}

// ---- backward, key tiles: dk and dv over the query tiles at and below the diagonal, with the
// products transposed (keys as rows). Grid (B NH, key tiles); key tile 0 meets every query tile,
// so the longest run first.
template <class TI, int HSP>
__global__ void __launch_bounds__(kThreads)
    flash_backward_dkv_kernel(const TI* __restrict__ qkv, const TI* __restrict__ dout,
                              const float* __restrict__ lse, const float* __restrict__ Dsum,
                              void* dqkv, DType dt, int64_t T, int64_t NH, int64_t HS,
                              float scale, bool vec, unsigned long long* counters) {
  using S = TileShape<HSP>;
  __shared__ __align__(16) TI sQ[S::kElems];
  __shared__ __align__(16) TI sG[S::kElems];
  __shared__ float sL[kTile], sD[kTile];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int64_t bh = blockIdx.x, b = bh / NH, h = bh % NH;
  const int64_t kt = blockIdx.y, nq = gridDim.y;
  const int64_t C = NH * HS, W = 3 * C, k0 = kt * kTile;
  const TI* base = qkv + b * T * W + h * HS;
  const TI* gbase = dout + b * T * C + h * HS;

  uint32_t kf[S::KS][4], vf[S::KS][4];  // the warp's k and v rows
  stage_two<TI, HSP>(kf, vf, sQ, sG, base + C, W, base + 2 * C, W, k0, T, HS, vec, warp,
                     g, c);

  const int64_t key[2] = {k0 + warp * 16 + acc_row(g, 0), k0 + warp * 16 + acc_row(g, 2)};
  float dk[S::NB][4], dv[S::NB][4];
#pragma unroll
  for (int nb = 0; nb < S::NB; ++nb)
#pragma unroll
    for (int i = 0; i < 4; ++i) dk[nb][i] = dv[nb][i] = 0.0f;

  for (int64_t qt = kt; qt < nq; ++qt) {
    load_tile<TI, HSP>(sQ, base, W, qt * kTile, T, HS, vec);
    load_tile<TI, HSP>(sG, gbase, C, qt * kTile, T, HS, vec);
    for (int i = threadIdx.x; i < kTile; i += kThreads) {
      const int64_t t = qt * kTile + i;
      sL[i] = t < T ? lse[bh * T + t] : 0.0f;
      sD[i] = t < T ? Dsum[bh * T + t] : 0.0f;
    }
    __syncthreads();
    float st[kTileBlocks][4], dpt[kTileBlocks][4];
    product_with_rows<TI, HSP>(st, kf, sQ, lane);   // (q.k^T)^T
    product_with_rows<TI, HSP>(dpt, vf, sG, lane);  // (dout.v^T)^T
#pragma unroll
    for (int nb = 0; nb < kTileBlocks; ++nb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i >> 1, ql = nb * 8 + acc_col(c, i);
        const int64_t q = qt * kTile + ql;
        const bool valid = q >= key[r] && q < T && key[r] < T;
        const float p = valid ? recomputed_prob(st[nb][i], scale, sL[ql]) : 0.0f;
        dpt[nb][i] = valid ? score_grad(p, dpt[nb][i], sD[ql], scale) : 0.0f;
        st[nb][i] = p;
      }
    accumulate_with_cols<TI, HSP>(dv, st, sG, lane);   // dv += p~^T.dout~
    accumulate_with_cols<TI, HSP>(dk, dpt, sQ, lane);  // dk += ds~^T.q~
    __syncthreads();
  }

  const float one[2] = {1.0f, 1.0f};
  CastTally tally;
  store_rows<HSP>(dqkv, dt, dk, key, one, b, T, W, C + h * HS, HS, c, tally);
  store_rows<HSP>(dqkv, dt, dv, key, one, b, T, W, 2 * C + h * HS, HS, c, tally);
  tally.flush(counters);
}

dim3 flash_grid(const FlashDims& d) {
  const int64_t bh = d.B * d.NH;
  if (bh > 0x7FFFFFFF) throw RuntimeError("attention: too many (batch, head) pairs");
  return dim3(static_cast<unsigned>(bh), static_cast<unsigned>(flash_tiles(d.T)));
}

// Calls fn with the operand storage type (tag) and the head tile (an integral constant).
template <class F>
void dispatch_flash(DType operand, int64_t HS, const char* what, F&& fn) {
  auto by_head = [&](auto tag) {
    switch (flash_head_tile(HS)) {
      case 32: fn(tag, std::integral_constant<int, 32>{}); return;
      case 64: fn(tag, std::integral_constant<int, 64>{}); return;
      default: fn(tag, std::integral_constant<int, 128>{}); return;
    }
  };
  if (operand == DType::bf16) by_head(__nv_bfloat16{});
  else if (operand == DType::f16) by_head(__half{});
  else throw RuntimeError(std::string(what) + ": the fused kernels take fp16 or bf16 operands");
}

}  // namespace

void flash_attention_forward(Context& ctx, Tensor out, Tensor lse, Tensor qkv,
                             const FlashDims& d) {
  if (d.B * d.T == 0) return;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.HS));
  const dim3 grid = flash_grid(d);
  unsigned long long* counters = ctx.cast_counters(TensorClass::activation);
  dispatch_flash(qkv.dtype, d.HS, "attention_forward", [&](auto tag, auto hsp) {
    using TI = decltype(tag);
    flash_forward_kernel<TI, decltype(hsp)::value><<<grid, kThreads, 0, ctx.stream()>>>(
        static_cast<const TI*>(qkv.data), out.data, out.dtype, static_cast<float*>(lse.data),
        d.T, d.NH, d.HS, scale, flash_vector_loads(d.HS, {qkv.data}), counters);
  });
  MPT_LAUNCH_CHECK(ctx, "attention_forward: fused kernel");
}

void flash_attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse,
                              const FlashDims& d) {
  if (d.B * d.T == 0) return;
  if (dout.dtype != qkv.dtype)
    throw RuntimeError("attention_backward: the fused kernels take dout in qkv's dtype");
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.HS));
  const dim3 grid = flash_grid(d);
  unsigned long long* counters = ctx.cast_counters(TensorClass::gradient);
  float* Dsum =
      static_cast<float*>(ctx.scratch(Scratch::kAttDelta, flash_backward_scratch(d.B, d.NH, d.T)));
  dispatch_flash(qkv.dtype, d.HS, "attention_backward", [&](auto tag, auto hsp) {
    using TI = decltype(tag);
    constexpr int HSP = decltype(hsp)::value;
    const TI* x = static_cast<const TI*>(qkv.data);
    const TI* g = static_cast<const TI*>(dout.data);
    const float* l = static_cast<const float*>(lse.data);
    const bool vec = flash_vector_loads(d.HS, {qkv.data, dout.data});
    flash_backward_dq_kernel<TI, HSP><<<grid, kThreads, 0, ctx.stream()>>>(
        x, g, l, Dsum, dqkv.data, dqkv.dtype, d.T, d.NH, d.HS, scale, vec, counters);
    MPT_LAUNCH_CHECK(ctx, "attention_backward: fused dq kernel");
    flash_backward_dkv_kernel<TI, HSP><<<grid, kThreads, 0, ctx.stream()>>>(
        x, g, l, Dsum, dqkv.data, dqkv.dtype, d.T, d.NH, d.HS, scale, vec, counters);
    MPT_LAUNCH_CHECK(ctx, "attention_backward: fused dk, dv kernel");
  });
}

}  // namespace mpt::cuda
