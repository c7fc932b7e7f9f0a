// In place over n device floats on `stream`: to order keys (float_order.h) before a ncclMax on
// ncclUint32, and back afterwards. Host declarations; the kernels are in ordered_max.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace mpt::dist {

void floats_to_order_keys(float* data, size_t n, cudaStream_t stream);
void order_keys_to_floats(float* data, size_t n, cudaStream_t stream);

}  // namespace mpt::dist
