#include "train/numerics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "core/error.h"

namespace mpt {

NumericsMonitor::NumericsMonitor(const PrecisionPolicy& policy, Backend& backend, const Gpt& model)
    : policy_(policy), be_(backend), model_(model) {}

void NumericsMonitor::collect() {
  for (int c = 0; c < kTensorClasses; ++c) counts_[c] += be_.cast_counts(static_cast<TensorClass>(c));
  be_.reset_cast_counts();
}

void NumericsMonitor::discard() { be_.reset_cast_counts(); }

void NumericsMonitor::after_step(const AdamWStats* taken) {
  collect();
  if (taken) {
    updates_.values += taken->values;
    updates_.lost_updates += taken->lost_updates;
  }
}

void NumericsMonitor::combine_processes(dist::Communicator& comm, bool weights_split) {
  std::vector<double> v;
  for (int c = 0; c < kTensorClasses; ++c) {
    const bool sum = weights_split || static_cast<TensorClass>(c) != TensorClass::weight;
    const bool mine = sum || comm.rank() == 0;  // else counted as rank 0 counted it
    const CastCounts& n = counts_[c];
    for (int64_t x : {n.values, n.overflow, n.underflow})
      v.push_back(mine ? static_cast<double>(x) : 0.0);
  }
  const bool mine = weights_split || comm.rank() == 0;
  v.push_back(mine ? static_cast<double>(updates_.values) : 0.0);
  v.push_back(mine ? static_cast<double>(updates_.lost_updates) : 0.0);
  comm.all_reduce_sum(v.data(), v.size());  // counts below 2^53 add exactly in double
  size_t k = 0;
  for (int c = 0; c < kTensorClasses; ++c) {
    counts_[c].values = static_cast<int64_t>(v[k++]);
    counts_[c].overflow = static_cast<int64_t>(v[k++]);
    counts_[c].underflow = static_cast<int64_t>(v[k++]);
  }
  updates_.values = static_cast<int64_t>(v[k++]);
  updates_.lost_updates = static_cast<int64_t>(v[k++]);
}

namespace {

double fraction(int64_t part, int64_t whole) {
  return whole > 0 ? static_cast<double>(part) / static_cast<double>(whole) : 0.0;
}

}  // namespace

nlohmann::json json_number(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return v;
}

nlohmann::json NumericsMonitor::interval_state(dist::Communicator* comm, bool weights_split) {
  if (comm && comm->world_size() > 1) {
    combine_processes(*comm, weights_split);
    if (comm->rank() != 0) {
      counts_ = {};
      updates_ = {};
    }
  }
  nlohmann::json casts = nlohmann::json::array();
  for (const CastCounts& n : counts_) casts.push_back({n.values, n.overflow, n.underflow});
  return {{"casts", casts}, {"updates", {updates_.values, updates_.lost_updates}}};
}

void NumericsMonitor::load_interval_state(const nlohmann::json& j, const std::string& where) {
  auto count = [&](const nlohmann::json& v) {
    if (!v.is_number_unsigned())
      throw InputError(where + ": numerics.interval: expected counts (whole numbers >= 0), got " +
                       v.dump());
    return v.get<int64_t>();
  };
  const bool ok = j.is_object() && j.contains("casts") && j["casts"].is_array() &&
                  j["casts"].size() == kTensorClasses && j.contains("updates") &&
                  j["updates"].is_array() && j["updates"].size() == 2;
  if (!ok) throw InputError(where + ": numerics.interval is malformed: " + j.dump());
  for (int c = 0; c < kTensorClasses; ++c) {
    const nlohmann::json& v = j["casts"][c];
    if (!v.is_array() || v.size() != 3)
      throw InputError(where + ": numerics.interval: expected [values, overflow, underflow], got " +
                       v.dump());
    counts_[c] = {count(v[0]), count(v[1]), count(v[2])};
  }
  updates_.values = count(j["updates"][0]);
  updates_.lost_updates = count(j["updates"][1]);
}

nlohmann::json NumericsMonitor::take_record() {
  nlohmann::json out = nlohmann::json::object();
  const bool casts = policy_.param != DType::f32 || policy_.activation != DType::f32 ||
                     policy_.grad != DType::f32 || policy_.matmul == MatmulPrecision::fp8;
  if (casts) {
    nlohmann::json c = nlohmann::json::object();
    for (int k = 0; k < kTensorClasses; ++k) {
      const CastCounts& n = counts_[k];
      c[tensor_class_name(static_cast<TensorClass>(k))] = {
          {"values", n.values},
          {"overflow", fraction(n.overflow, n.values)},
          {"underflow", fraction(n.underflow, n.values)}};
    }
    out["casts"] = c;
  }
  if (policy_.param == DType::bf16)
    out["bf16_lost_updates"] = fraction(updates_.lost_updates, updates_.values);

  // fp8: per GEMM group (the same linear layer across blocks), per operand: the largest amax
  // recorded in the latest step, the smallest scale in use, the oldest amax behind a scale.
  if (!model_.fp8_gemms().empty()) {
    struct Agg {
      float amax = 0;
      float scale = std::numeric_limits<float>::infinity();
      int64_t stale = -1;
      bool nan = false;
    };
    std::map<std::string, std::array<Agg, 3>> groups;
    std::vector<std::string> order;
    for (const Fp8Gemm& g : model_.fp8_gemms()) {
      if (!groups.count(g.group)) order.push_back(g.group);
      auto& a = groups[g.group];
      const Fp8TensorScaler* s[3] = {&g.inp, &g.weight, &g.dout};
      for (int i = 0; i < 3; ++i) {
        const float am = s[i]->last_amax();
        a[i].nan |= std::isnan(am);
        if (!std::isnan(am)) a[i].amax = std::max(a[i].amax, am);
        a[i].scale = std::min(a[i].scale, s[i]->scale());
        a[i].stale = std::max(a[i].stale, s[i]->steps_since_amax_max());
      }
    }
    nlohmann::json f = nlohmann::json::object();
    static const char* kOperand[3] = {"inp", "weight", "dout"};
    for (const auto& name : order) {
      nlohmann::json gj = nlohmann::json::object();
      for (int i = 0; i < 3; ++i) {
        const Agg& a = groups[name][i];
        gj[kOperand[i]] = {{"amax", a.nan ? nlohmann::json("nan") : json_number(a.amax)},
                           {"scale", json_number(a.scale)},
                           {"amax_age", a.stale}};
      }
      f[name] = gj;
    }
    out["fp8"] = f;
  }
  counts_ = {};
  updates_ = {};
  return out;
}

}  // namespace mpt
