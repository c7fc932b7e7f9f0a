// Fused softmax + cross-entropy + its gradient, one block per row, in place over the logits:
// an fp32 softmax over the first vocab_size columns (block max, then a block sum of exp(x - max)
// in a fixed order), the loss, and with dloss != 0 the gradient dloss * (softmax - onehot)
// stored in the logits' dtype, padded columns zeroed. The targets are checked on the host.
#include "backend/cuda/classifier.cuh"

#include <vector>

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {
namespace {

constexpr int kClassifierBlock = 512;

template <class T>
__global__ void __launch_bounds__(kClassifierBlock)
    crossentropy_kernel(float* losses, T* logits, const int32_t* targets, int64_t Vp, int64_t V,
                        float dloss, unsigned long long* counters) {
  __shared__ float shared[32];
  CastTally tally;
  const int64_t n = blockIdx.x;
  T* row = logits + n * Vp;
  const int64_t y = targets[n];
  const float ly = load<T>(row[y]);  // read before any thread overwrites the row

  float maxv = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) maxv = fmaxf(maxv, load<T>(row[i]));
  maxv = block_max(maxv, shared);
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
    sum = __fadd_rn(sum, expf(__fsub_rn(load<T>(row[i]), maxv)));
  sum = block_sum(sum, shared);  // ends with every thread past a barrier: ly has been read
  const float logsum = __fadd_rn(logf(sum), maxv);
  if (threadIdx.x == 0) losses[n] = __fsub_rn(logsum, ly);
  if (dloss != 0.0f) {
    for (int64_t i = threadIdx.x; i < Vp; i += blockDim.x) {
      float g = 0.0f;
      if (i < V) {
        const float p = expf(__fsub_rn(load<T>(row[i]), logsum));
        g = __fmul_rn(dloss, __fsub_rn(p, i == y ? 1.0f : 0.0f));
      }
      store_counted(row, i, g, tally);
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
    crossentropy_kernel<T><<<static_cast<unsigned>(N), kClassifierBlock, 0, ctx.stream()>>>(
        static_cast<float*>(losses.data), static_cast<T*>(logits.data),
        static_cast<const int32_t*>(targets.data), Vp, V, dloss, counters);
  });
  MPT_LAUNCH_CHECK(ctx, op);
  if (dloss != 0.0f && logits.dtype != DType::f32)
    ctx.add_cast_values(TensorClass::gradient, N * Vp);
}

}  // namespace mpt::cuda
