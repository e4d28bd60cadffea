"""int4 at several tokens: old (HEAD: a pass per token) vs new (two tokens a pass), one process, alternating."""
import os, sys, time
import numpy as np
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/tmp/w/old")
import powerinfer_jax  # noqa
import host_loops_old
import ops.host_kernels as hk
import ops.host_loops as new
from ops.quant import to_weight
NAMES = ["_down_kernel", "_down_kernel_serial", "_ffn_kernel", "_ffn_kernel_serial", "_h_kernel", "_h_kernel_serial",
         "_matvec_q4_kernel", "_matvec_q4_kernel_serial"]
MODS = {"old": host_loops_old, "new": new}
def use(w):
    for n in NAMES: setattr(hk, n, getattr(MODS[w], n))
rng = np.random.default_rng(0)
d, f = [int(v) for v in sys.argv[1:3]] if len(sys.argv) > 2 else (4096, 11008)
L = [tuple(to_weight(rng.standard_normal((f, d)).astype(np.float32) * 0.02, "int4") for _ in range(3)) for _ in range(2)]
idx = np.arange(f, dtype=np.int32)
sel = np.sort(rng.permutation(f)[: int(0.3 * f)]).astype(np.int32)
for T in (2, 4, 16):
    x = rng.standard_normal((T, d)).astype(np.float32)
    xd = rng.standard_normal((T, f)).astype(np.float32)
    cases = [("matvec [f,d]", lambda l: hk.host_matvec(l[0], x)),
             ("FFN dense", lambda l: hk.host_sparse_ffn("reglu", *l, x, idx, f)),
             ("FFN 30%", lambda l: hk.host_sparse_ffn("reglu", *l, x, sel, len(sel)))]
    for name, fn in cases:
        outs = {}
        for k in MODS: use(k); outs[k] = fn(L[0])
        err = float(np.max(np.abs(outs["new"] - outs["old"])) / np.max(np.abs(outs["old"])))
        ts = {k: [] for k in MODS}
        for r in range(6):
            for k in (list(MODS) if r % 2 else list(MODS)[::-1]):
                use(k); t0 = time.perf_counter()
                for l in L: fn(l)
                ts[k].append((time.perf_counter() - t0) / len(L))
        p = np.median(np.array(ts["old"]) / np.array(ts["new"]))
        print(f"int4 [{f},{d}] {T} tokens {name}: old {1e3*np.median(ts['old']):.2f} ms new {1e3*np.median(ts['new']):.2f} ms, old/new {p:.2f}x, rel diff {err:.1e}", flush=True)
