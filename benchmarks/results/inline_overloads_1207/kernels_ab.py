# Host kernels through their entry points (host_matvec, host_sparse_ffn over every neuron), the parent's loops and
# this commit's toggled in one process, alternating calls. usage: python kernels_ab.py FMT ROWS COLS TOKENS,...
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
from toggle import setv, HK
from ops.quant import to_weight
fmt, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
toks = [int(t) for t in sys.argv[4].split(",")]
rng = np.random.default_rng(0)
def W(r, c): return to_weight(rng.standard_normal((r, c)).astype(np.float32) * 0.05, fmt)
wg, wu, wd, wq = W(n, d), W(n, d), W(n, d), W(n, d)
every = np.arange(n, dtype=np.int32)
reps = 40 if n * d < 4e6 else 8
for B in toks:
    x = rng.standard_normal((B, d)).astype(np.float32)
    cases = {"matvec": lambda: HK.host_matvec(wq, x),
             "ffn": lambda: HK.host_sparse_ffn("reglu", wg, wu, wd, x, every, n, skip_zero_rows=False)}
    for name, f in cases.items():
        outs = {}
        for v in ("old", "new"):
            setv(v); outs[v] = np.array(f())
        np.testing.assert_allclose(outs["new"], outs["old"], rtol=1e-4, atol=1e-4 * np.abs(outs["old"]).max())
        t = {"old": [], "new": []}
        for r in range(reps):
            for v in (("old", "new") if r % 2 == 0 else ("new", "old")):
                setv(v); t0 = time.perf_counter(); f(); t[v].append(time.perf_counter() - t0)
        o, nw = np.median(t["old"]) * 1e6, np.median(t["new"]) * 1e6
        print(f"{fmt} [{n}, {d}] {name} {B} tok: old {o:.0f} us  new {nw:.0f} us  old/new {o / nw:.2f}", flush=True)
