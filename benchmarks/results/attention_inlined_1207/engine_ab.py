# Bundled bf16 engine (bf16 KV cache, the default), decode ms/step at 4/16 rows and one row after a long prompt,
# the parent's attention kernel and this one toggled in one process (alternating rounds, toggle.py).
# usage: python engine_ab.py ROUNDS  (AB_TOGGLE_DIR: the directory whose toggle.py switches old/new, default this
# one; AB_CASES: case names separated by ';'; ../inline_overloads_1207/engine_ab.py runs it with its own toggle)
import json, os, sys
import numpy as np
sys.path.insert(0, os.environ.get("AB_TOGGLE_DIR", os.path.dirname(os.path.abspath(__file__))))
from toggle import setv  # also: chdir to the checkout
import powerinfer_jax as pij

eng = pij.load("models/shakespeare-relu-llama")
ids = eng.encode("ROMEO:\nWhat light through yonder window breaks?")
long_ids = eng.encode(open("data/tinyshakespeare.txt").read()[:4000])[:600]
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
res = {}
CASES = {"1 row": [ids], "4 rows": [ids] * 4, "16 rows": [ids] * 16, "1 row, 600-token prompt": [long_ids]}
for name in os.environ.get("AB_CASES", "4 rows;16 rows;1 row, 600-token prompt").split(";"):
    prompts = CASES[name]
    for v in ("old", "new"):
        setv(v); eng.generate_batch(prompts, max_new_tokens=8, stop_at_eos=False)
    t = {"old": [], "new": []}
    for r in range(rounds):
        for v in (("old", "new") if r % 2 == 0 else ("new", "old")):
            setv(v)
            s = eng.generate_batch(prompts, max_new_tokens=96, stop_at_eos=False)[0].stats
            t[v].append(1e3 * s["decode_s"] / s["decode_steps"])
    ratios = np.array(t["old"]) / np.array(t["new"])
    res[name] = dict(old_ms=float(np.median(t["old"])), new_ms=float(np.median(t["new"])),
                     old_over_new=float(np.median(ratios)), paired=[round(float(x), 2) for x in ratios])
    print(name, res[name], flush=True)
print(json.dumps(res))
