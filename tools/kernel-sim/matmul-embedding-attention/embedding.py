# embedding.cu (forward, dwte_kernel, dwpe_kernel) and host_ids.cpp's bucket_positions, emulated
# line by line; compared with the CPU backend's order (cpu_backend.cpp embedding_*_f32 + commit)
# and float64.
import sys, random, math, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from common import *

kBlock = 256
def blocks_for(n, per=kBlock): return max(1, (n + per - 1) // per)
def grid_stride_blocks(n): return min(blocks_for(n), 65535)

# ---- host: bucket_positions (host_ids.cpp:54-77)
def bucket_positions(ids, n, vocab):
    count = [0] * (vocab + 1)
    for i in range(n): count[ids[i] + 1] += 1
    K = 0
    for v in range(vocab): K += count[v + 1] > 0
    for v in range(vocab): count[v + 1] += count[v]
    packed = [None] * (2 * K + 1 + n)
    token, start, order = 0, K, 2 * K + 1
    k = 0
    for v in range(vocab):
        if count[v + 1] > count[v]:
            packed[token + k] = v
            packed[start + k] = count[v] + (1 if 'bucket_start_off' in MUT and k > 0 else 0)
            k += 1
    packed[start + K] = n
    rng = range(n) if 'bucket_order_rev' not in MUT else reversed(range(n))
    if 'bucket_order_rev' in MUT:
        # fill from the end of each bucket backwards: positions in decreasing order
        end = [count[v + 1] for v in range(vocab)]
        for i in range(n):
            v = ids[i]; end[v] -= 1; packed[order + end[v]] = i
    else:
        for i in range(n):
            packed[order + count[ids[i]]] = i; count[ids[i]] += 1
    return K, packed

# ---- kernels
def embedding_forward_kernel(t, T, out, tokens, wte, wpe, N, T_, C, Vp, counters):
    tally = Tally()
    total = N * C
    i = t.bx * t.bdim[0] + t.tx
    while i < total:
        bt, c = i // C, i % C
        idv = t.ld(tokens, bt)
        if idv < 0 or idv >= Vp: t.L.err('__trap: id %d' % idv); return
        e = t.ld(wte, idv * C + c)
        pos = (bt % T_) if 'fwd_pos_bt' not in MUT else bt
        p = t.ld(wpe, pos * C + c)
        store_counted(t, out, i, add(e, p), tally, T)
        i += t.gdim[0] * t.bdim[0]
    if narrow(T): yield from tally.flush(t, counters)

def dwte_kernel(t, T, dwte, dout, dev, offs, C, counters):
    tally = Tally()
    tok0, st0, ord0 = offs
    k = t.bx
    row = t.ld(dev, tok0 + k)
    s0, s1 = t.ld(dev, st0 + k), t.ld(dev, st0 + k + 1)
    c = t.by * t.bdim[0] + t.tx
    while c < C:
        acc = t.ld(dwte, row * C + c)
        s = s0
        while s < s1:
            acc = add(acc, t.ld(dout, t.ld(dev, ord0 + s) * C + c)); s += 1
        store_counted(t, dwte, row * C + c, acc, tally, T)
        c += t.gdim[1] * t.bdim[0] if 'dwte_stride_x' not in MUT else t.gdim[0] * t.bdim[0]
    if narrow(T): yield from tally.flush(t, counters)

def dwpe_kernel(t, T, dwpe, dout, B, T_, C, counters):
    tally = Tally()
    total = T_ * C
    i = t.bx * t.bdim[0] + t.tx
    while i < total:
        acc = t.ld(dwpe, i)
        for b in range(B):
            acc = add(acc, t.ld(dout, (b * T_ * C if 'dwpe_bstride' not in MUT else b * C) + i))
        store_counted(t, dwpe, i, acc, tally, T)
        i += t.gdim[0] * t.bdim[0]
    if narrow(T): yield from tally.flush(t, counters)

# ---- host wrappers (embedding.cu:73-147)
def embedding_forward(out, tokens, wte, wpe, B, T_, C, Vp, cnt, errors, seed, grid=None):
    N = B * T_
    if N * C == 0: return
    launch('embedding_forward', embedding_forward_kernel, (grid or grid_stride_blocks(N * C), 1),
           (kBlock, 1), (out.dtype, out, tokens, wte, wpe, N, T_, C, Vp, cnt), errors, seed)

def embedding_backward(dwte, dwpe, dout, ids, B, T_, C, Vp, cnt, errors, seed, grid=None, cgrid=None):
    N = B * T_
    if N * C == 0: return None
    K, packed = bucket_positions(ids, N, Vp)
    Kmax = min(N, Vp)
    dev = Buf('scratch', 'i32', 2 * Kmax + 1 + N)  # embedding_backward_scratch_bytes
    for j, v in enumerate(packed): dev.data[j] = v
    cblocks = cgrid or min(blocks_for(C), 65535)
    launch('dwte', dwte_kernel, (K, cblocks), (kBlock, 1),
           (dwte.dtype, dwte, dout, dev, (0, K, 2 * K + 1), C, cnt), errors, seed)
    launch('dwpe', dwpe_kernel, (grid or grid_stride_blocks(T_ * C), 1), (kBlock, 1),
           (dwpe.dtype, dwpe, dout, B, T_, C, cnt), errors, seed + 7)
    return K

# ---- references
def cpu_forward(ids, wte, wpe, B, T_, C, T):
    vals = []
    for bt in range(B * T_):
        for c in range(C): vals.append(add(wte[ids[bt] * C + c], wpe[(bt % T_) * C + c]))
    return vals

def cpu_backward(ids, dwte0, dwpe0, dout, B, T_, C):
    dw, dp = list(dwte0), list(dwpe0)
    for bt in range(B * T_):
        for c in range(C):
            dw[ids[bt] * C + c] = add(dw[ids[bt] * C + c], dout[bt * C + c])
            dp[(bt % T_) * C + c] = add(dp[(bt % T_) * C + c], dout[bt * C + c])
    return dw, dp

def case(R, B, T_, C, V, Vp, maxT, Tw, Tp, Td, Tg, seed, special=False, small_grid=False):
    rng = random.Random(seed)
    what = 'emb B=%d T=%d C=%d V=%d Vp=%d maxT=%d wte=%s wpe=%s out/dout=%s grads=%s' % (B, T_, C, V, Vp, maxT, Tw, Tp, Td, Tg)
    N = B * T_
    hot = [rng.randrange(V) for _ in range(3)]
    ids = [rng.choice(hot) if rng.random() < 0.6 else rng.randrange(V) for _ in range(N)]
    ids[-1] = V - 1  # the last real row
    tokens = Buf('tokens', 'i32', N, ids)
    wte = Buf('wte', Tw, Vp * C, rand_vals(rng, Vp * C, Tw))
    wpe = Buf('wpe', Tp, maxT * C, rand_vals(rng, maxT * C, Tp))
    if special:  # overflow/underflow in the sum
        for c in range(min(C, 3)):
            wte.data[ids[0] * C + c] = ROUND[Tw](f32(6.5e4 if Td == 'f16' else 3.3e38))
            wpe.data[(0 % T_) * C + c] = ROUND[Tp](f32(6.5e4 if Td == 'f16' else 3.3e38))
        wte.data[ids[1] * C] = ROUND[Tw](f32(1e-30)); wpe.data[(1 % T_) * C] = 0.0
    # forward
    out = Buf('out', Td, N * C)
    cnt = counters(); errs = []
    grid = 2 if small_grid else None
    embedding_forward(out, tokens, wte, wpe, B, T_, C, Vp, cnt, errs, seed, grid)
    R.errors(errs, what + ' forward')
    writes_once(R, out, range(N * C), what + ' forward')
    ref32 = cpu_forward(ids, wte.data, wpe.data, B, T_, C, Td)
    bad = [i for i in range(N * C) if key(out.data[i]) != key(ROUND[Td](ref32[i]))]
    R.check(not bad, what + ': forward differs from the CPU at %s' % bad[:4])
    R.check(ctr(cnt) == cpu_count(ref32, Td), what + ': forward counts %s vs CPU %s' % (ctr(cnt), cpu_count(ref32, Td)))
    # backward
    dout = Buf('dout', Td, N * C, rand_vals(rng, N * C, Td))
    if special:
        for c in range(min(C, 2)):
            for bt in range(N):
                if ids[bt] == ids[0]: dout.data[bt * C + c] = ROUND[Td](f32(6e4 if Tg == 'f16' else 3.0e38))
    dwte0 = rand_vals(rng, Vp * C, Tg)
    dwpe0 = rand_vals(rng, maxT * C, Tg)
    results = []
    for sd in (seed, seed + 101):
        dwte = Buf('dwte', Tg, Vp * C, dwte0); dwpe = Buf('dwpe', Tg, maxT * C, dwpe0)
        cnt = counters(); errs = []
        K = embedding_backward(dwte, dwpe, dout, ids, B, T_, C, Vp, cnt, errs, sd, grid,
                               cgrid=(1 if small_grid else None))
        R.errors(errs, what + ' backward seed %d' % sd)
        results.append((dwte, dwpe, cnt))
    dwte, dwpe, cnt = results[0]
    R.check([key(v) for v in dwte.data] == [key(v) for v in results[1][0].data] and
            [key(v) for v in dwpe.data] == [key(v) for v in results[1][1].data] and
            ctr(cnt) == ctr(results[1][2]), what + ': backward differs between schedules')
    present = set(ids)
    for v in range(Vp):
        exp = 1 if v in present else 0
        for c in range(C):
            if dwte.writes[v * C + c] != exp:
                R.check(False, what + ': dwte[%d,%d] written %d times (expected %d%s)' % (
                    v, c, dwte.writes[v * C + c], exp, ', a padded row' if v >= V else ''))
                break
    R.check(all(key(dwte.data[i]) == key(dwte0[i]) for v in range(V, Vp) for i in range(v * C, (v + 1) * C)),
            what + ': padded rows changed')
    writes_once(R, dwpe, range(T_ * C), what + ' dwpe')
    writes_once(R, dwpe, range(T_ * C, maxT * C), what + ' dwpe rows >= T', expect=0)
    dw32, dp32 = cpu_backward(ids, dwte0, dwpe0, dout.data, B, T_, C)
    bad = [i for i in range(Vp * C) if key(dwte.data[i]) != key(ROUND[Tg](dw32[i]))]
    R.check(not bad, what + ': dwte differs from the CPU order at %s (got %s cpu %s)' % (
        bad[:3], [dwte.data[i] for i in bad[:2]], [ROUND[Tg](dw32[i]) for i in bad[:2]]))
    bad = [i for i in range(maxT * C) if key(dwpe.data[i]) != key(ROUND[Tg](dp32[i]))]
    R.check(not bad, what + ': dwpe differs from the CPU order at %s' % bad[:3])
    R.check(ctr(cnt) == tuple(a + b for a, b in zip(cpu_count(dw32, Tg), cpu_count(dp32, Tg))),
            what + ': backward counts %s vs CPU %s + %s' % (ctr(cnt), cpu_count(dw32, Tg), cpu_count(dp32, Tg)))
    # float64
    for v in sorted(present):
        pos = [bt for bt in range(N) if ids[bt] == v]
        for c in range(C):
            terms = [dwte0[v * C + c]] + [dout.data[bt * C + c] for bt in pos]
            ref = math.fsum(terms)
            got = dwte.data[v * C + c]
            if math.isinf(got) or abs(ref) > MAXF[Tg]: ok = abs(ref) > MAXF[Tg] * 0.99 or math.isinf(ref)
            else: ok = abs(got - ref) <= len(terms) * EPS32 * sum(abs(x) for x in terms) * 1.01 + ulp(Tg, ref) / 2
            if not R.check(ok, what + ': dwte[%d,%d] %r vs float64 %r' % (v, c, got, ref)): break
    return K

def main(which='all'):
    R = Report('embedding')
    t0 = time.time()
    cases = [  # B, T, C, V, Vp, maxT, wte, wpe, out/dout, grads, special, small_grid
        (2, 13, 5, 17, 24, 16, 'f32', 'f32', 'f32', 'f32', False, False),
        (2, 13, 40, 17, 24, 13, 'bf16', 'f32', 'bf16', 'bf16', True, False),
        (1, 33, 8, 9, 16, 40, 'f16', 'bf16', 'f16', 'f16', True, False),
        (2, 7, 300, 11, 16, 8, 'bf16', 'bf16', 'bf16', 'f32', False, False),
        (2, 9, 37, 5, 8, 9, 'f32', 'f16', 'f16', 'bf16', True, True),
        (1, 6, 600, 7, 8, 6, 'bf16', 'f32', 'f32', 'bf16', False, True),  # one column block: the c loop
    ]
    if which == 'quick': cases = cases[:2]
    for j, cs in enumerate(cases):
        case(R, *cs[:10], seed=10 + j, special=cs[10], small_grid=cs[11])
    print(R.summary(), '(%.0fs)' % (time.time() - t0))
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
