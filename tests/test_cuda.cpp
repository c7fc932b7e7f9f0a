// The CUDA backend's host-side behaviour, which needs no GPU: what happens without a device,
// backend selection, sizes chosen on the host. The op-by-op parity suite is test_cuda_ops.cpp
// and test_cuda_matmul.cpp.
#include <gtest/gtest.h>

#include "backend/gpu_peaks.h"
#include "cuda_test_util.h"

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

TEST(CudaHost, CublasLtWorkspaceIs32MiBOnHopperAnd4MiBElsewhere) {
  EXPECT_EQ(cuda::lt_workspace_size(9), size_t{32} << 20);
  EXPECT_EQ(cuda::lt_workspace_size(10), size_t{32} << 20);
  EXPECT_EQ(cuda::lt_workspace_size(8), size_t{4} << 20);
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
}

}  // namespace
}  // namespace mpt
