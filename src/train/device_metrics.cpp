#include "train/device_metrics.h"

#include <algorithm>
#include <cstdio>

#include <spdlog/spdlog.h>

namespace mpt {

std::string memory_shortfall(const MemoryLedger& plan, const MemoryUsage& usage,
                             const GpuInfo& gpu, double host_bytes, int host_ranks) {
  const bool device = usage.device_total_bytes > 0;
  host_ranks = std::max(host_ranks, 1);
  const double have =
      device ? double(usage.device_total_bytes) - double(usage.device_used_bytes) +
                   double(usage.bytes)
             : host_bytes / host_ranks;
  if (have <= 0 || plan.total() <= have) return "";
  const double gib = double(1 << 30);
  char where[256];
  if (device)
    std::snprintf(where, sizeof where, "the GPU (%s) has %.1f GiB free of %.1f GiB",
                  gpu.gpu_name.empty() ? "unnamed" : gpu.gpu_name.c_str(), have / gib,
                  double(usage.device_total_bytes) / gib);
  else if (host_ranks == 1)
    std::snprintf(where, sizeof where, "the machine has %.1f GiB", have / gib);
  else
    std::snprintf(where, sizeof where,
                  "the machine's %.1f GiB are shared by %d processes of this job (%.1f GiB each)",
                  host_bytes / gib, host_ranks, have / gib);
  char msg[640];
  std::snprintf(msg, sizeof msg,
                "this run needs about %.1f GiB (%.1f GiB of activations) but %s; reduce "
                "training.micro_batch (raising training.grad_accum keeps the batch), "
                "training.seq_len, model.n_layer, model.n_embd, model.vocab_size or "
                "model.max_seq_len",
                plan.total() / gib, plan.activations / gib, where);
  return msg;
}

DeviceMetrics::DeviceMetrics(const Backend& backend, const PrecisionPolicy& policy,
                             double flops_per_token, const MemoryLedger& plan, int world)
    : backend_(backend),
      peak_(policy_peak(backend.gpu_info().gpu_name, policy.matmul, policy.activation)),
      flops_per_token_(flops_per_token),
      predicted_(plan.total()),
      world_(world) {}

nlohmann::json DeviceMetrics::start_fields() const {
  return {{"peak_flops", peak_.flops > 0 ? nlohmann::json(peak_.flops) : nlohmann::json()},
          {"peak_flops_format", peak_.format}};
}

nlohmann::json DeviceMetrics::step_fields(double tokens_per_s) const {
  const std::optional<double> mfu =
      model_flops_utilization(flops_per_token_, tokens_per_s, peak_.flops, world_);
  const MemoryUsage m = backend_.memory_usage();
  nlohmann::json j = {{"mfu", mfu ? nlohmann::json(*mfu) : nlohmann::json()},
                      {"memory_bytes", m.bytes},
                      {"peak_memory_bytes", m.peak_bytes}};
  if (m.device_total_bytes > 0) j["device_memory_bytes"] = m.device_used_bytes;
  return j;
}

std::optional<nlohmann::json> DeviceMetrics::memory_check(int64_t step) {
  if (checked_) return std::nullopt;
  checked_ = true;
  const MemoryUsage m = backend_.memory_usage();
  const double ratio = predicted_ > 0 ? double(m.peak_bytes) / predicted_ : 0.0;
  nlohmann::json ev = {{"event", "memory"},
                       {"step", step},
                       {"peak_memory_bytes", m.peak_bytes},
                       {"predicted_bytes", predicted_},
                       {"memory_vs_plan", ratio}};
  if (m.device_total_bytes > 0) {
    ev["device_memory_bytes"] = m.device_used_bytes;
    ev["device_total_bytes"] = m.device_total_bytes;
  }
  if (ratio > 1.0 + kMemoryPlanMargin)
    spdlog::warn("memory: the backend's peak, {:.1f} MiB, exceeds the predicted {:.1f} MiB by "
                 "{:.1f}% (more than the {:.0f}% margin): the memory ledger misses something",
                 m.peak_bytes / 1048576.0, predicted_ / 1048576.0, 100.0 * (ratio - 1.0),
                 100.0 * kMemoryPlanMargin);
  return ev;
}

}  // namespace mpt
