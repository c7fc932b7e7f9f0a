# Pure-Python emulator of src/backend/cuda/flash_attention.cu (forward, backward dq, backward dk/dv)
# following the kernel code per block / warp / lane. mma.sync m16n8k16 and ldmatrix x4(.trans)
# are emulated from the PTX ISA definitions (not from flash_fragments.h); the index formulas of
# flash_fragments.h are transcribed verbatim and used where the kernel uses them.
import math, struct

# ---------------------------------------------------------------- number formats
_F = struct.Struct('<f')
_I = struct.Struct('<I')


def f32(x):
    """round a Python float to fp32 (RNE)."""
    try:
        return _F.unpack(_F.pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def f32_bits(x):
    return _I.unpack(_F.pack(f32(x)))[0]


class BF16:
    name = 'bf16'

    def __init__(self):
        self.tab = [_F.unpack(_I.pack(b << 16))[0] for b in range(65536)]

    def enc(self, x):  # __float2bfloat16_rn of an fp32 value
        u = f32_bits(x)
        if (u & 0x7F800000) == 0x7F800000 and (u & 0x7FFFFF):
            return (u >> 16) | 0x40
        u += 0x7FFF + ((u >> 16) & 1)
        return (u >> 16) & 0xFFFF

    def dec(self, b):
        return self.tab[b]


class F16:
    name = 'f16'
    _H = struct.Struct('<e')
    _S = struct.Struct('<H')

    def __init__(self):
        self.tab = [self._H.unpack(self._S.pack(b))[0] for b in range(65536)]

    def enc(self, x):  # __float2half_rn of an fp32 value
        x = f32(x)
        try:
            return self._S.unpack(self._H.pack(x))[0]
        except OverflowError:
            return 0x7C00 if x > 0 else 0xFC00

    def dec(self, b):
        return self.tab[b]


FMT = {'bf16': BF16(), 'f16': F16()}

# ---------------------------------------------------------------- constants (attention_plan.h)
kTile = 64
kWarpsPerBlock = kTile // 16
kThreads = kWarpsPerBlock * 32
kTileBlocks = kTile // 8


def flash_head_tile(HS):
    assert 1 <= HS <= 128
    return 32 if HS <= 32 else 64 if HS <= 64 else 128


def flash_tiles(T):
    return (T + kTile - 1) // kTile


# ---------------------------------------------------------------- flash_fragments.h (verbatim)
def ldsm_rows_row(lane, n0): return n0 + (lane & 7) + 8 * (lane >> 4)
def ldsm_rows_col(lane, k0): return k0 + 8 * ((lane >> 3) & 1)
def ldsm_cols_row(lane, k0): return k0 + (lane & 15)
def ldsm_cols_col(lane, n0): return n0 + 8 * (lane >> 4)
def acc_half(r): return r >> 1
def acc_index(r, h): return 2 * (r & 1) + h
def acc_row(g, i): return g + 8 * (i >> 1)
def acc_col(c, i): return 2 * c + (i & 1)


class EmuError(Exception):
    pass


# ---------------------------------------------------------------- shared memory with race checks
class Barrier:
    def __init__(self):
        self.phase = 0

    def sync(self):
        self.phase += 1


class Smem:
    """16-bit (or float) shared array; uninitialised = None; RAW/WAR/WAW race detection between
    different threads within one barrier interval."""

    def __init__(self, n, bar, name):
        self.v = [None] * n
        self.wph = [-1] * n
        self.wtid = [-1] * n
        self.rph = [-1] * n
        self.rtid = [-1] * n
        self.bar = bar
        self.name = name
        self.n = n

    def read(self, a, tid):
        if not (0 <= a < self.n):
            raise EmuError(f'{self.name}: read out of bounds {a}/{self.n}')
        ph = self.bar.phase
        if self.wph[a] == ph and self.wtid[a] != tid:
            raise EmuError(f'{self.name}[{a}] RAW race: written by {self.wtid[a]} read by {tid}')
        if self.rph[a] == ph:
            if self.rtid[a] != tid:
                self.rtid[a] = -2
        else:
            self.rph[a] = ph
            self.rtid[a] = tid
        x = self.v[a]
        if x is None:
            raise EmuError(f'{self.name}[{a}] read uninitialised (thread {tid})')
        return x

    def write(self, a, x, tid):
        if not (0 <= a < self.n):
            raise EmuError(f'{self.name}: write out of bounds {a}/{self.n}')
        ph = self.bar.phase
        if self.rph[a] == ph and self.rtid[a] != tid:
            raise EmuError(f'{self.name}[{a}] WAR race: read by {self.rtid[a]} written by {tid}')
        if self.wph[a] == ph and self.wtid[a] != tid:
            raise EmuError(f'{self.name}[{a}] WAW race')
        self.wph[a] = ph
        self.wtid[a] = tid
        self.v[a] = x


class Gmem:
    """global array; reads bounds-checked; writes counted."""

    def __init__(self, data, name):
        self.v = data
        self.name = name
        self.writes = [0] * len(data)

    def read(self, a):
        if not (0 <= a < len(self.v)):
            raise EmuError(f'{self.name}: global read out of bounds {a}/{len(self.v)}')
        x = self.v[a]
        if x is None:
            raise EmuError(f'{self.name}[{a}] read before written')
        return x

    def write(self, a, x):
        if not (0 <= a < len(self.v)):
            raise EmuError(f'{self.name}: global write out of bounds {a}/{len(self.v)}')
        self.v[a] = x
        self.writes[a] += 1


# ---------------------------------------------------------------- PTX instructions
def word(sm, idx, tid):
    """flash::word: a 32-bit shared load of t[idx], t[idx+1] (4-byte aligned)."""
    if idx % 2:
        raise EmuError(f'{sm.name}: misaligned 32-bit load at element {idx}')
    return sm.read(idx, tid) | (sm.read(idx + 1, tid) << 16)


def ldsm_x4(sm, addrs, trans, warp):
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 per the PTX ISA: lanes 8i..8i+7 give the
    row addresses (16-byte aligned rows of 8 b16) of matrix i; without .trans lane l receives in
    register i row l/4, elements 2(l%4), 2(l%4)+1 of matrix i; with .trans it receives elements
    [row 2(l%4)][col l/4] and [row 2(l%4)+1][col l/4]."""
    mats = []
    for i in range(4):
        rows = []
        for r in range(8):
            lane = 8 * i + r
            a = addrs[lane]
            if a % 8:
                raise EmuError(f'{sm.name}: ldmatrix row address not 16-byte aligned: {a}')
            if a < 0 or a + 8 > sm.n:
                raise EmuError(f'{sm.name}: ldmatrix row out of bounds {a}')
            rows.append([sm.read(a + j, warp * 32 + lane) for j in range(8)])
        mats.append(rows)
    out = []
    for l in range(32):
        g, c = l >> 2, l & 3
        regs = []
        for i in range(4):
            M = mats[i]
            if trans:
                lo, hi = M[2 * c][g], M[2 * c + 1][g]
            else:
                lo, hi = M[g][2 * c], M[g][2 * c + 1]
            regs.append(lo | (hi << 16))
        out.append(regs)
    return out


def _half(reg, h):
    return (reg >> (16 * h)) & 0xFFFF


MMA_COUNT = [0]


def mma(fmt, d, a, b0, b1):
    """mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32: d (32 lanes x 4 floats) in place,
    a (32 lanes x 4 regs), b0, b1 (32 lanes, 1 reg each). Fragment maps from the PTX ISA table
    (groupID = lane>>2, threadID_in_group = lane%4):
      A a_i (i=0..7, packed 2 per reg): row = gid for i<2 or 4<=i<6, else gid+8;
                                        col = 2*tig + (i&1) (+8 for i>=4)
      B b_i (i=0..3): row = 2*tig + (i&1) (+8 for i>=2); col = gid
      C/D c_i (i=0..3): row = gid (+8 for i>=2); col = 2*tig + (i&1)"""
    MMA_COUNT[0] += 1
    dec = fmt.dec
    A = [[None] * 16 for _ in range(16)]
    B = [[None] * 8 for _ in range(16)]
    C = [[None] * 8 for _ in range(16)]
    for l in range(32):
        gid, tig = l >> 2, l & 3
        for i in range(8):
            row = gid if (i < 2 or 4 <= i < 6) else gid + 8
            col = 2 * tig + (i & 1) + (8 if i >= 4 else 0)
            A[row][col] = dec(_half(a[l][i >> 1], i & 1))
        breg = (b0[l], b1[l])
        for i in range(4):
            row = 2 * tig + (i & 1) + (8 if i >= 2 else 0)
            B[row][gid] = dec(_half(breg[i >> 1], i & 1))
        for i in range(4):
            row = gid + (8 if i >= 2 else 0)
            col = 2 * tig + (i & 1)
            C[row][col] = d[l][i]
    for row in A:
        assert None not in row
    for row in B:
        assert None not in row
    # D = A.B + C, products exact, sum rounded once to fp32
    Bt = [[B[k][n] for k in range(16)] for n in range(8)]
    D = [[f32(math.fsum([C[m][n]] + [x * y for x, y in zip(A[m], Bt[n])])) for n in range(8)]
         for m in range(16)]
    for l in range(32):
        gid, tig = l >> 2, l & 3
        for i in range(4):
            d[l][i] = D[gid + (8 if i >= 2 else 0)][2 * tig + (i & 1)]


def shfl_xor(vals, m):
    return [vals[l ^ m] for l in range(32)]


def quad_sum(v):  # v: 32 lanes
    t = shfl_xor(v, 1)
    v = [f32(x + y) for x, y in zip(v, t)]
    t = shfl_xor(v, 2)
    return [f32(x + y) for x, y in zip(v, t)]


def fmaxf(a, b):
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return a if a >= b else b


def quad_max(v):
    t = shfl_xor(v, 1)
    v = [fmaxf(x, y) for x, y in zip(v, t)]
    t = shfl_xor(v, 2)
    return [fmaxf(x, y) for x, y in zip(v, t)]


def expf(x):
    try:
        return f32(math.exp(x))
    except OverflowError:
        return math.inf


def logf(x):
    return f32(math.log(x)) if x > 0 else (-math.inf if x == 0 else math.nan)


# ---------------------------------------------------------------- kernel helpers
class Shape:
    def __init__(self, HSP):
        self.HSP = HSP
        self.LD = HSP + 8
        self.KS = HSP // 16
        self.NB = HSP // 8
        self.kElems = kTile * self.LD


def load_tile(S, fmt, tile, src, src_off, W, row0, T, HS, vec):
    """all kThreads threads, in thread order (writes only, so order is irrelevant)."""
    LD, HSP = S.LD, S.HSP
    zero = fmt.enc(0.0)
    if vec:
        kChunks = HSP // 8
        for tid in range(kThreads):
            for i in range(tid, kTile * kChunks, kThreads):
                r, e = i // kChunks, (i % kChunks) * 8
                t = row0 + r
                v = [0] * 8
                if t < T and e < HS:
                    ga = src_off + t * W + e
                    if ga % 8:
                        raise EmuError('vector global load not 16-byte aligned')
                    v = [src.read(ga + j) for j in range(8)]
                ta = r * LD + e
                if ta % 8:
                    raise EmuError('vector shared store not 16-byte aligned')
                for j in range(8):
                    tile.write(ta + j, v[j], tid)
        return
    for tid in range(kThreads):
        for i in range(tid, kTile * HSP, kThreads):
            r, e = i // HSP, i % HSP
            t = row0 + r
            tile.write(r * LD + e, src.read(src_off + t * W + e) if (t < T and e < HS) else zero,
                       tid)


def pack_rounded(fmt, lo, hi):
    return fmt.enc(lo) | (fmt.enc(hi) << 16)


def acc_to_a(fmt, lo, hi):
    a = []
    for r in range(4):
        half = hi if acc_half(r) else lo
        a.append(pack_rounded(fmt, half[acc_index(r, 0)], half[acc_index(r, 1)]))
    return a


def product_with_rows(S, fmt, x, tile, warp):
    """x: per lane [KS][4] regs; returns s: per lane [kTileBlocks][4]."""
    LD = S.LD
    s = [[[0.0] * 4 for _ in range(kTileBlocks)] for _ in range(32)]
    for nb in range(0, kTileBlocks, 2):
        for ks in range(S.KS):
            addrs = [ldsm_rows_row(l, nb * 8) * LD + ldsm_rows_col(l, ks * 16) for l in range(32)]
            b = ldsm_x4(tile, addrs, False, warp)
            a = [x[l][ks] for l in range(32)]
            d0 = [s[l][nb] for l in range(32)]
            d1 = [s[l][nb + 1] for l in range(32)]
            mma(fmt, d0, a, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
            mma(fmt, d1, a, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
    return s


def accumulate_with_cols(S, fmt, acc, p, tile, warp):
    """acc: per lane [NB][4] floats (in place); p: per lane [kTileBlocks][4]."""
    LD = S.LD
    for kk in range(kTile // 16):
        a = [acc_to_a(fmt, p[l][2 * kk], p[l][2 * kk + 1]) for l in range(32)]
        for nb in range(0, S.NB, 2):
            addrs = [ldsm_cols_row(l, kk * 16) * LD + ldsm_cols_col(l, nb * 8) for l in range(32)]
            b = ldsm_x4(tile, addrs, True, warp)
            d0 = [acc[l][nb] for l in range(32)]
            d1 = [acc[l][nb + 1] for l in range(32)]
            mma(fmt, d0, a, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
            mma(fmt, d1, a, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])


def frag_a(S, tile, r0, k0, g, c, tid):
    LD = S.LD
    return [word(tile, (r0 + g) * LD + k0 + 2 * c, tid),
            word(tile, (r0 + g + 8) * LD + k0 + 2 * c, tid),
            word(tile, (r0 + g) * LD + k0 + 2 * c + 8, tid),
            word(tile, (r0 + g + 8) * LD + k0 + 2 * c + 8, tid)]


def rows_as_fragments(S, tile, warp):
    out = []
    for l in range(32):
        g, c = l >> 2, l & 3
        out.append([frag_a(S, tile, warp * 16, ks * 16, g, c, warp * 32 + l) for ks in range(S.KS)])
    return out


def recomputed_prob(s, scale, lse):
    return expf(f32(f32(s * scale) - lse))


def score_grad(p, dp, D, scale):
    return f32(f32(p * f32(dp - D)) * scale)


def store_rows(S, dst, acc_l, row, div, b, T, W, off, HS, c):
    for r in range(2):
        if row[r] >= T:
            continue
        base = (b * T + row[r]) * W + off
        for nb in range(S.NB):
            for j in range(2):
                e = nb * 8 + acc_col(c, j)
                if e < HS:
                    dst.write(base + e, f32(acc_l[nb][2 * r + j] / div[r]))


# ---------------------------------------------------------------- kernels
def flash_forward_block(fmt, S, bx, by, gy, qkv, out, lse, T, NH, HS, scale, vec):
    bar = Barrier()
    sK = Smem(S.kElems, bar, 'sK')
    sV = Smem(S.kElems, bar, 'sV')
    bh = bx
    b, h = bh // NH, bh % NH
    qt = gy - 1 - by
    C = NH * HS
    W = 3 * C
    q0 = qt * kTile
    base = b * T * W + h * HS

    load_tile(S, fmt, sK, qkv, base, W, q0, T, HS, vec)
    bar.sync()
    qf = [rows_as_fragments(S, sK, w) for w in range(kWarpsPerBlock)]
    bar.sync()

    row = [[(q0 + w * 16 + acc_row(l >> 2, 0), q0 + w * 16 + acc_row(l >> 2, 2)) for l in range(32)]
           for w in range(kWarpsPerBlock)]
    m = [[[-math.inf, -math.inf] for _ in range(32)] for _ in range(kWarpsPerBlock)]
    lsum = [[[0.0, 0.0] for _ in range(32)] for _ in range(kWarpsPerBlock)]
    o = [[[[0.0] * 4 for _ in range(S.NB)] for _ in range(32)] for _ in range(kWarpsPerBlock)]

    for kt in range(qt + 1):
        load_tile(S, fmt, sK, qkv, base + C, W, kt * kTile, T, HS, vec)
        load_tile(S, fmt, sV, qkv, base + 2 * C, W, kt * kTile, T, HS, vec)
        bar.sync()
        for w in range(kWarpsPerBlock):
            s = product_with_rows(S, fmt, qf[w], sK, w)
            mx = [[-math.inf, -math.inf] for _ in range(32)]
            for l in range(32):
                c = l & 3
                for nb in range(kTileBlocks):
                    for i in range(4):
                        r = i >> 1
                        col = kt * kTile + nb * 8 + acc_col(c, i)
                        v = f32(s[l][nb][i] * scale)
                        if col > row[w][l][r] or col >= T:
                            v = -math.inf
                        s[l][nb][i] = v
                        mx[l][r] = fmaxf(mx[l][r], v)
            for r in range(2):
                qm = quad_max([mx[l][r] for l in range(32)])
                for l in range(32):
                    mn = fmaxf(m[w][l][r], qm[l])
                    alpha = expf(m[w][l][r] - mn)
                    m[w][l][r] = mn
                    lsum[w][l][r] = f32(lsum[w][l][r] * alpha)
                    for nb in range(S.NB):
                        o[w][l][nb][2 * r] = f32(o[w][l][nb][2 * r] * alpha)
                        o[w][l][nb][2 * r + 1] = f32(o[w][l][nb][2 * r + 1] * alpha)
            for l in range(32):
                for nb in range(kTileBlocks):
                    for i in range(4):
                        p = expf(f32(s[l][nb][i] - m[w][l][i >> 1]))
                        s[l][nb][i] = p
                        lsum[w][l][i >> 1] = f32(lsum[w][l][i >> 1] + p)
            accumulate_with_cols(S, fmt, o[w], s, sV, w)
        bar.sync()

    for w in range(kWarpsPerBlock):
        for r in range(2):
            qs = quad_sum([lsum[w][l][r] for l in range(32)])
            for l in range(32):
                lsum[w][l][r] = qs[l]
        for l in range(32):
            c = l & 3
            if c == 0:
                for r in range(2):
                    if row[w][l][r] < T:
                        lse.write(bh * T + row[w][l][r], f32(m[w][l][r] + logf(lsum[w][l][r])))
            store_rows(S, out, o[w][l], row[w][l], lsum[w][l], b, T, C, h * HS, HS, c)


def stage_two(S, fmt, ta, tb, a, aoff, wa, bsrc, boff, wb, row0, T, HS, vec, bar):
    load_tile(S, fmt, ta, a, aoff, wa, row0, T, HS, vec)
    load_tile(S, fmt, tb, bsrc, boff, wb, row0, T, HS, vec)
    bar.sync()
    fa = [rows_as_fragments(S, ta, w) for w in range(kWarpsPerBlock)]
    fb = [rows_as_fragments(S, tb, w) for w in range(kWarpsPerBlock)]
    bar.sync()
    return fa, fb


def flash_backward_dq_block(fmt, S, bx, by, gy, qkv, dout, lse, Dsum, dqkv, T, NH, HS, scale, vec):
    bar = Barrier()
    sK = Smem(S.kElems, bar, 'sK')
    sV = Smem(S.kElems, bar, 'sV')
    bh = bx
    b, h = bh // NH, bh % NH
    qt = gy - 1 - by
    C = NH * HS
    W = 3 * C
    q0 = qt * kTile
    base = b * T * W + h * HS
    gbase = b * T * C + h * HS
    qf, gf = stage_two(S, fmt, sK, sV, qkv, base, W, dout, gbase, C, q0, T, HS, vec, bar)

    NW = kWarpsPerBlock
    row = [[(q0 + w * 16 + acc_row(l >> 2, 0), q0 + w * 16 + acc_row(l >> 2, 2)) for l in range(32)]
           for w in range(NW)]
    lr = [[[lse.read(bh * T + row[w][l][r]) if row[w][l][r] < T else 0.0 for r in range(2)]
           for l in range(32)] for w in range(NW)]
    D = [[[0.0, 0.0] for _ in range(32)] for _ in range(NW)]
    dq = [[[[0.0] * 4 for _ in range(S.NB)] for _ in range(32)] for _ in range(NW)]

    for pas in range(2):
        for kt in range(qt + 1):
            load_tile(S, fmt, sK, qkv, base + C, W, kt * kTile, T, HS, vec)
            load_tile(S, fmt, sV, qkv, base + 2 * C, W, kt * kTile, T, HS, vec)
            bar.sync()
            for w in range(NW):
                s = product_with_rows(S, fmt, qf[w], sK, w)
                dp = product_with_rows(S, fmt, gf[w], sV, w)
                for l in range(32):
                    c = l & 3
                    for nb in range(kTileBlocks):
                        for i in range(4):
                            r = i >> 1
                            col = kt * kTile + nb * 8 + acc_col(c, i)
                            valid = col <= row[w][l][r] and col < T
                            p = recomputed_prob(s[l][nb][i], scale, lr[w][l][r]) if valid else 0.0
                            if pas == 0:
                                D[w][l][r] = f32(D[w][l][r] + f32(p * dp[l][nb][i]))
                            else:
                                s[l][nb][i] = score_grad(p, dp[l][nb][i], D[w][l][r], scale) \
                                    if valid else 0.0
                if pas == 1:
                    accumulate_with_cols(S, fmt, dq[w], s, sK, w)
            bar.sync()
        if pas == 0:
            for w in range(NW):
                for r in range(2):
                    qs = quad_sum([D[w][l][r] for l in range(32)])
                    for l in range(32):
                        D[w][l][r] = qs[l]

    for w in range(NW):
        for l in range(32):
            c = l & 3
            if c == 0:
                for r in range(2):
                    if row[w][l][r] < T:
                        Dsum.write(bh * T + row[w][l][r], D[w][l][r])
            store_rows(S, dqkv, dq[w][l], row[w][l], (1.0, 1.0), b, T, W, h * HS, HS, c)


def flash_backward_dkv_block(fmt, S, bx, by, gy, qkv, dout, lse, Dsum, dqkv, T, NH, HS, scale,
                             vec):
    bar = Barrier()
    sQ = Smem(S.kElems, bar, 'sQ')
    sG = Smem(S.kElems, bar, 'sG')
    sL = Smem(kTile, bar, 'sL')
    sD = Smem(kTile, bar, 'sD')
    bh = bx
    b, h = bh // NH, bh % NH
    kt, nq = by, gy
    C = NH * HS
    W = 3 * C
    k0 = kt * kTile
    base = b * T * W + h * HS
    gbase = b * T * C + h * HS
    NW = kWarpsPerBlock
    kf, vf = stage_two(S, fmt, sQ, sG, qkv, base + C, W, qkv, base + 2 * C, W, k0, T, HS, vec, bar)
    key = [[(k0 + w * 16 + acc_row(l >> 2, 0), k0 + w * 16 + acc_row(l >> 2, 2)) for l in range(32)]
           for w in range(NW)]
    dk = [[[[0.0] * 4 for _ in range(S.NB)] for _ in range(32)] for _ in range(NW)]
    dv = [[[[0.0] * 4 for _ in range(S.NB)] for _ in range(32)] for _ in range(NW)]

    for qt in range(kt, nq):
        load_tile(S, fmt, sQ, qkv, base, W, qt * kTile, T, HS, vec)
        load_tile(S, fmt, sG, dout, gbase, C, qt * kTile, T, HS, vec)
        for tid in range(kThreads):
            for i in range(tid, kTile, kThreads):
                t = qt * kTile + i
                sL.write(i, lse.read(bh * T + t) if t < T else 0.0, tid)
                sD.write(i, Dsum.read(bh * T + t) if t < T else 0.0, tid)
        bar.sync()
        for w in range(NW):
            st = product_with_rows(S, fmt, kf[w], sQ, w)
            dpt = product_with_rows(S, fmt, vf[w], sG, w)
            for l in range(32):
                c = l & 3
                tid = w * 32 + l
                for nb in range(kTileBlocks):
                    for i in range(4):
                        r, ql = i >> 1, nb * 8 + acc_col(c, i)
                        q = qt * kTile + ql
                        kr = key[w][l][r]
                        valid = q >= kr and q < T and kr < T
                        p = recomputed_prob(st[l][nb][i], scale, sL.read(ql, tid)) if valid else 0.0
                        dpt[l][nb][i] = score_grad(p, dpt[l][nb][i], sD.read(ql, tid), scale) \
                            if valid else 0.0
                        st[l][nb][i] = p
            accumulate_with_cols(S, fmt, dv[w], st, sG, w)
            accumulate_with_cols(S, fmt, dk[w], dpt, sQ, w)
        bar.sync()

    for w in range(NW):
        for l in range(32):
            c = l & 3
            store_rows(S, dqkv, dk[w][l], key[w][l], (1.0, 1.0), b, T, W, C + h * HS, HS, c)
            store_rows(S, dqkv, dv[w][l], key[w][l], (1.0, 1.0), b, T, W, 2 * C + h * HS, HS, c)


# ---------------------------------------------------------------- launches
def attention_forward(fmt, qkv_bits, B, T, NH, HS):
    C = NH * HS
    S = Shape(flash_head_tile(HS))
    scale = f32(1.0 / f32(math.sqrt(HS)))
    vec = HS % 8 == 0
    qkv = Gmem(qkv_bits, 'qkv')
    out = Gmem([None] * (B * T * C), 'out')
    lse = Gmem([None] * (B * NH * T), 'lse')
    gy = flash_tiles(T)
    for bx in range(B * NH):
        for by in range(gy):
            flash_forward_block(fmt, S, bx, by, gy, qkv, out, lse, T, NH, HS, scale, vec)
    return out, lse


def attention_backward(fmt, qkv_bits, dout_bits, lse_vals, B, T, NH, HS):
    C = NH * HS
    S = Shape(flash_head_tile(HS))
    scale = f32(1.0 / f32(math.sqrt(HS)))
    vec = HS % 8 == 0
    qkv = Gmem(qkv_bits, 'qkv')
    dout = Gmem(dout_bits, 'dout')
    lse = Gmem(list(lse_vals), 'lse')
    Dsum = Gmem([None] * (B * NH * T), 'Dsum')
    dqkv = Gmem([None] * (B * T * 3 * C), 'dqkv')
    gy = flash_tiles(T)
    for bx in range(B * NH):
        for by in range(gy):
            flash_backward_dq_block(fmt, S, bx, by, gy, qkv, dout, lse, Dsum, dqkv, T, NH, HS,
                                    scale, vec)
    for bx in range(B * NH):
        for by in range(gy):
            flash_backward_dkv_block(fmt, S, bx, by, gy, qkv, dout, lse, Dsum, dqkv, T, NH, HS,
                                     scale, vec)
    return dqkv, Dsum
