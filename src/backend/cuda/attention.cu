// NOT IMPLEMENTED YET: placeholder so the backend links while the kernels are written.
#include "backend/cuda/attention.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

void attention_forward(Context& ctx, Tensor out, Tensor att, Tensor qkv, int n_head) {
  throw RuntimeError("CUDA backend: op 'attention_forward' is not implemented yet");
}

void attention_backward(Context& ctx, Tensor dqkv, Tensor dout, Tensor qkv, Tensor att,
                        int n_head) {
  throw RuntimeError("CUDA backend: op 'attention_backward' is not implemented yet");
}

}  // namespace mpt::cuda
