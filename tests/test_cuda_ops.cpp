// The CUDA backend's elementwise, normalisation, embedding, classifier, reduction and optimizer
// ops against the CPU backend (the oracle), op by op and dtype by dtype, in the spirit of ggml's
// test-backend-ops:
//  - fresh random inputs (the project's Rng, a fresh seed per run: MPT_TEST_SEED reproduces),
//    rounded to their dtypes, of awkward shapes (not multiples of 32);
//  - the op runs on both backends; outputs are compared within a tolerance scaled by the output
//    dtype's unit roundoff plus fp32 arithmetic error (bit for bit where the CUDA kernel sums in
//    the CPU's order: casts, fills, embedding backward, AdamW, amax, count_nonfinite,
//    sum_squares). NaN never passes a comparison, so an element left unwritten fails;
//  - every GPU output lives inside guard elements (a byte pattern before and after it) that must
//    be unchanged afterwards (out-of-bounds writes), and outputs that an op writes start filled
//    with NaN bytes (elements it forgets to write);
//  - the cast statistics each op adds equal the CPU's, per tensor class.
// Every test starts with MPT_REQUIRE_GPU(): without a GPU (or a CUDA build) they skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "test_util.h"

using namespace mpt;
using namespace mpt::test;

namespace {

constexpr int64_t kGuard = 37;              // guard elements on each side of a GPU tensor
constexpr uint8_t kGuardByte = 0xA5;        // their bytes
constexpr uint8_t kUnwrittenByte = 0xFF;    // a write-only output's bytes before the op: NaN

// A GPU tensor t inside guards: [kGuard elements | t | kGuard elements].
struct GpuTensor {
  Buffer buf;
  Tensor t;      // the tensor ops see
  Tensor whole;  // every byte, guards included (as a 1-byte dtype)
  size_t guard_bytes = 0;
};

// Uploads host tensor h (CPU backend memory) into guards; `write_only`: the interior starts as
// NaN bytes instead of h's values (for outputs the op overwrites).
// guard_bytes: 0 for kGuard elements (an odd count: the tensor starts misaligned for any
// vector access), or a multiple of 16 to start it aligned.
GpuTensor to_gpu(Backend& gpu, const Tensor& h, bool write_only = false, size_t guard_bytes = 0) {
  GpuTensor g;
  const size_t nb = h.bytes();
  g.guard_bytes = guard_bytes ? guard_bytes : static_cast<size_t>(kGuard) * dtype_size(h.dtype);
  const size_t total = nb + 2 * g.guard_bytes;
  g.buf = gpu.allocate(total);
  g.whole = g.buf.view(0, DType::e4m3, {static_cast<int64_t>(total)});
  g.t = g.buf.view(g.guard_bytes, h.dtype, h.shape);
  std::vector<uint8_t> bytes(total, kGuardByte);
  if (write_only)
    std::memset(bytes.data() + g.guard_bytes, kUnwrittenByte, nb);
  else if (nb)
    std::memcpy(bytes.data() + g.guard_bytes, h.data, nb);
  gpu.copy_from_host(g.whole, bytes.data());
  return g;
}

// The interior's bytes, after checking that the guards are intact.
std::vector<uint8_t> fetch_bytes(Backend& gpu, const GpuTensor& g, const std::string& what) {
  std::vector<uint8_t> all(g.whole.bytes());
  gpu.copy_to_host(all.data(), g.whole);
  int64_t bad = 0;
  const size_t nb = g.t.bytes();
  for (size_t i = 0; i < g.guard_bytes; ++i) {
    bad += all[i] != kGuardByte;
    bad += all[g.guard_bytes + nb + i] != kGuardByte;
  }
  EXPECT_EQ(bad, 0) << what << ": bytes of the guards around the output were overwritten";
  return {all.begin() + static_cast<int64_t>(g.guard_bytes),
          all.begin() + static_cast<int64_t>(g.guard_bytes + nb)};
}

std::vector<float> fetch(Backend& gpu, const GpuTensor& g, const std::string& what) {
  std::vector<uint8_t> b = fetch_bytes(gpu, g, what);
  return widened(Tensor(b.data(), g.t.dtype, g.t.shape));
}

std::vector<uint32_t> bits_of(const Tensor& t) {
  std::vector<uint32_t> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = raw_bits(t, i);
  return v;
}

std::vector<uint32_t> fetch_bits(Backend& gpu, const GpuTensor& g, const std::string& what) {
  std::vector<uint8_t> b = fetch_bytes(gpu, g, what);
  return bits_of(Tensor(b.data(), g.t.dtype, g.t.shape));
}

// got ~ want elementwise: |got - want| <= rtol |want| + atol with rtol = 4 u_d + rel32 (a
// one-ulp difference in the output dtype, whose unit roundoff is u_d, plus fp32 arithmetic
// error), atol = rel32 * max|want| + the smallest subnormal of d (cancellation in sums). A
// non-finite want must be matched in kind (NaN by NaN, inf by the same inf); a NaN got where
// want is finite fails.
void expect_close(const std::string& what, const std::vector<float>& got,
                  const std::vector<float>& want, DType d, double rel32 = 2e-5) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double maxabs = 0.0;
  for (float w : want)
    if (std::isfinite(w)) maxabs = std::max(maxabs, std::fabs(static_cast<double>(w)));
  const double u = d == DType::f32 ? 0.0 : dtype_epsilon(d) / 2;
  const double rtol = 4 * u + rel32;
  const double atol = rel32 * maxabs + (d == DType::f32 ? 0.0 : dtype_traits(d).min_subnormal);
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    bool ok;
    if (std::isnan(w)) ok = std::isnan(g);
    else if (std::isinf(w)) ok = g == w;
    else ok = std::isfinite(g) && std::fabs(g - w) <= atol + rtol * std::fabs(w);
    if (!ok && ++bad <= 5)
      ADD_FAILURE() << what << " [" << i << "]: got " << g << ", want " << w << " (dtype "
                    << dtype_name(d) << ", tolerance " << atol + rtol * std::fabs(w) << ")";
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements differ";
}

void expect_same_bits(const std::string& what, const std::vector<uint32_t>& got,
                      const std::vector<uint32_t>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i] && ++bad <= 5)
      ADD_FAILURE() << what << " [" << i << "]: bits 0x" << std::hex << got[i] << ", want 0x"
                    << want[i] << std::dec;
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements differ";
}

void expect_same_counts(const Backend& gpu, const Backend& cpu, const std::string& what) {
  for (int k = 0; k < kTensorClasses; ++k) {
    const TensorClass c = static_cast<TensorClass>(k);
    const CastCounts g = gpu.cast_counts(c), w = cpu.cast_counts(c);
    EXPECT_EQ(g.values, w.values) << what << ": cast values, " << tensor_class_name(c);
    EXPECT_EQ(g.overflow, w.overflow) << what << ": overflows, " << tensor_class_name(c);
    EXPECT_EQ(g.underflow, w.underflow) << what << ": underflows, " << tensor_class_name(c);
  }
}

// Token ids in [0, limit), with repeats.
Owned random_ids(Backend& cpu, Shape s, int64_t limit, Rng& rng) {
  Owned o = make(cpu, s, DType::i32);
  for (int64_t i = 0; i < o.n(); ++i) o.i()[i] = static_cast<int32_t>(rng.below(limit));
  return o;
}

const char* short_name(DType d) {
  switch (d) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::e4m3: return "e4m3";
    case DType::e5m2: return "e5m2";
    case DType::i32: return "i32";
  }
  return "?";
}

// ---- the suite: one parameter, the dtype of the op's float tensors (statistics stay fp32)

class CudaOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    MPT_REQUIRE_GPU();
    gpu_ = gpu_backend_under_test(1);
    cpu_ = std::make_unique<CpuBackend>(2);
    rng_.reseed(fresh_seed());
  }
  void reset_counts() {
    gpu_->reset_cast_counts();
    cpu_->reset_cast_counts();
  }
  DType d() const { return GetParam(); }
  Owned rand(Shape s, double scale = 1.0, double mean = 0.0) {
    return randn_as(*cpu_, s, d(), rng_, scale, mean);
  }

  void layernorm_case(DType wd, int64_t B = 2, int64_t T = 37, int64_t C = 67,
                      DType gd = DType::i32);
  // embedding_backward on both backends into accumulators that start as dwte/dwpe (their GPU
  // copies given): the same bits and counts.
  void expect_embedding_backward_matches(const std::string& what, const Owned& tok,
                                         const Owned& dout, const Owned& dwte, const Owned& dwpe,
                                         GpuTensor& gtok, GpuTensor& gdout, GpuTensor& gdwte,
                                         GpuTensor& gdwpe) {
    reset_counts();
    cpu_->embedding_backward(dwte.t, dwpe.t, dout.t, tok.t);
    gpu_->embedding_backward(gdwte.t, gdwpe.t, gdout.t, gtok.t);
    expect_same_bits(what + " dwte", fetch_bits(*gpu_, gdwte, "dwte"), bits_of(dwte.t));
    expect_same_bits(what + " dwpe", fetch_bits(*gpu_, gdwpe, "dwpe"), bits_of(dwpe.t));
    expect_same_counts(*gpu_, *cpu_, what);
  }

  std::unique_ptr<Backend> gpu_, cpu_;
  Rng rng_;
};

TEST_P(CudaOps, Fill) {
  MPT_REQUIRE_GPU();
  Owned h = make(*cpu_, {37, 67}, d());
  GpuTensor g = to_gpu(*gpu_, h.t, true);
  reset_counts();
  for (float value : {0.1f, -3.0e38f, 1e-30f}) {
    cpu_->fill(h.t, value);
    gpu_->fill(g.t, value);
    expect_same_bits("fill", fetch_bits(*gpu_, g, "fill"), bits_of(h.t));
  }
  expect_same_counts(*gpu_, *cpu_, "fill (not counted)");
}

TEST_P(CudaOps, Residual) {
  MPT_REQUIRE_GPU();
  const Shape s{3, 37, 67};
  // b in fp32 (a residual stream of another dtype than the branch it adds): mixed inputs.
  Owned a = rand(s), b = randn_as(*cpu_, s, DType::f32, rng_), out = make(*cpu_, s, d());
  GpuTensor ga = to_gpu(*gpu_, a.t), gb = to_gpu(*gpu_, b.t), go = to_gpu(*gpu_, out.t, true);
  reset_counts();
  cpu_->residual_forward(out.t, a.t, b.t);
  gpu_->residual_forward(go.t, ga.t, gb.t);
  // One rounding of an exact-ish fp32 sum: the same bits.
  expect_same_bits("residual out", fetch_bits(*gpu_, go, "residual out"), bits_of(out.t));
  expect_same_counts(*gpu_, *cpu_, "residual");
  // In place (out is b), as the fused ops' fallbacks call it: b of d's dtype.
  Owned b2 = rand(s);
  GpuTensor gb2 = to_gpu(*gpu_, b2.t);
  reset_counts();
  cpu_->residual_forward(b2.t, a.t, b2.t);
  gpu_->residual_forward(gb2.t, ga.t, gb2.t);
  expect_same_bits("residual in place", fetch_bits(*gpu_, gb2, "residual in place"), bits_of(b2.t));
  expect_same_counts(*gpu_, *cpu_, "residual in place");
}

TEST_P(CudaOps, GeluForwardAndBackward) {
  MPT_REQUIRE_GPU();
  const Shape s{37, 3 * 67};
  Owned x = rand(s, 2.0), dout = rand(s);
  Owned out = make(*cpu_, s, d()), dinp = make(*cpu_, s, d());
  GpuTensor gx = to_gpu(*gpu_, x.t), gd = to_gpu(*gpu_, dout.t);
  GpuTensor go = to_gpu(*gpu_, out.t, true), gdi = to_gpu(*gpu_, dinp.t, true);
  reset_counts();
  cpu_->gelu_forward(out.t, x.t);
  gpu_->gelu_forward(go.t, gx.t);
  // expf differs from glibc's by an ulp or two, amplified near GELU's zero crossing.
  expect_close("gelu out", fetch(*gpu_, go, "gelu out"), widened(out.t), d(), 1e-5);
  expect_same_counts(*gpu_, *cpu_, "gelu_forward");
  reset_counts();
  cpu_->gelu_backward(dinp.t, x.t, dout.t);
  gpu_->gelu_backward(gdi.t, gx.t, gd.t);
  expect_close("gelu dinp", fetch(*gpu_, gdi, "gelu dinp"), widened(dinp.t), d(), 1e-5);
  expect_same_counts(*gpu_, *cpu_, "gelu_backward");
  // In place (dinp is dout), as matmul_backward_gelu's separate path calls it.
  reset_counts();
  cpu_->gelu_backward(dout.t, x.t, dout.t);
  gpu_->gelu_backward(gd.t, gx.t, gd.t);
  expect_close("gelu dinp in place", fetch(*gpu_, gd, "gelu in place"), widened(dout.t), d(), 1e-5);
  expect_same_counts(*gpu_, *cpu_, "gelu_backward in place");
}

TEST_P(CudaOps, EmbeddingForwardAndBackward) {
  MPT_REQUIRE_GPU();
  const int64_t B = 3, T = 37, C = 67, Vp = 101, maxT = 41;
  Owned tok = random_ids(*cpu_, {B, T}, 13, rng_);  // few distinct ids: many repeats
  tok.i()[5] = static_cast<int32_t>(Vp - 1);        // the last row too
  Owned wte = rand({Vp, C}), wpe = rand({maxT, C});
  Owned out = make(*cpu_, {B, T, C}, d());
  GpuTensor gtok = to_gpu(*gpu_, tok.t), gwte = to_gpu(*gpu_, wte.t), gwpe = to_gpu(*gpu_, wpe.t);
  GpuTensor gout = to_gpu(*gpu_, out.t, true);
  reset_counts();
  cpu_->embedding_forward(out.t, tok.t, wte.t, wpe.t);
  gpu_->embedding_forward(gout.t, gtok.t, gwte.t, gwpe.t);
  expect_same_bits("embedding out", fetch_bits(*gpu_, gout, "embedding out"), bits_of(out.t));
  expect_same_counts(*gpu_, *cpu_, "embedding_forward");

  // Accumulating outputs start from random values; the CUDA kernels add in the CPU's order.
  Owned dout = rand({B, T, C}), dwte = rand({Vp, C}), dwpe = rand({maxT, C});
  GpuTensor gdout = to_gpu(*gpu_, dout.t), gdwte = to_gpu(*gpu_, dwte.t),
            gdwpe = to_gpu(*gpu_, dwpe.t);
  expect_embedding_backward_matches("embedding_backward", tok, dout, dwte, dwpe, gtok, gdout,
                                    gdwte, gdwpe);
  // Twice more: deterministic.
  for (int rep = 0; rep < 2; ++rep) {
    cpu_->embedding_backward(dwte.t, dwpe.t, dout.t, tok.t);
    gpu_->embedding_backward(gdwte.t, gdwpe.t, gdout.t, gtok.t);
  }
  expect_same_bits("embedding dwte x3", fetch_bits(*gpu_, gdwte, "dwte"), bits_of(dwte.t));
}

TEST_P(CudaOps, EmbeddingRejectsBadTokenIds) {
  MPT_REQUIRE_GPU();
  Owned tok = random_ids(*cpu_, {2, 5}, 7, rng_);
  tok.i()[3] = 7;
  Owned wte = rand({7, 33}), wpe = rand({5, 33}), out = make(*cpu_, {2, 5, 33}, d());
  GpuTensor gtok = to_gpu(*gpu_, tok.t), gwte = to_gpu(*gpu_, wte.t), gwpe = to_gpu(*gpu_, wpe.t);
  GpuTensor gout = to_gpu(*gpu_, out.t, true);
  EXPECT_THROW(gpu_->embedding_forward(gout.t, gtok.t, gwte.t, gwpe.t), RuntimeError);
}

#if MPT_HAVE_CUDA  // these two look inside the CUDA backend (its op profile, raw copies)
// Ids uploaded with copy_ids_from_host: the embedding and the classifier use the host's copy
// (no synchronisation: the op profile records none) and give the bits of ids read back from
// the device; a copy_from_host over them afterwards is what the ops then see; a bad id is still
// refused, naming its position.
TEST_P(CudaOps, UploadedIdsServeTheOpsWithoutReadingBack) {
  MPT_REQUIRE_CUDA_BACKEND();
  cuda::Context& ctx = dynamic_cast<CudaBackend&>(*gpu_).context();
  const int64_t B = 2, T = 29, C = 40, Vp = 56, V = 51;
  Owned tok = random_ids(*cpu_, {B, T}, V, rng_), tok2 = random_ids(*cpu_, {B, T}, V, rng_);
  Owned wte = rand({Vp, C}), wpe = rand({T, C}), dout = rand({B, T, C});
  GpuTensor gwte = to_gpu(*gpu_, wte.t), gwpe = to_gpu(*gpu_, wpe.t), gdout = to_gpu(*gpu_, dout.t);
  Buffer ids = gpu_->allocate(tok.t.bytes());
  const Tensor gtok = ids.view(0, DType::i32, {B, T});
  {
    // Once on throwaway outputs first, so that the scratch the ops use has grown (growing it
    // synchronises, once).
    gpu_->copy_ids_from_host(gtok, tok.i());
    Owned out = make(*cpu_, {B, T, C}, d()), dw = rand({Vp, C}), dp = rand({T, C});
    Owned logits = rand({B * T, Vp}), losses = make(*cpu_, {B * T});
    GpuTensor gout = to_gpu(*gpu_, out.t), gdw = to_gpu(*gpu_, dw.t), gdp = to_gpu(*gpu_, dp.t),
              glogits = to_gpu(*gpu_, logits.t), glosses = to_gpu(*gpu_, losses.t);
    gpu_->embedding_forward(gout.t, gtok, gwte.t, gwpe.t);
    gpu_->embedding_backward(gdw.t, gdp.t, gdout.t, gtok);
    gpu_->crossentropy_forward_backward(glosses.t, glogits.t, gtok, static_cast<int>(V), 0.5f);
  }
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round == 0 ? "uploaded ids" : "ids overwritten by copy_from_host");
    const Owned& src = round == 0 ? tok : tok2;
    Owned out = make(*cpu_, {B, T, C}, d()), dwte = rand({Vp, C}), dwpe = rand({T, C});
    Owned logits = rand({B * T, Vp}, 3.0), losses = make(*cpu_, {B * T});
    GpuTensor gout = to_gpu(*gpu_, out.t, true), gdwte = to_gpu(*gpu_, dwte.t),
              gdwpe = to_gpu(*gpu_, dwpe.t), glogits = to_gpu(*gpu_, logits.t),
              glosses = to_gpu(*gpu_, losses.t, true);
    gpu_->copy_ids_from_host(gtok, tok.i());
    if (round == 1) gpu_->copy_from_host(gtok, tok2.t.data);
    reset_counts();
    ctx.start_profile();
    gpu_->embedding_forward(gout.t, gtok, gwte.t, gwpe.t);
    gpu_->embedding_backward(gdwte.t, gdwpe.t, gdout.t, gtok);
    gpu_->crossentropy_forward_backward(glosses.t, glogits.t, gtok, static_cast<int>(V), 0.5f);
    int64_t syncs = 0;
    for (const cuda::OpTime& o : ctx.stop_profile().sorted())
      syncs += o.op == "(idle: host synchronisation)";
    if (round == 0)
      EXPECT_EQ(syncs, 0) << "the host's copy of the ids serves every check and the buckets";
    else
      EXPECT_GT(syncs, 0) << "ids written by copy_from_host are read back";
    cpu_->embedding_forward(out.t, src.t, wte.t, wpe.t);
    cpu_->embedding_backward(dwte.t, dwpe.t, dout.t, src.t);
    cpu_->crossentropy_forward_backward(losses.t, logits.t, src.t, static_cast<int>(V), 0.5f);
    expect_same_bits("embedding out", fetch_bits(*gpu_, gout, "embedding out"), bits_of(out.t));
    expect_same_bits("dwte", fetch_bits(*gpu_, gdwte, "dwte"), bits_of(dwte.t));
    expect_same_bits("dwpe", fetch_bits(*gpu_, gdwpe, "dwpe"), bits_of(dwpe.t));
    expect_close("losses", fetch(*gpu_, glosses, "losses"), widened(losses.t), DType::f32, 1e-5);
    expect_same_counts(*gpu_, *cpu_, "embedding and classifier");
  }
  // An id out of range, uploaded: refused by every op that takes it, before any kernel runs.
  tok.i()[7] = static_cast<int32_t>(V);
  gpu_->copy_ids_from_host(gtok, tok.i());
  Owned out = make(*cpu_, {B, T, C}, d()), logits = rand({B * T, Vp}), losses = make(*cpu_, {B * T});
  GpuTensor gout = to_gpu(*gpu_, out.t, true), glogits = to_gpu(*gpu_, logits.t),
            glosses = to_gpu(*gpu_, losses.t, true);
  try {
    gpu_->crossentropy_forward_backward(glosses.t, glogits.t, gtok, static_cast<int>(V), 0.0f);
    ADD_FAILURE() << "no throw";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("token id 51 at 7 outside [0, 51)"), std::string::npos)
        << e.what();
  }
  gpu_->embedding_forward(gout.t, gtok, gwte.t, gwpe.t);  // 51 < Vp: a row of wte
  tok.i()[7] = static_cast<int32_t>(Vp);
  gpu_->copy_ids_from_host(gtok, tok.i());
  EXPECT_THROW(gpu_->embedding_forward(gout.t, gtok, gwte.t, gwpe.t), RuntimeError);
  EXPECT_THROW(gpu_->embedding_backward(gwte.t, gwpe.t, gdout.t, gtok), RuntimeError);
}

// MPT_CUDA_SYNC=1 compares the host's copy of uploaded ids with the device's at every use: ids
// overwritten behind the backend's back (a raw copy here) are reported, not used.
TEST_P(CudaOps, DebugSyncCatchesIdsWrittenBehindTheBackendsBack) {
  MPT_REQUIRE_CUDA_BACKEND();
  if (d() != DType::f32) GTEST_SKIP() << "no float dtype involved";
  setenv("MPT_CUDA_SYNC", "1", 1);
  std::unique_ptr<Backend> gpu = gpu_backend_under_test(1);
  unsetenv("MPT_CUDA_SYNC");
  const int64_t B = 2, T = 9, C = 16, Vp = 24;
  Owned tok = random_ids(*cpu_, {B, T}, Vp, rng_), other = random_ids(*cpu_, {B, T}, Vp, rng_);
  other.i()[4] = (tok.i()[4] + 1) % static_cast<int32_t>(Vp);  // surely different
  Owned wte = rand({Vp, C}), wpe = rand({T, C}), out = make(*cpu_, {B, T, C});
  GpuTensor gwte = to_gpu(*gpu, wte.t), gwpe = to_gpu(*gpu, wpe.t), gout = to_gpu(*gpu, out.t, true);
  Buffer ids = gpu->allocate(tok.t.bytes());
  const Tensor gtok = ids.view(0, DType::i32, {B, T});
  gpu->copy_ids_from_host(gtok, tok.i());
  gpu->embedding_forward(gout.t, gtok, gwte.t, gwpe.t);  // the copy matches
  gpu->synchronize();
  ASSERT_EQ(cudaMemcpy(gtok.data, other.t.data, other.t.bytes(), cudaMemcpyHostToDevice),
            cudaSuccess);
  try {
    gpu->embedding_forward(gout.t, gtok, gwte.t, gwpe.t);
    ADD_FAILURE() << "no throw";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("differs from the device's"), std::string::npos)
        << e.what();
  }
}
#endif  // MPT_HAVE_CUDA

// wd: the dtype of the weight and bias (the activations' d(), or fp32); gd: that of their
// gradients (i32: wd; the fp16 and bf16 presets keep 16-bit weights with fp32 gradients).
// Two rows have a variance at or below eps, where eps's value and place (inside the square
// root) decide rstd: one constant (variance 0, rstd = 1/sqrt(eps)), one of spread 3e-3
// (variance ~ 9e-6, near eps = 1e-5).
void CudaOps::layernorm_case(DType wd, int64_t B, int64_t T, int64_t C, DType gd) {
  if (gd == DType::i32) gd = wd;
  const int64_t N = B * T;
  Owned x = rand({B, T, C}, 1.5, 0.3);
  for (int64_t i = 0; i < C; ++i) {
    store_rounded(x.t, i, 0.5f);
    store_rounded(x.t, C + i, static_cast<float>(3e-3 * rng_.normal()));
  }
  Owned w = randn_as(*cpu_, {C}, wd, rng_, 0.5, 1.0), b = randn_as(*cpu_, {C}, wd, rng_, 0.2);
  Owned out = make(*cpu_, {B, T, C}, d());
  Owned mean = make(*cpu_, {B, T}), rstd = make(*cpu_, {B, T});
  GpuTensor gx = to_gpu(*gpu_, x.t), gw = to_gpu(*gpu_, w.t), gb = to_gpu(*gpu_, b.t);
  GpuTensor gout = to_gpu(*gpu_, out.t, true), gmean = to_gpu(*gpu_, mean.t, true),
            grstd = to_gpu(*gpu_, rstd.t, true);
  reset_counts();
  cpu_->layernorm_forward(out.t, mean.t, rstd.t, x.t, w.t, b.t);
  gpu_->layernorm_forward(gout.t, gmean.t, grstd.t, gx.t, gw.t, gb.t);
  expect_close("layernorm out", fetch(*gpu_, gout, "ln out"), widened(out.t), d());
  expect_close("layernorm mean", fetch(*gpu_, gmean, "ln mean"), widened(mean.t), DType::f32);
  expect_close("layernorm rstd", fetch(*gpu_, grstd, "ln rstd"), widened(rstd.t), DType::f32);
  expect_same_counts(*gpu_, *cpu_, "layernorm_forward");

  // The backward reads the CPU's statistics on both sides (the same inputs).
  GpuTensor gmean2 = to_gpu(*gpu_, mean.t), grstd2 = to_gpu(*gpu_, rstd.t);
  Owned dout = rand({B, T, C}), dinp = rand({B, T, C});
  Owned dw = randn_as(*cpu_, {C}, gd, rng_), db = randn_as(*cpu_, {C}, gd, rng_);
  GpuTensor gdout = to_gpu(*gpu_, dout.t), gdinp = to_gpu(*gpu_, dinp.t),
            gdw = to_gpu(*gpu_, dw.t), gdb = to_gpu(*gpu_, db.t);
  reset_counts();
  cpu_->layernorm_backward(dinp.t, dw.t, db.t, dout.t, x.t, w.t, mean.t, rstd.t);
  gpu_->layernorm_backward(gdinp.t, gdw.t, gdb.t, gdout.t, gx.t, gw.t, gmean2.t, grstd2.t);
  // Sums over C (dinp) and over N rows (dweight, dbias) in another order than the CPU's.
  const double rel = 1e-5 * std::sqrt(static_cast<double>(std::max(N, C)));
  expect_close("layernorm dinp", fetch(*gpu_, gdinp, "ln dinp"), widened(dinp.t), d(), rel);
  expect_close("layernorm dweight", fetch(*gpu_, gdw, "ln dweight"), widened(dw.t), gd, rel);
  expect_close("layernorm dbias", fetch(*gpu_, gdb, "ln dbias"), widened(db.t), gd, rel);
  expect_same_counts(*gpu_, *cpu_, "layernorm_backward");
}

TEST_P(CudaOps, LayerNormForwardAndBackward) {
  MPT_REQUIRE_GPU();
  layernorm_case(d());
}

// More row chunks (32 rows each) than the column sums' 16 lanes, and columns over two blocks.
TEST_P(CudaOps, LayerNormBackwardOverManyRowChunks) {
  MPT_REQUIRE_GPU();
  layernorm_case(d(), 4, 301, 45);
}

// Rows that take each of the register kernels' widths (8, 16, 24 and 32 columns per lane: 129,
// 500, 768 and 1024), and rows too wide for them (1031: the loop kernels).
TEST_P(CudaOps, LayerNormOverEveryRowWidthPath) {
  MPT_REQUIRE_GPU();
  for (int64_t C : {int64_t{129}, int64_t{500}, int64_t{768}, int64_t{1024}, int64_t{1031}}) {
    SCOPED_TRACE("C = " + std::to_string(C));
    layernorm_case(d(), 3, 23, C);
  }
}

TEST_P(CudaOps, LayerNormWithFp32WeightsAndNarrowActivations) {
  MPT_REQUIRE_GPU();
  if (d() == DType::f32) GTEST_SKIP() << "covered by LayerNormForwardAndBackward";
  layernorm_case(DType::f32);
}

// The fp16 and bf16 presets: 16-bit activations and weights, fp32 weight gradients.
TEST_P(CudaOps, LayerNormWithNarrowWeightsAndFp32Gradients) {
  MPT_REQUIRE_GPU();
  if (d() == DType::f32) GTEST_SKIP() << "covered by LayerNormForwardAndBackward";
  layernorm_case(d(), 2, 37, 67, DType::f32);
}

// The presets' embedding backward: 16-bit output gradients into fp32 table gradients.
TEST_P(CudaOps, EmbeddingBackwardIntoFp32Gradients) {
  MPT_REQUIRE_GPU();
  if (d() == DType::f32) GTEST_SKIP() << "covered by EmbeddingForwardAndBackward";
  const int64_t B = 2, T = 29, C = 40, Vp = 56, maxT = 31;
  Owned tok = random_ids(*cpu_, {B, T}, 11, rng_), dout = rand({B, T, C});
  Owned dwte = randn_as(*cpu_, {Vp, C}, DType::f32, rng_),
        dwpe = randn_as(*cpu_, {maxT, C}, DType::f32, rng_);
  GpuTensor gtok = to_gpu(*gpu_, tok.t), gdout = to_gpu(*gpu_, dout.t),
            gdwte = to_gpu(*gpu_, dwte.t), gdwpe = to_gpu(*gpu_, dwpe.t);
  expect_embedding_backward_matches("embedding_backward into fp32", tok, dout, dwte, dwpe, gtok,
                                    gdout, gdwte, gdwpe);
}

// Rows of 107 (misaligned: one element at a time) and of 112 starting on 16-byte boundaries
// (16-byte accesses, the last one past the vocabulary's 101).
TEST_P(CudaOps, CrossEntropy) {
  MPT_REQUIRE_GPU();
  const int64_t N = 37, V = 101;
  Owned targets = random_ids(*cpu_, {N}, V, rng_);
  targets.i()[0] = static_cast<int32_t>(V - 1);
  for (int64_t Vp : {V, int64_t{107}, int64_t{112}})  // V: no padded columns
  for (float dloss : {0.0f, 1.0f / static_cast<float>(N)}) {
    Owned logits = rand({N, Vp}, 3.0), losses = make(*cpu_, {N});
    GpuTensor glogits = to_gpu(*gpu_, logits.t, false, Vp % 8 == 0 ? 256 : 0);
    GpuTensor glosses = to_gpu(*gpu_, losses.t, true);
    GpuTensor gtargets = to_gpu(*gpu_, targets.t);
    const std::vector<uint32_t> before = bits_of(logits.t);
    reset_counts();
    cpu_->crossentropy_forward_backward(losses.t, logits.t, targets.t, static_cast<int>(V), dloss);
    gpu_->crossentropy_forward_backward(glosses.t, glogits.t, gtargets.t, static_cast<int>(V),
                                        dloss);
    const std::string what = std::string(dloss == 0.0f ? "crossentropy (no grad)" : "crossentropy") +
                             ", Vp " + std::to_string(Vp);
    expect_close(what + " losses", fetch(*gpu_, glosses, what + " losses"), widened(losses.t),
                 DType::f32, 1e-5);
    if (dloss == 0.0f)
      expect_same_bits(what + " logits unchanged", fetch_bits(*gpu_, glogits, what), before);
    else
      expect_close(what + " dlogits", fetch(*gpu_, glogits, what + " dlogits"), widened(logits.t),
                   d(), 1e-5);
    expect_same_counts(*gpu_, *cpu_, what);
  }
}

// Rows longer than a block's pass (512 threads x up to 8 elements), so that the loops stride and
// running maxima get rescaled, aligned (5008) and not (5003); and rows holding a NaN, a +inf,
// some -inf and only -inf, whose losses and gradients must be NaN, inf or finite as the CPU's.
TEST_P(CudaOps, CrossEntropyLongAndNonFiniteRows) {
  MPT_REQUIRE_GPU();
  const int64_t N = 6, V = 5001;
  Owned targets = random_ids(*cpu_, {N}, V, rng_);
  for (int64_t Vp : {int64_t{5003}, int64_t{5008}})
    for (float dloss : {0.0f, 1.0f / static_cast<float>(N)}) {
      // sigma 1: the smallest gradients (~3e-7) stay 10x above fp16's underflow, so that the
      // two backends' few-ulp differences cannot flip a count
      Owned logits = rand({N, Vp}, 1.0), losses = make(*cpu_, {N});
      // row 0 and 5 finite; 1: a NaN; 2: a +inf; 3: some -inf (not the target's); 4: all -inf
      store_rounded(logits.t, 1 * Vp + 4321, NAN);
      store_rounded(logits.t, 2 * Vp + 17, INFINITY);
      for (int64_t i = 0; i < V; i += 7)
        if (i != targets.i()[3]) store_rounded(logits.t, 3 * Vp + i, -INFINITY);
      for (int64_t i = 0; i < Vp; ++i) store_rounded(logits.t, 4 * Vp + i, -INFINITY);
      GpuTensor glogits = to_gpu(*gpu_, logits.t, false, Vp % 8 == 0 ? 256 : 0);
      GpuTensor glosses = to_gpu(*gpu_, losses.t, true), gtargets = to_gpu(*gpu_, targets.t);
      reset_counts();
      cpu_->crossentropy_forward_backward(losses.t, logits.t, targets.t, static_cast<int>(V), dloss);
      gpu_->crossentropy_forward_backward(glosses.t, glogits.t, gtargets.t, static_cast<int>(V),
                                          dloss);
      const std::string what = "crossentropy, Vp " + std::to_string(Vp) + (dloss == 0 ? ", no grad" : "");
      const std::vector<float> lc = widened(losses.t);
      EXPECT_TRUE(std::isfinite(lc[0]) && std::isfinite(lc[3]) && std::isfinite(lc[5]));
      EXPECT_TRUE(std::isnan(lc[1]) && std::isnan(lc[2]) && std::isnan(lc[4]));
      // expect_close: NaN only where the CPU has NaN, inf only where it has the same inf
      expect_close(what + " losses", fetch(*gpu_, glosses, what + " losses"), lc, DType::f32, 1e-5);
      if (dloss != 0.0f)
        expect_close(what + " dlogits", fetch(*gpu_, glogits, what + " dlogits"),
                     widened(logits.t), d(), 1e-5);
      expect_same_counts(*gpu_, *cpu_, what);
    }
}

TEST_P(CudaOps, AmaxCountNonfiniteSumSquares) {
  MPT_REQUIRE_GPU();
  // More than one of sum_squares' 2^14-element chunks and of the reductions' blocks.
  const int64_t n = 3 * (int64_t{1} << 14) + 37;
  Owned x = rand({n}, 4.0);
  for (int pass = 0; pass < 3; ++pass) {
    if (pass == 1) store_rounded(x.t, n - 2, INFINITY);
    if (pass == 2) store_rounded(x.t, 12345, NAN);
    GpuTensor g = to_gpu(*gpu_, x.t);
    const std::string what = std::string("pass ") + std::to_string(pass);
    const float ag = gpu_->amax(g.t), ac = cpu_->amax(x.t);
    if (std::isnan(ac))
      EXPECT_TRUE(std::isnan(ag)) << what << ": amax " << ag;
    else
      EXPECT_EQ(ag, ac) << what << ": amax";
    EXPECT_EQ(gpu_->count_nonfinite(g.t), cpu_->count_nonfinite(x.t)) << what;
    const double sg = gpu_->sum_squares(g.t), sc = cpu_->sum_squares(x.t);
    if (std::isfinite(sc))
      EXPECT_EQ(sg, sc) << what << ": sum_squares (the CPU's order, bit for bit)";
    else
      EXPECT_EQ(std::isnan(sg), std::isnan(sc)) << what << ": sum_squares " << sg;
    fetch_bytes(*gpu_, g, what + ": reductions must not write");
  }
}

// More chunks than one warp (32) and one block of sum_squares' kernel hold, the last partial:
// each chunk still summed in the CPU's order, bit for bit.
TEST_P(CudaOps, SumSquaresOverManyChunksIsTheCpusBits) {
  MPT_REQUIRE_GPU();
  const int64_t n = 70 * (int64_t{1} << 14) + 11;
  Owned x = rand({n}, 3.0);
  GpuTensor g = to_gpu(*gpu_, x.t);
  EXPECT_EQ(gpu_->sum_squares(g.t), cpu_->sum_squares(x.t));
}

// The AdamW tests' hyperparameters: GPT-2's, with weight decay and a gradient factor other than 1.
AdamWParams adamw_test_params() {
  AdamWParams p{};
  p.lr = 3e-4f;
  p.beta1 = 0.9f;
  p.beta2 = 0.95f;
  p.eps = 1e-8f;
  p.weight_decay = 0.1f;
  p.grad_scale = 0.5f;
  p.step = 1;
  return p;
}

// AdamW: without a master (param in d, rounded to nearest), with a master (param in d != fp32),
// and (bf16) with stochastic rounding: bit-identical to the CPU, lost updates equal.
TEST_P(CudaOps, AdamW) {
  MPT_REQUIRE_GPU();
  const Shape s{37, 67};
  // grad32: fp32 gradients with 16-bit parameters and a master (the fp16 and bf16 presets);
  // first: sr_first_index, the offset of a ZeRO-1 shard's elements in the stochastic-rounding
  // stream.
  struct Case { bool master, sr, grad32; int64_t first; };
  for (Case c : {Case{false, false, false, 0}, Case{true, false, false, 0},
                 Case{true, false, true, 0}, Case{false, true, false, 0},
                 Case{false, true, false, 1000003}}) {
    if (c.master && d() == DType::f32) continue;
    if (c.sr && d() != DType::bf16) continue;
    const std::string what = std::string("adamw") + (c.master ? " master" : "") +
                             (c.grad32 ? " fp32 grad" : "") +
                             (c.sr ? " stochastic rounding" : "") +
                             (c.first ? " from element " + std::to_string(c.first) : "");
    Owned param = rand(s, 0.05);
    Owned grad = c.grad32 ? randn_as(*cpu_, s, DType::f32, rng_, 1e-2) : rand(s, 1e-2);
    Owned m = randn_as(*cpu_, s, DType::f32, rng_, 1e-3), v = make(*cpu_, s);
    for (int64_t i = 0; i < v.n(); ++i) v.f()[i] = static_cast<float>(1e-6 * (1 + rng_.uniform()));
    Owned master = f32_copy(*cpu_, param.t);
    if (c.master)  // a master that the parameter is a rounding of
      for (int64_t i = 0; i < master.n(); ++i) master.f()[i] += static_cast<float>(1e-5 * rng_.normal());
    GpuTensor gp = to_gpu(*gpu_, param.t), gg = to_gpu(*gpu_, grad.t), gm = to_gpu(*gpu_, m.t),
              gv = to_gpu(*gpu_, v.t), gmaster = to_gpu(*gpu_, master.t);
    AdamWParams p = adamw_test_params();
    p.stochastic_rounding = c.sr;
    p.sr_seed = rng_.next_u64();
    p.sr_first_index = c.first;
    for (int64_t step = 1; step <= 3; ++step) {
      p.step = step;
      AdamWStats sg, sc;
      reset_counts();
      cpu_->adamw_update(param.t, c.master ? master.t : Tensor(), grad.t, m.t, v.t, p, &sc);
      gpu_->adamw_update(gp.t, c.master ? gmaster.t : Tensor(), gg.t, gm.t, gv.t, p, &sg);
      gpu_->collect_stats();  // the lost updates are counted on the device until now
      const std::string w = what + " step " + std::to_string(step);
      expect_same_bits(w + " param", fetch_bits(*gpu_, gp, w + " param"), bits_of(param.t));
      expect_same_bits(w + " m", fetch_bits(*gpu_, gm, w + " m"), bits_of(m.t));
      expect_same_bits(w + " v", fetch_bits(*gpu_, gv, w + " v"), bits_of(v.t));
      if (c.master)
        expect_same_bits(w + " master", fetch_bits(*gpu_, gmaster, w + " master"),
                         bits_of(master.t));
      EXPECT_EQ(sg.values, sc.values) << w;
      EXPECT_EQ(sg.lost_updates, sc.lost_updates) << w;
      expect_same_counts(*gpu_, *cpu_, w);
    }
  }
}

// adamw_update_many, the optimizer step's one call: over more tensors than one launch takes
// (adamw_plan.h: 40), of awkward sizes (none, one element, several blocks), mixing what may
// differ between launches (masters or none, fp32 or 16-bit gradients, stochastic rounding, a
// second grad_scale) and what differs within one (weight decay, seeds, first indices): every
// tensor bit-identical to the CPU's adamw_update called for each in order, the counts and the
// statistics equal. Two steps, so the second reads what the first wrote.
TEST_P(CudaOps, AdamWUpdateManyIsAdamWUpdateForEach) {
  MPT_REQUIRE_GPU();
  constexpr int kTensors = 93;
  struct One {
    Owned param, master, grad, m, v;
    GpuTensor gp, gmaster, gg, gm, gv;
    AdamWParams p{};
  };
  std::vector<One> ts(kTensors);
  for (int i = 0; i < kTensors; ++i) {
    One& t = ts[i];
    // Tensor 23 (on a GPU only: the CPU self-check would take seconds) has more elements than
    // the 65535 blocks of one tensor have threads, so its threads loop as the token
    // embedding's do; bf16 rounds it stochastically, with element indices past 2^24.
    const int64_t big = int64_t{65535} * 256 + 300;
    const int64_t n = i == 0                              ? 0
                      : i == 1                            ? 1
                      : i == 23 && !gpu_tests_on_cpu()    ? big
                      : i % 17 == 0                       ? 70001 + i
                                                          : 37 * i + i % 7;
    const Shape s{n};
    const bool master = d() != DType::f32 && i % 2 == 0;
    const bool grad32 = d() != DType::f32 && i % 3 == 0;
    t.param = rand(s, 0.05);
    t.grad = grad32 ? randn_as(*cpu_, s, DType::f32, rng_, 1e-2) : rand(s, 1e-2);
    t.m = randn_as(*cpu_, s, DType::f32, rng_, 1e-3);
    t.v = make(*cpu_, s);
    for (int64_t k = 0; k < n; ++k) t.v.f()[k] = static_cast<float>(1e-6 * (1 + rng_.uniform()));
    if (master) {
      t.master = f32_copy(*cpu_, t.param.t);
      for (int64_t k = 0; k < n; ++k) t.master.f()[k] += static_cast<float>(1e-5 * rng_.normal());
      t.gmaster = to_gpu(*gpu_, t.master.t);
    }
    t.gp = to_gpu(*gpu_, t.param.t);
    t.gg = to_gpu(*gpu_, t.grad.t);
    t.gm = to_gpu(*gpu_, t.m.t);
    t.gv = to_gpu(*gpu_, t.v.t);
    t.p = adamw_test_params();
    t.p.weight_decay = i % 2 ? 0.1f : 0.0f;
    t.p.grad_scale = i >= kTensors - 5 ? 0.25f : 0.5f;  // the last five: a launch of their own
    t.p.stochastic_rounding = d() == DType::bf16 && i % 4 != 1;
    t.p.sr_seed = rng_.next_u64();
    t.p.sr_first_index = i % 5 == 0 ? 1000003 : 0;
  }
  for (int64_t step = 1; step <= 2; ++step) {
    std::vector<AdamWTensors> on_gpu;
    AdamWStats sg, sc;
    reset_counts();
    for (One& t : ts) {
      t.p.step = step;
      cpu_->adamw_update(t.param.t, t.master.t, t.grad.t, t.m.t, t.v.t, t.p, &sc);
      on_gpu.push_back({t.gp.t, t.gmaster.t, t.gg.t, t.gm.t, t.gv.t, t.p});
    }
    gpu_->adamw_update_many(on_gpu, &sg);
    gpu_->collect_stats();  // the lost updates are counted on the device until now
    for (int i = 0; i < kTensors; ++i) {
      const One& t = ts[i];
      const std::string w = "step " + std::to_string(step) + " tensor " + std::to_string(i);
      expect_same_bits(w + " param", fetch_bits(*gpu_, t.gp, w + " param"), bits_of(t.param.t));
      expect_same_bits(w + " m", fetch_bits(*gpu_, t.gm, w + " m"), bits_of(t.m.t));
      expect_same_bits(w + " v", fetch_bits(*gpu_, t.gv, w + " v"), bits_of(t.v.t));
      if (t.master.t.defined())
        expect_same_bits(w + " master", fetch_bits(*gpu_, t.gmaster, w + " master"),
                         bits_of(t.master.t));
      expect_same_bits(w + " grad (only read)", fetch_bits(*gpu_, t.gg, w + " grad"),
                       bits_of(t.grad.t));
    }
    const std::string w = "step " + std::to_string(step);
    EXPECT_EQ(sg.values, sc.values) << w;
    EXPECT_EQ(sg.lost_updates, sc.lost_updates) << w;
    if (d() == DType::bf16) {
      EXPECT_GT(sc.lost_updates, 0) << w << ": a case the count misses";
    }
    expect_same_counts(*gpu_, *cpu_, w);
  }
}

// Tensors that overlap are refused by both backends, naming them, before anything is written.
TEST_P(CudaOps, AdamWUpdateManyRefusesOverlappingTensors) {
  MPT_REQUIRE_GPU();
  const Shape s{300};
  for (Backend* be : {gpu_.get(), cpu_.get()}) {
    const bool gpu = be == gpu_.get();
    Owned hp = rand(s, 0.05), hg = rand(s, 1e-2);
    Owned hmv = randn_as(*cpu_, {1000}, DType::f32, rng_, 1e-3);
    for (int64_t k = 500; k < 1000; ++k)
      hmv.f()[k] = static_cast<float>(1e-6 * (2 + rng_.uniform()));
    GpuTensor p = to_gpu(*be, hp.t), g = to_gpu(*be, hg.t), mv = to_gpu(*be, hmv.t);
    const Tensor whole = mv.t;
    auto at = [&](int64_t first) { return whole.slice(first, 300); };
    const AdamWParams prm = adamw_test_params();
    // Tensor 0's m and v are elements [0, 300) and [500, 800) of one buffer, tensor 1's m is
    // [450, 750): it overlaps tensor 0's v (and only that). Everything else is apart.
    Owned hp1 = rand(s, 0.05), hg1 = rand(s, 1e-2);
    GpuTensor p1 = to_gpu(*be, hp1.t), g1 = to_gpu(*be, hg1.t);
    Owned hv1 = randn_as(*cpu_, s, DType::f32, rng_, 1e-3);
    for (int64_t k = 0; k < 300; ++k)
      hv1.f()[k] = static_cast<float>(1e-6 * (2 + rng_.uniform()));
    GpuTensor v1 = to_gpu(*be, hv1.t);
    const std::vector<AdamWTensors> all = {{p.t, Tensor(), g.t, at(0), at(500), prm},
                                           {p1.t, Tensor(), g1.t, at(450), v1.t, prm}};
    const std::string what = gpu ? "CUDA" : "CPU";
    try {
      be->adamw_update_many(all, nullptr);
      ADD_FAILURE() << what << ": overlapping tensors were accepted";
    } catch (const RuntimeError& e) {
      EXPECT_NE(std::string(e.what()).find("tensor 1's m and tensor 0's v overlap"),
                std::string::npos)
          << what << ": " << e.what();
    }
    be->collect_stats();
    expect_same_bits(what + " param 0", fetch_bits(*be, p, "param 0"), bits_of(hp.t));
    expect_same_bits(what + " param 1", fetch_bits(*be, p1, "param 1"), bits_of(hp1.t));
    expect_same_bits(what + " moments", fetch_bits(*be, mv, "moments"), bits_of(hmv.t));
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps,
                         ::testing::Values(DType::f32, DType::f16, DType::bf16),
                         [](const ::testing::TestParamInfo<DType>& i) {
                           return std::string(short_name(i.param));
                         });

// ---- cast: every pair of float dtypes, fp8 included, with values that overflow, underflow and
// are not finite; bit-identical (both backends convert through core/formats.h) and counted alike.

struct CastPair {
  DType src, dst;
};

class CudaCast : public ::testing::TestWithParam<CastPair> {};

TEST_P(CudaCast, MatchesCpuBitForBitWithCounts) {
  MPT_REQUIRE_GPU();
  auto gpu = gpu_backend_under_test(1);
  CpuBackend cpu(2);
  Rng rng(fresh_seed());
  const CastPair pr = GetParam();
  const int64_t n = 4099;
  Owned src = make(cpu, {n}, pr.src);
  const float specials[] = {1e6f, -7e4f, 6e4f, 1e-30f, -1e-8f, 3e-5f, 0.0f, -0.0f,
                            INFINITY, -INFINITY, NAN, 448.0f, 500.0f, 65520.0f};
  for (int64_t i = 0; i < n; ++i) {
    const float v = i < 14 ? specials[i] : static_cast<float>(rng.normal() * std::exp(4 * rng.normal()));
    store_rounded(src.t, i, v);
  }
  Owned dst = make(cpu, {n}, pr.dst);
  GpuTensor gs = to_gpu(*gpu, src.t), gd = to_gpu(*gpu, dst.t, true);
  for (int k = 0; k < kTensorClasses; ++k) {  // counted under the class the caller names
    const TensorClass cls = static_cast<TensorClass>(k);
    gpu->reset_cast_counts();
    cpu.reset_cast_counts();
    cpu.cast(dst.t, src.t, cls);
    gpu->cast(gd.t, gs.t, cls);
    expect_same_bits("cast", fetch_bits(*gpu, gd, "cast dst"), bits_of(dst.t));
    expect_same_counts(*gpu, cpu, std::string("cast as ") + tensor_class_name(cls));
  }
  fetch_bytes(*gpu, gs, "cast src must not change");
}

std::vector<CastPair> all_cast_pairs() {
  const DType ds[] = {DType::f32, DType::f16, DType::bf16, DType::e4m3, DType::e5m2};
  std::vector<CastPair> v;
  for (DType s : ds)
    for (DType d : ds) v.push_back({s, d});
  return v;
}

INSTANTIATE_TEST_SUITE_P(AllPairs, CudaCast, ::testing::ValuesIn(all_cast_pairs()),
                         [](const ::testing::TestParamInfo<CastPair>& i) {
                           return std::string(short_name(i.param.src)) + "_to_" +
                                  short_name(i.param.dst);
                         });

// ---- fill and the reductions on fp8 tensors (their own kernel instances): bit for bit

TEST(CudaOpsFp8, FillAndReductions) {
  MPT_REQUIRE_GPU();
  auto gpu = gpu_backend_under_test(1);
  CpuBackend cpu(2);
  Rng rng(fresh_seed());
  for (DType f : {DType::e4m3, DType::e5m2}) {
    SCOPED_TRACE(dtype_name(f));
    const int64_t n = 3 * (int64_t{1} << 14) + 37;  // more than one chunk and block
    Owned x = make(cpu, {n}, f);
    for (int64_t i = 0; i < n; ++i) store_rounded(x.t, i, static_cast<float>(40 * rng.normal()));
    for (int pass = 0; pass < 3; ++pass) {
      if (pass == 1 && f == DType::e5m2) store_rounded(x.t, n - 2, INFINITY);  // e4m3 has none
      if (pass == 2) store_rounded(x.t, 777, NAN);
      GpuTensor g = to_gpu(*gpu, x.t);
      const std::string what = std::string("pass ") + std::to_string(pass);
      const float ag = gpu->amax(g.t), ac = cpu.amax(x.t);
      if (std::isnan(ac))
        EXPECT_TRUE(std::isnan(ag)) << what << ": amax " << ag;
      else
        EXPECT_EQ(ag, ac) << what << ": amax";
      EXPECT_EQ(gpu->count_nonfinite(g.t), cpu.count_nonfinite(x.t)) << what;
      const double sg = gpu->sum_squares(g.t), sc = cpu.sum_squares(x.t);
      if (std::isfinite(sc))
        EXPECT_EQ(sg, sc) << what << ": sum_squares";
      else
        EXPECT_EQ(std::isnan(sg), std::isnan(sc)) << what << ": sum_squares " << sg;
      fetch_bytes(*gpu, g, what + ": reductions must not write");
    }
    Owned y = make(cpu, {37, 67}, f);
    GpuTensor gy = to_gpu(*gpu, y.t, true);
    for (float value : {0.1f, -500.0f, 1e-9f, 1e5f}) {  // rounded, saturated, underflowed
      cpu.fill(y.t, value);
      gpu->fill(gy.t, value);
      expect_same_bits("fill " + std::to_string(value), fetch_bits(*gpu, gy, "fill"),
                       bits_of(y.t));
    }
  }
}

// ---- argument checks

// The CUDA entry points' own checks (the CPU backend words its errors otherwise).
TEST(CudaOpsChecks, WrongDtypesAndShapesThrowNamingTheArgument) {
  MPT_REQUIRE_CUDA_BACKEND();
  auto gpu = gpu_backend_under_test(1);
  Buffer buf = gpu->allocate(4096);
  const Tensor f = buf.view(0, DType::f32, {4, 8}), i32 = buf.view(0, DType::i32, {4, 8});
  const Tensor small = buf.view(0, DType::f32, {3, 8});
  auto message = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const RuntimeError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message([&] { gpu->residual_forward(i32, f, f); }).find("'out'"), std::string::npos);
  EXPECT_NE(message([&] { gpu->residual_forward(f, f, small); }).find("'b'"), std::string::npos);
  EXPECT_NE(message([&] { gpu->gelu_forward(f, i32); }).find("'inp'"), std::string::npos);
  EXPECT_NE(message([&] { gpu->cast(small, f, TensorClass::activation); }).find("cast"),
            std::string::npos);
}

}  // namespace
