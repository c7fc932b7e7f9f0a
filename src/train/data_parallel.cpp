#include "train/data_parallel.h"

#include "core/error.h"

namespace mpt {

GradientReducer::GradientReducer(dist::Communicator& comm, Backend& backend, Tensor grads)
    : comm_(comm), be_(backend), grads_(grads) {
  if (!be_.host_accessible() && !comm_.reduces_device_memory())
    throw InputError("backend '" + be_.name() + "' under " + std::to_string(comm_.world_size()) +
                     " processes needs a communicator for device memory (NCCL), and this one "
                     "is '" + comm_.name() + "'");
  if (grads_.dtype != DType::f32) wide_ = be_.allocate(static_cast<size_t>(grads_.numel()) * 4);
}

void GradientReducer::all_reduce() {
  const size_t n = static_cast<size_t>(grads_.numel());
  const Tensor sum = wide_.data() ? wide_.view(0, DType::f32, grads_.shape) : grads_;
  if (wide_.data()) be_.cast(sum, grads_, TensorClass::gradient);  // widening: exact
  if (be_.host_accessible())
    comm_.all_reduce_sum(sum.as<float>(), n);
  else
    comm_.all_reduce_sum_device(sum.as<float>(), n, be_.stream());
  if (wide_.data()) be_.cast(grads_, sum, TensorClass::gradient);
}

void gather_parameters(dist::Communicator& comm, Backend& backend, Tensor params,
                       const std::vector<SlabRange>& ranges) {
  std::vector<size_t> bytes(ranges.size());
  for (size_t r = 0; r < ranges.size(); ++r) bytes[r] = ranges[r].size() * dtype_size(params.dtype);
  if (backend.host_accessible())
    comm.all_gather(params.data, bytes);
  else
    comm.all_gather_device(params.data, bytes, backend.stream());
}

}  // namespace mpt
