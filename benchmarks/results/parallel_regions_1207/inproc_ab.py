import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from old_new import setv  # also: chdir to the checkout
import powerinfer_jax as pij
eng = pij.load(sys.argv[1] if len(sys.argv) > 1 else "models/shakespeare-relu-llama")
ids = eng.encode("ROMEO:\nWhat light through yonder window breaks?")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 128
Bs = [int(b) for b in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, 4, 16]
for B in Bs:
    res = {"old": [], "new": []}
    for v in res: setv(v); eng.generate_batch([ids]*B, max_new_tokens=8, stop_at_eos=False)
    for rep in range(5):
        for v in (["old", "new"] if rep % 2 == 0 else ["new", "old"]):
            setv(v)
            s = eng.generate_batch([ids]*B, max_new_tokens=N, stop_at_eos=False)[0].stats
            res[v].append(1e3*s["decode_s"]/s["decode_steps"])
    o, n = np.median(res["old"]), np.median(res["new"])
    ratios = np.array(res["old"]) / np.array(res["new"])
    print(f"B={B}: old {o:.2f} ms/step  new {n:.2f}  old/new median {o/n:.2f}, paired {np.round(ratios, 2)}", flush=True)
