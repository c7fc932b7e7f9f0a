# Shared pieces of these emulations: bit-level transcriptions of core/formats.h (what the device
# code and the CUDA host code call) and of backend/cpu/fast_formats.h (what the CPU backend's
# loops call), models of the CUDA conversion intrinsics, the comparison report, special values,
# and launch_sw: simt.launch plus __syncwarp, with happens-before race checks for shared memory
# (norm.cu's kernel synchronises its warps with __syncwarp, which simt.py does not model).
#
# Tensors are held as bit patterns (ints), every dtype: Python floats cannot hold fp32
# signalling NaNs (a round trip through a double quiets them), and the casts promise the bits.
import math, random, struct
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import f32, fbits, from_bits, add, sub, mul, div, sqrt_rn, expf, MUT, Tally, Buf, launch, Err

ABS, INF, QUIET = 0x7FFFFFFF, 0x7F800000, 0x00400000
FLT_MAX = from_bits(0x7F7FFFFF)
DTYPES = ('f32', 'f16', 'bf16', 'e4m3', 'e5m2')
NBITS = {'f32': 32, 'f16': 16, 'bf16': 16, 'e4m3': 8, 'e5m2': 8}
# dtype_traits(dt).max_finite (core/dtype.h) as the float the kernels and the CPU compare with
MAXF = {'f32': FLT_MAX, 'f16': 65504.0, 'bf16': f32(float.fromhex('0x1.fep127')),
        'e4m3': 448.0, 'e5m2': 57344.0}
for _d in DTYPES:  # buffers of bit patterns: one tag per dtype (simt's alignment table)
    simt.ESIZE[_d + 'b'] = max(1, NBITS[_d] // 8)
simt.ESIZE['f64'] = 8

def u32(x): return x & 0xFFFFFFFF
def u64(x): return x & 0xFFFFFFFFFFFFFFFF
def is_nan32(b): return (b & ABS) > INF

# ---------------- core/formats.h (device code, CUDA host code, the CPU's scalar paths)
def round_magnitude_rne(a, M, B):
    if B == 127:
        shift = 23 - M
        return u32(a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift
    kMinNormalExp = 127 + 1 - B
    e = a >> 23
    if e >= kMinNormalExp:
        sig, shift = a, 23 - M
    else:
        sig = ((a & 0x7FFFFF) | 0x800000) if e else a
        shift = (23 - M) + (kMinNormalExp - (e if e else 1))
        if shift > 25: return 0
    kept = sig >> shift
    rest = sig & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = int(rest > half or (rest == half and (kept & 1) == 1))
    if e >= kMinNormalExp: return u32(kept + up - ((127 - B) << M))
    return kept + up

def widen_magnitude(mag, M, B):
    exp = mag >> M
    man = mag & ((1 << M) - 1)
    if exp != 0: return ((exp + 127 - B) << 23) | (man << (23 - M))
    if man == 0: return 0
    e = 1 - B
    while not (man & (1 << M)):
        man <<= 1; e -= 1
    return ((e + 127) << 23) | ((man & ((1 << M) - 1)) << (23 - M))

def f16_to_f32(h):
    sign = (h & 0x8000) << 16
    mag = h & 0x7FFF
    if mag >= 0x7C00:
        man = (mag & 0x3FF) << 13
        return sign | INF | man | (QUIET if man else 0)
    return sign | widen_magnitude(mag, 10, 15)

def bf16_to_f32(b):
    u = b << 16
    if (u & ABS) > INF: u |= QUIET
    return u

def e4m3_to_f32(v):
    sign = (v & 0x80) << 24
    mag = v & 0x7F
    if mag == 0x7F: return sign | 0x7FF00000
    return sign | widen_magnitude(mag, 3, 7)

def e5m2_to_f32(v):
    sign = (v & 0x80) << 24
    mag = v & 0x7F
    if mag >= 0x7C:
        man = (mag & 0x3) << 21
        return sign | INF | man | (QUIET if man else 0)
    return sign | widen_magnitude(mag, 2, 15)

def f16_from_f32(u):
    a = u & ABS
    if a > INF: return 0x7FFF
    mag = round_magnitude_rne(a, 10, 15)
    if mag > 0x7C00: mag = 0x7C00
    return ((u >> 16) & 0x8000) | mag

def bf16_from_f32(u):
    a = u & ABS
    if a > INF: return 0x7FFF
    return ((u >> 16) & 0x8000) | round_magnitude_rne(a, 7, 127)

def e4m3_from_f32(u, sat=True):
    a = u & ABS
    if a > INF: return 0x7F
    mag = round_magnitude_rne(a, 3, 7)
    if mag > 0x7E: mag = 0x7E if sat else 0x7F
    return ((u >> 24) & 0x80) | mag

def e5m2_from_f32(u, sat=True):
    a = u & ABS
    if a > INF: return 0x7F
    mag = round_magnitude_rne(a, 2, 15)
    if mag > 0x7B: mag = 0x7B if sat else 0x7C
    return ((u >> 24) & 0x80) | mag

def bf16_from_float_stochastic(u, r):
    if (u & ABS) > INF: return 0x7FFF
    mag = ((u & ABS) + (r & 0xFFFF)) >> 16
    return ((u >> 16) & 0x8000) | mag

def stochastic_rounding_bits(seed, step, i):
    z = u64(seed ^ u64(u64(step) * 0x9E3779B97F4A7C15) ^ u64(u64(i) * 0xD1B54A32D192ED03))
    z = u64((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9)
    z = u64((z ^ (z >> 27)) * 0x94D049BB133111EB)
    return u32((z ^ (z >> 31)) >> 32)

def bf16_half_ulp_of_exponent(e):
    return from_bits(((e - 8) << 23) if e > 8 else (1 << ((e if e else 1) + 14)))

TO_F32 = {'f32': lambda b: b, 'f16': f16_to_f32, 'bf16': bf16_to_f32, 'e4m3': e4m3_to_f32,
          'e5m2': e5m2_to_f32}
FROM_F32 = {'f32': lambda u: u, 'f16': f16_from_f32, 'bf16': bf16_from_f32, 'e4m3': e4m3_from_f32,
            'e5m2': e5m2_from_f32}

# ---------------- backend/cpu/fast_formats.h (the CPU backend's vectorised loops)
def fast_round_magnitude(a, M, B):
    shift = 23 - M
    normal = u32(a + u32((B - 127) << 23) + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1)) >> shift
    magic_bits = (127 - B + shift + 1) << 23
    magic = from_bits(magic_bits)
    sub_ = u32(fbits(f32(from_bits(a) + magic)) - magic_bits)   # one fp32 addition, RNE
    min_normal_bits = (127 + 1 - B) << 23
    return sub_ if a < min_normal_bits else normal

def fast_bf16_bits(x_bits):
    u = x_bits; a = u & ABS
    mag = u32(a + 0x7FFF + ((a >> 16) & 1)) >> 16
    return 0x7FFF if a > INF else (((u >> 16) & 0x8000) | mag)

def fast_f16_bits(u):
    a = u & ABS
    mag = fast_round_magnitude(a, 10, 15)
    mag = 0x7C00 if a >= 0x477FF000 else mag
    return 0x7FFF if a > INF else (((u >> 16) & 0x8000) | mag)

def fast_e4m3_bits(u):
    a = u & ABS
    mag = fast_round_magnitude(a, 3, 7)
    mag = 0x7E if a >= 0x43E80000 else mag
    mag = 0x7E if mag > 0x7E else mag
    return 0x7F if a > INF else (((u >> 24) & 0x80) | mag)

def fast_e5m2_bits(u):
    a = u & ABS
    mag = fast_round_magnitude(a, 2, 15)
    mag = 0x7B if a >= 0x47700000 else mag
    mag = 0x7B if mag > 0x7B else mag
    return 0x7F if a > INF else (((u >> 24) & 0x80) | mag)

def fast_e4m3_value(q):
    mag = q & 0x7F
    v = from_bits(mag << 20) * 2.0 ** 120   # exact
    b = fbits(v) | ((q & 0x80) << 24)
    return (b | 0x7FF00000) if mag == 0x7F else b

def fast_e5m2_value(q):
    mag = q & 0x7F
    v = from_bits(mag << 21) * 2.0 ** 112
    sign = (q & 0x80) << 24
    payload = mag & 0x3
    special = INF | (payload << 21) | (int(payload != 0) << 22)
    return sign | (special if mag >= 0x7C else fbits(v))

def fast_bf16_to_f32(b):
    u = b << 16
    return (u | QUIET) if (u & ABS) > INF else u

def fast_bf16_half_ulp(w_bits):
    return bf16_half_ulp_of_exponent((fast_bf16_bits(w_bits) >> 7) & 0xFF)

# CPU widen_into: f16 by a table built from formats.h's to_float, bf16 by fast::to_float, fp8
# arithmetically; fp32 is a memcpy.
CPU_WIDEN = {'f32': lambda b: b, 'f16': f16_to_f32, 'bf16': fast_bf16_to_f32,
             'e4m3': fast_e4m3_value, 'e5m2': fast_e5m2_value}
CPU_NARROW = {'f16': fast_f16_bits, 'bf16': fast_bf16_bits, 'e4m3': fast_e4m3_bits,
              'e5m2': fast_e5m2_bits}
ZERO_MASK = {'f16': 0x7FFF, 'bf16': 0x7FFF, 'e4m3': 0x7F, 'e5m2': 0x7F}

def cpu_narrow_into(vals_bits, T):
    """narrow_into (cpu_precision.cpp): fp32 bits -> T bits with narrow_block's counts."""
    if T == 'f32': return list(vals_bits), (0, 0)
    to_bits, zm = CPU_NARROW[T], ZERO_MASK[T]
    max_bits = fbits(MAXF[T])
    out, over, under = [], 0, 0
    for x in vals_bits:
        y = to_bits(x)
        out.append(y)
        a = x & ABS
        over += int(a > max_bits and a <= 0x7F7FFFFF)
        under += int(a != 0 and (y & zm) == 0)
    return out, (over, under)

def cpu_widen_vals(bits, dt):
    return [from_bits(CPU_WIDEN[dt](b)) for b in bits]

# ---------------- the CUDA intrinsics (cuda_common.cuh load / store / load_any)
# __float2bfloat16_rn and __float2half_rn are modelled by formats.h's conversions, which the
# project checks against them bit for bit (tests/test_formats.cpp); __bfloat162float is a shift
# (a signalling NaN stays signalling, unlike formats.h's to_float); __half2float as formats.h.
def dev_load(dt, b):
    if dt == 'bf16': return from_bits(b << 16)
    if dt == 'f16': return from_bits(f16_to_f32(b))
    return from_bits(b)

def dev_store(T, x):
    u = fbits(x)
    if T == 'bf16': return bf16_from_f32(u)
    if T == 'f16': return f16_from_f32(u)
    return u

def store_counted(t, buf, T, i, x, tally):
    """cuda_common.cuh store_counted<T>: p[i] = store<T>(x); tally.add(x, load<T>(y), max)."""
    y = dev_store(T, x)
    t.st(buf, i, y)
    if T != 'f32' and 'store_nocount' not in MUT:
        tally.add(x, dev_load(T, y), MAXF[T])

NAN_PATTERN = {'f32b': 0x7FFFFFFF, 'f16b': 0x7FFF, 'bf16b': 0x7FFF, 'e4m3b': 0x7F, 'e5m2b': 0x7F}

def ldb(t, buf, i):
    """A load of a bit pattern; simt records an out-of-bounds or uninitialised read as an error
    and returns a float NaN, which becomes the dtype's NaN pattern here."""
    v = t.ld(buf, i)
    return v if isinstance(v, int) else NAN_PATTERN.get(buf.dtype, 0)

def load_any(t, buf, dt, i):
    return dev_load(dt, ldb(t, buf, i))

def bitbuf(name, dt, bits, base=256):
    b = Buf(name, dt + 'b', len(bits), None, base)
    b.data = list(bits)
    return b

def outbuf(name, dt, n, base=512):
    return Buf(name, dt + 'b', n, None, base)

def counters():
    b = Buf('counters', 'i32', 2, None)
    b.data = [0, 0]
    return b

def ctr(c): return (c.data[0] or 0, c.data[1] or 0)

# ---------------- comparison
class Report:
    def __init__(self, name=''):
        self.name = name; self.fail = []; self.checks = 0; self.notes = []
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

def same_bits(dt, a, b, nan_loose):
    """Equal bit patterns; with nan_loose, any two fp32 NaNs are equal (the NaN an fp32
    arithmetic result carries differs between x86 and the GPU: tests/test_cuda_ops.cpp compares
    NaN by kind)."""
    if a == b: return True
    if a is None or b is None: return False
    if nan_loose and dt == 'f32' and is_nan32(a) and is_nan32(b): return True
    return False

def compare(R, what, dt, got, exp, nan_loose=False):
    bad = [i for i in range(len(exp)) if not same_bits(dt, got[i], exp[i], nan_loose)]
    R.check(not bad, '%s: %d of %d differ, first at %s (got %s, want %s)' % (
        what, len(bad), len(exp), bad[:3], [hx(got[i]) for i in bad[:3]], [hx(exp[i]) for i in bad[:3]]))
    return not bad

def hx(b): return None if b is None else hex(b)

def writes_once(R, buf, what, expect=1):
    bad = [i for i in range(buf.n) if buf.writes[i] != expect]
    R.check(not bad, '%s: %s written %s times at %s (expected %d)' % (
        what, buf.name, [buf.writes[i] for i in bad[:3]], bad[:3], expect))

# ---------------- inputs: random values with the special ones mixed in
def f32_specials():
    s = [0x00000000, 0x80000000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF,
         0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000001, 0x007FFFFF,
         0x00800000, 0x80800000,
         0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0xFF7F8000, 0x7F7E8000,   # bf16 max, its ties
         0x3F808000, 0x3F818000, 0xBF808000, 0x00008000, 0x00018000, 0x00007FFF,  # bf16 ties
         0x477FE000, 0x477FEFFF, 0x477FF000, 0xC77FF000, 0x33000000, 0x33400000, 0x33C00000,
         0x32FFFFFF, 0xB3000001, 0x387FC000, 0x38800000,   # fp16 max, 65520, subnormal ties
         0x3F801000, 0x3F803000, 0xC2001000, 0x46FFF000,     # fp16 normal ties (even, odd)
         0x43E00000, 0x43E80000, 0x43E80001, 0x43F00000, 0xC3E80000, 0x3A800000, 0x3B000000,
         0x3B400000, 0x3AFFFFFF,                              # e4m3 448, 464, 480, 2^-10, 2^-9
         0x47600000, 0x47700000, 0x476FFFFF, 0x37000000, 0x37800000, 0x37C00000, 0x36FFFFFF]
    return s

NARROW_SPECIALS = {'bf16': [0x7F81, 0xFFBF, 0x7FA0, 0x7FC0, 0xFFFF, 0x7F80, 0xFF80, 0x0001, 0x8001],
                   'f16': [0x7C01, 0xFDFF, 0x7D00, 0x7E00, 0xFFFF, 0x7C00, 0xFC00, 0x0001, 0x8001, 0x7BFF],
                   'e4m3': [0x7F, 0xFF, 0x7E, 0xFE, 0x01, 0x81],
                   'e5m2': [0x7C, 0xFC, 0x7D, 0x7E, 0xFF, 0x7B, 0x01, 0x81]}

def rand_bits(rng, n, dt, scale=1.0, special=0.0):
    """n values of dt as bits: gaussian*scale rounded to dt; a fraction `special` replaced by
    special fp32 values (rounded to dt) or, for the narrow formats, random bit patterns."""
    out = []
    sp = f32_specials()
    for _ in range(n):
        r = rng.random()
        if r < special * 0.6:
            u = rng.choice(sp)
        elif r < special and dt != 'f32':
            if rng.random() < 0.3:   # NaN (signalling and quiet) and infinity encodings
                out.append(rng.choice(NARROW_SPECIALS[dt])); continue
            out.append(rng.getrandbits(NBITS[dt])); continue
        elif r < special:
            u = rng.getrandbits(32)
        else:
            u = fbits(f32(rng.gauss(0.0, scale)))
        out.append(FROM_F32[dt](u))
    return out

def f64bits(x): return struct.unpack('<Q', struct.pack('<d', x))[0]

# ---------------- launch_sw: simt's scheduler plus __syncwarp (yield ('syncwarp',))
class SharedHB:
    """Shared memory whose race check orders two accesses by thread barriers passed: a
    __syncthreads between them, or a __syncwarp between them when both lanes are in one warp."""
    def __init__(self, name, n):
        self.name, self.n = name, n
        self.data = [None] * n
        self.last_w = {}
        self.reads = {}

def _ordered(p, a):
    return p[0] == a[0] or a[2] > p[2] or (a[1] == p[1] and a[3] > p[3])

class ThreadSW(simt.Thread):
    def _stamp(self):
        w = self.tid >> 5
        return (self.tid, w, self.bs['interval'], self.bs['warp'][w])
    def _shev(self, arr, i, kind):
        if not (0 <= i < arr.n):
            self.L.err('OOB shared %s[%d] (n=%d)' % (arr.name, i, arr.n)); return False
        me = self._stamp()
        lw = arr.last_w.get(i)
        if lw is not None and not _ordered(lw, me):
            self.L.err('shared race on %s[%d]: %s by thread %d after a write by thread %d with no barrier between'
                       % (arr.name, i, kind, me[0], lw[0]))
        if kind == 'w':
            for r in arr.reads.get(i, ()):
                if not _ordered(r, me):
                    self.L.err('shared race on %s[%d]: write by thread %d after a read by thread %d with no barrier between'
                               % (arr.name, i, me[0], r[0])); break
            arr.last_w[i] = me; arr.reads[i] = []
        else:
            rs = arr.reads.setdefault(i, [])
            if len(rs) < 64: rs.append(me)
        return True
    def _ev(self, buf, i, kind):
        self.L.events.setdefault((buf.name, i), []).append(
            (self.block, self.tid, self.bs['interval'], kind))

def launch_sw(name, kernel, grid, block, args, errors, seed=0, shared_spec=()):
    L = simt.Launch(name, errors)
    rng = random.Random(seed)
    gx, gy = grid
    bx, by = block
    nthreads = bx * by
    nwarps = nthreads // 32
    blocks = [(x, y) for y in range(gy) for x in range(gx)]
    order = list(range(len(blocks)))
    rng.shuffle(order)
    for bl in order:
        shared = {nm: SharedHB(nm, n) for nm, n in shared_spec}
        bs = {'interval': 0, 'warp': [0] * nwarps}
        ths = [ThreadSW(L, bl, tid, block, blocks[bl], grid, shared, bs) for tid in range(nthreads)]
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
            for w in range(nwarps):
                lanes = range(32 * w, 32 * w + 32)
                waiting = [i for i in lanes if alive[i] and req[i][0] in ('xor', 'down', 'syncwarp')]
                if not waiting: continue
                kinds = set(req[i][0] if req[i][0] == 'syncwarp' else (req[i][0], req[i][2]) for i in waiting)
                if len(waiting) != 32:
                    if len([i for i in lanes if alive[i]]) == len(waiting):
                        L.err('full-mask warp collective %s with %d lanes (block %d warp %d)'
                              % (kinds, len(waiting), bl, w))
                        raise Err('deadlock')
                    continue   # other lanes have not reached it yet (or wait at __syncthreads)
                if len(kinds) != 1:
                    L.err('lanes at different warp collectives %s' % kinds); raise Err('deadlock')
                k = kinds.pop()
                if k == 'syncwarp':
                    bs['warp'][w] += 1
                    for i in lanes: send[i] = None; req[i] = None
                else:
                    op, off = k
                    vals = [req[i][1] for i in lanes]
                    for l, i in enumerate(lanes):
                        src = (l ^ off) if op == 'xor' else (l + off if l + off < 32 else l)
                        send[i] = vals[src]; req[i] = None
                progress = True
            if progress: continue
            live = [i for i in range(nthreads) if alive[i]]
            if not live: break
            if all(req[i][0] == 'sync' for i in live):
                if len(live) != nthreads:
                    L.err('__syncthreads with %d of %d threads exited' % (nthreads - len(live), nthreads))
                bs['interval'] += 1
                for i in live: send[i] = None; req[i] = None
            else:
                L.err('stuck: %s' % sorted(set(req[i][0] for i in live))); raise Err('deadlock')
    for key, evs in L.events.items():
        ws = [e for e in evs if e[3] == 'w']
        for w_ in ws:
            if any((e[0], e[1]) != (w_[0], w_[1]) and not (e[0] == w_[0] and e[2] != w_[2]) for e in evs):
                L.err('global race on %s[%d]' % key); break
    return L
