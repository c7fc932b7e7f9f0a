# classifier.cu, emulated line by line. Since session 15 the kernel's source follows the uncommitted
# change of 2026-12-02: `int kSource` (kLogits: in place; kProduct: the old staged path, rounding
# the fp32 product d; kStored: in place as a GEMM stored them under MPT_GEMM_OUT=direct, pass 1
# reading every column up to Vp and counting each with CastTally::add_stored). kStaged (True/False)
# as passed before is kProduct/kLogits (1/0).
# Mutation flags of kStored (run_mut.py): ce_stored_pass1_V, ce_stored_add, ce_stored_write_pass1,
# ce_stored_noflush, ce_stored_count_V, ce_stored_online_Vp, ce_stored_no_values,
# ce_stored_values_V, ce_stored_kvec1.
import _path  # noqa: F401 (simt.py is in the parent folder)
from simt import *

kClassifierBlock = 512
INF = math.inf
kLogits, kProduct, kStored = 0, 1, 2  # enum ClassifierSource

def online_add(x, m, s):
    if x > m:
        s = add(mul(s, expf(sub(m, x))), 1.0); m = x
    elif x != -INF:
        s = add(s, expf(sub(x, m)))
    return m, s

def ce_kernel(t, T, kVec, kSource, losses, logits, d, targets, Vp, V, dloss, act_c, grad_c):
    kStaged = kSource == kProduct
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
    if kSource == kStored:
        pass1_end = V if 'ce_stored_pass1_V' in MUT else Vp
    else:
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
            if kSource == kStored:
                for k in range(kVec):
                    if 'ce_stored_count_V' in MUT and i0 + k >= V: continue
                    if 'ce_stored_add' in MUT: act_tally.add(p[k], p[k], MAXF[T])
                    else: act_tally.add_stored(p[k])
                if 'ce_stored_write_pass1' in MUT: t.stv(logits, row + i0, p)
        for k in range(kVec):
            if i0 + k < (pass1_end if kSource == kStored and 'ce_stored_online_Vp' in MUT else V):
                m, s = online_add(p[k], m, s)
        i0 += step
    if kSource != kLogits and not (kSource == kStored and 'ce_stored_noflush' in MUT):
        yield from act_tally.flush(t, act_c)
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

def launch_classifier(ctx, losses, logits, d, targets, N, Vp, V, dloss, seed=0, source=None):
    """launch_classifier of classifier.cu. source: kLogits, kProduct or kStored; None: kProduct
    with d, else kLogits (the callers before session 15). The Launch goes to ctx['launch']."""
    if N == 0: return None
    if source is None: source = kProduct if d is not None else kLogits
    T = logits.dtype
    kVec = 16 // ESIZE[T]
    vec = Vp % kVec == 0 and logits.base % 16 == 0
    staged = source == kProduct
    if source != kLogits and not narrow(T):
        raise RuntimeError('crossentropy: only 16-bit logits come from a product or are counted')
    kv = kVec if vec else 1
    if staged and 'ce_staged_kvec1' in MUT: kv = 1
    if source == kStored and 'ce_stored_kvec1' in MUT: kv = 1
    ctx['launch'] = launch('crossentropy%s<%s,%d>' % (('', '_staged', '_stored')[source], T, kv),
                           ce_kernel, (N, 1), (kClassifierBlock, 1),
                           (T, kv, source, losses, logits, d, targets, Vp, V, dloss,
                            ctx['act'], ctx['grad']), ctx['errors'], seed,
                           shared_spec=(('shared', 32),))
    if T != 'f32':
        if source == kStored and 'ce_stored_no_values' in MUT: pass  # the old `if (d)`
        elif source == kStored and 'ce_stored_values_V' in MUT: ctx['act_values'] += N * V
        elif source != kLogits: ctx['act_values'] += N * Vp
        if dloss != 0.0: ctx['grad_values'] += N * Vp
    return kv
