# adamw.cu: adamw_kernel<T, kSr> (lines 32-79) as adamw_update launches it (83-138), against
# CpuBackend::adamw_update (cpu_precision.cpp:657-718): m, v, the master, the parameter's bits
# (stochastic rounding included), the weight class's cast counts and the lost-update count.
# Usage: python3 adamw.py [quick]
import sys, time, math, random
import _path  # noqa: F401
from common import *

kBlock = 256

class Args:  # AdamWArgs as the host fills it
    pass

def make_args(p):
    a = Args()
    a.lr, a.beta1, a.beta2, a.eps, a.wd, a.grad_scale = (f32(p[k]) for k in ('lr', 'beta1', 'beta2', 'eps', 'wd', 'grad_scale'))
    a.omb1 = sub(1.0, a.beta1)
    a.omb2 = sub(1.0, a.beta2)
    a.c1 = f32(1.0 / (1.0 - math.pow(float(a.beta1), float(p['step']))))
    a.c2 = f32(1.0 / (1.0 - math.pow(float(a.beta2), float(p['step']))))
    a.step, a.seed, a.first_index = p['step'], p['seed'], p['first_index']
    return a

def ldf(t, buf, i): return from_bits(ldb(t, buf, i))
def stf(t, buf, i, x): t.st(buf, i, fbits(x))

def dev_bf16_half_ulp(w):  # adamw.cu:19-21, with formats.h's bf16_from_float
    return bf16_half_ulp_of_exponent((bf16_from_f32(fbits(w)) >> 7) & 0xFF)

def adamw_kernel(t, T, kSr, param, master, grad, dg, m, v, n, a, count_lost, lost_counter, counters):
    tally = Tally()
    lost = 0
    i = t.bx * t.bdim[0] + t.tx
    stride = t.gdim[0] * t.bdim[0]
    if 'adamw_stride_short' in MUT: stride -= 1
    while i < n:
        gi = mul(load_any(t, grad, dg, i), a.grad_scale)
        if 'adamw_fma' in MUT:
            mi = simt.fma32(a.beta1, ldf(t, m, i), mul(a.omb1, gi))
        else:
            mi = add(mul(a.beta1, ldf(t, m, i)), mul(a.omb1, gi))
        vi = add(mul(a.beta2, ldf(t, v, i)), mul(mul(a.omb2, gi), gi))
        stf(t, m, i, mi)
        stf(t, v, i, vi)
        mhat, vhat = mul(mi, a.c1), mul(vi, a.c2)
        if 'adamw_c_swap' in MUT: mhat, vhat = mul(mi, a.c2), mul(vi, a.c1)
        old = ldf(t, master, i) if master is not None else dev_load(T, ldb(t, param, i))
        upd = mul(a.lr, add(div(mhat, add(sqrt_rn(vhat), a.eps)), mul(a.wd, old)))
        now = sub(old, upd)
        if count_lost:
            ref = now if 'adamw_lost_now' in MUT else old
            if 'adamw_lost_le' in MUT: lost += int(abs(upd) <= dev_bf16_half_ulp(ref))
            else: lost += int(abs(upd) < dev_bf16_half_ulp(ref))
        if kSr:
            idx = i if 'adamw_sr_index' in MUT else a.first_index + i
            if 'adamw_sr_rn' in MUT: b = bf16_from_f32(fbits(now))
            else: b = bf16_from_float_stochastic(fbits(now), stochastic_rounding_bits(a.seed, a.step, idx))
            t.st(param, i, b)
            x = abs(now)
            tally.over += int(x > MAXF['bf16'] and x <= FLT_MAX)
            if 'adamw_sr_under_sign' in MUT: tally.under += int(x > 0.0 and b == 0)
            else: tally.under += int(x > 0.0 and (b & 0x7FFF) == 0)
        else:
            if master is not None and 'adamw_master_skip' not in MUT: stf(t, master, i, now)
            store_counted(t, param, T, i, now, tally)
        i += stride
    if T != 'f32': yield from tally.flush(t, counters)
    if count_lost:
        warp_lost = t.sh['warp_lost']
        for off in (16, 8, 4, 2, 1):
            r = yield ('down', lost, off); lost += r
        if (t.tx & 31) == 0: t.shst(warp_lost, t.tx >> 5, lost)
        if 'adamw_lost_nosync' not in MUT: yield ('sync',)
        if t.tx == 0:
            s = 0
            nw = t.bdim[0] // 32 - (1 if 'adamw_lost_lastwarp' in MUT else 0)
            for w in range(nw): s += t.shld(warp_lost, w)
            if s: t.atomic_add(lost_counter, 0, s)

def grid_stride_blocks(n, per=kBlock):
    b = max(1, (n + per - 1) // per)
    return min(b, 65535)

def gpu_adamw(pdt, param, master, grad, gdt, m, v, p, stats, grid=None, seed=0):
    """adamw_update's launch; returns (param, master, m, v, counters, lost, errors)."""
    n = len(param)
    a = make_args(p)
    count_lost = pdt == 'bf16'
    sr = p['sr'] and master is None and pdt == 'bf16'
    want_lost = count_lost and stats
    P = bitbuf('param', pdt, param)
    Mst = bitbuf('master', 'f32', master, base=4096) if master is not None else None
    G = bitbuf('grad', gdt, grad, base=8192)
    Mb = bitbuf('m', 'f32', m, base=12288)
    Vb = bitbuf('v', 'f32', v, base=16384)
    lost_counter = Buf('lost', 'i32', 1, None); lost_counter.data = [0]
    cnt = counters()
    blocks = grid or grid_stride_blocks(n)
    errs = []
    launch('adamw', adamw_kernel, (blocks, 1), (kBlock, 1),
           (pdt, sr, P, Mst, G, gdt, Mb, Vb, n, a, want_lost, lost_counter, cnt), errs, seed,
           shared_spec=[('warp_lost', kBlock // 32)])
    # AdamWStats::lost_updates gains the device counter (0 when nothing is counted)
    return P, Mst, Mb, Vb, cnt, lost_counter.data[0] if stats else None, errs

def cpu_adamw(pdt, param, master, grad, gdt, m, v, p, stats):
    """CpuBackend::adamw_update, line by line (C's left-to-right products, no contraction:
    CMakeLists.txt builds with -ffp-contract=off)."""
    n = len(param)
    mm = [from_bits(b) for b in m]
    vv = [from_bits(b) for b in v]
    w = [from_bits(b) for b in master] if master is not None else cpu_widen_vals(param, pdt)
    gp = cpu_widen_vals(grad, gdt)
    count_lost = pdt == 'bf16'
    sr = p['sr'] and master is None and pdt == 'bf16'
    beta1, beta2, lr, eps, wd, gs = (f32(p[k]) for k in ('beta1', 'beta2', 'lr', 'eps', 'wd', 'grad_scale'))
    c1 = f32(1.0 / (1.0 - math.pow(float(beta1), float(p['step']))))
    c2 = f32(1.0 / (1.0 - math.pow(float(beta2), float(p['step']))))
    lost = over = under = 0
    pb = [None] * n
    nows = [None] * n
    for i in range(n):
        gi = mul(gp[i], gs)
        mi = add(mul(beta1, mm[i]), mul(sub(1.0, beta1), gi))
        vi = add(mul(beta2, vv[i]), mul(mul(sub(1.0, beta2), gi), gi))
        mm[i] = mi; vv[i] = vi
        mhat, vhat = mul(mi, c1), mul(vi, c2)
        old = w[i]
        upd = mul(lr, add(div(mhat, add(sqrt_rn(vhat), eps)), mul(wd, old)))
        now = sub(old, upd)
        nows[i] = fbits(now)
        if count_lost: lost += int(abs(upd) < fast_bf16_half_ulp(fbits(old)))
        if sr:
            b = bf16_from_float_stochastic(fbits(now), stochastic_rounding_bits(p['seed'], p['step'], p['first_index'] + i))
            pb[i] = b
            x = abs(now)
            over += int(x > MAXF['bf16'] and x <= FLT_MAX)
            under += int(x > 0.0 and (b & 0x7FFF) == 0)
        else:
            w[i] = now
    wbits = [fbits(x) for x in w]
    if sr:
        newp, counts = pb, (over, under)
    elif master is not None or pdt != 'f32':
        newp, counts = cpu_narrow_into(wbits, pdt)
    else:
        newp, counts = wbits, (0, 0)
    return (newp, wbits if master is not None else None, [fbits(x) for x in mm], [fbits(x) for x in vv],
            counts, (lost if count_lost else 0) if stats else None, nows)

PRESETS = {
    'typical': dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.1, step=7, grad_scale=0.5,
                    seed=0x1234567887654321, first_index=0),
    'shard': dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.0, step=1000, grad_scale=1.0,
                  seed=0xFEDCBA9876543210, first_index=3 * 2 ** 31 + 17),   # a ZeRO-1 shard: int64 index
    'aggressive': dict(lr=0.75, beta1=0.9, beta2=0.999, eps=1e-8, wd=1.0, step=1, grad_scale=1e3,
                       seed=42, first_index=5),
    'tie': dict(lr=0.0625, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0625, step=3, grad_scale=1.0,
                seed=11, first_index=0),   # upd = old / 256: half the bf16 ulp of a power of two
    'extreme': dict(lr=1.0, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0, step=1, grad_scale=1.0,
                    seed=7, first_index=0),
}

def make_inputs(rng, n, pdt, gdt, with_master, preset, special):
    """param, master, grad, m, v as bits. 'extreme' crafts elements whose update lands between
    bf16's largest finite value and FLT_MAX (overflow counts) or past it; 'aggressive' shrinks
    subnormal weights to zero (underflow counts); 'tie' makes |upd| equal half the weight's bf16
    ulp (the lost-update comparison's boundary)."""
    if with_master:
        master = rand_bits(rng, n, 'f32', 0.3, special)
        param = [FROM_F32[pdt](u) for u in master]
    else:
        master = None
        param = rand_bits(rng, n, pdt, 0.3, special)
    grad = rand_bits(rng, n, gdt, 1e-2, special)
    m = [fbits(f32(rng.gauss(0, 1e-3))) for _ in range(n)]
    v = [fbits(f32(abs(rng.gauss(0, 1e-5)))) for _ in range(n)]
    if special:
        for i in rng.sample(range(n), max(1, n // 10)):
            m[i] = rng.choice([0, 0x80000000, 0x7FC00000, 0x7F800000, 0x00000001, fbits(f32(1e30))])
            v[i] = rng.choice([0, 0x00000001, 0x7F800000, fbits(f32(1e38)), fbits(f32(1e-30))])
    if preset == 'extreme':
        for i in range(0, n, 3):
            # old near bf16's max, v = grad = 0: upd = lr * 9 m / eps (c1 = 10): choose m so that
            # old - upd lands in (bf16 max, FLT_MAX], or past it, or nearer to zero
            old = from_bits(0x7F7F0000 if (i // 3) % 2 == 0 else 0x7F7E0000)
            if with_master: old = from_bits(rng.choice([0x7F7F0000, 0x7F7F8000, 0x7F7FFFFF, 0x7F7F4000]))
            target = rng.choice([3.395e38, 3.40e38, 3.4028e38, 3.41e38, 3.0e38])
            mi = f32(-(target - old) / 9e8)   # 0.9 m after the step; mhat = 9 m, upd = 9e8 m
            m[i], v[i] = fbits(mi), 0
            grad[i] = FROM_F32[gdt](0)
            if with_master: master[i] = fbits(old); param[i] = FROM_F32[pdt](fbits(old))
            else: param[i] = FROM_F32[pdt](fbits(old))
    if preset == 'tie':
        for i in range(0, n, 2):   # zero moments, old = +-2^k: |upd| equals its half ulp exactly
            m[i], v[i], grad[i] = 0, 0, FROM_F32[gdt](0)
            w = fbits(f32(rng.choice([1.0, -2.0, 0.5, 2.0 ** -20, -(2.0 ** 60), 1.5, 2.0 ** -126])))
            if with_master: master[i] = w
            param[i] = FROM_F32[pdt](w)
    if preset == 'aggressive':
        for i in range(1, n, 4):   # tiny weights, zero moments: upd = lr * wd * old, underflows
            sub_ = rng.choice([0x00010000, 0x80010000, 0x00030000, 0x80020000, 0x00800000, 0x80000000, 0])
            m[i], v[i], grad[i] = 0, 0, FROM_F32[gdt](0)
            if with_master: master[i] = sub_; param[i] = FROM_F32[pdt](sub_)
            else: param[i] = FROM_F32[pdt](sub_)
    return param, master, grad, m, v

def case(R, n, pdt, gdt, with_master, sr, stats, preset, seed, grid=None, special=0.0):
    rng = random.Random(seed)
    p = dict(PRESETS[preset]); p['sr'] = sr
    what = 'adamw n=%d param=%s grad=%s master=%s sr=%s stats=%s %s grid=%s' % (
        n, pdt, gdt, with_master, sr, stats, preset, grid)
    param, master, grad, m, v = make_inputs(rng, n, pdt, gdt, with_master, preset, special)
    P, Mst, Mb, Vb, cnt, lost, errs = gpu_adamw(pdt, param, master, grad, gdt, m, v, p, stats, grid, seed)
    R.errors(errs, what)
    for b in [P, Mb, Vb] + ([Mst] if Mst is not None else []): writes_once(R, b, what)
    ep, em, emm, ev, ecounts, elost, nows = cpu_adamw(pdt, param, master, grad, gdt, m, v, p, stats)
    compare(R, what + ' m', 'f32', Mb.data, emm, nan_loose=True)
    compare(R, what + ' v', 'f32', Vb.data, ev, nan_loose=True)
    if Mst is not None: compare(R, what + ' master', 'f32', Mst.data, em, nan_loose=True)
    compare(R, what + ' param', pdt, P.data, ep, nan_loose=True)
    R.check(ctr(cnt) == ecounts, '%s: cast counts %s, CPU %s' % (what, ctr(cnt), ecounts))
    R.check(lost == elost, '%s: lost updates %s, CPU %s' % (what, lost, elost))
    cov = {}
    if sr and pdt == 'bf16' and not with_master:   # elements stochastic rounding moved off nearest
        cov['sr_not_nearest'] = sum(1 for i in range(n) if ep[i] != fast_bf16_bits(nows[i]))
    key = 'sr' if (sr and pdt == 'bf16' and not with_master) else 'rn'
    cov[key + '_over'], cov[key + '_under'] = ecounts
    cov['lost'] = elost or 0
    return cov

def main(which='all'):
    R = Report('adamw')
    t0 = time.time()
    cov = dict.fromkeys(('rn_over', 'rn_under', 'sr_over', 'sr_under', 'sr_not_nearest', 'lost'), 0)
    s = 100
    cases = []
    for n in (1, 5, 31, 33, 257, 700):
        for pdt, with_master, sr in (('f32', False, False), ('bf16', False, False), ('bf16', False, True),
                                     ('bf16', True, True), ('f16', True, False), ('f16', False, True)):
            s += 1
            gdt = ('f32', 'bf16', 'f16')[s % 3]
            preset = ('typical', 'aggressive', 'extreme', 'shard', 'tie')[s % 5]
            cases.append(dict(n=n, pdt=pdt, gdt=gdt, with_master=with_master, sr=sr, stats=(s % 5 != 0),
                              preset=preset, seed=s, special=(0.08 if s % 2 else 0.0)))
    # grid-stride: more elements than the reduced grid's threads (each thread 3-4 elements)
    for pdt, with_master, sr, preset in (('bf16', False, True, 'typical'), ('bf16', True, False, 'aggressive'),
                                         ('f16', False, False, 'extreme'), ('f32', False, False, 'shard'),
                                         ('bf16', False, False, 'aggressive'), ('bf16', False, True, 'extreme'),
                                         ('bf16', True, False, 'tie'), ('bf16', False, True, 'aggressive')):
        s += 1
        cases.append(dict(n=1800 + s % 7, pdt=pdt, gdt=('bf16', 'f32', 'f16')[s % 3], with_master=with_master,
                          sr=sr, stats=True, preset=preset, seed=s, grid=2, special=0.05))
    if which == 'quick':
        cases = [c for c in cases if c['n'] in (31, 257)] + [c for c in cases if c.get('grid')][:3]
    for c in cases:
        for k, x in case(R, **c).items(): cov[k] += x
    print(R.summary(), '(%.0fs; %d cases; CPU totals over the cases: %s)' % (time.time() - t0, len(cases), cov))
    if which != 'quick':  # the quick subset is too small to reach every count
        R.check(all(cov.values()), 'coverage: some count never non-zero %s' % cov)
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
