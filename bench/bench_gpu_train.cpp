// GPU training throughput of GPT-2 124M (12 layers, width 768, 12 heads, vocabulary 50257
// padded to 50304, sequence 1024) under fp32, tf32, fp16, bf16 and fp8 (and bf16 recomputing
// its GELU and LayerNorm outputs: "bf16+recompute"; and bf16 and fp8 with MPT_GEMM_OUT=direct,
// the GEMMs writing their bf16 outputs themselves: "bf16+direct", "fp8+direct"; and fp8 with
// MPT_FP8_PRODUCERS=0, its LayerNorms stored in bf16 for the GEMMs to quantise: "fp8+unfused"),
// in one run on one GPU:
// tokens/s, MFU (FLOPs per token as llm.c counts them, 6N + 6*L*C*T, over the dense peak of the
// policy's matmul format on this GPU: backend/gpu_peaks.h), step time, device memory in use
// (measured and as the memory ledger predicts it), and each as a ratio to fp32 and to bf16; and
// the time of the step's attention alone (one layer's forward and backward, times the layers),
// and, where the fused kernels run it, the same with the GEMM path (MPT_ATTENTION=gemm); and one
// more step profiled op by op (the 15 ops that take the most GPU time, in the JSON); and one more
// with each backend op timed against its floor (backend/op_cost.h: the fewest bytes and the
// products it must compute, over the measured ceilings), the step's floor and the tokens/s it
// allows, as bench_step_floor predicts them from the datasheet.
// A step is forward, backward, gradient norm and AdamW, on random tokens. The median of the
// timed steps, after warm-up steps. First, the GPU's ceilings to read those against (measured,
// not from a datasheet): device-to-device copy bandwidth, and cuBLASLt GEMM rates in bf16 (fp32
// and bf16 outputs) and fp8 at 8192^3 and at the model's four forward shapes, and in fp32, tf32
// and fp16 at 8192^3.
//
//   build/bench/bench_gpu_train [--batch B] [--seq T] [--steps N] [--warmup N]
//                               [--policies fp32,bf16,...] [--json PATH]
//
// Without a GPU (or a CUDA build) it says so and exits 0: scripts/device-check runs it on one.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/gpu_peaks.h"
#include "backend/op_cost.h"
#include "bench_common.h"
#include "core/rng.h"
#include "model/cuda_workspace.h"
#include "model/gpt.h"
#include "optim/adamw.h"
#include "precision/policy.h"
#if MPT_HAVE_CUDA
#include "backend/cuda/attention_plan.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_context.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/matmul_plan.h"
#endif

using namespace mpt;

#if MPT_HAVE_CUDA
namespace {

// The JSON written whole or not at all (a temporary file renamed over it): the benchmark may be
// cut off by a timeout at any moment, and device-check reads what it left.
// Reports a failure on stderr rather than throwing: the figures are printed anyway, and a
// partial document is written from error paths.
void write_json(const std::string& path, const nlohmann::json& doc) {
  const std::string tmp = path + ".tmp";
  std::ofstream f(tmp);
  f << doc.dump(1) << "\n";
  f.close();
  if (!f || std::rename(tmp.c_str(), path.c_str()) != 0)
    std::fprintf(stderr, "bench_gpu_train: cannot write %s\n", path.c_str());
}

// Two CUDA events, destroyed with the object (also when a timed call throws).
struct EventPair {
  cudaEvent_t t0 = nullptr, t1 = nullptr;
  EventPair() {
    MPT_CUDA_CHECK(cudaEventCreate(&t0));
    MPT_CUDA_CHECK(cudaEventCreate(&t1));
  }
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;
  ~EventPair() {
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
  }
  // Milliseconds of `reps` back-to-back calls of f on `stream`.
  template <class F>
  double time(cudaStream_t stream, int reps, F& f) {
    MPT_CUDA_CHECK(cudaEventRecord(t0, stream));
    for (int r = 0; r < reps; ++r) f();
    MPT_CUDA_CHECK(cudaEventRecord(t1, stream));
    MPT_CUDA_CHECK(cudaEventSynchronize(t1));
    float e = 0;
    MPT_CUDA_CHECK(cudaEventElapsedTime(&e, t0, t1));
    return double(e);
  }
};

// Median milliseconds per call of f over 7 samples, timed with events on `stream` after two
// warm-ups. Each sample runs f back to back for at least ~2 ms, so that the GPU's idle moment
// before the first call and the host's cost of issuing a call stay small beside it.
template <class F>
double median_ms(cudaStream_t stream, F&& f) {
  EventPair ev;
  f();
  f();
  const double one = ev.time(stream, 1, f);
  const int reps = static_cast<int>(std::clamp(2.0 / std::max(one, 1e-3), 1.0, 1000.0));
  std::vector<double> ms;
  for (int i = 0; i < 7; ++i) ms.push_back(ev.time(stream, reps, f) / reps);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Device memory of `bytes` (a multiple of 8) holding random bytes with bit 6 of each clear:
// never zeros (they time faster than data, METHOD.md), and read as bf16 (bit 14, the exponent's
// top bit) or e4m3 (bit 6, likewise) every value is finite and below 2 in magnitude, so the
// timed GEMMs see no inf or NaN.
cuda::DeviceBuffer random_device(size_t bytes, Rng& rng, cudaStream_t stream) {
  if (bytes % 8 != 0) throw RuntimeError("random_device: bytes must be a multiple of 8");
  std::vector<uint64_t> h(bytes / 8);
  for (auto& x : h) x = rng.next_u64() & 0xBFBFBFBFBFBFBFBFull;
  cuda::DeviceBuffer d(bytes);
  // On the stream that reads it (a non-blocking one does not wait for the legacy stream).
  MPT_CUDA_CHECK(cudaMemcpyAsync(d.data(), h.data(), bytes, cudaMemcpyHostToDevice, stream));
  MPT_CUDA_CHECK(cudaStreamSynchronize(stream));  // h goes out of scope
  return d;
}

// The two ceilings METHOD.md asks for, measured on this GPU before the policies, so that their
// step times read against them: device memory bandwidth (a device-to-device copy, bytes read
// plus written) and the GEMM rates the policies' matmuls can reach - at 8192^3 and at GPT-2
// 124M's four forward shapes with B x T rows - in bf16 and fp8 (e4m3 x e4m3), with the fp32
// output our GEMMs write (matmul.cu stages 16-bit outputs in fp32) and, for bf16, with a bf16
// output (what writing them directly would save).
nlohmann::json measure_ceilings(cuda::Context& ctx, int64_t rows, int64_t C) {
  using namespace cuda;
  const cudaStream_t st = ctx.stream();
  Rng rng(99);
  nlohmann::json out;
  {
    const size_t bytes = size_t{2} << 30;  // far beyond the L2
    DeviceBuffer a(bytes), b(bytes);
    MPT_CUDA_CHECK(cudaMemsetAsync(a.data(), 0x5A, bytes, st));  // a copy's speed is the bytes'
    const double ms = median_ms(st, [&] {
      MPT_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, st));
    });
    out["copy_gbps"] = 2.0 * bytes / (ms / 1e3) / 1e9;
  }
  DeviceBuffer ones(2 * sizeof(float));
  const float one[2] = {1.0f, 1.0f};
  MPT_CUDA_CHECK(cudaMemcpyAsync(ones.data(), one, sizeof one, cudaMemcpyHostToDevice, st));
  MPT_CUDA_CHECK(cudaStreamSynchronize(st));
  struct Shape {
    const char* name;
    int64_t n, c, oc;
  };
  const Shape shapes[] = {{"8192^3", 8192, 8192, 8192},
                          {"qkv", rows, C, 3 * C},
                          {"attn proj", rows, C, C},
                          {"fc", rows, C, 4 * C},
                          {"mlp proj", rows, 4 * C, C}};
  nlohmann::json gemms = nlohmann::json::array();
  for (const Shape& sh : shapes) {
    nlohmann::json row = {{"shape", sh.name}, {"n", sh.n}, {"c", sh.c}, {"oc", sh.oc}};
    const double flops = 2.0 * double(sh.n) * double(sh.c) * double(sh.oc);
    DeviceBuffer x = random_device(size_t(sh.n * sh.c) * 2, rng, st);
    DeviceBuffer w = random_device(size_t(sh.oc * sh.c) * 2, rng, st);
    DeviceBuffer d(size_t(sh.n * sh.oc) * 4);
    auto rate = [&](const GemmPlan& p, const char* what, const DeviceBuffer* a = nullptr,
                    const DeviceBuffer* b = nullptr) {
      GemmArgs g;
      g.a = a ? a->data() : w.data();
      g.b = b ? b->data() : x.data();
      g.d = d.as<float>();
      if (p.fp8) g.scale_a = g.scale_b = ones.as<float>();
      if (!run_gemm(ctx, p, g, what, /*may_fail=*/true)) return nlohmann::json();  // refused
      const double ms = median_ms(st, [&] { run_gemm(ctx, p, g, what); });
      return nlohmann::json(flops / (ms / 1e3) / 1e12);
    };
    const MatmulSpec native(MatmulPrecision::native);
    GemmPlan p = plan_matmul(MatmulOp::forward, sh.n, sh.c, sh.oc, DType::bf16, DType::bf16,
                             DType::bf16, native);
    row["bf16_tflops"] = rate(p, "ceiling: bf16 GEMM");
    p.d_type = GemmType::bf16;
    row["bf16_out16_tflops"] = rate(p, "ceiling: bf16 GEMM, bf16 output");
    MatmulSpec fp8(MatmulPrecision::fp8);
    fp8.inp.format = fp8.weight.format = DType::e4m3;
    // The fp8 copies are one byte an element: the same random buffers serve (their first half).
    row["fp8_tflops"] = rate(plan_matmul(MatmulOp::forward, sh.n, sh.c, sh.oc, DType::bf16,
                                         DType::bf16, DType::bf16, fp8),
                             "ceiling: fp8 GEMM");
    if (&sh == &shapes[0]) {
      // The other formats' rates at the large shape: the ceilings a step's fp32, tf32 and fp16
      // products are read against (bench_step_floor, the op floors below). fp16 reads the same
      // random bits (bit 14 clear: finite, below 2); fp32 operands have 4 bytes an element.
      row["fp16_tflops"] = rate(plan_matmul(MatmulOp::forward, sh.n, sh.c, sh.oc, DType::f16,
                                            DType::f16, DType::f16, native),
                                "ceiling: fp16 GEMM");
      DeviceBuffer x32 = random_device(size_t(sh.n * sh.c) * 4, rng, st);
      DeviceBuffer w32 = random_device(size_t(sh.oc * sh.c) * 4, rng, st);
      row["fp32_tflops"] = rate(plan_matmul(MatmulOp::forward, sh.n, sh.c, sh.oc, DType::f32,
                                            DType::f32, DType::f32, native),
                                "ceiling: fp32 GEMM", &w32, &x32);
      row["tf32_tflops"] = rate(plan_matmul(MatmulOp::forward, sh.n, sh.c, sh.oc, DType::f32,
                                            DType::f32, DType::f32,
                                            MatmulSpec(MatmulPrecision::tf32)),
                                "ceiling: tf32 GEMM", &w32, &x32);
    }
    gemms.push_back(row);
  }
  out["gemm"] = gemms;
  return out;
}

// The ceilings the op floors are read against: the measured copy bandwidth and GEMM rates at
// 8192^3 where measure_ceilings got them, else the datasheet peaks of gpu_peaks.h for this GPU
// (and 0 bandwidth: no floors), each source named in `sources`.
Ceilings ceilings_for_floors(const nlohmann::json& measured, const std::string& gpu_name,
                             nlohmann::json& sources) {
  Ceilings c;
  const bool have = measured.is_object() && !measured.contains("error");
  if (have && measured.contains("copy_gbps")) c.bytes_per_s = double(measured["copy_gbps"]) * 1e9;
  const nlohmann::json* big =
      have && measured.contains("gemm") && !measured["gemm"].empty() ? &measured["gemm"][0]
                                                                      : nullptr;
  for (int f = 0; f < kPeakFormats; ++f) {
    const std::string name = peak_format_name(static_cast<PeakFormat>(f));
    const std::string key = name + "_tflops";
    if (big && big->contains(key) && (*big)[key].is_number()) {
      c.flops_per_s[f] = double((*big)[key]) * 1e12;
      sources[name] = "measured at 8192^3";
    } else {
      c.flops_per_s[f] = peak_flops(gpu_name, name);
      sources[name] = "datasheet";
    }
  }
  return c;
}

// Times each op a TracingBackend reports with two CUDA events on the ops' stream (the events
// reused from step to step); finish() waits for them and adds each op's time to a CostTable.
class EventObserver : public OpObserver {
 public:
  explicit EventObserver(cudaStream_t stream) : stream_(stream) {}
  EventObserver(const EventObserver&) = delete;
  EventObserver& operator=(const EventObserver&) = delete;
  ~EventObserver() {
    for (cudaEvent_t e : pool_) cudaEventDestroy(e);
  }
  void before(const OpCost&) override { began_ = record(); }
  void after(const OpCost& c) override { ops_.push_back({c, began_, record()}); }
  void finish(CostTable& table) {
    if (used_ > 0) MPT_CUDA_CHECK(cudaEventSynchronize(pool_[used_ - 1]));
    for (const Op& op : ops_) {
      float ms = 0;
      MPT_CUDA_CHECK(cudaEventElapsedTime(&ms, pool_[op.begin], pool_[op.end]));
      table.add(op.cost, double(ms));
    }
    ops_.clear();
    used_ = 0;
  }

 private:
  struct Op {
    OpCost cost;
    size_t begin, end;  // its events in pool_
  };
  size_t record() {
    if (used_ == pool_.size()) {
      cudaEvent_t e = nullptr;
      MPT_CUDA_CHECK(cudaEventCreate(&e));
      pool_.push_back(e);
    }
    MPT_CUDA_CHECK(cudaEventRecord(pool_[used_], stream_));
    return used_++;
  }
  cudaStream_t stream_;
  std::vector<cudaEvent_t> pool_;
  size_t used_ = 0, began_ = 0;
  std::vector<Op> ops_;
};

}  // namespace
#endif

int main(int argc, char** argv) {
  int B = 32, T = 1024, steps = 10, warmup = 3;
  // bf16+direct right after bf16: a run cut short by its time limit keeps that comparison.
  // fp8+unfused right after fp8 likewise.
  std::string policies =
      "fp32,tf32,fp16,bf16,bf16+direct,fp8,fp8+unfused,bf16+recompute,fp8+direct",
              json_path;
  const char* const usage =
      "usage: bench_gpu_train [--batch B] [--seq T] [--steps N] [--warmup N] [--policies P,...] "
      "[--json PATH]\n";
  // Arguments are checked before any GPU work: device time is scarce.
  const int rc = bench::for_each_option(argc, argv, "bench_gpu_train", usage,
                                        [&](const std::string& k, const std::string& v) {
    if (k == "--batch" || k == "--seq" || k == "--steps" || k == "--warmup") {
      const long lo = k == "--warmup" ? 0 : 1;
      const std::optional<long> x = bench::whole_number(v, lo, 1 << 20);
      if (!x) {
        std::fprintf(stderr, "bench_gpu_train: %s %s: expected a whole number from %ld to %d\n",
                     k.c_str(), v.c_str(), lo, 1 << 20);
        return 2;
      }
      (k == "--batch" ? B : k == "--seq" ? T : k == "--steps" ? steps : warmup) = int(*x);
    } else if (k == "--policies") {
      policies = v;
    } else if (k == "--json") {
      json_path = v;
    } else {
      std::fprintf(stderr, "bench_gpu_train: unknown option %s\n%s", k.c_str(), usage);
      return 2;
    }
    return -1;
  });
  if (rc >= 0) return rc;
  {
    std::stringstream names(policies);
    for (std::string name; std::getline(names, name, ',');) {
      try {
        const bench::BenchPolicy p = bench::parse_policy_name(name);
        const PrecisionPolicy policy = PrecisionPolicy::preset(p.preset);  // throws if unknown
        if (p.direct_out && policy.activation != DType::bf16) {
          std::fprintf(stderr,
                       "bench_gpu_train: --policies: '%s': '+direct' applies to bf16 "
                       "activations only (other outputs are always staged)\n",
                       name.c_str());
          return 2;
        }
        if (p.fp8_unfused && policy.matmul != MatmulPrecision::fp8) {
          std::fprintf(stderr,
                       "bench_gpu_train: --policies: '%s': '+unfused' applies to fp8 only\n",
                       name.c_str());
          return 2;
        }
      } catch (const std::exception& e) {
        std::fprintf(stderr, "bench_gpu_train: --policies: '%s': %s\n", name.c_str(), e.what());
        return 2;
      }
    }
  }
#if !MPT_HAVE_CUDA
  std::printf("bench_gpu_train: skipped: this build has no CUDA backend\n");
  return 0;
#else
  std::string why;
  if (!cuda::device_available(&why)) {
    std::printf("bench_gpu_train: skipped: %s\n", why.c_str());
    return 0;
  }
  ModelConfig m;
  m.n_layer = 12;
  m.n_head = 12;
  m.n_embd = 768;
  m.vocab_size = 50257;
  m.vocab_pad_multiple = 128;  // 50304, as llm.c pads it (Tensor Core friendly)
  m.max_seq_len = T;

  Rng rng(1234);
  std::vector<int32_t> in(static_cast<size_t>(B) * T), tg(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    in[i] = static_cast<int32_t>(rng.below(m.vocab_size));
    tg[i] = static_cast<int32_t>(rng.below(m.vocab_size));
  }

  nlohmann::json results = nlohmann::json::array();
  std::string device;
  nlohmann::json ceilings;
  try {  // context for the policies' figures, not a reason to lose them: a failure is recorded
    CudaBackend be(0);
    ceilings = measure_ceilings(be.context(), int64_t{B} * T, m.n_embd);
    std::printf("ceilings: device-to-device copy %.0f GB/s (read + write)\n",
                double(ceilings["copy_gbps"]));
    std::printf("%-10s %6s %6s %6s %14s %18s %12s\n", "GEMM", "N", "C", "OC", "bf16 TFLOP/s",
                "bf16 out16 TFLOP/s", "fp8 TFLOP/s");
    auto num = [](const nlohmann::json& j) { return j.is_null() ? -1.0 : double(j); };
    for (const auto& g : ceilings["gemm"])
      std::printf("%-10s %6lld %6lld %6lld %14.0f %18.0f %12.0f\n",
                  g["shape"].get<std::string>().c_str(), (long long)g["n"], (long long)g["c"],
                  (long long)g["oc"], num(g["bf16_tflops"]), num(g["bf16_out16_tflops"]),
                  num(g["fp8_tflops"]));
    std::fflush(stdout);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ceilings: not measured: %s\n", e.what());
    ceilings = {{"error", e.what()}};
    // A failed allocation leaves its error pending, which the first policy's first launch
    // check would report as its own; a sticky error (a fault) stays, and the policies report it.
    cudaGetLastError();
  }
  std::stringstream names(policies);
  for (std::string name; std::getline(names, name, ',');) {
    const bench::BenchPolicy parsed = bench::parse_policy_name(name);  // "P+recompute" too
    const Recompute recompute = parsed.recompute;
    const PrecisionPolicy policy = PrecisionPolicy::preset(parsed.preset);
    // "+direct": the GEMMs write bf16 outputs themselves for this row (read at each matmul and
    // by the workspace prediction below); "+unfused": the model keeps its fp8 LayerNorms'
    // 16-bit outputs (read when it is made). Whatever the environment says for the others.
    std::optional<ScopedEnv> direct_env, unfused_env;
    if (parsed.direct_out) direct_env.emplace("MPT_GEMM_OUT", "direct");
    if (parsed.fp8_unfused) unfused_env.emplace("MPT_FP8_PRODUCERS", "0");
    CudaBackend be(0);  // a fresh backend per policy: its scratch starts empty
    device = be.device_description();
    size_t free0 = 0, total = 0;
    MPT_CUDA_CHECK(cudaMemGetInfo(&free0, &total));
    // The model's ops pass through a TracingBackend, which only forwards them until one step
    // is traced op by op (below).
    TracingBackend traced(be, nullptr);
    Gpt model(m, traced, policy, recompute);
    model.init_weights(1, 0.02);
    OptimizerConfig oc;
    AdamW opt(oc, model, traced);
    auto one_step = [&] {
      model.zero_grad();
      model.forward(in.data(), tg.data(), B, T, 1.0f / (B * T));
      model.backward();
      model.end_step();  // fp8: the step's amaxes into the scalers, as the trainer does
      opt.step(3e-4, opt.clip_scale(opt.grad_norm()));
    };
    for (int i = 0; i < warmup; ++i) one_step();
    be.synchronize();
    std::vector<double> ms;
    for (int i = 0; i < steps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      one_step();
      be.synchronize();
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    const double step_ms = ms[ms.size() / 2];
    // One more step, profiled op by op (cuda_context.h, start_profile): where the time goes.
    be.context().start_profile();
    one_step();
    const cuda::OpProfileTable profile = be.context().stop_profile();
    nlohmann::json top_ops = nlohmann::json::array();
    for (const cuda::OpTime& t : profile.sorted()) {
      if (top_ops.size() == 15) break;
      top_ops.push_back({{"op", t.op}, {"ms", t.ms}, {"launches", t.launches},
                         {"share", profile.total_ms() > 0 ? t.ms / profile.total_ms() : 0.0}});
    }
    // One more step, each backend op timed against its floor (backend/op_cost.h): the fewest
    // bytes and the products it must compute, over this GPU's measured ceilings. The rows
    // with the most time above their floors say where speed work can still win.
    nlohmann::json floor_sources = nlohmann::json::object();
    const Ceilings ceil = ceilings_for_floors(ceilings, be.gpu_info().gpu_name, floor_sources);
    nlohmann::json op_floors = nlohmann::json::array();
    double floor_ms = 0, traced_ms = 0;
    std::string floor_error =
        ceil.bytes_per_s > 0 ? "" : "no measured copy bandwidth to read them against";
    if (ceil.bytes_per_s > 0) try {  // context for the policy's figures, not a reason to lose them
      EventObserver events(static_cast<cudaStream_t>(be.stream()));
      struct Detach {  // the observer leaves the backend before it is destroyed, also on a throw
        TracingBackend& t;
        ~Detach() { t.set_observer(nullptr); }
      } detach{traced};
      CostTable table(ceil);
      traced.set_observer(&events);
      one_step();
      traced.set_observer(nullptr);
      events.finish(table);
      floor_ms = table.total().floor_s * 1e3;
      traced_ms = table.total().measured_ms;
      std::vector<nlohmann::json> rows;
      for (const OpTotals& t : table.rows()) {
        const double f = t.floor_s * 1e3;
        rows.push_back({{"op", t.cost.op}, {"calls", t.calls}, {"ms", t.measured_ms},
                        {"floor_ms", f}, {"above_floor_ms", t.measured_ms - f},
                        {"gb", t.cost.bytes / 1e9}, {"gflop", t.cost.total_flops() / 1e9},
                        {"bound", t.mostly_memory_bound() ? "memory" : "math"}});
      }
      std::sort(rows.begin(), rows.end(), [](const nlohmann::json& a, const nlohmann::json& b) {
        return double(a["above_floor_ms"]) > double(b["above_floor_ms"]);
      });
      for (auto& r : rows) op_floors.push_back(std::move(r));
    } catch (const std::exception& e) {
      floor_error = e.what();
      std::fprintf(stderr, "%s: op floors not measured: %s\n", name.c_str(), e.what());
      op_floors = nlohmann::json::array();
      floor_ms = traced_ms = 0;
    }
    size_t free1 = 0;
    MPT_CUDA_CHECK(cudaMemGetInfo(&free1, &total));
    const double tokens_per_s = double(B) * T / (step_ms / 1e3);
    const PolicyPeak peak = policy_peak(be.gpu_info().gpu_name, policy.matmul, policy.activation);
    const std::optional<double> mfu =
        model_flops_utilization(model.flops_per_token(T), tokens_per_s, peak.flops);
    MemoryLedger ledger = Gpt::plan_memory(m, B, T, policy, 1, false, recompute);
    ledger.workspace = cuda_workspace_bytes(m, B, T, policy, ledger, be.gpu_info().cc_major);
    const MemoryUsage mem = be.memory_usage();
    // One layer's attention alone (forward and backward, this policy's dtype and precision),
    // times the layers: its share of the step. Where the fused kernels run it, the GEMM path
    // (MPT_ATTENTION=gemm) is timed too, on the same tensors, for what the fusion wins.
    const cuda::AttentionKernel att_kernel = cuda::attention_kernel(
        attention_operand_format(policy.activation, policy.activation, policy.unquantised_matmul()),
        m.n_embd / m.n_head);
    double attention_ms = 0, attention_gemm_ms = 0;
    {
      const int64_t C = m.n_embd, NH = m.n_head;
      const DType act = policy.activation;
      const size_t es = dtype_size(act);
      Buffer qkv_b = be.allocate(size_t(B) * T * 3 * C * es), out_b = be.allocate(size_t(B) * T * C * es),
             lse_b = be.allocate(size_t(B) * NH * T * 4), dq_b = be.allocate(size_t(B) * T * 3 * C * es);
      const Tensor qkv = qkv_b.view(0, act, {B, T, 3 * C}), out = out_b.view(0, act, {B, T, C}),
                   lse = lse_b.view(0, DType::f32, {B, NH, T}), dqkv = dq_b.view(0, act, {B, T, 3 * C});
      be.fill(qkv, 0.02f);
      auto attention = [&] {
        be.attention_forward(out, lse, qkv, static_cast<int>(NH), policy.unquantised_matmul());
        be.attention_backward(dqkv, out, qkv, lse, static_cast<int>(NH), policy.unquantised_matmul());
      };
      auto time_attention = [&] {
        attention();
        be.synchronize();
        std::vector<double> am;
        for (int i = 0; i < 5; ++i) {
          const auto t0 = std::chrono::steady_clock::now();
          attention();
          be.synchronize();
          am.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(am.begin(), am.end());
        return am[am.size() / 2] * m.n_layer;
      };
      attention_ms = time_attention();
      if (att_kernel == cuda::AttentionKernel::flash) {
        const ScopedEnv gemm_path("MPT_ATTENTION", "gemm");
        attention_gemm_ms = time_attention();
      }
    }
    results.push_back({{"policy", name},
                       {"attention_kernel", cuda::attention_kernel_name(att_kernel)},
                       {"gemm_output",
                        cuda::gemm_output_kind(policy.activation, policy.param, policy.matmul,
                                               cuda::gemm_out(), cuda::lt_epilogues_enabled())},
                       // fp8: whether its LayerNorms were stored quantised (Gpt's fp8 producers)
                       {"fp8_producers", model.fp8_producers()},
                       {"attention_ms", attention_ms},
                       {"attention_gemm_ms", attention_gemm_ms},  // 0: the GEMM path ran the step
                       {"attention_share", attention_ms / step_ms},
                       {"tokens_per_s", tokens_per_s},
                       {"step_ms", step_ms},
                       {"step_ms_min", ms.front()},
                       {"step_ms_max", ms.back()},
                       {"profile_ms", profile.total_ms()},  // the profiled step, marks included
                       {"profile_top_ops", top_ops},
                       // The step's floor over the measured ceilings (0: not measured), the
                       // time the traced ops took (the rest of a step is between ops), and
                       // every op against its floor, the most time above it first.
                       {"floor_ms", floor_ms},
                       {"floor_tokens_per_s",
                        floor_ms > 0 ? double(B) * T / (floor_ms / 1e3) : 0.0},
                       {"step_vs_floor", floor_ms > 0 ? step_ms / floor_ms : 0.0},
                       {"traced_ops_ms", traced_ms},
                       {"floor_ceilings", floor_sources},
                       {"floor_error", floor_error},  // "": none
                       {"op_floors", op_floors},
                       {"mfu", mfu.value_or(0.0)},  // 0: this GPU is not in gpu_peaks' table
                       {"peak_format", peak.format},
                       {"peak_tflops", peak.flops / 1e12},
                       {"peak_mem_gib", double(free0 - free1) / (1 << 30)},
                       {"counted_peak_gib", double(mem.peak_bytes) / (1 << 30)},
                       {"activation_gib", double(model.activation_bytes()) / (1 << 30)},
                       {"ledger_gib", ledger.total() / (1 << 30)},
                       {"counted_vs_ledger", double(mem.peak_bytes) / ledger.total()}});
    std::fprintf(stderr, "%s: %.0f tokens/s, %.1f ms/step\n", name.c_str(), tokens_per_s, step_ms);
    // What is measured so far survives a timeout (the ratios are added at the end).
    if (!json_path.empty())
      write_json(json_path, {{"device", device}, {"partial", true}, {"ceilings", ceilings},
                             {"policies", results}});
  }
  bench::add_ratios(results, "tokens_per_s");
  const nlohmann::json *f32 = bench::find_policy(results, "fp32"),
                       *b16 = bench::find_policy(results, "bf16");
  for (auto& r : results) {
    if (b16 && f32)
      r["activation_vs_fp32"] = double(r["activation_gib"]) / double((*f32)["activation_gib"]);
  }
  std::printf("device: %s\nGPT-2 124M, batch %d x seq %d, median of %d steps after %d warm-up\n",
              device.c_str(), B, T, steps, warmup);
  std::printf("%-14s %11s %6s %9s %9s %9s %8s %8s %7s %6s %9s %9s\n", "policy", "tokens/s", "mfu",
              "step ms", "mem GiB", "act GiB", "vs fp32", "vs bf16", "attn", "kernel", "attn ms",
              "gemm ms");
  for (const auto& r : results)
    std::printf("%-14s %11.0f %5.1f%% %9.1f %9.2f %9.2f %7.2fx %7.2fx %6.0f%% %6s %9.1f %9.1f\n",
                r["policy"].get<std::string>().c_str(), double(r["tokens_per_s"]),
                100 * double(r["mfu"]), double(r["step_ms"]), double(r["peak_mem_gib"]),
                double(r["activation_gib"]), double(r["vs_fp32"]), double(r["vs_bf16"]),
                100 * double(r["attention_share"]), r["attention_kernel"].get<std::string>().c_str(),
                double(r["attention_ms"]), double(r["attention_gemm_ms"]));
  if (!json_path.empty()) {
    nlohmann::json doc = {{"device", device}, {"batch", B}, {"seq", T}, {"steps", steps},
                          {"warmup", warmup}, {"ceilings", ceilings}, {"policies", results}};
    write_json(json_path, doc);
  }
  return 0;
#endif
}
