# Sensitivity check: inject plausible bugs into the emulated kernel code and confirm the
# comparison flags them (so a clean result means something).
import sys, types
import run

SRC = open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'emu.py')).read()
MUTS = [
    ('none (clean)', 'kTile = 64', 'kTile = 64'),
    ('ldsm_rows_row: lane>>3 instead of lane>>4',
     'return n0 + (lane & 7) + 8 * (lane >> 4)', 'return n0 + (lane & 7) + 8 * ((lane >> 3) & 1)'),
    ('ldsm_rows_col: lane>>4 instead of (lane>>3)&1',
     'return k0 + 8 * ((lane >> 3) & 1)', 'return k0 + 8 * (lane >> 4)'),
    ('ldsm_cols_row: lane&7', 'return k0 + (lane & 15)', 'return k0 + (lane & 7)'),
    ('ldsm_cols_col: (lane>>3)&1', 'return n0 + 8 * (lane >> 4)', 'return n0 + 8 * ((lane >> 3) & 1)'),
    ('acc_half/acc_index swapped', 'def acc_half(r): return r >> 1', 'def acc_half(r): return r & 1'),
    ('acc_index swapped', 'def acc_index(r, h): return 2 * (r & 1) + h',
     'def acc_index(r, h): return 2 * (r >> 1) + h'),
    ('acc_row uses i&1', 'def acc_row(g, i): return g + 8 * (i >> 1)',
     'def acc_row(g, i): return g + 8 * (i & 1)'),
    ('fwd mask col >= row', 'if col > row[w][l][r] or col >= T:', 'if col >= row[w][l][r] or col >= T:'),
    ('fwd no T mask', 'if col > row[w][l][r] or col >= T:', 'if col > row[w][l][r]:'),
    ('dq mask col < row', 'valid = col <= row[w][l][r] and col < T', 'valid = col < row[w][l][r] and col < T'),
    ('dkv mask q > key', 'valid = q >= kr and q < T and kr < T', 'valid = q > kr and q < T and kr < T'),
    ('accumulate ldmatrix without .trans', 'b = ldsm_x4(tile, addrs, True, warp)',
     'b = ldsm_x4(tile, addrs, False, warp)'),
    ('frag_a a[1]/a[2] swapped',
     "word(tile, (r0 + g + 8) * LD + k0 + 2 * c, tid),\n            word(tile, (r0 + g) * LD + k0 + 2 * c + 8, tid),",
     "word(tile, (r0 + g) * LD + k0 + 2 * c + 8, tid),\n            word(tile, (r0 + g + 8) * LD + k0 + 2 * c, tid),"),
    ('no rescale by alpha', 'o[w][l][nb][2 * r] = f32(o[w][l][nb][2 * r] * alpha)',
     'o[w][l][nb][2 * r] = f32(o[w][l][nb][2 * r] * 1.0)'),
]
case = tuple(sys.argv[1:]) if len(sys.argv) > 1 else ('bf16', '1', '1', '70', '16')
f, B, NH, T, HS = case[0], *map(int, case[1:5])
qs = float(case[5]) if len(case) > 5 else 1.5
for name, old, new in MUTS:
    assert SRC.count(old) >= 1, name
    mod = types.ModuleType('emu')
    exec(compile(SRC.replace(old, new), 'emu_mut', 'exec'), mod.__dict__)
    run.emu = mod
    try:
        r = run.run_case(f, B, NH, T, HS, seed=7, qstd=qs, check_bwd=False)
        worst = max(v for k, v in r.items() if not k.startswith('t_') and not k.endswith('cpu'))
        print(f'{name:45s} worst err {worst:.2e}', 'DETECTED' if worst > 0.05 else 'MISSED')
    except Exception as e:
        print(f'{name:45s} raised {type(e).__name__}: {str(e)[:80]} DETECTED')
