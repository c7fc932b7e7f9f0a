// Shared by the CUDA backend's tests: a GPU-or-skip guard, and a CPU reference twin.
//
// Without a CUDA build or without a usable GPU every GPU test skips with a message that says
// which (GTEST_SKIP), so CI machines without a GPU pass while showing what did not run.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
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

// MPT_GPU_TESTS_ON_CPU=1: the GPU tests' self-check. The backend under test is a second CPU
// backend (one thread), so that every test that needs only the Backend interface runs here, on
// any machine: its set-up, shapes, guards, tolerances and expectations are exercised before
// scarce GPU time is spent on them (the CPU agrees with itself, so what fails is the test).
// Tests of the CUDA backend's own parts (its context, profiler, GPU-only behaviour) skip.
inline bool gpu_tests_on_cpu() {
  const char* v = std::getenv("MPT_GPU_TESTS_ON_CPU");
  return v && std::string(v) == "1";
}

// The backend the GPU tests test: the CUDA backend, or in the self-check a CPU backend.
inline std::unique_ptr<Backend> gpu_backend_under_test(int threads = 1) {
  if (gpu_tests_on_cpu()) return std::make_unique<CpuBackend>(1);
  return make_backend("cuda", threads);
}

// Why GPU tests cannot run here, or "" when they can.
inline std::string gpu_unavailable_reason() {
  if (gpu_tests_on_cpu()) return "";
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

// First statement of a GPU test that needs the CUDA backend itself (its context, its profiler,
// behaviour only a GPU has): skipped in the self-check too.
#define MPT_REQUIRE_CUDA_BACKEND()                                                         \
  do {                                                                                     \
    if (::mpt::test::gpu_tests_on_cpu())                                                   \
      GTEST_SKIP() << "GPU test skipped in the CPU self-check: it needs the CUDA backend"; \
    MPT_REQUIRE_GPU();                                                                     \
  } while (0)

// First statement of every GPU test.
#define MPT_REQUIRE_GPU()                                                    \
  do {                                                                       \
    const std::string mpt_why_ = ::mpt::test::gpu_unavailable_reason();     \
    if (!mpt_why_.empty()) GTEST_SKIP() << "GPU test skipped: " << mpt_why_;      \
  } while (0)
