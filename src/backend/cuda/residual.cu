// NOT IMPLEMENTED YET: placeholder so the backend links while the kernels are written.
#include "backend/cuda/residual.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

void residual_forward(Context& ctx, Tensor out, Tensor a, Tensor b) {
  throw RuntimeError("CUDA backend: op 'residual_forward' is not implemented yet");
}

}  // namespace mpt::cuda
