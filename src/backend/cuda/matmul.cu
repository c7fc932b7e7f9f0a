// NOT IMPLEMENTED YET: placeholder so the backend links while the kernels are written.
#include "backend/cuda/matmul.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

void matmul_forward(Context& ctx, Tensor out, Tensor inp, Tensor weight, Tensor bias,
                    const MatmulSpec& spec) {
  throw RuntimeError("CUDA backend: op 'matmul_forward' is not implemented yet");
}

void matmul_backward(Context& ctx, Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                     Tensor inp, Tensor weight, const MatmulSpec& spec) {
  throw RuntimeError("CUDA backend: op 'matmul_backward' is not implemented yet");
}

}  // namespace mpt::cuda
