#include "model/cuda_workspace.h"

#include <algorithm>

#include "backend/cuda/workspace_plan.h"

namespace mpt {

double cuda_workspace_bytes(const ModelConfig& cfg, int B, int T, const PrecisionPolicy& policy,
                            const MemoryLedger& ledger, int cc_major) {
  using namespace cuda;
  const int64_t N = int64_t{B} * T, C = cfg.n_embd, NH = cfg.n_head, Vp = cfg.padded_vocab();
  const int L = cfg.n_layer;
  const DType act = policy.activation, param = policy.param, grad = policy.grad;
  // The GEMM specs Gpt uses (Gpt::gemm_spec): under fp8, the blocks' linear layers (but the
  // first and last blocks when kept in bf16) and the LM head when asked for; the others native.
  const bool fp8 = policy.matmul == MatmulPrecision::fp8;
  MatmulSpec other(policy.unquantised_matmul());
  MatmulSpec q(MatmulPrecision::fp8);
  q.inp.format = q.weight.format = policy.fp8.forward_format();
  q.dout.format = policy.fp8.grad_format();
  const bool first_last_bf16 = fp8 && policy.fp8.first_last_blocks_bf16;
  const bool some_blocks_fp8 = fp8 && !(first_last_bf16 && L <= 2);
  const bool some_blocks_native = !fp8 || first_last_bf16;
  const bool head_fp8 = fp8 && policy.fp8.lm_head_fp8;
  const bool current_scaling = policy.fp8.scaling.recipe == "current";

  ScratchPlan s;
  // One linear layer (N rows, C in, OC out), forward and backward, as Gpt calls them: outputs
  // and input gradients in the activation dtype, weight gradients in the grad dtype.
  auto linear = [&](int64_t Cin, int64_t OC, bool is_fp8, bool bias) {
    const MatmulSpec& spec = is_fp8 ? q : other;
    // (An fp8 GEMM whose input its producer stored quantised (Gpt::fp8_producers) takes no
    // input copy in its forward; planned as if it did, the workspace is the same, since the
    // backward's copy of dout (N x OC) is at least as large: OC >= Cin but for mlp.c_proj, whose
    // N x 4C is c_fc's dout copy.)
    plan_matmul_forward(s, N, Cin, OC, act, param, act, spec, bias, param);
    // Gpt gives every fp8 GEMM the cache of its forward's quantised input (fp8_inp_cache).
    plan_matmul_backward(s, N, Cin, OC, act, param, act, /*dinp=*/true, act, grad, bias, spec,
                         /*inp_cached=*/is_fp8);
    if (is_fp8 && current_scaling) {  // each operand's amax before its GEMM
      plan_amax(s, N * Cin);
      plan_amax(s, OC * Cin);
      plan_amax(s, N * OC);
    }
  };
  for (bool block_fp8 : {false, true}) {
    if (L == 0 || !(block_fp8 ? some_blocks_fp8 : some_blocks_native)) continue;
    linear(C, 3 * C, block_fp8, true);  // attn.c_attn
    linear(C, C, block_fp8, true);      // attn.c_proj
    linear(C, 4 * C, block_fp8, true);  // mlp.c_fc
    linear(4 * C, C, block_fp8, true);  // mlp.c_proj
  }
  if (L > 0) {
    const OperandFormat f = attention_operand_format(act, act, policy.unquantised_matmul());
    plan_attention(s, false, B, NH, T, C / NH, f);
    plan_attention(s, true, B, NH, T, C / NH, f);
  }
  linear(C, Vp, head_fp8, false);  // the tied LM head
  plan_layernorm_backward(s, N, C);
  plan_embedding_backward(s, N, Vp);  // the rows of wte: what the op sizes its buckets by
  // The slab's element count, from the weights (the gradients may add an all-reduce copy).
  plan_sum_squares(s, static_cast<int64_t>(ledger.parameters / dtype_size(param)));
  plan_count_nonfinite(s, N * std::max(Vp, 4 * C));  // the largest output a replay checks
  return static_cast<double>(lt_workspace_size(cc_major) + s.scratch_bytes());
}

}  // namespace mpt
