#include "train/checkpoint_tensors.h"

#include <string>

#include "core/error.h"

namespace mpt {
namespace {

std::string exp_avg_name(const std::string& p) { return p + ".exp_avg"; }
std::string exp_avg_sq_name(const std::string& p) { return p + ".exp_avg_sq"; }

// The checkpoint's tensor `name`, checked to be of `dtype` and `shape`.
const void* checked_data(const safetensors::File& file, const std::string& name, DType dtype,
                         const Shape& shape) {
  const auto& e = file.entry(name);
  if (e.dtype != dtype || e.shape != shape)
    throw InputError(file.path() + ": tensor '" + name + "' is " +
                     safetensors::format_name(e.dtype) + e.shape.str() + ", the model needs " +
                     safetensors::format_name(dtype) + shape.str());
  return file.data(e);
}

// Copies one named tensor of a checkpoint into a backend tensor, checking dtype and shape.
void restore_tensor(Backend& be, Tensor dst, const safetensors::File& file,
                    const std::string& name) {
  be.copy_from_host(dst, checked_data(file, name, dst.dtype, dst.shape));
}

// Every process's range of a sharded optimizer, checked to tile the slab in rank order.
std::vector<size_t> range_bytes_of_every_rank(dist::Communicator& comm, const AdamW& optimizer,
                                              size_t slab) {
  const int world = comm.world_size();
  std::vector<uint64_t> bounds(2 * static_cast<size_t>(world));
  bounds[2 * comm.rank()] = optimizer.range().begin;
  bounds[2 * comm.rank() + 1] = optimizer.range().end;
  comm.all_gather(bounds.data(), std::vector<size_t>(world, 2 * sizeof(uint64_t)));
  std::vector<size_t> bytes(world);
  uint64_t expect = 0;
  for (int r = 0; r < world; ++r) {
    MPT_CHECK(bounds[2 * r] == expect && bounds[2 * r + 1] >= expect,
              "the optimizer ranges of the processes do not tile the parameter slab");
    bytes[r] = (bounds[2 * r + 1] - bounds[2 * r]) * sizeof(float);
    expect = bounds[2 * r + 1];
  }
  MPT_CHECK(expect == slab, "the optimizer ranges of the processes do not cover the slab");
  return bytes;
}

}  // namespace

CheckpointTensors checkpoint_tensors(Backend& be, const Gpt& model, const AdamW& optimizer,
                                     dist::Communicator* comm) {
  CheckpointTensors out;
  auto ref = [&](const std::string& name, Tensor t) {
    if (be.host_accessible()) return safetensors::TensorRef{name, t.dtype, t.shape, t.data};
    // Fetched when the writer comes to it: one tensor's bytes on the host at a time, not the
    // whole state (GPT-2 1.5B's weights and moments are ~19 GB).
    Backend* backend = &be;
    return safetensors::TensorRef{name, t.dtype, t.shape, nullptr,
                                  [backend, t](void* dst) { backend->copy_to_host(dst, t); }};
  };
  if (!optimizer.sharded()) {
    for (size_t i = 0; i < model.params().size(); ++i) {
      const std::string& name = model.params()[i].name;
      out.weights.push_back(ref(name, model.weights(i)));
      out.moments.push_back(ref(exp_avg_name(name), optimizer.exp_avg(i)));
      out.moments.push_back(ref(exp_avg_sq_name(name), optimizer.exp_avg_sq(i)));
    }
    return out;
  }
  // ZeRO-1: each process copies its range into a whole-slab host buffer; the buffers are then
  // gathered, so that every process holds the whole state (rank 0 writes it).
  MPT_CHECK(comm != nullptr, "checkpoint_tensors: a sharded optimizer needs its communicator");
  const size_t slab = static_cast<size_t>(model.all_grads().numel());
  const std::vector<size_t> bytes = range_bytes_of_every_rank(*comm, optimizer, slab);
  auto gathered = [&](Tensor range) {
    out.host.emplace_back(slab * sizeof(float));
    char* whole = out.host.back().data();
    be.copy_to_host(whole + optimizer.range().begin * sizeof(float), range);
    comm->all_gather(whole, bytes);
    return reinterpret_cast<const float*>(whole);
  };
  const float* m = gathered(optimizer.range_exp_avg());
  const float* v = gathered(optimizer.range_exp_avg_sq());
  const float* master =
      optimizer.range_master().defined() ? gathered(optimizer.range_master()) : nullptr;
  for (size_t i = 0; i < model.params().size(); ++i) {
    const ParamInfo& info = model.params()[i];
    auto at = [&](const float* whole) {
      return static_cast<const void*>(whole + info.offset);
    };
    out.weights.push_back(master ? safetensors::TensorRef{info.name, DType::f32, info.shape,
                                                          at(master)}
                                 : ref(info.name, model.weights(i)));
    out.moments.push_back({exp_avg_name(info.name), DType::f32, info.shape, at(m)});
    out.moments.push_back({exp_avg_sq_name(info.name), DType::f32, info.shape, at(v)});
  }
  return out;
}

void restore_tensors(Backend& be, Gpt& model, AdamW& optimizer, const Checkpoint& c) {
  for (size_t i = 0; i < model.params().size(); ++i)
    restore_tensor(be, model.weights(i), c.model, model.params()[i].name);
  // The moments piece by piece: a sharded optimizer holds parts of some parameters.
  for (size_t k = 0; k < optimizer.pieces().size(); ++k) {
    const ParamPiece& p = optimizer.pieces()[k];
    const ParamInfo& info = model.params()[p.param];
    for (const bool second : {false, true}) {
      const std::string name = second ? exp_avg_sq_name(info.name) : exp_avg_name(info.name);
      const auto* whole =
          static_cast<const float*>(checked_data(c.optimizer, name, DType::f32, info.shape));
      be.copy_from_host(second ? optimizer.piece_exp_avg_sq(k) : optimizer.piece_exp_avg(k),
                        whole + p.first);
    }
  }
  model.sync_params_from_master();
}

}  // namespace mpt
