# matmul.cu store_kernel (lines 231-280) with store_launch (matmul_plan.cpp:227-238) and
# store_output's alignment rule (matmul.cu:421-431); the fused ops against the separate kernels
# (gelu.cu gelu_forward_kernel / gelu_backward_kernel, residual.cu residual_kernel) on the
# rounded product, with gelu_math.cuh's expressions.
import sys, random, math, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from common import *

kPlain, kGelu, kResidual, kDgelu = 0, 1, 2, 3
MODES = {kPlain: 'plain', kGelu: 'gelu', kResidual: 'residual', kDgelu: 'dgelu'}

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

def store_kernel(t, Tout, kMode, kVec, d, out, gelu_out, residual, pre, bias, rows, cols, counters):
    tally = Tally()
    c0 = (t.bx * t.bdim[0] + t.tx) * kVec
    lim = cols if 'store_c0_le' not in MUT else cols + 1
    if c0 < lim:
        r = t.by
        while r < rows:
            i = r * cols + c0 if 'store_row_stride' not in MUT else r * (cols - 1) + c0
            v = t.ldv(d, i, 4) if kVec == 4 else [t.ld(d, i)]
            if kMode == kResidual: res = t.ldv(residual, i, kVec)
            y = [None] * kVec; z = [None] * kVec
            for k in range(kVec):
                if bias is not None:
                    bk = c0 + k if 'store_bias_idx' not in MUT else c0
                    v[k] = add(v[k], t.ld(bias, bk))
                y[k] = ROUND[Tout](v[k])
                if narrow(Tout): tally.add(v[k], y[k], MAXF[Tout])
                if kMode != kPlain:
                    yk = y[k]
                    if kMode == kGelu: w = gelu_value(yk)
                    elif kMode == kResidual: w = add(res[k], yk)
                    else: w = mul(gelu_derivative(t.ld(pre, i + k)), yk)
                    z[k] = ROUND[Tout](w)
                    if narrow(Tout): tally.add(w, z[k], MAXF[Tout])
            if kMode in (kResidual, kDgelu):
                t.stv(out, i, z)
            else:
                t.stv(out, i, y)
                if kMode == kGelu: t.stv(gelu_out, i, z)
            r += t.gdim[1] if 'store_rstride_x' not in MUT else t.gdim[0]
    if narrow(Tout): yield from tally.flush(t, counters)

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
    aligned = (pointer_alignment(d.base) >= 16 and pointer_alignment(out.base) >= pack and
               (mode in (kPlain, kDgelu) or pointer_alignment(second.base) >= pack))
    vec, threads, gx, gy = store_launch(rows, cols, aligned)
    if grid_y: gy = grid_y
    R.check(gx * threads >= (cols + vec - 1) // vec, what + ': launch covers %d of %d column threads' % (gx * threads, (cols + vec - 1) // vec))
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
    vecs = {}
    for c in cases:
        v = case(R, **c)
        vecs[v] = vecs.get(v, 0) + 1
    print(R.summary(), '(%.0fs; %d cases, kVec counts %s)' % (time.time() - t0, len(cases), vecs))
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
