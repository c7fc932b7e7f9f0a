// cuBLASLt GEMMs from GemmPlans (gemm.h).
#include "backend/cuda/gemm.h"

#include <cublasLt.h>

#include <cstring>
#include <string>

#include "backend/cuda/cuda_check.h"

namespace mpt::cuda {
namespace {

static_assert(sizeof(cublasLtMatmulAlgo_t) == sizeof(CachedAlgo::algo),
              "CachedAlgo must hold a cublasLtMatmulAlgo_t");

cudaDataType_t cuda_type(GemmType t) {
  switch (t) {
    case GemmType::f32: return CUDA_R_32F;
    case GemmType::f16: return CUDA_R_16F;
    case GemmType::bf16: return CUDA_R_16BF;
    case GemmType::e4m3: return CUDA_R_8F_E4M3;
    case GemmType::e5m2: return CUDA_R_8F_E5M2;
  }
  return CUDA_R_32F;
}

cublasLtEpilogue_t lt_epilogue(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::none: return CUBLASLT_EPILOGUE_DEFAULT;
    case GemmEpilogue::bias: return CUBLASLT_EPILOGUE_BIAS;
    case GemmEpilogue::gelu_aux: return CUBLASLT_EPILOGUE_GELU_AUX;
    case GemmEpilogue::gelu_aux_bias: return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case GemmEpilogue::dgelu: return CUBLASLT_EPILOGUE_DGELU;
    case GemmEpilogue::bgradb: return CUBLASLT_EPILOGUE_BGRADB;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

// RAII for cuBLASLt descriptors (destroyed on every path, errors included).
struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

}  // namespace

bool run_gemm(Context& ctx, const GemmPlan& p, const GemmArgs& g, const char* what,
              bool may_fail) {
  const GemmEpilogue epi = g.epilogue;
  const bool wants_bias = epi == GemmEpilogue::bias || epi == GemmEpilogue::gelu_aux_bias ||
                          epi == GemmEpilogue::bgradb;  // BGRADB writes through the pointer
  const bool wants_aux = epi == GemmEpilogue::gelu_aux || epi == GemmEpilogue::gelu_aux_bias ||
                         epi == GemmEpilogue::dgelu;
  // Batched GEMMs take no bias or aux vector here (they would need per-batch strides).
  if (wants_bias != (g.bias != nullptr) || wants_aux != (g.aux != nullptr) ||
      ((wants_aux || wants_bias) && p.batch > 1))
    throw RuntimeError(std::string("matmul (") + what + "): epilogue '" +
                       gemm_epilogue_name(epi) + "' given " + (g.bias ? "a" : "no") +
                       " bias and " + (g.aux ? "an" : "no") + " aux pointer" +
                       (p.batch > 1 ? " in a batched GEMM" : ""));
  // A GEMM with no output element, or one that adds an empty product to D, does nothing:
  // cuBLASLt's behaviour for zero dimensions is not documented (its layouts want ld >= rows, and
  // an fp8 wgrad of no rows has ld 0), so it is not asked. (m = 0 still has a BGRADB epilogue's
  // n column sums to write.)
  if (p.n == 0 || p.batch == 0 || (p.m == 0 && epi != GemmEpilogue::bgradb) ||
      (p.k == 0 && p.beta == 1.0f && epi == GemmEpilogue::none))
    return true;
  const GemmKey key = gemm_key(
      p, epi, operand_alignment(reinterpret_cast<uintptr_t>(g.a), p.batch, p.stride_a, p.a.type),
      operand_alignment(reinterpret_cast<uintptr_t>(g.b), p.batch, p.stride_b, p.b.type),
      operand_alignment(reinterpret_cast<uintptr_t>(g.d), p.batch, p.stride_d, p.d_type),
      wants_bias ? pointer_alignment(reinterpret_cast<uintptr_t>(g.bias)) : 0,
      wants_aux ? pointer_alignment(reinterpret_cast<uintptr_t>(g.aux)) : 0,
      gemm_type_of(g.bias_dtype));
  LtDescs ds;
  const cublasComputeType_t compute =
      p.compute == GemmCompute::f32_fast_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  MPT_CUDA_CHECK(cublasLtMatmulDescCreate(&ds.op, compute, CUDA_R_32F));
  const int32_t ta = p.a.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t tb = p.b.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  MPT_CUDA_CHECK(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  MPT_CUDA_CHECK(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  if (epi != GemmEpilogue::none) {
    const uint32_t e = lt_epilogue(epi);
    MPT_CUDA_CHECK(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof e));
  }
  if (wants_aux) {
    // Before the heuristic: the aux pointer's value sets the alignment it assumes.
    MPT_CUDA_CHECK(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                                  &g.aux, sizeof g.aux));
    const int64_t aux_ld = p.ldd;
    MPT_CUDA_CHECK(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                                                  &aux_ld, sizeof aux_ld));
  }
  if (wants_bias) {
    MPT_CUDA_CHECK(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias,
                                                  sizeof g.bias));
    const int32_t bt = cuda_type(gemm_type_of(g.bias_dtype));
    MPT_CUDA_CHECK(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt,
                                                  sizeof bt));
  }
  if (p.fp8) {
    MPT_CUDA_CHECK(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                  &g.scale_a, sizeof g.scale_a));
    MPT_CUDA_CHECK(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                  &g.scale_b, sizeof g.scale_b));
  }
  MPT_CUDA_CHECK(cublasLtMatrixLayoutCreate(&ds.a, cuda_type(p.a.type), p.a.rows, p.a.cols, p.a.ld));
  MPT_CUDA_CHECK(cublasLtMatrixLayoutCreate(&ds.b, cuda_type(p.b.type), p.b.rows, p.b.cols, p.b.ld));
  MPT_CUDA_CHECK(cublasLtMatrixLayoutCreate(&ds.d, cuda_type(p.d_type), p.m, p.n, p.ldd));
  if (p.batch > 1) {
    const int32_t count = p.batch;
    const int64_t strides[3] = {p.stride_a, p.stride_b, p.stride_d};
    cublasLtMatrixLayout_t layouts[3] = {ds.a, ds.b, ds.d};
    for (int i = 0; i < 3; ++i) {
      MPT_CUDA_CHECK(cublasLtMatrixLayoutSetAttribute(
          layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
      MPT_CUDA_CHECK(cublasLtMatrixLayoutSetAttribute(
          layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i], sizeof strides[i]));
    }
  }

  GemmAlgoCache& cache = ctx.gemm_algos();
  auto it = cache.find(key);
  if (it == cache.end()) {
    MPT_CUDA_CHECK(cublasLtMatmulPreferenceCreate(&ds.pref));
    const uint64_t ws = ctx.lt_workspace_bytes();
    MPT_CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(
        ds.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    const uint32_t al[4] = {key.align_a, key.align_b, key.align_d, key.align_d};
    const cublasLtMatmulPreferenceAttributes_t which[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; ++i)
      MPT_CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(ds.pref, which[i], &al[i], sizeof al[i]));
    if (p.d_type != GemmType::f32) {
      // A 16-bit D: split-K partials may be added in the compute type (fp32) only; INPLACE and
      // OUTPUT_TYPE add them in D's type (cublasLt.h, cublasLtReductionScheme_t), which would
      // round every partial sum to 16 bits.
      const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
      MPT_CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(
          ds.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof schemes));
    }
    cublasLtMatmulHeuristicResult_t res{};
    int count = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(ctx.lt(), ds.op, ds.a, ds.b, ds.d,
                                                             ds.d, ds.pref, 1, &res, &count);
    const bool found = st == CUBLAS_STATUS_SUCCESS && count >= 1 && res.state == CUBLAS_STATUS_SUCCESS;
    // Only "no algorithm" is remembered as unsupported (for good): no result, NOT_SUPPORTED, or
    // INVALID_VALUE (which cuBLASLt may give for a combination it does not take, as the call
    // below may). Another failure of the query (ALLOC_FAILED when device memory is full, as the
    // query may load kernels; an internal error) is thrown, not taken for a missing epilogue
    // that the caller would then do without for the rest of the run.
    const bool none_exists = st == CUBLAS_STATUS_NOT_SUPPORTED ||
                             st == CUBLAS_STATUS_INVALID_VALUE ||
                             (st == CUBLAS_STATUS_SUCCESS && !found);
    if (none_exists && may_fail) {
      CachedAlgo none;
      none.supported = false;
      cache.emplace(key, none);
      return false;
    }
    if (!found)
      throw RuntimeError(std::string("matmul (") + what + "): cuBLASLt has no algorithm for " +
                         key.str() + " (heuristic: " + cublas_status_name(st) + ", " +
                         std::to_string(count) + " result(s), state " +
                         cublas_status_name(res.state) + ")" +
                         (p.fp8 ? "; fp8 GEMMs need m, n, k multiples of 16 and operands "
                                  "aligned to 16 bytes (the key's alignments)"
                                : ""));
    if (res.workspaceSize > ctx.lt_workspace_bytes())
      throw RuntimeError(std::string("matmul (") + what + "): the algorithm for " + key.str() +
                         " wants more workspace than the context holds");
    CachedAlgo c;
    std::memcpy(c.algo.data(), &res.algo, sizeof res.algo);
    c.workspace = res.workspaceSize;
    it = cache.emplace(key, c).first;
  }
  if (!it->second.supported) {
    if (may_fail) return false;
    throw RuntimeError(std::string("matmul (") + what + "): cuBLASLt has no algorithm for " +
                       key.str());
  }
  cublasLtMatmulAlgo_t algo;
  std::memcpy(&algo, it->second.algo.data(), sizeof algo);
  const float alpha = p.alpha, beta = p.beta;
  const cublasStatus_t run = cublasLtMatmul(ctx.lt(), ds.op, &alpha, g.a, ds.a, g.b, ds.b, &beta,
                                            g.d, ds.d, g.d, ds.d, &algo, ctx.lt_workspace(),
                                            ctx.lt_workspace_bytes(), ctx.stream());
  // An epilogue the heuristic offered can still be refused by the call (it checks its arguments
  // before it launches anything): a may_fail caller then takes its own kernels, for good.
  if (may_fail && (run == CUBLAS_STATUS_NOT_SUPPORTED || run == CUBLAS_STATUS_INVALID_VALUE)) {
    it->second.supported = false;
    return false;
  }
  MPT_CUDA_CHECK(run);
  if (ctx.profiling()) {
    // Named with its shape (m x n x k, and the batch), so that the op profile (op_profile.h)
    // tells the GEMMs apart: the LM head's from the layers', forward from backward.
    const std::string name = std::string(what) + " " + std::to_string(p.m) + "x" +
                             std::to_string(p.n) + "x" + std::to_string(p.k) +
                             (p.batch > 1 ? " (batch " + std::to_string(p.batch) + ")" : "");
    MPT_LAUNCH_CHECK(ctx, name.c_str());
  } else {
    MPT_LAUNCH_CHECK(ctx, what);
  }
  return true;
}

}  // namespace mpt::cuda
