# matmul.cu quantise_kernel (element, 32x32 tile, lines 83-121) and quantise_strip_kernel (lines
# 131-215), with quantise_launch (matmul_plan.cpp:240-265): the same fp8 bits for y and yt, the
# same counts and amax, against formats.h's conversion; the strip kernel's column sums against
# float64. fp8 conversion: fp8.py (cuda_fp8.hpp's SATFINITE semantics, = formats.h).
import sys, random, math, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from common import *
from fp8 import to_bits, formats

kTile, kTileRows = 32, 8
kQuantiseThreads, kQuantiseCols, kQuantiseSubRows, kDbiasRows = 256, 64, 64, 256
def dbias_chunks(N): return (N + kDbiasRows - 1) // kDbiasRows if N > kDbiasRows else 1

class Map:
    def __init__(self, V):
        self.V = V
        self.kLanesPerRow = kQuantiseCols // V
        self.kRowsPerPass = kQuantiseThreads // self.kLanesPerRow
        self.kPasses = kQuantiseSubRows // self.kRowsPerPass
    def load_row(self, t, p): return p * self.kRowsPerPass + t // self.kLanesPerRow
    def load_col(self, t): return (t % self.kLanesPerRow) * self.V
    def tr_col(self, t): return ((t >> 5) & 1) * 32 + (t & 31) if 'strip_trcol' not in MUT else (t & 31) * 2 % 64
    def tr_row(self, t): return (t >> 6) * 16

def quantise_launch(rows, cols, elem_bytes, x_align, out_align, transposed):
    vec = 16 // elem_bytes
    strip = rows > 0 and cols % vec == 0 and x_align >= 16 and out_align >= 16 and (not transposed or rows % 16 == 0)
    if strip: return True, vec, max(1, (cols + kQuantiseCols - 1) // kQuantiseCols), dbias_chunks(rows)
    return False, 1, (cols + 31) // 32, (rows + 31) // 32

def mag_bits(v): return fbits(v) & 0x7FFFFFFF

def quantise_kernel(t, x, rows, cols, scale, y, yt, counters, amax, e4):
    tile = t.sh['tile']  # [32][33]
    c0, r0 = t.bx * kTile, t.by * kTile
    tx, ty = t.tx, t.ty
    maxf = 448.0 if e4 else 57344.0
    tally = Tally(); am = 0
    j = ty
    while j < kTile:
        r, c = r0 + j, c0 + tx
        if r < rows and c < cols:
            v = t.ld(x, r * cols + c)
            mag = mag_bits(v); am = max(am, mag)
            s = mul(v, scale)
            q = to_bits(s, e4)
            if y is not None: t.st(y, r * cols + c, q)
            t.shst(tile, j * 33 + tx, q)
            tally.add(s, 1.0 if (q & 0x7F) else 0.0, maxf)
        j += kTileRows
    if yt is not None:
        if 'elem_nosync' not in MUT: yield from syncthreads()
        j = ty
        while j < kTile:
            c, r = c0 + j, r0 + tx
            if r < rows and c < cols: t.st(yt, c * rows + r, t.shld(tile, tx * 33 + j))
            j += kTileRows
    if counters is not None: yield from tally.flush(t, counters)
    if amax is not None:
        am = yield from reduce_max_sync(am)
        if tx == 0 and am: t.atomic_max(amax, 0, am)

def quantise_strip_kernel(t, x, rows, cols, scale, y, yt, part, counters, amax, e4, V):
    M = Map(V)
    kRowsPerPass, kPasses = M.kRowsPerPass, M.kPasses
    kSubTiles = kDbiasRows // kQuantiseSubRows
    tile = t.sh['tile']        # [64][64] bytes
    colsums = t.sh['colsums']  # [kRowsPerPass][64] floats
    tid = t.tid
    lr, lc = M.load_row(tid, 0), M.load_col(tid)
    c0 = t.bx * kQuantiseCols
    rb = t.by * kDbiasRows
    c = c0 + lc
    col_ok = c < cols
    maxf = 448.0 if e4 else 57344.0
    sm = [0.0] * V
    tally = Tally(); am = 0
    for sub in range(kSubTiles):
        r0 = rb + sub * kQuantiseSubRows
        if r0 >= rows: break
        inp = [None] * kPasses
        for p in range(kPasses):
            r = r0 + M.load_row(tid, p)
            if col_ok and r < rows: inp[p] = t.ldv(x, r * cols + c, V)
        if yt is not None and sub > 0 and 'strip_nosync1' not in MUT: yield from syncthreads()
        for p in range(kPasses):
            tr = M.load_row(tid, p)
            r = r0 + tr
            if col_ok and r < rows:
                q = [0] * V
                for k in range(V):
                    v = inp[p][k]
                    mag = mag_bits(v); am = max(am, mag)
                    s = mul(v, scale)
                    q[k] = to_bits(s, e4)
                    tally.add(s, 1.0 if (q[k] & 0x7F) else 0.0, maxf)
                    if part is not None: sm[k] = add(sm[k], v)
                if y is not None: t.stv(y, r * cols + c, q)
                if yt is not None:
                    if (tr * 64 + lc) % V: t.L.err('misaligned shared pack store')
                    for k in range(V): t.shst(tile, tr * 64 + lc + k, q[k])
        if yt is not None:
            yield from syncthreads()
            tc, tr = M.tr_col(tid), M.tr_row(tid)
            cc, r = c0 + tc, r0 + tr
            if cc < cols and r < rows:
                o = [t.shld(tile, (tr + k) * 64 + tc) for k in range(16)]
                t.stv(yt, cc * rows + r, o)
    if part is not None:
        for k in range(V): t.shst(colsums, lr * 64 + lc + k, sm[k])
        yield from syncthreads()
        if tid < kQuantiseCols and c0 + tid < cols:
            s = 0.0
            for i in range(kRowsPerPass): s = add(s, t.shld(colsums, i * 64 + tid))
            t.st(part, t.by * cols + c0 + tid, s)
    if counters is not None: yield from tally.flush(t, counters)
    if amax is not None:
        am = yield from reduce_max_sync(am)
        if (tid & 31) == 0 and am: t.atomic_max(amax, 0, am)

def run(kind, x, rows, cols, scale, e4, want_y, want_yt, want_part, seed, errors, V=None):
    y = Buf('y', 'u8', rows * cols, None, base=256) if want_y else None
    yt = Buf('yt', 'u8', rows * cols, None, base=256 + 64 * 1024) if want_yt else None
    cnt = counters(); amax = Buf('amax', 'u32', 1, [0])
    part = None
    if kind == 'strip':
        gx, gy = max(1, (cols + 63) // 64), dbias_chunks(rows)
        part = Buf('part', 'f32', gy * cols) if want_part else None
        M = Map(V)
        launch('strip', quantise_strip_kernel, (gx, gy), (kQuantiseThreads, 1),
               (x, rows, cols, scale, y, yt, part, cnt, amax, e4, V), errors, seed,
               shared_spec=[('tile', 64 * 64), ('colsums', M.kRowsPerPass * 64)])
    else:
        launch('element', quantise_kernel, ((cols + 31) // 32, (rows + 31) // 32), (kTile, kTileRows),
               (x, rows, cols, scale, y, yt, cnt, amax, e4), errors, seed, shared_spec=[('tile', 32 * 33)])
    return y, yt, part, cnt, amax

def case(R, rows, cols, Tin, e4, scale, seed, want_y=True, want_yt=True, want_part=True, special=True):
    rng = random.Random(seed)
    fmt = 'e4m3' if e4 else 'e5m2'
    what = 'quantise %dx%d %s->%s scale=%g y=%d yt=%d part=%d' % (rows, cols, Tin, fmt, scale, want_y, want_yt, want_part)
    vals = rand_vals(rng, rows * cols, Tin, 30.0)
    if special:
        pool = [0.0, -0.0, 1e-9, -1e-7, 500.0, -470.0, 464.0 / scale, 6.2e4, -7e4, 1e-3, math.inf, -math.inf, math.nan]
        for i in range(0, rows * cols, 5): vals[i] = ROUND[Tin](f32(rng.choice(pool)))
    x = Buf('x', Tin, rows * cols, vals, base=256)
    V = 16 // ESIZE[Tin]
    strip, vec, gx, gy = quantise_launch(rows, cols, ESIZE[Tin], 256, 256, want_yt)
    R.check(strip == (cols % V == 0 and (not want_yt or rows % 16 == 0)), what + ': launch choice')
    # reference
    sv = [mul(v, scale) for v in vals]
    qref = [formats(fbits(s), e4) for s in sv]
    maxf = 448.0 if e4 else 57344.0
    over = sum(1 for s in sv if abs(s) > maxf and abs(s) <= FLT_MAX)
    under = sum(1 for s, q in zip(sv, qref) if s != 0.0 and s == s and (q & 0x7F) == 0)
    amref = max([mag_bits(v) for v in vals] + [0])
    outs = {}
    kinds = ['element'] + (['strip'] if cols % V == 0 and (not want_yt or rows % 16 == 0) else [])
    for kind in kinds:
        errs = []
        y, yt, part, cnt, amax = run(kind, x, rows, cols, scale, e4, want_y, want_yt, want_part and kind == 'strip', seed, errs, V)
        R.errors(errs, what + ' ' + kind)
        if want_y:
            writes_once(R, y, range(rows * cols), what + ' ' + kind + ' y')
            bad = [i for i in range(rows * cols) if y.data[i] != qref[i]]
            R.check(not bad, what + ' %s: y differs at %s' % (kind, bad[:4]))
        if want_yt:
            writes_once(R, yt, range(rows * cols), what + ' ' + kind + ' yt')
            bad = [(c, r) for c in range(cols) for r in range(rows) if yt.data[c * rows + r] != qref[r * cols + c]]
            R.check(not bad, what + ' %s: yt differs at %s' % (kind, bad[:4]))
        R.check(ctr(cnt) == (over, under), what + ' %s: counts %s, expected %s' % (kind, ctr(cnt), (over, under)))
        R.check(amax.data[0] == amref, what + ' %s: amax %#x, expected %#x' % (kind, amax.data[0], amref))
        outs[kind] = (y and y.data, yt and yt.data, ctr(cnt), amax.data[0])
        if part is not None:
            gy = dbias_chunks(rows)
            writes_once(R, part, range(gy * cols), what + ' part')
            for ch in range(gy):
                for cc in range(cols):
                    col = [vals[r * cols + cc] for r in range(ch * 256, min(rows, (ch + 1) * 256))]
                    got = part.data[ch * cols + cc]
                    if any(not math.isfinite(v) for v in col):
                        ok = (got != got) == any(v != v for v in col) or math.isinf(got) or got != got
                    else:
                        ref = math.fsum(col)
                        ok = abs(got - ref) <= (len(col) + 2) * EPS32 * sum(abs(v) for v in col) + 1e-45
                    if not R.check(ok, what + ': part[%d][%d] %r vs %r' % (ch, cc, got, math.fsum(col) if all(map(math.isfinite, col)) else 'nonfinite')): break
            # determinism of the sums (another schedule)
            errs = []
            _, _, part2, _, _ = run('strip', x, rows, cols, scale, e4, want_y, want_yt, True, seed + 77, errs, V)
            R.check([key(v) for v in part.data] == [key(v) for v in part2.data], what + ': part differs between schedules')
    if len(outs) == 2:
        R.check(outs['element'] == outs['strip'], what + ': element and strip kernels differ')
    return kinds

def main(which='all'):
    R = Report('quantise')
    t0 = time.time()
    cases = [  # rows, cols, Tin, e4, scale
        (48, 96, 'bf16', True, 1.0), (48, 96, 'f32', False, 0.5), (32, 16, 'f16', True, 4.0),
        (304, 72, 'f32', True, 2.0),  # two chunks, partial strip
        (272, 40, 'bf16', False, 1.0), (16, 8, 'bf16', True, 1.0),
        (40, 36, 'f32', True, 1.0),   # rows % 16 != 0 -> element kernel (with yt)
        (33, 20, 'bf16', False, 1.0), # cols % 8 != 0 -> element
    ]
    if which == 'quick': cases = cases[:2]
    n = 0
    for j, (rows, cols, Tin, e4, sc) in enumerate(cases):
        kinds = case(R, rows, cols, Tin, e4, f32(sc), 10 + j)
        n += len(kinds)
    # y only / yt only variants
    if which != 'quick':
        case(R, 48, 64, 'f32', True, 1.0, 40, want_yt=False, want_part=False)
        case(R, 64, 24, 'bf16', False, 1.0, 41, want_y=False, want_part=False)
        case(R, 20, 24, 'f16', True, 1.0, 42, want_yt=False, want_part=False)  # strip without yt, rows % 16 != 0
    print(R.summary(), '(%.0fs)' % (time.time() - t0))
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
