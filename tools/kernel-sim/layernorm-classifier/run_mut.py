# Injected bugs in the LayerNorm and classifier emulations (flags in simt.MUT); each must make a
# check fail. Usage: python3 run_mut.py [flag ...]
import _path  # noqa: F401 (simt.py and mutate.py are in the parent folder)
import simt, mutate
import run_ln, run_ce
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
