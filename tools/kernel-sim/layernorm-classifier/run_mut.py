# Injected bugs in the LayerNorm and classifier emulations (flags in simt.MUT); each must make a
# check fail. Usage: python3 run_mut.py [flag ...]
import _path  # noqa: F401 (simt.py and mutate.py are in the parent folder)
import simt, mutate
import run_ln, run_ce, run_ln_fp8
from run_ln import Report, test_case
MIX = ('bf16', 'f32', 'f16', 'bf16', 'f16', 'f32', 'bf16', 'f16')
F16S = ('f32', 'f32', 'f32', 'f32', 'f16', 'f16', 'f16', 'f16')
LN = [lambda R: test_case(R, 10, 129, MIX, 1), lambda R: test_case(R, 3, 1024, ('f32',) * 8, 2),
      lambda R: test_case(R, 4, 100, F16S, 3, special=True)]
LN_CH = [lambda R: test_case(R, 530, 5, ('f32',) * 8, 4)]
CE = [lambda R: run_ce.case(R, 3, 37, 40, 'bf16', 0.25, 1),
      lambda R: run_ce.case(R, 3, 50, 64, 'f16', 0.0, 2, special=True),
      lambda R: run_ce.case(R, 2, 5000, 5008, 'bf16', 0.5, 3),
      lambda R: run_ce.case(R, 3, 1031, 1040, 'f16', 1e-4, 4, special=True)]
muts = [('load_cols_le', LN), ('reg_var_le', LN), ('reg_w_row', LN), ('warp_sum_down', LN),
        ('reg_nobarrier', LN), ('reg_acc_idx', LN), ('reg_sb_dnorm', LN), ('launcher_lt', LN),
        ('tally_noreduce', LN), ('colsum_stride', LN_CH), ('colsum_idx', LN),
        ('block_sum_nosync', CE), ('ce_ly_from_row', CE), ('ce_pass1_V', CE), ('ce_pad_grad', CE),
        ('ce_staged_kvec1', CE), ('tally_noreduce', CE)]
# Session 15: kStored (the uncommitted change of 2026-12-02), on inputs with infinities and NaN in
# the first V columns and in the padded ones (run_ce.inject_nonfinite).
CE_ST = [lambda R: run_ce.case(R, 3, 37, 40, 'bf16', 0.25, 1, nonfinite=True),          # kVec 8
         lambda R: run_ce.case(R, 4, 1031, 1037, 'bf16', 0.0, 2, nonfinite=True),       # kVec 1, eval
         lambda R: run_ce.case(R, 2, 5000, 5008, 'bf16', 0.5, 3, nonfinite=True)]       # two strides
muts += [('ce_stored_pass1_V', CE_ST),     # pass1_end = V for kStored: padded columns not counted
         ('ce_stored_count_V', CE_ST),     # add_stored only where i0 + k < V
         ('ce_stored_add', CE_ST),         # CastTally::add(stored, stored, max) for add_stored
         ('add_stored_nan', CE_ST),        # simt.Tally.add_stored counting a NaN as well
         ('ce_stored_write_pass1', CE_ST), # the row written back in pass 1, as kProduct does
         ('ce_stored_noflush', CE_ST),     # act_tally not flushed for kStored
         ('ce_stored_online_Vp', CE_ST),   # the padded columns in the softmax (up to pass1_end)
         ('ce_stored_no_values', CE_ST),   # the host's old `if (d)`: no N*Vp activation values
         ('ce_stored_values_V', CE_ST),    # the host adds N*V activation values
         ('ce_stored_kvec1', CE_ST)]       # kStored always kVec 1

# Added 2026-12-02 against 6e29cce: the forward kernels' Fp8Out policy (5589148), cases of run_ln_fp8.py
# (under fp8_math.device_rounding, as that script runs them).
LN8 = [lambda R: run_ln_fp8.checked(R, 3, 33, ('bf16', 'f32', 'f16'), 'f16', False, 0.5, 1, nonfinite=True),
       lambda R: run_ln_fp8.checked(R, 7, 37, ('bf16', 'bf16', 'bf16'), 'bf16', True, 64.0, 2),
       lambda R: run_ln_fp8.checked(R, 11, 129, ('f32',) * 3, 'f32', True, 1.0, 3),
       lambda R: run_ln_fp8.checked(R, 4, 1031, ('bf16',) * 3, 'bf16', False, 0.5, 4)]
muts += [('lnfp8_noround', LN8),            # Fp8Out::put quantises y unrounded (store_fp8_one<float>)
         ('lnfp8_flush_narrow_only', LN8),  # Fp8Out::finish flushes only when T narrows
         ('lnfp8_no_amax', LN8),            # Fp8Out::finish without flush_amax
         ('lnfp8_regs_put_c', LN8),         # register kernel: put(row + lane * kCols + k)
         ('lnfp8_values1', LN8),            # host: N * C values whatever round_to
         ('fp8_am_last', LN8),              # quantise_one keeps the last magnitude only
         ('fp8_amax_noreduce', LN8),        # flush_amax without __reduce_max_sync
         ('fp8_amax_unrounded', LN8),       # store_fp8_one: the amax of y unrounded
         ('fp8_noround_count', LN8)]        # store_fp8_one: the rounding to T not counted

def suite(tests):
    """One run of a flag: the cases into one Report; an emulator stop ends that case only."""
    def run():
        R = Report()
        for f in tests:
            try:
                f(R)
            except simt.Err as e:
                R.fail.append('emulator stopped: %s' % e)
        return R
    return run

mutate.main([(m, suite(tests), '') for m, tests in muts])
