import sys, random, math, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from ce import *
from run_ln import key, new_ctx, cpu_count, ulp, Report, EPS24

def cpu_ce(row, V, Vp, y, dloss):
    """crossentropy_f32 in fp32, sequential order (std::exp/log modelled as correctly rounded)."""
    maxv = -math.inf
    for i in range(V): maxv = max(maxv, row[i])
    s = 0.0
    for i in range(V): s = add(s, expf(sub(row[i], maxv)))
    logsum = add(logf(s), maxv)
    loss = sub(logsum, row[y])
    g = [mul(dloss, sub(expf(sub(row[i], logsum)), 1.0 if i == y else 0.0)) for i in range(V)] + [0.0] * (Vp - V)
    return loss, g

def case(R, N, V, Vp, T, dloss, seed, lbase=256, dbase=256, special=False):
    rng = random.Random(seed)
    name = 'N=%d V=%d Vp=%d %s dloss=%g logits@%d d@%d%s' % (N, V, Vp, T, dloss, lbase % 16, dbase % 16,
                                                           ' special' if special else '')
    dv = [f32(rng.gauss(0, 3)) for _ in range(N * Vp)]
    tg = [rng.randrange(V) for _ in range(N)]
    if special:
        for n in range(N):
            for i in range(V, Vp): dv[n * Vp + i] = f32(rng.choice([7e4, -1e5, 1e-9, 3e38, -math.inf, 0.0]))
            for i in range(0, V, 13):
                if i != tg[n]: dv[n * Vp + i] = -math.inf
            dv[n * Vp + (tg[n] + 1) % V] = f32(30.0)
            for i in range(5, V, 17):
                if i != tg[n]: dv[n * Vp + i] = f32(1e-9)
    targets = Buf('targets', 'i32', N, tg)
    res = {}
    staged_ok = narrow(T)
    # staged: logits uninitialised, d the product
    if staged_ok:
        ctxS = new_ctx()
        d = Buf('d', 'f32', N * Vp, dv, base=dbase)
        logS = Buf('logits', T, N * Vp, None, base=lbase)
        lossS = Buf('losses', 'f32', N)
        kvS = launch_classifier(ctxS, lossS, logS, d, targets, N, Vp, V, dloss, seed)
        R.check(not ctxS['errors'], '%s staged: %s' % (name, ctxS['errors'][:3]))
        want = 2 if dloss != 0 else 1
        bad = [i for i in range(logS.n) if logS.writes[i] != want]
        R.check(not bad, '%s staged: logits writes %s at %s (want %d)' % (name, [logS.writes[i] for i in bad[:3]], bad[:3], want))
        R.check(all(w == 1 for w in lossS.writes), '%s staged: losses writes %s' % (name, lossS.writes))
    # in place on the rounded product
    ctxI = new_ctx()
    rounded = [ROUND[T](v) for v in dv]
    logI = Buf('logits', T, N * Vp, rounded, base=lbase)
    lossI = Buf('losses', 'f32', N)
    kvI = launch_classifier(ctxI, lossI, logI, None, targets, N, Vp, V, dloss, seed + 1)
    R.check(not ctxI['errors'], '%s in place: %s' % (name, ctxI['errors'][:3]))
    want = 1 if dloss != 0 else 0
    bad = [i for i in range(logI.n) if logI.writes[i] != want]
    R.check(not bad, '%s in place: logits writes %s at %s (want %d)' % (name, [logI.writes[i] for i in bad[:3]], bad[:3], want))
    R.check(all(w == 1 for w in lossI.writes), '%s in place: losses writes %s' % (name, lossI.writes))
    msg = '%s: kVec %s' % (name, kvI)
    if staged_ok:
        same_loss = [key(a) for a in lossS.data] == [key(b) for b in lossI.data]
        same_logits = [key(a) for a in logS.data] == [key(b) for b in logI.data]
        R.check(same_loss, '%s: staged vs in-place losses differ: %s vs %s' % (name, lossS.data, lossI.data))
        R.check(same_logits, '%s: staged vs in-place logits/gradient bits differ' % name)
        R.check(kvS == kvI, '%s: kVec staged %s in place %s' % (name, kvS, kvI))
        msg += ', staged==in-place: losses %s, logits %s' % (same_loss, same_logits)
    if dloss == 0:
        ok = [key(a) for a in logI.data] == [key(b) for b in rounded]
        ok2 = (not staged_ok) or [key(a) for a in logS.data] == [key(b) for b in rounded]
        R.check(ok and ok2, '%s: dloss=0 left logits changed (in place %s, staged %s)' % (name, ok, ok2))
        msg += ', eval leaves rounded logits %s' % (ok and ok2)
    else:
        pad = all(logI.data[n * Vp + i] == 0.0 and key(logI.data[n * Vp + i]) == 0 for n in range(N) for i in range(V, Vp))
        R.check(pad, '%s: padded gradient not +0' % name)
    # float64 reference + CPU counts
    wl = wg = 0.0
    cpu_g = []
    cpu_loss = []
    for n in range(N):
        r = rounded[n * Vp:(n + 1) * Vp]
        mx = max(r[:V])
        sm = math.fsum(math.exp(v - mx) for v in r[:V])
        ls = math.log(sm) + mx
        ref = ls - r[tg[n]]
        got = lossI.data[n]
        # bound: the sum's relative error (per-thread chain + trees) and logsum's roundings
        chain = (V + 511) // 512 + 16 + 9
        bnd = EPS24 * (2 * chain + 4 + 2 * abs(ls) + 2 * abs(ref) + 4)
        wl = max(wl, abs(got - ref) / bnd)
        cl, cg = cpu_ce(r, V, Vp, tg[n], dloss)
        cpu_loss.append(cl); cpu_g += cg
        if dloss != 0:
            for i in range(Vp):
                gref = 0.0 if i >= V else dloss * (math.exp(r[i] - ls) - (1.0 if i == tg[n] else 0.0))
                g = logI.data[n * Vp + i]
                p = 0.0 if i >= V else math.exp(r[i] - ls)
                b2 = abs(dloss) * ((p * (bnd + 2 * EPS24 * abs(r[i] - ls) + 3 * EPS24) if p else 0.0) + 2 * EPS24 * (i == tg[n])) + 1e-45
                e = max(0.0, abs(g - gref) - 0.5 * ulp(T, gref)) / b2
                wg = max(wg, e)
    R.check(wl <= 1, '%s: loss error %.3f of bound' % (name, wl))
    R.check(wg <= 1, '%s: gradient error %.3f of bound' % (name, wg))
    lossdiff = max(abs(a - b) for a, b in zip(lossI.data, cpu_loss))
    # counts: staged as matmul_forward's store (activations) + the gradient's store
    cnt_a = cpu_count(dv, T) if staged_ok else (0, 0, 0)
    cnt_g = cpu_count(cpu_g, T) if dloss != 0 else (0, 0, 0)
    gotI_g = (ctxI['grad_values'], ctxI['grad'].data[0], ctxI['grad'].data[1])
    R.check(gotI_g == cnt_g, '%s in place: gradient counts %s cpu %s' % (name, gotI_g, cnt_g))
    if staged_ok:
        gotS_a = (ctxS['act_values'], ctxS['act'].data[0], ctxS['act'].data[1])
        gotS_g = (ctxS['grad_values'], ctxS['grad'].data[0], ctxS['grad'].data[1])
        R.check(gotS_a == cnt_a, '%s staged: activation counts %s cpu %s' % (name, gotS_a, cnt_a))
        R.check(gotS_g == cnt_g, '%s staged: gradient counts %s cpu %s' % (name, gotS_g, cnt_g))
        msg += ', counts act %s grad %s' % (gotS_a, gotS_g)
    else:
        msg += ', counts grad %s' % (gotI_g,)
    msg += ', loss err %.3f grad err %.3f of bound, |loss-cpu| %.2g' % (wl, wg, lossdiff)
    R.log(msg)

if __name__ == '__main__':
    R = Report()
    t0 = time.time()
    i = 0
    cases = [
        (3, 37, 40, 'bf16', 0.25, 256, 256, False),
        (3, 37, 37, 'bf16', 0.25, 256, 256, False),
        (4, 500, 512, 'f16', 1e-3, 256, 256, False),
        (3, 1031, 1031, 'bf16', 0.5, 256, 256, False),
        (3, 1031, 1040, 'f16', 1e-4, 256, 256, True),
        (3, 1031, 1040, 'bf16', 1.0, 258, 256, False),   # logits misaligned: kVec 1
        (3, 1000, 1024, 'bf16', 1.0, 256, 260, True),    # d misaligned: scalar loads, kVec 8
        (2, 5000, 5008, 'bf16', 1 / 3, 256, 256, True),  # two strides of 512 x 8
        (2, 5000, 5008, 'f16', 1e-4, 256, 256, False),
        (3, 50, 64, 'bf16', 0.0, 256, 256, True),        # evaluation
        (3, 1031, 1040, 'f16', 0.0, 256, 256, True),
        (2, 5000, 5008, 'bf16', 0.0, 256, 256, False),
        (3, 37, 40, 'f32', 0.25, 256, 256, False),
        (3, 1031, 1040, 'f32', 1.0, 256, 256, True),
        (3, 1031, 1031, 'f32', 1.0, 256, 256, False),
        (3, 2100, 2100, 'f32', 0.0, 256, 256, False),
        (3, 1, 8, 'bf16', 1.0, 256, 256, False),          # V = 1
    ]
    for (N, V, Vp, T, dl, lb, db, sp) in cases:
        case(R, N, V, Vp, T, dl, i, lb, db, sp); i += 1
    print('elapsed %.0fs' % (time.time() - t0))
    print('FAILURES:' if R.fail else 'ALL PASS', len(R.fail))
    for f in R.fail[:40]: print('  ', f)
