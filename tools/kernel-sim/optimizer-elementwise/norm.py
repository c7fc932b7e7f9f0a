# norm.cu: sum_squares_kernel<S> (lines 29-67) with launch() (69-74) and the host's sum over
# the chunks (78-102), against CpuBackend::sum_squares (cpu_precision.cpp:628-655): every
# chunk's fp64 partial bit for bit, and the total. The kernel's warps synchronise with
# __syncwarp, which simt.launch models (a shared access ordered by one is no race).
# kChunk is shrunk to 64 or 96 elements (a multiple of 32, as the real 2^14 is) so that a few
# thousand elements span many chunks, warps and blocks; two cases run the real 2^14.
# Usage: python3 norm.py [quick]
import sys, time, random
import _path  # noqa: F401
from common import *

kNormBlock = 64
kNormWarps = kNormBlock // 32

def widen_f32(S, b):  # to_float(x) for the formats, x itself for float: exact in fp64 too
    return from_bits(TO_F32[S](b))

def sum_squares_kernel(t, S, x, n, nchunks, partial, kChunk):
    tile = t.sh['tile']                        # [kNormWarps][32][33]
    lane, warp = t.tx & 31, t.tx >> 5
    if 'norm_first_nowarp' in MUT: first = t.bx * kNormWarps * 32
    else: first = (t.bx * kNormWarps + warp) * 32
    mine = first + lane
    T0 = warp * 32 * 33                        # tile[warp]
    def has(off): return off < kChunk and first * kChunk + off < n
    nxt = [None] * 32
    def fetch(off):
        for j in range(32):
            c = first + j
            i = c * kChunk + off + lane
            guard = (c < nchunks) if 'norm_fetch_noguard' in MUT else (c < nchunks and i < n)
            nxt[j] = widen_f32(S, ldb(t, x, i)) if guard else 0.0
    if has(0): fetch(0)
    s = 0.0
    off = 0
    while has(off):
        for j in range(32): t.shst(tile, T0 + j * 33 + lane, nxt[j])
        if 'norm_nosync1' not in MUT: yield ('syncwarp',)
        if has(off + 32): fetch(off + 32)
        if mine < nchunks:
            left = n - (mine * kChunk + off)
            m = (0 if left < 0 else left) if left < 32 else 32
            if 'norm_m31' in MUT: m = min(m, 31)
            for k in range(m):
                if 'norm_tile_transpose' in MUT: v = t.shld(tile, T0 + k * 33 + lane)
                else: v = t.shld(tile, T0 + lane * 33 + k)
                if 'norm_f32_square' in MUT: s = s + f32(v * v)
                else: s = s + v * v           # __dadd_rn(s, __dmul_rn(v, v)): v*v is exact
        if 'norm_nosync2' not in MUT: yield ('syncwarp',)
        off += 32
    if mine < nchunks: t.st(partial, mine, s)

def blocks_for(n, per):
    return max(1, (n + per - 1) // per)

def gpu_sum_squares(S, bits, kChunk, seed=0):
    n = len(bits)
    nchunks = (n + kChunk - 1) // kChunk
    x = bitbuf('x', S, bits)
    partial = Buf('partial', 'f64', nchunks, None)
    warps = (nchunks + 31) // 32
    grid = blocks_for(warps, kNormWarps)
    if 'norm_grid_floor' in MUT: grid = max(1, warps // kNormWarps)
    errs = []
    launch('sum_squares', sum_squares_kernel, (grid, 1), (kNormBlock, 1),
           (S, x, n, nchunks, partial, kChunk), errs, seed,
           shared_spec=[('tile', kNormWarps * 32 * 33)])
    host = list(partial.data)   # cudaMemcpyAsync of nchunks partials
    total = 0.0
    for c in range(nchunks):
        if host[c] is None:
            errs.append('host reads partial[%d], never written' % c); total = float('nan'); continue
        total += host[c]
    if 'norm_host_pairwise' in MUT and nchunks > 2:
        total = math.fsum(h for h in host if h is not None)
    return host, total, partial, errs, grid

def cpu_sum_squares(S, bits, kChunk):
    n = len(bits)
    nchunks = (n + kChunk - 1) // kChunk
    partial = []
    for c in range(nchunks):
        s = 0.0
        for i in range(c * kChunk, min(n, (c + 1) * kChunk)):
            v = from_bits(CPU_WIDEN[S](bits[i])) if S != 'f32' else from_bits(bits[i])  # widen_one
            s += v * v
        partial.append(s)
    total = 0.0
    for s in partial: total += s
    return partial, total

def f64_same(a, b):
    if a is None or b is None: return a is b
    if a != a and b != b: return True   # NaN by kind (payloads differ between x86 and the GPU)
    return f64bits(a) == f64bits(b)

def case(R, S, n, kChunk, seed, special=0.0, spread=False):
    rng = random.Random(seed)
    what = 'sum_squares %s n=%d kChunk=%d' % (S, n, kChunk)
    if S in ('e4m3', 'e5m2'):
        bits = [rng.getrandbits(8) if rng.random() < 0.7 else FROM_F32[S](fbits(f32(rng.gauss(0, 3)))) for _ in range(n)]
        if special == 0.0:   # no NaN (e4m3 0x7F/0xFF, e5m2 0x7D-0x7F/0xFD-0xFF) or inf
            bits = [b & 0x3F if (TO_F32[S](b) & ABS) >= INF else b for b in bits]
    elif spread:   # magnitudes over many binades: the order of the fp64 additions matters
        bits = [FROM_F32[S](fbits(f32(rng.gauss(0, 1) * 2.0 ** rng.randint(-30, 30)))) for _ in range(n)]
    else:
        bits = rand_bits(rng, n, S, 1.0, special)
    host, total, partial, errs, grid = gpu_sum_squares(S, bits, kChunk, seed)
    R.errors(errs, what)
    writes_once(R, partial, what)
    ep, et = cpu_sum_squares(S, bits, kChunk)
    bad = [c for c in range(len(ep)) if not f64_same(host[c], ep[c])]
    R.check(not bad, '%s: partials differ at chunks %s (got %s, CPU %s)' % (what, bad[:3], [host[c] for c in bad[:2]], [ep[c] for c in bad[:2]]))
    R.check(f64_same(total, et), '%s: total %r, CPU %r' % (what, total, et))
    # float64 sanity: within the error of the fp64 sums
    if et == et and et not in (float('inf'),):
        ref = math.fsum(from_bits(TO_F32[S](b)) ** 2 for b in bits)
        R.check(abs(et - ref) <= 1e-12 * ref + 1e-300, '%s: CPU order %r vs exact %r' % (what, et, ref))
    return len(ep), grid

def main(which='all'):
    R = Report('sum_squares')
    t0 = time.time()
    cases = []
    s = 300
    for S in ('f32', 'bf16', 'f16', 'e4m3', 'e5m2'):
        for n, K in ((1, 64), (17, 64), (31, 32), (64, 64), (65, 64), (1000, 96), (2113, 64),
                     (2048 + 64 * 3 + 5, 64), (4100, 32), (64 * 70 - 3, 64)):
            s += 1
            cases.append(dict(S=S, n=n, kChunk=K, seed=s, special=(0.03 if s % 3 == 0 else 0.0),
                              spread=(s % 3 == 1)))
    # the real chunk: 3 chunks (one warp), and 41 (both warps of the block; ~12 s)
    cases.append(dict(S='f32', n=2 * 16384 + 1234, kChunk=16384, seed=999, spread=True))
    cases.append(dict(S='bf16', n=40 * 16384 + 77, kChunk=16384, seed=998, special=0.01))
    if which == 'quick':
        cases = [c for c in cases if c['n'] in (17, 65, 2113, 4100)]
    shapes = set()
    for c in cases:
        nch, grid = case(R, **c)
        shapes.add((nch, grid))
    print(R.summary(), '(%.0fs; %d cases; (chunks, blocks) seen: %s)' % (time.time() - t0, len(cases), sorted(shapes)))
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
