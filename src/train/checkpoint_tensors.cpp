#include "train/checkpoint_tensors.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

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
std::vector<SlabRange> ranges_of_every_rank(dist::Communicator& comm, const AdamW& optimizer,
                                            size_t slab) {
  const int world = comm.world_size();
  std::vector<uint64_t> bounds(2 * static_cast<size_t>(world));
  bounds[2 * comm.rank()] = optimizer.range().begin;
  bounds[2 * comm.rank() + 1] = optimizer.range().end;
  comm.all_gather(bounds.data(), std::vector<size_t>(world, 2 * sizeof(uint64_t)));
  std::vector<SlabRange> ranges(world);
  uint64_t expect = 0;
  for (int r = 0; r < world; ++r) {
    MPT_CHECK(bounds[2 * r] == expect && bounds[2 * r + 1] >= expect,
              "the optimizer ranges of the processes do not tile the parameter slab");
    ranges[r] = {bounds[2 * r], bounds[2 * r + 1]};
    expect = bounds[2 * r + 1];
  }
  MPT_CHECK(expect == slab, "the optimizer ranges of the processes do not cover the slab");
  return ranges;
}

}  // namespace

// ZeRO-1's state in a checkpoint: tensors that lie across the processes' ranges of the slab.
// The writer asks for tensor k by broadcasting k (-1: the save is over); then every process
// copies the part of it inside its range to the host and the parts are gathered to the writer,
// in rank order, which is slab order, into the writer's destination. A request protocol rather
// than an agreed order: the other processes need not know in which order, or how often, the
// safetensors writer fetches the tensors.
class ShardedState {
 public:
  ShardedState(Backend& be, dist::Communicator& comm, std::vector<SlabRange> ranges)
      : be_(be), comm_(comm), ranges_(std::move(ranges)) {}

  // Tensor `first`..`first + count` of the slab, of which this process holds `state` (its range
  // of a flat fp32 state vector). Returns the tensor's index for fetch().
  size_t add(Tensor state, uint64_t first, uint64_t count) {
    parts_.push_back({state, first, count});
    return parts_.size() - 1;
  }

  // On the writer: tensor k, whole, into dst.
  void fetch(size_t k, void* dst) {
    int64_t request = static_cast<int64_t>(k);
    comm_.broadcast(&request, sizeof(request), kWriter);
    const Part& p = parts_.at(k);
    char* at = static_cast<char*>(dst);
    const auto [lo, hi] = own_piece(p);
    if (hi > lo) copy_piece(p, lo, hi, at + (lo - p.first) * sizeof(float));
    comm_.gather(dst, blocks(p), kWriter);
  }

  // On the others: answers requests until the writer says the save is over.
  void serve() {
    std::vector<char> stage;
    for (;;) {
      int64_t request = -1;
      comm_.broadcast(&request, sizeof(request), kWriter);
      if (request < 0) return;
      MPT_CHECK(static_cast<size_t>(request) < parts_.size(),
                "the writer asked for checkpoint tensor " + std::to_string(request) + " of " +
                    std::to_string(parts_.size()));
      const Part& p = parts_[static_cast<size_t>(request)];
      const auto [lo, hi] = own_piece(p);
      stage.resize((hi - lo) * sizeof(float));
      if (hi > lo) copy_piece(p, lo, hi, stage.data());
      comm_.gather(stage.data(), blocks(p), kWriter);
    }
  }

  void finish() {
    int64_t request = -1;
    comm_.broadcast(&request, sizeof(request), kWriter);
  }

  bool writer() const { return comm_.rank() == kWriter; }

 private:
  static constexpr int kWriter = 0;
  struct Part {
    Tensor state;
    uint64_t first, count;
  };

  // The part of tensor p inside range r, as slab elements [lo, hi) (lo == hi: none).
  static std::pair<uint64_t, uint64_t> piece(const Part& p, const SlabRange& r) {
    const uint64_t lo = std::max<uint64_t>(p.first, r.begin);
    const uint64_t hi = std::min<uint64_t>(p.first + p.count, r.end);
    return {lo, std::max(lo, hi)};
  }
  std::pair<uint64_t, uint64_t> own_piece(const Part& p) const {
    return piece(p, ranges_[comm_.rank()]);
  }
  void copy_piece(const Part& p, uint64_t lo, uint64_t hi, void* dst) const {
    const uint64_t begin = ranges_[comm_.rank()].begin;
    be_.copy_to_host(dst, p.state.slice(static_cast<int64_t>(lo - begin),
                                        static_cast<int64_t>(hi - lo)));
  }
  std::vector<size_t> blocks(const Part& p) const {
    std::vector<size_t> bytes(ranges_.size());
    for (size_t r = 0; r < ranges_.size(); ++r) {
      const auto [lo, hi] = piece(p, ranges_[r]);
      bytes[r] = (hi - lo) * sizeof(float);
    }
    return bytes;
  }

  Backend& be_;
  dist::Communicator& comm_;
  std::vector<SlabRange> ranges_;
  std::vector<Part> parts_;
};

void CheckpointTensors::serve() const {
  if (sharded && !sharded->writer()) sharded->serve();
}

void CheckpointTensors::saved() const {
  if (sharded && sharded->writer()) sharded->finish();
}

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
  // ZeRO-1: the moments (and the master) lie across the processes' ranges; each is gathered to
  // the writer when its writer reaches it.
  MPT_CHECK(comm != nullptr, "checkpoint_tensors: a sharded optimizer needs its communicator");
  const size_t slab = static_cast<size_t>(model.all_grads().numel());
  out.sharded = std::make_shared<ShardedState>(
      be, *comm, ranges_of_every_rank(*comm, optimizer, slab));
  const std::shared_ptr<ShardedState>& state = out.sharded;
  const Tensor master = optimizer.range_master();
  for (size_t i = 0; i < model.params().size(); ++i) {
    const ParamInfo& info = model.params()[i];
    const uint64_t n = static_cast<uint64_t>(info.shape.numel());
    auto gathered = [&](const std::string& name, Tensor range_state) {
      const size_t k = state->add(range_state, info.offset, n);
      return safetensors::TensorRef{name, DType::f32, info.shape, nullptr,
                                    [state, k](void* dst) { state->fetch(k, dst); }};
    };
    out.weights.push_back(master.defined() ? gathered(info.name, master)
                                           : ref(info.name, model.weights(i)));
    out.moments.push_back(gathered(exp_avg_name(info.name), optimizer.range_exp_avg()));
    out.moments.push_back(gathered(exp_avg_sq_name(info.name), optimizer.range_exp_avg_sq()));
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
