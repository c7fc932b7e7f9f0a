// NOT IMPLEMENTED YET: placeholder so the backend links while the kernels are written.
#include "backend/cuda/fill.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

void fill(Context& ctx, Tensor t, float value) {
  throw RuntimeError("CUDA backend: op 'fill' is not implemented yet");
}

}  // namespace mpt::cuda
