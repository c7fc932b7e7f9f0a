# Injected bugs: each mutation flag changes one index, bound, barrier or order in the emulations;
# the comparisons must catch it. Usage: python3 mut.py [flag ...]
import _path  # noqa: F401 (simt.py and mutate.py are in the parent folder)
import mutate
import dbias, embedding, store, attention, quantise, store_fp8, transpose

D = lambda: dbias.main('quick')
E = lambda: embedding.main('all')
S = lambda: store.main('quick')
SF = lambda: store.main('all')
A = lambda: attention.main('quick')
Q = lambda: quantise.main('all')
F8 = lambda: store_fp8.main('quick')
F8F = lambda: store_fp8.main('all')
TR = lambda: transpose.main('all')
muts = [
    ('partial_skip_last', D, 'dbias_partial_kernel stops one row early'),
    ('final_stride7', D, 'dbias_final: warps stride 7 chunks instead of 8'),
    ('final_sums_idx', D, 'dbias_final: sums[w][lane] stored transposed'),
    ('final_nosync', D, 'dbias_final: __syncthreads removed'),
    ('final_reverse', D, 'dbias_final: warp 0 adds the warps in reverse order'),
    ('final_used_all', D, 'dbias_final: adds all 8 warp sums (the +0 guard removed)'),
    ('final_flush_partial', D, 'dbias_final: lanes past OC skip the flush'),
    ('tally_noreduce', D, 'CastTally::flush without the shuffle reduction'),
    ('bucket_start_off', E, 'bucket_positions: bucket starts off by one'),
    ('bucket_order_rev', E, 'bucket_positions: positions in decreasing order'),
    ('fwd_pos_bt', E, 'embedding forward: wpe row bt instead of bt % T'),
    ('dwte_stride_x', E, 'dwte_kernel: column stride by gridDim.x'),
    ('dwpe_bstride', E, 'dwpe_kernel: batch stride C instead of T*C'),
    ('tally_noreduce', E, 'CastTally::flush without the shuffle reduction'),
    ('launch_threads_floor', SF, 'store_launch: threads per block rounded down'),
    ('store_c0_le', S, 'store_kernel: c0 <= cols'),
    ('store_row_stride', S, 'store_kernel: row stride cols - 1'),
    ('store_bias_idx', S, 'store_kernel: bias[c0] for every k'),
    ('store_rstride_x', SF, 'store_kernel: row loop by gridDim.x'),
    ('tally_noreduce', S, 'CastTally::flush without the shuffle reduction'),
    ('direct_plain_writes', S, 'store_kernel kDirect: kPlain/kGelu write y back into out'),
    ('direct_gelu_to_out', S, 'store_kernel kDirect: kGelu writes gelu(y) into out'),
    ('add_stored_nan', S, 'CastTally::add_stored counts a NaN as an overflow'),
    ('direct_tally_add', S, 'store_kernel kDirect: tally.add(y, y) instead of add_stored'),
    ('direct_skip_fused_count', S, "store_kernel kDirect: the fused op's cast not counted"),
    ('direct_res_src', S, 'store_kernel kDirect: the residual read from src (out)'),
    ('sm_row_stride_T', A, 'softmax kernels: row stride T instead of Tp (forward)'),
    ('dk_trans_flip', A, 'plan_attention_gemm: dq transposes dS, dk does not'),
    ('gather_h_swap', A, 'gather_heads_kernel: h and b swapped'),
    ('fwd_mask_lt', A, 'softmax forward: t2 < t'),
    ('fwd_nomask', A, 'softmax forward: no zeros above the diagonal'),
    ('bwd_noD', A, 'softmax backward: D dropped'),
    ('warp_sum_down', A, 'warp_sum with shfl_down instead of xor'),
    ('strip_trcol', Q, 'strip kernel: tr_col map permuted'),
    ('elem_nosync', Q, 'element kernel: __syncthreads before the transpose removed'),
    ('strip_nosync1', Q, 'strip kernel: sync between sub-tiles removed'),
    ('tally_noreduce', Q, 'CastTally::flush without the shuffle reduction'),
    # added 2026-12-02 against 6e29cce: store_kernel's kGeluFp8, gelu_forward_fp8_kernel, fp8_math.cuh,
    # transpose_bytes_kernel
    ('sfp8_gelu_of_v', F8, 'kGeluFp8: GELU of the fp32 sum, not of y rounded to Tout'),
    ('sfp8_direct_writes_y', F8, 'kGeluFp8 kDirect: y written back into out'),
    ('sfp8_zq_tout_ptr', F8, 'kGeluFp8: the byte pack stored through a Tout* (byte i * sizeof(Tout))'),
    ('sfp8_no_flush_amax', F8, 'kGeluFp8: flush_amax not called'),
    ('sfp8_align_skip', F8, "store_output: gelu_out's alignment not checked for kGeluFp8"),
    ('sfp8_host_values2', F8, 'store_output: 2 * rows * cols values for kGeluFp8'),
    ('fp8_noround', F8, 'store_fp8_one: no rounding to T (quantised from fp32)'),
    ('fp8_noround_count', F8, "store_fp8_one: the rounding to T not counted"),
    ('fp8_amax_unrounded', F8, 'store_fp8_one: the amax of the unrounded value'),
    ('fp8_amax_scaled', F8, 'quantise_one: the amax of v * scale'),
    ('fp8_am_last', F8, "quantise_one: am = the last magnitude (no running max)"),
    ('fp8_fmt_swap', F8, 'quantise_one: e4m3 and e5m2 swapped'),
    ('fp8_nocount', F8, "quantise_one: the fp8 cast not counted"),
    ('fp8_zero_mask', F8, 'quantise_one: underflow tested on q & 0xFF (-0 not counted)'),
    ('fp8_amax_noreduce', F8, 'flush_amax: lane 0 atomicMax of its own am (no warp reduction)'),
    ('gfp8_round_f32', F8, 'gelu_forward_fp8_kernel: store_fp8_one<float> whatever Tr'),
    ('gfp8_stride_block', F8, 'gelu_forward_fp8_kernel: grid stride blockDim.x'),
    ('gfp8_values2', F8, 'gelu_forward_fp8: 2n values for round_to fp32 too'),
    ('tr_nosync1', TR, 'transpose_bytes_kernel: __syncthreads after the loads removed'),
    ('tr_nosync2', TR, 'transpose_bytes_kernel: __syncthreads before the tile is refilled removed'),
    ('tr_store_noguard_r', TR, 'transpose_bytes_kernel: store guard without r < rows'),
    ('tr_notrans', TR, 'transpose_bytes_kernel: tile[j][tx] stored (not transposed)'),
    ('tr_ystride_x', TR, 'transpose_bytes_kernel: row tiles strided by gridDim.x'),
    ('tr_grid_x_floor', TR, 'transpose_quantised: grid x = cols / 32 (rounded down)'),
    ('tr_grid_y_floor', TR, 'transpose_quantised: grid y = min(rows / 32, cap) (rounded down)'),
]
mutate.main(muts)
