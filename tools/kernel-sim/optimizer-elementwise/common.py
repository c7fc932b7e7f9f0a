# Shared pieces of these emulations: the CPU backend's narrowing and widening, models of the CUDA
# conversion intrinsics, comparisons, special values. The transcriptions of core/formats.h and
# backend/cpu/fast_formats.h are in ../numfmt.py, the scheduler (with __syncwarp), Report,
# counters() and ctr() in ../simt.py; both are re-exported here.
#
# Tensors are held as bit patterns (ints), every dtype: Python floats cannot hold fp32
# signalling NaNs (a round trip through a double quiets them), and the casts promise the bits.
import math, random, struct
import _path  # noqa: F401 (simt.py and numfmt.py are in the parent folder)
import simt
from simt import (f32, fbits, from_bits, add, sub, mul, div, sqrt_rn, expf, MUT, Tally, Buf, launch,
                  Err, Report, counters, ctr)
from numfmt import *

FLT_MAX = from_bits(0x7F7FFFFF)
DTYPES = ('f32', 'f16', 'bf16', 'e4m3', 'e5m2')
NBITS = {'f32': 32, 'f16': 16, 'bf16': 16, 'e4m3': 8, 'e5m2': 8}
# dtype_traits(dt).max_finite (core/dtype.h) as the float the kernels and the CPU compare with
MAXF = {'f32': FLT_MAX, 'f16': 65504.0, 'bf16': f32(float.fromhex('0x1.fep127')),
        'e4m3': 448.0, 'e5m2': 57344.0}
for _d in DTYPES:  # buffers of bit patterns: one tag per dtype (simt's alignment table)
    simt.ESIZE[_d + 'b'] = max(1, NBITS[_d] // 8)
simt.ESIZE['f64'] = 8

# CPU widen_into: f16 by a table built from formats.h's to_float, bf16 by fast::to_float, fp8
# arithmetically; fp32 is a memcpy.
CPU_WIDEN = {'f32': lambda b: b, 'f16': f16_to_f32, 'bf16': fast_bf16_to_f32,
             'e4m3': fast_e4m3_value, 'e5m2': fast_e5m2_value}
CPU_NARROW = {'f16': fast_f16_bits, 'bf16': fast_bf16_bits, 'e4m3': fast_e4m3_bits,
              'e5m2': fast_e5m2_bits}
ZERO_MASK = {'f16': 0x7FFF, 'bf16': 0x7FFF, 'e4m3': 0x7F, 'e5m2': 0x7F}

def cpu_narrow_into(vals_bits, T):
    """narrow_into (cpu_precision.cpp): fp32 bits -> T bits with narrow_block's counts."""
    if T == 'f32': return list(vals_bits), (0, 0)
    to_bits, zm = CPU_NARROW[T], ZERO_MASK[T]
    max_bits = fbits(MAXF[T])
    out, over, under = [], 0, 0
    for x in vals_bits:
        y = to_bits(x)
        out.append(y)
        a = x & ABS
        over += int(a > max_bits and a <= 0x7F7FFFFF)
        under += int(a != 0 and (y & zm) == 0)
    return out, (over, under)

def cpu_widen_vals(bits, dt):
    return [from_bits(CPU_WIDEN[dt](b)) for b in bits]

# ---------------- the CUDA intrinsics (cuda_common.cuh load / store / load_any)
# __float2bfloat16_rn and __float2half_rn are modelled by formats.h's conversions, which the
# project checks against them bit for bit (tests/test_formats.cpp); __bfloat162float is a shift
# (a signalling NaN stays signalling, unlike formats.h's to_float); __half2float as formats.h.
def dev_load(dt, b):
    if dt == 'bf16': return from_bits(b << 16)
    if dt == 'f16': return from_bits(f16_to_f32(b))
    return from_bits(b)

def dev_store(T, x):
    u = fbits(x)
    if T == 'bf16': return bf16_from_f32(u)
    if T == 'f16': return f16_from_f32(u)
    return u

def store_counted(t, buf, T, i, x, tally):
    """cuda_common.cuh store_counted<T>: p[i] = store<T>(x); tally.add(x, load<T>(y), max)."""
    y = dev_store(T, x)
    t.st(buf, i, y)
    if T != 'f32' and 'store_nocount' not in MUT:
        tally.add(x, dev_load(T, y), MAXF[T])

NAN_PATTERN = {'f32b': 0x7FFFFFFF, 'f16b': 0x7FFF, 'bf16b': 0x7FFF, 'e4m3b': 0x7F, 'e5m2b': 0x7F}

def ldb(t, buf, i):
    """A load of a bit pattern; simt records an out-of-bounds or uninitialised read as an error
    and returns a float NaN, which becomes the dtype's NaN pattern here."""
    v = t.ld(buf, i)
    return v if isinstance(v, int) else NAN_PATTERN.get(buf.dtype, 0)

def load_any(t, buf, dt, i):
    return dev_load(dt, ldb(t, buf, i))

def bitbuf(name, dt, bits, base=256):
    b = Buf(name, dt + 'b', len(bits), None, base)
    b.data = list(bits)
    return b

def outbuf(name, dt, n, base=512):
    return Buf(name, dt + 'b', n, None, base)

# ---------------- comparison
def same_bits(dt, a, b, nan_loose):
    """Equal bit patterns; with nan_loose, any two fp32 NaNs are equal (the NaN an fp32
    arithmetic result carries differs between x86 and the GPU: tests/test_cuda_ops.cpp compares
    NaN by kind)."""
    if a == b: return True
    if a is None or b is None: return False
    if nan_loose and dt == 'f32' and is_nan32(a) and is_nan32(b): return True
    return False

def compare(R, what, dt, got, exp, nan_loose=False):
    bad = [i for i in range(len(exp)) if not same_bits(dt, got[i], exp[i], nan_loose)]
    R.check(not bad, '%s: %d of %d differ, first at %s (got %s, want %s)' % (
        what, len(bad), len(exp), bad[:3], [hx(got[i]) for i in bad[:3]], [hx(exp[i]) for i in bad[:3]]))
    return not bad

def hx(b): return None if b is None else hex(b)

def writes_once(R, buf, what, expect=1):
    bad = [i for i in range(buf.n) if buf.writes[i] != expect]
    R.check(not bad, '%s: %s written %s times at %s (expected %d)' % (
        what, buf.name, [buf.writes[i] for i in bad[:3]], bad[:3], expect))

# ---------------- inputs: random values with the special ones mixed in
def f32_specials():
    s = [0x00000000, 0x80000000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF,
         0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000001, 0x007FFFFF,
         0x00800000, 0x80800000,
         0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0xFF7F8000, 0x7F7E8000,   # bf16 max, its ties
         0x3F808000, 0x3F818000, 0xBF808000, 0x00008000, 0x00018000, 0x00007FFF,  # bf16 ties
         0x477FE000, 0x477FEFFF, 0x477FF000, 0xC77FF000, 0x33000000, 0x33400000, 0x33C00000,
         0x32FFFFFF, 0xB3000001, 0x387FC000, 0x38800000,   # fp16 max, 65520, subnormal ties
         0x3F801000, 0x3F803000, 0xC2001000, 0x46FFF000,     # fp16 normal ties (even, odd)
         0x43E00000, 0x43E80000, 0x43E80001, 0x43F00000, 0xC3E80000, 0x3A800000, 0x3B000000,
         0x3B400000, 0x3AFFFFFF,                              # e4m3 448, 464, 480, 2^-10, 2^-9
         0x47600000, 0x47700000, 0x476FFFFF, 0x37000000, 0x37800000, 0x37C00000, 0x36FFFFFF]
    return s

NARROW_SPECIALS = {'bf16': [0x7F81, 0xFFBF, 0x7FA0, 0x7FC0, 0xFFFF, 0x7F80, 0xFF80, 0x0001, 0x8001],
                   'f16': [0x7C01, 0xFDFF, 0x7D00, 0x7E00, 0xFFFF, 0x7C00, 0xFC00, 0x0001, 0x8001, 0x7BFF],
                   'e4m3': [0x7F, 0xFF, 0x7E, 0xFE, 0x01, 0x81],
                   'e5m2': [0x7C, 0xFC, 0x7D, 0x7E, 0xFF, 0x7B, 0x01, 0x81]}

def rand_bits(rng, n, dt, scale=1.0, special=0.0):
    """n values of dt as bits: gaussian*scale rounded to dt; a fraction `special` replaced by
    special fp32 values (rounded to dt) or, for the narrow formats, random bit patterns."""
    out = []
    sp = f32_specials()
    for _ in range(n):
        r = rng.random()
        if r < special * 0.6:
            u = rng.choice(sp)
        elif r < special and dt != 'f32':
            if rng.random() < 0.3:   # NaN (signalling and quiet) and infinity encodings
                out.append(rng.choice(NARROW_SPECIALS[dt])); continue
            out.append(rng.getrandbits(NBITS[dt])); continue
        elif r < special:
            u = rng.getrandbits(32)
        else:
            u = fbits(f32(rng.gauss(0.0, scale)))
        out.append(FROM_F32[dt](u))
    return out

def f64bits(x): return struct.unpack('<Q', struct.pack('<d', x))[0]
