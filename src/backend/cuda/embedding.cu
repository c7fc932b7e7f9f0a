// Token + position embedding. The backward is deterministic and sums in the CPU backend's order
// (bit-identical to it): the token ids are copied to the host, which checks them and buckets
// the positions by token (llm.c's approach); one kernel then adds each token's positions into
// its dwte row in increasing position order, another each position's rows over the batch.
#include "backend/cuda/embedding.cuh"

#include <algorithm>
#include <vector>

#include "backend/cuda/cuda_common.cuh"

namespace mpt::cuda {
namespace {

// The ids copied to the host and checked against [0, limit), as the CPU backend checks them.
std::vector<int32_t> host_ids(Context& ctx, const char* op, const Tensor& tokens, int64_t limit) {
  std::vector<int32_t> ids(static_cast<size_t>(tokens.numel()));
  if (ids.empty()) return ids;
  MPT_CUDA_CHECK(cudaMemcpyAsync(ids.data(), tokens.data, tokens.bytes(), cudaMemcpyDeviceToHost,
                                 ctx.stream()));
  ctx.sync(op);
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= limit)
      throw RuntimeError(std::string(op) + ": token id " + std::to_string(ids[i]) + " at " +
                         std::to_string(i) + " outside [0, " + std::to_string(limit) + ")");
  return ids;
}

template <class T>
__global__ void embedding_forward_kernel(T* out, const int32_t* tokens, const void* wte, DType dte,
                                         const void* wpe, DType dpe, int64_t N, int64_t T_,
                                         int64_t C, unsigned long long* counters) {
  CastTally tally;
  const int64_t total = N * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t bt = i / C, c = i % C;
    const int64_t id = tokens[bt];
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
  host_ids(ctx, op, tokens, Vp);  // checks the ids (an out-of-range id would read anywhere)
  unsigned long long* counters = ctx.cast_counters(TensorClass::activation);
  MPT_DISPATCH_FLOAT(out.dtype, "embedding_forward: out", [&] {
    embedding_forward_kernel<T><<<grid_stride_blocks(N * C), kBlock, 0, ctx.stream()>>>(
        static_cast<T*>(out.data), static_cast<const int32_t*>(tokens.data), wte.data, wte.dtype,
        wpe.data, wpe.dtype, N, T_, C, counters);
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
  const std::vector<int32_t> ids = host_ids(ctx, op, tokens, Vp);

  // Bucket the positions by token, each bucket in increasing position order (a counting sort).
  std::vector<int32_t> count(static_cast<size_t>(Vp) + 1, 0);
  for (int32_t id : ids) ++count[static_cast<size_t>(id) + 1];
  std::vector<int32_t> bucket_token, bucket_start;
  for (int64_t v = 0; v < Vp; ++v)
    if (count[v + 1] > 0) bucket_token.push_back(static_cast<int32_t>(v));
  for (int64_t v = 0; v < Vp; ++v) count[v + 1] += count[v];  // count[v] = first slot of v
  std::vector<int32_t> order(static_cast<size_t>(N));
  {
    std::vector<int32_t> next(count.begin(), count.end() - 1);
    for (int64_t bt = 0; bt < N; ++bt) order[next[ids[bt]]++] = static_cast<int32_t>(bt);
  }
  for (int32_t tok : bucket_token) bucket_start.push_back(count[tok]);
  bucket_start.push_back(static_cast<int32_t>(N));
  const int64_t K = static_cast<int64_t>(bucket_token.size());

  // Upload: [bucket_token (K) | bucket_start (K+1) | order (N)] in one scratch buffer; the
  // stream is synchronised before `packed` goes out of scope.
  std::vector<int32_t> packed;
  packed.reserve(static_cast<size_t>(K + K + 1 + N));
  packed.insert(packed.end(), bucket_token.begin(), bucket_token.end());
  packed.insert(packed.end(), bucket_start.begin(), bucket_start.end());
  packed.insert(packed.end(), order.begin(), order.end());
  auto* dev = static_cast<int32_t*>(ctx.scratch(Scratch::kReduce, packed.size() * sizeof(int32_t)));
  MPT_CUDA_CHECK(cudaMemcpyAsync(dev, packed.data(), packed.size() * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, ctx.stream()));
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
  ctx.sync(op);  // `packed` must outlive its copy
  // The CPU backend rounds the whole of both tensors back (untouched elements unchanged).
  if (dwte.dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, dwte.numel());
  if (dwpe.dtype != DType::f32) ctx.add_cast_values(TensorClass::gradient, dwpe.numel());
}

}  // namespace mpt::cuda
