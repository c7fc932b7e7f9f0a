# classifier.cu, emulated line by line.
import _path  # noqa: F401 (simt.py is in the parent folder)
from simt import *

kClassifierBlock = 512
INF = math.inf

def online_add(x, m, s):
    if x > m:
        s = add(mul(s, expf(sub(m, x))), 1.0); m = x
    elif x != -INF:
        s = add(s, expf(sub(x, m)))
    return m, s

def ce_kernel(t, T, kVec, kStaged, losses, logits, d, targets, Vp, V, dloss, act_c, grad_c):
    shared = t.sh['shared']
    tally, act_tally = Tally(), Tally()
    n = t.bx
    row = n * Vp
    y = t.ld(targets, n)
    if y < 0 or y >= V:
        t.L.err('__trap: target %d' % y); return
    if kStaged and 'ce_ly_from_row' not in MUT:
        ly = ROUND[T](t.ld(d, n * Vp + y))
    else:
        ly = t.ld(logits, row + y)
    m, s = -INF, 0.0
    pass1_end = Vp if kStaged and 'ce_pass1_V' not in MUT else V
    step = t.bdim[0] * kVec
    i0 = t.tid * kVec
    while i0 < pass1_end:
        if kStaged:
            src = n * Vp + i0
            if kVec % 4 == 0:
                if d.base % 16 == 0:
                    x = []
                    for k in range(0, kVec, 4): x += t.ldv(d, src + k, 4)  # float4
                else:
                    x = [t.ld(d, src + k) for k in range(kVec)]
            else:
                x = [t.ld(d, src + k) for k in range(kVec)]
            p = []
            for k in range(kVec):
                p.append(ROUND[T](x[k]))
                act_tally.add(x[k], p[k], MAXF[T])
            t.stv(logits, row + i0, p)  # Pack<T, kVec> store
        else:
            p = t.ldv(logits, row + i0, kVec)
        for k in range(kVec):
            if i0 + k < V: m, s = online_add(p[k], m, s)
        i0 += step
    if kStaged: yield from act_tally.flush(t, act_c)
    maxv = yield from block_max(t, m, shared)
    rel = 0.0 if s == 0.0 else mul(s, expf(sub(m, maxv)))
    ssum = yield from block_sum(t, rel, shared)
    logsum = add(logf(ssum), maxv)
    if t.tid == 0: t.st(losses, n, sub(logsum, ly))
    if dloss != 0.0:
        lim = Vp if 'ce_pad_grad' in MUT else V
        def grad(i, x):
            return mul(dloss, sub(expf(sub(x, logsum)), 1.0 if i == y else 0.0)) if i < lim else 0.0
        i0 = t.tid * kVec
        while i0 < Vp:
            p = t.ldv(logits, row + i0, kVec)
            q = []
            for k in range(kVec):
                g = grad(i0 + k, p[k])
                q.append(ROUND[T](g))
                if narrow(T): tally.add(g, q[k], MAXF[T])
            t.stv(logits, row + i0, q)
            i0 += step
        if narrow(T): yield from tally.flush(t, grad_c)

def launch_classifier(ctx, losses, logits, d, targets, N, Vp, V, dloss, seed=0):
    if N == 0: return None
    T = logits.dtype
    kVec = 16 // ESIZE[T]
    vec = Vp % kVec == 0 and logits.base % 16 == 0
    staged = d is not None
    if staged and not narrow(T): raise RuntimeError('only 16-bit logits are rounded from a product')
    kv = kVec if vec else 1
    if staged and 'ce_staged_kvec1' in MUT: kv = 1
    launch('crossentropy%s<%s,%d>' % ('_staged' if staged else '', T, kv), ce_kernel, (N, 1),
           (kClassifierBlock, 1), (T, kv, staged, losses, logits, d, targets, Vp, V, dloss,
                                   ctx['act'], ctx['grad']), ctx['errors'], seed,
           shared_spec=(('shared', 32),))
    if T != 'f32':
        if staged: ctx['act_values'] += N * Vp
        if dloss != 0.0: ctx['grad_values'] += N * Vp
    return kv
