# fp8 e4m3 / e5m2 narrowing, three transcriptions:
#  cuda_hdr: cuda_fp8.hpp's __nv_cvt_float_to_fp8 software path (NaN -> canonical, then
#            __nv_cvt_double_to_fp8), the documented semantics of the device's
#            cvt.rn.satfinite.{e4m3,e5m2}x2.f32 on sm_89+ (which we cannot run here)
#  formats:  src/core/formats.h e4m3_from_float / e5m2_from_float (Saturation::finite)
#  fast:     src/backend/cpu/fast_formats.h e4m3_bits / e5m2_bits (the CPU backend's path)
import struct

def fb(x): return struct.unpack('<I', struct.pack('<f', x))[0]
def bf(u): return struct.unpack('<f', struct.pack('<I', u & 0xFFFFFFFF))[0]
def db(x): return struct.unpack('<Q', struct.pack('<d', x))[0]

def cuda_hdr(xbits, e4m3, satfinite=True):
    if (xbits & 0x7FFFFFFF) > 0x7F800000: xbits = 0x7FFFFFFF
    x = bf(xbits)
    xb = db(x)
    if e4m3:
        BIAS, SIG, MM = 7, 4, 0x7
        MINDENORM_O2 = 0x3F50000000000000; OVF = 0x407D000000000000; MAXNORM = 0x7E; MINNORM = 0x3F90000000000000
    else:
        BIAS, SIG, MM = 15, 3, 0x3
        MINDENORM_O2 = 0x3EE0000000000000; OVF = 0x40EE000000000000 - 1; MAXNORM = 0x7B; MINNORM = 0x3F10000000000000
    HALF = 1 << (53 - SIG - 1)
    sign = ((xb >> 63) << 7) & 0xFF
    exp = ((((xb >> 52) & 0x7FF) - 1023 + BIAS) & 0xFFFF) & 0xFF
    mant = (xb >> (53 - SIG)) & MM
    absx = xb & 0x7FFFFFFFFFFFFFFF
    if absx <= MINDENORM_O2: res = 0
    elif absx > 0x7FF0000000000000: res = 0x7F if e4m3 else (0x7E | mant)
    elif absx > OVF: res = MAXNORM if satfinite else (0x7F if e4m3 else 0x7C)
    elif absx >= MINNORM:
        res = ((exp << (SIG - 1)) | mant) & 0xFF
        rnd = xb & ((HALF << 1) - 1)
        if rnd > HALF or (rnd == HALF and (mant & 1)): res = (res + 1) & 0xFF
    else:
        shift = (1 - exp) & 0xFF
        mant |= 1 << (SIG - 1)
        res = (mant >> shift) & 0xFF
        rnd = (xb | (1 << 52)) & ((HALF << (shift + 1)) - 1)
        if rnd > (HALF << shift) or (rnd == (HALF << shift) and (res & 1)): res = (res + 1) & 0xFF
    return res | sign

def round_magnitude_rne(a, M, B):
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
    up = 1 if (rest > half or (rest == half and (kept & 1))) else 0
    if e >= kMinNormalExp: return (kept + up - ((127 - B) << M)) & 0xFFFFFFFF
    return kept + up

def formats(u, e4m3):
    a = u & 0x7FFFFFFF
    if a > 0x7F800000: return 0x7F
    if e4m3:
        mag = round_magnitude_rne(a, 3, 7)
        if mag > 0x7E: mag = 0x7E
    else:
        mag = round_magnitude_rne(a, 2, 15)
        if mag > 0x7B: mag = 0x7B
    return ((u >> 24) & 0x80) | mag

def f32add(x, y): return struct.unpack('<f', struct.pack('<f', x + y))[0]

def fast_round_magnitude(a, M, B):
    shift = 23 - M
    normal = ((a + (((B - 127) << 23) & 0xFFFFFFFF) + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) & 0xFFFFFFFF) >> shift
    magic_bits = (127 - B + shift + 1) << 23
    magic = bf(magic_bits)
    sub = (fb(f32add(bf(a), magic)) - magic_bits) & 0xFFFFFFFF
    return sub if a < ((127 + 1 - B) << 23) else normal

def fast(u, e4m3):
    a = u & 0x7FFFFFFF
    if e4m3:
        mag = fast_round_magnitude(a, 3, 7)
        mag = 0x7E if a >= 0x43E80000 else mag
        mag = 0x7E if mag > 0x7E else mag
    else:
        mag = fast_round_magnitude(a, 2, 15)
        mag = 0x7B if a >= 0x47700000 else mag
        mag = 0x7B if mag > 0x7B else mag
    return 0x7F if a > 0x7F800000 else (((u >> 24) & 0x80) | mag)

def to_bits(s, e4m3):
    """what the kernels' __nv_cvt_float_to_fp8(s, __NV_SATFINITE, ...) gives (header semantics)."""
    return cuda_hdr(fb(s), e4m3)

if __name__ == '__main__':
    import random
    rng = random.Random(5)
    pats = set()
    for hi in range(65536): pats.add(hi << 16); pats.add((hi << 16) | 0x8000); pats.add((hi << 16) | 0x7FFF)
    for _ in range(200000): pats.add(rng.getrandbits(32))
    # thresholds: around 464, 448, 61440, 57344, min subnormal halves, inf, NaN
    for base in (464.0, 448.0, 480.0, 61440.0, 57344.0, 2.0 ** -10, 2.0 ** -9, 2.0 ** -17, 2.0 ** -16, 2.0 ** -6, 2.0 ** -14):
        b = fb(base)
        for d in range(-3, 4): pats.add(b + d); pats.add((b + d) | 0x80000000)
    pats |= {0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 1, 0x80000001}
    for e4 in (True, False):
        name = 'e4m3' if e4 else 'e5m2'
        diff_f = [u for u in pats if cuda_hdr(u, e4) != formats(u, e4)]
        diff_c = [u for u in pats if fast(u, e4) != formats(u, e4)]
        print('%s: %d patterns; header vs formats.h differ at %d %s; fast vs formats.h differ at %d %s' % (
            name, len(pats), len(diff_f), [hex(u) for u in sorted(diff_f)[:6]], len(diff_c), [hex(u) for u in sorted(diff_c)[:6]]))
        for u in (0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x80000001):
            print('   %s %-12s -> header %#04x formats %#04x fast %#04x' % (name, hex(u), cuda_hdr(u, e4), formats(u, e4), fast(u, e4)))
