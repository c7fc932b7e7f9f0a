// Shared by the CUDA backend's tests: a GPU-or-skip guard, and a CPU reference twin.
//
// Without a CUDA build or without a usable GPU every GPU test skips with a message that says
// which (GTEST_SKIP), so CI machines without a GPU pass while showing what did not run.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#if MPT_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_context.h"
#endif

namespace mpt::test {

// Why GPU tests cannot run here, or "" when they can.
inline std::string gpu_unavailable_reason() {
#if MPT_HAVE_CUDA
  std::string why;
  return cuda::device_available(&why) ? std::string() : why;
#else
  return "this build has no CUDA backend (nvcc was not found at configure time)";
#endif
}

}  // namespace mpt::test

// First statement of every GPU test.
#define MPT_REQUIRE_GPU()                                                    \
  do {                                                                       \
    const std::string mpt_why_ = ::mpt::test::gpu_unavailable_reason();     \
    if (!mpt_why_.empty()) GTEST_SKIP() << "GPU test skipped: " << mpt_why_;      \
  } while (0)
