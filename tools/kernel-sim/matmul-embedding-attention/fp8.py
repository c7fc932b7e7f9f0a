# fp8 e4m3 / e5m2 narrowing, three transcriptions:
#  cuda_hdr: cuda_fp8.hpp's __nv_cvt_float_to_fp8 software path (NaN -> canonical, then
#            __nv_cvt_double_to_fp8), the documented semantics of the device's
#            cvt.rn.satfinite.{e4m3,e5m2}x2.f32 on sm_89+ (which we cannot run here)
#  formats:  src/core/formats.h e4m3_from_float / e5m2_from_float (Saturation::finite)
#  fast:     src/backend/cpu/fast_formats.h e4m3_bits / e5m2_bits (the CPU backend's path)
# (formats and fast from ../numfmt.py, which optimizer-elementwise/ uses too)
import struct
import _path  # noqa: F401 (numfmt.py, the formats.h and fast_formats.h transcriptions, is in the parent folder)
from numfmt import e4m3_from_f32, e5m2_from_f32, fast_e4m3_bits, fast_e5m2_bits

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

def formats(u, e4m3):
    return e4m3_from_f32(u) if e4m3 else e5m2_from_f32(u)

def fast(u, e4m3):
    return fast_e4m3_bits(u) if e4m3 else fast_e5m2_bits(u)

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
