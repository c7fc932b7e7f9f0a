#include "train/checkpoint_tensors.h"

#include <string>

#include "core/error.h"

namespace mpt {
namespace {

std::string exp_avg_name(const std::string& p) { return p + ".exp_avg"; }
std::string exp_avg_sq_name(const std::string& p) { return p + ".exp_avg_sq"; }

// Copies one named tensor of a checkpoint into a backend tensor, checking dtype and shape.
void restore_tensor(Backend& be, Tensor dst, const safetensors::File& file,
                    const std::string& name) {
  const auto& e = file.entry(name);
  if (e.dtype != dst.dtype || e.shape != dst.shape)
    throw InputError(file.path() + ": tensor '" + name + "' is " +
                     safetensors::format_name(e.dtype) + e.shape.str() + ", the model needs " +
                     safetensors::format_name(dst.dtype) + dst.shape.str());
  be.copy_from_host(dst, file.data(e));
}

}  // namespace

CheckpointTensors checkpoint_tensors(Backend& be, const Gpt& model, const AdamW& optimizer) {
  CheckpointTensors out;
  out.host.reserve(3 * model.params().size());  // no reallocation: references point into it
  auto ref = [&](const std::string& name, Tensor t) {
    if (be.host_accessible()) return safetensors::TensorRef{name, t.dtype, t.shape, t.data};
    out.host.emplace_back(t.bytes());
    be.copy_to_host(out.host.back().data(), t);
    return safetensors::TensorRef{name, t.dtype, t.shape, out.host.back().data()};
  };
  for (size_t i = 0; i < model.params().size(); ++i) {
    const std::string& name = model.params()[i].name;
    out.weights.push_back(ref(name, model.weights(i)));
    out.moments.push_back(ref(exp_avg_name(name), optimizer.exp_avg(i)));
    out.moments.push_back(ref(exp_avg_sq_name(name), optimizer.exp_avg_sq(i)));
  }
  return out;
}

void restore_tensors(Backend& be, Gpt& model, AdamW& optimizer, const Checkpoint& c) {
  for (size_t i = 0; i < model.params().size(); ++i) {
    const std::string& name = model.params()[i].name;
    restore_tensor(be, model.weights(i), c.model, name);
    restore_tensor(be, optimizer.exp_avg(i), c.optimizer, exp_avg_name(name));
    restore_tensor(be, optimizer.exp_avg_sq(i), c.optimizer, exp_avg_sq_name(name));
  }
  model.sync_params_from_master();
}

}  // namespace mpt
