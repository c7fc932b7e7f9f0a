// What each backend op must cost at the least, and where a step's time goes against it.
//
// METHOD.md's "two numbers first": for every op, the products it must compute (FLOPs, by the
// format whose rate bounds them) and the fewest bytes it must move through device memory (each
// tensor argument read once, each output written once, an accumulated one read and written).
// Over the measured ceilings (memory bandwidth, the GEMM rate of each format) the larger of the
// two times is the op's floor: no implementation runs much faster (one whose data stays in the
// L2 cache can beat the memory bandwidth's part, so a small op may measure below its floor). A
// step's floor is the sum of its ops' floors, so the time measured above it says how much any
// speed work could still win, op by op.
//
// TracingBackend wraps a backend and reports each op's cost to an OpObserver before and after
// forwarding the call, so that the costs come from the calls the model really makes (no second
// copy of the model's op sequence to drift from it). bench_gpu_train times each op between the
// two reports with CUDA events; CostTable sums per op. A shape-only TracingBackend (no inner
// backend) executes nothing and allocates only address space, so a GPT-2-sized step is traced in
// a moment on any machine (bench_step_floor): the ops a step calls do not depend on the values.
// Plain C++: tested without a GPU.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace mpt {

// The formats whose rates bound products, named as gpu_peaks.h names them.
enum class PeakFormat { fp32, tf32, fp16, bf16, fp8 };
constexpr int kPeakFormats = 5;
const char* peak_format_name(PeakFormat f);
// The format of a matmul's products: fp8 under MatmulPrecision::fp8, else the operands' format
// (attention_operand_format: fp16/bf16 when both operands have that dtype, else fp32, or tf32).
PeakFormat product_format(DType a, DType b, MatmulPrecision prec);

struct OpCost {
  std::string op;  // the Backend method's name
  std::array<double, kPeakFormats> flops{};  // 2 x multiply-adds of the op's products
  double bytes = 0;       // device memory: each input read once, each output written once
  double host_bytes = 0;  // between host and device (copies, uploads)
  double total_flops() const;
};

// The cost of one call of each op, from its arguments as the call gives them (backend.h's
// contracts say which are read, written or accumulated). Matmuls: 2 N C OC per product.
// Attention counts causal products only (row t sees t + 1 keys): the forward's two (S = QK^T,
// O = PV), the backward's five (S again, since it recomputes the probabilities, dP, dV, dQ, dK).
// The embedding's backward reads and writes at most min(N, rows) rows of dwte.
namespace op_cost {
double bytes_of(const Tensor& t);  // 0 for an undefined (optional) tensor
OpCost bytes_op(const char* op, double read, double written);
OpCost host_op(const char* op, double host_bytes);  // a transfer between host and device
OpCost embedding_forward(const Tensor& out, const Tensor& tokens, const Tensor& wte,
                         const Tensor& wpe);
OpCost embedding_backward(const Tensor& dwte, const Tensor& dwpe, const Tensor& dout,
                          const Tensor& tokens);
// layernorm_forward, and layernorm_forward_fp8 (op names it; out is its fp8 tensor).
OpCost layernorm_forward(const char* op, const Tensor& out, const Tensor& mean,
                         const Tensor& rstd, const Tensor& inp, const Tensor& weight,
                         const Tensor& bias);
OpCost layernorm_backward(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                          const Tensor& dout, const Tensor& inp, const Tensor& weight,
                          const Tensor& mean, const Tensor& rstd);
OpCost matmul_forward(const char* op, const Tensor& out, const Tensor& inp, const Tensor& weight,
                      const Tensor& bias, const MatmulSpec& spec);
OpCost matmul_backward(const char* op, const Tensor& dinp, const Tensor& dweight,
                       const Tensor& dbias, const Tensor& dout, const Tensor& inp,
                       const Tensor& weight, const MatmulSpec& spec);
// The fused forms: their matmul's cost and the extra tensor each reads or writes.
OpCost matmul_gelu_forward(const Tensor& out, const Tensor& pre, const Tensor& inp,
                           const Tensor& weight, const Tensor& bias, const MatmulSpec& spec);
OpCost matmul_residual_forward(const Tensor& out, const Tensor& residual, const Tensor& inp,
                               const Tensor& weight, const Tensor& bias, const MatmulSpec& spec);
OpCost matmul_backward_gelu(const Tensor& dinp, const Tensor& dweight, const Tensor& dbias,
                            const Tensor& dout, const Tensor& inp, const Tensor& weight,
                            const Tensor& gelu_pre, const MatmulSpec& spec);
OpCost attention_forward(const Tensor& out, const Tensor& lse, const Tensor& qkv,
                         MatmulPrecision prec);
OpCost attention_backward(const Tensor& dqkv, const Tensor& dout, const Tensor& qkv,
                          const Tensor& lse, MatmulPrecision prec);
OpCost crossentropy(const Tensor& losses, const Tensor& logits, const Tensor& targets,
                    float dloss);
OpCost matmul_crossentropy(const Tensor& losses, const Tensor& logits, const Tensor& inp,
                           const Tensor& weight, const Tensor& targets, const MatmulSpec& spec);
OpCost adamw_update(const Tensor& param, const Tensor& master, const Tensor& grad,
                    const Tensor& m, const Tensor& v);
// The sum of adamw_update's bytes over the tensors: one op, as a GPU backend runs it in a few
// launches.
OpCost adamw_update_many(const std::vector<AdamWTensors>& all);
}  // namespace op_cost

// Sees each op a TracingBackend forwards: before() just before the call, after() just after it
// returns (not after a call that throws).
class OpObserver {
 public:
  virtual ~OpObserver() = default;
  virtual void before(const OpCost&) {}
  virtual void after(const OpCost&) {}
};

// A Backend that forwards every call to `inner` and reports the ops' costs to `observer` (may
// be null: then it only forwards). Every virtual of Backend is overridden here, those with a
// default too: a new one must be added (the test checks the defaulted ones reach the inner
// backend). The inner backend's own fused defaults call its own ops, which are not reported
// again.
//
// Shape-only (inner null, TracingBackend::shape_only()): nothing is executed. allocate()
// reserves address space that no access may touch (PROT_NONE: a bug that reads tensor memory
// faults at once), copies to the host write zeros, reductions return 0, and memory_usage()
// counts what is allocated. Gpt and AdamW run their steps on it as on any device backend.
class TracingBackend final : public Backend {
 public:
  TracingBackend(Backend& inner, OpObserver* observer) : inner_(&inner), obs_(observer) {}
  // Not copied or moved: a shape-only backend's Buffers count their bytes in it.
  TracingBackend(const TracingBackend&) = delete;
  TracingBackend& operator=(const TracingBackend&) = delete;
  static TracingBackend shape_only(OpObserver* observer) { return TracingBackend(observer); }
  void set_observer(OpObserver* observer) { obs_ = observer; }
  bool executes() const { return inner_ != nullptr; }

  std::string name() const override;
  std::string device_description() const override;
  int threads() const override;

  Buffer allocate(size_t bytes) override;
  bool host_accessible() const override;
  void copy_from_host(Tensor dst, const void* src) override;
  void copy_to_host(void* dst, Tensor src) override;
  void copy_ids_from_host(Tensor dst, const int32_t* src) override;
  void fill(Tensor t, float value) override;
  void synchronize() override;
  void* stream() const override;
  size_t workspace_bytes() const override;
  MemoryUsage memory_usage() const override;
  void reset_peak_memory() override;
  GpuInfo gpu_info() const override;

  void cast(Tensor dst, Tensor src, TensorClass cls) override;
  float amax(Tensor t) override;
  int64_t count_nonfinite(Tensor t) override;
  CastCounts cast_counts(TensorClass cls) const override;
  void reset_cast_counts() override;
  void set_cast_counting(bool on) override;
  bool cast_counting() const override;

  void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe) override;
  void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) override;
  void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                         Tensor bias) override;
  void layernorm_forward_fp8(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                             Tensor bias, const Fp8Output& fp8) override;
  void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                          Tensor weight, Tensor mean, Tensor rstd) override;
  void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias,
                      const MatmulSpec& spec) override;
  void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                       Tensor weight, const MatmulSpec& spec) override;
  void matmul_gelu_forward(Tensor out, Tensor pre, Tensor inp, Tensor weight, Tensor bias,
                           const MatmulSpec& spec) override;
  void matmul_residual_forward(Tensor out, Tensor residual, Tensor inp, Tensor weight,
                               Tensor bias, const MatmulSpec& spec) override;
  void matmul_backward_gelu(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                            Tensor weight, Tensor gelu_pre, const MatmulSpec& spec) override;
  void attention_forward(Tensor out, Tensor lse, Tensor qkv, int n_head,
                         MatmulPrecision prec) override;
  void attention_backward(Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse, int n_head,
                          MatmulPrecision prec) override;
  void gelu_forward(Tensor out, Tensor inp) override;
  void gelu_backward(Tensor dinp, Tensor inp, Tensor dout) override;
  void gelu_forward_fp8(Tensor out, Tensor inp, const Fp8Output& fp8) override;
  void residual_forward(Tensor out, Tensor a, Tensor b) override;
  void crossentropy_forward_backward(Tensor losses, Tensor logits, Tensor targets,
                                     int vocab_size, float dloss) override;
  void matmul_crossentropy(Tensor losses, Tensor logits, Tensor inp, Tensor weight,
                           Tensor targets, int vocab_size, float dloss,
                           const MatmulSpec& spec) override;
  double sum_squares(Tensor t) override;
  void adamw_update(Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                    const AdamWParams& p, AdamWStats* stats) override;
  void adamw_update_many(const std::vector<AdamWTensors>& all, AdamWStats* stats) override;
  void collect_stats() override;

 private:
  explicit TracingBackend(OpObserver* observer) : obs_(observer) {}
  // Reports cost() (worked out only when there is an observer) around f(), which runs only
  // when there is an inner backend.
  template <class Cost, class F>
  void traced(Cost&& cost, F&& f);

  Backend* inner_ = nullptr;
  OpObserver* obs_ = nullptr;
  // Shape-only bookkeeping.
  size_t live_ = 0, peak_ = 0;
  bool counting_ = true;
};

// Measured ceilings to read costs against: device memory bandwidth (bytes read plus written per
// second, as a device-to-device copy measures it), each format's GEMM rate (0: unknown) and,
// optionally, host-device bandwidth (0: host transfers get no floor).
struct Ceilings {
  double bytes_per_s = 0;
  std::array<double, kPeakFormats> flops_per_s{};
  double host_bytes_per_s = 0;
};

// The floor of work `c` in seconds: the larger of its bytes over bandwidth and its products'
// time (each format's FLOPs over its rate, summed: they do not overlap). Throws RuntimeError
// when the bandwidth is not positive, or FLOPs of a format have no rate.
double floor_seconds(const OpCost& c, const Ceilings& ceil);
// Whether bytes (true) or products bound that floor.
bool memory_bound(const OpCost& c, const Ceilings& ceil);

// Per-op sums of a traced step: calls, costs, floors (with ceilings), and the time measured for
// them (when given).
struct OpTotals {
  OpCost cost;  // summed; cost.op names the op
  int64_t calls = 0;
  double floor_s = 0;  // the calls' floors summed (some calls may be bound by bytes, some not)
  double memory_floor_s = 0;  // the part of floor_s from calls bound by bytes
  double measured_ms = 0;
  // Whether most of the floor comes from calls bound by bytes.
  bool mostly_memory_bound() const { return 2 * memory_floor_s >= floor_s; }
};
class CostTable : public OpObserver {
 public:
  // Without ceilings (bandwidth 0) the floors stay 0.
  explicit CostTable(const Ceilings& ceil = {}) : ceil_(ceil) {}
  void after(const OpCost& c) override { add(c, 0); }
  void add(const OpCost& c, double measured_ms);
  // One row per op, in the order the ops first appeared.
  std::vector<OpTotals> rows() const;
  OpTotals total() const;  // every op's sums, named "step"
  void clear();

 private:
  Ceilings ceil_;
  std::vector<OpTotals> rows_;
  std::map<std::string, size_t> index_;
};

}  // namespace mpt
