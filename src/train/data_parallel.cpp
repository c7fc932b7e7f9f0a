#include "train/data_parallel.h"

#include "core/error.h"
#include "core/formats.h"

namespace mpt {

namespace {

// 16-bit gradients: widened, summed in fp32, rounded to nearest once.
template <class H>
void reduce_widened(dist::Communicator& comm, H* g, size_t n, std::vector<float>& scratch,
                    H (*narrow)(float)) {
  scratch.resize(n);
  for (size_t i = 0; i < n; ++i) scratch[i] = to_float(g[i]);
  comm.all_reduce_sum(scratch.data(), n);
  for (size_t i = 0; i < n; ++i) g[i] = narrow(scratch[i]);
}

}  // namespace

void all_reduce_gradients(dist::Communicator& comm, Tensor grads, std::vector<float>& scratch) {
  const size_t n = static_cast<size_t>(grads.numel());
  switch (grads.dtype) {
    case DType::f32: return comm.all_reduce_sum(grads.as<float>(), n);
    case DType::bf16: return reduce_widened(comm, grads.as<bf16>(), n, scratch, &bf16_from_float);
    case DType::f16: return reduce_widened(comm, grads.as<f16>(), n, scratch, &f16_from_float);
    default:
      throw RuntimeError(std::string("all_reduce_gradients: gradients in ") +
                         dtype_name(grads.dtype));
  }
}

void gather_parameters(dist::Communicator& comm, Tensor params,
                       const std::vector<SlabRange>& ranges) {
  std::vector<size_t> bytes(ranges.size());
  for (size_t r = 0; r < ranges.size(); ++r) bytes[r] = ranges[r].size() * dtype_size(params.dtype);
  comm.all_gather(params.data, bytes);
}

}  // namespace mpt
