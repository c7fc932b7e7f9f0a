# layernorm.cu, emulated line by line (kernels and launchers).
# Since 2026-12-02 (against 6e29cce; 5589148 added it): the forward kernels take an output policy, Out,
# in place of T* out: PlainOut<T> (store_counted; the flush when T narrows: the kernels as before)
# or Fp8Out<T, kE4M3> (layernorm.cu:29-57 there: fp8_math.cuh's store_fp8_one per element, the
# tally flushed always, then flush_amax), and layernorm_forward's host side with an Fp8Output
# (layernorm.cu:354-411: N * C values, twice when round_to narrows).
import _path  # noqa: F401 (simt.py is in the parent folder)
from simt import *
from fp8_math import store_fp8_one, flush_amax

kBlock = 256
kRowsPerBlock = kBlock // 32
EPS = f32(1e-5)
kRegCols = [4, 8, 16, 24, 32]
kLayerNormRowChunk = 32
kSumLanes = 16

def layernorm_row_chunk(N): return max(kLayerNormRowChunk, (N + 65534) // 65535)

def register_cols(C):
    for k in kRegCols:
        if C <= 32 * k: return k
    return 0

# ---- output policies (a kernel parameter: each thread works on its own copy, per_thread())
class PlainOut:
    """template <class T> struct PlainOut { T* out; put(); finish(); }"""
    def __init__(self, T, out): self.T, self.out, self.dtype = T, out, T
    def per_thread(self): return self
    def put(self, t, i, y, tally): store_counted(t, self.out, i, y, tally, self.T)
    def finish(self, t, tally, counters):
        if narrow(self.T): yield from tally.flush(t, counters)

class Fp8Out:
    """template <class T, bool kE4M3> struct Fp8Out { uint8_t* out; float scale; unsigned*
    amax_bits; unsigned am; put(); finish(); }"""
    def __init__(self, T, e4, out, scale, amax_bits, am=0):
        self.T, self.e4, self.out, self.scale, self.amax_bits, self.am = T, e4, out, scale, amax_bits, am
    def per_thread(self):
        return Fp8Out(self.T, self.e4, self.out, self.scale, self.amax_bits, self.am)
    def put(self, t, i, y, tally):
        q, self.am = store_fp8_one(self.T if 'lnfp8_noround' not in MUT else 'f32', y, self.scale,
                                   self.am, tally, self.e4)
        t.st(self.out, i, q)
    def finish(self, t, tally, counters):
        if narrow(self.T) or 'lnfp8_flush_narrow_only' not in MUT: yield from tally.flush(t, counters)
        if 'lnfp8_no_amax' not in MUT: yield from flush_amax(t, self.am, self.amax_bits)

# ---- loop kernels
def fwd_loop_kernel(t, Out, mean, rstd, inp, di, weight, dw, bias, db, N, C, counters):
    out = Out.per_thread()
    tally = Tally()
    lane = t.tid & 31
    n = t.bx * kRowsPerBlock + (t.tid >> 5)
    if n < N:
        row = n * C
        s = 0.0
        c = lane
        while c < C:
            s = add(s, t.ld(inp, row + c, di)); c += 32
        m = div((yield from warp_sum(s)), f32(C))
        var = 0.0
        c = lane
        while c < C:
            dx = sub(t.ld(inp, row + c, di), m)
            var = add(var, mul(dx, dx)); c += 32
        var = div((yield from warp_sum(var)), f32(C))
        sd = div(1.0, sqrt_rn(add(var, EPS)))
        c = lane
        while c < C:
            norm = mul(sub(t.ld(inp, row + c, di), m), sd)
            y = add(mul(norm, t.ld(weight, c, dw)), t.ld(bias, c, db))
            out.put(t, row + c, y, tally); c += 32
        if lane == 0:
            t.st(mean, n, m); t.st(rstd, n, sd)
    yield from out.finish(t, tally, counters)

def dinp_loop_kernel(t, T, dinp, dout, dd, inp, di, weight, dw, mean, rstd, N, C, counters):
    tally = Tally()
    lane = t.tid & 31
    n = t.bx * kRowsPerBlock + (t.tid >> 5)
    if n < N:
        row = n * C
        m, sd = t.ld(mean, n), t.ld(rstd, n)
        a = 0.0; b = 0.0
        c = lane
        while c < C:
            norm = mul(sub(t.ld(inp, row + c, di), m), sd)
            dnorm = mul(t.ld(weight, c, dw), t.ld(dout, row + c, dd))
            a = add(a, dnorm); b = add(b, mul(dnorm, norm)); c += 32
        a = div((yield from warp_sum(a)), f32(C))
        b = div((yield from warp_sum(b)), f32(C))
        c = lane
        while c < C:
            norm = mul(sub(t.ld(inp, row + c, di), m), sd)
            dnorm = mul(t.ld(weight, c, dw), t.ld(dout, row + c, dd))
            g = mul(sub(sub(dnorm, a), mul(norm, b)), sd)
            store_counted(t, dinp, row + c, add(t.ld(dinp, row + c), g), tally, T); c += 32
    if narrow(T): yield from tally.flush(t, counters)

# ---- register kernels
def load_cols(t, kCols, buf, dt, row, lane, C):
    v = [0.0] * kCols
    lim = (lambda c: c <= C) if 'load_cols_le' in MUT else (lambda c: c < C)
    for k in range(kCols):
        v[k] = t.ld(buf, row + lane + 32 * k, dt) if lim(lane + 32 * k) else 0.0
    return v

def fwd_regs_kernel(t, kCols, Out, mean, rstd, inp, di, weight, dw, bias, db, N, C, counters):
    out = Out.per_thread()
    tally = Tally()
    lane = t.tid & 31
    n = t.bx * kRowsPerBlock + (t.tid >> 5)
    if n < N:
        row = n * C
        x = load_cols(t, kCols, inp, di, row, lane, C)
        s = 0.0
        for k in range(kCols):
            if lane + 32 * k < C: s = add(s, x[k])
        m = div((yield from warp_sum(s)), f32(C))
        var = 0.0
        vlim = C + 1 if 'reg_var_le' in MUT else C
        for k in range(kCols):
            if lane + 32 * k < vlim:
                dx = sub(x[k], m); var = add(var, mul(dx, dx))
        var = div((yield from warp_sum(var)), f32(C))
        sd = div(1.0, sqrt_rn(add(var, EPS)))
        w = load_cols(t, kCols, weight, dw, row if 'reg_w_row' in MUT else 0, lane, C)
        b = load_cols(t, kCols, bias, db, 0, lane, C)
        for k in range(kCols):
            c = lane + 32 * k
            if c < C:
                norm = mul(sub(x[k], m), sd)
                i = row + c if not ('lnfp8_regs_put_c' in MUT and isinstance(out, Fp8Out)) else row + lane * kCols + k
                out.put(t, i, add(mul(norm, w[k]), b[k]), tally)
        if lane == 0:
            t.st(mean, n, m); t.st(rstd, n, sd)
    yield from out.finish(t, tally, counters)

def bwd_regs_kernel(t, T, kCols, dinp, pw, pb, dout, dd, inp, di, weight, dw, mean, rstd, N, C,
                    row_chunk, counters):
    acc_w, acc_b = t.sh['acc_w'], t.sh['acc_b']
    tally = Tally()
    lane, warp = t.tid & 31, t.tid >> 5
    w = load_cols(t, kCols, weight, dw, 0, lane, C)
    sw = [0.0] * kCols; sb = [0.0] * kCols
    r0 = t.bx * row_chunk; r1 = min(N, r0 + row_chunk)
    n = r0 + warp
    while n < r1:
        row = n * C
        x = load_cols(t, kCols, inp, di, row, lane, C)
        d = load_cols(t, kCols, dout, dd, row, lane, C)
        m, sd = t.ld(mean, n), t.ld(rstd, n)
        a = 0.0; b = 0.0
        for k in range(kCols):
            if lane + 32 * k < C:
                norm = mul(sub(x[k], m), sd)
                dnorm = mul(w[k], d[k])
                a = add(a, dnorm); b = add(b, mul(dnorm, norm))
        a = div((yield from warp_sum(a)), f32(C))
        b = div((yield from warp_sum(b)), f32(C))
        for k in range(kCols):
            c = lane + 32 * k
            if c < C:
                norm = mul(sub(x[k], m), sd)
                dnorm = mul(w[k], d[k])
                g = mul(sub(sub(dnorm, a), mul(norm, b)), sd)
                store_counted(t, dinp, row + c, add(t.ld(dinp, row + c), g), tally, T)
                sw[k] = add(sw[k], mul(norm, d[k]))
                sb[k] = add(sb[k], dnorm if 'reg_sb_dnorm' in MUT else d[k])
        n += kRowsPerBlock
    for v in range(kRowsPerBlock):
        if warp == v:
            for k in range(kCols):
                c = lane + 32 * k
                if c < C:
                    ci = lane * kCols + k if 'reg_acc_idx' in MUT else c
                    t.shst(acc_w, ci, sw[k] if v == 0 else add(t.shld(acc_w, ci), sw[k]))
                    t.shst(acc_b, ci, sb[k] if v == 0 else add(t.shld(acc_b, ci), sb[k]))
        if 'reg_nobarrier' not in MUT:
            yield ('sync',)
    c = t.tid
    while c < C:
        t.st(pw, t.bx * C + c, t.shld(acc_w, c))
        t.st(pb, t.bx * C + c, t.shld(acc_b, c))
        c += t.bdim[0]
    if narrow(T): yield from tally.flush(t, counters)

def partials_kernel(t, pw, pb, dout, dd, inp, di, mean, rstd, N, C, row_chunk):
    if False: yield
    c = t.bx * t.bdim[0] + t.tx
    if c >= C: return
    r0 = t.by * row_chunk; r1 = min(N, r0 + row_chunk)
    sw = 0.0; sb = 0.0
    for n in range(r0, r1):
        d = t.ld(dout, n * C + c, dd)
        norm = mul(sub(t.ld(inp, n * C + c, di), t.ld(mean, n)), t.ld(rstd, n))
        sw = add(sw, mul(norm, d)); sb = add(sb, d)
    t.st(pw, t.by * C + c, sw)
    t.st(pb, t.by * C + c, sb)

def column_sums_kernel(t, Tw, Tb, dweight, dbias, pw, pb, chunks, C, counters):
    sums = t.sh['sums']  # [kSumLanes][33]
    x, y = t.tx, t.ty
    c = t.bx * (31 if 'colsum_idx' in MUT else 32) + x
    p = pw if t.by == 0 else pb
    acc = 0.0
    step = kSumLanes - 1 if 'colsum_stride' in MUT else kSumLanes
    if c < C:
        r = y
        while r < chunks:
            acc = add(acc, t.ld(p, r * C + c)); r += step
    t.shst(sums, y * 33 + x, acc)
    yield ('sync',)
    if y == 0:
        tally = Tally()
        if c < C:
            s = 0.0
            for k in range(kSumLanes): s = add(s, t.shld(sums, k * 33 + x))
            if t.by == 0:
                store_counted(t, dweight, c, add(t.ld(dweight, c), s), tally, Tw)
            else:
                store_counted(t, dbias, c, add(t.ld(dbias, c), s), tally, Tb)
        if narrow(Tw) or narrow(Tb): yield from tally.flush(t, counters)

# ---- launchers
def blocks_for(n, per=kBlock): return max(1, (n + per - 1) // per)

class Fp8Output:
    """backend.h Fp8Output: round_to, and q (format, scale, amax: a u32 Buf standing for the
    context's amax word, or None)."""
    def __init__(self, round_to, e4m3, scale, amax=None):
        self.round_to, self.e4m3, self.scale, self.amax = round_to, e4m3, scale, amax

def layernorm_forward(ctx, out, mean, rstd, inp, weight, bias, N, C, force=None, seed=0, fp8=None):
    """force: None (the launcher's choice), 'loop', or 'regs' (register kernel when cols != 0).
    fp8: an Fp8Output (layernorm_forward_fp8; out a u8 Buf), or None (PlainOut<out.dtype>)."""
    errs = ctx['errors']
    counters = ctx['act']
    if N == 0: return None
    blocks = (N + kRowsPerBlock - 1) // kRowsPerBlock
    cols = register_cols(C)
    if 'launcher_lt' in MUT:
        cols = next((k for k in kRegCols if C < 32 * k), 0)
    if fp8 is None:
        o = PlainOut(out.dtype, out)
    else:
        o = Fp8Out(fp8.round_to, fp8.e4m3, out, fp8.scale, fp8.amax, 0)
    args_tail = (o, mean, rstd, inp, inp.dtype, weight, weight.dtype, bias, bias.dtype, N, C, counters)
    if force == 'loop' or (force is None and cols == 0):
        launch('fwd_loop', fwd_loop_kernel, (blocks, 1), (kBlock, 1), args_tail, errs, seed)
        path = 'loop'
    else:
        launch('fwd_regs%d' % cols, fwd_regs_kernel, (blocks, 1), (kBlock, 1), (cols,) + args_tail, errs, seed)
        path = 'regs%d' % cols
    if fp8 is None:
        if out.dtype != 'f32': ctx['act_values'] += N * C
    else:
        # Both casts, as layernorm_forward's store and the GEMM's quantisation count them.
        k = 2 if fp8.round_to != 'f32' and 'lnfp8_values1' not in MUT else 1
        ctx['act_values'] += k * N * C
    return path

def layernorm_backward(ctx, dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C, force=None,
                       seed=0):
    errs = ctx['errors']
    counters = ctx['grad']
    row_chunk = layernorm_row_chunk(N)
    chunks = (N + row_chunk - 1) // row_chunk
    scratch = Buf('scratch', 'f32', 2 * chunks * C)  # uninitialised
    # pw = scratch, pb = scratch + chunks*C: emulate with index offsets through views
    pw = View(scratch, 0, chunks * C); pb = View(scratch, chunks * C, chunks * C)
    cols = register_cols(C)
    if 'launcher_lt' in MUT:
        cols = next((k for k in kRegCols if C < 32 * k), 0)
    T = dinp.dtype
    if (force == 'regs' or force is None) and cols != 0:
        launch('bwd_regs%d' % cols, bwd_regs_kernel, (chunks, 1), (kBlock, 1),
               (T, cols, dinp, pw, pb, dout, dout.dtype, inp, inp.dtype, weight, weight.dtype,
                mean, rstd, N, C, row_chunk, counters), errs, seed,
               shared_spec=(('acc_w', 32 * cols), ('acc_b', 32 * cols)))
        path = 'regs%d' % cols
    else:
        row_blocks = (N + kRowsPerBlock - 1) // kRowsPerBlock
        launch('dinp_loop', dinp_loop_kernel, (row_blocks, 1), (kBlock, 1),
               (T, dinp, dout, dout.dtype, inp, inp.dtype, weight, weight.dtype, mean, rstd, N, C,
                counters), errs, seed)
        launch('partials', partials_kernel, (blocks_for(C), chunks), (kBlock, 1),
               (pw, pb, dout, dout.dtype, inp, inp.dtype, mean, rstd, N, C, row_chunk), errs, seed)
        path = 'loop'
    launch('column_sums', column_sums_kernel, ((C + 31) // 32, 2), (32, kSumLanes),
           (dweight.dtype, dbias.dtype, dweight, dbias, pw, pb, chunks, C, counters), errs, seed,
           shared_spec=(('sums', kSumLanes * 33),))
    for tt in (dinp, dweight, dbias):
        if tt.dtype != 'f32': ctx['grad_values'] += tt.n
    return path, scratch, chunks

class View:
    """A pointer into a Buf at an element offset (pw, pb inside the scratch)."""
    def __init__(self, buf, off, n):
        self.buf, self.off = buf, off
        self.name, self.dtype = buf.name, buf.dtype
        self.n = n  # stricter than the device: pw running into pb is reported as OOB
        self.base = buf.base + off * ESIZE[buf.dtype]
    @property
    def data(self): return _Shift(self.buf.data, self.off)
    @property
    def writes(self): return _Shift(self.buf.writes, self.off)

class _Shift:
    def __init__(self, lst, off): self.l, self.o = lst, off
    def __getitem__(self, i): return self.l[self.o + i]
    def __setitem__(self, i, v): self.l[self.o + i] = v
