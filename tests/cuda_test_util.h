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
#include "config/config.h"
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

// The tiny GPT the GPU tests train: multiples of 16 in every matmul dimension (cuBLASLt's fp8
// requirement), otherwise small. Micro-batches of (kTinyB, kTinyT).
inline ModelConfig tiny_gpu_model() {
  ModelConfig m;
  m.n_layer = 2;
  m.n_head = 4;
  m.n_embd = 64;
  m.vocab_size = 256;
  m.max_seq_len = 32;
  return m;
}
constexpr int kTinyB = 4, kTinyT = 32;

// Names the tests of a policy parameter ("bf16-pure" -> "bf16_pure").
struct PolicyTestName {
  template <class P>
  std::string operator()(const ::testing::TestParamInfo<P>& info) const {
    std::string s = info.param;
    for (char& c : s) c = c == '-' ? '_' : c;
    return s;
  }
};

}  // namespace mpt::test

// First statement of every GPU test.
#define MPT_REQUIRE_GPU()                                                    \
  do {                                                                       \
    const std::string mpt_why_ = ::mpt::test::gpu_unavailable_reason();     \
    if (!mpt_why_.empty()) GTEST_SKIP() << "GPU test skipped: " << mpt_why_;      \
  } while (0)
