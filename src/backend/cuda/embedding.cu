// NOT IMPLEMENTED YET: placeholder so the backend links while the kernels are written.
#include "backend/cuda/embedding.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

void embedding_forward(Context& ctx, Tensor out, Tensor tokens, Tensor wte, Tensor wpe) {
  throw RuntimeError("CUDA backend: op 'embedding_forward' is not implemented yet");
}

void embedding_backward(Context& ctx, Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) {
  throw RuntimeError("CUDA backend: op 'embedding_backward' is not implemented yet");
}

}  // namespace mpt::cuda
