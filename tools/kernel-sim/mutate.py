# The injected-bug (mutation) harness of the mut.py scripts: a flag in simt.MUT changes one index,
# bound, barrier, rounding, count or order in an emulation, and a run with it must fail a check.
import sys, time, io, contextlib
import simt

def failures(flag, run):
    """run() with simt.MUT = {flag} and its output swallowed: the failures of the Report it
    returns, or the emulator's stop (a deadlock) or any other exception as one failure."""
    simt.MUT.clear(); simt.MUT.add(flag)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            R = run()
        return R.fail
    except simt.Err as e:
        return ['emulator stopped: %s' % e]
    except Exception as e:
        return ['exception %s: %s' % (type(e).__name__, e)]
    finally:
        simt.MUT.clear()

def main(muts, only=None):
    """muts: (flag, run, description). Runs those named in only (default: the command line's
    arguments; none: all), a line each, then the totals. Returns (caught, missed)."""
    only = sys.argv[1:] if only is None else only
    caught = missed = 0
    t00 = time.time()
    for m, run, desc in muts:
        if only and m not in only: continue
        t0 = time.time()
        fails = failures(m, run)
        ok = bool(fails)
        caught += ok; missed += not ok
        print('MUTATION %-22s %-7s (%3d failures, %3.0fs) %s%s' % (
            m, 'CAUGHT' if ok else 'MISSED', len(fails), time.time() - t0, desc,
            ('\n      first: ' + fails[0][:200]) if fails else ''), flush=True)
    print('%d caught, %d missed (%.0fs)' % (caught, missed, time.time() - t00))
    return caught, missed
