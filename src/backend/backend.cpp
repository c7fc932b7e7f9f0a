#include "backend/backend.h"

#include "backend/cpu/cpu_backend.h"

namespace mpt {

const char* tensor_class_name(TensorClass c) {
  switch (c) {
    case TensorClass::activation: return "activations";
    case TensorClass::weight: return "weights";
    case TensorClass::gradient: return "gradients";
  }
  return "?";
}

std::unique_ptr<Backend> make_backend(const std::string& name, int threads) {
  if (name == "cpu" || name == "auto") return std::make_unique<CpuBackend>(threads);
  if (name == "cuda")
    throw InputError(
        "backend 'cuda' is not available: this version of mpt has no CUDA backend yet "
        "(use backend: cpu or auto)");
  throw InputError("unknown backend '" + name + "' (valid: cpu, cuda, auto)");
}

}  // namespace mpt
