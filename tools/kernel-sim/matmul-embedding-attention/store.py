# matmul.cu store_kernel (lines 231-280 at d97fddf) with store_launch (matmul_plan.cpp:227-238
# there, 250-261 in the working tree of 2026-12-02, unchanged) and store_output's alignment rule
# (matmul.cu:421-431); the fused ops against the separate kernels (gelu.cu gelu_forward_kernel /
# gelu_backward_kernel, residual.cu residual_kernel) on the rounded product, with gelu_math.cuh's
# expressions.
# Since session 15 also the kDirect instances of the uncommitted change of 2026-12-02 (working
# tree: matmul.cu store_kernel lines 256-313 and store_output lines 458-530, cuda_common.cuh
# CastTally::add_stored, simt.py Tally.add_stored): the GEMM has written y in bf16 into out
# itself (src is out, no bias); the kernel reads y, counts each element from its stored value
# (an infinity is an overflow, nothing an underflow) and fuses the op (kPlain: writes nothing).
# direct_case() checks the writes, the bits against the staged kernel fed an fp32 value rounding
# to y, and the counts (see main() for the findings it prints).
# Since 2026-12-02 (against 6e29cce; the kGeluFp8 mode of 75c3740): store_kernel's StoreFp8 argument,
# the per-thread amax `am`, the kGeluFp8 branch (gelu_value of y, then fp8_math.cuh's
# store_fp8_one: rounded to Tout, then quantise_one), the byte pack zq written to gelu_out, and
# flush_amax after the tally's flush (matmul.cu store_kernel lines 256-344 there); store_output's
# alignment rule for the second tensor is now 4 * its element size (matmul.cu:515-519). The
# kGeluFp8 checks are in store_fp8.py.
import sys, random, math, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from common import *
from fp8_math import store_fp8_one, flush_amax

kPlain, kGelu, kResidual, kDgelu, kGeluFp8 = 0, 1, 2, 3, 4
MODES = {kPlain: 'plain', kGelu: 'gelu', kResidual: 'residual', kDgelu: 'dgelu', kGeluFp8: 'gelu_fp8'}


class StoreFp8:
    """struct StoreFp8 { bool e4m3 = true; float scale = 1.0f; unsigned* amax_bits = nullptr; }"""
    def __init__(self, e4m3=True, scale=1.0, amax_bits=None):
        self.e4m3, self.scale, self.amax_bits = e4m3, scale, amax_bits

def store_launch(rows, cols, aligned):
    vec = 4 if aligned and cols % 4 == 0 else 1
    col_threads = max(1, (cols + vec - 1) // vec)
    nb = (col_threads + 255) // 256
    threads = ((col_threads + nb - 1) // nb + 31) // 32 * 32
    if 'launch_threads_floor' in MUT: threads = (col_threads // nb + 31) // 32 * 32
    return vec, threads, nb, min(max(rows, 1), 65535)

def pointer_alignment(p):
    a = 256
    while a > 1 and p % a: a >>= 1
    return a

# gelu_math.cuh
kGeluScale = f32(0.7978845608028654)
kGeluCubic = f32(0.044715)
def tanh_via_exp(u): return sub(1.0, div(2.0, add(expf(mul(2.0, u)), 1.0)))
def gelu_tanh(v):
    cube = mul(mul(mul(kGeluCubic, v), v), v)
    return tanh_via_exp(mul(kGeluScale, add(v, cube)))
def gelu_value(v): return mul(mul(0.5, v), add(1.0, gelu_tanh(v)))
def gelu_derivative(v):
    th = gelu_tanh(v)
    sech2 = sub(1.0, mul(th, th))
    poly = add(1.0, mul(mul(mul(3.0, kGeluCubic), v), v))
    right = mul(mul(mul(mul(0.5, v), sech2), kGeluScale), poly)
    return add(mul(0.5, add(1.0, th)), right)

def store_kernel(t, Tout, kMode, kVec, d, out, gelu_out, residual, pre, bias, rows, cols, counters,
                 kDirect=False, fp8=None):
    # d: `src`, the GEMM's result: fp32 (staged), or with kDirect y itself in Tout (src is out).
    # fp8: the StoreFp8 argument (kGeluFp8's format, scale and amax word; a default one otherwise).
    if fp8 is None: fp8 = StoreFp8()
    tally = Tally()
    am = 0  # kGeluFp8: the largest magnitude this thread quantised
    c0 = (t.bx * t.bdim[0] + t.tx) * kVec
    lim = cols if 'store_c0_le' not in MUT else cols + 1
    if c0 < lim:
        r = t.by
        while r < rows:
            i = r * cols + c0 if 'store_row_stride' not in MUT else r * (cols - 1) + c0
            if kDirect:
                # y = *reinterpret_cast<const Pack<Tout, kVec>*>(static_cast<const Tout*>(src) + i);
                # v[k] = load<Tout>(y.v[k]) (exact)
                y = t.ldv(d, i, kVec)
                v = list(y)
            else:
                v = t.ldv(d, i, 4) if kVec == 4 else [t.ld(d, i)]
                y = [None] * kVec
            z = [None] * kVec
            zq = [None] * kVec  # kGeluFp8's
            if kMode == kResidual:
                rsrc = d if (kDirect and 'direct_res_src' in MUT) else residual
                res = t.ldv(rsrc, i, kVec)
            for k in range(kVec):
                if kDirect:
                    if 'direct_tally_add' in MUT: tally.add(v[k], v[k], MAXF[Tout])
                    else: tally.add_stored(v[k])
                else:
                    if bias is not None:
                        bk = c0 + k if 'store_bias_idx' not in MUT else c0
                        v[k] = add(v[k], t.ld(bias, bk))
                    y[k] = ROUND[Tout](v[k])
                    if narrow(Tout): tally.add(v[k], y[k], MAXF[Tout])
                if kMode == kGeluFp8:
                    # gelu_forward_fp8_kernel's: the GELU rounded to Tout, then quantised
                    w = gelu_value(y[k] if 'sfp8_gelu_of_v' not in MUT else v[k])
                    e4 = fp8.e4m3
                    zq[k], am = store_fp8_one(Tout, w, fp8.scale, am, tally, e4)
                elif kMode != kPlain:
                    yk = y[k]
                    if kMode == kGelu: w = gelu_value(yk)
                    elif kMode == kResidual: w = add(res[k], yk)
                    else: w = mul(gelu_derivative(t.ld(pre, i + k)), yk)
                    z[k] = ROUND[Tout](w)
                    if narrow(Tout) and not (kDirect and 'direct_skip_fused_count' in MUT):
                        tally.add(w, z[k], MAXF[Tout])
            if kMode in (kResidual, kDgelu):
                t.stv(out, i, z)
            else:
                plain_w = 'direct_plain_writes' in MUT or (kMode == kGeluFp8 and 'sfp8_direct_writes_y' in MUT)
                if not kDirect or plain_w: t.stv(out, i, y)
                if kMode == kGelu:
                    t.stv(out if (kDirect and 'direct_gelu_to_out' in MUT) else gelu_out, i, z)
                if kMode == kGeluFp8:
                    # (mutation: the pack stored through a Tout* gelu_out, as kGelu stores it: byte i * sizeof(Tout))
                    t.stv(gelu_out, i if 'sfp8_zq_tout_ptr' not in MUT else i * ESIZE[Tout], zq)
            r += t.gdim[1] if 'store_rstride_x' not in MUT else t.gdim[0]
    if narrow(Tout): yield from tally.flush(t, counters)
    if kMode == kGeluFp8 and 'sfp8_no_flush_amax' not in MUT: yield from flush_amax(t, am, fp8.amax_bits)

def launch_for(R, what, rows, cols, d_ok, out_base, pack, mode, second, grid_y):
    """store_output's launch: vec 4 where d (d_ok), out and the second tensor allow it, as
    store_launch says; the grid's y taken from grid_y when given; the columns covered. Returns
    the launch and whether the pointers allowed vec 4."""
    # store_output (6e29cce): the second tensor's pointer aligned to 4 of its elements (a
    # Pack<Tout, 4> of gelu_out or the residual; kGeluFp8: a Pack<uint8_t, 4>, 4 bytes)
    sec_ok = lambda: pointer_alignment(second.base) >= 4 * ESIZE[second.dtype]
    if mode == kGeluFp8 and 'sfp8_align_skip' in MUT: sec_ok = lambda: True
    aligned = (d_ok and pointer_alignment(out_base) >= pack and
               (mode in (kPlain, kDgelu) or sec_ok()))
    vec, threads, gx, gy = store_launch(rows, cols, aligned)
    if grid_y: gy = grid_y
    R.check(gx * threads >= (cols + vec - 1) // vec, what + ': launch covers %d of %d column threads' % (gx * threads, (cols + vec - 1) // vec))
    return vec, threads, gx, gy, aligned


def case(R, rows, cols, Tout, mode, Tbias, seed, alias=False, offset_elems=0, grid_y=None, pre_dt='f32', special=False):
    rng = random.Random(seed)
    what = 'store %dx%d %s %s bias=%s alias=%s off=%d gy=%s' % (rows, cols, Tout, MODES[mode], Tbias, alias, offset_elems, grid_y)
    n = rows * cols
    dvals = [f32(rng.gauss(0, 2.0)) for _ in range(n)]
    if special:
        for i in range(0, n, 7):
            dvals[i] = f32(rng.choice([7e4, -6.6e4, 1e-9, -2e-8, 3.39e38, 0.0, -0.0]))
    d = Buf('d', 'f32', n, dvals, base=256)
    esz = ESIZE[Tout]
    out = d if alias else Buf('out', Tout, n, None, base=512 + offset_elems * esz)
    second = None
    if mode == kGelu: second = Buf('gelu_out', Tout, n, None, base=4096)
    if mode == kResidual: second = Buf('residual', Tout, n, rand_vals(rng, n, Tout, 3.0), base=4096)
    if mode == kDgelu: second = Buf('pre', pre_dt, n, rand_vals(rng, n, pre_dt, 2.0), base=4096 + 2)
    bias = Buf('bias', Tbias, cols, rand_vals(rng, cols, Tbias), base=8192 + 2) if Tbias else None
    pack = 4 * esz
    vec, threads, gx, gy, _ = launch_for(R, what, rows, cols, pointer_alignment(d.base) >= 16,
                                         out.base, pack, mode, second, grid_y)
    results = []
    for sd in (seed, seed + 55):
        o = Buf('d', 'f32', n, dvals, base=256) if alias else Buf('out', Tout, n, None, base=out.base)
        dd = o if alias else d
        g = Buf('gelu_out', Tout, n, None, base=4096) if mode == kGelu else None
        cnt = counters(); errs = []
        launch('store', store_kernel, (gx, gy), (threads, 1),
               (Tout, mode, vec, dd, o, g, second if mode == kResidual else None,
                second if mode == kDgelu else None, bias, rows, cols, cnt), errs, sd)
        R.errors(errs, what + ' seed %d' % sd)
        results.append((o, g, cnt))
    o, g, cnt = results[0]
    R.check([key(v) for v in o.data] == [key(v) for v in results[1][0].data] and ctr(cnt) == ctr(results[1][2]),
            what + ': differs between schedules')
    if alias:
        R.check(all(w == 1 for w in o.writes), what + ': aliased output not written once')
    else:
        writes_once(R, o, range(n), what + ' out')
    if g: writes_once(R, g, range(n), what + ' gelu_out')
    # the separate ops: y = round(d + bias) counted; then the op on y, counted
    v32 = [add(dvals[i], bias.data[i % cols]) if bias else dvals[i] for i in range(n)]
    y = [ROUND[Tout](v) for v in v32]
    vals = list(v32)
    if mode == kPlain: exp = y
    else:
        if mode == kGelu: w32 = [gelu_value(v) for v in y]
        elif mode == kResidual: w32 = [add(y[i], second.data[i]) for i in range(n)]   # residual_forward(prod, residual)
        else: w32 = [mul(gelu_derivative(second.data[i]), y[i]) for i in range(n)]   # gelu_backward(dinp, pre, dinp)
        vals += w32
        z = [ROUND[Tout](w) for w in w32]
        exp = y if mode == kGelu else z
        if mode == kGelu:
            bad = [i for i in range(n) if key(g.data[i]) != key(z[i])]
            R.check(not bad, what + ': gelu_out differs at %s' % bad[:4])
    bad = [i for i in range(n) if key(o.data[i]) != key(exp[i])]
    R.check(not bad, what + ': out differs at %s (got %s exp %s)' % (bad[:4], [o.data[i] for i in bad[:2]], [exp[i] for i in bad[:2]]))
    R.check(ctr(cnt) == cpu_count(vals, Tout), what + ': counts %s vs separate ops %s' % (ctr(cnt), cpu_count(vals, Tout)))
    return vec

# ---------------- kDirect (bf16 only: store_output throws for any other direct output)
BF16_MAX = MAXF['bf16']
# fp32 inputs whose bf16 rounding the GEMM is taken to have stored: infinities, a NaN, finite
# values above bf16's largest finite value (0x7F7F0000) that round down to it (counted by the
# staged store, not seen by the direct one) or up to infinity (from the tie 0x7F7F8000 up),
# bf16's largest value itself, and values near bf16's underflow (2^-134 = 0x00008000 is a tie
# that rounds to zero).
X_SPECIAL = [math.inf, -math.inf, math.nan, f32(3.39e38), f32(-3.39e38), from_bits(0x7F7F7FFF),
             from_bits(0x7F7F8000), FLT_MAX, -FLT_MAX, from_bits(0x7F7F0000),
             from_bits(0x00008000), from_bits(0x80007FFF), f32(1e-40), f32(-4e-41), 0.0, -0.0,
             from_bits(0xFF800001)]  # a NaN with a payload (a negative signalling pattern)

_FUSED = {}
def fused_specials():
    """(y, second) pairs whose fused op overflows (residual, dgelu) or underflows (dgelu) in
    bf16, so that the fused op's own counts are exercised. Found once, checked here."""
    if _FUSED: return _FUSED
    yr, rr = bf16(1.7e38), bf16(1.695e38)
    w = add(rr, yr)
    assert BF16_MAX < w <= FLT_MAX, w
    _FUSED['residual'] = [(yr, rr), (-yr, -rr)]
    yu, pu = bf16(1e-38), bf16(-4.0)
    w = mul(gelu_derivative(pu), yu)
    assert w != 0 and bf16(w) == 0, w
    pairs = [(yu, pu), (-yu, pu)]
    for yb in range(0x7F68, 0x7F7F):           # bf16 y in [2.9e38, 3.39e38)
        yv = from_bits(yb << 16)
        for pb in range(0x3F00, 0x4040):       # bf16 pre in [0.5, 3)
            pv = from_bits(pb << 16)
            if BF16_MAX < abs(mul(gelu_derivative(pv), yv)) <= FLT_MAX:
                pairs.append((yv, pv)); break
        if len(pairs) == 3: break
    assert len(pairs) == 3
    _FUSED['dgelu'] = pairs
    return _FUSED

FINDINGS = {'round_to_max': [], 'tie_2m134': 0, 'x_inf': 0, 'cases': 0}

def run_store(Tout, mode, vec, gx, gy, threads, src, out, g, second, bias, rows, cols, errs, sd, direct):
    cnt = counters()
    launch('store', store_kernel, (gx, gy), (threads, 1),
           (Tout, mode, vec, src, out, g, second if mode == kResidual else None,
            second if mode == kDgelu else None, bias, rows, cols, cnt, direct), errs, sd)
    return cnt

def direct_case(R, rows, cols, mode, seed, out_off=0, sec_off=0, grid_y=None, pre_dt='f32', special=True):
    """store_output(ctx, nullptr, out, Tensor(), rows, cols, cls, mode, second) for a bf16 out the
    GEMM wrote with the bf16 rounding of x: the kernel runs with src == out."""
    rng = random.Random(seed)
    what = 'direct %dx%d bf16 %s out+%d second+%d gy=%s pre=%s' % (rows, cols, MODES[mode], out_off, sec_off, grid_y, pre_dt)
    n = rows * cols
    x = [f32(rng.gauss(0, 2.0)) for _ in range(n)]
    sec = None
    if mode == kResidual: sec = rand_vals(rng, n, 'bf16', 3.0)
    if mode == kDgelu: sec = rand_vals(rng, n, pre_dt, 2.0)
    if special:
        fs = fused_specials().get(MODES[mode], [])
        nk = len(X_SPECIAL) + len(fs)
        for j, i in enumerate(range(seed % 5, n, 5)):
            kind = (j + seed) % nk
            if kind < len(X_SPECIAL): x[i] = X_SPECIAL[kind]
            else: x[i], sec[i] = fs[kind - len(X_SPECIAL)]
    y = [bf16(v) for v in x]   # what the GEMM stored (cuBLASLt rounding to nearest even)
    esz = ESIZE['bf16']
    obase = 512 + out_off * esz
    sbase = 8192 + sec_off * esz
    if mode == kGelu: second = Buf('gelu_out', 'bf16', n, None, base=sbase)
    elif mode == kResidual: second = Buf('residual', 'bf16', n, sec, base=sbase)
    elif mode == kDgelu: second = Buf('pre', pre_dt, n, sec, base=sbase + 2)
    else: second = None
    pack = 4 * esz
    # store_output's rule with d null: (direct || ...) && out's alignment && the second's
    vec, threads, gx, gy, aligned = launch_for(R, what, rows, cols, True, obase, pack, mode,
                                               second, grid_y)
    results = []
    for sd in (seed, seed + 55):
        o = Buf('out', 'bf16', n, y, base=obase)   # the GEMM's output: initialised, writes 0
        g = Buf('gelu_out', 'bf16', n, None, base=sbase) if mode == kGelu else None
        errs = []
        cnt = run_store('bf16', mode, vec, gx, gy, threads, o, o, g, second, None, rows, cols, errs, sd, True)
        R.errors(errs, what + ' seed %d' % sd)
        results.append((o, g, cnt))
    o, g, cnt = results[0]
    o2, g2, cnt2 = results[1]
    R.check([key(v) for v in o.data] == [key(v) for v in o2.data] and ctr(cnt) == ctr(cnt2) and
            (g is None or [key(v) for v in g.data] == [key(v) for v in g2.data]),
            what + ': differs between schedules')
    # (a) writes: kPlain and kGelu leave out as the GEMM wrote it; kResidual/kDgelu once each
    if mode in (kPlain, kGelu):
        nw = [i for i in range(n) if o.writes[i]]
        R.check(not nw, what + ': out written at %s (the GEMM wrote it)' % nw[:4])
        bad = [i for i in range(n) if key(o.data[i]) != key(y[i])]
        R.check(not bad, what + ": out no longer the GEMM's bits at %s" % bad[:4])
    else:
        writes_once(R, o, range(n), what + ' out')
    if g: writes_once(R, g, range(n), what + ' gelu_out')
    if mode == kResidual:
        R.check(all(w == 0 for w in second.writes) and [key(v) for v in second.data] == [key(ROUND['bf16'](v)) for v in sec],
                what + ': residual written')
    # the separate ops on y (gelu_forward(gelu_out, out), residual_forward(out, residual, out),
    # gelu_backward(out, pre, out))
    w32 = []
    if mode == kGelu: w32 = [gelu_value(v) for v in y]
    elif mode == kResidual: w32 = [add(second.data[i], y[i]) for i in range(n)]
    elif mode == kDgelu: w32 = [mul(gelu_derivative(second.data[i]), y[i]) for i in range(n)]
    zz = [bf16(w) for w in w32]
    exp = zz if mode in (kResidual, kDgelu) else y
    bad = [i for i in range(n) if key(o.data[i]) != key(exp[i])]
    R.check(not bad, what + ': out differs from the separate ops at %s' % bad[:4])
    if g:
        bad = [i for i in range(n) if key(g.data[i]) != key(zz[i])]
        R.check(not bad, what + ': gelu_out differs from gelu_forward at %s' % bad[:4])
    # (c) counts by add_stored's definition: the infinities among the y read, no underflows,
    # plus the fused op's casts as store_counted counts them
    n_inf = sum(1 for v in y if v in (math.inf, -math.inf))
    fo, fu = cpu_count(w32, 'bf16')
    R.check(ctr(cnt) == (n_inf + fo, fu), what + ': counts %s, expected %d infinities + fused %s' % (ctr(cnt), n_inf, (fo, fu)))
    # (b) the staged kernel fed x (no bias): the same bits, the fused op's counts the same
    d = Buf('d', 'f32', n, x, base=256)
    so = Buf('out', 'bf16', n, None, base=obase)
    sg = Buf('gelu_out', 'bf16', n, None, base=sbase) if mode == kGelu else None
    saligned = pointer_alignment(d.base) >= 16 and aligned
    svec, sthreads, sgx, sgy = store_launch(rows, cols, saligned)
    if grid_y: sgy = grid_y
    R.check(svec == vec, what + ': staged launch vec %d, direct %d' % (svec, vec))
    errs = []
    scnt = run_store('bf16', mode, svec, sgx, sgy, sthreads, d, so, sg, second, None, rows, cols, errs, seed + 7, False)
    R.errors(errs, what + ' staged')
    bad = [i for i in range(n) if key(so.data[i]) != key(o.data[i])]
    R.check(not bad, what + ': direct out differs from staged at %s (direct %s staged %s)' % (
        bad[:4], [o.data[i] for i in bad[:2]], [so.data[i] for i in bad[:2]]))
    if g:
        bad = [i for i in range(n) if key(sg.data[i]) != key(g.data[i])]
        R.check(not bad, what + ': direct gelu_out differs from staged at %s' % bad[:4])
    xo, xu = cpu_count(x, 'bf16')           # the staged store's counts of the product's cast
    so_, su_ = ctr(scnt)
    R.check((so_ - xo, su_ - xu) == (ctr(cnt)[0] - n_inf, ctr(cnt)[1]),
            what + ": fused counts: staged %s less the cast's %s, direct %s less %d infinities" % (ctr(scnt), (xo, xu), ctr(cnt), n_inf))
    # staged minus direct, for the product's cast: + finite fp32 above bf16's range (rounded to
    # the largest value or to infinity) - infinities stored (from a finite or infinite x); - no
    # underflows. Per element class:
    rmax = [i for i in range(n) if abs(x[i]) > BF16_MAX and x[i] not in (math.inf, -math.inf) and
            y[i] not in (math.inf, -math.inf)]
    xinf = [i for i in range(n) if x[i] in (math.inf, -math.inf)]
    und = [i for i in range(n) if x[i] != 0 and y[i] == 0]
    R.check(so_ - ctr(cnt)[0] == len(rmax) - len(xinf) and su_ - ctr(cnt)[1] == len(und),
            what + ': staged %s vs direct %s: expected differences +%d -%d over, +%d under' % (
                ctr(scnt), ctr(cnt), len(rmax), len(xinf), len(und)))
    FINDINGS['round_to_max'] += [(fbits(x[i]), x[i]) for i in rmax]
    FINDINGS['tie_2m134'] += sum(1 for i in und if abs(x[i]) == from_bits(0x8000))
    FINDINGS['x_inf'] += len(xinf)
    FINDINGS['cases'] += 1
    return vec

def gelu_sanity(R):
    for x in [-5.0, -1.3, -0.1, 0.0, 0.2, 1.0, 3.7, 10.0]:
        x = f32(x)
        g = 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        R.check(abs(gelu_value(x) - g) <= 1e-6 * (1 + abs(g)), 'gelu(%g) %r vs %r' % (x, gelu_value(x), g))
        h = 1e-4
        gd = (0.5 * (x + h) * (1 + math.tanh(math.sqrt(2 / math.pi) * ((x + h) + 0.044715 * (x + h) ** 3))) -
              0.5 * (x - h) * (1 + math.tanh(math.sqrt(2 / math.pi) * ((x - h) + 0.044715 * (x - h) ** 3)))) / (2 * h)
        R.check(abs(gelu_derivative(x) - gd) <= 1e-4, "gelu'(%g)" % x)

def main(which='all'):
    R = Report('store')
    t0 = time.time()
    gelu_sanity(R)
    cases = []
    s = 1
    for rows, cols in [(3, 8), (5, 12), (2, 257), (2, 300), (3, 1030), (2, 2304)]:
        for Tout in ('f32', 'bf16', 'f16'):
            for mode in (kPlain, kGelu, kResidual, kDgelu):
                if mode != kPlain and Tout == 'f32': continue
                for Tbias in ((None, 'f32', Tout) if mode != kDgelu else (None,)):
                    s += 1
                    cases.append(dict(rows=rows, cols=cols, Tout=Tout, mode=mode, Tbias=Tbias, seed=s,
                                      special=(s % 3 == 0), pre_dt=('bf16' if s % 2 else 'f32')))
    cases += [dict(rows=3, cols=12, Tout='f32', mode=kPlain, Tbias='bf16', seed=900, alias=True),
              dict(rows=4, cols=300, Tout='f32', mode=kPlain, Tbias=None, seed=901, alias=True),
              dict(rows=3, cols=16, Tout='bf16', mode=kPlain, Tbias='f32', seed=902, offset_elems=2),   # 4-byte aligned: vec 1
              dict(rows=3, cols=16, Tout='bf16', mode=kResidual, Tbias='f32', seed=903, offset_elems=4),  # 8-byte aligned: vec 4
              dict(rows=7, cols=40, Tout='f16', mode=kGelu, Tbias='f16', seed=904, grid_y=3),   # row loop
              dict(rows=7, cols=33, Tout='bf16', mode=kDgelu, Tbias=None, seed=905, grid_y=2, pre_dt='f16')]
    if which == 'quick': cases = [c for c in cases if c.get('special')][::3] + cases[-6:]
    # kDirect: every StoreMode on the same shapes, then alignments that force kVec 1 (out 4-byte
    # aligned; a residual or gelu_out 2-byte aligned) or keep kVec 4 (8-byte), and row loops
    dcases = []
    s = 2000
    pres = ('f32', 'bf16', 'f16')
    for rows, cols in [(3, 8), (5, 12), (2, 257), (2, 300), (3, 1030), (2, 2304)]:
        for mode in (kPlain, kGelu, kResidual, kDgelu):
            s += 1
            dcases.append(dict(rows=rows, cols=cols, mode=mode, seed=s, pre_dt=pres[s % 3]))
    for mode in (kPlain, kGelu, kResidual, kDgelu):
        dcases += [dict(rows=3, cols=16, mode=mode, seed=2100 + mode, out_off=2, pre_dt=pres[mode % 3]),   # vec 1
                   dict(rows=3, cols=16, mode=mode, seed=2110 + mode, out_off=4, pre_dt=pres[(mode + 1) % 3])]  # vec 4
    dcases += [dict(rows=3, cols=16, mode=kResidual, seed=2120, sec_off=1),   # residual 2-byte aligned: vec 1
               dict(rows=3, cols=16, mode=kGelu, seed=2121, sec_off=6),       # gelu_out 4-byte aligned: vec 1
               dict(rows=3, cols=16, mode=kResidual, seed=2122, sec_off=4),   # 8-byte aligned: vec 4
               dict(rows=7, cols=40, mode=kGelu, seed=2123, grid_y=3),        # row loops
               dict(rows=7, cols=33, mode=kDgelu, seed=2124, grid_y=2, pre_dt='bf16'),
               dict(rows=9, cols=12, mode=kResidual, seed=2125, grid_y=4),
               dict(rows=6, cols=20, mode=kPlain, seed=2126, grid_y=5),
               dict(rows=4, cols=24, mode=kDgelu, seed=2127, special=False)]
    if which == 'quick': dcases = [c for c in dcases if c['cols'] in (8, 257)] + dcases[24:]
    vecs = {}
    for c in cases:
        v = case(R, **c)
        vecs[v] = vecs.get(v, 0) + 1
    dvecs = {}
    for c in dcases:
        v = direct_case(R, **c)
        dvecs[(MODES[c['mode']], v)] = dvecs.get((MODES[c['mode']], v), 0) + 1
    print(R.summary(), '(%.0fs; %d staged cases, kVec counts %s; %d direct cases, (mode, kVec) counts %s)' % (
        time.time() - t0, len(cases), vecs, len(dcases), dict(sorted(dvecs.items()))))
    for f in R.fail[:10]: print('  FAIL', f[:300])
    rm = FINDINGS['round_to_max']
    print('direct vs staged counts over %d direct cases: %d fp32 infinities (counted by direct, not staged); '
          '%d finite fp32 above bf16 max that round to bf16 max (counted by staged, not direct), e.g. %s; '
          '%d underflows at exactly 2^-134 (a tie to zero; staged counts them)' % (
              FINDINGS['cases'], FINDINGS['x_inf'], len(rm),
              ', '.join('0x%08X (%.6g)' % b for b in sorted(set(rm))[:3]), FINDINGS['tie_2m134']))
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
