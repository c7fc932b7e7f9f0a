// Fused softmax + cross-entropy + its gradient, one block per row, in place over the logits:
// an fp32 softmax over the first vocab_size columns, the loss, and with dloss != 0 the gradient
// dloss * (softmax - onehot) stored in the logits' dtype, padded columns zeroed. The targets are
// checked on the host (Context::ids_on_host: without a synchronisation when they were uploaded
// with copy_ids_from_host).
//
// Two passes over the row: the first keeps each thread's running max m and its sum s of
// exp(x - m), rescaling s when m grows (the online softmax of Milakov & Gimelshein, 2018,
// "Online normalizer calculation for softmax"), and the block combines the threads' pairs in a
// fixed order (deterministic); the second writes the gradient. Rows whose width and address
// allow it are read and written 16 bytes at a time.
#include "backend/cuda/classifier.cuh"

#include <type_traits>
#include <vector>

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {
namespace {

constexpr int kClassifierBlock = 512;

// One logit into a thread's running (max, sum of exp(x - max)). -inf adds nothing (and never
// meets a -inf max: -inf - -inf is NaN); NaN reaches the sum.
__device__ __forceinline__ void online_add(float x, float& m, float& s) {
  if (x > m) {
    s = __fadd_rn(__fmul_rn(s, expf(__fsub_rn(m, x))), 1.0f);
    m = x;
  } else if (x != -INFINITY) {
    s = __fadd_rn(s, expf(__fsub_rn(x, m)));
  }
}

// The source of the first pass: the logits in place (kLogits), or the matmul's fp32 product
// `d` (kProduct: matmul_crossentropy), which the first pass rounds into the logits' dtype,
// counts as activations (as matmul_forward's store does) and writes to the row before the
// second pass reads it back (the same thread: no barrier needed), or the logits in place as the
// GEMM stored them (kStored: matmul_crossentropy under MPT_GEMM_OUT=direct), which the first
// pass counts as activations from their stored values (CastTally::add_stored, as matmul.cu's
// direct store kernel counts: matmul_plan.h GemmOut says how that differs from kProduct's
// count of the fp32 values), over the same columns as kProduct, the padded ones included.
// kVec: elements per access (16 bytes of T when the row allows, else 1). Whatever the source,
// the same rule picks it: it decides which elements each thread's running (max, sum) takes, so
// they must split rows alike to give the same losses and gradients.
enum ClassifierSource : int { kLogits, kProduct, kStored };
template <class T, int kVec, int kSource>
__global__ void __launch_bounds__(kClassifierBlock)
    crossentropy_kernel(float* losses, T* logits, const float* d, const int32_t* targets,
                        int64_t Vp, int64_t V, float dloss, unsigned long long* act_counters,
                        unsigned long long* grad_counters) {
  constexpr bool kStaged = kSource == kProduct;
  __shared__ float shared[32];
  CastTally tally, act_tally;
  const int64_t n = blockIdx.x;
  T* row = logits + n * Vp;
  const int64_t y = targets[n];
  if (y < 0 || y >= V) __trap();  // as embedding_forward_kernel: checked on the host
  // Read before any thread overwrites the row; staged, the target's product rounded as pass 1
  // rounds it.
  float ly;
  if constexpr (kStaged) ly = load<T>(store<T>(d[n * Vp + y]));
  else ly = load<T>(row[y]);

  float m = -INFINITY, s = 0.0f;
  // kProduct stores and counts every column (the padded ones too, as matmul_forward stores
  // them); kStored counts every column the GEMM stored; kLogits reads the first V only.
  const int64_t pass1_end = kSource == kLogits ? V : Vp;
  for (int64_t i0 = int64_t{threadIdx.x} * kVec; i0 < pass1_end; i0 += int64_t{blockDim.x} * kVec) {
    Pack<T, kVec> p;
    if constexpr (kStaged) {
      float x[kVec];
      const float* src = d + n * Vp + i0;
      if constexpr (kVec % 4 == 0) {
        // 16-byte loads where the product allows them (Vp % kVec == 0 here: rows keep d's
        // alignment; the scratch is cudaMalloc's), else one element at a time.
        if ((reinterpret_cast<uintptr_t>(d) & 15u) == 0) {
#pragma unroll
          for (int k = 0; k < kVec; k += 4) {
            const float4 q = *reinterpret_cast<const float4*>(src + k);
            x[k] = q.x, x[k + 1] = q.y, x[k + 2] = q.z, x[k + 3] = q.w;
          }
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) x[k] = src[k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) x[k] = src[k];
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        p.v[k] = store<T>(x[k]);
        act_tally.add(x[k], load<T>(p.v[k]), max_finite<T>());
      }
      *reinterpret_cast<Pack<T, kVec>*>(row + i0) = p;
    } else {
      p = *reinterpret_cast<const Pack<T, kVec>*>(row + i0);
      if constexpr (kSource == kStored) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) act_tally.add_stored(load<T>(p.v[k]));
      }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (i0 + k < V) online_add(load<T>(p.v[k]), m, s);
  }
  if constexpr (kSource != kLogits) act_tally.flush(act_counters);
  const float maxv = block_max(m, shared);  // m is never NaN (NaN > m is false)
  // This thread's sum relative to the row's max (nothing when it saw nothing: 0, not 0 * NaN).
  const float rel = s == 0.0f ? 0.0f : __fmul_rn(s, expf(__fsub_rn(m, maxv)));
  const float sum = block_sum(rel, shared);  // ends with every thread past a barrier: ly read
  const float logsum = __fadd_rn(logf(sum), maxv);
  if (threadIdx.x == 0) losses[n] = __fsub_rn(logsum, ly);
  if (dloss != 0.0f) {
    auto grad = [&](int64_t i, float x) {
      return i < V ? __fmul_rn(dloss, __fsub_rn(expf(__fsub_rn(x, logsum)), i == y ? 1.0f : 0.0f))
                   : 0.0f;
    };
    for (int64_t i0 = int64_t{threadIdx.x} * kVec; i0 < Vp; i0 += int64_t{blockDim.x} * kVec) {
      Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(row + i0);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float g = grad(i0 + k, load<T>(p.v[k]));
        p.v[k] = store<T>(g);
        if (kNarrow<T>) tally.add(g, load<T>(p.v[k]), max_finite<T>());
      }
      *reinterpret_cast<Pack<T, kVec>*>(row + i0) = p;
    }
    if (kNarrow<T>) tally.flush(grad_counters);
  }
}

// Checks the classifier's arguments as backend.h describes them, the targets on the host (they
// index the rows), as the CPU backend checks them. Returns the rows' width, Vp.
}  // namespace

int64_t check_crossentropy(Context& ctx, const char* op, const Tensor& losses,
                           const Tensor& logits, const Tensor& targets, int vocab_size) {
  if (!logits.defined() || logits.shape.ndim < 1 || logits.dim(-1) <= 0)
    throw RuntimeError(std::string(op) + ": argument 'logits' expected (N,Vp), got " +
                       logits.shape.str());
  const int64_t Vp = logits.dim(-1), N = logits.numel() / Vp, V = vocab_size;
  if (V < 1 || V > Vp)
    throw RuntimeError(std::string(op) + ": vocab_size " + std::to_string(V) +
                       " outside [1, " + std::to_string(Vp) + "] (the logits' width)");
  expect_float(op, "logits", as_shape(logits, {N, Vp}), {N, Vp});
  expect_tensor(op, "losses", as_shape(losses, {N}), DType::f32, {N});
  expect_tensor(op, "targets", as_shape(targets, {N}), DType::i32, {N});
  if (N > 0x7FFFFFFF) throw RuntimeError(std::string(op) + ": too many rows");
  std::vector<int32_t> readback;
  ctx.ids_on_host(op, as_shape(targets, {N}), V, &readback);
  return Vp;
}

namespace {

// The kernel for logits of type T reading `source` (the discarded branches below are never
// instantiated: the product and stored sources are for 16-bit logits only).
template <class T>
void launch_typed(Context& ctx, ClassifierSource source, float* losses, T* logits, const float* d,
                  const int32_t* targets, int64_t N, int64_t Vp, int64_t V, float dloss,
                  unsigned long long* act_counters, unsigned long long* grad_counters) {
  auto run = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(N), kClassifierBlock, 0, ctx.stream()>>>(
        losses, logits, d, targets, Vp, V, dloss, act_counters, grad_counters);
  };
  // 16-byte accesses of the logits when every row starts on a 16-byte boundary; the same rule
  // whatever the source (the kernel's kVec says why).
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = Vp % kVec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  auto with_source = [&](auto src) {
    constexpr int kSource = decltype(src)::value;
    if constexpr (kSource != kLogits && !kNarrow<T>) {
      throw RuntimeError("crossentropy: only 16-bit logits come from a product or are counted");
    } else if (vec) {
      run(crossentropy_kernel<T, kVec, kSource>);
    } else {
      run(crossentropy_kernel<T, 1, kSource>);
    }
  };
  switch (source) {
    case kLogits: with_source(std::integral_constant<int, kLogits>{}); break;
    case kProduct: with_source(std::integral_constant<int, kProduct>{}); break;
    case kStored: with_source(std::integral_constant<int, kStored>{}); break;
  }
}

// The classifier over checked arguments, reading `source`: d, the fp32 product the logits are
// to be rounded from (kProduct, 16-bit logits); the logits in place (kLogits); or the logits in
// place as a GEMM stored them, counted (kStored, 16-bit logits).
void launch_classifier(Context& ctx, Tensor losses, Tensor logits, ClassifierSource source,
                       const float* d, Tensor targets, int64_t Vp, int64_t V, float dloss) {
  const int64_t N = logits.numel() / Vp;
  if (N == 0) return;
  unsigned long long* grad_counters = ctx.cast_counters(TensorClass::gradient);
  unsigned long long* act_counters = ctx.cast_counters(TensorClass::activation);
  MPT_DISPATCH_FLOAT(logits.dtype, "crossentropy_forward_backward: logits", [&] {
    launch_typed(ctx, source, static_cast<float*>(losses.data), static_cast<T*>(logits.data), d,
                 static_cast<const int32_t*>(targets.data), N, Vp, V, dloss, act_counters,
                 grad_counters);
  });
  // kStored's name ends as matmul.cu's direct stores' do (the op profile tells them apart).
  MPT_LAUNCH_CHECK(ctx, source == kProduct  ? "crossentropy (logits from the fp32 product)"
                        : source == kStored ? "crossentropy (counting the GEMM's logits) (direct)"
                                            : "crossentropy_forward_backward");
  if (logits.dtype != DType::f32) {
    if (source != kLogits) ctx.add_cast_values(TensorClass::activation, N * Vp);
    if (dloss != 0.0f) ctx.add_cast_values(TensorClass::gradient, N * Vp);
  }
}

}  // namespace

void crossentropy_forward_backward(Context& ctx, Tensor losses, Tensor logits, Tensor targets,
                                   int vocab_size, float dloss) {
  const int64_t Vp =
      check_crossentropy(ctx, "crossentropy_forward_backward", losses, logits, targets, vocab_size);
  launch_classifier(ctx, losses, logits, kLogits, nullptr, targets, Vp, vocab_size, dloss);
}

void crossentropy_from_product(Context& ctx, Tensor losses, Tensor logits, const float* d,
                               Tensor targets, int vocab_size, float dloss) {
  // d null: fp32 logits, written by the GEMM and not counted, or 16-bit ones the GEMM stored
  // itself (GemmOut::direct), which the classifier counts.
  const ClassifierSource source = d                            ? kProduct
                                  : logits.dtype == DType::f32 ? kLogits
                                                               : kStored;
  launch_classifier(ctx, losses, logits, source, d, targets, logits.dim(-1), vocab_size, dloss);
}

}  // namespace mpt::cuda
