# Shared helpers for these emulations.
import math, random
import _path  # noqa: F401 (simt.py is in the parent folder)
from simt import *

EPS32 = 2.0 ** -24

cpu_count = cpu_cast_counts  # (over, under), in simt.py
# counters(), ctr() and Report are in simt.py as well.

def writes_once(R, buf, idx, what, expect=1):
    for i in idx:
        if buf.writes[i] != expect:
            R.check(False, '%s: %s[%d] written %d times (expected %d)' % (what, buf.name, i, buf.writes[i], expect))
            return
    R.check(True, '')

def rand_vals(rng, n, T, scale=1.0, special=False):
    out = []
    for i in range(n):
        v = rng.gauss(0, scale)
        if special and rng.random() < 0.05:
            v = rng.choice([0.0, -0.0, 1e-9, -3e-8, 7e4, -9e4, 3.3e38, 1e-40])
        out.append(ROUND[T](f32(v)))
    return out
