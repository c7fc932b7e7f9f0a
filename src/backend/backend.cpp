#include "backend/backend.h"

#include "backend/cpu/cpu_backend.h"
#if MPT_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_context.h"
#endif

namespace mpt {

const char* tensor_class_name(TensorClass c) {
  switch (c) {
    case TensorClass::activation: return "activations";
    case TensorClass::weight: return "weights";
    case TensorClass::gradient: return "gradients";
  }
  return "?";
}

bool backend_is_cuda(const std::string& name) {
#if MPT_HAVE_CUDA
  return name == "cuda" || (name == "auto" && cuda::device_available());
#else
  return name == "cuda";
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& name, int threads, int device) {
  if (name == "cpu") return std::make_unique<CpuBackend>(threads);
#if MPT_HAVE_CUDA
  if (name == "cuda") return std::make_unique<CudaBackend>(device);
  if (name == "auto") {
    if (cuda::device_available()) return std::make_unique<CudaBackend>(device);
    return std::make_unique<CpuBackend>(threads);
  }
#else
  if (name == "auto") return std::make_unique<CpuBackend>(threads);
  if (name == "cuda")
    throw InputError(
        "backend 'cuda' is not available: this mpt was built without the CUDA toolkit (nvcc "
        "not found at configure time); use backend: cpu or auto");
#endif
  throw InputError("unknown backend '" + name + "' (valid: cpu, cuda, auto)");
}

}  // namespace mpt
