// The CUDA backend's host-side behaviour, which needs no GPU: what happens without a device,
// backend selection, sizes chosen on the host. The op-by-op parity suite is test_cuda_ops.cpp
// and test_cuda_matmul.cpp.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "backend/cuda/adamw_plan.h"
#include "backend/cuda/attention_plan.h"
#include "backend/cuda/flash_fragments.h"
#include "backend/cuda/host_ids.h"
#include "backend/cuda/op_profile.h"
#include "backend/cuda/workspace_plan.h"
#include "backend/gpu_peaks.h"
#include "config/config.h"
#include "cuda_test_util.h"
#include "model/cuda_workspace.h"
#include "model/gpt.h"
#include "test_util.h"

namespace mpt {
namespace {

TEST(CudaHost, AutoPicksCpuWithoutAGpuAndCudaWithOne) {
  const std::string why = test::gpu_unavailable_reason();
  auto be = make_backend("auto", 1);
  EXPECT_EQ(be->name(), why.empty() ? "cuda" : "cpu") << why;
}

TEST(CudaHost, NamingCudaWithoutAGpuIsAClearInputError) {
  const std::string why = test::gpu_unavailable_reason();
  if (why.empty()) GTEST_SKIP() << "a GPU is present: backend 'cuda' is available here";
  try {
    make_backend("cuda", 1);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("backend 'cuda'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("cpu"), std::string::npos) << "should name the alternative: " << msg;
  }
}

#if MPT_HAVE_CUDA
TEST(CudaHost, DeviceAvailableExplainsItself) {
  std::string why = "unset";
  const bool ok = cuda::device_available(&why);
  if (ok) {
    EXPECT_EQ(why, "unset") << "no reason is given when a device is present";
  } else {
    EXPECT_FALSE(why.empty());
    EXPECT_NE(why, "unset");
  }
  // Asking again gives the same answer: the failed query's sticky error was cleared.
  EXPECT_EQ(cuda::device_available(), ok);
}

TEST(CudaHost, CublasStatusesHaveNames) {
  EXPECT_STREQ(cuda::cublas_status_name(CUBLAS_STATUS_NOT_SUPPORTED), "CUBLAS_STATUS_NOT_SUPPORTED");
  EXPECT_STREQ(cuda::cublas_status_name(CUBLAS_STATUS_INVALID_VALUE), "CUBLAS_STATUS_INVALID_VALUE");
}

TEST(CudaHost, AFailedCallThrowsNamingTheCallAndTheError) {
  try {
    MPT_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL() << "expected RuntimeError";
  } catch (const RuntimeError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("cudaErrorInvalidValue"), std::string::npos) << msg;
    EXPECT_NE(msg.find("test_cuda.cpp"), std::string::npos) << msg;
  }
}
#endif

}  // namespace
}  // namespace mpt

namespace mpt {
namespace {

TEST(GpuPeaks, PolicyFormatsAndDatasheetFigures) {
  EXPECT_EQ(matmul_peak_format(MatmulPrecision::native, DType::f32), "fp32");
  EXPECT_EQ(matmul_peak_format(MatmulPrecision::tf32, DType::f32), "tf32");
  EXPECT_EQ(matmul_peak_format(MatmulPrecision::native, DType::bf16), "bf16");
  EXPECT_EQ(matmul_peak_format(MatmulPrecision::native, DType::f16), "fp16");
  EXPECT_EQ(matmul_peak_format(MatmulPrecision::fp8, DType::bf16), "fp8");
  EXPECT_DOUBLE_EQ(peak_flops("NVIDIA H200", "bf16"), 989.4e12);
  EXPECT_DOUBLE_EQ(peak_flops("NVIDIA H100 80GB HBM3", "fp8"), 1978.9e12);
  EXPECT_DOUBLE_EQ(peak_flops("NVIDIA H100 PCIe", "bf16"), 756e12);
  EXPECT_DOUBLE_EQ(peak_flops("NVIDIA A100-SXM4-80GB", "fp8"), 0.0) << "A100 has no fp8";
  EXPECT_DOUBLE_EQ(peak_flops("NVIDIA GeForce RTX 4090", "bf16"), 0.0) << "not in the table";
  EXPECT_DOUBLE_EQ(peak_flops("NVIDIA H200 NVL", "bf16"), 0.0) << "not the SXM figure";
  EXPECT_DOUBLE_EQ(peak_flops("NVIDIA A100-PCIE-40GB", "tf32"), 156e12);
  EXPECT_DOUBLE_EQ(peak_bandwidth("NVIDIA H200"), 4.8e12);
  EXPECT_DOUBLE_EQ(peak_bandwidth("NVIDIA H100 80GB HBM3"), 3.35e12);
  EXPECT_DOUBLE_EQ(peak_bandwidth("NVIDIA H100 PCIe"), 2.0e12);
  EXPECT_DOUBLE_EQ(peak_bandwidth("NVIDIA A100-SXM4-80GB"), 2.039e12);
  EXPECT_DOUBLE_EQ(peak_bandwidth("NVIDIA A100 80GB PCIe"), 1.935e12);
  EXPECT_DOUBLE_EQ(peak_bandwidth("NVIDIA A100-PCIE-40GB"), 1.555e12);
  EXPECT_DOUBLE_EQ(peak_bandwidth("NVIDIA H200 NVL"), 0.0);
  EXPECT_DOUBLE_EQ(peak_bandwidth("NVIDIA GH200 480GB"), 0.0) << "not the H200's memory";
  EXPECT_DOUBLE_EQ(peak_flops("NVIDIA GH200 480GB", "bf16"), 0.0);
  EXPECT_DOUBLE_EQ(peak_bandwidth("NVIDIA GeForce RTX 4090"), 0.0);
}

// MFU (bench_gpu_train and the trainer's step records): achieved FLOP/s over the devices' peak;
// no figure at all when the peak is unknown (the CPU backend has no GPU name).
TEST(GpuPeaks, MfuIsAchievedOverPeakAndAbsentWithoutAPeak) {
  const PolicyPeak h200 = policy_peak("NVIDIA H200", MatmulPrecision::native, DType::bf16);
  EXPECT_EQ(h200.format, "bf16");
  EXPECT_DOUBLE_EQ(h200.flops, 989.4e12);
  const std::optional<double> mfu = model_flops_utilization(1e9, 4e5, h200.flops);
  ASSERT_TRUE(mfu.has_value());
  EXPECT_DOUBLE_EQ(*mfu, 1e9 * 4e5 / 989.4e12);
  EXPECT_DOUBLE_EQ(*model_flops_utilization(1e9, 4e5, h200.flops, 2), *mfu / 2) << "per device";
  const PolicyPeak cpu = policy_peak("", MatmulPrecision::native, DType::f32);
  EXPECT_EQ(cpu.format, "fp32");
  EXPECT_EQ(cpu.flops, 0.0);
  EXPECT_FALSE(model_flops_utilization(1e9, 4e5, cpu.flops).has_value());
  EXPECT_FALSE(model_flops_utilization(1e9, 4e5, peak_flops("NVIDIA GeForce RTX 4090", "bf16")));
}

TEST(CudaWorkspacePlan, CublasLtWorkspaceIs32MiBOnHopperAnd4MiBElsewhere) {
  EXPECT_EQ(cuda::lt_workspace_size(9), size_t{32} << 20);
  EXPECT_EQ(cuda::lt_workspace_size(10), size_t{32} << 20);
  EXPECT_EQ(cuda::lt_workspace_size(8), size_t{4} << 20);
}

// The memory ledger's CUDA workspace, worked out by hand for a tiny model (B=4, T=32: N=128
// rows, C=64, 4 heads, Vp=256): the cuBLASLt workspace plus the largest request of each scratch
// role. test_cuda_train.cpp checks the same figures against a GPU's workspace_bytes().
TEST(CudaWorkspacePlan, LedgerTermIsTheCublasLtWorkspacePlusEachScratchRole) {
  // The defaults, whatever the environment running the test asks for.
  test::ScopedEnv out("MPT_GEMM_OUT", nullptr), att("MPT_ATTENTION", nullptr),
      epi("MPT_LT_EPILOGUES", nullptr);
  const ModelConfig m = test::tiny_gpu_model();
  ASSERT_EQ(m.padded_vocab(), 256);
  const int B = test::kTinyB, T = test::kTinyT;
  ASSERT_EQ(B * T, 128);
  auto ws = [&](const char* preset, int cc) {
    const PrecisionPolicy p = PrecisionPolicy::preset(preset);
    return cuda_workspace_bytes(m, B, T, p, Gpt::plan_memory(m, B, T, p), cc);
  };
  const double lt = double(size_t{32} << 20);
  // Attention (attention_plan.h), one pass over the 4 batch elements; per (b, h) a (32, 32)
  // square (T = 32 needs no padding) and a (32, 16) head. fp32: scores and their gradients
  // (fp32 squares), q, k, v, dout head-major in fp32, dq, dk, dv in fp32.
  const double squares = 4.0 * 4 * 32 * 32, head = 4.0 * 4 * 32 * 16;
  const double attention = 2 * squares * 4 + 4 * head * 4 + 3 * head * 4;
  // fp16/bf16 (and fp8, whose attention is bf16): the fused kernels (attention_plan.h), whose
  // only scratch is the backward's D, fp32 per (b, h, t).
  const double flash = 4.0 * 4 * 32 * 4;
  // The GEMM path in fp16/bf16 (MPT_ATTENTION=gemm): the same two fp32 squares, the rounded
  // probabilities and score gradients (two 16-bit squares), q, k, v, dout in 16 bits, dq, dk,
  // dv in fp32 - the same total as fp32's here, by coincidence of these sizes.
  const double attention16 = 2 * squares * 4 + 2 * squares * 2 + 4 * head * 2 + 3 * head * 4;
  ASSERT_EQ(attention16, attention);
  // kReduce: the largest reduction is layernorm_backward's partials, 2 x ceil(N/32) chunks x C
  // fp32 (dbias: ceil(N/256) x 4C fp32 = 1024; embedding buckets <= (2*128+1+128) int32 = 1540).
  const double reduce = 2.0 * 4 * 64 * 4;
  EXPECT_EQ(ws("fp32", 9), lt + attention + reduce);
  EXPECT_EQ(ws("fp32", 8), double(size_t{4} << 20) + attention + reduce);
  // bf16 outputs are staged in fp32 (kMatmulOut): the logits (N x Vp) and the MLP's input
  // gradient (N x 4C), both 128 x 256 x 4 bytes; weight gradients are fp32, written in place.
  const double matmul_out = 128.0 * 256 * 4;
  EXPECT_EQ(ws("bf16", 9), lt + flash + reduce + matmul_out);
  EXPECT_EQ(ws("fp16", 9), lt + flash + reduce + matmul_out);
  // fp8 (the LM head stays bf16): one-byte operand copies. kOperandA: the largest weight
  // (4C x C; wgrad's transposed inputs are the forward's caches, in the activations);
  // kOperandB: the inputs (N x 4C) and dout (N x 4C); kOperandC: dout transposed (N x 4C).
  const double operands = 256.0 * 64 + 2 * 128.0 * 256;
  EXPECT_EQ(ws("fp8", 9), lt + flash + reduce + matmul_out + operands);
  // bf16-pure: bf16 gradients, so the weight gradients are accumulated in fp32 scratch too;
  // the largest is the tied embedding's (Vp x C), smaller than the logits.
  EXPECT_EQ(ws("bf16-pure", 9), lt + flash + reduce + matmul_out);
  {
    test::ScopedEnv gemm("MPT_ATTENTION", "gemm");
    EXPECT_EQ(ws("bf16", 9), lt + attention16 + reduce + matmul_out);
    EXPECT_EQ(ws("fp32", 9), lt + attention + reduce);
  }
  {
    // MPT_GEMM_OUT=direct (matmul_plan.h, GemmOut): the GEMMs write bf16 outputs and input
    // gradients themselves, so nothing is staged but bf16-pure's weight gradients, which
    // accumulate in fp32 (the largest: Vp x C or 4C x C, 256 x 64 x 4 bytes); fp16 stays staged.
    test::ScopedEnv direct("MPT_GEMM_OUT", "direct");
    EXPECT_EQ(ws("bf16", 9), lt + flash + reduce);
    EXPECT_EQ(ws("fp8", 9), lt + flash + reduce + operands);
    EXPECT_EQ(ws("bf16-pure", 9), lt + flash + reduce + 256.0 * 64 * 4);
    EXPECT_EQ(ws("fp16", 9), lt + flash + reduce + matmul_out);
    EXPECT_EQ(ws("fp32", 9), lt + attention + reduce);
    // Without cuBLASLt's epilogues a bias needs the store kernel, so the biased outputs are
    // staged again (the largest: the MLP's N x 4C); the LM head's logits have no bias.
    {
      test::ScopedEnv off("MPT_LT_EPILOGUES", "0");
      EXPECT_EQ(ws("bf16", 9), lt + flash + reduce + matmul_out);
    }
    // bf16 activations with fp32 weights (dtypes.param: fp32): the GEMMs read fp32 operands
    // (widened), and cuBLASLt has no such GEMM with a bf16 D: staged as without the variable.
    PrecisionPolicy mixed = PrecisionPolicy::preset("bf16");
    mixed.param = DType::f32;
    mixed.master_weights = false;
    auto ws_mixed = [&] {
      return cuda_workspace_bytes(m, B, T, mixed, Gpt::plan_memory(m, B, T, mixed), 9);
    };
    const double direct_mixed = ws_mixed();
    test::ScopedEnv staged("MPT_GEMM_OUT", "staged");
    EXPECT_EQ(direct_mixed, ws_mixed());
    EXPECT_GT(direct_mixed, lt + flash + reduce + matmul_out) << "with the widened operands";
  }
  {
    test::ScopedEnv staged("MPT_GEMM_OUT", "staged");
    EXPECT_EQ(ws("bf16", 9), lt + flash + reduce + matmul_out);
  }
}

// ---- adamw_update_many's launches (adamw_plan.h)

// A tensor of n elements at an address nothing is behind (non-null, so defined): the plan reads
// dtypes, counts and parameters only, never the memory.
AdamWTensors adamw_tensors(int64_t n, DType param, DType grad, bool master, bool sr = false) {
  void* const nowhere = reinterpret_cast<void*>(uintptr_t{0x1000});
  AdamWTensors t;
  t.param = Tensor(nowhere, param, {n});
  t.grad = Tensor(nowhere, grad, {n});
  t.m = Tensor(nowhere, DType::f32, {n});
  t.v = Tensor(nowhere, DType::f32, {n});
  if (master) t.master = Tensor(nowhere, DType::f32, {n});
  t.p = AdamWParams{6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 1.0f, sr, 1, 0};
  return t;
}

// Every launch: its tensors all of its first's kind, at most kAdamWTensorsPerLaunch, each
// tensor's blocks as adamw_update alone would launch; every tensor with elements in exactly one
// launch, in the list's order within it; launches in the order of their first tensors.
void expect_valid_plan(const std::vector<AdamWTensors>& all,
                       const std::vector<cuda::AdamWLaunch>& ls) {
  using cuda::grid_stride_blocks;
  std::vector<int> seen(all.size(), 0);
  size_t prev_first = 0;
  for (size_t li = 0; li < ls.size(); ++li) {
    const cuda::AdamWLaunch& l = ls[li];
    ASSERT_FALSE(l.tensors.empty()) << "launch " << li;
    ASSERT_LE(l.tensors.size(), cuda::kAdamWTensorsPerLaunch) << "launch " << li;
    ASSERT_EQ(l.block_begin.size(), l.tensors.size() + 1) << "launch " << li;
    EXPECT_EQ(l.block_begin[0], 0u) << "launch " << li;
    if (li > 0) {
      EXPECT_GT(l.tensors[0], prev_first) << "launch " << li;
    }
    prev_first = l.tensors[0];
    for (size_t j = 0; j < l.tensors.size(); ++j) {
      const size_t t = l.tensors[j];
      ASSERT_LT(t, all.size());
      ++seen[t];
      if (j > 0) {
        EXPECT_GT(t, l.tensors[j - 1]) << "launch " << li;
      }
      EXPECT_TRUE(cuda::adamw_same_launch(all[l.tensors[0]], all[t])) << "launch " << li;
      EXPECT_EQ(l.block_begin[j + 1] - l.block_begin[j], grid_stride_blocks(all[t].param.numel()))
          << "launch " << li << " tensor " << t;
    }
  }
  for (size_t t = 0; t < all.size(); ++t)
    EXPECT_EQ(seen[t], all[t].param.numel() > 0 ? 1 : 0) << "tensor " << t;
}

TEST(AdamWPlan, BlocksAreAdamWUpdatesOwnGridStrideLaunch) {
  using cuda::grid_stride_blocks;
  EXPECT_EQ(grid_stride_blocks(0), 1u);
  EXPECT_EQ(grid_stride_blocks(1), 1u);
  EXPECT_EQ(grid_stride_blocks(cuda::kBlock), 1u);
  EXPECT_EQ(grid_stride_blocks(cuda::kBlock + 1), 2u);
  EXPECT_EQ(grid_stride_blocks(int64_t{65535} * cuda::kBlock), 65535u);
  EXPECT_EQ(grid_stride_blocks(int64_t{65535} * cuda::kBlock + 1), 65535u);
  EXPECT_EQ(grid_stride_blocks(50304 * 768), 65535u);  // GPT-2's token embedding: grid-strided
}

// GPT-2 124M's 148 tensors (bf16 with fp32 masters and gradients, one kind): 4 launches, not 148.
TEST(AdamWPlan, Gpt2sTensorsTakeFourLaunches) {
  const int64_t C = 768;
  std::vector<int64_t> sizes = {50304 * C, 1024 * C};
  for (int l = 0; l < 12; ++l)
    for (int64_t n : {C, C, 3 * C * C, 3 * C, C * C, C, C, C, 4 * C * C, 4 * C, 4 * C * C, C})
      sizes.push_back(n);
  sizes.push_back(C);
  sizes.push_back(C);
  ASSERT_EQ(sizes.size(), 148u);
  std::vector<AdamWTensors> all;
  for (int64_t n : sizes) all.push_back(adamw_tensors(n, DType::bf16, DType::f32, true));
  const auto ls = cuda::plan_adamw_launches(all);
  expect_valid_plan(all, ls);
  ASSERT_EQ(ls.size(), 4u);
  EXPECT_EQ(ls[0].tensors.size(), 40u);
  EXPECT_EQ(ls[3].tensors.size(), 28u);
  EXPECT_EQ(ls[0].tensors[0], 0u);
  EXPECT_EQ(ls[1].tensors[0], 40u);
}

// What makes a kernel differ splits launches; what the table holds per tensor does not. Tensors
// of one kind apart in the list share a launch; empty tensors get none.
TEST(AdamWPlan, KindsShareNoLaunchAndEmptyTensorsGetNone) {
  std::vector<AdamWTensors> all;
  for (int i = 0; i < 50; ++i) {
    // bf16 with a master (round to nearest), bf16 in place rounding stochastically, bf16 in place
    // rounding to nearest (the masters' kind: the kernel reads a null master per tensor).
    AdamWTensors t = adamw_tensors(100 + i, DType::bf16, DType::f32, i % 3 == 0, i % 3 == 1);
    t.p.weight_decay = i % 2 ? 0.0f : 0.1f;  // per tensor: no new kind
    t.p.sr_seed = static_cast<uint64_t>(i);
    t.p.sr_first_index = i;
    all.push_back(t);
  }
  all.push_back(adamw_tensors(0, DType::bf16, DType::f32, true));  // nothing to update
  all.push_back(adamw_tensors(7, DType::bf16, DType::bf16, true));  // another gradient dtype
  all.push_back(adamw_tensors(7, DType::f16, DType::f32, true));    // another parameter dtype
  AdamWTensors later = adamw_tensors(9, DType::bf16, DType::f32, true);
  later.p.step = 4;  // another step: its bias corrections are kernel arguments
  all.push_back(later);
  AdamWTensors scaled = adamw_tensors(9, DType::bf16, DType::f32, true);
  scaled.p.grad_scale = 0.5f;
  all.push_back(scaled);
  AdamWTensors negative_zero = adamw_tensors(9, DType::bf16, DType::f32, true);
  negative_zero.p.weight_decay = -0.0f;  // per tensor: still the first kind
  all.push_back(negative_zero);
  all.push_back(adamw_tensors(11, DType::bf16, DType::f32, true));  // the first kind again
  const auto ls = cuda::plan_adamw_launches(all);
  expect_valid_plan(all, ls);
  // Round to nearest: 33 tensors (i % 3 != 1) and the last two, 35 in one launch; stochastic:
  // 17; then one launch each for the other gradient, parameter dtype, step and scale.
  ASSERT_EQ(ls.size(), 6u);
  EXPECT_EQ(ls[0].tensors.size(), 35u);
  EXPECT_EQ(ls[0].tensors.back(), all.size() - 1);
  EXPECT_EQ(ls[1].tensors.size(), 17u);
  EXPECT_EQ(ls[1].tensors[0], 1u);
  for (size_t k = 2; k < 6; ++k) EXPECT_EQ(ls[k].tensors, std::vector<size_t>{49 + k}) << k;
}

// The shared hyperparameters must be the same bits: a launch runs with its first tensor's, and
// -0 is not +0 to the arithmetic (a weight of -0 stays -0 under lr +0, becomes +0 under -0).
TEST(AdamWPlan, SharedHyperparametersMatchBitForBit) {
  std::vector<AdamWTensors> all = {adamw_tensors(5, DType::bf16, DType::f32, true),
                                   adamw_tensors(5, DType::bf16, DType::f32, true)};
  all[0].p.lr = 0.0f;
  all[1].p.lr = -0.0f;
  EXPECT_FALSE(cuda::adamw_same_launch(all[0], all[1]));
  EXPECT_EQ(cuda::plan_adamw_launches(all).size(), 2u);
  all[1].p.lr = 0.0f;
  EXPECT_TRUE(cuda::adamw_same_launch(all[0], all[1]));
  all[0].p.eps = all[1].p.eps = std::nanf("");
  EXPECT_TRUE(cuda::adamw_same_launch(all[0], all[1])) << "the same NaN: the same arithmetic";
}

// Which attention kernel runs: the fused one in fp16/bf16 up to head size 128, the GEMM path
// otherwise or when MPT_ATTENTION=gemm asks for it; a misspelt value is refused by name.
TEST(AttentionKernelChoice, FusedFor16BitFormatsUpToHeadSize128) {
  using cuda::AttentionKernel;
  using cuda::attention_kernel_for;
  for (OperandFormat f : {OperandFormat::f16, OperandFormat::bf16}) {
    EXPECT_EQ(attention_kernel_for(f, 64, nullptr), AttentionKernel::flash);
    EXPECT_EQ(attention_kernel_for(f, 1, "flash"), AttentionKernel::flash);
    EXPECT_EQ(attention_kernel_for(f, 128, ""), AttentionKernel::flash);
    EXPECT_EQ(attention_kernel_for(f, 129, nullptr), AttentionKernel::gemm);
    EXPECT_EQ(attention_kernel_for(f, 64, "gemm"), AttentionKernel::gemm);
  }
  for (OperandFormat f : {OperandFormat::f32, OperandFormat::tf32})
    EXPECT_EQ(attention_kernel_for(f, 64, "flash"), AttentionKernel::gemm);
  try {
    attention_kernel_for(OperandFormat::bf16, 64, "fast");
    ADD_FAILURE() << "MPT_ATTENTION=fast accepted";
  } catch (const RuntimeError& e) {
    EXPECT_NE(std::string(e.what()).find("MPT_ATTENTION"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'fast'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cuda::flash_head_tile(8), 32);
  EXPECT_EQ(cuda::flash_head_tile(40), 64);
  EXPECT_EQ(cuda::flash_head_tile(64), 64);
  EXPECT_EQ(cuda::flash_head_tile(65), 128);
  EXPECT_THROW(cuda::flash_head_tile(129), RuntimeError);
  EXPECT_EQ(cuda::flash_tiles(1), 1);
  EXPECT_EQ(cuda::flash_tiles(64), 1);
  EXPECT_EQ(cuda::flash_tiles(65), 2);
  EXPECT_EQ(cuda::flash_tiles(1024), 16);
  EXPECT_THROW(cuda::flash_tiles(int64_t{65536} * 64 + 1), RuntimeError);
  EXPECT_EQ(cuda::flash_backward_scratch(2, 3, 5), 256u) << "rounded up as every scratch is";
  alignas(16) static const char bytes[64] = {};
  EXPECT_TRUE(cuda::flash_vector_loads(64, {bytes, bytes + 32}));
  EXPECT_TRUE(cuda::flash_vector_loads(8, {bytes}));
  EXPECT_FALSE(cuda::flash_vector_loads(12, {bytes})) << "rows of 12 elements end mid-chunk";
  EXPECT_FALSE(cuda::flash_vector_loads(64, {bytes, bytes + 8})) << "dout 8 bytes off";
}


// The PTX ISA's fragment tables for mma.m16n8k16 (16-bit A and B, fp32 C and D), written out
// here independently of flash_fragments.h: (row, column) of element `half` (0: the low 16 bits)
// of register r of a lane's A or B fragment, and of accumulator i.
std::pair<int, int> ptx_a(int lane, int r, int half) {
  const int g = lane >> 2, c = lane % 4, i = 2 * r + half;  // a_i
  const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
  return {row, c * 2 + (i & 1) + (i >= 4 ? 8 : 0)};
}
std::pair<int, int> ptx_b(int lane, int r, int half) {
  const int g = lane >> 2, c = lane % 4, i = 2 * r + half;  // b_i
  return {c * 2 + (i & 1) + (i >= 2 ? 8 : 0), g};
}
std::pair<int, int> ptx_c(int lane, int i) {
  const int g = lane >> 2, c = lane % 4;
  return {i < 2 ? g : g + 8, c * 2 + (i & 1)};
}

// The fused attention's fragment loaders read, lane by lane, the tile elements the PTX tables
// place in each register (a wrong index would multiply the wrong elements on the GPU), and
// the accumulators it repacks as an A fragment are the ones at that fragment's positions.
TEST(FlashFragments, LoadersAndRepackingFollowThePtxTables) {
  constexpr int LD = 64 + 8;  // a head tile of 64 and its padding, as the kernels use
  std::vector<uint16_t> tile(64 * LD);
  for (size_t i = 0; i < tile.size(); ++i) tile[i] = static_cast<uint16_t>(i * 7 + 3);  // distinct
  auto at = [&](int r, int col) { return tile[static_cast<size_t>(r) * LD + col]; };
  auto half_of = [](uint32_t w, int h) { return static_cast<uint16_t>(h ? w >> 16 : w & 0xFFFFu); };
  for (int lane = 0; lane < 32; ++lane) {
    SCOPED_TRACE("lane " + std::to_string(lane));
    const int g = lane >> 2, c = lane % 4;
    for (int r0 : {0, 16, 48})
      for (int k0 : {0, 16, 48}) {
        uint32_t a[4];
        cuda::flash::frag_a<uint16_t, LD>(a, tile.data(), r0, k0, g, c);
        for (int r = 0; r < 4; ++r)
          for (int h = 0; h < 2; ++h) {
            const auto [row, col] = ptx_a(lane, r, h);
            EXPECT_EQ(half_of(a[r], h), at(r0 + row, k0 + col)) << "A reg " << r << " half " << h;
          }
      }
    for (int n0 : {0, 8, 56})
      for (int k0 : {0, 16, 48}) {
        uint32_t b[2];
        cuda::flash::frag_b_rows<uint16_t, LD>(b[0], b[1], tile.data(), n0, k0, g, c);
        for (int r = 0; r < 2; ++r)
          for (int h = 0; h < 2; ++h) {
            const auto [k, n] = ptx_b(lane, r, h);
            EXPECT_EQ(half_of(b[r], h), at(n0 + n, k0 + k)) << "B (rows) reg " << r;
          }
        cuda::flash::frag_b_cols<uint16_t, LD>(b[0], b[1], tile.data(), k0, n0, g, c);
        for (int r = 0; r < 2; ++r)
          for (int h = 0; h < 2; ++h) {
            const auto [k, n] = ptx_b(lane, r, h);
            EXPECT_EQ(half_of(b[r], h), at(k0 + k, n0 + n)) << "B (cols) reg " << r;
          }
      }
    for (int i = 0; i < 4; ++i) {
      const auto [row, col] = ptx_c(lane, i);
      EXPECT_EQ(cuda::flash::acc_row(g, i), row);
      EXPECT_EQ(cuda::flash::acc_col(c, i), col);
    }
    // Register r of the repacked A fragment: accumulators acc_index(r, h) of 8-column half
    // acc_half(r) sit at the A element positions of that register.
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) {
        const auto [row, col] = ptx_c(lane, cuda::flash::acc_index(r, h));
        EXPECT_EQ(std::make_pair(row, col + 8 * cuda::flash::acc_half(r)), ptx_a(lane, r, h))
            << "repacked reg " << r << " half " << h;
      }
  }
}

// ldmatrix.sync.aligned.m8n8.x4 as the PTX ISA describes it: lanes 8i..8i+7 point at the rows
// of matrix i (8 consecutive elements each); register i of lane l holds elements
// (l / 4, 2 (l % 4) + {0, 1}) of matrix i, or with .trans (2 (l % 4) + {0, 1}, l / 4).
std::array<uint32_t, 4> emulated_ldmatrix(const std::vector<uint16_t>& tile, int ld, int lane,
                                          bool trans, int (*row)(int, int), int row0,
                                          int (*col)(int, int), int col0) {
  std::array<uint32_t, 4> r{};
  for (int i = 0; i < 4; ++i) {
    auto m = [&](int mr, int mc) {  // element (mr, mc) of matrix i
      const int l = 8 * i + mr;
      return uint32_t{tile[static_cast<size_t>(row(l, row0)) * ld + col(l, col0) + mc]};
    };
    const int a = lane / 4, b = 2 * (lane % 4);
    r[i] = trans ? (m(b, a) | m(b + 1, a) << 16) : (m(a, b) | m(a, b + 1) << 16);
  }
  return r;
}

// The fused kernels load their B fragments two blocks at a time with ldmatrix: the rows each
// lane points at give, register by register, the fragments frag_b_rows and frag_b_cols read
// (which the test above checks against the mma tables).
TEST(FlashFragments, LdmatrixAddressesGiveTheSameFragments) {
  constexpr int LD = 64 + 8;
  std::vector<uint16_t> tile(64 * LD);
  for (size_t i = 0; i < tile.size(); ++i) tile[i] = static_cast<uint16_t>(i * 5 + 1);
  for (int lane = 0; lane < 32; ++lane) {
    SCOPED_TRACE("lane " + std::to_string(lane));
    const int g = lane >> 2, c = lane % 4;
    for (int nb : {0, 2, 6})
      for (int ks : {0, 1, 3}) {
        const auto r = emulated_ldmatrix(tile, LD, lane, false, cuda::flash::ldsm_rows_row,
                                         nb * 8, cuda::flash::ldsm_rows_col, ks * 16);
        uint32_t b0, b1;
        for (int half = 0; half < 2; ++half) {
          cuda::flash::frag_b_rows<uint16_t, LD>(b0, b1, tile.data(), (nb + half) * 8, ks * 16, g, c);
          EXPECT_EQ(r[2 * half], b0) << "rows, block " << nb + half << ", k step " << ks;
          EXPECT_EQ(r[2 * half + 1], b1) << "rows, block " << nb + half << ", k step " << ks;
        }
      }
    for (int kk : {0, 1, 3})
      for (int nb : {0, 2, 6}) {
        const auto r = emulated_ldmatrix(tile, LD, lane, true, cuda::flash::ldsm_cols_row,
                                         kk * 16, cuda::flash::ldsm_cols_col, nb * 8);
        uint32_t b0, b1;
        for (int half = 0; half < 2; ++half) {
          cuda::flash::frag_b_cols<uint16_t, LD>(b0, b1, tile.data(), kk * 16, (nb + half) * 8, g, c);
          EXPECT_EQ(r[2 * half], b0) << "cols, block " << nb + half << ", k step " << kk;
          EXPECT_EQ(r[2 * half + 1], b1) << "cols, block " << nb + half << ", k step " << kk;
        }
      }
    // Every row address is 16-byte aligned (ldmatrix's rule): LD and the columns are multiples
    // of 8 elements.
    EXPECT_EQ((cuda::flash::ldsm_rows_row(lane, 8) * LD + cuda::flash::ldsm_rows_col(lane, 16)) % 8, 0);
    EXPECT_EQ((cuda::flash::ldsm_cols_row(lane, 16) * LD + cuda::flash::ldsm_cols_col(lane, 8)) % 8, 0);
  }
}

// The op profile's table: per-op sums of the marks, largest first, ties in name order.
TEST(OpProfile, SumsMarksPerOpLargestFirst) {
  cuda::OpProfileTable t;
  t.add("matmul forward", 2.0);
  t.add("layernorm_forward", 0.5);
  t.add("matmul forward", 3.0);
  t.add("gelu_forward", 0.5);
  t.add("attention_forward: fused kernel", 4.0);
  const std::vector<cuda::OpTime> v = t.sorted();
  ASSERT_EQ(v.size(), 4u);
  EXPECT_EQ(v[0].op, "matmul forward");
  EXPECT_DOUBLE_EQ(v[0].ms, 5.0);
  EXPECT_EQ(v[0].launches, 2);
  EXPECT_EQ(v[1].op, "attention_forward: fused kernel");
  EXPECT_EQ(v[2].op, "gelu_forward");
  EXPECT_EQ(v[3].op, "layernorm_forward");
  EXPECT_DOUBLE_EQ(t.total_ms(), 10.0);
  EXPECT_TRUE(cuda::OpProfileTable().sorted().empty());
}

}  // namespace
}  // namespace mpt

// ---- the host's copies of uploaded ids (host_ids.h)

TEST(HostIds, ACopyServesExactlyTheTensorUploaded) {
  using mpt::cuda::HostIdTable;
  HostIdTable t;
  alignas(64) static char mem[1024];
  const std::vector<int32_t> a = {3, 1, 4, 1, 5}, b = {9, 2, 6};
  t.record(mem, 20, a.data());
  const auto* got = t.find(mem, 20);
  ASSERT_NE(got, nullptr);
  EXPECT_EQ(got->values, a);
  EXPECT_EQ(got->min, 1);
  EXPECT_EQ(got->max, 5);
  EXPECT_EQ(t.find(mem, 16), nullptr) << "another size";
  EXPECT_EQ(t.find(mem + 4, 16), nullptr) << "another start";
  // A second tensor beside it; then an upload that overlaps the first forgets it.
  t.record(mem + 64, 12, b.data());
  EXPECT_NE(t.find(mem + 64, 12), nullptr);
  t.record(mem + 16, 8, b.data());
  EXPECT_EQ(t.find(mem, 20), nullptr) << "overwritten in part";
  EXPECT_NE(t.find(mem + 64, 12), nullptr) << "untouched";
  // A re-upload of the same tensor replaces its values.
  t.record(mem + 64, 12, a.data());
  EXPECT_EQ(t.find(mem + 64, 12)->values, std::vector<int32_t>(a.begin(), a.begin() + 3));
  EXPECT_EQ(t.size(), 2u);
  // Writes by other means (an upload, a fill, a free) forget what they touch, to the byte.
  t.forget(mem + 63, 1);
  EXPECT_NE(t.find(mem + 64, 12), nullptr) << "the byte before";
  t.forget(mem + 75, 1);
  EXPECT_EQ(t.find(mem + 64, 12), nullptr) << "the last byte";
  t.forget(mem, sizeof mem);
  EXPECT_EQ(t.size(), 0u);
}

TEST(HostIds, TheOldestCopyMakesRoom) {
  using mpt::cuda::HostIdTable;
  HostIdTable t;
  static int32_t mem[64];
  for (size_t i = 0; i <= HostIdTable::kSlots; ++i) t.record(mem + 4 * i, 16, mem);
  EXPECT_EQ(t.size(), HostIdTable::kSlots);
  EXPECT_EQ(t.find(mem, 16), nullptr);
  EXPECT_NE(t.find(mem + 4, 16), nullptr);
  EXPECT_NE(t.find(mem + 4 * HostIdTable::kSlots, 16), nullptr);
}

TEST(HostIds, ChecksNameTheFirstIdOutOfRangeAndItsPosition) {
  using mpt::cuda::HostIdTable;
  const std::vector<int32_t> ok = {0, 6, 2}, high = {0, 7, 9}, low = {1, -2};
  EXPECT_NO_THROW(mpt::cuda::check_ids("op", ok.data(), 3, 7));
  try {
    mpt::cuda::check_ids("embedding_forward", high.data(), 3, 7);
    ADD_FAILURE() << "no throw";
  } catch (const mpt::RuntimeError& e) {
    EXPECT_STREQ(e.what(), "embedding_forward: token id 7 at 1 outside [0, 7)");
  }
  EXPECT_THROW(mpt::cuda::check_ids("op", low.data(), 2, 7), mpt::RuntimeError);
  // With the recorded range: the same outcomes.
  HostIdTable t;
  static char mem[64];
  for (const auto* v : {&ok, &high, &low}) {
    t.record(mem, v->size() * 4, v->data());
    const auto* k = t.find(mem, v->size() * 4);
    const bool bad = v != &ok;
    if (bad)
      EXPECT_THROW(mpt::cuda::check_ids("op", v->data(), int64_t(v->size()), 7, k),
                   mpt::RuntimeError);
    else
      EXPECT_NO_THROW(mpt::cuda::check_ids("op", v->data(), int64_t(v->size()), 7, k));
  }
}

// The embedding backward's buckets: every position once, grouped by token in increasing token
// order, each group in increasing position order (the order the CPU backend sums in).
TEST(HostIds, BucketsGroupPositionsByTokenInOrder) {
  mpt::Rng rng(mpt::test::fresh_seed());
  for (int64_t vocab : {1, 5, 101}) {
    const int64_t n = 257;
    std::vector<int32_t> ids(n);
    for (auto& v : ids) v = static_cast<int32_t>(rng.next_u64() % vocab);
    const auto b = mpt::cuda::bucket_positions(ids.data(), n, vocab);
    const int64_t K = b.buckets;
    ASSERT_EQ(b.packed.size(), size_t(2 * K + 1 + n));
    const int32_t* token = b.packed.data();
    const int32_t* start = token + K;
    const int32_t* order = start + K + 1;
    std::vector<int> seen(n, 0);
    int64_t distinct = 0;
    std::vector<bool> present(vocab, false);
    for (int32_t v : ids) distinct += !present[v], present[v] = true;
    EXPECT_EQ(K, distinct);
    EXPECT_EQ(start[0], 0);
    EXPECT_EQ(start[K], n);
    for (int64_t k = 0; k < K; ++k) {
      if (k > 0) {
        EXPECT_LT(token[k - 1], token[k]);
      }
      ASSERT_LT(start[k], start[k + 1]) << "no empty bucket";
      for (int32_t s = start[k]; s < start[k + 1]; ++s) {
        const int32_t pos = order[s];
        ASSERT_TRUE(pos >= 0 && pos < n);
        ++seen[pos];
        EXPECT_EQ(ids[pos], token[k]);
        if (s > start[k]) {
          EXPECT_LT(order[s - 1], pos);
        }
      }
    }
    for (int c : seen) EXPECT_EQ(c, 1);
  }
}

namespace mpt {
namespace {

// The GPT-2 configs in configs/ build GPT-2's four sizes and say which GPU their micro-batch
// fits under every policy (24 GB for GPT-2 small, 80 GB for the others): the CUDA memory ledger
// (weights, gradients, optimizer state, activations and the backend's workspace on a Hopper GPU)
// agrees, with 2 GiB to spare for the CUDA context and the allocator, which the ledger does not
// count.
TEST(ShippedConfigs, Gpt2ConfigsHaveGpt2SizesAndFitTheGpuTheySay) {
  const double spare = 2.0 * (1 << 30);
  struct Shipped {
    const char* name;
    double gpu;
    double params;  // GPT-2's published counts (the unpadded vocabulary)
  };
  const Shipped configs[] = {{"gpt2-124m", 24e9, 124439808},
                             {"gpt2-350m", 80e9, 354823168},
                             {"gpt2-774m", 80e9, 774030080},
                             {"gpt2-1558m", 80e9, 1557611200}};
  for (const auto& [name, gpu, params] : configs) {
    const Config cfg = load_config(test::source_dir() + "/configs/" + name + ".yaml",
                                   {"data.train=builtin", "data.val=builtin"});  // no shards here
    EXPECT_EQ(Gpt::param_count(cfg.model), params) << name;
    const int B = cfg.training.micro_batch, T = cfg.training.seq_len;
    for (const std::string& preset : PrecisionPolicy::preset_names()) {
      const PrecisionPolicy p = PrecisionPolicy::preset(preset);
      MemoryLedger plan = Gpt::plan_memory(cfg.model, B, T, p);
      plan.workspace = cuda_workspace_bytes(cfg.model, B, T, p, plan, 9);
      std::printf("%-11s %-9s B=%-3d %6.1f GiB (activations %5.1f, workspace %4.1f)\n", name,
                  preset.c_str(), B, plan.total() / (1 << 30), plan.activations / (1 << 30),
                  plan.workspace / (1 << 30));
      EXPECT_LE(plan.total() + spare, gpu) << name << " under " << preset;
    }
  }
}

}  // namespace
}  // namespace mpt
