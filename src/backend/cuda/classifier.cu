// Fused softmax + cross-entropy + its gradient, one block per row, in place over the logits:
// an fp32 softmax over the first vocab_size columns, the loss, and with dloss != 0 the gradient
// dloss * (softmax - onehot) stored in the logits' dtype, padded columns zeroed. The targets are
// checked on the host.
//
// Two passes over the row: the first keeps each thread's running max m and its sum s of
// exp(x - m), rescaling s when m grows (the online softmax of Milakov & Gimelshein, 2018,
// "Online normalizer calculation for softmax"), and the block combines the threads' pairs in a
// fixed order (deterministic); the second writes the gradient. Rows whose width and address
// allow it are read and written 16 bytes at a time.
#include "backend/cuda/classifier.cuh"

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

// kVec: elements per access (16 bytes of T when the row allows, else 1).
template <class T, int kVec>
__global__ void __launch_bounds__(kClassifierBlock)
    crossentropy_kernel(float* losses, T* logits, const int32_t* targets, int64_t Vp, int64_t V,
                        float dloss, unsigned long long* counters) {
  __shared__ float shared[32];
  CastTally tally;
  const int64_t n = blockIdx.x;
  T* row = logits + n * Vp;
  const int64_t y = targets[n];
  const float ly = load<T>(row[y]);  // read before any thread overwrites the row

  float m = -INFINITY, s = 0.0f;
  for (int64_t i0 = int64_t{threadIdx.x} * kVec; i0 < V; i0 += int64_t{blockDim.x} * kVec) {
    if constexpr (kVec == 1) {
      online_add(load<T>(row[i0]), m, s);
    } else {
      const Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(row + i0);
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (i0 + k < V) online_add(load<T>(p.v[k]), m, s);
    }
  }
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
      if constexpr (kVec == 1) {
        store_counted(row, i0, grad(i0, load<T>(row[i0])), tally);
      } else {
        Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(row + i0);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float g = grad(i0 + k, load<T>(p.v[k]));
          p.v[k] = store<T>(g);
          if (kNarrow<T>) tally.add(g, load<T>(p.v[k]), max_finite<T>());
        }
        *reinterpret_cast<Pack<T, kVec>*>(row + i0) = p;
      }
    }
    if (kNarrow<T>) tally.flush(counters);
  }
}

}  // namespace

void crossentropy_forward_backward(Context& ctx, Tensor losses, Tensor logits, Tensor targets,
                                   int vocab_size, float dloss) {
  const char* op = "crossentropy_forward_backward";
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
  if (N == 0) return;
  // The targets index the row: checked on the host, as the CPU backend checks them.
  std::vector<int32_t> tgt(static_cast<size_t>(N));
  MPT_CUDA_CHECK(cudaMemcpyAsync(tgt.data(), targets.data, targets.bytes(),
                                 cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.sync(op);
  for (int64_t i = 0; i < N; ++i)
    if (tgt[i] < 0 || tgt[i] >= V)
      throw RuntimeError(std::string(op) + ": token id " + std::to_string(tgt[i]) + " at " +
                         std::to_string(i) + " outside [0, " + std::to_string(V) + ")");
  if (N > 0x7FFFFFFF) throw RuntimeError(std::string(op) + ": too many rows");
  unsigned long long* counters = ctx.cast_counters(TensorClass::gradient);
  MPT_DISPATCH_FLOAT(logits.dtype, "crossentropy_forward_backward: logits", [&] {
    // 16-byte accesses when every row starts on a 16-byte boundary.
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = Vp % kVec == 0 && reinterpret_cast<uintptr_t>(logits.data) % 16 == 0;
    auto run = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(N), kClassifierBlock, 0, ctx.stream()>>>(
          static_cast<float*>(losses.data), static_cast<T*>(logits.data),
          static_cast<const int32_t*>(targets.data), Vp, V, dloss, counters);
    };
    if (vec)
      run(crossentropy_kernel<T, kVec>);
    else
      run(crossentropy_kernel<T, 1>);
  });
  MPT_LAUNCH_CHECK(ctx, op);
  if (dloss != 0.0f && logits.dtype != DType::f32)
    ctx.add_cast_values(TensorClass::gradient, N * Vp);
}

}  // namespace mpt::cuda
