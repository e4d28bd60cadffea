"""One token, int4: old (HEAD: four rows a pass in the gate/up dot) vs new (a row at a time, offset out)."""
import sys, time
import numpy as np
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/tmp/w/old")
import powerinfer_jax  # noqa
import host_loops_old
import ops.host_kernels as hk
import ops.host_loops as new
from ops.quant import to_weight
NAMES = ["_ffn_kernel", "_ffn_kernel_serial", "_h_kernel", "_h_kernel_serial", "_matvec_q4_kernel", "_matvec_q4_kernel_serial"]
MODS = {"old": host_loops_old, "new": new}
def use(w):
    for n in NAMES: setattr(hk, n, getattr(MODS[w], n))
rng = np.random.default_rng(0)
d, f = 4096, 11008
L = [tuple(to_weight(rng.standard_normal((f, d)).astype(np.float32) * 0.02, "int4") for _ in range(3)) for _ in range(2)]
idx = np.arange(f, dtype=np.int32)
sel = np.sort(rng.permutation(f)[: int(0.3 * f)]).astype(np.int32)
x = rng.standard_normal((1, d)).astype(np.float32)
cases = [("gate/up h dense", lambda l: hk.host_sparse_h("reglu", l[0], l[1], x, idx, f)),
         ("FFN dense", lambda l: hk.host_sparse_ffn("reglu", *l, x, idx, f)),
         ("FFN 30%", lambda l: hk.host_sparse_ffn("reglu", *l, x, sel, len(sel))),
         ("matvec", lambda l: hk.host_matvec(l[0], x))]
for name, fn in cases:
    outs = {}
    for k in MODS: use(k); outs[k] = fn(L[0])
    err = float(np.max(np.abs(outs["new"] - outs["old"])) / np.max(np.abs(outs["old"])))
    ts = {k: [] for k in MODS}
    for r in range(8):
        for k in (list(MODS) if r % 2 else list(MODS)[::-1]):
            use(k); t0 = time.perf_counter()
            for l in L: fn(l)
            ts[k].append((time.perf_counter() - t0) / len(L))
    p = np.median(np.array(ts["old"]) / np.array(ts["new"]))
    print(f"int4 [11008,4096] 1 token {name}: old {1e3*np.median(ts['old']):.2f} ms new {1e3*np.median(ts['new']):.2f} ms, old/new {p:.2f}x, rel diff {err:.1e}", flush=True)
