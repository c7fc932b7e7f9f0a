# gelu.cu (gelu_forward_kernel, gelu_backward_kernel, lines 11-32) with gelu_math.cuh,
# residual.cu (residual_kernel, 17-25) and fill.cu (fill_kernel, 158-163, with fill()'s host
# rounding, 173-193), against the CPU backend: CpuBackend::gelu_forward / gelu_backward /
# residual_forward (cpu_precision.cpp:423-439: widen, the fp32 kernel of cpu_backend.cpp:413-451,
# commit) and CpuBackend::fill (cpu_precision.cpp:324-339). expf and std::exp are both modelled
# as correctly rounded (the device's expf is within 2 ulp; gelu_math.cuh says the results differ
# only by that), so the GELU comparisons check the order of operations bit for bit.
# Usage: python3 elementwise.py [quick]
import sys, time, random
import _path  # noqa: F401
from common import *

kBlock = 256
def grid_stride_blocks(n, per=kBlock): return min(max(1, (n + per - 1) // per), 65535)

# ---------------- gelu_math.cuh
kGeluScale = f32(0.7978845608028654)
kGeluCubic = f32(0.044715)

def tanh_via_exp(u):
    return sub(1.0, div(2.0, add(expf(mul(2.0, u)), 1.0)))

def gelu_tanh(v):
    if 'gelu_cube_order' in MUT: cube = mul(kGeluCubic, mul(mul(v, v), v))
    else: cube = mul(mul(mul(kGeluCubic, v), v), v)
    return tanh_via_exp(mul(kGeluScale, add(v, cube)))

def gelu_value(v):
    if 'gelu_half_last' in MUT: return mul(0.5, mul(v, add(1.0, gelu_tanh(v))))
    return mul(mul(0.5, v), add(1.0, gelu_tanh(v)))

def gelu_derivative(v):
    th = gelu_tanh(v)
    sech2 = sub(1.0, mul(th, th))
    if 'gelu_poly_order' in MUT: poly = add(1.0, mul(mul(3.0, kGeluCubic), mul(v, v)))
    else: poly = add(1.0, mul(mul(mul(3.0, kGeluCubic), v), v))
    right = mul(mul(mul(mul(0.5, v), sech2), kGeluScale), poly)
    return add(mul(0.5, add(1.0, th)), right)

# ---------------- the kernels
def gelu_forward_kernel(t, T, out, inp, di, n, counters):
    tally = Tally()
    i = t.bx * t.bdim[0] + t.tx
    while i < n:
        store_counted(t, out, T, i, gelu_value(load_any(t, inp, di, i)), tally)
        i += t.gdim[0] * t.bdim[0]
    if T != 'f32': yield from tally.flush(t, counters)

def gelu_backward_kernel(t, T, dinp, inp, di, dout, dd, n, counters):
    tally = Tally()
    i = t.bx * t.bdim[0] + t.tx
    while i < n:
        grad = gelu_derivative(load_any(t, inp, di, i))
        store_counted(t, dinp, T, i, mul(grad, load_any(t, dout, dd, i)), tally)
        i += t.gdim[0] * t.bdim[0]
    if T != 'f32' and 'gelu_bwd_noflush' not in MUT: yield from tally.flush(t, counters)

def residual_kernel(t, T, out, a, da, b, db, n, counters):
    tally = Tally()
    i = t.bx * t.bdim[0] + t.tx
    if 'residual_start' in MUT: i = t.bx * 32 + t.tx
    while (i <= n) if 'residual_le' in MUT else (i < n):
        j = i + 1 if 'residual_b_next' in MUT else i
        store_counted(t, out, T, i, add(load_any(t, a, da, i), load_any(t, b, db, j)), tally)
        i += t.gdim[0] * t.bdim[0]
    if T != 'f32': yield from tally.flush(t, counters)

def fill_kernel(t, p, n, bits):
    if False: yield
    i = t.bx * t.bdim[0] + t.tx
    stride = t.gdim[0] * t.bdim[0]
    if 'fill_stride_x2' in MUT: stride *= 2
    while i < n:
        t.st(p, i, bits)
        i += stride

def fill_host_bits(dt, value_bits):   # fill.cu:179-190 (formats.h on the host)
    if 'fill_f16_trunc' in MUT and dt == 'f16':
        u = value_bits; a = u & ABS   # normal-range values truncated, the rest as before
        if 0x38800000 <= a < 0x477FF000: return ((u >> 16) & 0x8000) | ((a >> 13) - (112 << 10))
    return FROM_F32[dt](value_bits)

# ---------------- the CPU backend (cpu_backend.cpp:41, 413-451; C's left-to-right order)
def cpu_fast_tanh(u): return sub(1.0, div(2.0, add(expf(mul(2.0, u)), 1.0)))

def cpu_gelu(v):
    return mul(mul(0.5, v), add(1.0, cpu_fast_tanh(mul(kGeluScale, add(v, mul(mul(mul(kGeluCubic, v), v), v))))))

def cpu_gelu_grad(v, d):
    th = cpu_fast_tanh(mul(kGeluScale, add(v, mul(mul(mul(kGeluCubic, v), v), v))))
    sech2 = sub(1.0, mul(th, th))
    grad = add(mul(0.5, add(1.0, th)),
               mul(mul(mul(mul(0.5, v), sech2), kGeluScale), add(1.0, mul(mul(mul(3.0, kGeluCubic), v), v))))
    return mul(grad, d)

def cpu_commit(vals, T):
    return cpu_narrow_into([fbits(x) for x in vals], T)

# ---------------- cases
def run(name, kernel, n, args, grid, seed, R, what):
    g = grid or grid_stride_blocks(n)
    errs = []
    launch(name, kernel, (g, 1), (kBlock, 1), args, errs, seed)
    R.errors(errs, what)

def case_gelu(R, n, T, di, dd, seed, grid=None, special=0.05, alias=False):
    rng = random.Random(seed)
    what = 'gelu n=%d out=%s inp=%s dout=%s grid=%s alias=%s' % (n, T, di, dd, grid, alias)
    x = rand_bits(rng, n, di, 2.5, special)
    for i in range(0, n, 11):   # far tails: exp over/underflows; cube overflows
        x[i] = FROM_F32[di](fbits(f32(rng.choice([-12.0, -9.3, 8.9, 15.0, -1e20, 3e13, -3e13, 1e-30, -4e-39]))))
    d = rand_bits(rng, n, dd, 1.0, special)
    X = bitbuf('inp', di, x, base=4096)
    # forward
    out, cnt = outbuf('out', T, n), counters()
    run('gelu_forward', gelu_forward_kernel, n, (T, out, X, di, n, cnt), grid, seed, R, what + ' fwd')
    writes_once(R, out, what + ' fwd')
    want, counts = cpu_commit([cpu_gelu(v) for v in cpu_widen_vals(x, di)], T)
    compare(R, what + ' fwd', T, out.data, want, nan_loose=True)
    R.check(ctr(cnt) == counts, '%s fwd: counts %s, CPU %s' % (what, ctr(cnt), counts))
    c_all = counts
    # backward (dinp may be dout: in place when alias)
    Tb = dd if alias else T
    D = bitbuf('dout', dd, d, base=8192)
    dinp = D if alias else outbuf('dinp', Tb, n)
    cnt = counters()
    run('gelu_backward', gelu_backward_kernel, n, (Tb, dinp, X, di, D, dd, n, cnt), grid, seed + 1, R, what + ' bwd')
    writes_once(R, dinp, what + ' bwd')
    vals = [cpu_gelu_grad(v, g) for v, g in zip(cpu_widen_vals(x, di), cpu_widen_vals(d, dd))]
    want, counts = cpu_commit(vals, Tb)
    compare(R, what + ' bwd', Tb, dinp.data, want, nan_loose=True)
    R.check(ctr(cnt) == counts, '%s bwd: counts %s, CPU %s' % (what, ctr(cnt), counts))
    # float64 sanity of the formulas (finite, moderate inputs)
    for v in cpu_widen_vals(x[:50], di):
        if abs(v) < 8:
            g = 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
            R.check(abs(cpu_gelu(v) - g) <= 2e-6 * (1 + abs(g)), 'gelu(%r) %r, float64 %r' % (v, cpu_gelu(v), g))
    return (c_all[0] + counts[0], c_all[1] + counts[1])

def case_residual(R, n, T, da, db, seed, grid=None, special=0.08):
    rng = random.Random(seed)
    what = 'residual n=%d out=%s a=%s b=%s grid=%s' % (n, T, da, db, grid)
    a = rand_bits(rng, n, da, 3.0, special)
    b = rand_bits(rng, n, db, 3.0, special)
    for i in range(0, n, 7):   # sums that tie or land just past a format's largest value
        a[i] = FROM_F32[da](rng.choice([0x477FE000, 0x7F7F0000, 0x3F800000, 0x80000000, 0x00000001, 0x43E00000]))
        b[i] = FROM_F32[db](rng.choice([0x45000000, 0x7F7F0000, 0x33800000, 0x80000000, 0x80000001, 0x41000000]))
    A, B = bitbuf('a', da, a, 4096), bitbuf('b', db, b, 8192)
    out, cnt = outbuf('out', T, n), counters()
    run('residual', residual_kernel, n, (T, out, A, da, B, db, n, cnt), grid, seed, R, what)
    writes_once(R, out, what)
    want, counts = cpu_commit([add(p, q) for p, q in zip(cpu_widen_vals(a, da), cpu_widen_vals(b, db))], T)
    compare(R, what, T, out.data, want, nan_loose=True)
    R.check(ctr(cnt) == counts, '%s: counts %s, CPU %s' % (what, ctr(cnt), counts))
    return counts

def case_fill(R, n, dt, value_bits, seed, grid=None):
    what = 'fill n=%d %s value=%s grid=%s' % (n, dt, hex(value_bits), grid)
    bits = fill_host_bits(dt, value_bits)
    p = outbuf('t', dt, n)
    run('fill', fill_kernel, n, (p, n, bits), grid, seed, R, what)
    writes_once(R, p, what)
    # CPU: fp32 stores the float (its bits); the others narrow one element with fast_formats.h
    # (uncounted) and replicate it
    want = value_bits if dt == 'f32' else CPU_NARROW[dt](value_bits)
    compare(R, what, dt, p.data, [want] * n)

def main(which='all'):
    R = Report('elementwise')
    t0 = time.time()
    s = 700
    cov = [0, 0]
    F = ('f32', 'bf16', 'f16')
    for n, grid in ((1, None), (7, None), (31, None), (33, None), (300, None), (1234, 2)):
        for T in F:
            for di in F:
                s += 1
                if which == 'quick' and s % 4: continue
                dd = F[s % 3]
                o, u = case_gelu(R, n, T, di, dd, s, grid, alias=(s % 4 == 0))
                cov[0] += o; cov[1] += u
                o, u = case_residual(R, n, T, di, F[(s + 1) % 3], s, grid)
                cov[0] += o; cov[1] += u
    vals = f32_specials() + [fbits(f32(0.1)), fbits(f32(-1.0 / 3)), fbits(f32(1e-7))]
    for dt in DTYPES:
        for k, v in enumerate(vals):
            s += 1
            if which == 'quick' and s % 5: continue
            n, grid = ((1, None), (40, None), (300, None), (777, 1))[k % 4]
            case_fill(R, n, dt, v, s, grid)
    print(R.summary(), '(%.0fs; CPU cast counts over gelu and residual: overflow %d, underflow %d)'
          % (time.time() - t0, cov[0], cov[1]))
    R.check(cov[0] > 0 and cov[1] > 0, 'coverage: %s' % cov)
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
