# adamw.cu as changed on 2026-12-02 so that one launch updates up to 40 tensors: first written
# against the uncommitted change (committed as e4f7928: adamw.cu 2876fd2, adamw_plan.cpp 280de36),
# now following 8a3b9d9 (adamw.cu 849e43e, adamw_plan.cpp 1b4ee98, adamw_plan.h c8e38ee: the
# shared hyperparameters compared bit for bit, the launch named by its op; the kernel unchanged):
#   adamw_kernel<T, kSr> over an AdamWTable (adamw.cu:57-116): the block -> tensor scan over
#     block_begin, the tensor's own grid stride, its weight decay, seed and first index, the cast
#     tally's flush and the lost-update count (one atomic per block);
#   launch() (adamw.cu:118-173) filling the table and AdamWArgs from the launch's first tensor,
#     run() (175-178) the plan's launches, for adamw_update_many (182-185) and adamw_update
#     (187-192: the same with one tensor);
#   adamw_plan.cpp: same (12), adamw_stochastic (16-18), adamw_same_launch (20-26), adamw_blocks
#     (28-31), plan_adamw_launches (33-56);
#   Context::lost_update_counter (cuda_context.cpp:206-213) and the lost count's collection
#     (225-251);
# against CpuBackend::adamw_update (cpu_precision.cpp:658-717) called for each tensor in order
# (Backend::adamw_update_many's default, backend.cpp): m, v, the master, the parameter's bits
# (stochastic rounding included), the weight class's cast counts and values, AdamWStats' values
# and lost updates. Argument checks (check_adamw_args, check_adamw_update_many) are not transcribed: the
# tensors here are valid and disjoint (each its own buffer, which also makes a wrong tensor's
# access an out-of-bounds, uninitialised or double write here).
#
# Scaled constants (a Cfg per case): kBlock 256 -> 32 or 64 threads in most multi-tensor mixes;
# the 65535-block cap of adamw_blocks/grid_stride_blocks -> 2 or 3 blocks, so that tensors over
# cap * kBlock elements grid-stride at a few hundred elements; kAdamWTensorsPerLaunch 40 -> 3 to
# 6, so that a mix holds more tensors than one launch takes. One mix and the single-tensor cases
# run the real 256 threads and the real 40 tensors; the single-tensor cases the real 65535 cap,
# except the grid-stride ones (cap 2, the reduced grid of 2 blocks they ran with before).
# The real constants are also run through the plan alone (test_cuda.cpp's AdamWPlan cases).
#
# Usage: python3 adamw.py [quick|single|multi|mixes] (multi: the plan's cases and the mixes;
# mixes: the mixes alone, to see which plan bugs the results themselves show)
import sys, time, math, random
import _path  # noqa: F401
from common import *

kBlock = 256                 # workspace_plan.h
kMaxGridStrideBlocks = 65535  # cuda_common.cuh grid_stride_blocks, adamw_plan.cpp adamw_blocks
kAdamWTensorsPerLaunch = 40  # adamw_plan.h

class Cfg:
    """The constants a case runs with (see the header: which are scaled)."""
    def __init__(self, block=kBlock, cap=kMaxGridStrideBlocks, per_launch=kAdamWTensorsPerLaunch):
        self.block, self.cap, self.per_launch = block, cap, per_launch
    def __repr__(self):
        return 'kBlock=%d cap=%d per_launch=%d' % (self.block, self.cap, self.per_launch)

REAL = Cfg()

class AdamWTensors:
    """backend.h's AdamWTensors. Host side: bit lists; device side: Bufs. master None: undefined.
    p: AdamWParams as a dict (lr, beta1, beta2, eps, wd, step, grad_scale, sr, seed,
    first_index); the plan reads only n, the dtypes, whether there is a master, and p."""
    def __init__(self, n, pdt, gdt, param, master, grad, m, v, p):
        self.n, self.pdt, self.gdt = n, pdt, gdt
        self.param, self.master, self.grad, self.m, self.v, self.p = param, master, grad, m, v, p

# ---------------- adamw_plan.cpp (host)
def adamw_stochastic(t):  # adamw_plan.cpp:16-18
    return t.p['sr'] and t.master is None and t.pdt == 'bf16'

def same(a, b):  # adamw_plan.cpp:12, memcmp of two floats
    if 'plan_float_eq' in MUT: return f32(a) == f32(b)   # e4f7928's ==
    return fbits(f32(a)) == fbits(f32(b))

def adamw_same_launch(a, b):  # adamw_plan.cpp:20-26
    p, q = a.p, b.p
    st = (lambda t: False) if 'plan_sr_in_rn' in MUT else adamw_stochastic
    return (a.pdt == b.pdt and (a.gdt == b.gdt or 'plan_no_gdt' in MUT) and
            st(a) == st(b) and same(p['lr'], q['lr']) and
            same(p['beta1'], q['beta1']) and same(p['beta2'], q['beta2']) and
            same(p['eps'], q['eps']) and (p['step'] == q['step'] or 'plan_no_step' in MUT) and
            (same(p['grad_scale'], q['grad_scale']) or 'plan_no_scale' in MUT))

def adamw_blocks(n, cfg):  # workspace_plan.h's grid_stride_blocks, which adamw_plan.cpp calls (n >= 0: C++'s division truncates as // here)
    b = n // cfg.block if 'plan_blocks_floor' in MUT else (n + cfg.block - 1) // cfg.block
    return 1 if b < 1 else b if b < cfg.cap else cfg.cap

class AdamWLaunch:
    def __init__(self):
        self.tensors = []        # indices into the call's list
        self.block_begin = [0]   # len(tensors) + 1 entries; the last is the grid

def plan_adamw_launches(all_, cfg):  # adamw_plan.cpp:33-56
    out = []
    open_ = []  # [a tensor of the kind, index into out]
    for i in range(len(all_)):
        n = all_[i].n
        if n == 0: continue
        slot = None
        for e in open_:
            if adamw_same_launch(all_[e[0]], all_[i]): slot = e
        full = cfg.per_launch + (1 if 'plan_cap_off' in MUT else 0)
        if slot is None or len(out[slot[1]].tensors) == full:
            out.append(AdamWLaunch())
            if slot is not None:
                if 'plan_slot_stale' not in MUT: slot[1] = len(out) - 1
            else:
                open_.append([i, len(out) - 1])
        l = out[slot[1] if slot is not None else open_[-1][1]]
        l.tensors.append(i)
        l.block_begin.append(l.block_begin[-1] + adamw_blocks(n, cfg))
    return out

# ---------------- the kernel's parameters
class Args:  # AdamWArgs: what a launch's tensors share
    pass

def make_args(p):  # launch(), adamw.cu:124-135, from the launch's first tensor's AdamWParams
    a = Args()
    a.lr, a.beta1, a.beta2, a.eps, a.grad_scale = (f32(p[k]) for k in ('lr', 'beta1', 'beta2', 'eps', 'grad_scale'))
    a.omb1 = sub(1.0, a.beta1)
    a.omb2 = sub(1.0, a.beta2)
    a.c1 = f32(1.0 / (1.0 - math.pow(float(a.beta1), float(p['step']))))
    a.c2 = f32(1.0 / (1.0 - math.pow(float(a.beta2), float(p['step']))))
    a.step = p['step']
    return a

HOLE = object()  # a table entry the host did not set (C++: zero, from `AdamWTable tab{}`)
POINTERS = ('param', 'master', 'grad', 'm', 'v')

class Table:
    """AdamWTable (adamw.cu:37-49): arrays of per_launch entries, block_begin one more. A host
    write past an array is an error (C++: past the struct); a kernel read of an entry the host
    left unset is an error too (C++ reads a zero: no correct kernel reads one)."""
    FIELDS = POINTERS + ('n', 'first_index', 'seed', 'weight_decay')
    def __init__(self, cap, errors):
        for f in self.FIELDS: setattr(self, f, [HOLE] * cap)
        self.block_begin = [HOLE] * (cap + 1)
        self.count = HOLE
        self.errors = errors
    def set(self, f, j, x):
        arr = getattr(self, f)
        if 0 <= j < len(arr): arr[j] = x
        else: self.errors.append('host: AdamWTable.%s[%d] written past its %d entries' % (f, j, len(arr)))

def tab_get(t, tab, f, j=None):
    """A kernel's read of tab.f[j] (tab.count with j None)."""
    if j is None:
        x = tab.count
    else:
        arr = getattr(tab, f)
        if not 0 <= j < len(arr):
            t.L.err('table read %s[%d] past its %d entries (block %d)' % (f, j, len(arr), t.block))
            return None if f in POINTERS else 0
        x = arr[j]
    if x is HOLE:
        t.L.err('table read %s[%s]: an entry the host left unset (block %d)' % (f, j, t.block))
        return None if f in POINTERS else 0
    return x

def ldf(t, buf, i): return from_bits(ldb(t, buf, i))
def stf(t, buf, i, x): t.st(buf, i, fbits(x))

def ldT(t, buf, i, dt):
    """A load through the kernel's T* (or load_any's dtype dg) of a table's void*: the buffer
    must hold that dtype (simt reports a mismatch)."""
    x = t.ld(buf, i, dt + 'b')
    return x if isinstance(x, int) else NAN_PATTERN.get(buf.dtype, 0)

def dev_bf16_half_ulp(w):  # adamw.cu:23-25, with formats.h's bf16_from_float
    return bf16_half_ulp_of_exponent((bf16_from_f32(fbits(w)) >> 7) & 0xFF)

def u32(x): return x & 0xFFFFFFFF

# ---------------- the kernel (adamw.cu:57-116)
def adamw_kernel(t, T, kSr, tab, dg, a, count_lost, lost_counter, counters):
    count = tab_get(t, tab, 'count')
    k = 0
    if 'adamw_scan_gt' in MUT:
        while k + 1 < count and t.bx > tab_get(t, tab, 'block_begin', k + 1): k += 1
    else:
        while k + 1 < count and t.bx >= tab_get(t, tab, 'block_begin', k + 1): k += 1
    param = tab_get(t, tab, 'param', k)
    master = tab_get(t, tab, 'master', k)
    grad = tab_get(t, tab, 'grad', k)
    m = tab_get(t, tab, 'm', k)
    v = tab_get(t, tab, 'v', k)
    n = tab_get(t, tab, 'n', k)
    first_index = tab_get(t, tab, 'first_index', 0 if 'adamw_index_first' in MUT else k)
    seed = tab_get(t, tab, 'seed', 0 if 'adamw_seed_first' in MUT else k)
    weight_decay = tab_get(t, tab, 'weight_decay', 0 if 'adamw_wd_first' in MUT else k)
    bbk = tab_get(t, tab, 'block_begin', k)
    block = u32(t.bx - bbk)                                       # unsigned
    blocks = u32(tab_get(t, tab, 'block_begin', k + 1) - bbk)     # unsigned
    if 'adamw_stride_grid' in MUT: blocks = t.gdim[0]
    tally = Tally()
    lost = 0
    i = (t.bx if 'adamw_start_noshift' in MUT else block) * t.bdim[0] + t.tx
    stride = blocks * t.bdim[0]
    if 'adamw_stride_short' in MUT: stride -= 1
    if stride <= 0 and i < n:  # the device would loop for ever
        t.L.err('grid stride %d: an endless loop (block %d thread %d)' % (stride, t.block, t.tid))
        n, stride = i + 1, 1  # one pass, then stop
    while i < n:
        gi = mul(dev_load(dg, ldT(t, grad, i, dg)), a.grad_scale)
        if 'adamw_fma' in MUT:
            mi = simt.fma32(a.beta1, ldf(t, m, i), mul(a.omb1, gi))
        else:
            mi = add(mul(a.beta1, ldf(t, m, i)), mul(a.omb1, gi))
        vi = add(mul(a.beta2, ldf(t, v, i)), mul(mul(a.omb2, gi), gi))
        stf(t, m, i, mi)
        stf(t, v, i, vi)
        mhat, vhat = mul(mi, a.c1), mul(vi, a.c2)
        if 'adamw_c_swap' in MUT: mhat, vhat = mul(mi, a.c2), mul(vi, a.c1)
        old = ldf(t, master, i) if master is not None else dev_load(T, ldT(t, param, i, T))
        upd = mul(a.lr, add(div(mhat, add(sqrt_rn(vhat), a.eps)), mul(weight_decay, old)))
        now = sub(old, upd)
        if count_lost:
            ref = now if 'adamw_lost_now' in MUT else old
            if 'adamw_lost_le' in MUT: lost += int(abs(upd) <= dev_bf16_half_ulp(ref))
            else: lost += int(abs(upd) < dev_bf16_half_ulp(ref))
        if kSr:
            idx = i if 'adamw_sr_index' in MUT else first_index + i
            if 'adamw_sr_rn' in MUT: b = bf16_from_f32(fbits(now))
            else: b = bf16_from_float_stochastic(fbits(now), stochastic_rounding_bits(seed, a.step, idx))
            t.st(param, i, b, 'bf16b')
            x = abs(now)
            tally.over += int(x > MAXF['bf16'] and x <= FLT_MAX)
            if 'adamw_sr_under_sign' in MUT: tally.under += int(x > 0.0 and b == 0)
            else: tally.under += int(x > 0.0 and (b & 0x7FFF) == 0)
        else:
            if master is not None and 'adamw_master_skip' not in MUT: stf(t, master, i, now)
            if param.dtype != T + 'b':
                t.L.err('store to %s as %s (it is %s)' % (param.name, T, param.dtype))
            store_counted(t, param, T, i, now, tally)
        i += stride
    if T != 'f32': yield from tally.flush(t, counters)
    if count_lost:
        warp_lost = t.sh['warp_lost']
        for off in (16, 8, 4, 2, 1):
            r = yield ('down', lost, off); lost += r
        if (t.tx & 31) == 0: t.shst(warp_lost, t.tx >> 5, lost)
        if 'adamw_lost_nosync' not in MUT: yield ('sync',)
        if t.tx == 0:
            s = 0
            nw = t.bdim[0] // 32 - (1 if 'adamw_lost_lastwarp' in MUT else 0)
            for w in range(nw): s += t.shld(warp_lost, w)
            if s: t.atomic_add(lost_counter, 0, s)

# ---------------- the host: Context's counters, launch(), adamw_update_many
class Stats:  # AdamWStats
    def __init__(self): self.values = 0; self.lost_updates = 0

class Context:
    """What launch() uses of cuda::Context: the weight class's cast counters and values
    (add_cast_values; counting on) and the lost-update counter."""
    def __init__(self):
        self.counters = counters()
        self.values = 0
        self.lost = Buf('lost', 'i32', 1, [0])
        self.lost_stats = None
        self.zeroed = 0  # times the lost counter was zeroed (a stats-less call zeroes it never)
    def lost_update_counter(self, stats):  # cuda_context.cpp:206-213
        if self.lost_stats is not None and self.lost_stats is not stats: self.collect_stats()
        if self.lost_stats is None or 'host_lost_per_launch' in MUT:
            self.lost.data = [0]; self.zeroed += 1
            self.lost_stats = stats
        return self.lost
    def collect_stats(self):  # collect_reports (cuda_context.cpp:225-251), the lost count's part
        stats, self.lost_stats = self.lost_stats, None
        if stats is not None: stats.lost_updates += self.lost.data[0] or 0

def launch_one(ctx, all_, l, stats, cfg, errs, seed):  # launch(), adamw.cu:118-173
    first = all_[l.tensors[0]]
    p = first.p
    a = make_args(p)
    tab = Table(cfg.per_launch, errs)
    tab.count = len(l.tensors)
    values = 0
    for j in range(len(l.tensors)):
        t = all_[l.tensors[j]]
        for f in POINTERS: tab.set(f, j, getattr(t, f))
        tab.set('n', j, t.n)
        tab.set('first_index', j, t.p['first_index'])
        tab.set('seed', j, t.p['seed'])
        tab.set('weight_decay', j, f32(t.p['wd']))
        tab.set('block_begin', j, l.block_begin[j])
        if j == 0 or 'host_values_first' not in MUT: values += t.n
    if 'host_bb_last_unset' not in MUT:
        tab.set('block_begin', len(l.tensors), l.block_begin[-1])
    pd = first.pdt
    sr = adamw_stochastic(first)  # as the plan grouped them
    want_lost = pd == 'bf16' and stats is not None
    lost_dev = ctx.lost_update_counter(stats) if want_lost else None
    blocks = l.block_begin[-1]
    if 'host_grid_short' in MUT: blocks = l.block_begin[-2]
    launch('adamw', adamw_kernel, (blocks, 1), (cfg.block, 1),
           ('bf16' if sr else pd, sr, tab, first.gdt, a, want_lost, lost_dev, ctx.counters),
           errs, seed, shared_spec=[('warp_lost', cfg.block // 32)])
    if pd != 'f32': ctx.values += values
    if stats is not None: stats.values += values

def adamw_update_many(ctx, all_, stats, cfg, errs, seed=0):  # run(), adamw.cu:175-185
    ls = plan_adamw_launches(all_, cfg)
    for li, l in enumerate(ls):
        if not l.tensors:  # C++: front() of an empty vector
            errs.append('host: launch %d of the plan has no tensors' % li); continue
        launch_one(ctx, all_, l, stats, cfg, errs, seed * 997 + li)
    return ls

def to_device(h, idx):
    """The tensors of host h as device buffers named by the tensor's index (simt's race and
    write records key on the name)."""
    def b(name, dt, bits, base):
        return None if bits is None else bitbuf('%s%d' % (name, idx), dt, bits, base=base)
    return AdamWTensors(h.n, h.pdt, h.gdt, b('param', h.pdt, h.param, 256), b('master', 'f32', h.master, 4096),
                        b('grad', h.gdt, h.grad, 8192), b('m', 'f32', h.m, 12288), b('v', 'f32', h.v, 16384), h.p)

def gpu_adamw(pdt, param, master, grad, gdt, m, v, p, stats, grid=None, seed=0):
    """adamw_update (adamw.cu:187-192): run() with one tensor; grid: a reduced cap
    on the tensor's blocks. Returns (param, master, m, v, counters, lost, errors, stats values,
    cast values)."""
    d = to_device(AdamWTensors(len(param), pdt, gdt, param, master, grad, m, v, p), 0)
    ctx, st, errs = Context(), (Stats() if stats else None), []
    adamw_update_many(ctx, [d], st, Cfg(cap=grid or kMaxGridStrideBlocks), errs, seed)
    ctx.collect_stats()
    return (d.param, d.master, d.m, d.v, ctx.counters, st.lost_updates if stats else None, errs,
            st.values if stats else None, ctx.values)

# ---------------- the CPU backend
def cpu_adamw(pdt, param, master, grad, gdt, m, v, p, stats):
    """CpuBackend::adamw_update, line by line (C's left-to-right products, no contraction:
    CMakeLists.txt builds with -ffp-contract=off)."""
    n = len(param)
    mm = [from_bits(b) for b in m]
    vv = [from_bits(b) for b in v]
    w = [from_bits(b) for b in master] if master is not None else cpu_widen_vals(param, pdt)
    gp = cpu_widen_vals(grad, gdt)
    count_lost = pdt == 'bf16'
    sr = p['sr'] and master is None and pdt == 'bf16'
    beta1, beta2, lr, eps, wd, gs = (f32(p[k]) for k in ('beta1', 'beta2', 'lr', 'eps', 'wd', 'grad_scale'))
    c1 = f32(1.0 / (1.0 - math.pow(float(beta1), float(p['step']))))
    c2 = f32(1.0 / (1.0 - math.pow(float(beta2), float(p['step']))))
    lost = over = under = 0
    pb = [None] * n
    nows = [None] * n
    for i in range(n):
        gi = mul(gp[i], gs)
        mi = add(mul(beta1, mm[i]), mul(sub(1.0, beta1), gi))
        vi = add(mul(beta2, vv[i]), mul(mul(sub(1.0, beta2), gi), gi))
        mm[i] = mi; vv[i] = vi
        mhat, vhat = mul(mi, c1), mul(vi, c2)
        old = w[i]
        upd = mul(lr, add(div(mhat, add(sqrt_rn(vhat), eps)), mul(wd, old)))
        now = sub(old, upd)
        nows[i] = fbits(now)
        if count_lost: lost += int(abs(upd) < fast_bf16_half_ulp(fbits(old)))
        if sr:
            b = bf16_from_float_stochastic(fbits(now), stochastic_rounding_bits(p['seed'], p['step'], p['first_index'] + i))
            pb[i] = b
            x = abs(now)
            over += int(x > MAXF['bf16'] and x <= FLT_MAX)
            under += int(x > 0.0 and (b & 0x7FFF) == 0)
        else:
            w[i] = now
    wbits = [fbits(x) for x in w]
    if sr:
        newp, counts = pb, (over, under)
    elif master is not None or pdt != 'f32':
        newp, counts = cpu_narrow_into(wbits, pdt)
    else:
        newp, counts = wbits, (0, 0)
    return (newp, wbits if master is not None else None, [fbits(x) for x in mm], [fbits(x) for x in vv],
            counts, (lost if count_lost else 0) if stats else None, nows)

def cpu_cast_values(n, pdt, master, p):
    """The values the CPU's adamw_update adds to the weight class's counts (counting on):
    CastCounts{n, ..} when rounding stochastically, else narrow_into's n unless the target is
    fp32 (or nothing is narrowed: fp32 weights without a master)."""
    sr = p['sr'] and master is None and pdt == 'bf16'
    if sr: return n
    if master is not None or pdt != 'f32': return n if pdt != 'f32' else 0
    return 0

PRESETS = {
    'typical': dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.1, step=7, grad_scale=0.5,
                    seed=0x1234567887654321, first_index=0),
    'shard': dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.0, step=1000, grad_scale=1.0,
                  seed=0xFEDCBA9876543210, first_index=3 * 2 ** 31 + 17),   # a ZeRO-1 shard: int64 index
    'aggressive': dict(lr=0.75, beta1=0.9, beta2=0.999, eps=1e-8, wd=1.0, step=1, grad_scale=1e3,
                       seed=42, first_index=5),
    'tie': dict(lr=0.0625, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0625, step=3, grad_scale=1.0,
                seed=11, first_index=0),   # upd = old / 256: half the bf16 ulp of a power of two
    'extreme': dict(lr=1.0, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0, step=1, grad_scale=1.0,
                    seed=7, first_index=0),
}

def make_inputs(rng, n, pdt, gdt, with_master, preset, special):
    """param, master, grad, m, v as bits. 'extreme' crafts elements whose update lands between
    bf16's largest finite value and FLT_MAX (overflow counts) or past it; 'aggressive' shrinks
    subnormal weights to zero (underflow counts); 'tie' makes |upd| equal half the weight's bf16
    ulp (the lost-update comparison's boundary). These presume the preset's weight decay."""
    if with_master:
        master = rand_bits(rng, n, 'f32', 0.3, special)
        param = [FROM_F32[pdt](u) for u in master]
    else:
        master = None
        param = rand_bits(rng, n, pdt, 0.3, special)
    grad = rand_bits(rng, n, gdt, 1e-2, special)
    m = [fbits(f32(rng.gauss(0, 1e-3))) for _ in range(n)]
    v = [fbits(f32(abs(rng.gauss(0, 1e-5)))) for _ in range(n)]
    if special and n:
        for i in rng.sample(range(n), max(1, n // 10)):
            m[i] = rng.choice([0, 0x80000000, 0x7FC00000, 0x7F800000, 0x00000001, fbits(f32(1e30))])
            v[i] = rng.choice([0, 0x00000001, 0x7F800000, fbits(f32(1e38)), fbits(f32(1e-30))])
    if preset == 'extreme':
        for i in range(0, n, 3):
            # old near bf16's max, v = grad = 0: upd = lr * 9 m / eps (c1 = 10): choose m so that
            # old - upd lands in (bf16 max, FLT_MAX], or past it, or nearer to zero
            old = from_bits(0x7F7F0000 if (i // 3) % 2 == 0 else 0x7F7E0000)
            if with_master: old = from_bits(rng.choice([0x7F7F0000, 0x7F7F8000, 0x7F7FFFFF, 0x7F7F4000]))
            target = rng.choice([3.395e38, 3.40e38, 3.4028e38, 3.41e38, 3.0e38])
            mi = f32(-(target - old) / 9e8)   # 0.9 m after the step; mhat = 9 m, upd = 9e8 m
            m[i], v[i] = fbits(mi), 0
            grad[i] = FROM_F32[gdt](0)
            if with_master: master[i] = fbits(old); param[i] = FROM_F32[pdt](fbits(old))
            else: param[i] = FROM_F32[pdt](fbits(old))
    if preset == 'tie':
        for i in range(0, n, 2):   # zero moments, old = +-2^k: |upd| equals its half ulp exactly
            m[i], v[i], grad[i] = 0, 0, FROM_F32[gdt](0)
            w = fbits(f32(rng.choice([1.0, -2.0, 0.5, 2.0 ** -20, -(2.0 ** 60), 1.5, 2.0 ** -126])))
            if with_master: master[i] = w
            param[i] = FROM_F32[pdt](w)
    if preset == 'aggressive':
        for i in range(1, n, 4):   # tiny weights, zero moments: upd = lr * wd * old, underflows
            sub_ = rng.choice([0x00010000, 0x80010000, 0x00030000, 0x80020000, 0x00800000, 0x80000000, 0])
            m[i], v[i], grad[i] = 0, 0, FROM_F32[gdt](0)
            if with_master: master[i] = sub_; param[i] = FROM_F32[pdt](sub_)
            else: param[i] = FROM_F32[pdt](sub_)
    return param, master, grad, m, v

# ---------------- one tensor (adamw_update: a one-tensor table)
def case(R, n, pdt, gdt, with_master, sr, stats, preset, seed, grid=None, special=0.0):
    rng = random.Random(seed)
    p = dict(PRESETS[preset]); p['sr'] = sr
    what = 'adamw n=%d param=%s grad=%s master=%s sr=%s stats=%s %s grid=%s' % (
        n, pdt, gdt, with_master, sr, stats, preset, grid)
    param, master, grad, m, v = make_inputs(rng, n, pdt, gdt, with_master, preset, special)
    P, Mst, Mb, Vb, cnt, lost, errs, svalues, cvalues = gpu_adamw(pdt, param, master, grad, gdt, m, v, p, stats, grid, seed)
    R.errors(errs, what)
    for b in [P, Mb, Vb] + ([Mst] if Mst is not None else []): writes_once(R, b, what)
    ep, em, emm, ev, ecounts, elost, nows = cpu_adamw(pdt, param, master, grad, gdt, m, v, p, stats)
    compare(R, what + ' m', 'f32', Mb.data, emm, nan_loose=True)
    compare(R, what + ' v', 'f32', Vb.data, ev, nan_loose=True)
    if Mst is not None: compare(R, what + ' master', 'f32', Mst.data, em, nan_loose=True)
    compare(R, what + ' param', pdt, P.data, ep, nan_loose=True)
    R.check(ctr(cnt) == ecounts, '%s: cast counts %s, CPU %s' % (what, ctr(cnt), ecounts))
    R.check(lost == elost, '%s: lost updates %s, CPU %s' % (what, lost, elost))
    R.check(svalues == (n if stats else None), '%s: stats values %s, CPU %s' % (what, svalues, n))
    ev_ = cpu_cast_values(n, pdt, master, p)
    R.check(cvalues == ev_, '%s: weight cast values %s, CPU %s' % (what, cvalues, ev_))
    cov = {}
    if sr and pdt == 'bf16' and not with_master:   # elements stochastic rounding moved off nearest
        cov['sr_not_nearest'] = sum(1 for i in range(n) if ep[i] != fast_bf16_bits(nows[i]))
    key = 'sr' if (sr and pdt == 'bf16' and not with_master) else 'rn'
    cov[key + '_over'], cov[key + '_under'] = ecounts
    cov['lost'] = elost or 0
    return cov

def single_cases(which):
    s = 100
    cases = []
    for n in (0, 1, 5, 31, 33, 257, 700):
        for pdt, with_master, sr in (('f32', False, False), ('bf16', False, False), ('bf16', False, True),
                                     ('bf16', True, True), ('f16', True, False), ('f16', False, True)):
            s += 1
            gdt = ('f32', 'bf16', 'f16')[s % 3]
            preset = ('typical', 'aggressive', 'extreme', 'shard', 'tie')[s % 5]
            cases.append(dict(n=n, pdt=pdt, gdt=gdt, with_master=with_master, sr=sr, stats=(s % 5 != 0),
                              preset=preset, seed=s, special=(0.08 if s % 2 else 0.0)))
    # grid-stride: more elements than the reduced grid's threads (each thread 3-4 elements)
    for pdt, with_master, sr, preset in (('bf16', False, True, 'typical'), ('bf16', True, False, 'aggressive'),
                                         ('f16', False, False, 'extreme'), ('f32', False, False, 'shard'),
                                         ('bf16', False, False, 'aggressive'), ('bf16', False, True, 'extreme'),
                                         ('bf16', True, False, 'tie'), ('bf16', False, True, 'aggressive')):
        s += 1
        cases.append(dict(n=1800 + s % 7, pdt=pdt, gdt=('bf16', 'f32', 'f16')[s % 3], with_master=with_master,
                          sr=sr, stats=True, preset=preset, seed=s, grid=2, special=0.05))
    if which == 'quick':
        cases = [c for c in cases if c['n'] in (31, 257)] + [c for c in cases if c.get('grid')][:3]
    return cases

# ---------------- many tensors (adamw_update_many)
def expect_valid_plan(R, all_, ls, cfg, what):
    """test_cuda.cpp's expect_valid_plan: every launch's tensors all of its first's kind, at most
    per_launch of them, in the list's order, each with adamw_blocks(n) blocks; every tensor with
    elements in exactly one launch, the empty ones in none; launches in the order of their first
    tensors. Returns the problems' count."""
    bad = []
    seen = [0] * len(all_)
    prev_first = -1
    for li, l in enumerate(ls):
        if not l.tensors: bad.append('launch %d empty' % li); continue
        if len(l.tensors) > cfg.per_launch: bad.append('launch %d holds %d tensors' % (li, len(l.tensors)))
        if len(l.block_begin) != len(l.tensors) + 1 or l.block_begin[0] != 0:
            bad.append('launch %d block_begin %s' % (li, l.block_begin[:4])); continue
        if l.tensors[0] <= prev_first: bad.append('launch %d out of order' % li)
        prev_first = l.tensors[0]
        for j, t in enumerate(l.tensors):
            seen[t] += 1
            if j and t <= l.tensors[j - 1]: bad.append('launch %d tensors out of order' % li)
            if j and not adamw_same_launch(all_[l.tensors[0]], all_[t]):  # (not itself: NaN)
                bad.append('launch %d: tensor %d not of tensor %d\'s kind' % (li, t, l.tensors[0]))
            if l.block_begin[j + 1] - l.block_begin[j] != adamw_blocks(all_[t].n, cfg):
                bad.append('launch %d tensor %d: %d blocks' % (li, t, l.block_begin[j + 1] - l.block_begin[j]))
    for t in range(len(all_)):
        if seen[t] != (1 if all_[t].n > 0 else 0): bad.append('tensor %d in %d launches' % (t, seen[t]))
    R.check(not bad, '%s: plan: %s' % (what, bad[:4]))
    return len(bad)

def make_tensor(rng, spec):
    """A host AdamWTensors from spec: n, pdt, gdt, master, sr, preset; optional wd, seed,
    first_index (per tensor: the table's), lr, beta1, beta2, eps, step, grad_scale (per launch:
    the plan's kinds), special."""
    p = dict(PRESETS[spec['preset']]); p['sr'] = spec['sr']
    for k in ('wd', 'seed', 'first_index', 'lr', 'beta1', 'beta2', 'eps', 'step', 'grad_scale'):
        if spec.get(k) is not None: p[k] = spec[k]
    param, master, grad, m, v = make_inputs(rng, spec['n'], spec['pdt'], spec['gdt'], spec['master'],
                                            spec['preset'], spec.get('special', 0.0))
    return AdamWTensors(spec['n'], spec['pdt'], spec['gdt'], param, master, grad, m, v, p)

def run_mix(R, name, cfg, specs, steps=1, stats_on=True, seed=0):
    """adamw_update_many over the specs' tensors, `steps` optimizer steps (each step's inputs the
    last one's results, its p['step'] one more), against CpuBackend::adamw_update per tensor in
    order. Returns coverage counts."""
    rng = random.Random(seed)
    host = [make_tensor(rng, s) for s in specs]
    dev = [to_device(h, i) for i, h in enumerate(host)]
    cov = dict.fromkeys(('launches', 'multi_launches', 'full_launches', 'strided_in_multi', 'empty',
                         'sr_in_multi', 'master_and_none_in_one', 'wd_differ_in_one', 'kinds'), 0)
    for st in range(steps):
        if st:
            for h in host: h.p['step'] += 1   # dev shares the dicts
        for d in dev:
            for b in (d.param, d.master, d.grad, d.m, d.v):
                if b is not None: b.writes = [0] * b.n
        ctx, stats, errs = Context(), (Stats() if stats_on else None), []
        ls = adamw_update_many(ctx, dev, stats, cfg, errs, seed * 31 + st)
        ctx.collect_stats()
        what = '%s (%s) step %d' % (name, cfg, st + 1)
        R.errors(errs, what)
        expect_valid_plan(R, dev, ls, cfg, what)
        ecounts, evalues, elost, svalues = [0, 0], 0, 0, 0
        for i, h in enumerate(host):
            d = dev[i]
            w = '%s tensor %d (n=%d param=%s grad=%s master=%s sr=%s wd=%s)' % (
                what, i, h.n, h.pdt, h.gdt, h.master is not None, h.p['sr'], h.p['wd'])
            ep, em, emm, ev, cc, lost, nows = cpu_adamw(h.pdt, h.param, h.master, h.grad, h.gdt, h.m, h.v, h.p, stats_on)
            for b in [d.param, d.m, d.v] + ([d.master] if d.master is not None else []): writes_once(R, b, w)
            writes_once(R, d.grad, w, expect=0)
            compare(R, w + ' m', 'f32', d.m.data, emm, nan_loose=True)
            compare(R, w + ' v', 'f32', d.v.data, ev, nan_loose=True)
            if d.master is not None: compare(R, w + ' master', 'f32', d.master.data, em, nan_loose=True)
            compare(R, w + ' param', h.pdt, d.param.data, ep, nan_loose=True)
            ecounts[0] += cc[0]; ecounts[1] += cc[1]
            evalues += cpu_cast_values(h.n, h.pdt, h.master, h.p)
            elost += lost or 0
            svalues += h.n
            h.param, h.master, h.m, h.v = ep, em, emm, ev
        R.check(ctr(ctx.counters) == tuple(ecounts), '%s: cast counts %s, CPU %s' % (what, ctr(ctx.counters), ecounts))
        R.check(ctx.values == evalues, '%s: weight cast values %s, CPU %s' % (what, ctx.values, evalues))
        if stats_on:
            R.check(stats.values == svalues, '%s: stats values %s, CPU %s' % (what, stats.values, svalues))
            R.check(stats.lost_updates == elost, '%s: lost updates %s, CPU %s' % (what, stats.lost_updates, elost))
        else:
            R.check(ctx.zeroed == 0 and not ctx.lost.data[0], '%s: the lost counter used without stats' % what)
        if st == 0:
            cov['launches'] += len(ls)
            reps = []
            for l in ls:
                if l.tensors and not any(adamw_same_launch(dev[r], dev[l.tensors[0]]) for r in reps): reps.append(l.tensors[0])
            cov['kinds'] = max(cov['kinds'], len(reps))
            cov['empty'] += sum(1 for h in host if h.n == 0)
            for l in ls:
                ts = [dev[t] for t in l.tensors]
                if len(ts) < 2: continue
                cov['multi_launches'] += 1
                cov['full_launches'] += len(ts) == cfg.per_launch
                cov['strided_in_multi'] += sum(1 for t in ts if t.n > cfg.cap * cfg.block)
                cov['sr_in_multi'] += sum(1 for t in ts if adamw_stochastic(t))
                cov['master_and_none_in_one'] += len(set(t.master is None for t in ts)) == 2
                cov['wd_differ_in_one'] += len(set(f32(t.p['wd']) for t in ts)) > 1
            cov['lost'] = elost
            cov['over'], cov['under'] = ecounts
    return cov

def mixes(which):
    """(name, cfg, specs, steps, stats on, seed) of the multi-tensor runs."""
    out = []
    g = random.Random(5)
    rnd64 = lambda: g.getrandbits(64)
    FI = (0, 1000003, 3 * 2 ** 31 + 17, 5)
    # bf16 training: masters (round to nearest), in place stochastic and in place nearest, fp32
    # and bf16 gradients; awkward sizes, several over cap * kBlock = 192; weight decay, seed and
    # first index differing within launches; two steps.
    sizes = [0, 1, 64, 65, 191, 192, 193, 450, 31, 1, 0, 130, 700, 7, 33, 257, 5, 129, 300, 2]
    wds = (None, 0.0, 0.1, 1.0, 0.0625, 0.01)
    specs = [dict(n=n, pdt='bf16', gdt='bf16' if i % 5 == 4 else 'f32', master=i % 3 == 0,
                  sr=i % 4 != 1, preset='tie' if i % 6 == 5 else 'typical', wd=wds[i % 6],
                  seed=rnd64(), first_index=FI[i % 4], special=0.05 if i % 2 else 0.0)
             for i, n in enumerate(sizes)]
    out.append(('bf16 training', Cfg(64, 3, 5), specs, 2, True, 11))
    # fp16 (with and without masters; the sr flag is no kind for fp16) and fp32 weights, all
    # three gradient dtypes, the aggressive and extreme presets (underflows, overflows).
    sizes = [5, 0, 64, 65, 100, 1, 129, 33, 300, 2, 31, 96, 63, 17, 250, 3, 40, 1]
    specs = []
    for i, n in enumerate(sizes):
        pdt = ('f16', 'f16', 'f32')[i % 3]
        specs.append(dict(n=n, pdt=pdt, gdt=('f16', 'f32', 'bf16')[(i // 3) % 3] if pdt != 'f32' else 'f32',
                          master=pdt == 'f16' and i % 2 == 0, sr=i % 4 == 1,
                          preset=('aggressive', 'extreme', 'typical')[(i // 2) % 3],
                          wd=(None, 0.5, 0.0)[i % 3] if i % 4 != 3 else None,
                          seed=rnd64(), first_index=FI[i % 4], special=0.06 if i % 3 == 1 else 0.0))
    out.append(('fp16/fp32', Cfg(32, 2, 4), specs, 1, True, 12))
    # kinds: every preset (lr, betas, step, grad_scale differ), other steps and grad scales, two
    # tensors with a NaN lr (the same bits: one kind), bf16/f16/f32 interleaved: many
    # kinds open at once; launches of 3.
    specs = []
    for i in range(24):
        pdt = ('bf16', 'bf16', 'f16', 'bf16', 'f32')[i % 5]
        master = pdt != 'f32' and i % 3 == 0
        specs.append(dict(n=(0, 1, 70, 129, 200, 257, 33, 64)[i % 8] + (i % 5), pdt=pdt,
                          gdt=('f32', 'bf16')[(i // 4) % 2] if pdt == 'bf16' else pdt,
                          master=master, sr=i % 2 == 0,
                          preset=('typical', 'shard', 'aggressive', 'tie', 'extreme')[(i // 5) % 5],
                          wd=(None, 0.2, 0.0)[i % 3], seed=rnd64(), first_index=FI[(i + 1) % 4],
                          lr=float('nan') if i in (7, 19) else None,
                          step=9 if i % 11 == 4 else None, grad_scale=0.25 if i % 7 == 6 else None,
                          special=0.05 if i % 4 == 2 else 0.0))
    out.append(('kinds', Cfg(64, 2, 3), specs, 2, True, 13))
    # one field apart: tensors of one kind but for one field each (what adamw_same_launch
    # compares), between tensors of the base kind that share launches (with and without a master,
    # weight decays differing): a plan that ignored the field would put the tensor in a launch
    # with the base kind's hyperparameters, gradient dtype or rounding.
    base = dict(pdt='bf16', gdt='f32', master=False, sr=False, preset='typical')
    apart = [dict(), dict(sr=True), dict(step=1), dict(grad_scale=0.25), dict(gdt='bf16'),
             dict(master=True), dict(lr=2e-3), dict(beta1=0.8), dict(beta2=0.95), dict(eps=1e-6),
             dict(wd=0.0), dict(pdt='f16'), dict(sr=True, seed=77), dict(first_index=1000003)]
    specs = []
    for i, d in enumerate(apart):
        sp = dict(base, n=(70, 129, 33, 200, 5, 150)[i % 6], seed=rnd64(), special=0.04 if i % 3 == 0 else 0.0)
        sp.update(d)
        specs.append(sp)
    out.append(('one field apart', Cfg(64, 2, 4), specs, 1, True, 17))
    # the real constants: 256 threads, the 65535 cap, 40 tensors a launch, 47 bf16 tensors with
    # masters (two launches) and 4 stochastic ones, two empty.
    specs = []
    for i in range(53):
        n = 0 if i in (3, 40) else (300 if i == 20 else 513 if i == 45 else 1 + (i * 7) % 37)
        specs.append(dict(n=n, pdt='bf16', gdt='f32', master=i % 13 != 5, sr=True,
                          preset='typical', wd=(0.1, 0.0)[i % 2], seed=rnd64(), first_index=FI[i % 4],
                          special=0.03 if i % 5 == 0 else 0.0))
    out.append(('real constants', REAL, specs, 1, True, 14))
    # no stats: the lost counter untouched; launches of 6, cap 3 blocks of 32.
    specs = [dict(n=n, pdt=('bf16', 'bf16', 'f16')[i % 3], gdt='f32', master=i % 4 == 0, sr=i % 2 == 1,
                  preset='typical', wd=(0.1, 0.0, 0.3)[i % 3], seed=rnd64(), first_index=FI[i % 4])
             for i, n in enumerate([97, 0, 1, 150, 33, 96, 5, 200, 64, 12, 3, 130])]
    out.append(('no stats', Cfg(32, 3, 6), specs, 1, False, 15))
    # nothing to update: no launch
    specs = [dict(n=0, pdt='bf16', gdt='f32', master=i == 1, sr=True, preset='typical') for i in range(3)]
    out.append(('all empty', Cfg(32, 2, 3), specs, 1, True, 16))
    if which == 'quick':
        out = [o for o in out if o[0] in ('bf16 training', 'kinds', 'one field apart', 'all empty')]
    return out

# ---------------- the plan alone at the real constants: test_cuda.cpp's AdamWPlan cases
def plan_tensor(n, pdt, gdt, master, sr=False):  # test_cuda.cpp adamw_tensors()
    p = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.1, step=3, grad_scale=1.0, sr=sr, seed=1, first_index=0)
    return AdamWTensors(n, pdt, gdt, None, 'defined' if master else None, None, None, None, p)

def plan_tests(R):
    cfg = REAL
    for n, b in ((0, 1), (1, 1), (kBlock, 1), (kBlock + 1, 2), (65535 * kBlock, 65535),
                 (65535 * kBlock + 1, 65535), (50304 * 768, 65535)):
        R.check(adamw_blocks(n, cfg) == b, 'plan: adamw_blocks(%d) = %d, want %d' % (n, adamw_blocks(n, cfg), b))
    C = 768
    sizes = [50304 * C, 1024 * C]
    for _ in range(12):
        sizes += [C, C, 3 * C * C, 3 * C, C * C, C, C, C, 4 * C * C, 4 * C, 4 * C * C, C]
    sizes += [C, C]
    all_ = [plan_tensor(n, 'bf16', 'f32', True) for n in sizes]
    ls = plan_adamw_launches(all_, cfg)
    expect_valid_plan(R, all_, ls, cfg, 'plan GPT-2 148')
    got = [len(l.tensors) for l in ls], [l.tensors[:1] for l in ls]
    R.check(got == ([40, 40, 40, 28], [[0], [40], [80], [120]]), 'plan GPT-2 148: launches %s' % (got,))
    all_ = []
    for i in range(50):
        t = plan_tensor(100 + i, 'bf16', 'f32', i % 3 == 0, i % 3 == 1)
        t.p['wd'] = 0.0 if i % 2 else 0.1
        t.p['seed'] = i; t.p['first_index'] = i
        all_.append(t)
    all_.append(plan_tensor(0, 'bf16', 'f32', True))
    all_.append(plan_tensor(7, 'bf16', 'bf16', True))
    all_.append(plan_tensor(7, 'f16', 'f32', True))
    t = plan_tensor(9, 'bf16', 'f32', True); t.p['step'] = 4; all_.append(t)
    t = plan_tensor(9, 'bf16', 'f32', True); t.p['grad_scale'] = 0.5; all_.append(t)
    t = plan_tensor(9, 'bf16', 'f32', True); t.p['wd'] = -0.0; all_.append(t)  # per tensor: the first kind
    all_.append(plan_tensor(11, 'bf16', 'f32', True))
    ls = plan_adamw_launches(all_, cfg)
    expect_valid_plan(R, all_, ls, cfg, 'plan kinds')
    ok = (len(ls) == 6 and len(ls[0].tensors) == 35 and ls[0].tensors[-1] == len(all_) - 1 and
          len(ls[1].tensors) == 17 and ls[1].tensors[0] == 1 and
          all(ls[k].tensors == [49 + k] for k in range(2, 6)))
    R.check(ok, 'plan kinds: launches %s' % [l.tensors[:3] for l in ls])
    all_ = [plan_tensor(5, 'bf16', 'f32', True), plan_tensor(5, 'bf16', 'f32', True)]
    all_[0].p['lr'], all_[1].p['lr'] = 0.0, -0.0
    R.check(not adamw_same_launch(all_[0], all_[1]) and len(plan_adamw_launches(all_, cfg)) == 2,
            'plan: lr +0.0 and -0.0 share a launch')
    all_[1].p['lr'] = 0.0
    R.check(adamw_same_launch(all_[0], all_[1]), 'plan: lr +0.0 and +0.0 do not share a launch')
    all_[0].p['eps'] = all_[1].p['eps'] = float('nan')
    R.check(adamw_same_launch(all_[0], all_[1]), 'plan: the same NaN eps does not share a launch')

# ---------------- signed zeros and NaNs among the shared hyperparameters
def signed_zero_checks(R):
    """Two fp32 tensors of one element whose shared hyperparameter is +0.0 in one and -0.0 in
    the other: in e4f7928 (float ==) they shared a launch and the second was updated with the
    first's value, which changes a zero's sign (lr: weight -0 becomes +0 under -0, stays -0
    under +0; beta1, grad_scale: m's zero). Now (bits compared) two launches, the CPU's bits.
    The same NaN in both (eps): one launch (the same arithmetic), the CPU's bits."""
    def pair(field, v0, v1, param_bits, m_bits, grad_bits, launches):
        hs = []
        for val in (v0, v1):
            p = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.1, step=1, grad_scale=1.0,
                     sr=False, seed=0, first_index=0)
            p[field] = val
            hs.append(AdamWTensors(1, 'f32', 'f32', [param_bits], None, [grad_bits], [m_bits], [0], p))
        dev = [to_device(h, i) for i, h in enumerate(hs)]
        ctx, errs = Context(), []
        what = 'signed zeros: %s %r and %r' % (field, v0, v1)
        ls = adamw_update_many(ctx, dev, Stats(), Cfg(32, 2, 3), errs)
        R.errors(errs, what)
        R.check(len(ls) == launches, '%s: %d launches, want %d' % (what, len(ls), launches))
        for i, h in enumerate(hs):
            ep, em, emm, ev, _, _, _ = cpu_adamw(h.pdt, h.param, h.master, h.grad, h.gdt, h.m, h.v, h.p, True)
            w = '%s tensor %d (param 0x%08x, m 0x%08x, grad 0x%08x)' % (what, i, param_bits, m_bits, grad_bits)
            compare(R, w + ' param', 'f32', dev[i].param.data, ep)   # exact: the zeros' signs
            compare(R, w + ' m', 'f32', dev[i].m.data, emm)
    pair('lr', 0.0, -0.0, 0x80000000, fbits(1e-3), fbits(0.5), 2)      # -0 - (+0) vs -0 - (-0)
    pair('beta1', 0.0, -0.0, fbits(0.25), fbits(1.0), 0x80000000, 2)   # m: +0 + -0 vs -0 + -0
    pair('grad_scale', 0.0, -0.0, fbits(0.25), 0x80000000, fbits(1.0), 2)
    pair('eps', float('nan'), float('nan'), fbits(0.25), fbits(1e-3), fbits(0.5), 1)

def main(which='all'):
    R = Report('adamw')
    t0 = time.time()
    cov = dict.fromkeys(('rn_over', 'rn_under', 'sr_over', 'sr_under', 'sr_not_nearest', 'lost'), 0)
    ncases = nmix = 0
    if which not in ('multi', 'mixes'):
        cases = single_cases(which)
        ncases = len(cases)
        for c in cases:
            for k, x in case(R, **c).items(): cov[k] += x
    mcov = {}
    if which != 'single':
        if which != 'mixes': plan_tests(R)
        signed_zero_checks(R)
        ms = mixes(which)
        nmix = len(ms)
        for name, cfg, specs, steps, stats_on, seed in ms:
            for k, x in run_mix(R, name, cfg, specs, steps, stats_on, seed).items():
                mcov[k] = mcov.get(k, 0) + x
    print(R.summary(), '(%.0fs; %d single-tensor cases, %d multi-tensor mixes)' % (time.time() - t0, ncases, nmix))
    if which == 'all':  # the quick subsets are too small to reach every count
        print('  CPU totals over the single-tensor cases: %s' % cov)
        print('  over the mixes: %s' % mcov)
        R.check(all(cov.values()), 'coverage: some count never non-zero %s' % cov)
        R.check(all(mcov.values()), 'coverage (mixes): some count never non-zero %s' % mcov)
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
