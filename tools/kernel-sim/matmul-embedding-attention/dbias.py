# matmul.cu: dbias_partial_kernel (lines 286-295) and dbias_final_kernel (302-326), with the
# previous single-thread-per-column final kernel (git show b8ad159^:src/backend/cuda/matmul.cu)
# as the bit reference for chunks <= 8.
import sys, random, math, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from common import *

kDbiasRows = 256
kBlock = 256
kDbiasFinalWarps = 8

def dbias_chunks(N): return (N + kDbiasRows - 1) // kDbiasRows if N > kDbiasRows else 1
def blocks_for(n, per=kBlock): return max(1, (n + per - 1) // per)

def dbias_partial_kernel(t, dout, part, N, OC):
    if False: yield
    o = t.bx * t.bdim[0] + t.tx
    if o >= OC: return
    n0 = t.by * kDbiasRows
    n1 = min(N, n0 + kDbiasRows)
    s = 0.0
    n = n0
    if 'partial_skip_last' in MUT: n1 -= 1
    while n < n1:
        s = add(s, t.ld(dout, n * OC + o)); n += 1
    t.st(part, t.by * OC + o, s)

def dbias_final_kernel(t, part, chunks, dbias, OC, counters, Tb):
    sums = t.sh['sums']
    lane, w = t.tid & 31, t.tid >> 5
    o = t.bx * 32 + lane
    s = 0.0
    stride = kDbiasFinalWarps if 'final_stride7' not in MUT else 7
    if o < OC:
        c = w
        while c < chunks:
            s = add(s, t.ld(part, c * OC + o)); c += stride
    t.shst(sums, (w * 32 + lane) if 'final_sums_idx' not in MUT else (lane * 8 + w) % 256, s)
    if 'final_nosync' not in MUT:
        yield from syncthreads()
    if w == 0:
        tally = Tally()
        if o < OC:
            tt = t.ld(dbias, o)
            used = min(chunks, kDbiasFinalWarps)
            if 'final_used_all' in MUT: used = kDbiasFinalWarps
            order = range(used) if 'final_reverse' not in MUT else reversed(range(used))
            for k in order:
                tt = add(tt, t.shld(sums, k * 32 + lane))
            store_counted(t, dbias, o, tt, tally, Tb)
        if narrow(Tb):
            if 'final_flush_partial' in MUT and o >= OC: return
            yield from tally.flush(t, counters)

# the fixed variant suggested in the report: each warp starts from its first chunk
def dbias_final_fixed(t, part, chunks, dbias, OC, counters, Tb):
    sums = t.sh['sums']
    lane, w = t.tid & 31, t.tid >> 5
    o = t.bx * 32 + lane
    s = 0.0
    if o < OC and w < chunks:
        s = t.ld(part, w * OC + o)
        c = w + kDbiasFinalWarps
        while c < chunks:
            s = add(s, t.ld(part, c * OC + o)); c += kDbiasFinalWarps
    t.shst(sums, w * 32 + lane, s)
    yield from syncthreads()
    if w == 0:
        tally = Tally()
        if o < OC:
            tt = t.ld(dbias, o)
            for k in range(min(chunks, kDbiasFinalWarps)):
                tt = add(tt, t.shld(sums, k * 32 + lane))
            store_counted(t, dbias, o, tt, tally, Tb)
        if narrow(Tb): yield from tally.flush(t, counters)

def dbias_final_old(t, part, chunks, dbias, OC, counters, Tb):
    tally = Tally()
    o = t.bx * t.bdim[0] + t.tx
    if o < OC:
        s = t.ld(dbias, o)
        for c in range(chunks): s = add(s, t.ld(part, c * OC + o))
        store_counted(t, dbias, o, s, tally, Tb)
    if narrow(Tb): yield from tally.flush(t, counters)

def run_final(kernel, part_vals, chunks, dbias0, OC, Tb, seed, errors):
    part = Buf('part', 'f32', chunks * OC, part_vals)
    db = Buf('dbias', Tb, OC, dbias0)
    cnt = counters()
    if kernel is dbias_final_old:
        launch('dbias_final_old', kernel, (blocks_for(OC), 1), (kBlock, 1),
               (part, chunks, db, OC, cnt, Tb), errors, seed)
    else:
        launch(kernel.__name__, kernel, ((OC + 31) // 32, 1), (kDbiasFinalWarps * 32, 1),
               (part, chunks, db, OC, cnt, Tb), errors, seed,
               shared_spec=[('sums', kDbiasFinalWarps * 32)])
    return db, cnt

def final_case(R, chunks, OC, Tb, seed, special=False, kernel=dbias_final_kernel):
    rng = random.Random(seed)
    part_vals = [f32(rng.gauss(0, 3.0) * (rng.choice([1, 1e-3, 1e3]))) for _ in range(chunks * OC)]
    dbias0 = rand_vals(rng, OC, Tb, 1.0)
    if special:
        for o in range(OC):
            r = rng.random()
            if r < 0.15 and Tb == 'f16':   # overflow past fp16
                dbias0[o] = f16(60000.0); part_vals[o] = f32(9000.0)
            elif r < 0.15 and Tb == 'bf16':
                dbias0[o] = bf16(3.3e38); part_vals[o] = f32(1e37)
            elif r < 0.3:                   # underflow
                dbias0[o] = 0.0
                for c in range(chunks): part_vals[c * OC + o] = f32(1e-9 if c == 0 else 0.0)
            elif r < 0.35:                  # exact cancellations
                dbias0[o] = ROUND[Tb](1.0)
                for c in range(chunks): part_vals[c * OC + o] = f32(0.0)
                part_vals[o] = -1.0
    what = '%s chunks=%d OC=%d %s seed=%d' % (kernel.__name__, chunks, OC, Tb, seed)
    errs = []
    db, cnt = run_final(kernel, part_vals, chunks, dbias0, OC, Tb, seed, errs)
    R.errors(errs, what)
    writes_once(R, db, range(OC), what)
    # determinism: another block / thread order
    errs2 = []
    db2, cnt2 = run_final(kernel, part_vals, chunks, dbias0, OC, Tb, seed + 1000, errs2)
    R.check([key(v) for v in db.data] == [key(v) for v in db2.data] and ctr(cnt) == ctr(cnt2),
            what + ': results differ between schedules')
    # old kernel
    errs3 = []
    dbo, cnto = run_final(dbias_final_old, part_vals, chunks, dbias0, OC, Tb, seed, errs3)
    R.errors(errs3, what + ' (old kernel)')
    # the fp32 value of the new kernel's own order, for its counts
    vals32 = []
    for o in range(OC):
        ws = []
        for w in range(min(chunks, 8)):
            s = 0.0
            for c in range(w, chunks, 8): s = add(s, part_vals[c * OC + o])
            ws.append(s)
        tt = dbias0[o]
        for s in ws: tt = add(tt, s)
        vals32.append(tt)
    R.check(ctr(cnt) == cpu_count(vals32, Tb), what + ': counts %s, expected %s' % (ctr(cnt), cpu_count(vals32, Tb)))
    if chunks <= 8:
        bad = [o for o in range(OC) if key(db.data[o]) != key(dbo.data[o])]
        R.check(not bad, what + ': bits differ from the old kernel at %s (new %s old %s)' % (
            bad[:4], [db.data[o] for o in bad[:2]], [dbo.data[o] for o in bad[:2]]))
        R.check(ctr(cnt) == ctr(cnto), what + ': counts differ from the old kernel %s vs %s' % (ctr(cnt), ctr(cnto)))
    # float64 reference
    for o in range(OC):
        ps = [part_vals[c * OC + o] for c in range(chunks)]
        ref = dbias0[o] + math.fsum(ps)
        bound = (chunks + 2) * EPS32 * (abs(dbias0[o]) + sum(abs(p) for p in ps)) * 1.01
        got = db.data[o]
        if math.isinf(got) or abs(ref) > MAXF[Tb]:
            ok = abs(ref) >= MAXF[Tb] * 0.99 and (math.isinf(got) or abs(got) >= MAXF[Tb] * 0.99)
        else:
            ok = abs(got - ref) <= bound + ulp(Tb, ref) * 0.5 + 1e-45
        if not R.check(ok, what + ': o=%d got %r ref %r bound %g' % (o, got, ref, bound)): break

def pipeline_case(R, N, OC, Td, Tb, seed):
    """dout (N, OC) -> dbias_partial_kernel -> dbias_final_kernel, against float64."""
    rng = random.Random(seed)
    chunks = dbias_chunks(N)
    dout = Buf('dout', Td, N * OC, rand_vals(rng, N * OC, Td))
    part = Buf('part', 'f32', chunks * OC)
    errs = []
    what = 'pipeline N=%d OC=%d %s->%s' % (N, OC, Td, Tb)
    launch('dbias_partial', dbias_partial_kernel, (blocks_for(OC), chunks), (kBlock, 1),
           (dout, part, N, OC), errs, seed)
    R.errors(errs, what + ' partial')
    writes_once(R, part, range(chunks * OC), what + ' partial')
    for c in range(chunks):
        for o in range(OC):
            s = 0.0
            for n in range(c * kDbiasRows, min(N, (c + 1) * kDbiasRows)): s = add(s, dout.data[n * OC + o])
            if not R.check(key(part.data[c * OC + o]) == key(s), what + ': partial c=%d o=%d' % (c, o)): break
    dbias0 = rand_vals(rng, OC, Tb)
    errs = []
    db, cnt = run_final(dbias_final_kernel, [v for v in part.data], chunks, dbias0, OC, Tb, seed, errs)
    R.errors(errs, what + ' final')
    for o in range(OC):
        col = [dout.data[n * OC + o] for n in range(N)]
        ref = dbias0[o] + math.fsum(col)
        bound = (kDbiasRows + chunks + 2) * EPS32 * (abs(dbias0[o]) + sum(abs(v) for v in col)) + ulp(Tb, ref) * 0.5
        if not R.check(abs(db.data[o] - ref) <= bound, what + ': o=%d got %r ref %r' % (o, db.data[o], ref)): break

def negzero_case(R):
    """dbias = -0 and one chunk whose partial is -0 (only a BGRADB epilogue could give one)."""
    out = {}
    for k in (dbias_final_kernel, dbias_final_old, dbias_final_fixed):
        errs = []
        db, _ = run_final(k, [-0.0] * 3, 1, [-0.0] * 3, 3, 'f32', 1, errs)
        out[k.__name__] = [math.copysign(1, v) for v in db.data]
    return out

def main(quick=False):
    R = Report('dbias')
    t0 = time.time()
    i = 0
    chunk_list = [1, 2, 3, 7, 8, 9, 10, 16, 17, 129] if not quick else [1, 8, 10]
    for chunks in chunk_list:
        for OC in ([1, 33, 70] if not quick else [33]):
            for Tb in ('f32', 'bf16', 'f16'):
                i += 1
                final_case(R, chunks, OC, Tb, i, special=(i % 2 == 0))
    for N, OC, Td, Tb in ([(1, 5, 'f32', 'f32'), (256, 33, 'bf16', 'bf16'), (257, 7, 'f16', 'f32'),
                           (2048, 5, 'bf16', 'f16'), (2049, 3, 'f32', 'bf16'), (2560, 33, 'bf16', 'f32')]
                          if not quick else [(2560, 3, 'bf16', 'f32')]):
        i += 1
        pipeline_case(R, N, OC, Td, Tb, i)
    print(R.summary(), '(%.0fs)' % (time.time() - t0))
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    R = main(quick='quick' in sys.argv)
    print('-0 edge (sign of dbias after dbias=-0, one chunk of -0):', negzero_case(R))
    # the fixed variant also reproduces the old bits
    R2 = Report('dbias_final_fixed')
    j = 0
    for chunks in [1, 3, 8, 10, 129]:
        for Tb in ('f32', 'bf16'):
            j += 1; final_case(R2, chunks, 33, Tb, 500 + j, special=True, kernel=dbias_final_fixed)
    print(R2.summary())
