import sys, random, math, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from ln import *

EPS24 = 2.0 ** -24

def new_ctx():
    return {'errors': [], 'act': Buf('act_counters', 'i32', 2, [0, 0]),
            'grad': Buf('grad_counters', 'i32', 2, [0, 0]), 'act_values': 0, 'grad_values': 0}

def cpu_count(vals32, T):
    """narrow_block's counts on the fp32 values the CPU stores: (values, over, under)."""
    if T == 'f32': return (0, 0, 0)
    return (len(vals32),) + cpu_cast_counts(vals32, T)

# CPU backend (fp32, sequential order) reference, for counts
def cpu_forward(x, w, b, N, C):
    ys, ms, ss = [], [], []
    for n in range(N):
        r = x[n * C:(n + 1) * C]
        m = 0.0
        for v in r: m = add(m, v)
        m = div(m, f32(C))
        var = 0.0
        for v in r:
            dx = sub(v, m); var = add(var, mul(dx, dx))
        var = div(var, f32(C))
        s = div(1.0, sqrt_rn(add(var, EPS)))
        for c in range(C): ys.append(add(mul(mul(sub(r[c], m), s), w[c]), b[c]))
        ms.append(m); ss.append(s)
    return ys, ms, ss

def cpu_backward(dinp0, dw0, db0, d, x, w, ms, ss, N, C):
    dx = list(dinp0)
    for n in range(N):
        m, s = ms[n], ss[n]
        a = bb = 0.0
        for c in range(C):
            norm = mul(sub(x[n * C + c], m), s); dn = mul(w[c], d[n * C + c])
            a = add(a, dn); bb = add(bb, mul(dn, norm))
        a = div(a, f32(C)); bb = div(bb, f32(C))
        for c in range(C):
            norm = mul(sub(x[n * C + c], m), s); dn = mul(w[c], d[n * C + c])
            dx[n * C + c] = add(dx[n * C + c], mul(sub(sub(dn, a), mul(norm, bb)), s))
    dwv, dbv = list(dw0), list(db0)
    for n in range(N):
        for c in range(C):
            dwv[c] = add(dwv[c], mul(mul(sub(x[n * C + c], ms[n]), ss[n]), d[n * C + c]))
            dbv[c] = add(dbv[c], d[n * C + c])
    return dx, dwv, dbv

def gen_inputs(rng, N, C, dts, special=False):
    di, dw_, db_, do_, dinp_t, dwt, dbt, to = dts
    x = [rng.gauss(0.5, 2.0) for _ in range(N * C)]
    w = [rng.gauss(1.0, 0.3) for _ in range(C)]
    b = [rng.gauss(0.0, 0.3) for _ in range(C)]
    d = [rng.gauss(0.0, 1.0) for _ in range(N * C)]
    if special:  # columns / rows that overflow or underflow 16-bit stores
        for c in range(0, C, 7): w[c] = 2e5; b[c] = 0.0
        for c in range(3, C, 11): w[c] = 1e-9 if to == 'f16' else 1e-43; b[c] = 0.0
        for c in range(C): d[c] *= 1e-14 if dinp_t == 'f16' else 1e-45
        if N > 1:
            for c in range(C): d[C + c] *= 1e5 if dinp_t == 'f16' else 1e36
    inp = Buf('inp', di, N * C, x)
    weight = Buf('weight', dw_, C, w)
    bias = Buf('bias', db_, C, b)
    dout = Buf('dout', do_, N * C, d)
    dinp = Buf('dinp', dinp_t, N * C, [0.0 if special else rng.gauss(0, 0.1) for _ in range(N * C)])
    dweight = Buf('dweight', dwt, C, [rng.gauss(0, 0.1) for _ in range(C)])
    dbias = Buf('dbias', dbt, C, [rng.gauss(0, 0.1) for _ in range(C)])
    return inp, weight, bias, dout, dinp, dweight, dbias

def run_forward(path, inp, weight, bias, N, C, T, seed=0):
    ctx = new_ctx()
    out = Buf('out', T, N * C); mean = Buf('mean', 'f32', N); rstd = Buf('rstd', 'f32', N)
    p = layernorm_forward(ctx, out, mean, rstd, inp, weight, bias, N, C, force=path, seed=seed)
    return p, out, mean, rstd, ctx

def run_backward(path, dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C, seed=0):
    ctx = new_ctx()
    dinp, dweight, dbias = dinp.copy(), dweight.copy(), dbias.copy()
    p, scratch, chunks = layernorm_backward(ctx, dinp, dweight, dbias, dout, inp, weight, mean,
                                            rstd, N, C, force=path, seed=seed)
    return p, dinp, dweight, dbias, ctx, scratch, chunks

class Report:
    def __init__(self): self.fail = []; self.lines = []
    def check(self, cond, msg):
        if not cond: self.fail.append(msg)
    def log(self, s):
        self.lines.append(s); print(s, flush=True)

def test_case(R, N, C, dts, seed, special=False, do_bwd=True, tag=''):
    rng = random.Random(seed * 1000 + C)
    inp, weight, bias, dout, dinp0, dw0, db0 = gen_inputs(rng, N, C, dts, special)
    T = dts[7]
    name = 'N=%d C=%d %s%s' % (N, C, '/'.join(dts), ' special' if special else '')
    # ---- forward: launcher's choice, then both kernels
    pa, outA, meanA, rstdA, ctxA = run_forward(None, inp, weight, bias, N, C, T, seed)
    exp_path = 'loop' if register_cols(C) == 0 else 'regs%d' % register_cols(C)
    R.check(pa == exp_path, '%s: forward path %s, expected %s' % (name, pa, exp_path))
    pl, outL, meanL, rstdL, ctxL = run_forward('loop', inp, weight, bias, N, C, T, seed + 1)
    for c_, lab in ((ctxA, 'fwd ' + pa), (ctxL, 'fwd loop')):
        R.check(not c_['errors'], '%s %s: %s' % (name, lab, c_['errors'][:3]))
    for buf in (outA, meanA, rstdA, outL, meanL, rstdL):
        bad = [i for i in range(buf.n) if buf.writes[i] != 1]
        R.check(not bad, '%s: %s written %s times at %s' % (name, buf.name, buf.writes[bad[0]] if bad else 0, bad[:5]))
    same = all(key(a) == key(b) for a, b in zip(outA.data + meanA.data + rstdA.data,
                                                  outL.data + meanL.data + rstdL.data))
    R.check(same, '%s: forward %s vs loop bits differ' % (name, pa))
    # float64 reference
    x, w, b = inp.data, weight.data, bias.data
    worst = 0.0; worst_stat = 0.0
    for n in range(N):
        r = x[n * C:(n + 1) * C]
        m = math.fsum(r) / C
        var = math.fsum((v - m) ** 2 for v in r) / C
        s = 1.0 / math.sqrt(var + EPS)
        worst_stat = max(worst_stat, abs(meanA.data[n] - m) / (EPS24 * (math.fsum(abs(v) for v in r) / C * (C / 32 + 8) + 1e-30)),
                         abs(rstdA.data[n] - s) / (s * EPS24) / 16)
        for c in range(C):
            norm = (r[c] - m) * s
            ref = norm * w[c] + b[c]
            got = outA.data[n * C + c]
            if math.isinf(got) and abs(f32(ref)) >= MAXF[T] * 0.999: continue
            scale = (abs(norm * w[c]) + abs(b[c]) + abs(m * s * w[c]) + 1e-38)
            e = max(0.0, abs(got - ref) - 0.5 * ulp(T, ref)) / (scale * EPS24)
            worst = max(worst, e)
    R.check(worst < 64 and worst_stat < 1, '%s: forward error vs float64 %.1f fp32-ulps-of-scale, stats %.2f' % (name, worst, worst_stat))
    # counts vs the CPU backend's (fp32 sequential order)
    ys, ms, ss = cpu_forward(x, w, b, N, C)
    cc = cpu_count(ys, T)
    gc = (ctxA['act_values'], ctxA['act'].data[0], ctxA['act'].data[1])
    gl = (ctxL['act_values'], ctxL['act'].data[0], ctxL['act'].data[1])
    R.check(gc == cc and gl == cc, '%s: forward cast counts gpu %s loop %s cpu %s' % (name, gc, gl, cc))
    msg = '%s fwd[%s]: regs==loop bits %s, err %.2f (stat %.2f), counts %s' % (name, pa, same, worst, worst_stat, gc)
    if not do_bwd:
        R.log(msg); return
    # ---- backward: using the forward's mean/rstd
    pb_, dxA, dwA, dbA, bctxA, scrA, chunks = run_backward(None, dinp0, dw0, db0, dout, inp, weight, meanA, rstdA, N, C, seed)
    R.check(pb_ == exp_path, '%s: backward path %s' % (name, pb_))
    _, dxL, dwL, dbL, bctxL, scrL, _ = run_backward('loop', dinp0, dw0, db0, dout, inp, weight, meanA, rstdA, N, C, seed + 2)
    _, dxA2, dwA2, dbA2, bctxA2, _, _ = run_backward(None, dinp0, dw0, db0, dout, inp, weight, meanA, rstdA, N, C, seed + 7)
    for c_, lab in ((bctxA, 'bwd ' + pb_), (bctxL, 'bwd loop'), (bctxA2, 'bwd rerun')):
        R.check(not c_['errors'], '%s %s: %s' % (name, lab, c_['errors'][:3]))
    for buf in (dxA, dwA, dbA, scrA, dxL, dwL, dbL, scrL):
        bad = [i for i in range(buf.n) if buf.writes[i] != 1]
        R.check(not bad, '%s: %s written %s times at %s' % (name, buf.name, [buf.writes[i] for i in bad[:3]], bad[:5]))
    same_dx = all(key(a) == key(b) for a, b in zip(dxA.data, dxL.data))
    R.check(same_dx, '%s: dinp %s vs loop bits differ' % (name, pb_))
    det = all(key(a) == key(b) for a, b in zip(dxA.data + dwA.data + dbA.data, dxA2.data + dwA2.data + dbA2.data))
    R.check(det, '%s: backward not deterministic across schedules' % name)
    same_dw = all(key(a) == key(b) for a, b in zip(dwA.data + dbA.data, dwL.data + dbL.data))
    # float64 reference
    d, ms_, ss_ = dout.data, meanA.data, rstdA.data
    wdx = 0.0
    for n in range(N):
        m, s = ms_[n], ss_[n]
        norms = [(x[n * C + c] - m) * s for c in range(C)]
        dn = [w[c] * d[n * C + c] for c in range(C)]
        a = math.fsum(dn) / C
        bb = math.fsum(dn[c] * norms[c] for c in range(C)) / C
        ea = EPS24 * (C / 32 + 8) * math.fsum(abs(v) for v in dn) / C
        eb = EPS24 * (C / 32 + 8) * math.fsum(abs(dn[c] * norms[c]) for c in range(C)) / C * 2
        for c in range(C):
            ref = dinp0.data[n * C + c] + (dn[c] - a - norms[c] * bb) * s
            got = dxA.data[n * C + c]
            if math.isinf(got) and abs(ref) > MAXF[dxA.dtype] * 0.999: continue
            scale = (abs(dn[c]) + abs(a) + abs(norms[c] * bb) + abs(m * s * bb) + abs(dn[c] * m * s)) * s * 8 + abs(dinp0.data[n * C + c]) + (ea + abs(norms[c]) * eb) * s / EPS24 + 1e-38
            e = max(0.0, abs(got - ref) - 0.5 * ulp(dxA.dtype, ref)) / (scale * EPS24)
            wdx = max(wdx, e)
    wdw = 0.0
    rows_per = layernorm_row_chunk(N)
    for c in range(C):
        terms_w = [((x[n * C + c] - ms_[n]) * ss_[n]) * d[n * C + c] for n in range(N)]
        terms_b = [d[n * C + c] for n in range(N)]
        for got_buf, old, terms in ((dwA, dw0, terms_w), (dbA, db0, terms_b), (dwL, dw0, terms_w), (dbL, db0, terms_b)):
            ref = old.data[c] + math.fsum(terms)
            got = got_buf.data[c]
            if math.isinf(got) and abs(ref) > MAXF[got_buf.dtype] * 0.999: continue
            extra = sum(abs(ms_[n] * ss_[n] * d[n * C + c]) for n in range(N)) if got_buf.name == 'dweight' else 0
            bound = EPS24 * (rows_per + chunks + kSumLanes + 4) * (math.fsum(abs(v) for v in terms) + extra + abs(old.data[c]))
            e = max(0.0, abs(got - ref) - 0.5 * ulp(got_buf.dtype, ref)) / (bound + 1e-38)
            wdw = max(wdw, e)
    R.check(wdx < 8, '%s: dinp error vs float64 %.2f' % (name, wdx))
    R.check(wdw <= 1.0, '%s: dweight/dbias error vs float64 %.2f of the bound' % (name, wdw))
    dx_c, dw_c, db_c = cpu_backward(dinp0.data, dw0.data, db0.data, d, x, w, ms_, ss_, N, C)
    cc = tuple(map(sum, zip(cpu_count(dx_c, dxA.dtype), cpu_count(dw_c, dwA.dtype), cpu_count(db_c, dbA.dtype))))
    gc = (bctxA['grad_values'], bctxA['grad'].data[0], bctxA['grad'].data[1])
    gl = (bctxL['grad_values'], bctxL['grad'].data[0], bctxL['grad'].data[1])
    R.check(gc == cc and gl == cc, '%s: backward cast counts gpu %s loop %s cpu %s' % (name, gc, gl, cc))
    R.log(msg + ' | bwd[%s] chunks %d: dinp regs==loop %s, deterministic %s, dw/db regs==loop bits %s, '
          'err dinp %.2f dw/db %.3f of bound, counts %s' % (pb_, chunks, same_dx, det, same_dw, wdx, wdw, gc))

if __name__ == '__main__':
    R = Report()
    which = sys.argv[1] if len(sys.argv) > 1 else 'main'
    t0 = time.time()
    F32 = ('f32',) * 8
    BF = ('bf16',) * 8
    MIX = ('bf16', 'f32', 'f16', 'bf16', 'f16', 'f32', 'bf16', 'f16')  # di dw db do dinp dwt dbt out
    MIX2 = ('f16', 'bf16', 'f32', 'f32', 'bf16', 'bf16', 'f16', 'bf16')
    if which == 'main':
        cases = [
            (5, 1, F32), (3, 33, MIX), (7, 37, BF), (13, 37, F32), (11, 129, MIX), (9, 129, F32),
            (6, 500, BF), (4, 500, MIX2), (5, 768, F32), (3, 768, BF), (4, 1024, MIX),
            (3, 1031, F32), (3, 1031, BF), (17, 96, MIX2), (3, 256, F32), (4, 257, BF),
        ]
        for i, (N, C, dts) in enumerate(cases):
            test_case(R, N, C, dts, i)
        for i, (N, C, dts) in enumerate([(4, 100, ('f32', 'f32', 'f32', 'f32', 'f16', 'f16', 'f16', 'f16')),
                                         (4, 100, ('f32', 'f32', 'f32', 'f32', 'bf16', 'bf16', 'bf16', 'bf16')),
                                         (3, 600, ('f32', 'f32', 'f32', 'f32', 'f16', 'f16', 'f16', 'f16'))]):
            test_case(R, N, C, dts, 100 + i, special=True)
    elif which == 'chunks':
        for i, (N, C, dts) in enumerate([(70, 37, MIX), (70, 129, BF), (41, 500, F32), (35, 768, MIX2),
                                         (37, 1031, F32), (530, 37, F32), (520, 5, BF)]):
            test_case(R, N, C, dts, 200 + i)
    print('elapsed %.0fs' % (time.time() - t0))
    print('FAILURES:' if R.fail else 'ALL PASS', len(R.fail))
    for f in R.fail[:40]: print('  ', f)
