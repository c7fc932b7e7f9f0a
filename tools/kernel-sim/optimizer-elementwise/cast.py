# cast.cu: cast_kernel<S, D> (lines 35-47) for all 25 dtype pairs, amax_kernel (96-105) and
# nonfinite_kernel (107-116) with block_max_u32 / block_sum_u64 and the host's combination of the
# partials (153-189), against CpuBackend::cast / amax / count_nonfinite (cpu_precision.cpp:
# 341-367): bits (NaN encodings included), cast counts, amax bits, non-finite counts.
# Before the kernels: formats.h (the device's conversions) against fast_formats.h (the CPU's)
# over every 8- and 16-bit pattern and sampled fp32 patterns.
# reduce_blocks' cap (kMaxReduceBlocks, 1024) is shrunk to 3 so that the reductions' grid-stride
# loops iterate; the cast kernel runs with its launch grid, or a reduced one where marked.
# Usage: python3 cast.py [quick]
import sys, time, random
import _path  # noqa: F401
from common import *

kBlock = 256

def grid_stride_blocks(n, per=kBlock): return min(max(1, (n + per - 1) // per), 65535)
def reduce_blocks(n, cap): return min(max(1, (n + kBlock - 1) // kBlock), cap)

def dev_narrow(D, u):
    if 'cast_e4m3_nosat' in MUT and D == 'e4m3': return e4m3_from_f32(u, sat=False)
    if 'cast_bf16_trunc' in MUT and D == 'bf16':
        return 0x7FFF if (u & ABS) > INF else u >> 16
    if 'cast_f16_ties_away' in MUT and D == 'f16':
        a = u & ABS
        if 0x38800000 <= a < 0x477FF000 and (a & 0x1FFF) == 0x1000 and (f16_from_f32(u) & 1) == 0:
            return f16_from_f32(u) + 1   # a normal-range tie that went to even (down): away
    return FROM_F32[D](u)

def dev_widen(S, b):
    if 'cast_widen_noquiet' in MUT and S == 'bf16': return b << 16
    return TO_F32[S](b)

class CastTallyBits(Tally):
    """CastTally::add on the fp32 values (as bits here, so the NaNs are the ones stored)."""
    def add_bits(self, xu, yu, maxf):
        x, stored = from_bits(xu), from_bits(yu)
        a = abs(x)
        if 'cast_over_inf' in MUT: self.over += int(a > maxf)
        else: self.over += int(a > maxf and a <= FLT_MAX)
        if 'cast_under_bits' in MUT: self.under += int(x != 0.0 and yu == 0)
        else: self.under += int(x != 0.0 and stored == 0.0)

def cast_kernel(t, S, D, dst, src, n, maxf, counters):
    tally = CastTallyBits()
    i = t.bx * t.bdim[0] + t.tx
    stride = t.gdim[0] * t.bdim[0]
    if 'cast_stride_plus' in MUT: stride += 1
    while i < n:
        x = dev_widen(S, ldb(t, src, i))
        y = dev_narrow(D, x)
        t.st(dst, i, y)
        if D != 'f32': tally.add_bits(x, dev_widen(D, y), maxf)
        i += stride
    if D != 'f32': yield from tally.flush(t, counters)

def block_max_u32(t, v, shared):
    for off in (16, 8, 4, 2, 1):
        o = yield ('xor', v, off); v = max(v, o)
    if (t.tx & 31) == 0: t.shst(shared, t.tx >> 5, v)
    if 'amax_nosync' not in MUT: yield ('sync',)
    m = 0
    if t.tx == 0:
        nw = t.bdim[0] // 32 - (1 if 'amax_lastwarp' in MUT else 0)
        for w in range(nw): m = max(m, t.shld(shared, w))
    return m

def block_sum_u64(t, v, shared):
    for off in (16, 8, 4, 2, 1):
        o = yield ('down' if 'nonfinite_down' in MUT else 'xor', v, off); v += o
    if (t.tx & 31) == 0: t.shst(shared, t.tx >> 5, v)
    yield ('sync',)
    s = 0
    if t.tx == 0:
        for w in range(t.bdim[0] // 32): s += t.shld(shared, w)
    return s

def amax_kernel(t, S, x, n, partial):
    shared = t.sh['shared']
    m = 0
    i = t.bx * t.bdim[0] + t.tx
    while i < n:
        b = dev_widen(S, ldb(t, x, i))
        if 'amax_signed' in MUT: m = max(m, b)
        elif 'amax_fmaxf' in MUT: m = fbits(simt.fmaxf(from_bits(m), abs(from_bits(b))))
        else: m = max(m, b & ABS)
        i += t.gdim[0] * t.bdim[0]
    m = yield from block_max_u32(t, m, shared)
    if t.tx == 0: t.st(partial, t.bx, m)

def nonfinite_kernel(t, S, x, n, partial):
    shared = t.sh['shared']
    c = 0
    i = t.bx * t.bdim[0] + t.tx
    while i < n:
        b = dev_widen(S, ldb(t, x, i)) & ABS
        c += int(b > INF) if 'nonfinite_gt' in MUT else int(b >= INF)
        i += t.gdim[0] * t.bdim[0]
    c = yield from block_sum_u64(t, c, shared)
    if t.tx == 0: t.st(partial, t.bx, c)

# ---------------- the CPU backend
def cpu_cast(S, D, bits):
    w = [CPU_WIDEN[S](b) for b in bits]          # widen_into (a memcpy for fp32)
    if D == 'f32': return w, (0, 0)              # widening: uncounted
    return cpu_narrow_into(w, D)

def cpu_amax(S, bits):
    m = 0
    for b in bits:
        a = CPU_WIDEN[S](b) & ABS                # magnitude_bits, as a signed int32: >= 0
        m = a if a > m else m
    return m

def cpu_count_nonfinite(S, bits):
    return sum(1 for b in bits if not math.isfinite(from_bits(CPU_WIDEN[S](b))))

# ---------------- formats.h against fast_formats.h
def conversions(R, nsample):
    rng = random.Random(5)
    for S in ('f16', 'bf16', 'e4m3', 'e5m2'):
        bad = [b for b in range(1 << NBITS[S]) if TO_F32[S](b) != CPU_WIDEN[S](b)]
        R.check(not bad, 'widen %s: formats.h and the CPU differ at %s' % (S, [hex(b) for b in bad[:4]]))
        # widening is exact: back to the format gives the pattern (NaNs: the canonical one;
        # e5m2's infinities: its largest finite value, as the saturating narrowing gives)
        canon = 0x7FFF if NBITS[S] == 16 else 0x7F
        def back(b):
            u = TO_F32[S](b)
            if is_nan32(u): return canon
            if S == 'e5m2' and (u & ABS) == INF: return (b & 0x80) | 0x7B
            return b
        bad = [b for b in range(1 << NBITS[S]) if FROM_F32[S](TO_F32[S](b)) != back(b)]
        R.check(not bad, 'round trip %s fails at %s' % (S, [hex(b) for b in bad[:4]]))
    pats = f32_specials() + [rng.getrandbits(32) for _ in range(nsample)]
    for e in range(0x30, 0x50):   # every binade near the narrow formats' ranges, ties included
        for k in range(40):
            base = (e << 23) | rng.getrandbits(23)
            pats += [base, base & ~0x1FFF | 0x1000, base & ~0xFFFF | 0x8000, base & ~0xFFFFF | 0x80000,
                     base & ~0x1FFFFF | 0x100000]
    pats += [b | 0x80000000 for b in pats[:2000]] + list(range(0, 0x20000, 97))
    for D in ('f16', 'bf16', 'e4m3', 'e5m2'):
        bad = [u for u in pats if FROM_F32[D](u) != CPU_NARROW[D](u)]
        R.check(not bad, 'narrow %s: formats.h and fast_formats.h differ at %s' % (D, [hex(u) for u in bad[:4]]))
    # float64 model of round-to-nearest-even (finite, in range; saturation for fp8)
    def rne(x, p, emin, maxv, sat):
        if x == 0: return 0.0
        e = max(math.frexp(abs(x))[1] - 1, emin)
        q = 2.0 ** (e - p + 1)
        r = round(x / q) * q          # Python's round: ties to even, exact for these sizes
        if abs(r) > maxv: return math.copysign(maxv if sat else math.inf, x)
        return r
    spec = {'f16': (11, -14, 65504.0, False), 'bf16': (8, -126, MAXF['bf16'], False),
            'e4m3': (4, -6, 448.0, True), 'e5m2': (3, -14, 57344.0, True)}
    for D, (p, emin, maxv, sat) in spec.items():
        bad = []
        for u in pats:
            if (u & ABS) >= INF: continue
            x = from_bits(u)
            want = rne(x, p, emin, maxv, sat)
            got = from_bits(TO_F32[D](FROM_F32[D](u)))
            if got != want or (want == 0 and math.copysign(1, got) != math.copysign(1, x)):
                bad.append(u)
        R.check(not bad, 'narrow %s differs from float64 round-to-nearest-even at %s' % (D, [hex(u) for u in bad[:4]]))
    # stochastic rounding: the value rounds away from zero iff the 16 dropped bits plus the
    # random low 16 bits carry, i.e. with probability (dropped)/2^16
    bad = 0
    for u in pats[:20000]:
        if (u & ABS) > INF: continue
        r = rng.getrandbits(32)
        b = bf16_from_float_stochastic(u, r)
        lo = (u & ABS) >> 16
        want = lo + (1 if (u & 0xFFFF) + (r & 0xFFFF) >= 0x10000 else 0)
        bad += int((b & 0x7FFF) != want or (b & 0x8000) != ((u >> 16) & 0x8000))
    R.check(bad == 0, 'stochastic rounding: %d wrong' % bad)

# ---------------- the kernels
def inputs(rng, S, n, special):
    if S in ('e4m3', 'e5m2'):
        return [rng.getrandbits(8) for _ in range(n)] if special else \
            [FROM_F32[S](fbits(f32(rng.gauss(0, 30)))) for _ in range(n)]
    scale = {'f32': 1e3, 'f16': 10.0, 'bf16': 1e3}[S]
    return rand_bits(rng, n, S, scale, special)

def case_cast(R, S, D, n, seed, grid=None, special=0.2):
    rng = random.Random(seed)
    what = 'cast %s->%s n=%d grid=%s' % (S, D, n, grid)
    bits = inputs(rng, S, n, special)
    if S == 'f32':   # the narrow formats' boundaries and ties, and tiny values that underflow
        for i in range(0, n, 5): bits[i] = rng.choice(f32_specials())
    src = bitbuf('src', S, bits)
    dst = outbuf('dst', D, n)
    cnt = counters()
    g = grid or grid_stride_blocks(n)
    errs = []
    launch('cast', cast_kernel, (g, 1), (kBlock, 1), (S, D, dst, src, n, MAXF[D], cnt), errs, seed)
    R.errors(errs, what)
    writes_once(R, dst, what)
    want, counts = cpu_cast(S, D, bits)
    compare(R, what, D, dst.data, want)
    R.check(ctr(cnt) == counts, '%s: counts %s, CPU %s' % (what, ctr(cnt), counts))
    return counts

def case_reduce(R, S, n, seed, cap, special):
    rng = random.Random(seed)
    what = 'amax/count_nonfinite %s n=%d cap=%d' % (S, n, cap)
    bits = inputs(rng, S, n, special)
    x = bitbuf('x', S, bits)
    blocks = reduce_blocks(n, cap)
    part_a = Buf('partial_amax', 'u32', blocks, None)
    part_c = Buf('partial_nonfinite', 'u32', blocks, None)
    errs = []
    launch('amax', amax_kernel, (blocks, 1), (kBlock, 1), (S, x, n, part_a), errs, seed,
           shared_spec=[('shared', 32)])
    launch('nonfinite', nonfinite_kernel, (blocks, 1), (kBlock, 1), (S, x, n, part_c), errs, seed + 1,
           shared_spec=[('shared', 32)])
    R.errors(errs, what)
    writes_once(R, part_a, what); writes_once(R, part_c, what)
    m = 0
    for b in range(blocks): m = max(m, part_a.data[b] or 0)
    c = sum(part_c.data[b] or 0 for b in range(blocks))
    wa = cpu_amax(S, bits)
    R.check(m == wa, '%s: amax bits %s, CPU %s' % (what, hex(m), hex(wa)))
    wc = cpu_count_nonfinite(S, bits)
    R.check(c == wc, '%s: non-finite %d, CPU %d' % (what, c, wc))
    return is_nan32(wa), wc

def main(which='all'):
    R = Report('cast')
    t0 = time.time()
    conversions(R, 3000 if which == 'quick' else 30000)
    t1 = time.time()
    s = 500
    cov = {'over': 0, 'under': 0, 'amax_nan': 0, 'nonfinite': 0}
    pairs = [(S, D) for S in DTYPES for D in DTYPES]
    sizes = (1, 29, 300, 1500) if which != 'quick' else (29, 1500)
    for S, D in pairs:
        for n in sizes:
            s += 1
            grid = 2 if n == 1500 else None   # 1500 > 2 * 256: three or four elements a thread
            o, u = case_cast(R, S, D, n, s, grid)
            cov['over'] += o; cov['under'] += u
    for S in DTYPES:
        for n, cap, special in ((1, 3, 0.0), (31, 3, 0.3), (600, 3, 0.0), (1337, 3, 0.02), (1337, 1024, 0.0),
                                (2000, 2, 0.001)):
            s += 1
            isnan, c = case_reduce(R, S, n, s, cap, special)
            cov['amax_nan'] += isnan; cov['nonfinite'] += c
    print(R.summary(), '(conversions %.0fs, kernels %.0fs; CPU totals: %s)' % (t1 - t0, time.time() - t1, cov))
    R.check(all(cov.values()), 'coverage: %s' % cov)
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
