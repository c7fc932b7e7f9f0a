// The key mapping of float_order.h, applied in place on the device (grid-stride loops).
#include "dist/ordered_max.cuh"

#include <algorithm>
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "dist/float_order.h"

namespace mpt::dist {
namespace {

constexpr int kThreads = 256;

// The buffer is read and written as 32-bit words only (the floats' bits), never as float and
// uint32 at once.
__global__ void to_keys_kernel(uint32_t* words, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    words[i] = order_key_of_bits(words[i]);
}

__global__ void from_keys_kernel(uint32_t* words, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    words[i] = bits_of_order_key(words[i]);
}

unsigned blocks(size_t n) {
  return static_cast<unsigned>(std::min<size_t>((n + kThreads - 1) / kThreads, 4096));
}

}  // namespace

void floats_to_order_keys(float* data, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  to_keys_kernel<<<blocks(n), kThreads, 0, stream>>>(reinterpret_cast<uint32_t*>(data), n);
  MPT_CUDA_CHECK(cudaGetLastError());
}

void order_keys_to_floats(float* data, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  from_keys_kernel<<<blocks(n), kThreads, 0, stream>>>(reinterpret_cast<uint32_t*>(data), n);
  MPT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mpt::dist
