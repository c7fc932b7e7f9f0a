// The host-side decisions of the CUDA matmuls, as pure functions (plain C++, no CUDA headers), so
// that tests check them without a GPU: which cuBLASLt GEMM (column-major m, n, k, transposes,
// leading dimensions, operand types, compute type) each of matmul_forward's and
// matmul_backward's products maps to under each precision, which operands need an fp8 or
// transposed copy, where the bias goes, the algorithm cache's key, and pointer alignments.
//
// Row-major to column-major (cuda-crib.md §1): a row-major (R, C) buffer is the column-major
// C x R matrix with leading dimension C. With W (OC, C), x (N, C), dy (N, OC):
//   forward  y(N,OC)  = x . W^T     -> D (OC x N):  A = W  (op T), B = x  (op N)   "TN"
//   dgrad    dx(N,C)  = dy . W      -> D (C x N):   A = W  (op N), B = dy (op N)   "NN"
//   wgrad    dW(OC,C) += dy^T . x   -> D (C x OC):  A = x  (op N), B = dy (op T)   "NT"
// Hopper's fp8 GEMMs take only TN (both operands contiguous along k, cuda-crib.md §3), so under
// fp8 dgrad reads a transposed copy W^T (C, OC) and wgrad transposed copies x^T (C, N) and
// dy^T (OC, N); the gradient (e5m2 in the hybrid recipe) is always in the B slot.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>

#include "backend/backend.h"

namespace mpt::cuda {

// Element types of GEMM operands (mapped to cudaDataType_t in matmul.cu).
enum class GemmType : uint8_t { f32, f16, bf16, e4m3, e5m2 };
// CUBLAS_COMPUTE_32F or CUBLAS_COMPUTE_32F_FAST_TF32.
enum class GemmCompute : uint8_t { f32, f32_fast_tf32 };
// CUBLASLT_EPILOGUE_DEFAULT, _BIAS, _GELU_AUX, _GELU_AUX_BIAS (D = gelu(product + bias), the
// pre-activation written to an aux buffer), _DGELU (D = product * gelu'(aux)) or _BGRADB (the
// column sums of op(B) over k written to the bias pointer).
enum class GemmEpilogue : uint8_t { none, bias, gelu_aux, gelu_aux_bias, dgelu, bgradb };
const char* gemm_epilogue_name(GemmEpilogue e);  // "BIAS", "GELU_AUX", ...; "" for none

enum class MatmulOp : uint8_t { forward, dgrad, wgrad };
// The op-level operands a GEMM slot reads.
enum class MatmulOperand : uint8_t { inp, weight, dout };

const char* gemm_type_name(GemmType t);
GemmType gemm_type_of(DType d);  // f32, f16, bf16, e4m3, e5m2; throws for i32
size_t gemm_type_size(GemmType t);

// One operand slot (A or B) of a GEMM.
struct GemmOperand {
  MatmulOperand source = MatmulOperand::inp;
  GemmType type = GemmType::f32;
  // The buffer the slot reads: the tensor itself (neither flag), a copy of it in `type` (an fp8
  // quantisation, or an fp32 widening when the two operands' dtypes differ), or a transposed
  // copy (fp8 only; implies `copy`).
  bool copy = false;
  bool transposed_copy = false;
  bool trans = false;  // op T in the cuBLASLt descriptor
  int64_t rows = 0, cols = 0, ld = 0;  // the layout as stored (column-major)
};

// One cuBLASLt GEMM: D (m x n, ld ldd) = alpha op(A) op(B) + beta C, with C = D; `batch` > 1:
// that many GEMMs, the i-th reading A + i stride_a, B + i stride_b and writing D + i stride_d
// (elements; cuBLASLt's strided batch layout attributes).
struct GemmPlan {
  MatmulOp op = MatmulOp::forward;
  int64_t m = 0, n = 0, k = 0;
  GemmOperand a, b;
  // fp32 as planned (matmul.cu: counted stores); the matmuls set bf16 where they write a bf16
  // output directly (GemmOut::direct).
  GemmType d_type = GemmType::f32;
  int64_t ldd = 0;
  GemmCompute compute = GemmCompute::f32;
  bool fp8 = false;     // A and B scale pointers (scale_inv) are set
  float beta = 0.0f;    // wgrad accumulates (1), the others write (0)
  float alpha = 1.0f;   // attention's scores fold their scale in here
  int32_t batch = 1;
  int64_t stride_a = 0, stride_b = 0, stride_d = 0;
};

// The GEMM for `op` (N rows, C input channels, OC output channels) with operand dtypes
// `inp`, `weight`, `dout` (the ones the op reads) under `spec`'s precision and fp8 formats.
// Throws RuntimeError for combinations no GEMM computes: e5m2 x e5m2, an fp8 format other than
// e4m3/e5m2, non-float dtypes but an fp8 spec's inp of dtype spec.inp.format (stored quantised:
// the forward reads it in place, b.copy false).
GemmPlan plan_matmul(MatmulOp op, int64_t N, int64_t C, int64_t OC, DType inp, DType weight,
                     DType dout, const MatmulSpec& spec);

// The types of an operand pair read natively (not fp8): the stored type when both are the same
// fp16/bf16 (products exact on Tensor Cores), else fp32 (a narrow one widened into a copy:
// exact, and fp32 products of fp16/bf16 values are exact too).
GemmType native_pair_type(DType a, DType b);
// tf32 rounding only applies to fp32 tensors (cuBLASLt's FAST_TF32 is valid only with fp32 A,
// B and C); fp16/bf16 values are already tf32 values.
GemmCompute compute_type(MatmulPrecision prec, GemmType operand_type);

// Where the forward's bias is added: by the GEMM's BIAS epilogue (when D is written directly in
// fp32 and the bias dtype is one cuBLASLt takes for these operand types, and its pointer is
// 16-byte aligned: no preference covers it and a misaligned bias faults), or by the kernel that
// stores the output. out_direct: the GEMM writes `out` itself (out is fp32).
enum class BiasPath : uint8_t { none, epilogue, store_kernel };
BiasPath bias_path(bool has_bias, bool out_direct, bool fp8, DType bias, uintptr_t bias_ptr);

// How a GEMM's bf16 output is made, from MPT_GEMM_OUT (read at each call, as the workspace
// prediction reads it too):
//  - staged (unset, empty or "staged"): the GEMM writes fp32 into scratch, and the kernel that
//    rounds it into the output counts each cast on the fp32 value, as the CPU does (matmul.cu);
//  - direct ("direct"): the GEMM writes bf16 itself (its BIAS epilogue adds a bias before the
//    rounding), and the kernel that then reads the output counts from the stored value: an
//    infinity as an overflow, no underflows. bf16 has fp32's exponent range, so the counts
//    differ from the staged ones only at the two ends of fp32's range: a finite fp32 result
//    above bf16's largest value that rounds down to it (less than half a bf16 unit above it:
//    counted there, not here), one that was already infinite (counted here, not there), and an
//    fp32 subnormal of at most 2^-134 that rounds to zero (counted there, not here). The values
//    are the staged ones up to the GEMM's summation order: cuBLASLt may pick another algorithm
//    for a bf16 D (never one that adds split-K partials in bf16: gemm.cpp), and rounds to
//    nearest even as our store does (test_cuda_matmul reports the bits that differ; a NaN's
//    bits are cuBLASLt's). The GEMM then writes 2 bytes per element instead of 4, the pass
//    after it (the fused store, the classifier's first pass over the logits) reads 2 instead of
//    4, a plain output's count is a pass of its own (4 bytes in all instead of 10), and no fp32
//    buffer is needed (bench/results: the staging is the largest cost above a bf16 step's
//    floor). A GEMM cuBLASLt refuses falls back to the
//    staged path (remembered per key), whose fp32 buffer the workspace prediction then lacks
//    (the run's memory record shows it).
// Only GEMMs of bf16 x bf16 or fp8 operands write bf16 (cuBLASLt has no fp32-operand GEMM with a
// bf16 D); fp16 outputs are always staged: their underflows (below 2^-25) are common and cannot
// be seen in the rounded value. Other values of MPT_GEMM_OUT throw RuntimeError naming it.
enum class GemmOut : uint8_t { staged, direct };
const char* gemm_out_name(GemmOut m);  // "staged", "direct"
GemmOut gemm_out_for(const char* env);  // env: MPT_GEMM_OUT's value, null when unset
GemmOut gemm_out();                     // this process's MPT_GEMM_OUT
// Whether cuBLASLt's epilogues may run: not when MPT_LT_EPILOGUES is "0" (the Context reads it
// once; the workspace prediction at each call).
bool lt_epilogues_enabled();
// Whether GEMM `p` writes an `out` of this dtype itself under `mode`: bf16 under GemmOut::direct,
// when p reads bf16 x bf16 or fp8 operands and there is no bias or cuBLASLt's BIAS epilogue can
// add it (epilogues on, `lt_epilogues`; a bf16 bias, the type cuBLASLt takes for bf16 D with
// bf16 or fp8 operands, cuda-crib.md §2; 16-byte aligned, as bias_path asks). Otherwise the
// output is staged (a bias of another dtype, or with the epilogues off, is added by the store
// kernel). The matmuls and the workspace prediction both ask this.
bool gemm_writes_output(const GemmPlan& p, DType out, GemmOut mode, bool has_bias, DType bias,
                        uintptr_t bias_ptr, bool lt_epilogues);
// What a run records of its GEMMs' outputs (the start record's gemm_output, docs/metrics.md),
// by gemm_writes_output's rule for the model's GEMMs (biases in the weights' dtype):
// "fp32" (fp32 activations: nothing is rounded); under GemmOut::direct with bf16 activations,
// "direct" (bf16 weights and cuBLASLt's epilogues on: every bf16 output), "partly direct" (fp8
// GEMMs with other weights, or the epilogues off: the outputs without a bias only, the input
// gradients and the logits); else "staged".
const char* gemm_output_kind(DType activation, DType param, MatmulPrecision matmul, GemmOut mode,
                             bool lt_epilogues);

// Where matmul_gelu_forward's GELU, or matmul_backward_gelu's GELU derivative, is applied:
//  - epilogue: by cuBLASLt (GELU_AUX[_BIAS] / DGELU), when the GEMM writes the result directly:
//    fp32, the aux tensor (the pre-activation) fp32 too (its type is D's), its leading dimension
//    (D's) divisible by 8 and its pointer 16-byte aligned (cuda-crib.md §2), not under fp8 (an
//    fp8 GEMM's GELU aux and DGELU are not what its tables promise), and in the forward with a
//    bias only where bias_path would put the bias in the epilogue too (it must be added before
//    the GELU). Only for tf32 GEMMs: cuBLASLt does not document its GELU's accuracy, and should
//    it take the hardware tanh (tanh.approx.f32, relative error up to 2^-10.987: PTX ISA) that
//    is tf32's own operand precision (2^-11) but well below fp32's; the fp32 policy keeps the
//    exact GELU kernel.
//  - store_kernel: by the counting kernel that rounds the GEMM's fp32 result into a 16-bit
//    output (matmul.cu): the rounded value is what the GELU (derivative) is applied to, as the
//    separate ops do. Forward: pre and out of the same 16-bit dtype.
//  - separate: otherwise, by the separate GELU kernel after the matmul.
// The GEMM may still have no algorithm for an epilogue (cuBLASLt's heuristic finds none): the
// matmul then runs the separate path (remembered per key).
enum class GeluPath : uint8_t { epilogue, store_kernel, separate };
// `p`: the forward's (or the dgrad's) GemmPlan.
GeluPath gelu_forward_path(const GemmPlan& p, DType pre, DType out, uintptr_t pre_ptr,
                           bool has_bias, DType bias, uintptr_t bias_ptr);
GeluPath gelu_backward_path(const GemmPlan& p, DType dinp, DType pre, uintptr_t pre_ptr);

// Whether matmul_residual_forward's add joins the kernel that stores the product: a 16-bit
// output (staged in fp32, then rounded by that kernel) and a residual of its dtype. Else the
// residual kernel follows the matmul, in place.
bool residual_in_store(DType out, DType residual);

// Whether matmul_backward's bias gradient comes from the wgrad GEMM's BGRADB epilogue (dout is
// its B operand, reduced over k = N: the column sums), into fp32 scratch that a small kernel adds
// to dbias. Only where the GEMM reads dout as stored: not under fp8 (B is dout quantised) nor
// tf32 (the GEMM may reduce B's tf32 roundings), as the contract sums dout as stored. Elsewhere,
// and where cuBLASLt has no algorithm for it, the two-pass column-sum kernels of matmul.cu.
bool dbias_in_epilogue(const GemmPlan& wgrad);

// The launch of matmul.cu's store kernel over a row-major (rows, cols) output. Each thread
// takes `vec` consecutive columns (4: one 16-byte load of the fp32 product and one 4-element
// store, when cols is a multiple of 4 and `aligned`, i.e. the pointers allow it; else 1) of rows
// blockIdx.y, blockIdx.y + grid_y, ...; the fewest blocks of at most 256 threads (a multiple of
// 32) along x cover the columns, evenly. The column index comes without a division (the former
// grid-stride loop took a 64-bit `i % cols` per element to find a bias).
struct StoreLaunch {
  int vec = 1;
  unsigned threads = 32, grid_x = 1, grid_y = 1;
};
StoreLaunch store_launch(int64_t rows, int64_t cols, bool aligned);

// The launch of matmul.cu's fp8 quantise kernels over a row-major (rows, cols) operand, written
// row-major and/or transposed.
//  - The strip kernel (strip = true): blocks of kQuantiseThreads threads, each a strip of
//    kQuantiseCols columns by kDbiasRows rows (workspace_plan.h), taken in sub-tiles of
//    kQuantiseSubRows rows. Each thread loads 16 bytes at a time (`vec` elements: 8 of fp16 or
//    bf16, 4 of fp32) and stores its fp8 values as one `vec`-byte word; a transposed copy leaves
//    through shared memory, 16 bytes per thread. Beside the casts it can sum the operand's
//    columns as stored, in chunks of kDbiasRows rows (one per block row: grid_y is
//    dbias_chunks(rows)), the partial sums of matmul_backward's bias gradient, which then needs
//    no pass of its own over dout. It needs cols a multiple of vec, a 16-byte-aligned operand
//    and outputs (`x_align`, `out_align`: pointer_alignment of the operand's address and the
//    least of its copies'), and, for a transposed copy, rows a multiple of 16 (each thread
//    writes 16 rows of a column); fp8 GEMMs' shapes and our scratch meet that.
//  - Otherwise the element kernel (32 x 32 tiles, one element per thread and load, no column
//    sums): grid (ceil(cols / 32), ceil(rows / 32)).
// Throws RuntimeError where the grid would exceed 65535 blocks along y.
constexpr int kQuantiseThreads = 256, kQuantiseCols = 64, kQuantiseSubRows = 64;
struct QuantiseLaunch {
  bool strip = false;
  int vec = 1;
  unsigned grid_x = 0, grid_y = 0;
};
QuantiseLaunch quantise_launch(int64_t rows, int64_t cols, size_t elem_bytes, uint32_t x_align,
                               uint32_t out_align, bool transposed);

// The strip kernel's element maps, for V-element loads (the kernel calls these; the tests check
// on the host that they cover a strip once). Thread t's load p of a sub-tile reads V elements
// of row load_row(t, p) from column load_col(t) on; its transposed write takes column
// tr_col(t) of the sub-tile, rows tr_row(t) .. tr_row(t) + 15 (warp w: columns (w % 2) * 32 +
// lane, rows (w / 2) * 16: 8 warps cover 64 x 64).
template <int V>
struct QuantiseStrip {
  static_assert(V == 4 || V == 8, "16-byte loads of fp32 or of 16-bit elements");
  static constexpr int kLanesPerRow = kQuantiseCols / V;
  static constexpr int kRowsPerPass = kQuantiseThreads / kLanesPerRow;
  static constexpr int kPasses = kQuantiseSubRows / kRowsPerPass;
  static constexpr int load_row(int t, int p) { return p * kRowsPerPass + t / kLanesPerRow; }
  static constexpr int load_col(int t) { return (t % kLanesPerRow) * V; }
  static constexpr int tr_col(int t) { return ((t >> 5) & 1) * 32 + (t & 31); }
  static constexpr int tr_row(int t) { return (t >> 6) * 16; }
  static_assert(kQuantiseThreads == 256 && kQuantiseCols == 64 && kQuantiseSubRows == 64,
                "tr_col/tr_row assume 8 warps over a 64 x 64 sub-tile");
};

// The largest power of two (at most 256) dividing the address: cuBLASLt's
// MIN_ALIGNMENT_*_BYTES preferences default to 256 and must not exceed the real alignment.
uint32_t pointer_alignment(uintptr_t p);
// The alignment a strided-batched operand guarantees: that of its base and of every later
// batch's start (base + i * stride elements), since the MIN_ALIGNMENT preferences that take
// the result do not say whether cuBLASLt checks more than the base. A single GEMM's (batch 1)
// is its base pointer's.
uint32_t operand_alignment(uintptr_t base, int32_t batch, int64_t stride, GemmType t);

// The algorithm cache's key: everything the heuristic's choice depends on.
struct GemmKey {
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldd = 0;
  int32_t batch = 1;
  int64_t stride_a = 0, stride_b = 0, stride_d = 0;
  GemmType a_type = GemmType::f32, b_type = GemmType::f32, d_type = GemmType::f32;
  GemmCompute compute = GemmCompute::f32;
  bool trans_a = false, trans_b = false, fp8 = false;
  GemmEpilogue epilogue = GemmEpilogue::none;
  uint32_t align_a = 0, align_b = 0, align_d = 0;
  // The epilogues' bias and aux pointers: like A's, B's and D's, their values set the alignment
  // the heuristic assumes (0: no such pointer).
  uint32_t align_bias = 0, align_aux = 0;
  // BIAS_DATA_TYPE, which changes what the heuristic may return (only with a bias pointer).
  GemmType bias_type = GemmType::f32;
  bool operator==(const GemmKey& o) const;
  bool operator!=(const GemmKey& o) const { return !(*this == o); }
  std::string str() const;  // for error messages
};
struct GemmKeyHash {
  size_t operator()(const GemmKey& k) const;
};
GemmKey gemm_key(const GemmPlan& p, GemmEpilogue epi, uint32_t align_a, uint32_t align_b,
                 uint32_t align_d, uint32_t align_bias = 0, uint32_t align_aux = 0,
                 GemmType bias_type = GemmType::f32);

// A chosen algorithm: cuBLASLt's cublasLtMatmulAlgo_t (64 opaque bytes) and its workspace.
// `supported` false records that the heuristic found nothing (asked once per key: the forward
// then adds its bias outside the GEMM instead of through the epilogue).
struct CachedAlgo {
  std::array<uint64_t, 8> algo{};
  size_t workspace = 0;
  bool supported = true;
};
using GemmAlgoCache = std::unordered_map<GemmKey, CachedAlgo, GemmKeyHash>;

// Bytes of an fp8 (or widened) operand copy: elements times the type's size, rounded up to 256
// so that several copies packed in one scratch buffer stay aligned.
size_t operand_copy_bytes(int64_t elements, GemmType t);

}  // namespace mpt::cuda
