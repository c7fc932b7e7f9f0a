# layernorm.cu's forward kernels (loop and register) with the Fp8Out output policy (5589148;
# layernorm.cu:29-57 and 354-411 at 6e29cce; ln.py) against:
#  - the composition: the PlainOut kernel's output in round_to (bf16, fp16, or fp32), then
#    quantise_one per element (restated here on the host, independently of ../fp8_math.py's:
#    q = satfinite(RNE(v * scale)) by cuda_fp8.hpp's conversion, the cast counted as CastTally
#    counts it, max |v| as magnitude bits): the same fp8 bytes, counts = PlainOut's + the
#    quantisation's, amax = max |v|, values = PlainOut's + N * C (the GEMM's quantise pass);
#    mean and rstd the PlainOut kernel's bits;
#  - the register kernel against the loop kernel (bytes, counts, amax);
#  - the CPU backend's layernorm_forward_fp8 (store_fp8 with fast_formats.h's roundings): on the
#    GPU's own fp32 y (the PlainOut<float> kernel's) the same bytes, counts and amax; on the
#    CPU's fp32 y (its sequential sums) the same counts and values;
#  - every byte written once, no race, out-of-bounds or uninitialised access.
# Inputs: columns whose outputs saturate (weight 2e5), underflow in round_to (weight 1e-9 for
# fp16, 1e-43 for bf16) or in the quantisation (weight 1e-3 / 1e-5), rows with inf or NaN (a
# NaN row), amax wanted or not, scales 1, 0.5, 64, 2^-4.
# Usage: python3 run_ln_fp8.py [quick]
import sys, random, math, time
import _path  # noqa: F401 (simt.py is in the parent folder)
import simt
from simt import *
from ln import *
from fp8_math import to_bits, FP8_MAX, device_rounding, cpu_store_fp8, max_magnitude
from run_ln import new_ctx, cpu_forward

def gen(rng, N, C, di, dw, db, rt, special, nonfinite):
    x = [rng.gauss(0.5, 2.0) for _ in range(N * C)]
    w = [rng.gauss(1.0, 0.3) for _ in range(C)]
    b = [rng.gauss(0.0, 0.3) for _ in range(C)]
    if special:
        for c in range(0, C, 5): w[c] = 2e5; b[c] = 0.0
        for c in range(1, C, 7): w[c] = 1e-9 if rt == 'f16' else 1e-43; b[c] = 0.0
        for c in range(2, C, 6): w[c] = 1e-3; b[c] = 0.0
        for c in range(3, C, 9): w[c] = -1e-5; b[c] = 0.0
    if nonfinite and N > 1:
        x[C + (C // 2)] = math.inf if N % 2 else math.nan   # row 1: a NaN row
    return (Buf('inp', di, N * C, x), Buf('weight', dw, C, w), Buf('bias', db, C, b))

def host_quantise(vals, scale, e4):
    """quantise_one, restated: (bytes, (over, under), amax bits)."""
    qs, over, under, am = [], 0, 0, 0
    for v in vals:
        am = max(am, fbits(v) & 0x7FFFFFFF)
        s = mul(v, scale)
        q = to_bits(s, e4)
        qs.append(q)
        a = abs(s)
        over += int(a > FP8_MAX[e4] and a <= FLT_MAX)
        under += int(s != 0.0 and (q & 0x7F) == 0)
    return qs, (over, under), am

def fwd(path, inp, weight, bias, N, C, out, fp8, seed):
    ctx = new_ctx()
    mean = Buf('mean', 'f32', N); rstd = Buf('rstd', 'f32', N)
    p = layernorm_forward(ctx, out, mean, rstd, inp, weight, bias, N, C, force=path, seed=seed, fp8=fp8)
    return p, mean, rstd, ctx

COVER = {'saturated': 0, 'q_under': 0, 'round_under': 0, 'over': 0, 'nan': 0, 'finite_amax': 0}

def case(R, N, C, dts, rt, e4, scale, seed, special=True, nonfinite=False, want_amax=True):
    rng = random.Random(seed)
    di, dw, db = dts
    fmt = 'e4m3' if e4 else 'e5m2'
    name = 'LN fp8 N=%d C=%d %s round_to=%s %s scale=%g amax=%s%s%s' % (
        N, C, '/'.join(dts), rt, fmt, scale, want_amax, ' special' if special else '', ' nonfinite' if nonfinite else '')
    inp, weight, bias = gen(rng, N, C, di, dw, db, rt, special, nonfinite)
    n = N * C
    # PlainOut<round_to>: the launcher's choice and the loop kernel
    outs = {}
    for path in (None, 'loop'):
        o = Buf('out', rt, n)
        p, mean, rstd, ctx = fwd(path, inp, weight, bias, N, C, o, None, seed + 1)
        R.check(not ctx['errors'], '%s plain %s: %s' % (name, p, ctx['errors'][:2]))
        outs[path] = (p, o, mean, rstd, ctx)
    pA, oP, meanP, rstdP, ctxP = outs[None]
    # Fp8Out<round_to, kE4M3>: the launcher's choice and the loop kernel
    res = {}
    for path in (None, 'loop'):
        q = Buf('out', 'u8', n)
        amax = Buf('amax', 'u32', 1, [0]) if want_amax else None
        p, mean, rstd, ctx = fwd(path, inp, weight, bias, N, C, q, Fp8Output(rt, e4, scale, amax), seed + 2 + (path == 'loop'))
        R.check(not ctx['errors'], '%s fp8 %s: %s' % (name, p, ctx['errors'][:2]))
        for buf in (q, mean, rstd):
            bad = [i for i in range(buf.n) if buf.writes[i] != 1]
            R.check(not bad, '%s fp8 %s: %s written %s times at %s' % (name, p, buf.name, [buf.writes[i] for i in bad[:3]], bad[:5]))
        res[path] = (p, q, mean, rstd, ctx, amax.data[0] if amax else None)
    p8, q8, mean8, rstd8, ctx8, am8 = res[None]
    R.check(p8 == pA, '%s: fp8 path %s, plain %s' % (name, p8, pA))
    ql = res['loop']
    R.check(q8.data == ql[1].data and ctr(ctx8['act']) == ctr(ql[4]['act']) and am8 == ql[5],
            '%s: fp8 %s vs loop differ (bytes %s, counts %s/%s, amax %s/%s)' % (
                name, p8, q8.data == ql[1].data, ctr(ctx8['act']), ctr(ql[4]['act']), am8, ql[5]))
    R.check([key(v) for v in mean8.data + rstd8.data] == [key(v) for v in meanP.data + rstdP.data],
            '%s: mean/rstd differ from PlainOut\'s' % name)
    # the composition: PlainOut's stored values, then quantise_one
    cq, cc, cam = host_quantise(oP.data, scale, e4)
    bad = [i for i in range(n) if q8.data[i] != cq[i]]
    R.check(not bad, '%s: bytes differ from PlainOut + quantise_one at %s (%s vs %s)' % (
        name, bad[:4], [q8.data[i] for i in bad[:2]], [cq[i] for i in bad[:2]]))
    exp = (ctxP['act'].data[0] + cc[0], ctxP['act'].data[1] + cc[1])
    R.check(ctr(ctx8['act']) == exp, '%s: counts %s, PlainOut %s + quantise %s' % (name, ctr(ctx8['act']), ctr(ctxP['act']), cc))
    R.check(ctx8['act_values'] == ctxP['act_values'] + n, '%s: values %d, PlainOut %d + %d' % (
        name, ctx8['act_values'], ctxP['act_values'], n))
    if want_amax: R.check(am8 == cam, '%s: amax %#x, composition %#x' % (name, am8, cam))
    # the CPU's store_fp8 on the GPU's own fp32 y (PlainOut<float>)
    of = Buf('out', 'f32', n)
    _, _, _, ctxF = fwd(None, inp, weight, bias, N, C, of, None, seed + 5)
    cb, rc, qc, cm = cpu_store_fp8([fbits(v) for v in of.data], rt, e4, scale)
    bad = [i for i in range(n) if q8.data[i] != cb[i]]
    R.check(not bad, '%s: bytes differ from the CPU\'s store_fp8 of the same y at %s' % (name, bad[:4]))
    R.check(ctr(ctx8['act']) == (rc[1] + qc[1], rc[2] + qc[2]), '%s: counts %s, CPU store_fp8 %s %s' % (
        name, ctr(ctx8['act']), rc, qc))
    R.check(ctx8['act_values'] == rc[0] + qc[0], '%s: values %d, CPU %d' % (name, ctx8['act_values'], rc[0] + qc[0]))
    if want_amax:
        nan_ok = rt == 'f32' and am8 > 0x7F800000 and cm > 0x7F800000   # fp32 NaN payloads
        R.check(am8 == cm or nan_ok, '%s: amax %#x, CPU %#x' % (name, am8, cm))
    # the CPU on its own fp32 y (sequential sums): the same counts
    ys, _, _ = cpu_forward(inp.data, weight.data, bias.data, N, C)
    cb2, rc2, qc2, cm2 = cpu_store_fp8([fbits(v) for v in ys], rt, e4, scale)
    R.check(ctr(ctx8['act']) == (rc2[1] + qc2[1], rc2[2] + qc2[2]), '%s: counts %s, CPU (own y) %s %s' % (
        name, ctr(ctx8['act']), rc2, qc2))
    ndiff = sum(1 for a, b in zip(q8.data, cb2) if a != b)
    # coverage
    mx = 0x7E if e4 else 0x7B
    for v, qb in zip(oP.data, q8.data):
        if qb is None: continue
        if v != v: COVER['nan'] += 1
        elif (qb & 0x7F) == mx and abs(mul(v, scale)) > FP8_MAX[e4]: COVER['saturated'] += 1
    COVER['q_under'] += cc[1]
    COVER['round_under'] += rc[2]
    COVER['over'] += rc[1] + cc[0]
    COVER['finite_amax'] += int(want_amax and am8 < 0x7F800000)
    R.log('%s [%s]: counts %s values %d amax %s; bytes differing from the CPU on its own y: %d' % (
        name, p8, ctr(ctx8['act']), ctx8['act_values'], ('%#x' % am8) if want_amax else '-', ndiff))

def checked(R, *a, **kw):
    """case() under device_rounding (as main() runs it): for the mutation harness."""
    with device_rounding():
        case(R, *a, **kw)

class Rep(simt.Report):
    def log(self, s): print(s, flush=True)

CASES = [  # N, C, (di, dw, db), round_to, e4, scale, kwargs
    (5, 1, ('f32', 'f32', 'f32'), 'bf16', True, 1.0, {}),
    (3, 33, ('bf16', 'f32', 'f16'), 'f16', False, 0.5, {'nonfinite': True}),
    (7, 37, ('bf16', 'bf16', 'bf16'), 'bf16', True, 64.0, {}),
    (11, 129, ('f32', 'f32', 'f32'), 'f32', True, 1.0, {}),
    (9, 129, ('f16', 'bf16', 'f32'), 'bf16', False, 2.0 ** -4, {'want_amax': False}),
    (6, 500, ('bf16', 'f32', 'f16'), 'f16', True, 1.0, {'nonfinite': True}),
    (3, 768, ('f32', 'f32', 'f32'), 'bf16', True, 0.5, {}),
    (4, 1031, ('bf16', 'bf16', 'bf16'), 'bf16', False, 1.0, {}),     # loop kernel
    (3, 1031, ('f32', 'f32', 'f32'), 'f32', False, 64.0, {'nonfinite': True}),
    (17, 96, ('f16', 'bf16', 'f32'), 'f16', True, 2.0 ** -4, {}),    # three blocks
    (4, 100, ('f32', 'f32', 'f32'), 'f16', True, 1.0, {'special': False}),
]

def main(which='all'):
    R = Rep('layernorm fp8')
    t0 = time.time()
    for k in COVER: COVER[k] = 0
    cases = CASES if which != 'quick' else [CASES[i] for i in (1, 3, 7)]
    with device_rounding():
        for i, (N, C, dts, rt, e4, sc, kw) in enumerate(cases):
            case(R, N, C, dts, rt, e4, f32(sc), 700 + i, **kw)
    if which != 'quick':
        for k, v in COVER.items(): R.check(v > 0, 'coverage: no %s' % k)
    print(R.summary(), '(%.0fs)' % (time.time() - t0))
    print('  classes seen:', ', '.join('%s %d' % kv for kv in COVER.items()))
    for f in R.fail[:10]: print('  FAIL', f[:300])
    return R

if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'all')
