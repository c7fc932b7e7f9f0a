# store_kernel's kGeluFp8 mode (75c3740; matmul.cu store_kernel lines 256-344 at 6e29cce, in
# store.py) with store_output's host side (matmul.cu:500-585: the StoreFp8 argument, the
# alignment rule, 3 * rows * cols values), gelu.cu gelu_forward_fp8_kernel (lines 25-37) with
# its host gelu_forward_fp8 (lines 68-93), and fp8_math.cuh (../fp8_math.py). Checked, staged
# (kDirect false: fp32 src, bias none / fp32 / Tout) and direct (bf16 written by the GEMM, src ==
# out), kVec 4 and 1, e4m3 and e5m2, several scales, with and without an amax word:
#  - gelu_out's bytes equal (a) the composition: the kGelu store kernel (GELU stored in Tout),
#    then quantise.py's quantise kernels (element, and strip where the shape allows) on that
#    gelu_out, (b) gelu_forward_fp8_kernel on the stored pre (round_to = Tout), (c) the CPU
#    backend: matmul_forward's commit of pre, CpuBackend::gelu_forward_fp8 (fp32 GELU, then
#    store_fp8 with fast_formats.h's roundings);
#  - out (y) equals kGelu's; out and gelu_out written once; the same bits under two schedules;
#  - the counts equal kGelu's plus the quantise kernel's, and the CPU's (pre's commit + store_fp8's
#    two casts); gelu_forward_fp8_kernel's equal store_fp8's;
#  - the amax word equals the quantise kernel's, gelu_forward_fp8_kernel's, the CPU's, and the
#    largest magnitude of the rounded GELU values;
#  - the host's value counts: store_output's 3 * rows * cols for kGeluFp8 = kGelu's 2 + the
#    quantise pass's 1 = the CPU's (pre's n + store_fp8's 2n); gelu_forward_fp8's 2n (n for
#    round_to fp32) = store_fp8's;
#  - direct: out untouched, the bytes of the staged kernel fed an fp32 value rounding to y, the
#    counts differing from the staged ones only in y's cast (the classes store.py names).
# Also gelu_forward_fp8 on its own: inp fp32/bf16/f16, round_to fp32/bf16/f16, grid-strided.
# Inputs: values whose GELU saturates (and, at scale 4096, negative ones), underflows in the
# quantisation (to +0 and -0) and in the GELU's rounding (2^-134 in bf16, 2^-25 in fp16), NaN,
# +-inf (GELU(-inf) is NaN), values above Tout's range. Rounding to bf16/fp16 as formats.h
# (fp8_math.device_rounding: canonical NaN).
import sys, random, math, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from common import *
import store, quantise
from store import (store_kernel, store_launch, launch_for, pointer_alignment, gelu_value, kPlain,
                   kGelu, kGeluFp8, StoreFp8, X_SPECIAL)
from fp8_math import (store_fp8_one, flush_amax, device_rounding, cpu_store_fp8, max_magnitude,
                      CPU_ROUND, kMaxFiniteBits)

kBlock = 256

# ---------------- gelu.cu
def gelu_forward_fp8_kernel(t, Tr, e4, out, inp, n, scale, amax_bits, counters):
    tally = Tally()
    am = 0
    i = t.bx * t.bdim[0] + t.tx
    while i < n:
        # out[i] = store_fp8_one<Tr, kE4M3>(gelu_value(load_any(inp, di, i)), scale, am, tally)
        q, am = store_fp8_one(Tr if 'gfp8_round_f32' not in MUT else 'f32', gelu_value(t.ld(inp, i)),
                              scale, am, tally, e4)
        t.st(out, i, q)
        i += t.gdim[0] * t.bdim[0] if 'gfp8_stride_block' not in MUT else t.bdim[0]
    yield from tally.flush(t, counters)
    yield from flush_amax(t, am, amax_bits)

def grid_stride_blocks(n): return min(max(1, (n + kBlock - 1) // kBlock), 65535)

# ---------------- host value counts (Context::add_cast_values)
def store_output_values(mode, Tout, rows, cols):
    """store_output: (kPlain 1, kGeluFp8 3, else 2) * rows * cols when out is narrow."""
    k = 1 if mode == kPlain else (3 if mode == kGeluFp8 and 'sfp8_host_values2' not in MUT else 2)
    return k * rows * cols if Tout != 'f32' else 0

def gelu_forward_fp8_values(round_to, n):
    return (2 if round_to != 'f32' or 'gfp8_values2' in MUT else 1) * n

def quantise_values(rows, cols): return rows * cols   # quantise(..., count = true)

# ---------------- the CPU backend (cpu_backend.cpp:41 fast_tanh, :414 gelu_forward_f32;
# cpu_precision.cpp narrow_into for matmul_forward's commit of pre, store_fp8)
def cpu_gelu(v):
    u = mul(kGeluScale, add(v, mul(mul(mul(kGeluCubic, v), v), v)))
    th = sub(1.0, div(2.0, add(expf(mul(2.0, u)), 1.0)))
    return mul(mul(0.5, v), add(1.0, th))
kGeluScale, kGeluCubic = store.kGeluScale, store.kGeluCubic

def cpu_commit(vals, T):
    """narrow_into's bits (fast_formats.h) and counts (values, over, under); fp32: a copy."""
    if T == 'f32': return [fbits(v) for v in vals], (0, 0, 0)
    tb, widen = CPU_ROUND[T]
    mb = fbits(MAXF[T])
    bits, over, under = [], 0, 0
    for v in vals:
        x = fbits(v); b = tb(x); a = x & 0x7FFFFFFF
        over += int(a > mb and a <= kMaxFiniteBits)
        under += int(a != 0 and (b & 0x7FFF) == 0)
        bits.append(widen(b))
    return bits, (len(vals), over, under)

def tsum(*cs): return tuple(map(sum, zip(*cs)))

COVER = {'saturated': 0, 'q_under_pos': 0, 'q_under_neg': 0, 'round_under': 0, 'nan': 0, 'inf': 0,
         'y_over': 0, 'finite_amax': 0, 'cases': 0, 'direct': 0, 'vec': {}}

def cover(gel_rounded, qbytes, e4, scale, round_counts):
    mx = 0x7E if e4 else 0x7B
    for w, q in zip(gel_rounded, qbytes):
        if q is None: continue
        if w != w: COVER['nan'] += 1
        elif w in (math.inf, -math.inf): COVER['inf'] += 1
        elif (q & 0x7F) == mx and abs(mul(w, scale)) > (448.0 if e4 else 57344.0): COVER['saturated'] += 1
        if w == w and w != 0 and (q & 0x7F) == 0: COVER['q_under_neg' if q & 0x80 else 'q_under_pos'] += 1
    COVER['round_under'] += round_counts[2]

def run_fused(Tout, vec, gx, gy, threads, src, out, g, bias, rows, cols, e4, scale, want_amax, errs, sd, direct):
    cnt = counters()
    amax = Buf('amax', 'u32', 1, [0]) if want_amax else None
    launch('store_fp8', store_kernel, (gx, gy), (threads, 1),
           (Tout, kGeluFp8, vec, src, out, g, None, None, bias, rows, cols, cnt, direct,
            StoreFp8(e4, scale, amax)), errs, sd)
    return cnt, amax

def run_gelu_fp8(R, what, Tr, e4, pre, n, scale, grid, seed, want_amax=True):
    out = Buf('gelu_fp8_out', 'u8', n, None, base=512)
    cnt = counters(); amax = Buf('amax', 'u32', 1, [0]) if want_amax else None
    errs = []
    launch('gelu_fp8', gelu_forward_fp8_kernel, (grid, 1), (kBlock, 1),
           (Tr, e4, out, pre, n, scale, amax, cnt), errs, seed)
    R.errors(errs, what + ' gelu_forward_fp8 grid %d' % grid)
    writes_once(R, out, range(n), what + ' gelu_forward_fp8 out')
    return out.data, ctr(cnt), (amax.data[0] if amax else None)

def compose(R, what, Tout, gz, rows, cols, e4, scale, seed):
    """quantise.py's kernels on a stored GELU (element; strip where quantise_launch takes it,
    without yt): [(kind, bytes, counts, amax)]."""
    V = 16 // ESIZE[Tout]
    kinds = ['element'] + (['strip'] if cols % V == 0 and rows > 0 else [])
    outs = []
    for kind in kinds:
        errs = []
        y, _, _, cnt, amax = quantise.run(kind, gz, rows, cols, scale, e4, True, False, False, seed, errs, V)
        R.errors(errs, what + ' quantise ' + kind)
        outs.append((kind, y.data, ctr(cnt), amax.data[0]))
    return outs

# special values of the product: finite ones (a finite amax), then the rest (NaN and infinite
# GELUs, Tout overflows; a NaN makes the amax NaN's bits)
POOL_FINITE = [500.0, -500.0, 1e4, 6.5e4, 1e-4, -1e-4, 3e-3, -3e-3, 2.0 ** -133, -2.0 ** -133,
               2.0 ** -24, -2.0 ** -24, -5.0, -10.0, 0.0, -0.0, 1e-40, 0.2, -0.2]
POOL = POOL_FINITE + [7e4, -7e4, 3.3e38, math.inf, -math.inf, math.nan]

def case_fp8(R, rows, cols, Tout, Tbias, e4, scale, seed, special=True, want_amax=True, go_off=0,
             out_off=0, grid_y=None, nonfinite=True):
    rng = random.Random(seed)
    fmt = 'e4m3' if e4 else 'e5m2'
    what = 'kGeluFp8 %dx%d %s->%s scale=%g bias=%s amax=%s go+%d out+%d gy=%s nonfinite=%s' % (
        rows, cols, Tout, fmt, scale, Tbias, want_amax, go_off, out_off, grid_y, special and nonfinite)
    n = rows * cols
    dvals = [f32(rng.gauss(0, 2.0)) for _ in range(n)]
    if special:
        pool = POOL if nonfinite else POOL_FINITE
        for j, i in enumerate(range(seed % 3, n, 3)): dvals[i] = f32(pool[(j + seed) % len(pool)])
    d = Buf('d', 'f32', n, dvals, base=256)
    bias = None
    if Tbias:
        bv = rand_vals(rng, cols, Tbias)
        if special:
            for c in range(0, cols, 2): bv[c] = 0.0
        bias = Buf('bias', Tbias, cols, bv, base=8192 + 2)
    esz = ESIZE[Tout]
    out_base = 512 + out_off * esz
    go_base = 16384 + go_off
    second = Buf('gelu_out', 'u8', n, None, base=go_base)
    vec, threads, gx, gy, _ = launch_for(R, what, rows, cols, True, out_base, 4 * esz, kGeluFp8, second, grid_y)
    res = []
    for sd in (seed, seed + 55):
        o = Buf('out', Tout, n, None, base=out_base)
        g = Buf('gelu_out', 'u8', n, None, base=go_base)
        errs = []
        cnt, amax = run_fused(Tout, vec, gx, gy, threads, d, o, g, bias, rows, cols, e4, scale, want_amax, errs, sd, False)
        R.errors(errs, what + ' seed %d' % sd)
        res.append((o, g, ctr(cnt), amax and amax.data[0]))
    o, g, cnt, am = res[0]
    R.check([key(v) for v in o.data] == [key(v) for v in res[1][0].data] and g.data == res[1][1].data
            and cnt == res[1][2] and am == res[1][3], what + ': differs between schedules')
    writes_once(R, o, range(n), what + ' out')
    writes_once(R, g, range(n), what + ' gelu_out')
    # (a) the composition: kGelu (GELU stored in Tout), then the quantise kernels
    ko = Buf('out', Tout, n, None, base=out_base)
    kg = Buf('gelu_out', Tout, n, None, base=32768)
    kvec, kthreads, kgx, kgy, _ = launch_for(R, what + ' kGelu', rows, cols, True, out_base, 4 * esz, kGelu, kg, grid_y)
    kcnt = counters(); errs = []
    launch('store', store_kernel, (kgx, kgy), (kthreads, 1),
           (Tout, kGelu, kvec, d, ko, kg, None, None, bias, rows, cols, kcnt), errs, seed + 3)
    R.errors(errs, what + ' kGelu')
    R.check([key(v) for v in o.data] == [key(v) for v in ko.data], what + ': out differs from kGelu\'s')
    for kind, qb, qc, qa in compose(R, what, Tout, kg, rows, cols, e4, scale, seed):
        bad = [i for i in range(n) if g.data[i] != qb[i]]
        R.check(not bad, what + ': gelu_out differs from kGelu + quantise (%s) at %s (%s vs %s)' % (
            kind, bad[:4], [g.data[i] for i in bad[:2]], [qb[i] for i in bad[:2]]))
        exp = tuple(a + b for a, b in zip(ctr(kcnt), qc))
        R.check(cnt == exp, what + ': counts %s, kGelu %s + quantise (%s) %s' % (cnt, ctr(kcnt), kind, qc))
        if want_amax: R.check(am == qa, what + ': amax %#x, quantise (%s) %#x' % (am, kind, qa))
    # (b) gelu_forward_fp8_kernel on the stored pre (round_to = Tout), a full grid and one block
    pre = Buf('pre', Tout, n, o.data, base=4096)
    for grid in sorted({grid_stride_blocks(n), 1}):
        gb, gc, ga = run_gelu_fp8(R, what, Tout, e4, pre, n, scale, grid, seed + grid, want_amax)
        bad = [i for i in range(n) if g.data[i] != gb[i]]
        R.check(not bad, what + ': gelu_out differs from gelu_forward_fp8 (grid %d) at %s' % (grid, bad[:4]))
        R.check(gc == tuple(a - b for a, b in zip(cnt, cpu_commit(
            [add(dvals[i], bias.data[i % cols]) if bias else dvals[i] for i in range(n)], Tout)[1][1:])),
            what + ': gelu_forward_fp8 counts %s, fused %s less y\'s' % (gc, cnt))
        if want_amax: R.check(ga == am, what + ': gelu_forward_fp8 amax %s, fused %s' % (ga, am))
    # (c) the CPU backend: pre committed, then gelu_forward_fp8 (fp32 GELU, store_fp8)
    v32 = [add(dvals[i], bias.data[i % cols]) if bias else dvals[i] for i in range(n)]
    pre_bits, pre_counts = cpu_commit(v32, Tout)
    bad = [i for i in range(n) if fbits(o.data[i]) != pre_bits[i]]
    R.check(not bad, what + ': out differs from the CPU\'s pre at %s' % bad[:4])
    gel = [cpu_gelu(from_bits(b)) for b in pre_bits]
    cb, rc, qc, cm = cpu_store_fp8([fbits(w) for w in gel], Tout, e4, scale)
    bad = [i for i in range(n) if g.data[i] != cb[i]]
    R.check(not bad, what + ': gelu_out differs from the CPU\'s store_fp8 at %s' % bad[:4])
    cpu_total = tsum(pre_counts, rc, qc)
    R.check(cnt == cpu_total[1:], what + ': counts %s, CPU %s (pre %s, rounded %s, quantised %s)' % (
        cnt, cpu_total[1:], pre_counts, rc, qc))
    R.check(gc == tsum(rc, qc)[1:], what + ': gelu_forward_fp8 counts %s, CPU store_fp8 %s' % (gc, tsum(rc, qc)))
    rounded = [ROUND[Tout](gelu_value(v)) for v in o.data]
    if want_amax:
        R.check(am == cm == max_magnitude(rounded), what + ': amax %s, CPU %s, max |rounded GELU| %s' % (
            am, cm, max_magnitude(rounded)))
        COVER['finite_amax'] += int(am < 0x7F800000)
    # host value counts
    fv = store_output_values(kGeluFp8, Tout, rows, cols)
    R.check(fv == store_output_values(kGelu, Tout, rows, cols) + quantise_values(rows, cols) == cpu_total[0],
            what + ': values: store_output %d, kGelu + quantise %d, CPU %d' % (
                fv, store_output_values(kGelu, Tout, rows, cols) + quantise_values(rows, cols), cpu_total[0]))
    R.check(gelu_forward_fp8_values(Tout, n) == rc[0] + qc[0], what + ': gelu_forward_fp8 values %d, CPU %d' % (
        gelu_forward_fp8_values(Tout, n), rc[0] + qc[0]))
    cover(rounded, g.data, e4, scale, rc)
    COVER['y_over'] += pre_counts[1]
    COVER['cases'] += 1
    COVER['vec'][('staged', vec)] = COVER['vec'].get(('staged', vec), 0) + 1
    return vec

def direct_case_fp8(R, rows, cols, e4, scale, seed, out_off=0, go_off=0, grid_y=None, want_amax=True,
                    nonfinite=True):
    """store_output(ctx, nullptr, out, Tensor(), rows, cols, cls, kGeluFp8, gelu_out, &fp8) for a
    bf16 out the GEMM wrote with the bf16 rounding of x."""
    rng = random.Random(seed)
    fmt = 'e4m3' if e4 else 'e5m2'
    what = 'kGeluFp8 direct %dx%d bf16->%s scale=%g amax=%s out+%d go+%d gy=%s nonfinite=%s' % (
        rows, cols, fmt, scale, want_amax, out_off, go_off, grid_y, nonfinite)
    n = rows * cols
    x = [f32(rng.gauss(0, 2.0)) for _ in range(n)]
    sp = (X_SPECIAL + [f32(v) for v in POOL]) if nonfinite else [
        v for v in X_SPECIAL + [f32(v) for v in POOL_FINITE] if math.isfinite(bf16(v))]
    for j, i in enumerate(range(seed % 4, n, 4)): x[i] = sp[(j + seed) % len(sp)]
    y = [ROUND['bf16'](v) for v in x]
    obase, gbase = 512 + 2 * out_off, 16384 + go_off
    second = Buf('gelu_out', 'u8', n, None, base=gbase)
    vec, threads, gx, gy, aligned = launch_for(R, what, rows, cols, True, obase, 8, kGeluFp8, second, grid_y)
    res = []
    for sd in (seed, seed + 55):
        o = Buf('out', 'bf16', n, y, base=obase)
        g = Buf('gelu_out', 'u8', n, None, base=gbase)
        errs = []
        cnt, amax = run_fused('bf16', vec, gx, gy, threads, o, o, g, None, rows, cols, e4, scale, want_amax, errs, sd, True)
        R.errors(errs, what + ' seed %d' % sd)
        res.append((o, g, ctr(cnt), amax and amax.data[0]))
    o, g, cnt, am = res[0]
    R.check(g.data == res[1][1].data and cnt == res[1][2] and am == res[1][3], what + ': differs between schedules')
    nw = [i for i in range(n) if o.writes[i]]
    R.check(not nw, what + ': out written at %s (the GEMM wrote it)' % nw[:4])
    writes_once(R, g, range(n), what + ' gelu_out')
    n_inf = sum(1 for v in y if v in (math.inf, -math.inf))
    # the composition: kGelu direct, then the quantise kernels
    ko = Buf('out', 'bf16', n, y, base=obase)
    kg = Buf('gelu_out', 'bf16', n, None, base=32768)
    kvec, kthreads, kgx, kgy, _ = launch_for(R, what + ' kGelu', rows, cols, True, obase, 8, kGelu, kg, grid_y)
    errs = []
    kcnt = store.run_store('bf16', kGelu, kvec, kgx, kgy, kthreads, ko, ko, kg, None, None, rows, cols, errs, seed + 3, True)
    R.errors(errs, what + ' kGelu direct')
    for kind, qb, qc, qa in compose(R, what, 'bf16', kg, rows, cols, e4, scale, seed):
        bad = [i for i in range(n) if g.data[i] != qb[i]]
        R.check(not bad, what + ': gelu_out differs from kGelu direct + quantise (%s) at %s' % (kind, bad[:4]))
        R.check(cnt == tuple(a + b for a, b in zip(ctr(kcnt), qc)),
                what + ': counts %s, kGelu direct %s + quantise (%s) %s' % (cnt, ctr(kcnt), kind, qc))
        if want_amax: R.check(am == qa, what + ': amax %s, quantise (%s) %s' % (am, kind, qa))
    # the staged kernel fed x: the same bytes; counts differ in y's cast only
    d = Buf('d', 'f32', n, x, base=256)
    so = Buf('out', 'bf16', n, None, base=obase)
    sg = Buf('gelu_out', 'u8', n, None, base=gbase)
    svec, sthreads, sgx, sgy = store_launch(rows, cols, aligned)
    if grid_y: sgy = grid_y
    errs = []
    scnt, samax = run_fused('bf16', svec, sgx, sgy, sthreads, d, so, sg, None, rows, cols, e4, scale, want_amax, errs, seed + 7, False)
    R.errors(errs, what + ' staged')
    bad = [i for i in range(n) if sg.data[i] != g.data[i]]
    R.check(not bad, what + ': direct gelu_out differs from staged at %s' % bad[:4])
    bad = [i for i in range(n) if key(so.data[i]) != key(o.data[i])]
    R.check(not bad, what + ': staged out differs from the GEMM\'s y at %s' % bad[:4])
    if want_amax: R.check(samax.data[0] == am, what + ': amax direct %s staged %s' % (am, samax.data[0]))
    rmax = sum(1 for i in range(n) if abs(x[i]) > MAXF['bf16'] and x[i] not in (math.inf, -math.inf) and
               y[i] not in (math.inf, -math.inf))
    xinf = sum(1 for v in x if v in (math.inf, -math.inf))
    und = sum(1 for i in range(n) if x[i] != 0 and y[i] == 0)
    sc = ctr(scnt)
    R.check((sc[0] - cnt[0], sc[1] - cnt[1]) == (rmax - xinf, und),
            what + ': staged %s vs direct %s: expected +%d -%d over, +%d under' % (sc, cnt, rmax, xinf, und))
    # the CPU's store_fp8 on the GELU of y: the fused counts less the infinities read
    gel = [cpu_gelu(v) for v in y]
    cb, rc, qc, cm = cpu_store_fp8([fbits(w) for w in gel], 'bf16', e4, scale)
    bad = [i for i in range(n) if g.data[i] != cb[i]]
    R.check(not bad, what + ': gelu_out differs from the CPU\'s store_fp8 at %s' % bad[:4])
    R.check((cnt[0] - n_inf, cnt[1]) == tsum(rc, qc)[1:], what + ': counts %s less %d infinities, CPU store_fp8 %s' % (
        cnt, n_inf, tsum(rc, qc)))
    rounded = [ROUND['bf16'](gelu_value(v)) for v in y]
    if want_amax:
        R.check(am == cm == max_magnitude(rounded), what + ': amax %s, CPU %s' % (am, cm))
        COVER['finite_amax'] += int(am < 0x7F800000)
    cover(rounded, g.data, e4, scale, rc)
    COVER['direct'] += 1
    COVER['vec'][('direct', vec)] = COVER['vec'].get(('direct', vec), 0) + 1
    return vec

def case_gelu_fp8(R, n, di, Tr, e4, scale, seed, grid=None, want_amax=True, nonfinite=True):
    """gelu_forward_fp8 alone (the separate path: inp of any float dtype, round_to any): against
    the composition gelu_forward (store_counted to Tr) + quantise_one (the element kernel) and
    the CPU's gelu_forward_fp8."""
    rng = random.Random(seed)
    what = 'gelu_forward_fp8 n=%d inp=%s round_to=%s %s scale=%g grid=%s' % (n, di, Tr, 'e4m3' if e4 else 'e5m2', scale, grid)
    xv = [f32(rng.gauss(0, 3.0)) for _ in range(n)]
    pool = POOL if nonfinite else POOL_FINITE
    for j, i in enumerate(range(seed % 3, n, 3)): xv[i] = f32(pool[(j + seed) % len(pool)])
    inp = Buf('inp', di, n, xv, base=256)
    g = grid or grid_stride_blocks(n)
    qb, qc, qa = run_gelu_fp8(R, what, Tr, e4, inp, n, scale, g, seed, want_amax)
    # composition: gelu_forward_kernel's stores (store_counted<Tr>), then quantise (element)
    w = [gelu_value(v) for v in inp.data]
    z = [ROUND[Tr](v) for v in w]
    zc = cpu_count(w, Tr)
    zb = Buf('z', Tr, n, z, base=256)
    errs = []
    y, _, _, cnt, amax = quantise.run('element', zb, 1, n, scale, e4, True, False, False, seed, errs)
    R.errors(errs, what + ' quantise')
    bad = [i for i in range(n) if qb[i] != y.data[i]]
    R.check(not bad, what + ': bytes differ from gelu_forward + quantise at %s' % bad[:4])
    R.check(qc == tuple(a + b for a, b in zip(zc, ctr(cnt))), what + ': counts %s, gelu_forward %s + quantise %s' % (qc, zc, ctr(cnt)))
    if want_amax: R.check(qa == amax.data[0], what + ': amax %s, quantise %s' % (qa, amax.data[0]))
    # CPU (fp32 GELU on the widened inp; NaN payloads of fp32 arithmetic aside, Tr rounds them)
    gel = [cpu_gelu(v) for v in inp.data]
    cb, rc, qc2, cm = cpu_store_fp8([fbits(v) for v in gel], Tr, e4, scale)
    bad = [i for i in range(n) if qb[i] != cb[i]]
    R.check(not bad, what + ': bytes differ from the CPU at %s' % bad[:4])
    R.check(qc == tsum(rc, qc2)[1:], what + ': counts %s, CPU %s' % (qc, tsum(rc, qc2)))
    if want_amax:
        nan_ok = Tr == 'f32' and (cm & 0x7FFFFFFF) > 0x7F800000 and (qa & 0x7FFFFFFF) > 0x7F800000
        R.check(qa == cm or nan_ok, what + ': amax %#x, CPU %#x' % (qa, cm))
    R.check(gelu_forward_fp8_values(Tr, n) == rc[0] + qc2[0], what + ': values %d, CPU %d' % (
        gelu_forward_fp8_values(Tr, n), rc[0] + qc2[0]))
    cover(z, qb, e4, scale, rc)

def main(which='all'):
    R = Report('store_fp8')
    t0 = time.time()
    for k in COVER: COVER[k] = {} if k == 'vec' else 0
    with device_rounding():
        s = 300
        cases = []
        scales = [1.0, 0.5, 4.0, 4096.0, 2.0 ** -6]
        for rows, cols in [(3, 8), (5, 12), (2, 257), (2, 300), (3, 1030)]:
            for Tout in ('bf16', 'f16'):
                for Tbias in (None, 'f32', Tout):
                    s += 1
                    cases.append(dict(rows=rows, cols=cols, Tout=Tout, Tbias=Tbias, e4=bool(s % 2),
                                      scale=f32(scales[s % len(scales)]), seed=s, want_amax=(s % 4 != 0),
                                      nonfinite=(s % 3 == 0)))
        # alignments: gelu_out 1- or 2-byte aligned (kVec 1), 4-byte (kVec 4); out 4-byte (kVec 1);
        # row loops; no special values
        cases += [dict(rows=3, cols=16, Tout='bf16', Tbias=None, e4=True, scale=1.0, seed=400, go_off=1),
                  dict(rows=3, cols=16, Tout='f16', Tbias='f32', e4=False, scale=1.0, seed=401, go_off=2),
                  dict(rows=3, cols=16, Tout='bf16', Tbias='bf16', e4=False, scale=4096.0, seed=402, go_off=4),
                  dict(rows=3, cols=16, Tout='f16', Tbias=None, e4=True, scale=0.5, seed=403, out_off=2),
                  dict(rows=7, cols=40, Tout='bf16', Tbias='f32', e4=True, scale=1.0, seed=404, grid_y=3),
                  dict(rows=7, cols=33, Tout='f16', Tbias=None, e4=False, scale=2.0, seed=405, grid_y=2),
                  dict(rows=4, cols=24, Tout='bf16', Tbias=None, e4=True, scale=1.0, seed=406, special=False)]
        dcases = []
        for rows, cols in [(3, 8), (5, 12), (2, 257), (2, 300)]:
            s += 1
            dcases.append(dict(rows=rows, cols=cols, e4=bool(s % 2), scale=f32(scales[s % len(scales)]), seed=s,
                               nonfinite=bool(s % 2)))
        dcases += [dict(rows=3, cols=16, e4=True, scale=1.0, seed=500, out_off=2),      # kVec 1
                   dict(rows=3, cols=16, e4=False, scale=1.0, seed=501, go_off=2),      # kVec 1
                   dict(rows=3, cols=16, e4=True, scale=4096.0, seed=502, go_off=4, nonfinite=False),  # kVec 4
                   dict(rows=7, cols=40, e4=False, scale=0.5, seed=503, grid_y=3, want_amax=False),
                   dict(rows=7, cols=33, e4=True, scale=1.0, seed=504, grid_y=2, nonfinite=False)]
        gcases = [dict(n=700, di='f32', Tr='bf16', e4=True, scale=1.0, seed=600, nonfinite=False),
                  dict(n=300, di='bf16', Tr='f16', e4=False, scale=4096.0, seed=601, grid=1),
                  dict(n=513, di='f16', Tr='f32', e4=True, scale=0.5, seed=602, grid=2, nonfinite=False),
                  dict(n=200, di='f32', Tr='f32', e4=False, scale=1.0, seed=603, want_amax=False),
                  dict(n=64, di='bf16', Tr='bf16', e4=True, scale=2.0 ** -6, seed=604)]
        if which == 'quick':
            cases = cases[:6:2] + cases[-7:-5] + cases[-1:]
            dcases = dcases[:1] + dcases[-3:-1]
            gcases = gcases[1:3]
        for c in cases: case_fp8(R, **c)
        for c in dcases: direct_case_fp8(R, **c)
        for c in gcases: case_gelu_fp8(R, **c)
    cov = dict(COVER)
    vecs = cov.pop('vec')
    if which != 'quick':
        for k in ('saturated', 'q_under_pos', 'q_under_neg', 'round_under', 'nan', 'inf', 'y_over', 'finite_amax'):
            R.check(cov[k] > 0, 'coverage: no %s values' % k)
    print(R.summary(), '(%.0fs; %d staged, %d direct, %d gelu_forward_fp8 cases; (path, kVec) %s)' % (
        time.time() - t0, len(cases), len(dcases), len(gcases), dict(sorted(vecs.items()))))
    print('  classes seen:', ', '.join('%s %d' % kv for kv in cov.items()))
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
