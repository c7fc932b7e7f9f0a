#include "train/device_metrics.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <vector>

#include <spdlog/spdlog.h>

namespace mpt {

namespace {

// One cgroup limit file's value in bytes; 0 when absent, unreadable or unlimited ("max" in v2;
// v1 writes a huge page-rounded number instead, hence the bound).
double read_limit(const std::string& file) {
  std::ifstream in(file);
  std::string word;
  if (!(in >> word) || word == "max") return 0;
  char* end = nullptr;
  const double v = std::strtod(word.c_str(), &end);
  if (end == word.c_str() || *end != '\0' || !(v > 0) || v >= 0x1p62) return 0;
  return v;
}

// The lowest limit named `file` in `dir` and its parents up to `top` (the hierarchy's mount
// point): a parent's limit binds its children.
double lowest_limit(std::string dir, const std::string& top, const std::string& file,
                    std::string* where) {
  double lowest = 0;
  for (;;) {
    const std::string path = dir + "/" + file;
    const double v = read_limit(path);
    if (v > 0 && (lowest == 0 || v < lowest)) {
      lowest = v;
      if (where) *where = path;
    }
    if (dir.size() <= top.size()) break;
    dir.erase(dir.rfind('/'));
  }
  return lowest;
}

}  // namespace

double cgroup_memory_limit(const std::string& root, std::string* where) {
  // /proc/self/cgroup: "ID:CONTROLLERS:PATH" per hierarchy; v2's is "0::PATH", v1's memory
  // controller is the line whose CONTROLLERS list holds "memory".
  std::string v1_path, v2_path;
  bool has_v1 = false, has_v2 = false;
  {
    std::ifstream in(root + "/proc/self/cgroup");
    std::string line;
    while (std::getline(in, line)) {
      const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
      if (b == std::string::npos) continue;
      const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
      if (controllers.empty() && line.compare(0, a, "0") == 0) {
        has_v2 = true;
        v2_path = path;
      }
      std::stringstream list(controllers);
      for (std::string c; std::getline(list, c, ',');)
        if (c == "memory") {
          has_v1 = true;
          v1_path = path;
        }
    }
  }
  if (!has_v1 && !has_v2) return 0;
  // /proc/self/mountinfo: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER".
  // A container sees its own cgroup mounted with ROOT = its cgroup's path, so the directory is
  // MOUNTPOINT + (PATH less ROOT).
  double lowest = 0;
  std::ifstream in(root + "/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::vector<std::string> w;
    for (std::string x; f >> x;) w.push_back(x);
    const auto dash = std::find(w.begin(), w.end(), "-");
    if (w.size() < 5 || dash == w.end() || w.end() - dash < 4) continue;
    const std::string& fstype = dash[1];
    const std::string& super = dash[3];
    const std::string& mount_root = w[3];
    const std::string& mount_point = w[4];
    const bool v2 = fstype == "cgroup2" && has_v2;
    bool v1 = false;
    if (fstype == "cgroup" && has_v1) {
      std::stringstream opts(super);
      for (std::string o; std::getline(opts, o, ',');) v1 = v1 || o == "memory";
    }
    if (!v1 && !v2) continue;
    std::string rel = v1 ? v1_path : v2_path;
    const bool under_root = rel.compare(0, mount_root.size(), mount_root) == 0 &&
                            (rel.size() == mount_root.size() || rel[mount_root.size()] == '/');
    if (mount_root != "/" && under_root)
      rel.erase(0, mount_root.size());
    else if (mount_root != "/")
      rel.clear();  // this process's cgroup lies outside what is mounted: the mount's top is
                    // the nearest of its ancestors this process can read (best effort)
    while (!rel.empty() && rel.back() == '/') rel.pop_back();
    if (!rel.empty() && rel.front() != '/') rel.insert(0, "/");
    const std::string top = root + (mount_point == "/" ? "" : mount_point);
    std::string at;
    const double v = lowest_limit(top + rel, top, v1 ? "memory.limit_in_bytes" : "memory.max",
                                  &at);
    if (v > 0 && (lowest == 0 || v < lowest)) {
      lowest = v;
      if (where) *where = at.substr(root.size());
    }
  }
  return lowest;
}

HostMemory host_memory() {
  HostMemory m;
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) m.bytes = double(pages) * double(page);
  std::string where;
  const double limit = cgroup_memory_limit("", &where);
  if (limit > 0 && (m.bytes == 0 || limit < m.bytes)) {
    m.bytes = limit;
    m.limited_by = where;
  }
  return m;
}

std::string memory_shortfall(const MemoryLedger& plan, const MemoryUsage& usage,
                             const GpuInfo& gpu, const HostMemory& host, int host_ranks) {
  const bool device = usage.device_total_bytes > 0;
  host_ranks = std::max(host_ranks, 1);
  const double have =
      device ? double(usage.device_total_bytes) - double(usage.device_used_bytes) +
                   double(usage.bytes)
             : host.bytes / host_ranks;
  if (have <= 0 || plan.total() <= have) return "";
  const double gib = double(1 << 30);
  const std::string machine =
      host.limited_by.empty() ? "the machine" : "this process's memory limit (" + host.limited_by + ")";
  char where[512];
  if (device)
    std::snprintf(where, sizeof where, "the GPU (%s) has %.1f GiB free of %.1f GiB",
                  gpu.gpu_name.empty() ? "unnamed" : gpu.gpu_name.c_str(), have / gib,
                  double(usage.device_total_bytes) / gib);
  else if (host_ranks == 1)
    std::snprintf(where, sizeof where, "%s allows %.1f GiB", machine.c_str(), have / gib);
  else
    std::snprintf(where, sizeof where,
                  "%s's %.1f GiB are shared by %d processes of this job (%.1f GiB each)",
                  machine.c_str(), host.bytes / gib, host_ranks, have / gib);
  char msg[2048];
  std::snprintf(msg, sizeof msg,
                "this run needs about %.1f GiB (%.1f GiB of activations) but %s; reduce "
                "training.micro_batch (raising training.grad_accum keeps the batch), "
                "training.seq_len, model.n_layer, model.n_embd, model.vocab_size or "
                "model.max_seq_len, or, for blocks not in fp8, recompute activations in "
                "the backward (training.recompute: gelu+layernorm, the same results)",
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
