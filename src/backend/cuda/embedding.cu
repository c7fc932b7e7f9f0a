// Token + position embedding. The backward is deterministic and sums in the CPU backend's order
// (bit-identical to it): the host checks the token ids and buckets the positions by token
// (llm.c's approach; host_ids.h), from its own copy when the ids were uploaded with
// copy_ids_from_host (no synchronisation), else reading them back; one kernel then adds each
// token's positions into its dwte row in increasing position order, another each position's
// rows over the batch.
#include "backend/cuda/embedding.cuh"

#include <algorithm>
#include <vector>

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {
namespace {

template <class T>
__global__ void embedding_forward_kernel(T* out, const int32_t* tokens, const void* wte, DType dte,
                                         const void* wpe, DType dpe, int64_t N, int64_t T_,
                                         int64_t C, int64_t Vp, unsigned long long* counters) {
  CastTally tally;
  const int64_t total = N * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t bt = i / C, c = i % C;
    const int64_t id = tokens[bt];
    // Checked on the host; should the device's ids differ from what the host checked (a write
    // the backend did not see), stop rather than read outside wte.
    if (id < 0 || id >= Vp) __trap();
    const float e = load_any(wte, dte, id * C + c);
    const float p = load_any(wpe, dpe, (bt % T_) * C + c);
    store_counted(out, i, __fadd_rn(e, p), tally);
  }
  if (kNarrow<T>) tally.flush(counters);
}

// One blockIdx.x per token present: dwte[token, c] += dout[bt, c] over the token's positions
// bt in increasing order (order[start[k] .. start[k+1]) lists them), one rounding at the end.
template <class T>
__global__ void dwte_kernel(T* dwte, const void* dout, DType dd, const int32_t* bucket_token,
                            const int32_t* bucket_start, const int32_t* order, int64_t C,
                            unsigned long long* counters) {
  CastTally tally;
  const int64_t k = blockIdx.x;
  const int64_t row = bucket_token[k];
  const int s0 = bucket_start[k], s1 = bucket_start[k + 1];
  for (int64_t c = blockIdx.y * int64_t{blockDim.x} + threadIdx.x; c < C;
       c += int64_t{gridDim.y} * blockDim.x) {
    float acc = load<T>(dwte[row * C + c]);
    for (int s = s0; s < s1; ++s) acc = __fadd_rn(acc, load_any(dout, dd, order[s] * C + c));
    store_counted(dwte, row * C + c, acc, tally);
  }
  if (kNarrow<T>) tally.flush(counters);
}

// dwpe[t, c] += dout[b, t, c] over b in increasing order.
template <class T>
__global__ void dwpe_kernel(T* dwpe, const void* dout, DType dd, int64_t B, int64_t T_,
                            int64_t C, unsigned long long* counters) {
  CastTally tally;
  const int64_t total = T_ * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    float acc = load<T>(dwpe[i]);
    for (int64_t b = 0; b < B; ++b) acc = __fadd_rn(acc, load_any(dout, dd, b * T_ * C + i));
    store_counted(dwpe, i, acc, tally);
  }
  if (kNarrow<T>) tally.flush(counters);
}

}  // namespace

void embedding_forward(Context& ctx, Tensor out, Tensor tokens, Tensor wte, Tensor wpe) {
  const char* op = "embedding_forward";
  if (!tokens.defined() || tokens.shape.ndim != 2)
    throw RuntimeError("embedding_forward: argument 'tokens' expected int32 (B,T), got " +
                       tokens.shape.str());
  if (!wte.defined() || wte.shape.ndim != 2)
    throw RuntimeError("embedding_forward: argument 'wte' expected (Vp,C), got " + wte.shape.str());
  const int64_t B = tokens.dim(0), T_ = tokens.dim(1), Vp = wte.dim(0), C = wte.dim(1);
  expect_tensor(op, "tokens", tokens, DType::i32, {B, T_});
  expect_float(op, "out", out, {B, T_, C});
  expect_float(op, "wte", wte, {Vp, C});
  if (!wpe.defined() || wpe.shape.ndim != 2 || wpe.dim(0) < T_ || wpe.dim(1) != C)
    throw RuntimeError("embedding_forward: argument 'wpe' expected (maxT >= " +
                       std::to_string(T_) + "," + std::to_string(C) + "), got " + wpe.shape.str());
  expect_float(op, "wpe", wpe, wpe.shape);
  const int64_t N = B * T_;
  if (N * C == 0) return;
  std::vector<int32_t> readback;
  ctx.ids_on_host(op, tokens, Vp, &readback);  // checks them: an id out of range reads anywhere
  unsigned long long* counters = ctx.cast_counters(TensorClass::activation);
  MPT_DISPATCH_FLOAT(out.dtype, "embedding_forward: out", [&] {
    embedding_forward_kernel<T><<<grid_stride_blocks(N * C), kBlock, 0, ctx.stream()>>>(
        static_cast<T*>(out.data), static_cast<const int32_t*>(tokens.data), wte.data, wte.dtype,
        wpe.data, wpe.dtype, N, T_, C, Vp, counters);
  });
  MPT_LAUNCH_CHECK(ctx, op);
  if (out.dtype != DType::f32) ctx.add_cast_values(TensorClass::activation, N * C);
}

void embedding_backward(Context& ctx, Tensor dwte, Tensor dwpe, Tensor dout, Tensor tokens) {
  const char* op = "embedding_backward";
  if (!tokens.defined() || tokens.shape.ndim != 2)
    throw RuntimeError("embedding_backward: argument 'tokens' expected int32 (B,T), got " +
                       tokens.shape.str());
  if (!dwte.defined() || dwte.shape.ndim != 2)
    throw RuntimeError("embedding_backward: argument 'dwte' expected (Vp,C), got " +
                       dwte.shape.str());
  const int64_t B = tokens.dim(0), T_ = tokens.dim(1), Vp = dwte.dim(0), C = dwte.dim(1);
  expect_tensor(op, "tokens", tokens, DType::i32, {B, T_});
  expect_float(op, "dwte", dwte, {Vp, C});
  expect_float(op, "dout", dout, {B, T_, C});
  if (!dwpe.defined() || dwpe.shape.ndim != 2 || dwpe.dim(0) < T_ || dwpe.dim(1) != C)
    throw RuntimeError("embedding_backward: argument 'dwpe' expected (maxT >= " +
                       std::to_string(T_) + "," + std::to_string(C) + "), got " +
                       dwpe.shape.str());
  expect_float(op, "dwpe", dwpe, dwpe.shape);
  const int64_t N = B * T_;
  if (N * C == 0) return;
  if (N > INT32_MAX / 2) throw RuntimeError("embedding_backward: too many positions");
  std::vector<int32_t> readback;
  const int32_t* ids = ctx.ids_on_host(op, tokens, Vp, &readback);
  const EmbeddingBuckets buckets = bucket_positions(ids, N, Vp);
  const int64_t K = buckets.buckets;
  // The planned worst case (every position its own token), not this batch's size: a batch with
  // more distinct tokens than the last would otherwise grow the scratch, which synchronises.
  auto* dev = static_cast<int32_t*>(
      ctx.scratch(Scratch::kReduce, embedding_backward_scratch_bytes(N, Vp)));
  ctx.upload_async(dev, buckets.packed.data(), buckets.packed.size() * sizeof(int32_t));
  unsigned long long* counters = ctx.cast_counters(TensorClass::gradient);
  const unsigned cblocks = std::min(blocks_for(C), 65535u);
  MPT_DISPATCH_FLOAT(dwte.dtype, "embedding_backward: dwte", [&] {
    dwte_kernel<T><<<dim3(static_cast<unsigned>(K), cblocks), kBlock, 0, ctx.stream()>>>(
        static_cast<T*>(dwte.data), dout.data, dout.dtype, dev, dev + K, dev + 2 * K + 1, C,
        counters);
  });
  MPT_LAUNCH_CHECK(ctx, op);
  MPT_DISPATCH_FLOAT(dwpe.dtype, "embedding_backward: dwpe", [&] {
    dwpe_kernel<T><<<grid_stride_blocks(T_ * C), kBlock, 0, ctx.stream()>>>(
        static_cast<T*>(dwpe.data), dout.data, dout.dtype, B, T_, C, counters);
  });
  MPT_LAUNCH_CHECK(ctx, op);
  // The CPU backend rounds the whole of both tensors back (untouched elements unchanged).
  if (dwte.dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, dwte.numel());
  if (dwpe.dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, dwpe.numel());
}

}  // namespace mpt::cuda
