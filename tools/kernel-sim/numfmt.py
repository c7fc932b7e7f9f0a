# Number formats as bit patterns (ints), transcribed line for line from the project's C++:
# core/formats.h (device code, CUDA host code, the CPU's scalar paths) and backend/cpu/
# fast_formats.h (the CPU backend's vectorised loops). Shared by optimizer-elementwise/ (common.py)
# and matmul-embedding-attention/ (fp8.py); their _path.py puts this folder on the import path.
from simt import f32, fbits, from_bits

ABS, INF, QUIET = 0x7FFFFFFF, 0x7F800000, 0x00400000

def u32(x): return x & 0xFFFFFFFF
def u64(x): return x & 0xFFFFFFFFFFFFFFFF
def is_nan32(b): return (b & ABS) > INF

# ---------------- core/formats.h (device code, CUDA host code, the CPU's scalar paths)
def round_magnitude_rne(a, M, B):
    if B == 127:
        shift = 23 - M
        return u32(a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift
    kMinNormalExp = 127 + 1 - B
    e = a >> 23
    if e >= kMinNormalExp:
        sig, shift = a, 23 - M
    else:
        sig = ((a & 0x7FFFFF) | 0x800000) if e else a
        shift = (23 - M) + (kMinNormalExp - (e if e else 1))
        if shift > 25: return 0
    kept = sig >> shift
    rest = sig & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = int(rest > half or (rest == half and (kept & 1) == 1))
    if e >= kMinNormalExp: return u32(kept + up - ((127 - B) << M))
    return kept + up

def widen_magnitude(mag, M, B):
    exp = mag >> M
    man = mag & ((1 << M) - 1)
    if exp != 0: return ((exp + 127 - B) << 23) | (man << (23 - M))
    if man == 0: return 0
    e = 1 - B
    while not (man & (1 << M)):
        man <<= 1; e -= 1
    return ((e + 127) << 23) | ((man & ((1 << M) - 1)) << (23 - M))

def f16_to_f32(h):
    sign = (h & 0x8000) << 16
    mag = h & 0x7FFF
    if mag >= 0x7C00:
        man = (mag & 0x3FF) << 13
        return sign | INF | man | (QUIET if man else 0)
    return sign | widen_magnitude(mag, 10, 15)

def bf16_to_f32(b):
    u = b << 16
    if (u & ABS) > INF: u |= QUIET
    return u

def e4m3_to_f32(v):
    sign = (v & 0x80) << 24
    mag = v & 0x7F
    if mag == 0x7F: return sign | 0x7FF00000
    return sign | widen_magnitude(mag, 3, 7)

def e5m2_to_f32(v):
    sign = (v & 0x80) << 24
    mag = v & 0x7F
    if mag >= 0x7C:
        man = (mag & 0x3) << 21
        return sign | INF | man | (QUIET if man else 0)
    return sign | widen_magnitude(mag, 2, 15)

def f16_from_f32(u):
    a = u & ABS
    if a > INF: return 0x7FFF
    mag = round_magnitude_rne(a, 10, 15)
    if mag > 0x7C00: mag = 0x7C00
    return ((u >> 16) & 0x8000) | mag

def bf16_from_f32(u):
    a = u & ABS
    if a > INF: return 0x7FFF
    return ((u >> 16) & 0x8000) | round_magnitude_rne(a, 7, 127)

def e4m3_from_f32(u, sat=True):
    a = u & ABS
    if a > INF: return 0x7F
    mag = round_magnitude_rne(a, 3, 7)
    if mag > 0x7E: mag = 0x7E if sat else 0x7F
    return ((u >> 24) & 0x80) | mag

def e5m2_from_f32(u, sat=True):
    a = u & ABS
    if a > INF: return 0x7F
    mag = round_magnitude_rne(a, 2, 15)
    if mag > 0x7B: mag = 0x7B if sat else 0x7C
    return ((u >> 24) & 0x80) | mag

def bf16_from_float_stochastic(u, r):
    if (u & ABS) > INF: return 0x7FFF
    mag = ((u & ABS) + (r & 0xFFFF)) >> 16
    return ((u >> 16) & 0x8000) | mag

def stochastic_rounding_bits(seed, step, i):
    z = u64(seed ^ u64(u64(step) * 0x9E3779B97F4A7C15) ^ u64(u64(i) * 0xD1B54A32D192ED03))
    z = u64((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9)
    z = u64((z ^ (z >> 27)) * 0x94D049BB133111EB)
    return u32((z ^ (z >> 31)) >> 32)

def bf16_half_ulp_of_exponent(e):
    return from_bits(((e - 8) << 23) if e > 8 else (1 << ((e if e else 1) + 14)))

TO_F32 = {'f32': lambda b: b, 'f16': f16_to_f32, 'bf16': bf16_to_f32, 'e4m3': e4m3_to_f32,
          'e5m2': e5m2_to_f32}
FROM_F32 = {'f32': lambda u: u, 'f16': f16_from_f32, 'bf16': bf16_from_f32, 'e4m3': e4m3_from_f32,
            'e5m2': e5m2_from_f32}

# ---------------- backend/cpu/fast_formats.h (the CPU backend's vectorised loops)
def fast_round_magnitude(a, M, B):
    shift = 23 - M
    normal = u32(a + u32((B - 127) << 23) + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift
    magic_bits = (127 - B + shift + 1) << 23
    magic = from_bits(magic_bits)
    sub_ = u32(fbits(f32(from_bits(a) + magic)) - magic_bits)   # one fp32 addition, RNE
    min_normal_bits = (127 + 1 - B) << 23
    return sub_ if a < min_normal_bits else normal

def fast_bf16_bits(x_bits):
    u = x_bits; a = u & ABS
    mag = u32(a + 0x7FFF + ((a >> 16) & 1)) >> 16
    return 0x7FFF if a > INF else (((u >> 16) & 0x8000) | mag)

def fast_f16_bits(u):
    a = u & ABS
    mag = fast_round_magnitude(a, 10, 15)
    mag = 0x7C00 if a >= 0x477FF000 else mag
    return 0x7FFF if a > INF else (((u >> 16) & 0x8000) | mag)

def fast_e4m3_bits(u):
    a = u & ABS
    mag = fast_round_magnitude(a, 3, 7)
    mag = 0x7E if a >= 0x43E80000 else mag
    mag = 0x7E if mag > 0x7E else mag
    return 0x7F if a > INF else (((u >> 24) & 0x80) | mag)

def fast_e5m2_bits(u):
    a = u & ABS
    mag = fast_round_magnitude(a, 2, 15)
    mag = 0x7B if a >= 0x47700000 else mag
    mag = 0x7B if mag > 0x7B else mag
    return 0x7F if a > INF else (((u >> 24) & 0x80) | mag)

def fast_e4m3_value(q):
    mag = q & 0x7F
    v = from_bits(mag << 20) * 2.0 ** 120   # exact
    b = fbits(v) | ((q & 0x80) << 24)
    return (b | 0x7FF00000) if mag == 0x7F else b

def fast_e5m2_value(q):
    mag = q & 0x7F
    v = from_bits(mag << 21) * 2.0 ** 112
    sign = (q & 0x80) << 24
    payload = mag & 0x3
    special = INF | (payload << 21) | (int(payload != 0) << 22)
    return sign | (special if mag >= 0x7C else fbits(v))

def fast_bf16_to_f32(b):
    u = b << 16
    return (u | QUIET) if (u & ABS) > INF else u

def fast_bf16_half_ulp(w_bits):
    return bf16_half_ulp_of_exponent((fast_bf16_bits(w_bits) >> 7) & 0xFF)
