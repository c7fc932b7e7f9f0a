# matmul.cu transpose_bytes_kernel (lines 223-246 at 6e29cce, new in 5589148) and its launcher
# transpose_quantised (lines 472-482): yt (cols, rows) = x (rows, cols) transposed, bytes (an inp
# stored quantised, MatmulSpec::inp, to the wgrad GEMM's transposed copy). Tiles of 32 x 32 bytes
# through shared memory (tile[32][33]), blockDim (32, 8); grid x = ceil(cols / 32), grid y =
# min(row tiles, 65535) with a grid-stride loop over the row tiles, the tile reused across them
# (a __syncthreads after the loads and one after the stores).
# Checks: every yt element written exactly once with x's byte, x never written, no out-of-bounds
# access, no uninitialised or racing shared access (simt.py's per-interval race check: the tile's
# reuse needs the second barrier), for shapes that are not multiples of 32, single tiles, and
# many row tiles with the 65535 cap scaled down (1 to 4) so that the y loop runs several times;
# and the launcher's bytes against quantise_kernel's own transposed copy (quantise.py, element
# and strip kernels): transpose(quantise(x).y) == quantise(x).yt.
import sys, random, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from common import *

kTile, kTileRows = 32, 8
kGridYCap = 65535


def transpose_bytes_kernel(t, x, rows, cols, yt):
    tile = t.sh['tile']  # __shared__ uint8_t tile[kTile][kTile + 1]
    c0 = t.bx * kTile
    tx, ty = t.tx, t.ty
    r0 = t.by * kTile
    while r0 < rows:
        j = ty
        while j < kTile:
            r, c = r0 + j, c0 + tx
            if r < rows and c < cols: t.shst(tile, j * (kTile + 1) + tx, t.ld(x, r * cols + c))
            j += kTileRows
        if 'tr_nosync1' not in MUT: yield from syncthreads()
        j = ty
        while j < kTile:
            c, r = c0 + j, r0 + tx  # yt[c][r] = tile[r - r0][c - c0]
            ok = (r < rows or 'tr_store_noguard_r' in MUT) and c < cols
            if ok:
                ti = j * (kTile + 1) + tx if 'tr_notrans' in MUT else tx * (kTile + 1) + j
                t.st(yt, c * rows + r, t.shld(tile, ti))
            j += kTileRows
        if 'tr_nosync2' not in MUT: yield from syncthreads()  # the tile is refilled next
        r0 += (t.gdim[0] if 'tr_ystride_x' in MUT else t.gdim[1]) * kTile


def transpose_grid(rows, cols, cap=kGridYCap):
    row_tiles = (rows + kTile - 1) // kTile
    gx = (cols + kTile - 1) // kTile if 'tr_grid_x_floor' not in MUT else cols // kTile
    gy = min(row_tiles, cap) if 'tr_grid_y_floor' not in MUT else min(rows // kTile, cap)
    return gx, gy


def transpose_quantised(x, rows, cols, yt, errors, seed=0, cap=kGridYCap):
    """The launcher: nothing for no rows or columns. Returns the grid (None: no launch)."""
    if rows == 0 or cols == 0: return None
    gx, gy = transpose_grid(rows, cols, cap)
    launch('transpose', transpose_bytes_kernel, (gx, gy), (kTile, kTileRows),
           (x, rows, cols, yt), errors, seed, shared_spec=[('tile', kTile * (kTile + 1))])
    return gx, gy


def case(R, rows, cols, seed, cap=kGridYCap):
    rng = random.Random(seed)
    what = 'transpose %dx%d cap=%d' % (rows, cols, cap)
    n = rows * cols
    xv = [rng.randrange(256) for _ in range(n)]
    res = []
    for sd in (seed, seed + 31):
        x = Buf('x', 'u8', n, xv, base=256)
        yt = Buf('yt', 'u8', n, None, base=256 + 64 * 1024 + 3)  # any alignment: byte accesses
        errs = []
        g = transpose_quantised(x, rows, cols, yt, errs, sd, cap)
        R.errors(errs, what + ' seed %d' % sd)
        res.append((x, yt, g))
    x, yt, g = res[0]
    if n == 0:
        R.check(g is None, what + ': launched for an empty matrix')
        return 0
    gx, gy = g
    row_tiles = (rows + kTile - 1) // kTile
    R.check(gx * kTile >= cols and gy <= cap and gy >= 1, what + ': grid %s' % (g,))
    writes_once(R, yt, range(n), what + ' yt')
    R.check(all(w == 0 for w in x.writes), what + ': x written')
    bad = [(c, r) for c in range(cols) for r in range(rows) if yt.data[c * rows + r] != xv[r * cols + c]]
    R.check(not bad, what + ': yt[c][r] != x[r][c] at (c, r) %s' % bad[:4])
    R.check(res[1][1].data == yt.data, what + ': differs between schedules')
    return (row_tiles + gy - 1) // gy if gy else 0  # y-loop trips of block y = 0


def vs_quantise(R, rows, cols, Tin, e4, scale, seed, cap=kGridYCap):
    """transpose_quantised of quantise's y against the quantise kernels' yt (a cache written by
    the pass that quantises inp, and one written from an inp stored quantised: the same bytes)."""
    import quantise
    rng = random.Random(seed)
    what = 'transpose vs quantise %dx%d %s e4m3=%s cap=%d' % (rows, cols, Tin, e4, cap)
    vals = rand_vals(rng, rows * cols, Tin, 30.0, special=True)
    x = Buf('x', Tin, rows * cols, vals, base=256)
    V = 16 // ESIZE[Tin]
    kinds = ['element'] + (['strip'] if cols % V == 0 and rows % 16 == 0 else [])
    for kind in kinds:
        errs = []
        y, yt, _, _, _ = quantise.run(kind, x, rows, cols, scale, e4, True, True, False, seed, errs, V)
        R.errors(errs, what + ' quantise ' + kind)
        y8 = Buf('y', 'u8', rows * cols, y.data, base=256)
        t8 = Buf('yt2', 'u8', rows * cols, None, base=4096)
        errs = []
        transpose_quantised(y8, rows, cols, t8, errs, seed + 5, cap)
        R.errors(errs, what + ' transpose')
        bad = [i for i in range(rows * cols) if t8.data[i] != yt.data[i]]
        R.check(not bad, what + ': transposed y differs from the %s kernel\'s yt at %s' % (kind, bad[:4]))


def main(which='all'):
    R = Report('transpose')
    t0 = time.time()
    shapes = [(1, 1, kGridYCap), (1, 40, kGridYCap), (40, 1, kGridYCap), (32, 32, kGridYCap),
              (33, 31, kGridYCap), (31, 33, kGridYCap), (64, 64, kGridYCap), (65, 97, kGridYCap),
              (5, 300, kGridYCap), (100, 47, kGridYCap), (0, 7, kGridYCap), (7, 0, kGridYCap),
              # the 65535 cap scaled down: the y loop runs 2 to 8 times
              (200, 40, 2), (200, 40, 3), (97, 33, 1), (1000, 3, 4), (64, 70, 1), (161, 32, 2)]
    if which == 'quick': shapes = [s for s in shapes if s[2] != kGridYCap][:4] + [(33, 31, kGridYCap)]
    trips = {}
    for k, (rows, cols, cap) in enumerate(shapes):
        tr = case(R, rows, cols, 10 + k, cap)
        trips[tr] = trips.get(tr, 0) + 1
    vq = [(48, 96, 'bf16', True, 1.0, kGridYCap), (40, 36, 'f32', False, 0.5, kGridYCap),
          (64, 40, 'f16', True, 2.0, 1), (33, 20, 'bf16', False, 1.0, 1)]
    if which == 'quick': vq = vq[2:3]
    for k, (rows, cols, Tin, e4, sc, cap) in enumerate(vq):
        vs_quantise(R, rows, cols, Tin, e4, f32(sc), 70 + k, cap)
    print(R.summary(), '(%.0fs; %d shapes, y-loop trips of block y 0: %s)' % (
        time.time() - t0, len(shapes), dict(sorted(trips.items()))))
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
