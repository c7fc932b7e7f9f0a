# Lane-level SIMT emulator: every CUDA thread is a Python generator that yields at warp
# shuffles, __syncwarp and __syncthreads; fp32 arithmetic rounded after every operation.
import struct, math, random

# ---------------- number formats
def f32(x):
    try:
        return struct.unpack('<f', struct.pack('<f', x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)

def fbits(x):
    return struct.unpack('<I', struct.pack('<f', x))[0]

def from_bits(b):
    return struct.unpack('<f', struct.pack('<I', b & 0xFFFFFFFF))[0]

def bf16(x):
    b = fbits(x)
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return from_bits((b | 0x00400000) & 0xFFFF0000)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFFFFFF
    return from_bits(b & 0xFFFF0000)

def f16(x):
    try:
        return struct.unpack('<e', struct.pack('<e', x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)

ROUND = {'f32': lambda x: x, 'f16': f16, 'bf16': bf16}
ESIZE = {'f32': 4, 'f16': 2, 'bf16': 2, 'i32': 4, 'u8': 1, 'u32': 4}
MAXF = {'f32': 3.40282347e38, 'f16': 65504.0, 'bf16': 3.38953139e38}
FLT_MAX = f32(3.40282347e38)
for k in MAXF: MAXF[k] = f32(MAXF[k])

def narrow(T): return T != 'f32'

# correctly rounded fp32 ops (double then float: exact for + - * / sqrt by Figueroa)
def add(a, b): return f32(a + b)
def sub(a, b): return f32(a - b)
def mul(a, b):
    return f32(a * b)
def div(a, b):
    if b == 0.0:
        if a == 0.0 or a != a: return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)
    return f32(a / b)
def sqrt_rn(a):
    if a < 0: return math.nan
    return f32(math.sqrt(a))
def expf(x):  # correctly rounded model of CUDA expf (device: <= 2 ulp, not correctly rounded)
    if x != x: return x
    try:
        return f32(math.exp(x))
    except OverflowError:
        return math.inf
def logf(x):  # model of CUDA logf (device: <= 1 ulp)
    if x != x or x < 0: return math.nan
    if x == 0: return -math.inf
    if x == math.inf: return math.inf
    return f32(math.log(x))
def fmaxf(a, b):
    if a != a: return b
    if b != b: return a
    return a if a >= b else b

# ---------------- memory
class Err(Exception):
    pass

class Buf:
    """A global allocation: element values (already in the format), byte base address."""
    def __init__(self, name, dtype, n, init=None, base=256):
        self.name, self.dtype, self.n, self.base = name, dtype, n, base
        if init is None:
            self.data = [None] * n  # uninitialised
        else:
            assert len(init) == n
            r = ROUND.get(dtype, lambda x: x)
            self.data = [r(f32(v)) if dtype not in ('i32', 'u8', 'u32') else v for v in init]
        self.writes = [0] * n
    def copy(self, name=None):
        b = Buf(name or self.name, self.dtype, self.n, None, self.base)
        b.data = list(self.data)
        return b

class Shared:
    def __init__(self, name, n):
        self.name, self.n = name, n
        self.data = [None] * n
        self.log = {}  # i -> [interval, {writer tid: warp epoch}, {reader tid: warp epoch}, raced]

class Launch:
    def __init__(self, name, errors):
        self.name = name
        self.errors = errors
        self.events = {}  # (bufname, i) -> list of (block, tid, interval, kind)
    def err(self, msg):
        if len(self.errors) < 200:
            self.errors.append('%s: %s' % (self.name, msg))

class Thread:
    def __init__(self, launch, block, tid, bdim, bidx, gdim, shared, bstate):
        self.L = launch
        self.block = block  # linear block id
        self.tid = tid      # linear thread id
        self.tx = tid % bdim[0]
        self.ty = tid // bdim[0]
        self.bdim = bdim
        self.bx, self.by = bidx
        self.gdim = gdim
        self.sh = shared
        self.bs = bstate  # {'interval': __syncthreads passed, 'warp': [__syncwarps passed, per warp]}

    def _ev(self, buf, i, kind):
        self.L.events.setdefault((buf.name, i + getattr(buf, 'off', 0)), []).append(
            (self.block, self.tid, self.bs['interval'], kind))

    def ld(self, buf, i, dt=None):
        if dt is not None and dt != buf.dtype:
            self.L.err('load of %s as %s (it is %s)' % (buf.name, dt, buf.dtype))
        if not (0 <= i < buf.n):
            self.L.err('OOB read %s[%d] (n=%d) block %d thread %d' % (buf.name, i, buf.n, self.block, self.tid))
            return math.nan
        v = buf.data[i]
        if v is None:
            self.L.err('uninitialised read %s[%d] block %d thread %d' % (buf.name, i, self.block, self.tid))
            return math.nan
        self._ev(buf, i, 'r')
        return v

    def st(self, buf, i, v, T=None):
        if T is not None and T != buf.dtype:
            self.L.err('store to %s as %s (it is %s)' % (buf.name, T, buf.dtype))
        if not (0 <= i < buf.n):
            self.L.err('OOB write %s[%d] (n=%d) block %d thread %d' % (buf.name, i, buf.n, self.block, self.tid))
            return
        if buf.dtype in ROUND and v == v and ROUND[buf.dtype](v) != v:
            self.L.err('store of an unrounded value into %s' % buf.name)
        buf.data[i] = v
        buf.writes[i] += 1
        self._ev(buf, i, 'w')

    def _align(self, buf, i, nbytes):
        addr = buf.base + i * ESIZE[buf.dtype]
        if addr % nbytes:
            self.L.err('misaligned %d-byte access %s[%d] (address %d)' % (nbytes, buf.name, i, addr))

    def ldv(self, buf, i, k):
        self._align(buf, i, k * ESIZE[buf.dtype])
        return [self.ld(buf, i + j) for j in range(k)]

    def stv(self, buf, i, vals):
        self._align(buf, i, len(vals) * ESIZE[buf.dtype])
        for j, v in enumerate(vals):
            self.st(buf, i + j, v)

    def atomic_add(self, buf, i, v):
        if not (0 <= i < buf.n):
            self.L.err('OOB atomic %s[%d]' % (buf.name, i)); return
        buf.data[i] = (buf.data[i] or 0) + v

    def atomic_max(self, buf, i, v):
        if not (0 <= i < buf.n):
            self.L.err('OOB atomic %s[%d]' % (buf.name, i)); return
        buf.data[i] = max(buf.data[i] or 0, v)

    def _shev(self, arr, i, kind):
        """Race check: two accesses to a word by two threads, one of them a write, race unless a
        __syncthreads (the interval) or, for two lanes of one warp, a __syncwarp lies between
        them. Once a word has raced, every later access to it in the interval is reported."""
        if not (0 <= i < arr.n):
            self.L.err('OOB shared %s[%d] (n=%d)' % (arr.name, i, arr.n)); return False
        iv = self.bs['interval']
        tid, w = self.tid, self.tid >> 5
        ep = self.bs['warp'][w]
        rec = arr.log.get(i)
        if rec is None or rec[0] != iv:
            rec = [iv, {}, {}, False]; arr.log[i] = rec
        ws, rs = rec[1], rec[2]
        if not rec[3]:
            rec[3] = any(t != tid and not (t >> 5 == w and e < ep)
                         for d in ((ws, rs) if kind == 'w' else (ws,)) for t, e in d.items())
        (ws if kind == 'w' else rs)[tid] = ep  # epochs only grow: a thread's latest suffices
        if rec[3]:
            self.L.err('shared race on %s[%d] in barrier interval %d (writers %s readers %s)'
                       % (arr.name, i, iv, sorted(ws)[:4], sorted(rs.keys() - ws.keys())[:4]))
        return True

    def shld(self, arr, i):
        if not self._shev(arr, i, 'r'): return math.nan
        v = arr.data[i]
        if v is None:
            self.L.err('uninitialised shared read %s[%d]' % (arr.name, i)); return math.nan
        return v

    def shst(self, arr, i, v):
        if self._shev(arr, i, 'w'): arr.data[i] = v

# ---------------- collectives (used with `yield from`)
def shfl_xor(v, off):
    r = yield ('xor', v, off)
    return r

def shfl_down(v, off):
    r = yield ('down', v, off)
    return r

def syncthreads():
    yield ('sync',)

def syncwarp():
    """__syncwarp() (full mask): orders the shared-memory accesses of the warp's lanes."""
    yield ('syncwarp',)

MUT = set()  # mutation flags

def warp_sum(v):
    for off in (16, 8, 4, 2, 1):
        if 'warp_sum_down' in MUT:
            o = yield ('down', v, off)
        else:
            o = yield ('xor', v, off)
        v = add(v, o)
    return v

def warp_max(v):
    for off in (16, 8, 4, 2, 1):
        o = yield ('xor', v, off)
        v = fmaxf(v, o)
    return v

def block_sum(t, v, shared):
    lane, warp, nwarps = t.tid & 31, t.tid >> 5, (t.bdim[0] * t.bdim[1]) >> 5
    v = yield from warp_sum(v)
    if 'block_sum_nosync' not in MUT:
        yield ('sync',)
    if lane == 0: t.shst(shared, warp, v)
    yield ('sync',)
    s = 0.0
    for w in range(nwarps): s = add(s, t.shld(shared, w))
    return s

def block_max(t, v, shared):
    lane, warp, nwarps = t.tid & 31, t.tid >> 5, (t.bdim[0] * t.bdim[1]) >> 5
    v = yield from warp_max(v)
    yield ('sync',)
    if lane == 0: t.shst(shared, warp, v)
    yield ('sync',)
    m = t.shld(shared, 0)
    for w in range(1, nwarps): m = fmaxf(m, t.shld(shared, w))
    return m

class Tally:
    def __init__(self):
        self.over = 0; self.under = 0
    def add(self, x, stored, maxf):
        a = abs(x)
        self.over += int(a > maxf and a <= FLT_MAX)
        self.under += int(x != 0.0 and stored == 0.0)
    def add_stored(self, stored):
        """CastTally::add_stored (uncommitted change of 2026-12-02): a value a GEMM stored in the
        narrow type itself; an infinity counts as an overflow, nothing as an underflow. Mutation
        'add_stored_nan' counts a NaN as well."""
        self.over += int(stored in (math.inf, -math.inf) or
                         ('add_stored_nan' in MUT and stored != stored))
    def flush(self, t, counters):
        o, u = self.over, self.under
        if 'tally_noreduce' not in MUT:
            for off in (16, 8, 4, 2, 1):
                r = yield ('down', o, off); o += r
                r = yield ('down', u, off); u += r
        else:
            yield ('down', 0, 1)
        if (t.tid & 31) == 0:  # threadIdx.x & 31 (blockDim.x multiple of 32 here)
            if o: t.atomic_add(counters, 0, o)
            if u: t.atomic_add(counters, 1, u)

def store_counted(t, buf, i, x, tally, T):
    y = ROUND[T](x)
    t.st(buf, i, y, T)
    if narrow(T): tally.add(x, y, MAXF[T])

# ---------------- scheduler
def launch(name, kernel, grid, block, args, errors, seed=0, shared_spec=()):
    """grid=(gx,gy), block=(bx,by). shared_spec: list of (name, n) per block."""
    L = Launch(name, errors)
    rng = random.Random(seed)
    gx, gy = grid
    bx, by = block
    nthreads = bx * by
    blocks = [(x, y) for y in range(gy) for x in range(gx)]
    order = list(range(len(blocks)))
    rng.shuffle(order)
    for bl in order:
        bidx = blocks[bl]
        shared = {nm: Shared(nm, n) for nm, n in shared_spec}
        bs = {'interval': 0, 'warp': [0] * ((nthreads + 31) // 32)}
        ths = [Thread(L, bl, tid, block, bidx, grid, shared, bs) for tid in range(nthreads)]
        gens = [kernel(th, *args) for th in ths]
        alive = [True] * nthreads
        req = [None] * nthreads
        send = [None] * nthreads
        started = [False] * nthreads
        while any(alive):
            idx = [i for i in range(nthreads) if alive[i] and req[i] is None]
            rng.shuffle(idx)
            for i in idx:
                try:
                    r = gens[i].send(send[i]) if started[i] else next(gens[i])
                    started[i] = True
                    req[i] = r
                except StopIteration:
                    alive[i] = False
            progress = False
            for w in range(nthreads // 32):
                lanes = range(32 * w, 32 * w + 32)
                shf = [i for i in lanes if alive[i] and req[i][0] in ('xor', 'down', 'syncwarp')]
                if not shf: continue
                ops = set(req[i][0] if req[i][0] == 'syncwarp' else (req[i][0], req[i][2]) for i in shf)
                if len(shf) != 32:
                    L.err('full-mask %s with %d lanes (block %d warp %d)'
                          % ('__syncwarp' if 'syncwarp' in ops else 'shuffle', len(shf), bl, w))
                    raise Err('deadlock')
                if len(ops) != 1:
                    L.err('lanes at different shuffles %s' % ops); raise Err('deadlock')
                op = ops.pop()
                if op == 'syncwarp':
                    bs['warp'][w] += 1
                    for i in lanes:
                        send[i] = None; req[i] = None
                    progress = True
                    continue
                op, off = op
                vals = [req[i][1] for i in lanes]
                for l, i in enumerate(lanes):
                    if op == 'xor': src = l ^ off
                    else: src = l + off if l + off < 32 else l
                    send[i] = vals[src]
                    req[i] = None
                progress = True
            if progress: continue
            live = [i for i in range(nthreads) if alive[i]]
            if not live: break
            if all(req[i][0] == 'sync' for i in live):
                if len(live) != nthreads:
                    L.err('__syncthreads with %d of %d threads exited' % (nthreads - len(live), nthreads))
                bs['interval'] += 1
                for i in live:
                    send[i] = None; req[i] = None
            else:
                L.err('stuck: %s' % set(req[i][0] for i in live)); raise Err('deadlock')
    # global races: a write and another thread's access not ordered by a barrier of one block
    for key, evs in L.events.items():
        ws = [e for e in evs if e[3] == 'w']
        if not ws: continue
        for w_ in ws:
            for e in evs:
                if (e[0], e[1]) == (w_[0], w_[1]): continue
                if e[0] == w_[0] and e[2] != w_[2]: continue
                L.err('global race on %s[%d]: write by block %d thread %d, %s by block %d thread %d'
                      % (key[0], key[1], w_[0], w_[1], e[3], e[0], e[1]))
                break
            else:
                continue
            break
    return L

# ---------------- additions for matmul-embedding-attention/ (u8/u32 buffers above, too)
def reduce_max_sync(v):
    """__reduce_max_sync(0xFFFFFFFF, v) on unsigned ints: a full-warp collective (modelled as an
    xor butterfly of the scheduler's shuffles, so every lane must reach it)."""
    for off in (16, 8, 4, 2, 1):
        o = yield ('xor', v, off)
        v = v if v >= o else o
    return v

def fma32(a, b, c):
    """fmaf: one rounding of a*b + c (exact in Python's rationals via fractions for safety)."""
    from fractions import Fraction
    if any(x != x or x in (math.inf, -math.inf) for x in (a, b, c)):
        return f32(a * b + c)
    r = Fraction(a) * Fraction(b) + Fraction(c)
    if r == 0:
        # IEEE: exact zero sum has sign + under RNE unless both -0
        p = math.copysign(1.0, a) * math.copysign(1.0, b)
        return -0.0 if (p < 0 and math.copysign(1.0, c) < 0) else 0.0
    return f32_of_fraction(r)

def f32_of_fraction(r):
    """Round a Fraction to the nearest fp32 (ties to even), via double when exact enough."""
    from fractions import Fraction
    sign = -1 if r < 0 else 1
    a = abs(r)
    # exponent
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a: e -= 1
    e = max(e, -126)
    q = a / (Fraction(2) ** (e - 23))  # scaled so that the fp32 significand is the integer part
    n = q.numerator // q.denominator
    rem = q - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n & 1): n += 1
    v = n * 2.0 ** (e - 23)
    return f32(sign * v)

# ---------------- comparison helpers the scripts share
def key(v):
    """bit identity of a value (0.0 vs -0.0, NaN payload as stored)."""
    if v is None: return None
    if isinstance(v, int): return ('i', v)
    return fbits(v)

def ulp(T, x):
    x = abs(x)
    if T == 'f32': p, emin = 24, -126
    elif T == 'bf16': p, emin = 8, -126
    else: p, emin = 11, -14
    e = max(math.frexp(x)[1] - 1 if x else emin, emin)
    return 2.0 ** (e - p + 1)

def cpu_cast_counts(vals32, T):
    """The CPU commit()'s counts over fp32 values stored into T: (over, under)."""
    if T == 'f32': return (0, 0)
    over = under = 0
    mb = fbits(MAXF[T])
    for x in vals32:
        y = ROUND[T](x)
        a = fbits(x) & 0x7FFFFFFF
        over += int(a > mb and a <= 0x7F7FFFFF)
        under += int(a != 0 and y == 0.0)
    return (over, under)

def counters():
    """A CastTally's device counters: [overflows, underflows]."""
    return Buf('counters', 'i32', 2, [0, 0])

def ctr(c): return (c.data[0] or 0, c.data[1] or 0)

class Report:
    """Checks and failures of one script: summary() is its 'N checks, M failures' line."""
    def __init__(self, name=''):
        self.name = name; self.fail = []; self.checks = 0
    def check(self, ok, msg):
        self.checks += 1
        if not ok and len(self.fail) < 1000: self.fail.append(msg)
        return ok
    def errors(self, errs, what):
        self.checks += 1
        if errs: self.fail.append('%s: %d emulator errors, first: %s' % (what, len(errs), errs[0]))
    def summary(self):
        return '%s: %d checks, %d failures%s' % (self.name, self.checks, len(self.fail),
                                                 ('; first: ' + self.fail[0][:300]) if self.fail else '')
