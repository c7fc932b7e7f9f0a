# Injected bugs: each flag changes one index, bound, barrier, rounding, count or order in the
# emulations (simt.MUT); the comparisons must catch it. Usage: python3 mut.py [flag ...]
import _path  # noqa: F401 (simt.py and mutate.py are in the parent folder)
import mutate
import adamw, norm, cast, elementwise

A = lambda: adamw.main('all')
N = lambda: norm.main('quick')
C = lambda: cast.main('quick')
E = lambda: elementwise.main('quick')
muts = [
    ('adamw_stride_short', A, 'adamw_kernel: grid stride gridDim*blockDim - 1'),
    ('adamw_fma', A, 'adamw_kernel: m update contracted into an FMA'),
    ('adamw_c_swap', A, 'adamw_kernel: bias corrections c1 and c2 swapped'),
    ('adamw_lost_now', A, "adamw_kernel: lost update judged by the new weight's half ulp"),
    ('adamw_lost_le', A, 'adamw_kernel: |upd| <= half ulp counted as lost'),
    ('adamw_sr_index', A, 'adamw_kernel: random bits from i, first_index dropped'),
    ('adamw_sr_rn', A, 'adamw_kernel: round to nearest where stochastic rounding is asked for'),
    ('adamw_sr_under_sign', A, 'adamw_kernel: SR underflow counted only when all 16 bits are 0'),
    ('adamw_master_skip', A, 'adamw_kernel: master not written back'),
    ('adamw_lost_nosync', A, 'adamw_kernel: __syncthreads before the lost-count sum removed'),
    ('adamw_lost_lastwarp', A, 'adamw_kernel: thread 0 sums blockDim/32 - 1 warps'),
    ('tally_noreduce', A, 'CastTally::flush without the shuffle reduction (adamw)'),
    ('store_nocount', A, 'store_counted does not tally (adamw)'),
    ('norm_first_nowarp', N, "sum_squares_kernel: warp index left out of the warp's first chunk"),
    ('norm_fetch_noguard', N, 'sum_squares_kernel: fetch without the i < n guard'),
    ('norm_nosync1', N, 'sum_squares_kernel: __syncwarp after the tile store removed'),
    ('norm_nosync2', N, 'sum_squares_kernel: __syncwarp before the next tile removed'),
    ('norm_m31', N, 'sum_squares_kernel: at most 31 elements a tile'),
    ('norm_tile_transpose', N, 'sum_squares_kernel: lane reads t[k][lane] instead of t[lane][k]'),
    ('norm_f32_square', N, 'sum_squares_kernel: square rounded to fp32'),
    ('norm_grid_floor', N, 'launch: blocks rounded down'),
    ('norm_host_pairwise', N, 'host: partials summed exactly (fsum) instead of in order'),
    ('cast_e4m3_nosat', C, 'cast: e4m3 without saturation'),
    ('cast_bf16_trunc', C, 'cast: bf16 truncated instead of rounded'),
    ('cast_f16_ties_away', C, 'cast: fp16 ties away from zero'),
    ('cast_widen_noquiet', C, "cast: bf16 widened without quieting NaNs (as __bfloat162float)"),
    ('cast_over_inf', C, 'CastTally::add: infinities counted as overflows'),
    ('cast_under_bits', C, 'CastTally::add: underflow only to +0 (bits == 0)'),
    ('cast_stride_plus', C, 'cast_kernel: grid stride + 1'),
    ('amax_nosync', C, 'block_max_u32: __syncthreads removed'),
    ('amax_lastwarp', C, 'block_max_u32: thread 0 reads one warp fewer'),
    ('amax_signed', C, 'amax_kernel: sign bit not cleared'),
    ('amax_fmaxf', C, 'amax_kernel: fmaxf on floats (drops NaN)'),
    ('nonfinite_gt', C, 'nonfinite_kernel: > inf instead of >= inf'),
    ('nonfinite_down', C, 'block_sum_u64: shfl_down instead of xor (equivalent: lane 0 still gets the sum)'),
    ('tally_noreduce', C, 'CastTally::flush without the shuffle reduction (cast)'),
    ('gelu_cube_order', E, 'gelu_tanh: kGeluCubic * (v*v*v)'),
    ('gelu_half_last', E, 'gelu_value: 0.5 * (v * (1 + th))'),
    ('gelu_poly_order', E, 'gelu_derivative: 3 kC * (v*v)'),
    ('gelu_bwd_noflush', E, 'gelu_backward_kernel: tally never flushed'),
    ('residual_start', E, 'residual_kernel: first index blockIdx.x * 32 + threadIdx.x'),
    ('residual_b_next', E, 'residual_kernel: b read at i + 1'),
    ('residual_le', E, 'residual_kernel: loop while i <= n'),
    ('fill_stride_x2', E, 'fill_kernel: grid stride doubled'),
    ('fill_f16_trunc', E, 'fill: fp16 value truncated on the host'),
    ('store_nocount', E, 'store_counted does not tally (gelu, residual)'),
]
mutate.main(muts)
