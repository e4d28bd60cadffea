# Bundled bf16 engine, decode ms/step at 1/4/16 rows, the parent kernels and these toggled in one process
# (alternating rounds, toggle.py).
# usage: python engine_inproc_ab.py ROUNDS  (toggle.py: where the old kernels come from)
import json, os, sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toggle import setv  # also: chdir to the checkout
import powerinfer_jax as pij

eng = pij.load("models/shakespeare-relu-llama")
ids = eng.encode("ROMEO:\nWhat light through yonder window breaks?")
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
res = {}
for B in (1, 4, 16):
    for old in (True, False):
        setv('old' if old else 'new'); eng.generate_batch([ids] * B, max_new_tokens=8, stop_at_eos=False)
    v = {True: [], False: []}
    for _ in range(rounds):
        for old in (True, False):
            setv('old' if old else 'new')
            s = eng.generate_batch([ids] * B, max_new_tokens=96, stop_at_eos=False)[0].stats
            v[old].append(1e3 * s["decode_s"] / s["decode_steps"])
    ratios = [a / b for a, b in zip(v[True], v[False])]
    res[B] = dict(old_ms=float(np.median(v[True])), new_ms=float(np.median(v[False])), old_over_new=float(np.median(ratios)))
    print(B, {k: round(x, 3) for k, x in res[B].items()}, flush=True)
print(json.dumps(res))
