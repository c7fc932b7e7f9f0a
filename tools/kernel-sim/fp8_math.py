# src/backend/cuda/fp8_math.cuh (new in 5589148, as at 6e29cce), line by line: quantise_one (one
# element's fp8 cast, moved there from matmul.cu), store_fp8_one (Fp8Output's two casts: round to
# T, then quantise_one) and flush_amax (a warp's amax, one atomicMax). Shared by
# matmul-embedding-attention/ (store_kernel's kGeluFp8, gelu_forward_fp8_kernel) and
# layernorm-classifier/ (the forward kernels' Fp8Out). Also the CPU backend's store_fp8
# (cpu_precision.cpp, store_fp8_loop with RoundBf16/RoundF16/RoundF32) on bit patterns with
# numfmt.py's fast_formats.h transcriptions, and device_rounding(), which makes simt's ROUND give
# formats.h's canonical NaN (see there).
#
# Python cannot pass `am` by reference: quantise_one and store_fp8_one return (q, am).
import contextlib, importlib.util, math, os
import simt
from simt import fbits, from_bits, mul, MUT, ROUND, MAXF, narrow, reduce_max_sync
import numfmt

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    'kernel_sim_fp8', os.path.join(_here, 'matmul-embedding-attention', 'fp8.py'))
_fp8 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fp8)
to_bits = _fp8.to_bits  # __nv_cvt_float_to_fp8(s, __NV_SATFINITE, ...): cuda_fp8.hpp's semantics

FP8_MAX = {True: 448.0, False: 57344.0}  # kE4M3 ? 448.0f : 57344.0f


def quantise_one(v, scale, am, tally, e4):
    """template <bool kE4M3> quantise_one(float v, float scale, unsigned& am, CastTally& tally)"""
    mag = fbits(v) & 0x7FFFFFFF                       # __float_as_uint(v) & 0x7FFFFFFFu
    if 'fp8_amax_scaled' in MUT: mag = fbits(mul(v, scale)) & 0x7FFFFFFF
    if 'fp8_am_last' in MUT: am = mag                 # (the running max dropped)
    else: am = mag if mag > am else am                # am = mag > am ? mag : am
    s = mul(v, scale)                                 # __fmul_rn(v, scale)
    q = to_bits(s, e4 if 'fp8_fmt_swap' not in MUT else not e4)
    # stored == 0 exactly when the magnitude bits are zero (a NaN stays NaN: not counted)
    if 'fp8_nocount' not in MUT:
        mask = 0xFF if 'fp8_zero_mask' in MUT else 0x7F
        tally.add(s, 1.0 if (q & mask) else 0.0, FP8_MAX[e4])
    return q, am


def store_fp8_one(T, y, scale, am, tally, e4):
    """template <class T, bool kE4M3> store_fp8_one(float y, float scale, unsigned& am, CastTally&):
    r = store<T>(y); v = load<T>(r) (exact); counted when T narrows; quantise_one(v)."""
    if 'fp8_noround' in MUT: T = 'f32'
    r = ROUND[T](y)
    v = r
    if narrow(T) and 'fp8_noround_count' not in MUT: tally.add(y, v, MAXF[T])
    if 'fp8_amax_unrounded' in MUT:   # the amax of y, not of the rounded value
        q, _ = quantise_one(v, scale, am, tally, e4)
        m = fbits(y) & 0x7FFFFFFF
        return q, (m if m > am else am)
    return quantise_one(v, scale, am, tally, e4)


def flush_amax(t, am, amax_bits):
    """flush_amax(unsigned am, unsigned* amax_bits): every lane of the warp must call it (generator,
    `yield from`)."""
    if amax_bits is None: return
    if 'fp8_amax_noreduce' in MUT:
        yield ('xor', 0, 1)
    else:
        am = yield from reduce_max_sync(am)   # __reduce_max_sync(0xFFFFFFFF, am)
    if (t.tx & 31) == 0 and am: t.atomic_max(amax_bits, 0, am)


# ---------------- device rounding: formats.h's NaN
def _dev_round(to, back):
    def r(x):
        return from_bits(back(to(fbits(x))))
    return r

DEV_ROUND = {'bf16': _dev_round(numfmt.bf16_from_f32, numfmt.bf16_to_f32),
             'f16': _dev_round(numfmt.f16_from_f32, numfmt.f16_to_f32)}


@contextlib.contextmanager
def device_rounding():
    """simt.ROUND's bf16/f16 (simt.bf16 and struct's half) keep a NaN's sign and payload; the
    device's __float2bfloat16_rn / __float2half_rn give the canonical 0x7FFF, as formats.h does
    (the project checks them against it, tests/test_formats.cpp). A NaN's magnitude bits reach the
    fp8 amax, so these scripts round as formats.h within this block (finite values and
    infinities: the same bits as simt's)."""
    saved = dict(ROUND)
    ROUND.update(DEV_ROUND)
    try:
        yield
    finally:
        ROUND.update(saved)


# ---------------- the CPU backend's store_fp8 (cpu_precision.cpp, store_fp8_loop), on bits
kMaxFiniteBits = 0x7F7FFFFF
CPU_ROUND = {'bf16': (numfmt.fast_bf16_bits, numfmt.fast_bf16_to_f32),
             'f16': (numfmt.fast_f16_bits, numfmt.f16_to_f32)}   # f16: widen_tables (formats.h)
CPU_FP8 = {True: numfmt.fast_e4m3_bits, False: numfmt.fast_e5m2_bits}


def cpu_store_fp8(xbits, round_to, e4, scale):
    """CpuBackend::store_fp8 on fp32 bit patterns x: (bytes, rounded CastCounts, quantised
    CastCounts, amax bits); CastCounts as (values, over, under)."""
    narrows = round_to != 'f32'
    round_max = fbits(MAXF[round_to]) if narrows else 0
    q_max = fbits(FP8_MAX[e4])
    to_bits8 = CPU_FP8[e4]
    out = []
    r_over = r_under = q_over = q_under = 0
    m = 0
    for x in xbits:
        if narrows:   # RoundBf16 / RoundF16::round
            tb, widen = CPU_ROUND[round_to]
            b = tb(x)
            a = x & 0x7FFFFFFF
            r_over += int(a > round_max and a <= kMaxFiniteBits)
            r_under += int(a != 0 and (b & 0x7FFF) == 0)
            w = widen(b)
        else:         # RoundF32
            w = x
        a = w & 0x7FFFFFFF                        # magnitude_bits(w)
        m = a if a > m else m
        s = fbits(mul(from_bits(w), scale))       # w * scale
        q = to_bits8(s)
        out.append(q)
        sa = s & 0x7FFFFFFF
        q_over += int(sa > q_max and sa <= kMaxFiniteBits)
        q_under += int(sa != 0 and (q & 0x7F) == 0)
    n = len(xbits)
    return out, (n if narrows else 0, r_over, r_under), (n, q_over, q_under), m


def max_magnitude(vals):
    """The largest magnitude bits among fp32 values (a NaN's exceed infinity's)."""
    return max([fbits(v) & 0x7FFFFFFF for v in vals] + [0])
