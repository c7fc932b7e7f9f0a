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

# nonfinite: fp32 products whose 16-bit roundings are infinities, NaN, the largest finite values or
# zeros (the three sources count them differently); the first two padded columns of each row hold
# +inf and -inf. Row kinds ((n + seed) % 4) in the first V columns: 0: -inf, -(bf16 max) and
# underflowing products only (finite loss); 1: also one bf16-max logit; 2: one +inf; 3: one NaN.
NONFINITE_PAD = [math.inf, -math.inf, f32(3.38e38), f32(3.39e38), f32(3.4e38), math.nan,
                 f32(-3.39e38), f32(-3.4e38), f32(1e-41), f32(-1e-41), 0.0]
NONFINITE_ROW = [-math.inf, f32(-3.39e38), f32(-3.4e38), f32(1e-41), f32(-2e-41)]
PASS2_INTERVAL = 4  # __syncthreads passed before pass 2: block_max's two, block_sum's two

def inject_nonfinite(rng, dv, tg, N, V, Vp, seed):
    kinds = []
    for n in range(N):
        b = n * Vp
        for j, i in enumerate(range(V, Vp)): dv[b + i] = NONFINITE_PAD[j % len(NONFINITE_PAD)]
        cols = [c for c in range(V) if c != tg[n]]
        pick = rng.sample(cols, min(len(cols), len(NONFINITE_ROW) + 1))
        for c, v in zip(pick, NONFINITE_ROW): dv[b + c] = v
        kind = (n + seed) % 4
        if kind and len(pick) > len(NONFINITE_ROW):
            dv[b + pick[-1]] = (None, f32(3.38e38), f32(3.4e38), math.nan)[kind]
        kinds.append(kind)
    return kinds

def stored_run(R, name, N, V, Vp, T, dloss, seed, lbase, rounded, tg, targets, lossI, logI, ctxI):
    """kStored (session 15, the uncommitted change of 2026-12-02) over the logits as the GEMM stored
    them (rounded: every Vp column initialised, as the GEMM writes them): bits against the in-place
    run (lossI, logI), writes (none in pass 1, the row once in pass 2 when dloss != 0), every
    column read in pass 1, counts = the infinities among the Vp stored values (per row, by one-row
    launches), no underflows, the same gradient counts as in place (ctxI)."""
    ctxD = new_ctx()
    logD = Buf('logits', T, N * Vp, rounded, base=lbase)
    lossD = Buf('losses', 'f32', N)
    kvD = launch_classifier(ctxD, lossD, logD, None, targets, N, Vp, V, dloss, seed + 2, source=kStored)
    R.check(not ctxD['errors'], '%s stored: %s' % (name, ctxD['errors'][:3]))
    want = 1 if dloss != 0 else 0
    bad = [i for i in range(logD.n) if logD.writes[i] != want]
    R.check(not bad, '%s stored: logits writes %s at %s (want %d)' % (name, [logD.writes[i] for i in bad[:3]], bad[:3], want))
    R.check(all(w == 1 for w in lossD.writes), '%s stored: losses writes %s' % (name, lossD.writes))
    ev = ctxD['launch'].events
    early = [(i, e) for (b, i), es in ev.items() if b == 'logits' for e in es if e[3] == 'w' and e[2] != PASS2_INTERVAL]
    R.check(not early, '%s stored: logits written outside pass 2 (interval, element): %s' % (name, [(e[2], i) for i, e in early[:3]]))
    # pass 1 (interval 0) reads every column of every row, the padded ones included
    unread = [i for i in range(N * Vp) if not any(e[3] == 'r' and e[2] == 0 for e in ev.get(('logits', i), ()))]
    R.check(not unread, '%s stored: columns not read in pass 1: %s' % (name, unread[:5]))
    same_loss = [key(a) for a in lossD.data] == [key(b) for b in lossI.data]
    same_logits = [key(a) for a in logD.data] == [key(b) for b in logI.data]
    R.check(same_loss, '%s: stored vs in-place losses differ: %s vs %s' % (name, lossD.data, lossI.data))
    R.check(same_logits, '%s: stored vs in-place logits/gradient bits differ' % name)
    # counts: add_stored's, over every stored value (Vp per row): infinities, no underflows
    infs = [sum(1 for v in rounded[n * Vp:(n + 1) * Vp] if v in (math.inf, -math.inf)) for n in range(N)]
    pad_infs = sum(1 for n in range(N) for v in rounded[n * Vp + V:(n + 1) * Vp] if v in (math.inf, -math.inf))
    nans = sum(1 for v in rounded if v != v)
    gotD_a = (ctxD['act_values'], ctxD['act'].data[0], ctxD['act'].data[1])
    R.check(gotD_a == (N * Vp, sum(infs), 0), '%s stored: activation counts %s, want %s' % (name, gotD_a, (N * Vp, sum(infs), 0)))
    # per row: one-row launches of the same kernel
    if any(v != v or v in (math.inf, -math.inf) for v in rounded):
        for n in range(N):
            c1 = new_ctx()
            l1 = Buf('logits', T, Vp, rounded[n * Vp:(n + 1) * Vp], base=lbase)
            o1 = Buf('losses', 'f32', 1)
            launch_classifier(c1, o1, l1, None, Buf('targets', 'i32', 1, [tg[n]]), 1, Vp, V, dloss, seed + 3 + n, source=kStored)
            got1 = (c1['act_values'], c1['act'].data[0], c1['act'].data[1])
            R.check(not c1['errors'] and got1 == (Vp, infs[n], 0),
                    '%s stored row %d alone: activation counts %s want %s %s' % (name, n, got1, (Vp, infs[n], 0), c1['errors'][:2]))
            R.check(key(o1.data[0]) == key(lossD.data[n]) and [key(v) for v in l1.data] == [key(v) for v in logD.data[n * Vp:(n + 1) * Vp]],
                    '%s stored row %d alone: bits differ from the N-row launch' % (name, n))
    dmsg = ', stored==in-place: losses %s, logits %s; stored act counts %s (%d infinities, %d of them padded; %d NaN)' % (
        same_loss, same_logits, gotD_a, sum(infs), pad_infs, nans)
    return logD, lossD, ctxD, kvD, dmsg

def case(R, N, V, Vp, T, dloss, seed, lbase=256, dbase=256, special=False, nonfinite=False):
    rng = random.Random(seed)
    name = 'N=%d V=%d Vp=%d %s dloss=%g logits@%d d@%d%s%s' % (N, V, Vp, T, dloss, lbase % 16, dbase % 16,
                                                             ' special' if special else '',
                                                             ' nonfinite' if nonfinite else '')
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
    if nonfinite: inject_nonfinite(rng, dv, tg, N, V, Vp, seed)
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
    if staged_ok:
        logD, lossD, ctxD, kvD, dmsg = stored_run(R, name, N, V, Vp, T, dloss, seed, lbase, rounded, tg,
                                                  targets, lossI, logI, ctxI)
        R.check(kvD == kvI, '%s: kVec stored %s in place %s' % (name, kvD, kvI))
    else:
        # kStored is for 16-bit logits only: the launcher throws
        try:
            launch_classifier(new_ctx(), Buf('losses', 'f32', N), Buf('logits', T, N * Vp, rounded, base=lbase),
                              None, targets, N, Vp, V, dloss, seed, source=kStored)
            R.check(False, '%s: kStored over %s logits did not throw' % (name, T))
        except RuntimeError:
            pass
    msg = '%s: kVec %s' % (name, kvI)
    if staged_ok:
        def same_as_staged(other, loss, logits, kv):
            same_loss = [key(a) for a in lossS.data] == [key(b) for b in loss.data]
            same_logits = [key(a) for a in logS.data] == [key(b) for b in logits.data]
            R.check(same_loss, '%s: staged vs %s losses differ: %s vs %s' % (name, other, lossS.data, loss.data))
            R.check(same_logits, '%s: staged vs %s logits/gradient bits differ' % (name, other))
            R.check(kvS == kv, '%s: kVec staged %s %s %s' % (name, kvS, other, kv))
            return ', staged==%s: losses %s, logits %s' % (other, same_loss, same_logits)
        msg += same_as_staged('in-place', lossI, logI, kvI)
        msg += same_as_staged('stored', lossD, logD, kvD)
        msg += dmsg
    if dloss == 0:
        ok = [key(a) for a in logI.data] == [key(b) for b in rounded]
        ok2 = (not staged_ok) or [key(a) for a in logS.data] == [key(b) for b in rounded]
        ok3 = (not staged_ok) or [key(a) for a in logD.data] == [key(b) for b in rounded]
        R.check(ok and ok2 and ok3, '%s: dloss=0 left logits changed (in place %s, staged %s, stored %s)' % (name, ok, ok2, ok3))
        msg += ', eval leaves rounded logits %s' % (ok and ok2 and ok3)
    else:
        pad = all(logI.data[n * Vp + i] == 0.0 and key(logI.data[n * Vp + i]) == 0 for n in range(N) for i in range(V, Vp))
        R.check(pad, '%s: padded gradient not +0' % name)
    # float64 reference + CPU counts
    wl = wg = 0.0
    cpu_g = []
    cpu_loss = []
    skipped = 0
    for n in range(N):
        r = rounded[n * Vp:(n + 1) * Vp]
        cl, cg = cpu_ce(r, V, Vp, tg[n], dloss)
        if any(v != v or v == math.inf for v in r[:V]):
            # NaN loss and gradient: only the bit identities and counts above and below
            R.check(lossI.data[n] != lossI.data[n], '%s: row %d with NaN/+inf logits: loss %r' % (name, n, lossI.data[n]))
            cpu_loss.append(cl); cpu_g += cg; skipped += 1
            continue
        mx = max(r[:V])
        sm = math.fsum(math.exp(v - mx) for v in r[:V])
        ls = math.log(sm) + mx
        ref = ls - r[tg[n]]
        got = lossI.data[n]
        # bound: the sum's relative error (per-thread chain + trees) and logsum's roundings
        chain = (V + 511) // 512 + 16 + 9
        bnd = EPS24 * (2 * chain + 4 + 2 * abs(ls) + 2 * abs(ref) + 4)
        wl = max(wl, abs(got - ref) / bnd)
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
    lossdiff = max([abs(a - b) for a, b in zip(lossI.data, cpu_loss) if a == a] + [0.0])
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
        # staged minus stored activation counts on the same product, by class (architecture.md's
        # account of GemmOut::direct): fp32 infinities (stored only), finite fp32 above the format's
        # largest value that round down to it (staged only), underflows (staged only)
        fin = [x for x in dv if x == x and abs(x) != math.inf]
        n_inf32 = sum(1 for x in dv if abs(x) == math.inf)
        n_down = sum(1 for x in fin if abs(x) > MAXF[T] and abs(ROUND[T](x)) != math.inf)
        n_under = sum(1 for x in fin if x != 0.0 and ROUND[T](x) == 0.0)
        gotD_a = (ctxD['act_values'], ctxD['act'].data[0], ctxD['act'].data[1])
        R.check(gotD_a[1] == gotS_a[1] - n_down + n_inf32 and gotD_a[2] == gotS_a[2] - n_under,
                '%s: stored %s vs staged %s act counts: expected +%d -%d over, -%d under' % (
                    name, gotD_a, gotS_a, n_inf32, n_down, n_under))
        if n_inf32 or n_down or n_under:
            msg += ', stored-staged classes: %d fp32 inf, %d round down to max, %d underflows' % (n_inf32, n_down, n_under)
        gotD_g = (ctxD['grad_values'], ctxD['grad'].data[0], ctxD['grad'].data[1])
        R.check(gotD_g == gotI_g, '%s stored: gradient counts %s in place %s' % (name, gotD_g, gotI_g))
    else:
        msg += ', counts grad %s' % (gotI_g,)
    msg += ', loss err %.3f grad err %.3f of bound, |loss-cpu| %.2g' % (wl, wg, lossdiff)
    if skipped: msg += ' (%d NaN rows: no float64 reference)' % skipped
    R.log(msg)

class CountingReport(Report):
    """run_ln's Report that also counts its checks (session 15)."""
    def __init__(self):
        super().__init__(); self.checks = 0
    def check(self, cond, msg):
        self.checks += 1; super().check(cond, msg)

if __name__ == '__main__':
    R = CountingReport()
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
    # Session 15 (kStored, the uncommitted change of 2026-12-02): every 16-bit case above also runs
    # kStored; these add infinities, NaN, the largest finite values and underflowing products in
    # the first V columns and in the padded ones (inject_nonfinite).
    cases_nonfinite = [
        (4, 1031, 1040, 'bf16', 0.5, 256, 256, True),    # kVec 8, Vp not a multiple of 4096
        (4, 1031, 1037, 'bf16', 1.0, 256, 256, False),   # kVec 1 (Vp % 8), Vp not a multiple of 512
        (4, 37, 40, 'bf16', 0.0, 256, 256, False),       # evaluation, kVec 8
        (4, 1031, 1037, 'bf16', 0.0, 256, 256, True),    # evaluation, kVec 1
        (2, 5000, 5008, 'bf16', 0.25, 256, 256, False),  # two strides of 512 x 8
        (4, 1000, 1024, 'bf16', 1.0, 258, 260, False),   # logits misaligned: kVec 1
        (3, 8, 40, 'bf16', 1.0, 256, 256, False),        # 32 padded columns, kVec 8
        (4, 50, 64, 'f16', 1e-3, 256, 256, False),       # f16 (the kernel allows it)
    ]
    for (N, V, Vp, T, dl, lb, db, sp) in cases_nonfinite:
        case(R, N, V, Vp, T, dl, i, lb, db, sp, nonfinite=True); i += 1
    print('elapsed %.0fs' % (time.time() - t0))
    print('%d checks, %d failures' % (R.checks, len(R.fail)))
    print('FAILURES:' if R.fail else 'ALL PASS', len(R.fail))
    for f in R.fail[:40]: print('  ', f)
