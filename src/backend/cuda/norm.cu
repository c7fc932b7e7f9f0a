// NOT IMPLEMENTED YET: placeholder so the backend links while the kernels are written.
#include "backend/cuda/norm.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

double sum_squares(Context& ctx, Tensor t) {
  throw RuntimeError("CUDA backend: op 'sum_squares' is not implemented yet");
}

}  // namespace mpt::cuda
