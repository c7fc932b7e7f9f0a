// NOT IMPLEMENTED YET: placeholder so the backend links while the kernels are written.
#include "backend/cuda/cast.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

void cast(Context& ctx, Tensor dst, Tensor src, TensorClass cls) {
  throw RuntimeError("CUDA backend: op 'cast' is not implemented yet");
}

float amax(Context& ctx, Tensor t) {
  throw RuntimeError("CUDA backend: op 'amax' is not implemented yet");
}

int64_t count_nonfinite(Context& ctx, Tensor t) {
  throw RuntimeError("CUDA backend: op 'count_nonfinite' is not implemented yet");
}

}  // namespace mpt::cuda
