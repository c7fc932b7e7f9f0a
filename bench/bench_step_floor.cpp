// The floor of a training step on a GPU, per precision policy, from shapes alone (no GPU, no
// compute: a shape-only TracingBackend, backend/op_cost.h): for every op of one step (forward,
// backward, gradient norm, AdamW), the products it must compute and the fewest bytes it must
// move, over a GPU's ceilings; the step's floor is the sum of its ops' floors, and the
// tokens/s no implementation of these ops can beat on that GPU. What a measured step
// (bench_gpu_train) is read against, and how much each op could still win.
//
//   build/bench/bench_step_floor [--config configs/gpt2-124m.yaml] [--batch B] [--seq T]
//       [--accum N] [--policies fp32,tf32,fp16,bf16,fp8,bf16+recompute,config]
//       [--gpu "NVIDIA H200"] [--gbps 4800] [--tflops fp32=67,tf32=494.7,...] [--ops POLICY]
//       [--json PATH]
//
// The model, the micro-batch (B x T) and the micro-batches per optimizer step are the config's
// (training.micro_batch, seq_len, grad_accum or global_batch_tokens for one process) unless
// --batch, --seq or --accum say otherwise. A policy is a preset, "P+recompute" (preset P with
// training.recompute gelu+layernorm), "fp8+unfused" (fp8 with its LayerNorms stored in 16 bits
// for the GEMMs to quantise, MPT_FP8_PRODUCERS=0), or "config": the config's own policy (its
// precision with its dtypes, loss_scale and fp8 sections) and training.recompute.
//
// Ceilings: by default the datasheet figures of --gpu (backend/gpu_peaks.h's dense peaks and
// memory bandwidth; an unknown GPU needs --gbps and --tflops) - a floor no run can beat. bench_gpu_train reads the same costs
// against the ceilings it measures on the GPU itself. --tflops overrides single formats.
// --ops POLICY prints that policy's ops, the costliest floors first.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/gpu_peaks.h"
#include "backend/op_cost.h"
#include "bench_common.h"
#include "config/config.h"
#include "core/error.h"
#include "io/files.h"
#include "model/gpt.h"
#include "optim/adamw.h"
#include "precision/policy.h"
#include "train/trainer.h"

using namespace mpt;

namespace {

// A positive number from the whole of `v` (strtod), or 0.
double positive(const std::string& v) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  return !v.empty() && *end == '\0' && x > 0 && std::isfinite(x) ? x : 0.0;
}

const char* const kUsage =
    "usage: bench_step_floor [--config PATH] [--batch B] [--seq T] [--accum N] "
    "[--policies P,...] [--gpu NAME] [--gbps GB/s] [--tflops FORMAT=TFLOPS,...] [--ops POLICY] "
    "[--json PATH]\n";

int usage(const std::string& why) {
  std::fprintf(stderr, "bench_step_floor: %s\n%s", why.c_str(), kUsage);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path = std::string(MPT_SOURCE_DIR) + "/configs/gpt2-124m.yaml";
  std::string policies = "fp32,tf32,fp16,bf16,fp8,bf16+recompute", gpu = "NVIDIA H200";
  std::string tflops_arg, ops_policy, json_path;
  int B = 0, T = 0, accum_arg = 0;  // 0: the config's
  double gbps = 0;                  // 0: --gpu's datasheet figure
  const int rc = bench::for_each_option(argc, argv, "bench_step_floor", kUsage,
                                        [&](const std::string& k, const std::string& v) {
    if (k == "--config") config_path = v;
    else if (k == "--batch" || k == "--seq" || k == "--accum") {
      const std::optional<long> x = bench::whole_number(v, 1, 1 << 20);
      if (!x) return usage(k + " " + v + ": expected a whole number from 1 to 1048576");
      (k == "--batch" ? B : k == "--seq" ? T : accum_arg) = static_cast<int>(*x);
    }
    else if (k == "--policies") policies = v;
    else if (k == "--gpu") gpu = v;
    else if (k == "--gbps") {
      if (!(gbps = positive(v))) return usage("--gbps " + v + ": expected a positive number of GB/s");
    }
    else if (k == "--tflops") tflops_arg = v;
    else if (k == "--ops") ops_policy = v;
    else if (k == "--json") json_path = v;
    else return usage("unknown option " + k);
    return -1;
  });
  if (rc >= 0) return rc;
  // Every policy name checked before anything is printed: a preset, P+recompute or config, once.
  std::vector<std::string> policy_names;
  {
    std::stringstream names(policies);
    for (std::string name; std::getline(names, name, ',');) {
      if (name != "config") {
        try {
          const bench::BenchPolicy p = bench::parse_policy_name(name);
          (void)PrecisionPolicy::preset(p.preset);
          // A floor counts what the ops must move, not how the GEMMs store their outputs.
          if (p.direct_out)
            return usage("--policies: '" + name + "': '+direct' changes no floor");
          if (p.fp8_unfused && PrecisionPolicy::preset(p.preset).matmul != MatmulPrecision::fp8)
            return usage("--policies: '" + name + "': '+unfused' applies to fp8 only");
        } catch (const std::exception& e) {
          return usage("--policies: '" + name + "': " + e.what());
        }
      }
      if (std::find(policy_names.begin(), policy_names.end(), name) != policy_names.end())
        return usage("--policies: '" + name + "' is named twice");
      policy_names.push_back(name);
    }
    if (policy_names.empty() || policies.back() == ',')
      return usage("--policies '" + policies + "': expected a comma-separated list of policies");
  }
  if (!ops_policy.empty() &&
      std::find(policy_names.begin(), policy_names.end(), ops_policy) == policy_names.end())
    return usage("--ops " + ops_policy + ": not one of --policies " + policies);
  if (gbps == 0) {
    gbps = peak_bandwidth(gpu) / 1e9;
    if (gbps == 0)
      return usage("--gpu '" + gpu + "': no datasheet figures for it (known: " +
                   known_gpu_names() + "); give its --gbps and --tflops");
  }

  try {
    const Config cfg = load_config(config_path, {"data.train=builtin", "data.val=builtin"});
    const ModelConfig& m = cfg.model;
    if (B == 0) B = cfg.training.micro_batch;
    if (T == 0) T = cfg.training.seq_len;
    if (T > m.max_seq_len)
      return usage("--seq " + std::to_string(T) + " exceeds the config's model.max_seq_len (" +
                   std::to_string(m.max_seq_len) + ")");
    TrainingConfig shape = cfg.training;
    shape.micro_batch = B;
    shape.seq_len = T;
    const int accum = accum_arg ? accum_arg : micro_batches_per_step(shape, 1);
    Ceilings ceil;
    ceil.bytes_per_s = gbps * 1e9;
    for (int f = 0; f < kPeakFormats; ++f)
      ceil.flops_per_s[f] = peak_flops(gpu, peak_format_name(static_cast<PeakFormat>(f)));
    std::stringstream tf(tflops_arg);
    for (std::string item; std::getline(tf, item, ',');) {
      const size_t eq = item.find('=');
      int f = 0;
      while (f < kPeakFormats &&
             (eq == std::string::npos || item.substr(0, eq) != peak_format_name(PeakFormat(f))))
        ++f;
      if (f == kPeakFormats) return usage("--tflops: '" + item + "' is not FORMAT=TFLOPS with "
                                          "FORMAT one of fp32, tf32, fp16, bf16, fp8");
      const double tf = positive(item.substr(eq + 1));
      if (!tf) return usage("--tflops '" + item + "': expected a positive number of TFLOP/s");
      ceil.flops_per_s[f] = tf * 1e12;
    }

    std::printf("step floor: %s (%d layers, width %d, vocabulary %d), batch %d x seq %d x %d "
                "micro-batches a step\n",
                config_path.c_str(), m.n_layer, m.n_embd, m.vocab_size, B, T, accum);
    std::printf("ceilings (%s): %.0f GB/s; TFLOP/s", gpu.c_str(), gbps);
    for (int f = 0; f < kPeakFormats; ++f)
      std::printf(" %s %.1f", peak_format_name(PeakFormat(f)), ceil.flops_per_s[f] / 1e12);
    std::printf("\n%-15s %9s %9s %9s %9s %12s %9s %9s\n", "policy", "floor ms", "bytes ms",
                "math ms", "GB", "tokens/s", "vs fp32", "vs bf16");

    nlohmann::json results = nlohmann::json::array();
    std::string ops_text;
    for (const std::string& name : policy_names) {
      const bool own = name == "config";
      const bench::BenchPolicy parsed = bench::parse_policy_name(name);
      const PrecisionPolicy policy =
          own ? PrecisionPolicy::from_config(cfg) : PrecisionPolicy::preset(parsed.preset);
      const Recompute recompute = own ? recompute_from_name(cfg.training.recompute) : parsed.recompute;
      CostTable table(ceil);
      TracingBackend shapes = TracingBackend::shape_only(nullptr);
      std::optional<ScopedEnv> unfused;  // read by Gpt's constructor
      if (parsed.fp8_unfused) unfused.emplace("MPT_FP8_PRODUCERS", "0");
      Gpt g(m, shapes, policy, recompute);
      OptimizerConfig oc;
      AdamW opt(oc, g, shapes);
      std::vector<int32_t> ids(size_t(B) * T, 0);  // never read: nothing is executed
      auto step = [&] {
        g.zero_grad();
        for (int a = 0; a < accum; ++a) {
          g.forward(ids.data(), ids.data(), B, T, 1.0f / float(B * T * accum));
          g.backward();
        }
        g.end_step();
        opt.step(oc.lr, opt.clip_scale(opt.grad_norm()));
      };
      step();  // the first step allocates the activations; the second is the steady state
      shapes.set_observer(&table);
      try {
        step();
      } catch (const RuntimeError& e) {  // a format the ceilings have no rate for
        if (std::string(e.what()).find("no rate was given") == std::string::npos) throw;
        return usage(name + ": " + e.what() + " on " + gpu +
                     ": give it with --tflops FORMAT=TFLOPS, or leave the policy out");
      }
      nlohmann::json ops = nlohmann::json::array();
      std::vector<OpTotals> rows = table.rows();
      for (const OpTotals& t : rows)
        ops.push_back({{"op", t.cost.op}, {"calls", t.calls}, {"gflop", t.cost.total_flops() / 1e9},
                       {"gb", t.cost.bytes / 1e9}, {"floor_ms", t.floor_s * 1e3},
                       {"bound", t.mostly_memory_bound() ? "memory" : "math"}});
      // The step's two totals alone (its floor sums each op's larger one): the bytes' time, and
      // the products' (linear in each format's FLOPs, so the summed cost's).
      const OpTotals all = table.total();
      OpCost math = all.cost;
      math.bytes = math.host_bytes = 0;
      const double floor_s = all.floor_s, bytes_s = all.cost.bytes / ceil.bytes_per_s;
      const double math_s = math.total_flops() > 0 ? floor_seconds(math, ceil) : 0.0;
      const double tokens_per_s = double(B) * T * accum / floor_s;
      results.push_back({{"policy", name}, {"floor_ms", floor_s * 1e3}, {"bytes_ms", bytes_s * 1e3},
                         {"math_ms", math_s * 1e3}, {"gb", all.cost.bytes / 1e9},
                         {"gflop", all.cost.total_flops() / 1e9},
                         {"floor_tokens_per_s", tokens_per_s}, {"ops", ops}});
      if (name == ops_policy) {  // printed after the policies' table
        std::sort(rows.begin(), rows.end(),
                  [](const OpTotals& a, const OpTotals& b) { return a.floor_s > b.floor_s; });
        char line[256];
        std::snprintf(line, sizeof line,
                      "%s, op by op (the largest floors first):\n  %-26s %6s %10s %9s %9s %7s\n",
                      name.c_str(), "op", "calls", "GFLOP", "GB", "floor ms", "bound");
        ops_text = line;
        for (const OpTotals& t : rows) {
          std::snprintf(line, sizeof line, "  %-26s %6lld %10.1f %9.3f %9.3f %7s\n",
                        t.cost.op.c_str(), (long long)t.calls, t.cost.total_flops() / 1e9,
                        t.cost.bytes / 1e9, t.floor_s * 1e3,
                        t.mostly_memory_bound() ? "memory" : "math");
          ops_text += line;
        }
      }
    }
    bench::add_ratios(results, "floor_tokens_per_s");
    const bool f32 = bench::find_policy(results, "fp32"), b16 = bench::find_policy(results, "bf16");
    for (auto& r : results) {
      auto ratio = [](bool have_base, double v) {  // "-" when that policy was not run
        char buf[32];
        if (!have_base) return std::string("        -");
        std::snprintf(buf, sizeof buf, "%8.2fx", v);
        return std::string(buf);
      };
      std::printf("%-15s %9.2f %9.2f %9.2f %9.2f %12.0f %s %s\n",
                  r["policy"].get<std::string>().c_str(), double(r["floor_ms"]),
                  double(r["bytes_ms"]), double(r["math_ms"]), double(r["gb"]),
                  double(r["floor_tokens_per_s"]),
                  ratio(f32, double(r["vs_fp32"])).c_str(),
                  ratio(b16, double(r["vs_bf16"])).c_str());
    }
    std::fputs(ops_text.c_str(), stdout);
    if (!json_path.empty()) {
      nlohmann::json ceil_j = {{"gbps", gbps}, {"gpu", gpu}};
      for (int f = 0; f < kPeakFormats; ++f)
        ceil_j[std::string(peak_format_name(PeakFormat(f))) + "_tflops"] =
            ceil.flops_per_s[f] / 1e12;
      write_file_atomic(json_path, nlohmann::json({{"config", config_path}, {"batch", B},
                                                   {"seq", T}, {"micro_batches", accum},
                                                   {"ceilings", ceil_j},
                                                   {"policies", results}})
                                           .dump(1) +
                                       "\n");
    }
  } catch (const InputError& e) {  // a bad config
    std::fprintf(stderr, "bench_step_floor: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_step_floor: %s\n", e.what());
    return 1;
  }
  return 0;
}
