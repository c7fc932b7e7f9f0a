// The narrow op interface a GPT trainer needs. The model's forward and backward are written
// once against it; the CPU backend (backend/cpu) is the readable reference and the oracle the
// CUDA backend is checked against, op by op.
//
// Conventions for every op:
//  - Tensors live in the backend's memory (allocate()); shapes are given in comments as
//    (B,T,C) = micro-batch, sequence, channels; N = B*T rows; OC = output channels.
//  - "writes" means the output is overwritten; "accumulates" means the op adds into it (used
//    for parameter gradients across micro-batches, and for the residual stream's gradient).
//  - An optional tensor is passed as an undefined Tensor().
//  - Ops check dtypes and shapes and throw RuntimeError on a mismatch (a bug, not bad input).
//  - Float tensors may be stored as fp32, fp16 or bf16 (see each op for the exceptions). An op
//    reads each element widened to fp32 (exact), computes in fp32, and stores each output
//    rounded to the output's dtype (round to nearest even); an op that accumulates reads the
//    output, adds in fp32 and rounds once. LayerNorm statistics, attention's log-sum-exp and
//    losses are always fp32.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace mpt {

// The arithmetic of a matmul's multiplications. Accumulation is fp32 for every format.
//   native: operands as stored: fp32 products for fp32 tensors, exact products of fp16/bf16
//           values for fp16/bf16 tensors (as Tensor Cores compute them).
//   tf32:   fp32 operands rounded to TF32 (fp32 with a 10-bit mantissa, round to nearest even),
//           as Tensor Cores do for fp32 data under CUBLAS_COMPUTE_32F_FAST_TF32 (NVIDIA does
//           not document the rounding mode: test_cuda_matmul's ReportsHowTf32RoundsOperands
//           shows what a GPU does).
//   fp8:    each operand quantised to an fp8 format with a per-tensor scale (Fp8Operand), the
//           products of the fp8 values summed in fp32 and the sum multiplied by both inverse
//           scales (cuBLASLt's A/B scale pointers). The bias is added after, in fp32.
enum class MatmulPrecision { native, tf32, fp8 };

// How one matmul operand is quantised under MatmulPrecision::fp8: q = saturate(round(x * scale))
// in `format` (e4m3 or e5m2; saturating to the largest finite value, NaN kept), so x ~ q / scale.
struct Fp8Operand {
  DType format = DType::e4m3;
  float scale = 1.0f;
  // When not null, receives max |x| over the operand before quantisation (NaN when it holds a
  // NaN; inf when it holds an infinity) - the amax that delayed scaling records. Host memory,
  // written by the op or, on a GPU backend, at the latest by the next Backend::collect_stats()
  // (so that no GEMM waits for the host): it must stay valid until then.
  float* amax = nullptr;
};

// An activation an op stores quantised for the fp8 GEMM that reads it next, in place of storing
// it in `round_to` for that GEMM to quantise (layernorm_forward_fp8, gelu_forward_fp8, and
// matmul_gelu_forward's GELU: MatmulSpec::gelu_fp8): each value is rounded to
// round_to (fp32, fp16 or bf16) as the op would store it, then quantised as that GEMM's
// MatmulSpec::inp would quantise a tensor of round_to: q = saturate(RNE(x * q.scale)) in
// q.format, max |x| to q.amax. Both casts are counted as activations, as the two ops would count
// them. So the fp8 values, the counts and the amax are those of the two ops, and the GEMM, given
// the fp8 tensor as its inp and `q` as its spec.inp, computes the same product; what it saves is
// the round_to copy's write and the GEMM's read of it. Delayed scaling only: the scale must be
// known before the values are (current scaling derives it from the tensor's own amax).
struct Fp8Output {
  DType round_to = DType::bf16;
  Fp8Operand q;
};

struct MatmulSpec {
  MatmulPrecision prec = MatmulPrecision::native;
  // fp8 only: the forward reads inp and weight; the backward reads dout, weight and inp.
  // inp may be stored already quantised: a tensor of dtype inp.format holding what quantising
  // with inp.scale gave (an op's Fp8Output, above; that scale is the caller's word, which no op
  // can check). Such an inp is read as it is: not quantised, counted or reduced to an amax again
  // (its producer did that), and inp.amax is not written.
  Fp8Operand inp, weight, dout;
  // fp8 only, optional: where a forward leaves inp's quantised values for the backward, so that
  // the backward need not quantise inp again. A tensor of dtype inp.format and inp's element
  // count, laid out as the backend chooses (the CUDA backend keeps the transposed copy its
  // weight-gradient GEMM reads). matmul_forward and its fused forms write it (a CUDA forward in
  // the pass that quantises inp anyway, or for an inp stored quantised in a pass that transposes
  // its bytes); matmul_backward reads it in place of inp's
  // quantisation and reads nothing of inp but its shape and address, so the caller may reuse
  // inp's memory in between, but not the cache's. A backward whose cache was last written for
  // another inp tensor, format or scale (or never) is refused (Fp8InpCaches).
  Tensor inp_cache;
  // matmul_gelu_forward only: the GELU must be gelu_forward's exactly (not one a GEMM epilogue
  // computes its own way), because the caller computes it again with gelu_forward later
  // (training.recompute) and the two must agree.
  bool exact_gelu = false;
  // matmul_gelu_forward only, when its `out` is an fp8 tensor: how the GELU is stored
  // (Fp8Output: the next GEMM's input format and scale; round_to is pre's dtype).
  Fp8Output gelu_fp8;

  MatmulSpec() = default;
  MatmulSpec(MatmulPrecision p) : prec(p) {}  // NOLINT: implicit, most calls name a precision
};

// What the last forward wrote into each fp8 input cache (MatmulSpec::inp_cache), kept by a
// backend so that a backward is refused a cache written for another inp, format or scale
// rather than silently reading it. Host bookkeeping only: no tensor data is read.
class Fp8InpCaches {
 public:
  // The checks both forward and backward make: an fp8 spec, a cache of dtype spec.inp.format
  // and inp's element count, disjoint from inp. Throws RuntimeError naming `op` otherwise.
  static void check(const char* op, const MatmulSpec& spec, const Tensor& inp);
  void wrote(const MatmulSpec& spec, const Tensor& inp);
  // Throws RuntimeError unless spec.inp_cache was last written for inp with spec.inp's format
  // and scale.
  void expect_holds(const char* op, const MatmulSpec& spec, const Tensor& inp) const;
  // Drops the records of caches that overlap [ptr, ptr + bytes): the backends call it when memory
  // is allocated or freed, so a record neither outlives its cache nor grows without bound, and
  // when they write memory by other means than a forward (fill, copies from the host), so a
  // cache overwritten that way is refused rather than read.
  void forget(const void* ptr, size_t bytes);

 private:
  struct Entry {
    const void* inp;
    int64_t numel;
    DType format;
    float scale;
  };
  std::vector<std::pair<const void*, Entry>> entries_;  // by cache address; a few hundred
};

// The format in which attention's products read their operands (backend.h, attention_forward):
// fp16/bf16 when both tensors read have that dtype (exact products on Tensor Cores), else fp32,
// rounded to tf32 under MatmulPrecision::tf32 (as matmul_forward's native_pair/tf32 rule).
// Throws RuntimeError for MatmulPrecision::fp8 or non-float dtypes.
enum class OperandFormat { f32, tf32, f16, bf16 };
OperandFormat attention_operand_format(DType a, DType b, MatmulPrecision prec);
const char* operand_format_name(OperandFormat f);

// What a tensor is, for the statistics of narrowing casts (numerics health, docs/metrics.md).
enum class TensorClass { activation, weight, gradient };
constexpr int kTensorClasses = 3;
const char* tensor_class_name(TensorClass c);  // "activations", "weights", "gradients"

// Counts over narrowing casts (fp32 -> fp16/bf16/fp8) since the last reset: values cast, finite
// values whose magnitude exceeded the format's largest finite value (whether they rounded to inf,
// to the largest value, or saturated in fp8), and non-zero values that became zero (at most half
// the smallest subnormal). Inputs already inf or NaN are not counted (docs/formats.md). (The
// CUDA backend under MPT_GEMM_OUT=direct counts a bf16 GEMM output from its stored value,
// which differs at the ends of fp32's range only: cuda/matmul_plan.h, GemmOut.)
struct CastCounts {
  int64_t values = 0;
  int64_t overflow = 0;
  int64_t underflow = 0;
  CastCounts& operator+=(const CastCounts& o) {
    values += o.values;
    overflow += o.overflow;
    underflow += o.underflow;
    return *this;
  }
};

struct AdamWParams {
  float lr;
  float beta1;
  float beta2;
  float eps;
  float weight_decay;  // decoupled (Loshchilov & Hutter, "Decoupled Weight Decay Regularization")
  int64_t step;        // 1-based optimizer step, for bias correction
  float grad_scale;    // gradients are multiplied by this first (unscaling and clipping)
  // Without a master copy, bf16 weights are written with stochastic rounding when this is set
  // (fp16 weights always round to nearest): random bits from a counter-based hash of (sr_seed, step, element index), so
  // the result does not depend on threads and a resumed run draws the same bits.
  bool stochastic_rounding = false;
  uint64_t sr_seed = 0;
  // The index, within its parameter, of the tensors' first element: the element index the hash
  // reads is this plus the index within the tensors. Non-zero when the tensors are part of a
  // parameter (a ZeRO-1 shard), so that a shard draws the bits the whole parameter would.
  int64_t sr_first_index = 0;
};

// Statistics of adamw_update calls (summed over the calls given the same AdamWStats).
struct AdamWStats {
  int64_t values = 0;
  // Updates smaller in magnitude than half a bf16 ulp of the weight (the ulp above |w|): a
  // bf16 copy updated in place with round to nearest would lose them. An indicator, exact but
  // for updates towards zero from a power of two, whose ulp below is half as large. Counted
  // when the weights are bf16.
  int64_t lost_updates = 0;
};

// One tensor's arguments of adamw_update, for Backend::adamw_update_many.
struct AdamWTensors {
  Tensor param, master, grad, m, v;
  AdamWParams p;
};

// Memory a backend holds, in bytes: `bytes` now and `peak_bytes` (the most held at any moment
// since the backend was made or reset_peak_memory()) count the Buffers allocate() returned and
// not yet released (their requested sizes) plus the backend's workspace. `device_used_bytes`:
// on a GPU, the device memory in use by every process and the CUDA context as the driver reports
// it (cudaMemGetInfo: total - free), and `device_total_bytes`; 0 where not known (the CPU).
struct MemoryUsage {
  size_t bytes = 0;
  size_t peak_bytes = 0;
  size_t device_used_bytes = 0;
  size_t device_total_bytes = 0;
};

// The GPU a backend runs on: its name as cudaDeviceProp::name gives it (what gpu_peaks.h looks
// up) and compute capability. Empty name: not a GPU.
struct GpuInfo {
  std::string gpu_name;
  int cc_major = 0, cc_minor = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  virtual std::string device_description() const = 0;
  virtual int threads() const = 0;

  // ---- memory
  // Zero-initialised allocation of `bytes`, aligned to at least 256 bytes.
  virtual Buffer allocate(size_t bytes) = 0;
  // Whether tensors live in host memory that the host may read directly (the CPU backend): then
  // a checkpoint writes them without a copy.
  virtual bool host_accessible() const = 0;
  virtual void copy_from_host(Tensor dst, const void* src) = 0;  // dst.bytes() bytes
  virtual void copy_to_host(void* dst, Tensor src) = 0;          // src.bytes() bytes
  // Uploads int32 ids (tokens, targets) into dst, an int32 tensor, for the ops that check and
  // index with them (the embedding, the classifier). A backend whose memory the host cannot
  // read keeps the host's copy of the values and those ops use it instead of reading the ids
  // back (CUDA: no synchronisation, and the upload itself does not wait either). The copy is
  // the backend's view of dst until dst is written again by copy_from_host, copy_ids_from_host
  // or fill, or its memory is freed; no other op may write dst meanwhile. The default is
  // copy_from_host.
  virtual void copy_ids_from_host(Tensor dst, const int32_t* src) { copy_from_host(dst, src); }
  // Every element = value rounded to t's dtype (any float dtype).
  virtual void fill(Tensor t, float value) = 0;
  virtual void synchronize() = 0;
  // The CUDA stream the ops run on, as a cudaStream_t (nullptr for a host backend): for a
  // communicator that reduces device buffers in the ops' order.
  virtual void* stream() const { return nullptr; }
  // Bytes of backend-owned scratch in use (operand copies, staging buffers): for the memory
  // ledger's check against its prediction.
  virtual size_t workspace_bytes() const = 0;
  // Memory held through this backend (MemoryUsage), counted exactly: every allocate() until its
  // Buffer is released, plus workspace_bytes(), with its high-water mark.
  virtual MemoryUsage memory_usage() const = 0;
  // Restarts the high-water mark from the memory in use now.
  virtual void reset_peak_memory() = 0;
  // The GPU the ops run on; empty (gpu_name "") for the CPU backend.
  virtual GpuInfo gpu_info() const { return {}; }

  // ---- dtype support
  // dst writes = src converted to dst's dtype (same element count; any float dtypes): widening
  // is exact, narrowing rounds to nearest even (saturating for fp8), counted under `cls`.
  virtual void cast(Tensor dst, Tensor src, TensorClass cls) = 0;
  // max |x| over t (NaN if t holds a NaN).
  virtual float amax(Tensor t) = 0;
  // Elements of t that are NaN or infinite.
  virtual int64_t count_nonfinite(Tensor t) = 0;
  // Narrowing-cast statistics of every op since reset_cast_counts(), by tensor class. Ops store
  // their outputs in the outputs' dtypes; forward outputs count as activations, backward
  // outputs as gradients, weights written by the optimizer and fp8 weight operands as weights.
  virtual CastCounts cast_counts(TensorClass cls) const = 0;
  virtual void reset_cast_counts() = 0;
  // Whether ops count their narrowing casts (on by default). Off while the backward recomputes
  // an activation whose casts the forward counted (training.recompute), and to measure what the
  // counting costs (bench/bench_cpu_train). Values are the same either way.
  virtual void set_cast_counting(bool on) = 0;
  virtual bool cast_counting() const = 0;

  // ---- GPT ops
  // out(B,T,C) writes = wte[tokens[b,t]] + wpe[t];  tokens (B,T) int32, wte (Vp,C), wpe (maxT,C)
  virtual void embedding_forward(Tensor out, Tensor tokens, Tensor wte, Tensor wpe) = 0;
  // dwte, dwpe accumulate from dout(B,T,C). Deterministic (no order-dependent float atomics).
  virtual void embedding_backward(Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) = 0;

  // out(N,C) writes = (inp - mean) * rstd * weight + bias; mean, rstd (N) write, in fp32.
  virtual void layernorm_forward(Tensor out, Tensor mean, Tensor rstd, Tensor inp, Tensor weight,
                                 Tensor bias) = 0;
  // layernorm_forward's values stored as `fp8` says (Fp8Output): out(N,C) of dtype fp8.q.format
  // writes; mean, rstd as layernorm_forward.
  virtual void layernorm_forward_fp8(Tensor out, Tensor mean, Tensor rstd, Tensor inp,
                                     Tensor weight, Tensor bias, const Fp8Output& fp8) = 0;
  // dinp(N,C) accumulates (it is the residual stream's gradient); dweight, dbias (C) accumulate.
  virtual void layernorm_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                  Tensor inp, Tensor weight, Tensor mean, Tensor rstd) = 0;

  // out(N,OC) writes = inp(N,C) . weight(OC,C)^T + bias(OC); bias optional. out must not
  // overlap inp or weight (a GPU GEMM may write it while it reads them); nor, in the matmuls
  // below, a product's output its operands.
  virtual void matmul_forward(Tensor out, Tensor inp, Tensor weight, Tensor bias,
                              const MatmulSpec& spec) = 0;
  // dinp(N,C) writes = dout . weight; dweight(OC,C) accumulates dout^T . inp; dbias(OC)
  // accumulates the column sums of dout (optional; fp32 sums of dout as stored, never quantised).
  virtual void matmul_backward(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout, Tensor inp,
                               Tensor weight, const MatmulSpec& spec) = 0;

  // The MLP's first linear layer and its GELU as one op, so that a backend can fuse them (CUDA:
  // in the GEMM's epilogue, or in the kernel that stores the product). pre writes what
  // matmul_forward(pre, inp, weight, bias, spec) writes; out writes gelu_forward(out, pre), the
  // GELU of pre as stored (out and pre must not overlap), or, when out is an fp8 tensor,
  // gelu_forward_fp8(out, pre, spec.gelu_fp8). The default runs those two ops. A
  // fusing backend gives the same values and cast counts, except that under
  // MatmulPrecision::tf32 with fp32 pre and out it may take GELU from cuBLASLt's epilogue: the
  // same tanh formula, at an accuracy cuBLASLt does not document (at worst the hardware tanh's,
  // 2^-11 relative: tf32's own operand precision), and a GEMM whose algorithm (so summation
  // order) may differ from matmul_forward's. Not with spec.exact_gelu.
  virtual void matmul_gelu_forward(Tensor out, Tensor pre, Tensor inp, Tensor weight, Tensor bias,
                                   const MatmulSpec& spec);
  // A linear layer whose output joins the residual stream, as one op (a backend may fuse the add
  // into the kernel that stores the product): out writes residual_forward(out, residual, y),
  // where y is what matmul_forward(y, inp, weight, bias, spec) writes in out's dtype (counted as
  // it counts). No tensor holds y: the default runs matmul_forward into out and the residual add
  // in place. out must not overlap residual or inp.
  virtual void matmul_residual_forward(Tensor out, Tensor residual, Tensor inp, Tensor weight,
                                       Tensor bias, const MatmulSpec& spec);
  // matmul_backward whose input gradient then passes through GELU's backward: dweight and dbias
  // as matmul_backward; dinp writes gelu_backward(dinp, gelu_pre, g) where g = dout . weight
  // rounded to dinp's dtype (counted as matmul_backward counts it); gelu_pre is the GELU's input
  // (dinp's shape; it must not overlap dinp). No tensor holds g: the default runs
  // matmul_backward into dinp and GELU's backward in place. As matmul_gelu_forward: under tf32
  // with fp32 dinp and gelu_pre the derivative may come from cuBLASLt's DGELU epilogue.
  virtual void matmul_backward_gelu(Tensor dinp, Tensor dweight, Tensor dbias, Tensor dout,
                                    Tensor inp, Tensor weight, Tensor gelu_pre,
                                    const MatmulSpec& spec);

  // Causal multi-head self-attention. qkv (B,T,3C) holds q|k|v, heads of size C/n_head.
  // out(B,T,C) writes; lse (B,NH,T) fp32 writes each row's log-sum-exp of its scores: all the
  // backward keeps, since it recomputes the probabilities from q, k and lse (as FlashAttention
  // does: Dao et al., 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
  // IO-Awareness"), so no (T,T) tensor outlives the op. For row t of head h, in fp32:
  //   s[t2] = (sum_i q~[t,i] k~[t2,i]) * scale      for t2 <= t, scale = 1/sqrt(head size)
  //   lse[t] = m + log(sum_t2 exp(s[t2] - m)),      m = max_t2 s[t2]
  //   p[t2] = exp(s[t2] - lse[t])
  //   out[t,i] = sum_t2 p~[t2] v~[t2,i]
  // where x~ is x rounded to the products' operand format (attention_operand_format): the two
  // products are matmuls, computed as matmul_forward computes `native` or `tf32` (fp8 is not
  // accepted), so under fp16/bf16 the probabilities enter P.V rounded to that format. These
  // operand roundings are internal and not counted in the cast statistics; out's store is.
  // A fused (FlashAttention-style) implementation may round exp(s[t2] - m') with a running
  // maximum m' instead, and divide the fp32 sums by the row's exp-sum at the end: each
  // probability's rounding then differs from the p~ above by up to about two units of the
  // format, within the parity tests' bound (test_cuda_matmul, CudaAttention).
  virtual void attention_forward(Tensor out, Tensor lse, Tensor qkv, int n_head,
                                 MatmulPrecision prec) = 0;
  // dqkv(B,T,3C) writes, with s and p recomputed as in the forward (the same operand format if
  // dout has qkv's dtype) and, per row,
  //   dp[t2] = sum_i dout~[t,i] v~[t2,i];  D = sum_t2 p[t2] dp[t2]  (p, dp unrounded fp32)
  //   ds[t2] = p[t2] (dp[t2] - D) * scale
  //   dq[t] = sum_t2 ds~[t2] k~[t2];  dk[t2] = sum_t ds~[t2] q~[t];  dv[t2] = sum_t p~[t2] dout~[t]
  virtual void attention_backward(Tensor dqkv, Tensor dout, Tensor qkv, Tensor lse, int n_head,
                                  MatmulPrecision prec) = 0;

  // GPT-2's tanh-approximated GELU. out writes; dinp writes = dout * gelu'(inp). Element-wise:
  // dinp may be dout (in place).
  virtual void gelu_forward(Tensor out, Tensor inp) = 0;
  virtual void gelu_backward(Tensor dinp, Tensor inp, Tensor dout) = 0;
  // gelu_forward's values stored as `fp8` says (Fp8Output): out of dtype fp8.q.format writes.
  virtual void gelu_forward_fp8(Tensor out, Tensor inp, const Fp8Output& fp8) = 0;

  // out writes = a + b (same shapes). Element-wise: out may be a or b (in place).
  virtual void residual_forward(Tensor out, Tensor a, Tensor b) = 0;

  // Fused classifier over logits (N,Vp) of which the first `vocab_size` columns are real:
  // losses(N) writes -log softmax(logits)[target] with the softmax in fp32 over the real
  // columns only. When `dloss` != 0, logits are overwritten in place with the gradient
  // dloss * (softmax - onehot(target)), and the padded columns with 0.
  virtual void crossentropy_forward_backward(Tensor losses, Tensor logits, Tensor targets,
                                             int vocab_size, float dloss) = 0;
  // The language-model head and the classifier as one op, so that a backend can hand the
  // GEMM's fp32 product straight to the classifier (CUDA: with 16-bit logits the classifier
  // rounds the product itself, and no separate pass stores the logits). Writes what
  // matmul_forward(logits, inp, weight, no bias, spec) and then
  // crossentropy_forward_backward(losses, logits, targets, vocab_size, dloss) write: the same
  // values, the same cast counts (the logits' store as activations, the gradient as
  // gradients), and logits holding the rounded logits when dloss is 0. The default runs those
  // two ops. logits must not overlap inp, losses or targets.
  virtual void matmul_crossentropy(Tensor losses, Tensor logits, Tensor inp, Tensor weight,
                                   Tensor targets, int vocab_size, float dloss,
                                   const MatmulSpec& spec);

  // ---- optimizer support
  // Sum of squares of all elements, accumulated in fp64 in a fixed order (deterministic).
  virtual double sum_squares(Tensor t) = 0;
  // AdamW on one parameter tensor. grad is read (times p.grad_scale); m, v (fp32) write.
  // With a master (fp32, optional): the master is updated and `param` (the copy the ops read)
  // writes the master rounded to its dtype. Without: `param` is updated in place, rounded to its
  // dtype (stochastically when p.stochastic_rounding). `stats` (optional) accumulates; its
  // lost_updates may be counted on the device and added only by collect_stats(), so `stats`
  // must stay valid until then.
  virtual void adamw_update(Tensor param, Tensor master, Tensor grad, Tensor m, Tensor v,
                            const AdamWParams& p, AdamWStats* stats) = 0;
  // adamw_update for each element of `all`, with the same results as calling it for each in
  // order: the optimizer step's one call, so that a GPU backend updates many tensors a launch
  // rather than launching once per parameter (~150 launches a step for GPT-2, most of them on a
  // few hundred elements). No two of the tensors given (any of param, master, grad, m, v of any
  // element) may overlap. Every argument is checked (check_adamw_update_many) before anything
  // is written. The default checks, then calls adamw_update for each.
  virtual void adamw_update_many(const std::vector<AdamWTensors>& all, AdamWStats* stats);
  // Writes the statistics ops left pending on the device to the host memory they were given:
  // adamw_update's lost_updates (added into its `stats`) and the fp8 matmuls' amaxes
  // (Fp8Operand::amax). A GPU backend then synchronises once per optimizer step, or per batch
  // of reports, instead of once per op. A no-op where ops write them at once (the CPU backend).
  virtual void collect_stats() {}
};

// The checks every implementation of the fused ops makes of the pairs of arguments that must
// not overlap (matmul_gelu_forward's out and pre, matmul_backward_gelu's dinp and gelu_pre,
// matmul_residual_forward's out and residual or inp, matmul_crossentropy's logits and inp,
// losses or targets): both defined, disjoint. Throws
// RuntimeError naming them.
void check_disjoint_args(const char* op, const char* a_name, const Tensor& a,
                         const char* b_name, const Tensor& b);
// adamw_update's checks of one tensor's arguments (a float param, a float grad of its size,
// fp32 m, v and optional master, no master for fp32 weights). Throws RuntimeError naming `op`.
void check_adamw_args(const std::string& op, const AdamWTensors& t);
// Every implementation of adamw_update_many checks this before it writes anything: each tensor's
// arguments (check_adamw_args, as "adamw_update_many: tensor 3") and check_adamw_disjoint.
void check_adamw_update_many(const std::vector<AdamWTensors>& all);
// adamw_update_many's check: no two of the defined tensors of `all` overlap (an overlap within
// one element is refused too: a batched update reads and writes them concurrently). Throws
// RuntimeError naming both, as "tensor 3's m and tensor 7's param".
void check_adamw_disjoint(const std::vector<AdamWTensors>& all);
// The narrowing casts storing n values as `fp8` says makes: the rounding to round_to (none for
// fp32) and the quantisation.
inline int64_t fp8_output_casts(const Fp8Output& fp8, int64_t n) {
  return (fp8.round_to == DType::f32 ? 1 : 2) * n;
}
// Whether a matmul's inp is stored quantised (MatmulSpec::inp): an fp8 spec and inp of dtype
// spec.inp.format.
bool matmul_inp_quantised(const Tensor& inp, const MatmulSpec& spec);
// The checks of an op's Fp8Output: out defined, of dtype fp8.q.format (e4m3 or e5m2), round_to
// fp32, fp16 or bf16, a finite scale > 0. Throws RuntimeError naming `op`.
void check_fp8_output(const char* op, const Tensor& out, const Fp8Output& fp8);
// matmul_crossentropy's three: logits apart from inp, losses and targets.
void check_crossentropy_args(const Tensor& losses, const Tensor& logits, const Tensor& inp,
                             const Tensor& targets);

// Creates the backend named in the config: "cpu", "cuda" or "auto" (CUDA when this build has it
// and a device is present, else CPU). `threads` = 0 means all available cores. Throws
// InputError when the named backend is not available in this build or on this machine.
// `device`: the GPU a CUDA backend uses (a data-parallel rank's local rank).
std::unique_ptr<Backend> make_backend(const std::string& name, int threads, int device = 0);
// Whether make_backend(name, ...) gives the CUDA backend here (auto: when a GPU is usable).
bool backend_is_cuda(const std::string& name);

}  // namespace mpt
