// NOT IMPLEMENTED YET: placeholder so the backend links while the kernels are written.
#include "backend/cuda/adamw.cuh"

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {

void adamw_update(Context& ctx, Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                  const AdamWParams& p, AdamWStats* stats) {
  throw RuntimeError("CUDA backend: op 'adamw_update' is not implemented yet");
}

}  // namespace mpt::cuda
