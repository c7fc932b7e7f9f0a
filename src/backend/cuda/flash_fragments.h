// Where the fused attention kernels (flash_attention.cu) find the elements of their Tensor Core
// fragments: mma.sync.aligned.m16n8k16 with 16-bit operands and fp32 accumulators (PTX ISA,
// "Matrix fragments for mma.m16n8k16 with floating point type"). Plain C++ usable on the host
// too, so that tests check these index formulas against the PTX tables without a GPU
// (tests/test_cuda.cpp, FlashFragments.*). The kernels call frag_a, the ldsm_* address
// formulas and the accumulator maps; frag_b_rows/frag_b_cols are the per-element statement of
// the B fragments the ldmatrix loads are checked against.
//
// For lane l of a warp let g = l / 4 and c = l % 4; a 32-bit register holds two 16-bit
// elements, the lower index in the lower half:
//   A (16 x 16):  a[0] = A[g][2c, 2c+1]    a[1] = A[g+8][2c, 2c+1]
//                 a[2] = A[g][2c+8, 2c+9]  a[3] = A[g+8][2c+8, 2c+9]
//   B (16 x 8):   b0 = B[2c, 2c+1][g]      b1 = B[2c+8, 2c+9][g]
//   C, D (16 x 8, fp32): d[0], d[1] = D[g][2c, 2c+1]   d[2], d[3] = D[g+8][2c, 2c+1]
// Tiles are row-major in shared memory with row stride LD (even), 16-bit elements.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MPT_HD __host__ __device__ __forceinline__
#else
#define MPT_HD inline
#endif

namespace mpt::cuda::flash {

template <class E>
MPT_HD uint32_t bits16(E x) {
  static_assert(sizeof(E) == 2, "16-bit elements");
  unsigned short u;
  memcpy(&u, &x, sizeof u);
  return u;
}
template <class E>
MPT_HD uint32_t pack_raw(E lo, E hi) {
  return bits16(lo) | (bits16(hi) << 16);
}
// Two consecutive elements of a row as one register (4-byte aligned: LD and the column even).
template <class E>
MPT_HD uint32_t word(const E* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);  // one 32-bit shared-memory load
#else
  uint32_t w;
  memcpy(&w, p, sizeof w);
  return w;
#endif
}

// The A fragment of rows [r0, r0 + 16) and columns [k0, k0 + 16) of a tile.
template <class E, int LD>
MPT_HD void frag_a(uint32_t (&a)[4], const E* t, int r0, int k0, int g, int c) {
  a[0] = word(t + (r0 + g) * LD + k0 + 2 * c);
  a[1] = word(t + (r0 + g + 8) * LD + k0 + 2 * c);
  a[2] = word(t + (r0 + g) * LD + k0 + 2 * c + 8);
  a[3] = word(t + (r0 + g + 8) * LD + k0 + 2 * c + 8);
}
// The B fragment B[k][n] = t[n0 + n][k0 + k]: the tile's rows are B's columns (products with the
// tile transposed: q.k^T, dout.v^T, k.q^T, v.dout^T).
template <class E, int LD>
MPT_HD void frag_b_rows(uint32_t& b0, uint32_t& b1, const E* t, int n0, int k0, int g, int c) {
  b0 = word(t + (n0 + g) * LD + k0 + 2 * c);
  b1 = word(t + (n0 + g) * LD + k0 + 2 * c + 8);
}
// The B fragment B[k][n] = t[k0 + k][n0 + n] (products with the tile as it is: p.v, ds.k,
// p^T.dout, ds^T.q).
template <class E, int LD>
MPT_HD void frag_b_cols(uint32_t& b0, uint32_t& b1, const E* t, int k0, int n0, int g, int c) {
  b0 = pack_raw(t[(k0 + 2 * c) * LD + n0 + g], t[(k0 + 2 * c + 1) * LD + n0 + g]);
  b1 = pack_raw(t[(k0 + 2 * c + 8) * LD + n0 + g], t[(k0 + 2 * c + 9) * LD + n0 + g]);
}

// ---- the same B fragments, two 8-column blocks at a time, by ldmatrix.sync.aligned.m8n8.x4
// (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): lanes 8i..8i+7 give the addresses of
// the 8 rows (8 consecutive 16-bit elements, 16-byte aligned) of matrix i, and register i of lane
// l receives elements (l / 4, 2 (l % 4) and 2 (l % 4) + 1) of matrix i, or with .trans elements
// (2 (l % 4) and 2 (l % 4) + 1, l / 4), i.e. of its transpose. The kernels issue one ldmatrix
// where frag_b_rows/frag_b_cols would issue four (or eight) shared-memory loads per pair of
// fragments; the formulas below say which tile row and column each lane points at, so that
// registers 0, 1 are (b0, b1) of block n0 and registers 2, 3 those of block n0 + 8.
//
// frag_b_rows for blocks n0, n0 + 8 (no .trans): matrix i covers tile rows n0 + 8 (i / 2) ..
// + 7 and columns k0 + 8 (i % 2) .. + 7.
MPT_HD int ldsm_rows_row(int lane, int n0) { return n0 + (lane & 7) + 8 * (lane >> 4); }
MPT_HD int ldsm_rows_col(int lane, int k0) { return k0 + 8 * ((lane >> 3) & 1); }
// frag_b_cols for blocks n0, n0 + 8 (.trans): matrix i covers tile rows k0 + 8 (i % 2) .. + 7
// and columns n0 + 8 (i / 2) .. + 7.
MPT_HD int ldsm_cols_row(int lane, int k0) { return k0 + (lane & 15); }
MPT_HD int ldsm_cols_col(int lane, int n0) { return n0 + 8 * (lane >> 4); }

// The A fragment of a 16 x 16 block from the accumulators of its two 8-column halves, lo
// (columns 0-7) and hi (8-15): element h of register r is accumulator acc_index(r, h) of half
// acc_half(r). From the tables above, the C rows g, g + 8 and columns 2c, 2c + 1 of a half are
// the A fragment's rows and columns, the hi half offset by 8 columns.
MPT_HD constexpr int acc_half(int r) { return r >> 1; }
MPT_HD constexpr int acc_index(int r, int h) { return 2 * (r & 1) + h; }

// Row and column of accumulator i (0-3) of an 8-column block, for lane quad coordinates g, c.
MPT_HD int acc_row(int g, int i) { return g + 8 * (i >> 1); }
MPT_HD int acc_col(int c, int i) { return 2 * c + (i & 1); }

}  // namespace mpt::cuda::flash

#undef MPT_HD
