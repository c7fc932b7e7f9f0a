// NOT IMPLEMENTED YET: placeholder so the backend links while the kernels are written.
#include "backend/cuda/gelu.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

void gelu_forward(Context& ctx, Tensor out, Tensor inp) {
  throw RuntimeError("CUDA backend: op 'gelu_forward' is not implemented yet");
}

void gelu_backward(Context& ctx, Tensor dinp, Tensor inp, Tensor dout) {
  throw RuntimeError("CUDA backend: op 'gelu_backward' is not implemented yet");
}

}  // namespace mpt::cuda
