# One-region FFN (host_sparse_ffn -> _ffn_kernel) against gate/up then down (two calls), alternating, cold and hot.
# usage: python ffn_one_region_ab.py N_FF D
import os, sys, time, numpy as np
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, "/work/main")
from ops.quant import to_weight
from ops import host_kernels as hk
rng = np.random.default_rng(0)
n, d = int(sys.argv[1]), int(sys.argv[2])
def W(r, c): return to_weight(rng.standard_normal((r, c)).astype(np.float32) * 0.05, "bfloat16")
wg, wu, wd = W(n, d), W(n, d), W(n, d)
every = np.arange(n, dtype=np.int32)
junk = np.ones(64 << 20 >> 3)
def fused(x): hk.host_sparse_ffn("reglu", wg, wu, wd, x, every, n, skip_zero_rows=False)
def split(x):
    h = hk.host_sparse_h("reglu", wg, wu, x, every, n)
    hk.host_axpy_down(wd, every, n, h, skip_zero_rows=False)
for cold in (True, False):
    for B in (1, 4, 16):
        x = rng.standard_normal((B, d)).astype(np.float32)
        fused(x); split(x)
        v = {"fused": [], "split": []}
        for _ in range(40):
            for name, f in (("fused", fused), ("split", split)):
                if cold: junk.sum()
                t0 = time.perf_counter(); f(x); v[name].append(time.perf_counter() - t0)
        mf, ms = np.median(v["fused"]) * 1e6, np.median(v["split"]) * 1e6
        print(n, d, "cold" if cold else "hot ", B, "fused", round(mf), "split", round(ms), "split/fused", round(ms / mf, 2))
